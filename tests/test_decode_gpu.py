"""ferret_runtime/decode/gpu.py and gpu_check's decode section.

On the CPU: the crop window against ``center_crop``, the decision parity on hand-derived numbers, option
validation, the missing-package line, and (where nvImageCodec is installed) the whole decode path through
nvImageCodec's own CPU decoder (libjpeg-turbo, as Pillow: equal pixels), errors per image, and the
gpu_check section on that decoder with the device calls stood in. The ``gpu`` tests decode on the GPU.
"""

from __future__ import annotations

import importlib.util
import io
import math
import sys

import numpy as np
import pytest
from PIL import Image

from benchmarks import gpu_check
from ferret_runtime.decode import gpu
from ferret_runtime.errors import ConfigError, ImageError
from ferret_runtime.preprocess import Preprocess, center_crop, load_image, prepare


def _have_nvimgcodec() -> bool:
    try:
        return importlib.util.find_spec("nvidia.nvimgcodec") is not None
    except (ImportError, ValueError):
        return False


needs_nvimgcodec = pytest.mark.skipif(not _have_nvimgcodec(), reason=gpu.MISSING)


def _jpeg(h: int, w: int, seed: int = 0, quality: int = 90, subsampling: int = 2, mode: str = "RGB",
          progressive: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    base = np.asarray(Image.fromarray(rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8))
                      .resize((w, h), Image.BICUBIC))
    img = Image.fromarray(np.clip(base + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, subsampling=subsampling, progressive=progressive)
    return buf.getvalue()


def _png(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------- the crop window
def test_crop_window_by_hand():
    # 5 rows into 4: round(0.5) = 0 (half to even); 8 columns: round(2.0) = 2
    assert gpu.crop_window(5, 8, 4) == gpu.Window(0, 2, 4, 4, 0, 0, 4)
    # 7 -> 4: round(1.5) = 2; 9 -> 4: round(2.5) = 2 (both half to even)
    assert gpu.crop_window(7, 9, 4) == gpu.Window(2, 2, 4, 4, 0, 0, 4)
    # 3 rows into 6: padded 1 above, 2 below, so rows 0..2 land at 1..3; 10 columns: from 2
    assert gpu.crop_window(3, 10, 6) == gpu.Window(0, 2, 3, 6, 1, 0, 6)
    assert gpu.crop_window(1, 1, 3) == gpu.Window(0, 0, 1, 1, 1, 1, 3)
    with pytest.raises(ConfigError, match="expected positive sizes"):
        gpu.crop_window(0, 5, 4)


@pytest.mark.parametrize("size", [1, 4, 7, 256])
def test_crop_window_places_what_center_crop_gives(size):
    rng = np.random.default_rng(size)
    for h, w in [(1, 1), (3, 10), (size, size), (size + 1, size + 2), (size - 1 or 1, 3 * size + 1), (300, 257),
                 (2, 700), (513, 255)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        win = gpu.crop_window(h, w, size)
        got = gpu.place(win, img[win.top:win.top + win.height, win.left:win.left + win.width])
        assert np.array_equal(got, center_crop(img, size)), (h, w, size, win)


# ------------------------------------------------------------------------------------------- parity
def test_parity_by_hand():
    # verdict 'fake' when logit > 0 at threshold 0.5: index 2 goes from fake (0.25) to real (-0.125)
    p = gpu.decision_parity([2.0, -1.0, 0.25, -0.25], [2.0625, -1.0, -0.125, -0.5])
    assert p.flips == (2,) and p.n == 4
    assert p.max_logit == 0.375 and p.p99_logit == 0.375  # ceil(0.99 * 4) = 4th smallest of .0625, 0, .375, .25
    assert p.max_pixel is None and not p.ok and "1 flips of 4" in p.summary()
    assert gpu.default_decode(p) == "cpu"


def test_parity_p99_is_the_nearest_rank():
    d = np.arange(200) / 256  # exact in binary
    p = gpu.decision_parity(np.full(200, 3.0), 3.0 + d, bound=1.0)
    assert p.p99_logit == 197 / 256 and p.max_logit == 199 / 256  # the 198th smallest of 200; the largest
    assert p.flips == () and p.ok and gpu.default_decode(p) == "gpu"


def test_parity_threshold_moves_the_verdicts():
    # threshold 0.8 is logit ln 4 = 1.386...: 1.5 is fake, 1.25 real; at 0.5 both are fake
    assert gpu.decision_parity([1.5], [1.25], threshold=0.8).flips == (0,)
    assert gpu.decision_parity([1.5], [1.25], threshold=0.5).flips == ()
    assert gpu.logit_threshold(0.8) == pytest.approx(math.log(4))
    # p > 0 is always true, p > 1 never: no verdict can flip
    assert gpu.decision_parity([5.0, -5.0], [-5.0, 5.0], threshold=0.0).flips == ()
    assert gpu.decision_parity([5.0, -5.0], [-5.0, 5.0], threshold=1.0).flips == ()
    with pytest.raises(ConfigError, match="expected a probability in"):
        gpu.decision_parity([1.0], [1.0], threshold=1.5)


def test_parity_bound_is_inclusive_and_non_finite_logits_flip():
    assert gpu.decision_parity([1.0], [1.0625], bound=0.0625).ok  # max |delta| == bound: holds
    assert not gpu.decision_parity([1.0], [1.125], bound=0.0625).ok  # no flip, but over the bound
    p = gpu.decision_parity([1.0, 2.0], [float("nan"), 2.0])
    assert p.flips == (0,) and p.max_logit == math.inf and not p.ok
    assert gpu.decision_parity([-math.inf], [-math.inf]).flips == (0,)


def test_parity_pixels_without_uint8_wrap():
    a = np.array([[0, 255, 10]], np.uint8)
    b = np.array([[3, 250, 10]], np.uint8)  # 250 - 255 would wrap to 251 in uint8
    assert gpu.decision_parity([0.5], [0.5], cpu_pixels=a, gpu_pixels=b).max_pixel == 5
    with pytest.raises(ConfigError, match="expected uint8 crops of one shape"):
        gpu.decision_parity([0.5], [0.5], cpu_pixels=a, gpu_pixels=b.astype(np.int16))


def test_parity_refuses_mismatched_inputs():
    with pytest.raises(ConfigError, match="Received 2 CPU and 1 GPU logits"):
        gpu.decision_parity([1.0, 2.0], [1.0])
    with pytest.raises(ConfigError, match="at least one"):
        gpu.decision_parity([], [])
    with pytest.raises(ConfigError, match="Received bound -1"):
        gpu.decision_parity([1.0], [1.0], bound=-1)
    assert gpu.default_decode(None) == "cpu"  # never measured: the CPU stays the default


def test_help_says_what_the_gpu_decode_costs():
    help_ = gpu.DECODE_HELP
    assert "changes pixels" in help_ and "flips" in help_ and f"<= {gpu.LOGIT_BOUND}" in help_


# ------------------------------------------------------------------------- options, missing package
@pytest.mark.parametrize("kwargs, message", [
    ({"crop": 0}, "Received crop 0; expected a positive integer or None"),
    ({"crop": True}, "Received crop True"),
    ({"backend": "nvdec"}, "Received decode backend 'nvdec'; expected one of auto, hw, cuda, cpu"),
    ({"device": -1}, "Received device -1; expected an integer >= 0"),
    ({"threads": 1.5}, "Received threads 1.5; expected an integer >= 0"),
])
def test_options_are_checked_before_anything_loads(monkeypatch, kwargs, message):
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # would fail later, were it reached
    with pytest.raises(ConfigError) as e:
        gpu.GpuDecoder(**kwargs)
    assert str(e.value).startswith(message)


def test_missing_package_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # import raises ImportError
    with pytest.raises(ConfigError) as e:
        gpu.GpuDecoder(256)
    assert str(e.value) == gpu.MISSING and "\n" not in str(e.value)
    assert "pip install 'ferretnet-deploy[gpu-decode]'" in str(e.value)
    assert gpu.PIN.startswith("nvidia-nvimgcodec-cu13[nvjpeg]")


# ------------------------------------------------------------- the path, on nvImageCodec's CPU decoder
@needs_nvimgcodec
@pytest.mark.parametrize("region", [True, False])
def test_batch_equals_pillow_and_bad_images_fail_alone(tmp_path, region):
    path = tmp_path / "a.jpg"
    path.write_bytes(_jpeg(300, 410, seed=3, subsampling=0))
    good = _jpeg(500, 333, seed=1)
    sources = [good, _jpeg(40, 700, seed=2), path, _jpeg(64, 64, mode="L"), _png(50, 300), good[:len(good) // 2],
               b"garbage", tmp_path / "missing.jpg", _jpeg(200, 300, seed=4, progressive=True)]
    dec = gpu.GpuDecoder(64, backend="cpu", region=region)
    out = dec.decode(sources)
    bad = {5, 6, 7}
    assert [isinstance(o, ImageError) for o in out] == [i in bad for i in range(len(sources))]
    assert "missing.jpg: cannot read file" in str(out[7]) and str(out[6]).startswith("bytes #6: ")
    assert [o.host is not None for o in out if not isinstance(o, ImageError)] == [False, False, False, True, True,
                                                                                   False]  # gray, PNG: Pillow
    batch = gpu.assemble_host(out, 64)
    for i, s in enumerate(sources):
        want = np.zeros((64, 64, 3), np.uint8) if i in bad else prepare(load_image(s), Preprocess(crop=64))
        assert np.array_equal(batch[i], want), i


@needs_nvimgcodec
def test_max_pixels_and_names(tmp_path):
    dec = gpu.GpuDecoder(32, backend="cpu", max_pixels=100 * 100)
    out = dec.decode([_jpeg(100, 101), _jpeg(100, 100)], names=["big.jpg", "ok.jpg"])
    assert str(out[0]) == "big.jpg: received an image of 101x100 = 0.0 Mpx; expected at most 0.0 Mpx (--max-pixels)"
    assert out[1].name == "ok.jpg" and out[1].window == gpu.crop_window(100, 100, 32)
    with pytest.raises(ConfigError, match="Received 1 names for 2 sources"):
        dec.decode([b"", b""], names=["one"])


@needs_nvimgcodec
def test_an_unexpected_exception_fails_only_its_image(monkeypatch):
    def boom(source, pre, name=None, **kw):
        raise MemoryError("no room")

    monkeypatch.setattr(gpu, "load_prepared", boom)  # the CPU path a PNG takes
    out = gpu.GpuDecoder(32, backend="cpu").decode([_png(40, 40), _jpeg(64, 64)], names=["a.png", "b.jpg"])
    assert str(out[0]) == "a.png: cannot decode image (MemoryError: no room)"
    assert isinstance(out[1], gpu.Decoded) and out[1].window == gpu.crop_window(64, 64, 32)


# -------------------------------------------------------------------------------- gpu_check's section
def test_section_skips_with_the_install_line_without_nvimgcodec(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "nvidia.nvimgcodec" else real(name, *a))
    why = gpu_check.nvimgcodec_missing()
    assert why == f"nvImageCodec is not installed: pip install 'ferretnet-deploy[gpu-decode]' ({gpu.PIN})"
    assert gpu_check.will_run("decode") is False
    result = gpu_check.Result()
    gpu_check.check_decode(result)
    assert [(r.section, r.name, r.ok, r.value, r.detail) for r in result.rows] == [
        ("decode", "gpu decode", None, "skipped", why)]


def test_section_skip_reason_on_this_machine():
    assert gpu_check.nvimgcodec_missing() == (None if _have_nvimgcodec() else
                                              "nvImageCodec is not installed: pip install "
                                              f"'ferretnet-deploy[gpu-decode]' ({gpu.PIN})")


def test_section_order_and_budget():
    names = list(gpu_check.SECTIONS)
    assert names.index("speed") < names.index("decode") < names.index("backends")
    assert gpu_check.SECTION_BUDGET_S["decode"] <= 60 and "decode" in gpu_check.RESERVE_S
    assert sum(gpu_check.RESERVE_S.values()) + 120 <= gpu_check.RUN_BUDGET_S


class _Ctx:
    def __init__(self, *a):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class _Stream(_Ctx):
    handle = 0

    def synchronize(self):
        pass


class _Buffer(_Ctx):
    ptr = 0x1000


@needs_nvimgcodec
def test_section_on_the_cpu_decoder(monkeypatch):
    """The section's rows with nvImageCodec's CPU decoder in the GPU's place and the device calls stood in:
    libjpeg-turbo both sides, so the pixels agree exactly, and the bad JPEGs fail alone."""
    from ferret_runtime import cuda

    real = gpu.GpuDecoder

    def decoder(crop, *, backend="auto", region=True):
        if backend == "cuda":
            raise ConfigError("no nvJPEG here")
        return real(crop, backend="cpu", region=region)

    monkeypatch.setattr(gpu, "GpuDecoder", decoder)
    monkeypatch.setattr(gpu, "assemble", lambda results, size, ptr, stream: None)
    monkeypatch.setattr(cuda, "Context", _Ctx)
    monkeypatch.setattr(cuda, "Stream", _Stream)
    monkeypatch.setattr(cuda, "DeviceBuffer", _Buffer)
    monkeypatch.setattr(gpu_check, "camera_jpegs", lambda: [_jpeg(300, 400, seed=i, progressive=i == 2)
                                                            for i in range(3)])
    monkeypatch.setattr(gpu_check, "DECODE_ROW_S", 0.01)
    models = []
    monkeypatch.setattr(gpu_check, "_decode_model_rows", lambda result, decoders, *a: models.append(sorted(decoders)))
    result = gpu_check.Result()
    gpu_check.check_decode(result)
    rows = {r.name: r for r in result.rows}
    assert not result.failed, result.rows
    assert rows["gpu-cuda"].value == "not available" and "no nvJPEG here" in rows["gpu-cuda"].detail
    assert rows["gpu-auto decode (roi)"].detail.startswith("max |d pixel| 0, 0.0% of values differ")
    assert rows["gpu-auto decode (full)"].detail == "roi == crop of the full decode: yes"
    assert rows["gpu-auto bad jpeg fails alone"].ok is True
    for name in ("cpu decode (full)", "cpu decode (region)", "gpu-auto decode (roi)", "gpu-auto decode (full)"):
        assert rows[name].value.endswith(" img/s") and float(rows[name].value.split()[0].replace(",", "")) > 0
    assert models == [["auto"]]


# -------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu(torch=False)
@pytest.mark.parametrize("backend", ["auto", "cuda"])
def test_gpu_decode_into_preprocess_lpd(backend):
    """The real decode: per-image errors as on the CPU, pixels within a few levels of Pillow's (another
    IDCT), and the assembled device batch through preprocess_lpd equal to the host build on those bytes."""
    if not _have_nvimgcodec():
        pytest.skip(gpu.MISSING)
    from ferret_runtime import cuda
    from ferret_runtime.kernels import host, launch

    good = [_jpeg(600, 800, seed=i, progressive=i == 1) for i in range(3)] + [_jpeg(100, 180, seed=9)]
    sources = [good[0], b"garbage", *good[1:]]
    dec = gpu.GpuDecoder(64, backend=backend)
    n, plane = len(sources), 64 * 64 * 3
    with cuda.Context(0) as ctx, cuda.Stream(ctx) as stream, cuda.DeviceBuffer(n * plane, ctx) as d_u8, \
            cuda.DeviceBuffer(n * plane * 4, ctx) as d_out, cuda.PinnedBuffer(n * plane, ctx) as h_u8, \
            cuda.PinnedBuffer(n * plane * 4, ctx) as h_out:
        out = dec.decode(sources, stream=stream.handle)
        assert [isinstance(o, ImageError) for o in out] == [False, True, False, False, False]
        gpu.assemble(out, 64, d_u8.ptr, stream)
        launch.preprocess_lpd(launch.get_module(0), d_u8.ptr, d_out.ptr, (n, 64, 64, 3), "float32",
                              stream=stream.handle)
        cuda.copy_dtoh_async(h_u8, d_u8, n * plane, stream)
        cuda.copy_dtoh_async(h_out, d_out, n * plane * 4, stream)
        stream.synchronize()
        batch = h_u8.array(np.uint8, (n, 64, 64, 3)).copy()
        lpd = h_out.array(np.float32, (n, 3, 64, 64)).copy()
    assert not batch[1].any()  # the bad image's place stays zero
    for i, s in [(0, good[0]), (2, good[1]), (3, good[2]), (4, good[3])]:
        want = prepare(load_image(s), Preprocess(crop=64)).astype(np.int16)
        assert np.abs(batch[i].astype(np.int16) - want).max() <= 16, i
    assert np.array_equal(lpd.view(np.uint32), host.preprocess_lpd_host(batch).view(np.uint32))
