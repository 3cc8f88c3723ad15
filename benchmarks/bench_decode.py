"""A 12-Mpx camera-sized JPEG (4000x3000, 4:2:0, quality 92; baseline and progressive, plus the bench
workload's progressive camera files at quality 85 and 92) to the default centre crop 256: Pillow's full decode
+ ``center_crop`` vs ``decode.jpeg.decode_region`` of the same 256x256 at the whole height (``shorten=False``:
a progressive file's every scan entropy-decoded in full) vs from the shortened copy (the default: every scan
stops three iMCU rows below the crop), all bit-identical (checked here too). PNGs (12 Mpx and 2048x2048
RGB, smooth scene plus sensor noise, Pillow's writer): the full decode + crop vs the IHDR way (Pillow
decoding down to the crop's bottom) vs the fast way (``decode.png.decode_region_fast``: inflate down to the
bottom, unfilter in C left of the crop's right edge).
All single-threaded.

``make bench`` times each with pytest-benchmark; ``bench_side_by_side_ratio`` alternates the three JPEG ways
in one loop and prints their medians and ratios (run with ``-s`` to see it):

    .venv/bin/pytest benchmarks/bench_decode.py --benchmark-enable -s -q

In CI (``--benchmark-disable``) every body runs once, the ratio loop a few rounds.
"""

from __future__ import annotations

import io
import statistics
import time

import numpy as np
import pytest
from PIL import Image

from ferret_runtime.decode import jpeg, png
from ferret_runtime.preprocess import center_crop
from ferret_runtime.samples import natural_image

try:
    from ferret_export.bench.workload import make_file
except ImportError:  # a runtime-only install: the workload's camera files are left out
    make_file = None

W, H, CROP = 4000, 3000, 256
LEFT, TOP = int(round((W - CROP) / 2.0)), int(round((H - CROP) / 2.0))


@pytest.fixture(scope="module")
def camera_jpegs() -> dict[str, bytes]:
    tile = natural_image(np.random.default_rng(0), 1000)
    img = np.tile(tile, (3, 4, 1))  # 3000 x 4000
    out = {}
    for name, kw in (("baseline", {}), ("progressive", {"progressive": True})):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=92, subsampling=2, **kw)
        out[name] = buf.getvalue()
    if make_file is not None:
        for i, q in ((5, 85), (8, 92)):  # the workload's progressive camera files (every third is progressive)
            data = make_file("camera", i)[1]
            with Image.open(io.BytesIO(data)) as im:
                assert im.size == (W, H) and im.info.get("progressive")
            out[f"camera-q{q}-progressive"] = data
    return out


KINDS = ["baseline", "progressive", "camera-q85-progressive", "camera-q92-progressive"]


