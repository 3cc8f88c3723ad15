"""PNG region decoding: the crop gives Pillow's full-decode pixels, bit for bit, both ways (fast: inflate down to
the crop's bottom and unfilter in C; IHDR: Pillow decodes a copy whose height ends at the crop's bottom).

The corpus is written by a small PNG encoder here (numpy + zlib), independent of Pillow's, because Pillow's
writer picks the row filters itself: this one applies a chosen filter (0-4) per row, packs 1/2/4/8/16-bit
samples, and splits the deflate stream over many IDAT chunks.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from ferret_runtime.decode import load_prepared, png
from ferret_runtime.decode.cbuild import BuildError, find_c_compiler
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
    return png_from_rows(bytes(raw), w, h, colour, depth, palette=palette, trns=trns, idat_size=idat_size)


def png_from_rows(raw: bytes, w: int, h: int, colour: int, depth: int, *, palette: bytes | None = None,
                  trns: bytes | None = None, idat_size: int = 0) -> bytes:
    """A PNG around the filtered rows ``raw`` (each a filter-type byte and its bytes), deflated."""
    stream = zlib.compress(raw, 6)
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
    for colour, depth in [(2, 8), (6, 8), (0, 8), (4, 8), (2, 16), (6, 16), (0, 16), (4, 16), (0, 1), (0, 2), (0, 4)]:
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
    # a palette shorter than the indices reach (Pillow's own rule for the missing entries), a colour key on
    # RGB and L (tRNS, no alpha channel), a wide image (many whole SIMD steps per row) in one IDAT
    short = palette[: 5 * 3]
    out.append(("palette of 5 for 16 indices", encode_png(idx, 3, 8, [4, 1, 3], palette=short, idat_size=64)))
    rgb = rng.integers(0, 256, (23, 301, 3))
    out.append(("RGB tRNS", encode_png(rgb, 2, 8, [4, 0, 3, 1, 2], trns=struct.pack(">HHH", 1, 2, 3))))
    out.append(("L tRNS", encode_png(rgb[..., :1], 0, 8, [3, 4], trns=struct.pack(">H", 7))))
    return out


CORPUS = _corpus()


def test_encoder_is_a_png_encoder():
    """The corpus is what it claims: Pillow reads the 8-bit RGB samples back exactly, for every filter."""
    samples = np.random.default_rng(0).integers(0, 256, (9, 7, 3))
    for filters in ([0], [1], [2], [3], [4]):
        assert np.array_equal(_full(encode_png(samples, 2, 8, filters, idat_size=20)), samples)


def _bit_depth(data: bytes) -> int:
    return data[24]


@pytest.mark.parametrize(("label", "data"), CORPUS, ids=[label for label, _ in CORPUS])
def test_region_equals_full_decode(label, data):
    """Every box through both ways and through decode_region; the fast way answers for every 8/16-bit file
    (sub-byte samples are the IHDR way's), so a test of the fast way cannot pass on the fallback."""
    full = _full(data)
    h, w = full.shape[:2]
    fast_expected = _bit_depth(data) >= 8
    for size in (1, 16, min(w, h)):
        for left, top, bw, bh in _boxes(w, h, size):
            want = full[top : top + bh, left : left + bw]
            fast = png.decode_region_fast(data, left, top, bw, bh)
            slow = png.decode_region_ihdr(data, left, top, bw, bh)
            got, how = png.decode_region_explained(data, left, top, bw, bh)
            assert (fast is not None) == fast_expected and how == ("fast" if fast_expected else "ihdr"), \
                (label, left, top, bw, bh, how)
            for arr in (got, slow) + ((fast,) if fast_expected else ()):
                assert arr is not None and arr.dtype == np.uint8 and arr.shape == (bh, bw, 3)
                assert np.array_equal(arr, want), (label, left, top, bw, bh)


def test_fast_way_is_taken_for_pillow_written_files():
    """Pillow's own writer (adaptive filters, its zlib): 8-bit RGB, RGBA, L, LA, P and 16-bit L go the fast way."""
    rng = np.random.default_rng(11)
    arr = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    for mode in ("RGB", "RGBA", "L", "LA", "P", "I;16"):
        img = Image.fromarray(arr)
        img = img.quantize(64) if mode == "P" else img.convert("I").convert("I;16") if mode == "I;16" else \
            img.convert(mode)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        got, how = png.decode_region_explained(buf.getvalue(), 17, 9, 40, 50)
        assert how == "fast", mode
        assert np.array_equal(got, _full(buf.getvalue())[9:59, 17:57]), mode


def test_without_isal_zlib_inflates_the_same_bytes(monkeypatch):
    cases = [CORPUS[0], CORPUS[-1], CORPUS[-3]]
    with_default = [png.decode_region_explained(data, 2, 3, 10, 11) for _, data in cases]
    monkeypatch.setitem(sys.modules, "isal", None)  # `from isal import isal_zlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "isal.isal_zlib", None)
    assert png.inflate_module() is zlib
    for (label, data), (want, how) in zip(cases, with_default, strict=True):
        got, how_zlib = png.decode_region_explained(data, 2, 3, 10, 11)
        assert how == how_zlib == "fast" and np.array_equal(got, want), label
        assert np.array_equal(got, _full(data)[3:14, 2:12]), label
    assert "zlib (install isal" in png.status()


@pytest.mark.parametrize("batch", [1, 60, 500])
def test_idat_batches_of_any_size(monkeypatch, batch):
    """The inflater fed the IDAT data one chunk at a time, two at a time, or many joined: the same pixels."""
    monkeypatch.setattr(png, "BATCH_BYTES", batch)
    for label, data in CORPUS[::5]:
        if _bit_depth(data) < 8:
            continue
        full = _full(data)
        h, w = full.shape[:2]
        got, how = png.decode_region_explained(data, 0, h // 2, w, h - h // 2)
        assert how == "fast" and np.array_equal(got, full[h // 2 :]), label


def test_isal_is_used_when_installed():
    isal_zlib = pytest.importorskip("isal.isal_zlib", reason="isal is not installed here")
    assert png.inflate_module() is isal_zlib and "ISA-L" in png.status()


def test_without_a_c_compiler_the_ihdr_way_answers(monkeypatch, tmp_path):
    monkeypatch.setattr(png, "_lib", [])  # forget the loaded build
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    data = CORPUS[0][1]
    got, how = png.decode_region_explained(data, 1, 2, 8, 9)
    assert how == "ihdr" and np.array_equal(got, _full(data)[2:11, 1:9])
    assert "C unfilter is off" in png.status() and "no-such-cc" in png.status()


def test_the_portable_unfilter_equals_pillow(monkeypatch, tmp_path):
    """pngcrop.c without its SSE2 Paeth (what ARM and other non-x86 machines build), through the fast way."""
    try:
        compiler = find_c_compiler()
    except BuildError as e:
        pytest.skip(str(e))
    lib_path = tmp_path / "pngcrop-portable.so"
    proc = subprocess.run([*compiler, "-O2", "-shared", "-fPIC", "-U__SSE2__", "-o", str(lib_path),
                           str(png.SOURCE_PATH)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    monkeypatch.setattr(png, "_lib", [png.load_library(lib_path)])
    for label, data in CORPUS:
        if _bit_depth(data) < 8:
            continue
        full = _full(data)
        h, w = full.shape[:2]
        for left, top, bw, bh in _boxes(w, h, min(w, h, 16)):
            got = png.decode_region_fast(data, left, top, bw, bh)
            assert got is not None and np.array_equal(got, full[top : top + bh, left : left + bw]), (label, left, top)


def test_the_fast_way_refuses_what_it_cannot_prove():
    """A filter type past 4 above the crop, a stream that ends before the crop's bottom: no fast answer, and the
    IHDR way gives Pillow's outcome (an error, or black rows below the stream's end)."""
    rng = np.random.default_rng(8)
    w, h = 20, 30
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rng.integers(0, 256, (h, w * 3), dtype=np.uint8)], 1)
    bad = rows.copy()
    bad[12, 0] = 5
    bad_filter = png_from_rows(bad.tobytes(), w, h, 2, 8)
    assert png.decode_region_fast(bad_filter, 0, 15, 8, 8) is None
    with pytest.raises(OSError):
        _full(bad_filter)
    with pytest.raises(OSError):
        png.decode_region(bad_filter, 0, 15, 8, 8)
    above = png.decode_region_explained(bad_filter, 0, 0, 8, 10)  # rows above the bad one are still exact
    assert above[1] == "fast" and np.array_equal(above[0], rows[:10, 1:25].reshape(10, 8, 3))
    short = png_from_rows(rows[:10].tobytes(), w, h, 2, 8)  # 10 rows of 30 in a whole deflate stream
    assert png.decode_region_fast(short, 0, 5, 8, 8) is None
    got, how = png.decode_region_explained(short, 0, 5, 8, 8)
    assert how == "ihdr" and np.array_equal(got, _full(short)[5:13, 0:8]) and not got[5:].any()


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
