"""PNG region decoding: the rows down to the crop's bottom give Pillow's full-decode pixels, bit for bit.

The corpus is written by a small PNG encoder here (numpy + zlib), independent of Pillow's, because Pillow's
writer picks the row filters itself: this one applies a chosen filter (0-4) per row, packs 1/2/4/8/16-bit
samples, and splits the deflate stream over many IDAT chunks.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ferret_runtime.decode import load_prepared, png
from ferret_runtime.errors import ImageError
from ferret_runtime.preprocess import Preprocess, load_image, prepare

CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _filter_row(raw: np.ndarray, prior: np.ndarray, kind: int, bpp: int) -> np.ndarray:
    """PNG filter ``kind`` (0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth) of one row of bytes, as the spec says."""
    x, b = raw.astype(np.int32), prior.astype(np.int32)
    a = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])  # the byte bpp to the left (0 off the edge)
    c = np.concatenate([np.zeros(bpp, np.int32), b[:-bpp]])
    pred = [np.zeros_like(x), a, b, (a + b) // 2, _paeth(a, b, c)][kind]
    return ((x - pred) % 256).astype(np.uint8)


def encode_png(samples: np.ndarray, colour: int, depth: int, filters: list[int], *,
               palette: bytes | None = None, trns: bytes | None = None, idat_size: int = 0) -> bytes:
    """A PNG of ``samples`` (H, W, C integers < 2**depth), row y filtered with ``filters[y % len(filters)]``;
    the deflate stream cut into IDAT chunks of ``idat_size`` bytes (0: one chunk)."""
    h, w, ch = samples.shape
    assert ch == CHANNELS[colour]
    if depth == 16:
        rows = samples.astype(">u2").view(np.uint8).reshape(h, w * ch * 2)
    elif depth == 8:
        rows = samples.astype(np.uint8).reshape(h, w * ch)
    else:  # 1, 2, 4 bits: pack big-endian within each byte, rows padded to whole bytes
        per = 8 // depth
        flat = samples.reshape(h, w).astype(np.uint8)
        flat = np.pad(flat, ((0, 0), (0, (-w) % per)))
        shifts = (8 - depth * (np.arange(per) + 1)).astype(np.uint8)
        rows = (flat.reshape(h, -1, per) << shifts).sum(axis=2).astype(np.uint8)
    bpp = max(1, ch * depth // 8)
    prior = np.zeros(rows.shape[1], np.uint8)
    raw = bytearray()
    for y in range(h):
        kind = filters[y % len(filters)]
        raw.append(kind)
        raw += _filter_row(rows[y], prior, kind, bpp).tobytes()
        prior = rows[y]
    stream = zlib.compress(bytes(raw), 6)
    step = idat_size or len(stream)
    out = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0))]
    if palette is not None:
        out.append(_chunk(b"PLTE", palette))
    if trns is not None:
        out.append(_chunk(b"tRNS", trns))
    out += [_chunk(b"IDAT", stream[i : i + step]) for i in range(0, len(stream), step)]
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)


def _full(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _boxes(w: int, h: int, size: int) -> list[tuple[int, int, int, int]]:
    """Crops at every edge and corner, the centre, and the whole image."""
    xs, ys = (0, (w - size) // 2, w - size), (0, (h - size) // 2, h - size)
    return [(x, y, size, size) for x in xs for y in ys] + [(0, 0, w, h), (w - 1, h - 1, 1, 1)]


def _corpus() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(24)
    out = []
    # smooth plus noise, so that every filter leaves real work for the decoder's unfiltering
    for colour, depth in [(2, 8), (6, 8), (0, 8), (4, 8), (2, 16), (6, 16), (0, 16), (0, 1), (0, 2), (0, 4)]:
        h, w = 37, 29
        ch = CHANNELS[colour]
        top = 2**depth - 1
        ramp = (np.add.outer(np.arange(h), np.arange(w)) * top // (h + w))[..., None]
        samples = np.clip(ramp + rng.integers(-top // 8 - 1, top // 8 + 2, (h, w, ch)), 0, top)
        for filters in ([0], [1], [2], [3], [4], [0, 1, 2, 3, 4], [4, 3, 2, 1, 0, 2, 4]):
            out.append((f"colour {colour} depth {depth} filters {filters}",
                        encode_png(samples, colour, depth, filters, idat_size=53)))
    # palette images: 8 and 4 bits, with and without tRNS
    palette = rng.integers(0, 256, 16 * 3, dtype=np.uint8).tobytes()
    idx = rng.integers(0, 16, (41, 33, 1))
    for depth in (8, 4):
        for trns in (None, bytes(range(0, 256, 32))):
            out.append((f"palette depth {depth} tRNS {trns is not None}",
                        encode_png(idx, 3, depth, [0, 1, 2, 3, 4], palette=palette, trns=trns, idat_size=31)))
    return out


CORPUS = _corpus()


def test_encoder_is_a_png_encoder():
    """The corpus is what it claims: Pillow reads the 8-bit RGB samples back exactly, for every filter."""
    samples = np.random.default_rng(0).integers(0, 256, (9, 7, 3))
    for filters in ([0], [1], [2], [3], [4]):
        assert np.array_equal(_full(encode_png(samples, 2, 8, filters, idat_size=20)), samples)


@pytest.mark.parametrize(("label", "data"), CORPUS, ids=[label for label, _ in CORPUS])
def test_region_equals_full_decode(label, data):
    full = _full(data)
    h, w = full.shape[:2]
    for size in (1, 16, min(w, h)):
        for left, top, bw, bh in _boxes(w, h, size):
            got = png.decode_region(data, left, top, bw, bh)
            assert got is not None, (label, left, top, bw, bh)
            assert got.dtype == np.uint8 and got.shape == (bh, bw, 3)
            assert np.array_equal(got, full[top : top + bh, left : left + bw]), (label, left, top, bw, bh)


def test_pillow_written_files_and_odd_sizes():
    """Pillow's own writer (its filter choice, its zlib) at sizes that are not multiples of anything."""
    rng = np.random.default_rng(5)
    for (w, h), mode in [((301, 299), "RGB"), ((257, 513), "RGBA"), ((300, 260), "L"), ((270, 281), "LA"),
                         ((263, 259), "P"), ((258, 300), "I;16")]:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(arr)
        img = img.quantize(200) if mode == "P" else img.convert("I").convert("I;16") if mode == "I;16" else \
            img.convert(mode)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        data = buf.getvalue()
        full = _full(data)
        for box in _boxes(w, h, 256):
            left, top, bw, bh = box
            assert np.array_equal(png.decode_region(data, *box), full[top : top + bh, left : left + bw]), (mode, box)