def pillow_crop(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return center_crop(np.asarray(im if im.mode == "RGB" else im.convert("RGB")), CROP)


def region_crop(data: bytes) -> np.ndarray | None:
    return jpeg.decode_region(data, LEFT, TOP, CROP, CROP)


def region_crop_whole_height(data: bytes) -> np.ndarray | None:
    return jpeg.decode_region_explained(data, LEFT, TOP, CROP, CROP, shorten=False)[0]


JPEG_WAYS = {"pillow-full+crop": pillow_crop, "region-whole-height": region_crop_whole_height,
             "region-shortened": region_crop}


def _jpeg(camera_jpegs: dict[str, bytes], kind: str) -> bytes:
    if kind not in camera_jpegs:
        pytest.skip("ferret_export is not installed: no workload camera files")
    return camera_jpegs[kind]


def _need_region() -> None:
    if not jpeg.available():
        pytest.skip(jpeg.status())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", list(JPEG_WAYS))
def bench_centre_crop_12mpx(benchmark, camera_jpegs, kind, how):
    data = _jpeg(camera_jpegs, kind)
    benchmark.group = f"4000x3000 JPEG 4:2:0 {kind} -> centre crop {CROP}"
    if how != "pillow-full+crop":
        _need_region()
    out = benchmark.pedantic(JPEG_WAYS[how], (data,), rounds=5, warmup_rounds=1)
    assert out is not None and out.shape == (CROP, CROP, 3)


@pytest.mark.parametrize("kind", KINDS)
def bench_side_by_side_ratio(camera_jpegs, kind, request):
    """The three ways alternated in one loop (shared, noisy machines): medians and their ratios."""
    _need_region()
    data = _jpeg(camera_jpegs, kind)
    want = pillow_crop(data)
    assert all(np.array_equal(fn(data), want) for fn in JPEG_WAYS.values())
    shortened = "SOF height" in jpeg.decode_region_explained(data, LEFT, TOP, CROP, CROP)[1]
    assert shortened == ("progressive" in kind)  # a single-scan baseline file keeps the whole-height path
    opt = request.config.getoption
    rounds = 3 if opt("benchmark_disable", False) and not opt("benchmark_enable", False) else 15
    times: dict[str, list[float]] = {k: [] for k in JPEG_WAYS}
    for _ in range(rounds):
        for k, fn in JPEG_WAYS.items():
            t0 = time.perf_counter()
            fn(data)
            times[k].append(time.perf_counter() - t0)
    m = {k: statistics.median(v) for k, v in times.items()}
    full, old, new = m["pillow-full+crop"], m["region-whole-height"], m["region-shortened"]
    print(f"\n{kind} 4000x3000 4:2:0 ({len(data) / 1e6:.1f} MB), centre crop {CROP}, {rounds} rounds: "
          f"Pillow full decode + crop {full * 1e3:.1f} ms, region at whole height {old * 1e3:.1f} ms, "
          f"region from the shortened copy {new * 1e3:.1f} ms; full/whole-height {full / old:.2f}x, "
          f"full/shortened {full / new:.2f}x, whole-height/shortened {old / new:.2f}x")
    assert new > 0


PNG_SIZES = {"4000x3000": (4000, 3000), "2048x2048": (2048, 2048)}


@pytest.fixture(scope="module")
def photo_pngs() -> dict[str, bytes]:
    """A smooth natural scene upscaled to size, plus +-4 of uniform noise per sample (a camera's), at Pillow's
    default compression: about 19 MB at 12 Mpx, like a camera picture saved as PNG."""
    rng = np.random.default_rng(1)
    scene = Image.fromarray(natural_image(rng, 1000, noise=0))
    out = {}
    for name, size in PNG_SIZES.items():
        arr = np.asarray(scene.resize(size, Image.BICUBIC)).astype(np.int16)
        arr = np.clip(arr + rng.integers(-4, 5, arr.shape, dtype=np.int16), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        out[name] = buf.getvalue()
    return out


def _png_ways(name: str):
    w, h = PNG_SIZES[name]
    left, top = int(round((w - CROP) / 2.0)), int(round((h - CROP) / 2.0))

    def full(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return center_crop(np.asarray(im if im.mode == "RGB" else im.convert("RGB")), CROP)

    return {"pillow-full+crop": full,
            "ihdr": lambda data: png.decode_region_ihdr(data, left, top, CROP, CROP),
            "fast": lambda data: png.decode_region_fast(data, left, top, CROP, CROP)}


@pytest.mark.parametrize("name", list(PNG_SIZES))
@pytest.mark.parametrize("how", ["pillow-full+crop", "ihdr", "fast"])
def bench_png_centre_crop(benchmark, photo_pngs, name, how):
    benchmark.group = f"{name} PNG RGB -> centre crop {CROP} ({png.inflate_module().__name__})"
    out = benchmark.pedantic(_png_ways(name)[how], (photo_pngs[name],), rounds=5, warmup_rounds=1)
    assert out is not None and out.shape == (CROP, CROP, 3)


@pytest.mark.parametrize("name", list(PNG_SIZES))
def bench_png_side_by_side_ratio(photo_pngs, name, request):
    """The three ways alternated in one loop (shared, noisy machines): medians and their ratios."""
    data, ways = photo_pngs[name], _png_ways(name)
    want = ways["pillow-full+crop"](data)
    assert all(np.array_equal(ways[k](data), want) for k in ("ihdr", "fast"))
    opt = request.config.getoption
    rounds = 3 if opt("benchmark_disable", False) and not opt("benchmark_enable", False) else 15
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(rounds):
        for k, fn in ways.items():
            t0 = time.perf_counter()
            fn(data)
            times[k].append(time.perf_counter() - t0)
    m = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{name} PNG ({len(data) / 1e6:.1f} MB), centre crop {CROP}, {rounds} rounds, inflate by "
          f"{png.inflate_module().__name__}: full decode + crop {m['pillow-full+crop'] * 1e3:.1f} ms, "
          f"IHDR way {m['ihdr'] * 1e3:.1f} ms, fast way {m['fast'] * 1e3:.1f} ms; "
          f"IHDR/fast {m['ihdr'] / m['fast']:.2f}x, full/fast {m['pillow-full+crop'] / m['fast']:.2f}x")
    assert m["fast"] > 0
