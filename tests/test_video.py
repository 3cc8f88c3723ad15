"""Video input: ``ferret detect clip.mp4`` samples frames, scores them, and summarises."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ferret_runtime import Detector

from .conftest import run_ferret

av = pytest.importorskip("av", reason="video input needs PyAV (the 'video' extra)")


@pytest.fixture(scope="module")
def clip(reference):
    return reference / "real-kunming-1.mp4"


def test_video_frames_scored_and_summarised(clip, authors_ckpt):
    proc = run_ferret("detect", str(clip), "-w", str(authors_ckpt), "--every", "50", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    frames, (summary,) = rows[:-1], rows[-1:]
    # the clip has 250 frames (960x540, 30 fps): every 50th is 0, 50, ..., 200
    assert [r["path"] for r in frames] == [f"{clip}#frame={i}" for i in range(0, 250, 50)]
    assert summary["path"] == str(clip)
    s = summary["summary"]
    assert s["frames"] == 5
    assert s["fake_share"] == pytest.approx(sum(r["label"] == "fake" for r in frames) / 5)
    assert s["mean_prob_fake"] == pytest.approx(np.mean([r["prob_fake"] for r in frames]))
    # each frame's score is the detector's on that frame decoded independently with PyAV
    with av.open(str(clip)) as c:
        decoded = [f.to_ndarray(format="rgb24") for i, f in enumerate(c.decode(video=0)) if i % 50 == 0]
    assert decoded[0].shape == (540, 960, 3)
    with Detector.open(authors_ckpt) as det:
        direct = det.predict(decoded)
    for r, d in zip(frames, direct):
        assert r["logit"] == pytest.approx(d.logit, abs=1e-5)


def test_video_max_frames_and_table(clip, authors_ckpt):
    proc = run_ferret("detect", str(clip), "-w", str(authors_ckpt), "--max-frames", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sum("#frame=" in ln for ln in lines) == 3
    assert lines[-1].startswith(f"{clip}: 3 frames scored, ") and "judged synthetic" in lines[-1]


def test_bad_videos_are_reported_and_the_rest_still_runs(tmp_path, authors_ckpt, reference):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\0\0\0\x18ftypmp42 not a real movie")
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    image = reference / "images" / "real_coco_giraffe.png"
    proc = run_ferret("detect", str(broken), str(tmp_path / "absent.mp4"), str(fifo), str(image), "-w",
                      str(authors_ckpt), "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    by_path = {r["path"]: r for r in rows}
    assert "label" in by_path[str(image)]
    assert "broken.mp4: not a video PyAV can open" in by_path[str(broken)]["error"]
    assert "absent.mp4: no such file" in by_path[str(tmp_path / "absent.mp4")]["error"]
    assert by_path[str(fifo)]["error"] == f"{fifo}: is a FIFO, not a regular file"
    assert "3 of 4 inputs could not be read" in proc.stderr
    proc = run_ferret("detect", str(image), str(broken), "-w", str(authors_ckpt), "--every", "0")
    assert proc.returncode == 2 and "--every 0" in proc.stderr
