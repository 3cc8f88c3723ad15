"""``ferret bench --workload``: the generated workloads read back with Pillow, their determinism and cache, the
per-stage split against the whole chain, and the CLI's record and files."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image, JpegImagePlugin

from ferret_export.bench import workload as wl

from .conftest import run_ferret, small_onnx


def _jpeg_tables(quality: int) -> dict:
    """Pillow's quantisation tables for ``quality``, from an independent encode of a flat image."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buf, "JPEG", quality=quality, subsampling=2)
    return Image.open(io.BytesIO(buf.getvalue())).quantization


def test_same_bytes_twice_and_cached_once(tmp_path):
    for name in ("camera", "camera-png", "generator", "crop256"):
        assert wl.make_file(name, 1, 0.05) == wl.make_file(name, 1, 0.05), name
    a = wl.build_set("generator", 3, scale=0.05, root=tmp_path / "a", progress=False)
    b = wl.build_set("generator", 3, scale=0.05, root=tmp_path / "b", progress=False)
    assert [f.read_bytes() for f in a.files] == [f.read_bytes() for f in b.files]
    assert len({f.read_bytes() for f in a.files}) == 3  # three different images, not one repeated
    stamps = [f.stat().st_mtime_ns for f in a.files]
    again = wl.build_set("generator", 3, scale=0.05, root=tmp_path / "a", progress=False)
    assert again.files == a.files and [f.stat().st_mtime_ns for f in again.files] == stamps  # not regenerated
    assert f"v{wl.VERSION}" in str(a.files[0])


