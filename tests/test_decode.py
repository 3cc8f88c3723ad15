"""load_prepared: the same arrays and the same ImageError messages as prepare(load_image(...)), every format."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from ferret_runtime.decode import decoders, load_prepared
from ferret_runtime.errors import ImageError
from ferret_runtime.preprocess import Preprocess, load_image, prepare


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _corpus() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(24)
    out = []
    for w, h in [(300, 257), (256, 256), (257, 300), (100, 300), (40, 30), (1, 1)]:
        y, x = np.mgrid[0:h, 0:w]
        arr = np.stack([x * 255 // w, y * 255 // h, (x ^ y) % 256], -1) + rng.integers(-30, 30, (h, w, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        out += [
            (f"{w}x{h}.jpg", _encode(img, "JPEG", quality=90)),
            (f"{w}x{h}-420.jpg", _encode(img, "JPEG", quality=75, subsampling=2)),
            (f"{w}x{h}-gray.jpg", _encode(img.convert("L"), "JPEG")),
            (f"{w}x{h}-cmyk.jpg", _encode(img.convert("CMYK"), "JPEG")),
            (f"{w}x{h}.png", _encode(img, "PNG")),
            (f"{w}x{h}-rgba.png", _encode(img.convert("RGBA"), "PNG")),
            (f"{w}x{h}-p.png", _encode(img.quantize(50), "PNG")),
            (f"{w}x{h}.webp", _encode(img, "WEBP", quality=80)),
            (f"{w}x{h}-lossless.webp", _encode(img.convert("RGBA"), "WEBP", lossless=True)),
            (f"{w}x{h}.bmp", _encode(img, "BMP")),
            (f"{w}x{h}.gif", _encode(img, "GIF")),
            (f"{w}x{h}.tif", _encode(img, "TIFF")),
            (f"{w}x{h}.mpo", _encode(img, "MPO", save_all=True, append_images=[img.transpose(0)])),
        ]
    return out


CORPUS = _corpus()
PRES = [Preprocess(), Preprocess(crop=224), Preprocess(crop=255), Preprocess(crop=1), Preprocess(crop=None)]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for name, data in CORPUS:
        (root / name).write_bytes(data)
    return root


def test_every_format_and_crop_equals_the_old_path(corpus_dir):
    for name, data in CORPUS:
        path = corpus_dir / name
        for pre in PRES:
            want = prepare(load_image(data), pre)
            for source in (data, path, str(path)):
                got = load_prepared(source, pre)
                assert got.dtype == want.dtype and got.shape == want.shape, (name, pre.crop)
                assert np.array_equal(got, want), (name, pre.crop, type(source))
                assert got.flags.c_contiguous and got.flags.writeable == want.flags.writeable
            assert np.array_equal(load_prepared(path, pre, region=False), want)


def test_the_crop_goes_to_the_region_decoders(monkeypatch):
    """PNG, WebP (and JPEG, where its decoder loads) reach their region decoder with center_crop's box, and
    its answer is what load_prepared returns; MPO goes to JPEG's."""
    import importlib

    calls, spied = [], set()
    for mod_name in ("png", "webp", "jpeg"):
        try:
            mod = importlib.import_module(f"ferret_runtime.decode.{mod_name}")
        except ImportError:
            continue
        real = mod.decode_region

        def spy(data, *box, _real=real, _name=mod_name):
            calls.append((_name, box))
            return _real(data, *box)

        monkeypatch.setattr(mod, "decode_region", spy)
        spied.add(mod_name)
    assert {"png", "webp"} <= spied
    pre = Preprocess()
    corpus = dict(CORPUS)
    for name, module in [("300x257.png", "png"), ("257x300.webp", "webp"), ("300x257.jpg", "jpeg"),
                         ("300x257.mpo", "jpeg")]:
        if module not in spied:
            continue
        calls.clear()
        got = load_prepared(corpus[name], pre)
        assert np.array_equal(got, prepare(load_image(corpus[name]), pre))
        w, h = Image.open(io.BytesIO(corpus[name])).size
        assert calls == [(module, (round((w - 256) / 2), round((h - 256) / 2), 256, 256))], (name, calls)
    calls.clear()
    load_prepared(corpus["300x257.png"], pre, region=False)
    load_prepared(corpus["100x300.png"], pre)  # smaller than the crop: padded by the full decode
    load_prepared(corpus["300x257.bmp"], pre)
    assert calls == []
    assert set(decoders()) == {"JPEG", "PNG", "WEBP"} and all(decoders().values())


