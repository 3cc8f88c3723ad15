"""decode/jpeg: the region decoder equals Pillow's full decode followed by the crop, bit for bit.

Every expected value here is Pillow's own full decode (``Image.open(...).convert("RGB")``) sliced, or
``preprocess.center_crop`` of it; the corpus is encoded by Pillow in the test from deterministic seeds.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from ferret_runtime.decode import jpeg
from ferret_runtime.decode.cbuild import BuildError, find_c_compiler
from ferret_runtime.preprocess import center_crop


def _compiler_here() -> bool:
    try:
        find_c_compiler()
        return True
    except BuildError:
        return False


ACTIVE_EXPECTED = sys.platform.startswith("linux") and _compiler_here()
needs_region = pytest.mark.skipif(not ACTIVE_EXPECTED, reason="the region path needs Linux and a C compiler")


def natural(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth gradients, a few sharp-edged shapes, texture and noise: detail at every frequency."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        fx, fy = rng.uniform(0.002, 0.03, 2)
        img[..., c] = 128 + 70 * np.sin(fx * x + c) * np.cos(fy * y + 2 * c) + 40 * (x / w - y / h)
    for _ in range(6):  # sharp edges
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(3, w // 3 + 4)), y0 + int(rng.integers(3, h // 3 + 4))
        img[y0:y1, x0:x1] += rng.uniform(-90, 90, 3)
    img += 25 * np.sin(0.9 * x[..., None] + 0.7 * y[..., None]) * rng.uniform(0.2, 1, 3)  # texture
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, mode: str = "RGB", **kw) -> bytes:
    bio = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(bio, "JPEG", **kw)
    return bio.getvalue()


def pillow_full(data: bytes) -> np.ndarray:
    """Today's decode: Pillow, every pixel, converted to RGB (no EXIF rotation)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, offset of the marker, offset after its segment) up to the first SOS; independent of jpegcrop.c."""
    out, i = [], 2
    while True:
        assert data[i] == 0xFF
        m = data[i + 1]
        end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        out.append((m, i, end))
        if m == 0xDA:
            return out
        i = end


