"""``ferret scan``: the rows equal ``ferret detect --json``; a SIGKILLed scan resumes to the same
result (each path exactly once); sources and parts; the same Scorer on a local Ray instance."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferret_runtime.samples import natural_image

from .conftest import run_ferret, small_onnx

pa = pytest.importorskip("pyarrow", reason="ferret scan writes Parquet with pyarrow (the 'scan' extra)")
import pyarrow.parquet as pq  # noqa: E402

from ferret_runtime.errors import ConfigError  # noqa: E402
from ferret_runtime.scan import COLUMNS, PartStore, read_source, run_scan  # noqa: E402

N_IMAGES = 240


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A small real ONNX export (FerretNet-S, random weights, crop 64)."""
    return small_onnx(tmp_path_factory.mktemp("scan_model"), "s.onnx")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A few hundred small images in two sub-folders, and one file that is not an image."""
    root, rng = tmp_path_factory.mktemp("scan_images"), np.random.default_rng(5)
    for i in range(N_IMAGES):
        sub = root / ("a" if i % 3 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(natural_image(rng, 64)[: 64 - i % 5]).save(sub / f"{i:04d}.png")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


@pytest.fixture(scope="module")
def detected(model, folder) -> list[dict]:
    proc = run_ferret("detect", str(folder), "-m", str(model), "--json", "--device", "cpu")
    assert proc.returncode == 1, proc.stderr  # the broken file
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _assert_equals_detect(rows: list[dict], detected: list[dict], *, atol: float = 0.0) -> None:
    assert [r["path"] for r in rows] == [d["path"] for d in detected]  # row for row, in detect's order
    for r, d in zip(rows, detected):
        if "error" in d:
            assert r["error"] == d["error"] and r["logit"] is None and r["label"] is None
        else:
            assert r["error"] is None and r["label"] == d["label"]
            assert abs(r["logit"] - d["logit"]) <= atol and abs(r["prob_fake"] - d["prob_fake"]) <= atol


def _listed(parts: Path) -> list[str]:
    """The parts a scan's manifest records (replaced atomically: whole or absent)."""
    manifest = parts / "manifest.json"
    return sorted(json.loads(manifest.read_text())["parts"]) if manifest.exists() else []