def _set_ihdr(data: bytes, offset: int, value: bytes) -> bytes:
    ihdr = bytearray(data[12:29])
    ihdr[4 + offset : 4 + offset + len(value)] = value
    return data[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(bytes(ihdr))) + data[33:]


def test_unusual_files_fall_back():
    data = CORPUS[0][1]
    assert png.decode_region(data, 0, 0, 8, 8) is not None
    interlaced = _set_ihdr(data, 12, b"\x01")  # Adam7: this decoder does not try
    assert png.decode_region(interlaced, 0, 0, 8, 8) is None
    bad_crc = data[:29] + bytes(4) + data[33:]
    assert png.decode_region(bad_crc, 0, 0, 8, 8) is None
    for cut in (len(data) - 1, len(data) - 12, len(data) // 2):  # truncated below the crop: not noticed by Pillow
        assert png.decode_region(data[:cut], 0, 0, 8, 8) is None
    assert png.decode_region(data, 20, 0, 10, 8) is None  # a box outside the image
    assert png.decode_region(b"GIF89a" + data[6:], 0, 0, 8, 8) is None
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    assert b"acTL" in buf.getvalue() and png.decode_region(buf.getvalue(), 0, 0, 8, 8) is None


def _outcome(fn) -> tuple[str, object]:
    """("array", the array) or ("error", ImageError's message)."""
    try:
        return "array", fn()
    except ImageError as e:
        return "error", str(e)


@pytest.mark.parametrize("damage", ["truncated", "truncated_chunk", "bad_ihdr_crc", "garbage_idat", "no_iend",
                                    "short_stream"])
def test_damaged_files_give_the_old_outcome(damage):
    """The old path's error message, word for word; or, where Pillow reads the file anyway, its pixels."""
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (300, 280, 3), dtype=np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    first_idat = data.index(b"IDAT") + 4
    rows = np.concatenate([np.zeros((100, 1), np.uint8), rng.integers(0, 256, (100, 280 * 3), dtype=np.uint8)], 1)
    bad = {
        "truncated": data[: len(data) * 3 // 4],
        "truncated_chunk": data[: len(data) - 12],  # IEND gone: Pillow reads it
        "bad_ihdr_crc": data[:29] + b"\0\0\0\0" + data[33:],
        "garbage_idat": data[:first_idat] + bytes(200) + data[first_idat + 200 :],
        "no_iend": data[:-12] + _chunk(b"tEXt", b"a\0b"),  # Pillow reads it; the region path leaves it to Pillow
        # 100 rows of 300 in a whole deflate stream: Pillow leaves the rest black, in both paths
        "short_stream": data[:33] + _chunk(b"IDAT", zlib.compress(rows.tobytes())) + _chunk(b"IEND", b""),
    }[damage]
    pre = Preprocess(crop=64)
    kind, old = _outcome(lambda: prepare(load_image(bad, "x.png"), pre))
    new_kind, new = _outcome(lambda: load_prepared(bad, pre, "x.png"))
    assert new_kind == kind
    if kind == "error":
        assert new == old and old.startswith("x.png: ")
    else:
        assert np.array_equal(new, old)
    assert (kind == "array") == (damage in ("no_iend", "truncated_chunk", "short_stream"))