def as_440(data: bytes) -> bytes:
    """A 4:2:2 JPEG of W x H (W % 16 == 0, H % 8 == 0) relabelled as 4:4:0 of W/2 x 2H: the same number of
    MCUs of the same four blocks, so the entropy data stays valid (Pillow cannot write 4:4:0 itself)."""
    b = bytearray(data)
    (_, i, _), = [s for s in segments(data) if s[0] == 0xC0]
    h, w = int.from_bytes(b[i + 5:i + 7], "big"), int.from_bytes(b[i + 7:i + 9], "big")
    assert w % 16 == 0 and h % 8 == 0 and b[i + 11] == 0x21
    b[i + 5:i + 7], b[i + 7:i + 9] = (2 * h).to_bytes(2, "big"), (w // 2).to_bytes(2, "big")
    b[i + 11] = 0x12
    return bytes(b)


def with_segment(data: bytes, marker: int, payload: bytes) -> bytes:
    """``data`` with an extra segment right after SOI."""
    return data[:2] + bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan's entropy-coded data in the first image; independent of jpegcrop.c."""
    out, i = [], 2
    while True:
        assert data[i] == 0xFF
        m = data[i + 1]
        if m == 0xD9:
            return out
        end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if m != 0xDA:
            i = end
            continue
        j = end
        while True:  # the scan ends at the first marker other than a stuffed 0xFF00 or RSTn
            j = data.index(b"\xff", j)
            while data[j + 1] == 0xFF:
                j += 1
            if data[j + 1] == 0 or 0xD0 <= data[j + 1] <= 0xD7:
                j += 2
                continue
            break
        out.append((end, j))
        i = j


def multiscan_sequential(arr: np.ndarray, subsample: bool, **kw) -> bytes:
    """A sequential (SOF0) JPEG with one scan per component, which Pillow cannot write: its Y, Cb and Cr
    planes are each encoded by Pillow as a grayscale JPEG (chroma at half size when ``subsample``, the luma
    then 2x2), and their tables (renumbered 0, 1, 2) and entropy data joined under one SOF0. A one-component
    scan stores ceil(w/8) x ceil(h/8) blocks in raster order, exactly what each grayscale file holds."""
    h, w = arr.shape[:2]
    planes = list(Image.fromarray(arr).convert("YCbCr").split())
    if subsample:
        planes[1:] = [p.resize(((w + 1) // 2, (h + 1) // 2), Image.BOX) for p in planes[1:]]
    head, tail = bytearray(), bytearray()
    for k, plane in enumerate(planes):
        bio = io.BytesIO()
        plane.save(bio, "JPEG", **kw)
        g = bio.getvalue()
        for m, i, end in segments(g):
            seg = bytearray(g[i:end])
            if m == 0xE0 and k == 0:
                head[:0] = seg
            elif m == 0xDB:
                assert len(seg) == 4 + 65
                seg[4] = k  # 8-bit table k
                head += seg
            elif m == 0xC4:
                j = 4
                while j < len(seg):
                    seg[j] = (seg[j] & 0xF0) | k
                    j += 17 + sum(seg[j + 1:j + 17])
                head += seg
            elif m == 0xDD:
                tail += seg
            elif m == 0xDA:
                seg[5], seg[6] = k + 1, (k << 4) | k
                (start, stop), = scans(g)
                tail += seg + g[start:stop]
    y = 0x22 if subsample else 0x11
    sof = bytes([0xFF, 0xC0, 0, 17, 8]) + h.to_bytes(2, "big") + w.to_bytes(2, "big") + bytes(
        [3, 1, y, 0, 2, 0x11, 1, 3, 0x11, 2])
    return b"\xff\xd8" + bytes(head) + sof + bytes(tail) + b"\xff\xd9"


def first_scans(data: bytes, n: int) -> bytes:
    """A progressive JPEG cut after its n-th scan, with EOI: a valid image whose AC coefficients are not all
    sent, so libjpeg smooths its blocks from their neighbours' coefficients (the margin below must cover it)."""
    return data[:scans(data)[n - 1][1]] + b"\xff\xd9"


def regions(w: int, h: int, seed: int) -> list[tuple[int, int, int, int]]:
    """(left, top, width, height): full image, edges, corners, 1-pixel rows/columns, MCU-aligned and not."""
    c = min(37, w, h)
    out = [(0, 0, w, h), (0, 0, c, c), (w - c, 0, c, c), (0, h - c, c, c), (w - c, h - c, c, c),
           (0, 0, w, min(9, h)), (0, h - min(9, h), w, min(9, h)), (0, 0, 1, h), (w - 1, 0, 1, h),
           (w // 2, h // 2, 1, 1), (w - 1, h - 1, 1, 1), (0, h // 2, w, 1), (w // 3, 0, 1, h)]
    if w >= 64 and h >= 64:
        out += [(16, 16, 32, 32), (17, 15, 33, 31), (7, 9, 40, 50), (32, 48, w - 64, h - 96)]
    rng = np.random.default_rng(seed)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        out.append((x0, y0, int(rng.integers(1, w - x0 + 1)), int(rng.integers(1, h - y0 + 1))))
    return out


def _corpus() -> dict[str, bytes]:
    big, mid, odd, wide = natural(777, 1001, 1), natural(263, 257, 2), natural(256, 300, 3), natural(240, 320, 4)
    files = {
        "baseline-420-1001x777": encode(big, quality=90),
        "baseline-444-257x263": encode(mid, quality=95, subsampling=0),
        "baseline-422-300x256": encode(odd, quality=80, subsampling=1),
        "baseline-420-q50-optimize": encode(wide, quality=50, optimize=True),
        "progressive-420-1001x777": encode(big, quality=85, progressive=True),
        "progressive-444-257x263": encode(mid, quality=90, progressive=True, subsampling=0),
        "progressive-422-300x256": encode(odd, quality=75, progressive=True, subsampling=1),
        "gray-baseline-257x263": encode(mid, "L", quality=90),
        "gray-progressive-300x256": encode(odd, "L", quality=90, progressive=True),
        "restart-blocks-420": encode(big[:300, :500], quality=90, restart_marker_blocks=7),
        "restart-rows-422-progressive": encode(odd, quality=90, subsampling=1, progressive=True,
                                               restart_marker_rows=1),
        "progressive-420-optimize-q92-333x517": encode(big[:517, :333], quality=92, progressive=True,
                                                       optimize=True),
        "progressive-444-optimize-1001x777": encode(big, quality=80, progressive=True, optimize=True,
                                                    subsampling=0),
        "progressive-422-odd-301x203": encode(big[:203, :301], quality=85, progressive=True, subsampling=1),
        "gray-progressive-optimize-997x389": encode(big[:389, :997], "L", quality=85, progressive=True,
                                                   optimize=True),
        "progressive-420-restart-blocks-500x300": encode(big[:300, :500], quality=90, progressive=True,
                                                         restart_marker_blocks=5),
        "progressive-first-scans-only-1001x777": first_scans(encode(big, quality=90, progressive=True), 4),
        "multiscan-sequential-444-500x300": multiscan_sequential(big[:300, :500], False, quality=90),
        "multiscan-sequential-420-odd-501x399": multiscan_sequential(big[:399, :501], True, quality=88,
                                                                     optimize=True, restart_marker_blocks=9),
        "tiny-5x3": encode(natural(3, 5, 5), quality=90),
        "one-pixel": encode(natural(1, 1, 6), quality=90),
        "440-relabelled-320x320": as_440(encode(natural(160, 640, 7), quality=90, subsampling=1)),
        "comment-exif-app3-thumbnail": with_segment(
            encode(wide, quality=88, comment=b"ferret \xff\xd9 test", exif=_exif_rotated()),
            0xE3, b"THUMB" + encode(natural(16, 16, 8), quality=70)),  # a whole JPEG (with its EOI) inside APP3
    }
    return files


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90; neither Pillow's plain decode nor ours applies it
    return exif.tobytes()


CORPUS = _corpus()


@needs_region
def test_region_path_is_active_here():
    line = jpeg.status()
    assert line.startswith("JPEG region decoding on: libjpeg-turbo"), line
    assert "ABI 62" in line and "libjpeg" in line
    assert jpeg.available()


@needs_region
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_regions_equal_pillow_full_decode(name: str):
    data = CORPUS[name]
    full = pillow_full(data)
    h, w = full.shape[:2]
    for left, top, rw, rh in regions(w, h, seed=len(data)):
        got, why = jpeg.decode_region_explained(data, left, top, rw, rh)
        assert got is not None, f"{name} {(left, top, rw, rh)}: {why}"
        assert got.shape == (rh, rw, 3) and got.dtype == np.uint8 and got.flags.c_contiguous
        want = full[top:top + rh, left:left + rw]
        assert np.array_equal(got, want), (f"{name} {(left, top, rw, rh)}: {int((got != want).sum())} values differ, "
                                           f"max {int(np.abs(got.astype(int) - want).max())}")


@needs_region
@pytest.mark.parametrize("name", ["baseline-420-1001x777", "progressive-420-1001x777", "progressive-444-257x263",
                                  "baseline-422-300x256", "gray-baseline-257x263", "440-relabelled-320x320",
                                  "progressive-444-optimize-1001x777", "gray-progressive-optimize-997x389",
                                  "progressive-420-restart-blocks-500x300", "multiscan-sequential-420-odd-501x399"])
def test_centre_crop_256_equals_preprocess_center_crop(name: str):
    data = CORPUS[name]
    full = pillow_full(data)
    h, w = full.shape[:2]
    if h < 256 or w < 256:
        pytest.skip("smaller than the crop: preprocess pads, the caller decodes in full")
    left, top = int(round((w - 256) / 2.0)), int(round((h - 256) / 2.0))
    got, why = jpeg.decode_region_explained(data, left, top, 256, 256)
    assert got is not None, why
    assert np.array_equal(got, center_crop(full, 256))
    if w >= 512:  # a real crop happened: libjpeg decoded fewer columns than the image has
        cols = why.split("columns ")[1].split(" of ")[0]
        x0, x1 = map(int, cols.split(".."))
        assert x0 > 0 and x1 < w and x1 - x0 < 256 + 2 * 2 * 16 + 32, why


@needs_region
def test_twelve_megapixel_centre_crop():
    tile = natural(750, 1000, 9)
    data = encode(np.tile(tile, (4, 4, 1)), quality=92)  # 4000 x 3000, 4:2:0
    got = jpeg.decode_region(data, 1872, 1372, 256, 256)
    assert got is not None, jpeg.status()
    assert np.array_equal(got, center_crop(pillow_full(data), 256))


@needs_region
def test_mpo_first_image():
    a, b = Image.fromarray(natural(240, 320, 10)), Image.fromarray(natural(240, 320, 11))
    bio = io.BytesIO()
    a.save(bio, "MPO", save_all=True, append_images=[b], quality=90)
    data = bio.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "MPO" and getattr(im, "n_frames", 1) == 2
        full = np.asarray(im.convert("RGB"))
    for left, top, rw, rh in regions(320, 240, seed=3):
        got = jpeg.decode_region(data, left, top, rw, rh)
        assert got is not None and np.array_equal(got, full[top:top + rh, left:left + rw])


@needs_region
def test_input_types_and_threads():
    data = CORPUS["baseline-420-1001x777"]
    want = pillow_full(data)[300:556, 100:356]
    assert np.array_equal(jpeg.decode_region(bytearray(data), 100, 300, 256, 256), want)
    assert np.array_equal(jpeg.decode_region(memoryview(data), 100, 300, 256, 256), want)
    assert np.array_equal(jpeg.decode_region(memoryview(data)[::1], 100, 300, 256, 256), want)
    assert np.array_equal(jpeg.decode_region(data, np.int64(100), np.int32(300), 256, 256), want)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: jpeg.decode_region(data, 100, 300, 256, 256), range(8)))
    assert all(o is not None and np.array_equal(o, want) for o in outs)


@needs_region
def test_refusals_return_none():
    cmyk = io.BytesIO()
    Image.fromarray(natural(64, 64, 12)).convert("CMYK").save(cmyk, "JPEG", quality=90)
    assert pillow_full(cmyk.getvalue()).shape == (64, 64, 3)  # Pillow decodes it; we refuse
    got, why = jpeg.decode_region_explained(cmyk.getvalue(), 0, 0, 8, 8)
    assert got is None and why == jpeg.REASONS[3]

    data = CORPUS["baseline-420-1001x777"]
    (_, sof, _), = [s for s in segments(data) if s[0] == 0xC0]
    for offset, value, why in ((1, 0xC3, 3), (1, 0xC9, 3), (4, 12, 3)):  # lossless, arithmetic, 12-bit
        patched = data[:sof + offset] + bytes([value]) + data[sof + offset + 1:]
        got, reason = jpeg.decode_region_explained(patched, 0, 0, 8, 8)
        assert got is None and reason in (jpeg.REASONS[why], jpeg.REASONS[4]), reason
    assert jpeg.decode_region(data, 65000, 0, 600, 1) is None
    with pytest.raises(OSError):  # today's behaviour for a truncated file, which must not change
        pillow_full(data[: len(data) // 2])
    for cut in (data[: len(data) // 2], data[:-2], data[:100], data[:2], b""):
        assert jpeg.decode_region(cut, 0, 0, 16, 16) is None
    png = io.BytesIO()
    Image.fromarray(natural(16, 16, 13)).save(png, "PNG")
    assert jpeg.decode_region(png.getvalue(), 0, 0, 8, 8) is None
    assert jpeg.decode_region(data, 1000, 0, 2, 1) is None  # past the right edge
    assert jpeg.decode_region(data, 0, 700, 1, 78) is None  # past the bottom
    with pytest.raises(ValueError):
        jpeg.decode_region(data, -1, 0, 4, 4)
    with pytest.raises(ValueError):
        jpeg.decode_region(data, 0, 0, 0, 4)


@needs_region
def test_garbage_after_eoi_still_identical():
    for name in ("baseline-420-1001x777", "progressive-444-257x263"):
        data = CORPUS[name] + b"\x00garbage\xff\xd8\xff\xc0 not an image" * 10
        full = pillow_full(data)
        got = jpeg.decode_region(data, 50, 60, 200, 190)
        assert got is not None and np.array_equal(got, full[60:250, 50:250])


@needs_region
@pytest.mark.parametrize("name", ["baseline-420-1001x777", "progressive-420-1001x777", "restart-blocks-420"])
def test_byte_flips_are_refused_or_identical(name: str):
    """A damaged byte: when Pillow fails we must refuse; when it decodes, we refuse or give its pixels."""
    data = CORPUS[name]
    start = segments(data)[-1][2]
    end = data.rindex(b"\xff\xd9")
    full_h, full_w = pillow_full(data).shape[:2]
    boxes = [(0, 0, full_w, 24), (full_w // 2 - 64, full_h // 2 - 64, 128, 128), (0, full_h - 16, 64, 16)]
    answered = 0
    for k, (frac, xor) in enumerate([(0.02, 0x01), (0.2, 0x80), (0.45, 0x10), (0.5, 0xFF), (0.7, 0x04),
                                     (0.93, 0x40), (0.97, 0x08), (0.99, 0x22)]):
        bad = bytearray(data)
        pos = start + int(frac * (end - start))
        bad[pos] ^= xor
        try:
            ref = pillow_full(bytes(bad))
        except (OSError, SyntaxError, ValueError):
            ref = None
        for left, top, w, h in boxes:
            got = jpeg.decode_region(bytes(bad), left, top, w, h)
            if ref is None:
                assert got is None, f"{name}: flip {k} breaks Pillow's decode, the region decoder answered"
            elif got is not None:
                assert np.array_equal(got, ref[top:top + h, left:left + w]), f"{name}: flip {k} box {(left, top)}"
                answered += 1
    if not name.startswith("progressive"):  # damage below a sequential file's region is never read
        assert answered > 0


@needs_region
@pytest.mark.parametrize("name", ["baseline-420-1001x777", "progressive-420-1001x777"])
def test_markers_written_into_entropy_data(name: str):
    """A marker where data should be, below the region: libjpeg only meets it in Pillow's full decode (after
    our last row) for a baseline file; where Pillow then fails we must refuse, never answer."""
    data = CORPUS[name]
    start, end = segments(data)[-1][2], data.rindex(b"\xff\xd9")
    pos = start + int(0.9 * (end - start))
    pillow_failed = 0
    for marker in (0xC0, 0xC4, 0xC8, 0xD8, 0xDA, 0xE1, 0x01, 0xD3, 0xD9):
        bad = data[:pos] + bytes([0xFF, marker]) + data[pos + 2:]
        try:
            ref = pillow_full(bad)
        except OSError:
            ref = None
            pillow_failed += 1
        got = jpeg.decode_region(bad, 0, 0, 64, 16)
        if ref is None:
            assert got is None, f"{name}: marker {marker:#x} breaks Pillow's decode, the region decoder answered"
        elif got is not None:
            assert np.array_equal(got, ref[:16, :64]), f"{name}: marker {marker:#x}"
    assert pillow_failed >= 3  # the case this test is about did happen


@needs_region
def test_concurrent_builds_share_one_cached_library(tmp_path, monkeypatch):
    """Several builders at once into an empty cache: one whole library, the same path, no temporary left."""
    from ferret_runtime.decode.cbuild import build_shared

    monkeypatch.setenv("FERRET_CACHE", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the other cache folders: empty too
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: build_shared(jpeg.SOURCE_PATH, jpeg.INCLUDE_DIR, ("-ldl",)), range(3)))
    assert len(set(paths)) == 1 and paths[0].parent == tmp_path / "decode"
    assert sorted(p.name for p in (tmp_path / "decode").iterdir()) == [paths[0].name]
    assert build_shared(jpeg.SOURCE_PATH, jpeg.INCLUDE_DIR, ("-ldl",)) == paths[0]  # cached: no rebuild
    assert paths[0].stat().st_size > 0


def test_off_without_a_compiler(tmp_path):
    """No compiler (or one that fails): every call is None and status() says why, in a fresh process."""
    code = textwrap.dedent("""
        import io, numpy as np
        from PIL import Image
        from ferret_runtime.decode import jpeg
        bio = io.BytesIO(); Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(bio, "JPEG")
        print(jpeg.decode_region(bio.getvalue(), 0, 0, 8, 8) is None, jpeg.available())
        print(jpeg.status())
    """)
    for cc, expect in (("/nonexistent/cc", "no C compiler"), ("false", "exited with status")):
        env = {**os.environ, "CC": cc, "FERRET_CACHE": str(tmp_path / cc.strip("/").replace("/", "_"))}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        first, line = proc.stdout.splitlines()[:2]
        assert first == "True False", proc.stdout
        assert line.startswith("JPEG region decoding off: ") and (expect in line or "not Linux" in line), line


MULTISCAN = sorted(n for n in CORPUS if "progressive" in n or "multiscan" in n)


def _sof_height(why: str) -> int | None:
    return int(why.split("SOF height ")[1].split()[0]) if "SOF height" in why else None


@needs_region
@pytest.mark.parametrize("name", MULTISCAN)
def test_multiscan_files_decode_from_a_shortened_copy(name: str):
    """The shortened copy is what answers for a multi-scan file (not silently the whole-height path): libjpeg
    was given a smaller SOF height and skipped the tail of every scan; the whole-height path agrees."""
    data = CORPUS[name]
    full = pillow_full(data)
    h, w = full.shape[:2]
    n_scans = len(scans(data))
    assert n_scans > 1
    for left, top, rw, rh in [(0, 0, w, 9), (w // 3, h // 4, max(1, w // 3), max(1, h // 4)), (w - 5, 0, 5, 40)]:
        got, why = jpeg.decode_region_explained(data, left, top, rw, rh)
        assert got is not None and np.array_equal(got, full[top:top + rh, left:left + rw]), why
        short = _sof_height(why)
        assert short is not None and top + rh < short < h, why
        assert int(why.split("(")[-1].split()[0]) >= n_scans, why  # every scan had a tail to skip
        old, old_why = jpeg.decode_region_explained(data, left, top, rw, rh, shorten=False)
        assert _sof_height(old_why) is None and np.array_equal(old, got), old_why
    # a region within three iMCU rows of the bottom: the whole height, nothing to skip
    got, why = jpeg.decode_region_explained(data, 0, h - 2, w, 2)
    assert got is not None and _sof_height(why) is None and np.array_equal(got, full[h - 2:]), why


@needs_region
def test_single_scan_files_keep_the_whole_height_path():
    for name in ("baseline-420-1001x777", "gray-baseline-257x263", "restart-blocks-420"):
        got, why = jpeg.decode_region_explained(CORPUS[name], 0, 0, 16, 16)
        assert got is not None and _sof_height(why) is None, why


@needs_region
@pytest.mark.parametrize("name", ["progressive-420-1001x777", "progressive-420-optimize-q92-333x517",
                                  "gray-progressive-optimize-997x389", "multiscan-sequential-420-odd-501x399",
                                  "progressive-420-restart-blocks-500x300"])
def test_byte_flips_in_skipped_and_kept_entropy_data(name: str):
    """A region at the top (the copy keeps a few iMCU rows): a byte flipped late in a scan is in the part
    libjpeg skips, one early in a scan is in the part it decodes. Where Pillow's full decode fails we must
    refuse; where it decodes, we refuse or give its pixels (also where the damage changed them), and damage below
    the region is answered."""
    data = CORPUS[name]
    full = pillow_full(data)
    h, w = full.shape[:2]
    box = (w // 4, 0, w // 2, 20)
    assert _sof_height(jpeg.decode_region_explained(data, *box)[1]) <= 64
    answered_below = answered_changed = 0
    left, top, rw, rh = box
    rng = np.random.default_rng(len(data))
    for k, (start, stop) in enumerate(scans(data)):
        if stop - start < 64:
            continue
        for frac, below in ((0.005, False), (0.02, False), (0.5, True), (0.8, True), (0.97, True)):
            bad = bytearray(data)
            bad[start + int(frac * (stop - start))] ^= int(rng.integers(1, 256))
            try:
                ref = pillow_full(bytes(bad))
            except (OSError, SyntaxError, ValueError):
                ref = None
            got = jpeg.decode_region(bytes(bad), *box)
            where = f"{name}: scan {k} at {frac}"
            if ref is None:
                assert got is None, f"{where}: Pillow fails, the region decoder answered"
            elif got is not None:
                assert np.array_equal(got, ref[top:top + rh, left:left + rw]), where
                answered_below += below
                answered_changed += not np.array_equal(got, full[top:top + rh, left:left + rw])
    assert answered_below > 0 and answered_changed > 0
