"""Real TensorRT engines on a real GPU: builds, runs and parity, marked ``trt`` and ``gpu``.

Skipped with a reason where no GPU or no TensorRT is present (conftest.py). fp32 engines with the
portable LPD and with the plugin, verified and run at MIN/OPT/MAX batch (plugin equal to portable), GPU
preprocessing equal to host preprocessing, the timing cache reused, fp16 and INT8 builds, the authors'
checkpoint through ``Detector.open("m.engine")`` against the reference logits, and ferret_runtime.cuda's
buffers round-tripping through the device. What a CPU can check of the same code is in the other
test_trt_* files.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from ferret_export.pipeline import Int8Options
from ferret_export.tensorrt import build as trt_export
from ferret_export.tensorrt import verify as trt_verify
from ferret_runtime import cuda, sidecar
from ferret_runtime.backends import tensorrt as trt_backend
from ferret_runtime.fileio import sha256
from ferret_runtime.preprocess import normalize

from . import trt_fixtures

ckpt = trt_fixtures.ckpt  # shared fixture


@pytest.fixture(scope="module")
def built(ckpt, tmp_path_factory):
    """fp32 engines from one checkpoint, portable and plugin, sharing a timing cache."""
    root = tmp_path_factory.mktemp("engines")
    out = {}
    for lpd in ("portable", "plugin"):
        out[lpd] = trt_export.export_and_build(ckpt, root / f"{lpd}.engine", precision="fp32", input_size=64, lpd=lpd,
                                               batch=(1, 4, 8), timing_cache=root / "trt.cache", log=print)
    return out


@pytest.mark.parametrize("lpd", ["portable", "plugin"])
@pytest.mark.trt
@pytest.mark.gpu
def test_gpu_build_verifies_and_writes(built, lpd):
    res = built[lpd]
    assert res.comparisons and all(c.passed for c in res.comparisons)
    assert {c.case.split(",")[-1].strip() for c in res.comparisons} >= {"min batch 1", "opt batch 4", "max batch 8"}
    side = sidecar.read(res.path)
    assert side.engine["lpd"] == lpd and side.engine["engine_sha256"] == sha256(res.path)
    assert (side.engine["plugin"] is not None) == (lpd == "plugin")


@pytest.mark.trt
@pytest.mark.gpu
def test_gpu_runs_at_min_opt_max_batch_and_plugin_equals_portable(built):
    x = normalize(np.random.default_rng(3).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8))
    with trt_backend.TrtBackend(built["portable"].path, gpu_preprocess=False) as portable, \
            trt_backend.TrtBackend(built["plugin"].path, gpu_preprocess=False) as plugin:
        assert portable.profile_min[0] == 1 and portable.profile_max[0] == 8
        for n in (1, 4, 8, 11):  # 11: two chunks of the largest batch
            batch = np.resize(x, (n, *x.shape[1:]))
            a, b = portable.run(batch), plugin.run(batch)
            assert a.shape == (n,) and np.isfinite(a).all()
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3)
        with pytest.raises(ValueError, match=r"expected shapes from \(1, 3, 64, 64\) to \(8, 3, 64, 64\)"):
            portable.run(np.zeros((1, 3, 32, 32), np.float32))


@pytest.mark.trt
@pytest.mark.gpu
def test_gpu_preprocessing_equals_host_preprocessing(ckpt, built, tmp_path):
    u8 = np.random.default_rng(4).integers(0, 256, (11, 64, 64, 3), dtype=np.uint8)
    with trt_backend.TrtBackend(built["portable"].path, gpu_preprocess=False) as host_side:
        want = host_side.run(normalize(u8))
    with trt_backend.TrtBackend(built["portable"].path) as gpu_side:
        assert gpu_side.kernel == "normalize"
        np.testing.assert_allclose(gpu_side.run(u8), want, rtol=0, atol=0)  # the kernel normalises bit for bit
    external = trt_export.export_and_build(ckpt, tmp_path / "ext.engine", precision="fp32", input_size=64,
                                           lpd="external", batch=(1, 4, 8), log=print)
    assert all(c.passed for c in external.comparisons)
    with trt_backend.TrtBackend(external.path) as fused:
        assert fused.kernel == "preprocess_lpd"
        np.testing.assert_allclose(fused.run(u8), want, rtol=1e-3, atol=1e-3)


@pytest.mark.trt
@pytest.mark.gpu
def test_gpu_timing_cache_is_reused(ckpt, built, tmp_path):
    cache = built["portable"].path.with_name("trt.cache")
    before = cache.read_bytes()
    again = trt_export.export_and_build(ckpt, tmp_path / "again.engine", precision="fp32", input_size=64,
                                        batch=(1, 4, 8), timing_cache=cache, verify=False, log=print)
    assert cache.read_bytes() == before or again.build_seconds < built["portable"].build_seconds


@pytest.mark.trt
@pytest.mark.gpu
def test_gpu_fp16_build(ckpt, tmp_path):
    res = trt_export.export_and_build(ckpt, tmp_path / "fp16.engine", precision="fp16", input_size=64, batch=(1, 2, 4),
                                      log=print)
    assert sidecar.read(res.path).meta["precision"] == "fp16"
    assert all(c.passed and c.tol == trt_verify.TOLERANCE["fp16"] for c in res.comparisons)


@pytest.mark.trt
@pytest.mark.gpu
def test_gpu_int8_build(ckpt, tmp_path):
    if importlib.util.find_spec("ferret_export.int8.quantize") is None:
        pytest.skip("ferret_export.int8.quantize (INT8 Q/DQ graphs) is not available")
    from ferret_runtime.samples import write_samples

    images = write_samples(tmp_path / "calib", n=4, size=64)
    res = trt_export.export_and_build(ckpt, tmp_path / "int8.engine", precision="int8", input_size=64, batch=(1, 2, 4),
                                      int8=Int8Options(images, calib_images=4), log=print)
    assert sidecar.read(res.path).meta["precision"] == "int8"


@pytest.mark.trt
@pytest.mark.gpu
def test_gpu_detector_gives_the_reference_logits(authors_ckpt, reference, tmp_path):
    from ferret_runtime import Detector

    ref = json.loads((reference / "reference_logits.json").read_text())["images"]
    engine = tmp_path / "m.engine"
    trt_export.export_and_build(authors_ckpt, engine, precision="fp32", batch=(1, 8, 16), log=print)
    names = sorted(ref)
    with Detector.open(engine) as det:  # needs the 'tensorrt' entry point in ferret.backends
        results = det.predict([reference / "images" / n for n in names])
    for name, r in zip(names, results):
        assert r.error is None
        assert abs(r.logit - ref[name]["logit_center_crop_256"]) <= 1e-3, (name, r.logit)


@pytest.mark.gpu(torch=False)
def test_gpu_cuda_buffers_round_trip():
    with cuda.Context(0) as ctx, cuda.Stream(ctx) as stream, cuda.PinnedBuffer(4096, ctx) as a, \
            cuda.DeviceBuffer(4096, ctx) as d, cuda.PinnedBuffer(4096, ctx) as b, cuda.Event(ctx) as e0, \
            cuda.Event(ctx) as e1:
        a.array(np.float32, (1024,))[:] = np.arange(1024, dtype=np.float32)
        e0.record(stream)
        cuda.copy_htod_async(d, a, 4096, stream)
        cuda.copy_dtoh_async(b, d, 4096, stream)
        e1.record(stream)
        stream.synchronize()
        np.testing.assert_array_equal(b.array(np.float32, (1024,)), np.arange(1024, dtype=np.float32))
        assert e0.elapsed_ms(e1) >= 0
        with pytest.raises(cuda.CudaError, match="expected at most 4096"):
            cuda.copy_htod_async(d, a, 8192, stream)
    with pytest.raises(cuda.CudaError, match="Received a closed PinnedBuffer"):
        a.ptr  # noqa: B018 (the property raises)