def _scan(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ferret_runtime.cli", "scan", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_scan_equals_detect_and_a_killed_scan_resumes_to_the_same_rows(model, folder, detected, tmp_path):
    full = tmp_path / "full.parquet"
    proc = run_ferret("scan", str(folder), "--out", str(full), "-m", str(model), "--device", "cpu")
    assert proc.returncode == 1, proc.stderr  # one error row
    assert f"{N_IMAGES + 1} rows (" in proc.stderr and "1 errors" in proc.stderr and "rows/s" in proc.stderr
    rows = _rows(full)
    assert pq.read_schema(full).names == list(COLUMNS)
    # the same model, batches and decoding as ferret detect: the same floats
    _assert_equals_detect(rows, detected)
    assert {r["model_sha256"] for r in rows} == {__import__("hashlib").sha256(model.read_bytes()).hexdigest()}
    assert not full.with_name("full.parquet.parts").exists()

    out = tmp_path / "killed.parquet"
    parts = out.with_name("killed.parquet.parts")
    args = [str(folder), "--out", str(out), "-m", str(model), "--device", "cpu", "--part-rows", "8",
            "--batch-size", "4", "--workers", "1", "--streams", "1"]
    victim = _scan(*args)
    deadline = time.monotonic() + 120
    while len(_listed(parts)) < 3:
        assert victim.poll() is None and time.monotonic() < deadline, victim.stderr.read() if victim.poll() else "slow"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    committed = _listed(parts)  # committed: written, then recorded in the manifest (a later file is scored again)
    assert all((parts / name).is_file() for name in committed)
    assert not out.exists() and 3 <= len(committed) < (N_IMAGES + 1) // 8, "killed mid-way"
    (parts / ".part-999999.parquet.abc123.tmp").write_bytes(b"torn")  # what a kill inside a write leaves
    resumed = run_ferret("scan", *args)
    assert resumed.returncode == 1, resumed.stderr
    assert f"resuming: {8 * len(committed)} of {N_IMAGES + 1} paths already scored" in resumed.stderr
    got = _rows(out)
    assert [r["path"] for r in got] == [r["path"] for r in rows]  # each path exactly once, in order
    strip = lambda rs: [{k: v for k, v in r.items() if k != "scanned_at"} for r in rs]  # noqa: E731
    assert strip(got) == strip(rows)
    assert not parts.exists()


def test_sources_lists_and_manifests(folder, tmp_path):
    want = [str(p) for p in sorted(folder.rglob("*.png"))]
    text = tmp_path / "list.txt"
    text.write_text("# a comment\n\n" + "\n".join(want + want[:2]) + "\ns3://bucket/x.jpg\n")
    assert read_source(text) == want + ["s3://bucket/x.jpg"]  # duplicates once, URIs kept
    pq.write_table(pa.table({"file": want}), tmp_path / "m.parquet")
    assert read_source(tmp_path / "m.parquet", "file") == want
    (tmp_path / "m.csv").write_text("id,path\n" + "\n".join(f"{i},{p}" for i, p in enumerate(want)) + "\n")
    assert read_source(tmp_path / "m.csv") == want
    with pytest.raises(ConfigError, match=r"received columns \['file'\]; expected a 'path' column"):
        read_source(tmp_path / "m.parquet")
    with pytest.raises(ConfigError, match="expected a folder, a text file of paths"):
        read_source(tmp_path / "absent")


def test_a_list_source_with_missing_files_and_uris_and_another_model_refused(model, folder, tmp_path):
    images = [str(p) for p in sorted(folder.rglob("*.png"))][:5]
    text = tmp_path / "list.txt"
    text.write_text("\n".join(images + [str(tmp_path / "gone.png"), "file://" + images[0] + "x"]) + "\n")
    out = tmp_path / "r.parquet"
    summary = run_scan(text, out, model, quiet=True, log=lambda *_: None, device="cpu")
    assert summary.rows == 7 and summary.scored == 7 and len(summary.errors) == 2 and summary.labels == {"real": 5}
    rows = {r["path"]: r for r in _rows(out)}
    assert "gone.png: no such file" in rows[str(tmp_path / "gone.png")]["error"]
    assert "no such file" in rows["file://" + images[0] + "x"]["error"]
    again = run_scan(text, out, model, quiet=True, log=lambda *_: None, device="cpu")  # complete: nothing to score
    assert again.scored == 0 and again.rows == 7
    store = PartStore(out, "0" * 64)
    try:
        with pytest.raises(ConfigError, match="rows scored by model sha256 .*; expected 0000"):
            store.done()
    finally:
        store.close()
    with pytest.raises(ConfigError, match="a scan already writing there"):
        with_lock = PartStore(out, "0" * 64)
        try:
            PartStore(out, "0" * 64)
        finally:
            with_lock.close()


def test_ray_scan_with_two_actors_equals_detect(model, folder, detected, tmp_path):
    ray = pytest.importorskip("ray", reason="the 'ray' extra")
    pytest.importorskip("ray.data", reason="the 'ray' extra")
    from ferret_runtime.scan import init_local

    # a small local instance (2 CPUs, 100 MB object store) on 127.0.0.1 only (ray.init with
    # _node_ip_address="127.0.0.1" alone advertises the external interface: Ray swaps loopback for it);
    # run_scan uses an initialised Ray as it is
    init_local(num_cpus=2, object_store_memory=100 * 1024**2, include_dashboard=False, logging_level="ERROR",
               log_to_driver=False)
    odd = tmp_path / "names"
    odd.mkdir()
    odd_name = os.fsdecode(bytes(odd) + b"/\xff-0000.png")  # a file name that is not UTF-8
    shutil.copyfile(next(folder.rglob("0000.png")), odd_name)
    try:
        addresses = {n["NodeManagerAddress"] for n in ray.nodes()} | {ray.get_runtime_context().gcs_address}
        out = tmp_path / "ray.parquet"
        summary = run_scan(folder, out, model, ray_address="auto", concurrency=2, part_rows=64, batch_size=16,
                           quiet=True, log=lambda *_: None, device="cpu", streams=1, workers=1)
        used = ray.cluster_resources()
        odd_summary = run_scan(odd, tmp_path / "odd.parquet", model, ray_address="auto", concurrency=1,
                               quiet=True, log=lambda *_: None, device="cpu", streams=1, workers=1)
    finally:
        ray.shutdown()
    assert {a.rsplit(":", 1)[0] for a in addresses} == {"127.0.0.1"}, addresses
    assert odd_summary.rows == 1 and not odd_summary.errors
    (row,) = _rows(tmp_path / "odd.parquet")
    assert row["path_bytes"] == os.fsencode(odd_name) and row["path"] == str(odd) + "/\\xff-0000.png"
    assert summary.rows == N_IMAGES + 1 and summary.scored == N_IMAGES + 1 and len(summary.errors) == 1
    assert used.get("CPU") == 2
    # other batch compositions than detect's: equal up to float32 reassociation
    _assert_equals_detect(_rows(out), detected, atol=1e-5)
