"""Decode and preprocessing on the CPU: what the runtime pays per image before inference.

Runs as a smoke test in CI (``--benchmark-disable``); ``make bench`` times them. Images are
256x256 procedural scenes (natural-image statistics) encoded as PNG and as JPEG quality 90.
"""

import io

import numpy as np
import pytest
from PIL import Image

from ferret_runtime.preprocess import center_crop, load_image, normalize
from ferret_runtime.samples import natural_image

BATCH, SIZE = 32, 256


@pytest.fixture(scope="module")
def encoded():
    rng = np.random.default_rng(0)
    img = natural_image(rng, 320)  # larger than the crop: the crop does real work
    out = {}
    for fmt, kw in (("PNG", {}), ("JPEG", {"quality": 90})):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, fmt, **kw)
        out[fmt] = buf.getvalue()
    return out


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def bench_decode(benchmark, encoded, fmt):
    benchmark.group = "decode one 320x320 image (Pillow)"
    arr = benchmark(load_image, encoded[fmt])
    assert arr.shape == (320, 320, 3)


def bench_center_crop(benchmark, encoded):
    benchmark.group = "crop"
    img = load_image(encoded["PNG"])
    out = benchmark(center_crop, img, SIZE)
    assert out.shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("reuse", [False, True], ids=["alloc", "reused-buffer"])
def bench_normalize_batch(benchmark, reuse):
    benchmark.group = f"normalise uint8 NHWC -> float32 NCHW, {BATCH}x{SIZE}x{SIZE}"
    u8 = np.random.default_rng(0).integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8)
    buf = np.empty((BATCH, 3, SIZE, SIZE), np.float32) if reuse else None
    out = benchmark(normalize, u8, out=buf)
    assert out.shape == (BATCH, 3, SIZE, SIZE) and out.dtype == np.float32
