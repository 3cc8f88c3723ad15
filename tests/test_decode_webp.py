"""WebP region decoding: libwebp's cropped decode, sliced from its margin, equals Pillow's full decode."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, features

from ferret_runtime.decode import webp

pytestmark = pytest.mark.skipif(not features.check("webp"), reason="this Pillow has no WebP support")


def _image(w: int, h: int, alpha: bool, seed: int) -> Image.Image:
    """Ramps, stripes and noise: chroma that changes from pixel to pixel, so upsampling matters at every edge."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    planes = [x * 255 // w, y * 255 // h, (x * 3 + y * 7) % 256] + ([(x ^ y) % 256] if alpha else [])
    arr = np.stack(planes, -1) + rng.integers(-40, 40, (h, w, len(planes)))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _webp(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "WEBP", **kw)
    return buf.getvalue()


def _corpus() -> list[tuple[str, bytes]]:
    out = []
    for i, (w, h) in enumerate([(333, 271), (257, 256), (301, 419)]):
        for alpha in (False, True):
            img = _image(w, h, alpha, i)
            for q in (50, 75, 95):
                out.append((f"{w}x{h} alpha {alpha} q{q}", _webp(img, quality=q)))
            out.append((f"{w}x{h} alpha {alpha} lossless", _webp(img, lossless=True)))
    return out


CORPUS = _corpus()


def test_the_library_is_pillows():
    assert webp.status().startswith("region decode"), webp.status()


@pytest.mark.parametrize(("label", "data"), CORPUS, ids=[label for label, _ in CORPUS])
def test_region_equals_full_decode(label, data):
    with Image.open(io.BytesIO(data)) as img:
        full = np.asarray(img.convert("RGB"))
    h, w = full.shape[:2]
    for size in (256, 37, 1):
        # corners, edges, centre, and odd offsets (lossy cropping itself needs even ones)
        xs = sorted(x for x in {0, 1, (w - size) // 2, w - size - 1, w - size} if 0 <= x <= w - size)
        ys = sorted(y for y in {0, 3, (h - size) // 2, h - size - 1, h - size} if 0 <= y <= h - size)
        for left in xs:
            for top in ys:
                got = webp.decode_region(data, left, top, size, size)
                assert got is not None, (label, left, top, size)
                assert got.shape == (size, size, 3) and got.flags.c_contiguous
                assert np.array_equal(got, full[top : top + size, left : left + size]), (label, left, top, size)


def test_animated_and_broken_files_fall_back():
    frames = [_image(64, 48, False, s) for s in (1, 2)]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], duration=50)
    assert webp.decode_region(buf.getvalue(), 0, 0, 16, 16) is None
    data = CORPUS[0][1]
    assert webp.decode_region(data, 0, 0, 16, 16) is not None
    assert webp.decode_region(data[: len(data) // 2], 0, 0, 16, 16) is None  # truncated
    assert webp.decode_region(data, 320, 0, 16, 16) is None  # outside the image
    assert webp.decode_region(b"RIFF" + bytes(40), 0, 0, 16, 16) is None