def test_camera_files_read_back(tmp_path):
    w = wl.build("camera", 6, scale=0.1, root=tmp_path, progress=False)
    for i, f in enumerate(w.files):
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.size == (400, 300) and im.mode == "RGB"
            assert JpegImagePlugin.get_sampling(im) == 2  # 4:2:0
            assert bool(im.info.get("progressive")) == (i % 3 == 2)
            assert im.getexif().get(0x0112) == (wl.ORIENTATIONS[(i // 2) % 3] if i % 2 else None)
            assert im.quantization == _jpeg_tables(wl.CAMERA_QUALITIES[i % 5])
            px = im.convert("L").resize((40, 30))
            lo, hi = px.getextrema()
            assert hi - lo > 60  # shapes and gradients: not flat
    # natural-ish, not noise: neighbouring pixels are strongly correlated
    import numpy as np

    a = np.asarray(Image.open(w.files[0]).convert("L"), np.float64)
    assert np.corrcoef(a[:, :-1].ravel(), a[:, 1:].ravel())[0, 1] > 0.8


def test_full_size_camera_jpeg_is_a_photo_sized_file():
    name, data = wl.make_file("camera", 4)  # quality 95, the largest of the cycle
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (4000, 3000) and JpegImagePlugin.get_sampling(im) == 2
    assert name.endswith(".jpg") and 1_000_000 <= len(data) <= 3_500_000


def test_generator_crop_and_mixed_sets(tmp_path):
    gen = wl.build("generator", 3, scale=0.1, root=tmp_path, progress=False)
    got = []
    for f in gen.files:
        with Image.open(f) as im:
            got.append((im.format, im.size))
    assert got == [("PNG", (102, 102)), ("WEBP", (205, 205)), ("JPEG", (102, 102))]
    crops = wl.build("crop256", 2, scale=0.1, root=tmp_path, progress=False)
    for f in crops.files:
        with Image.open(f) as im:
            assert (im.format, im.size) == ("PNG", (256, 256))  # never scaled
    mixed = wl.build("mixed", 2, scale=0.1, root=tmp_path, progress=False)
    assert len(mixed.files) == 8 and len(set(mixed.files)) == 8
    assert [f.parent.name.split("-n")[0] for f in mixed.files[:4]] == ["camera", "camera-png", "generator", "crop256"]
    assert wl.names("all") == wl.WORKLOADS and wl.names("camera") == ("camera",)
    with pytest.raises(ValueError, match="Received workload 'phone'"):
        wl.names("phone")


def test_split_stages_add_up_to_the_whole_chain(tmp_path):
    """Each stage timed alone (one thread) adds up to the same chain timed as a whole, per image. Tolerance: 40%
    of the whole plus 0.5 ms (two timings of a few ms on a shared machine), for both decode modes."""
    from ferret_export.bench.e2e import RealWorldConfig, measure_split, stage_sum

    onnx = small_onnx(tmp_path, size=64)
    w = wl.build("camera", 6, scale=0.25, root=tmp_path, progress=False)
    split, serial = measure_split(onnx, [str(f) for f in w.files], RealWorldConfig(batch=2, repeats=3, image_size=64))
    assert set(split) == {"read", "decode_crop_region", "decode_crop_full", "preprocess", "model"}
    assert all(v > 0 for v in split.values())
    for mode in ("region", "full"):
        assert abs(stage_sum(split, mode) - serial[mode]) <= 0.4 * serial[mode] + 0.5, (mode, split, serial)


def test_cli_writes_record_table_and_plot(tmp_path):
    out = tmp_path / "rw"
    proc = run_ferret("bench", "--workload", "all", "--count", "2", "--scale", "0.1", "--models", "ferretnet-s",
                      "--image-size", "64", "--iters", "1", "--warmup", "1", "--batch-sizes", "2",
                      "--workload-dir", str(tmp_path / "cache"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((out / "realworld.json").read_text())
    assert rec["schema"] == "ferret-bench-realworld/1"
    assert "AMD" in rec["machine"] or rec["hardware"]["cpu"] in rec["machine"]
    assert set(rec["decoders"]) and all(isinstance(v, str) for v in rec["decoders"].values())
    assert [m["model"] for m in rec["models"]] == ["ferretnet-s"]
    m = rec["models"][0]
    assert m["macs_per_image"] == pytest.approx(0.29e9 * (64 / 256) ** 2, rel=0.05)  # the README's 0.29 G at 256
    # the record names the runtime it ran (conftest pins ONNX Runtime through FERRET_BACKEND: no auto choice)
    assert (m["backend"], m["batch"], m["auto"]) == ("onnxruntime", 2, None) and m["streams"] >= 1
    assert [r["workload"] for r in rec["results"]] == list(wl.WORKLOADS)
    for r in rec["results"]:
        assert r["images"] == (8 if r["workload"] == "mixed" else 2)
        assert set(r["e2e"]) == {"region", "full"} and set(r["split_ms"]) >= {"read", "preprocess", "model"}
        for e in r["e2e"].values():
            assert e["img_s"] == pytest.approx(1e3 / e["wall_ms_per_image"])
    goals = {(g["goal"], g["mode"]): g for g in rec["goals"]}
    assert len(goals) == 6
    g = goals[("crop256 e2e / model alone", "region")]
    crop = next(r for r in rec["results"] if r["workload"] == "crop256")
    assert g["ratio"] == pytest.approx(crop["e2e"]["region"]["img_s"] / crop["model_alone"]["img_s"])
    assert g["met"] == (g["ratio"] >= 0.9)
    table = (out / "realworld.txt").read_text()
    assert "camera-png" in table and "goal ferretnet-s" in table
    assert "ferretnet-s: ran on onnxruntime" in table and table in proc.stdout + "\n"
    assert (out / "realworld.png").stat().st_size > 10_000
    assert not (out / "bench.json").exists()  # the paper's table is not run


@pytest.mark.parametrize("args, match", [
    (["--scale", "2"], "Received --scale 2"),
    (["--device", "cuda"], "with --workload"),
])
def test_cli_refuses_in_one_line(tmp_path, args, match):
    proc = run_ferret("bench", "--workload", "crop256", "--out", str(tmp_path), *args)
    assert proc.returncode != 0 and match in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_workload_or_mode_is_refused_before_any_work():
    from ferret_export.bench.e2e import RealWorldConfig, run_realworld
    from ferret_runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=r"Received workload 'phone'; expected some of camera, .* or all"):
        run_realworld(RealWorldConfig(workloads=("camera", "phone")), log=lambda _: pytest.fail("it started"))
    with pytest.raises(ConfigError, match=r"Received decode mode 'fast'; expected some of region, full"):
        run_realworld(RealWorldConfig(modes=("fast",)), log=lambda _: pytest.fail("it started"))
