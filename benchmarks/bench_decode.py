"""A 12-Mpx camera-sized JPEG (4000x3000, 4:2:0, quality 92; baseline and progressive) to the default
centre crop 256: Pillow's full decode + ``center_crop`` vs ``decode.jpeg.decode_region`` of the same 256x256
(bit-identical, checked here too). PNGs (12 Mpx and 2048x2048 RGB, smooth scene plus sensor noise, Pillow's
writer): the full decode + crop vs the IHDR way (Pillow decoding down to the crop's bottom) vs the fast way
(``decode.png.decode_region_fast``: inflate down to the bottom, unfilter in C left of the crop's right edge).
All single-threaded.

``make bench`` times each with pytest-benchmark; ``bench_side_by_side_ratio`` alternates the two in one
loop and prints the ratio of medians (run with ``-s`` to see it):

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
    return out


def pillow_crop(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return center_crop(np.asarray(im if im.mode == "RGB" else im.convert("RGB")), CROP)


def region_crop(data: bytes) -> np.ndarray | None:
    return jpeg.decode_region(data, LEFT, TOP, CROP, CROP)


def _need_region() -> None:
    if not jpeg.available():
        pytest.skip(jpeg.status())


@pytest.mark.parametrize("kind", ["baseline", "progressive"])
@pytest.mark.parametrize("how", ["pillow-full+crop", "decode_region"])
def bench_centre_crop_12mpx(benchmark, camera_jpegs, kind, how):
    benchmark.group = f"4000x3000 JPEG q92 4:2:0 {kind} -> centre crop {CROP}"
    if how == "decode_region":
        _need_region()
    fn = pillow_crop if how == "pillow-full+crop" else region_crop
    out = benchmark.pedantic(fn, (camera_jpegs[kind],), rounds=5, warmup_rounds=1)
    assert out is not None and out.shape == (CROP, CROP, 3)


@pytest.mark.parametrize("kind", ["baseline", "progressive"])
def bench_side_by_side_ratio(camera_jpegs, kind, request):
    """Both ways alternated in one loop (shared, noisy machines): the ratio of their medians."""
    _need_region()
    data = camera_jpegs[kind]
    assert np.array_equal(region_crop(data), pillow_crop(data))
    opt = request.config.getoption
    rounds = 3 if opt("benchmark_disable", False) and not opt("benchmark_enable", False) else 15
    full, region = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        pillow_crop(data)
        t1 = time.perf_counter()
        region_crop(data)
        t2 = time.perf_counter()
        full.append(t1 - t0)
        region.append(t2 - t1)
    f, r = statistics.median(full), statistics.median(region)
    print(f"\n{kind} 4000x3000 q92 4:2:0 ({len(data) / 1e6:.1f} MB), centre crop {CROP}, {rounds} rounds: "
          f"Pillow full decode + crop {f * 1e3:.1f} ms, decode_region {r * 1e3:.1f} ms, ratio {f / r:.1f}x")
    assert r > 0


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