def test_arrays_and_pil_images_take_the_old_path():
    arr = np.random.default_rng(0).integers(0, 256, (300, 280, 3), dtype=np.uint8)
    pre = Preprocess()
    assert np.array_equal(load_prepared(arr, pre), prepare(load_image(arr), pre))
    img = Image.fromarray(arr).convert("RGBA")
    assert np.array_equal(load_prepared(img, pre), prepare(load_image(img), pre))


def _outcome(fn) -> tuple[str, object]:
    try:
        return "array", fn()
    except ImageError as e:
        return "error", str(e)


def test_bad_inputs_give_the_same_errors(tmp_path):
    png = dict(CORPUS)["300x257.png"]
    jpg = dict(CORPUS)["300x257.jpg"]
    webp = dict(CORPUS)["300x257.webp"]
    (tmp_path / "trunc.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "trunc.jpg").write_bytes(jpg[: len(jpg) // 3])
    (tmp_path / "trunc.webp").write_bytes(webp[: len(webp) // 2])
    (tmp_path / "text.png").write_bytes(b"hello, not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "icon.ico").write_bytes(_encode(Image.new("RGB", (16, 16)), "ICO"))
    (tmp_path / "folder.png").mkdir()
    cases = [tmp_path / n for n in ("missing.png", "folder.png", "trunc.png", "trunc.jpg", "trunc.webp", "text.png",
                                    "empty.jpg", "icon.ico")]
    cases += [png[: len(png) // 2], b"not an image", b""]
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.png")
        cases.append(tmp_path / "pipe.png")
    pre = Preprocess()
    for source in cases:
        for name in (None, "named.png"):
            kind, old = _outcome(lambda: prepare(load_image(source, name), pre))  # noqa: B023
            assert kind == "error", source
            assert _outcome(lambda: load_prepared(source, pre, name)) == (kind, old), source  # noqa: B023
    # over max_pixels: refused from the header by both, whatever the format
    for name, data in CORPUS[:13]:
        old = _outcome(lambda: prepare(load_image(data, name, max_pixels=1000), pre))  # noqa: B023
        assert old[0] == "error" and "--max-pixels" in old[1]
        assert _outcome(lambda: load_prepared(data, pre, name, max_pixels=1000)) == old  # noqa: B023


def test_a_file_larger_than_its_pixels_is_not_read_whole(tmp_path, monkeypatch):
    """Region decoding reads the file into memory; one larger than 3 bytes per allowed pixel (a small image with a
    huge tail) takes the full decode, which reads only what it needs, and gives the same array."""
    import ferret_runtime.decode as decode

    png = dict(CORPUS)["300x257.png"]
    path = tmp_path / "tail.png"
    path.write_bytes(png + b"\0" * (3 * 300 * 257 + 1 - len(png)))  # one byte past 3 bytes per pixel of 300x257
    reads = []
    real_read = decode._read
    monkeypatch.setattr(decode, "_read", lambda *a: reads.append(real_read(*a)) or reads[-1])
    monkeypatch.setattr(decode, "_region", lambda *a: pytest.fail("the region decoder ran on an oversized file"))
    pre = Preprocess()
    got = load_prepared(path, pre, max_pixels=300 * 257)
    assert reads == [None] and np.array_equal(got, prepare(load_image(path, max_pixels=300 * 257), pre))
    path.write_bytes(png)  # the same image without the tail is read and region-decoded
    monkeypatch.undo()
    assert np.array_equal(load_prepared(path, pre, max_pixels=300 * 257), got)
