"""The fused LPD kernel against the original and our PyTorch LPD, in GB/s against a copy.

GPU (``gpu`` marker): the residual ``x - lpd(x)`` (median, 3x3) at the paper's batch sizes, by
- ``original``: unfold + median, as the authors' code: writes 9 copies of x, then sorts them;
- ``fast``: our shifted-view median network in PyTorch (lpd_fast): ~30 element-wise min/max passes;
- ``op``: ``torch.ops.ferret.lpd`` (the fused kernel's reconstruction) then the subtraction in PyTorch;
- ``fused``: the residual kernel through the NVRTC launcher: reads x once, writes the residual once;
- ``copy``: ``x.clone()``, the same bytes read and written, the bound for a one-pass kernel.
Each test reports its time per batch, images/s and effective DRAM bandwidth (2 x bytes of x per
batch), and the copy's bandwidth measured in the same test with the same timer.

GPU preprocessing, uint8 NHWC (256 x 256 x 256 x 3) in, network input out, each against ``normalize``
(the plain uint8 -> float normalisation kernel) measured in the same test:
- ``fused``: preprocess_lpd, normalise + LPD residual in one pass;
- ``two-pass``: normalize, then the residual kernel (what running them separately costs);
- ``normalize``: the baseline itself. Goal: ``fused`` at least as fast as ``normalize``.

CPU: the host build of the same kernel source against the original, on a small batch.
``make bench`` times them; CI runs each body once (``--benchmark-disable``), and skips the GPU ones.
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

from ferret_export.bench.timing import cuda_event_ms
from ferret_runtime.kernels import host, launch
from ferret_runtime.lpd_spec import LPD_SPECS
from ferret_train.layers.lpd import lpd_fast, lpd_reference

SPEC = LPD_SPECS["median"]
GPU_SHAPES = [(64, 3, 224, 224), (256, 3, 256, 256)]
GPU_IMPLS = ("original", "fast", "op", "fused", "copy")
ITERS, ROUNDS, WARMUP = 10, 5, 2  # each timed call runs ITERS batches back to back, then synchronises
# tests/conftest.py skips `gpu` items only when it is loaded; `pytest benchmarks` alone does not load it
NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to PyTorch on this machine")


def _residual_fn(impl: str, x: torch.Tensor):
    if impl == "original":
        return lambda: x - lpd_reference(x, SPEC, 3)
    if impl == "fast":
        return lambda: x - lpd_fast(x, SPEC, 3)
    if impl == "op":
        from ferret_train.layers import lpd  # noqa: F401  registers torch.ops.ferret.lpd

        return lambda: x - torch.ops.ferret.lpd(x, "median", 3)
    if impl == "copy":
        return x.clone
    module, out = launch.get_module(x.device.index), torch.empty_like(x)

    def fused() -> torch.Tensor:
        launch.lpd(module, x.data_ptr(), out.data_ptr(), tuple(x.shape), x.dtype, "median", 3, residual=True,
                   stream=torch.cuda.current_stream().cuda_stream)
        return out

    return fused


def _batches(fn) -> None:
    for _ in range(ITERS):
        fn()
    torch.cuda.synchronize()


def _event_ms(fn) -> float:
    """Median over ROUNDS of the CUDA-event time of ITERS back-to-back calls, per call, in ms."""
    for _ in range(WARMUP):
        _batches(fn)
    return statistics.median(cuda_event_ms(fn, iters=ITERS, rounds=ROUNDS))


@pytest.mark.gpu
@NEEDS_GPU
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def bench_lpd_residual_gpu(benchmark, shape, dtype, impl):
    benchmark.group = f"lpd-median-3x3 residual {'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')} GPU"
    x = torch.randn(shape, device="cuda").to(dtype)
    fn = _residual_fn(impl, x)
    if impl != "copy":  # every LPD gives the same residual, bit for bit
        torch.testing.assert_close(fn().float(), (x - lpd_fast(x, SPEC, 3)).float(), rtol=0, atol=0)
    benchmark.pedantic(_batches, (fn,), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    moved = 2 * x.numel() * x.element_size()  # x read once, the residual written once
    ms, copy_ms = _event_ms(fn), _event_ms(x.clone)
    benchmark.extra_info.update(
        ms_per_batch=round(ms, 4), images_per_s=round(shape[0] / ms * 1e3), effective_GBps=round(moved / ms / 1e6, 1),
        copy_GBps=round(moved / copy_ms / 1e6, 1), fraction_of_copy=round(copy_ms / ms, 3))
    print(f"\n{impl:8s} {benchmark.group}: {ms:.3f} ms/batch, {shape[0] / ms * 1e3:,.0f} images/s, "
          f"{moved / ms / 1e6:,.0f} GB/s ({copy_ms / ms:.0%} of a copy at {moved / copy_ms / 1e6:,.0f} GB/s)")


PRE_SHAPE = (256, 256, 256, 3)


def _preprocess_fn(impl: str, images: torch.Tensor, dtype: torch.dtype):
    module, stream = launch.get_module(images.device.index), torch.cuda.current_stream().cuda_stream
    n, h, w, _ = images.shape
    out = torch.empty((n, 3, h, w), dtype=dtype, device=images.device)
    mid = torch.empty_like(out)
    args = (images.data_ptr(), out.data_ptr(), tuple(images.shape), dtype)

    def fused() -> torch.Tensor:
        launch.preprocess_lpd(module, *args, stream=stream)
        return out

    def plain() -> torch.Tensor:
        launch.normalize(module, *args, stream=stream)
        return out

    def two_pass() -> torch.Tensor:
        launch.normalize(module, images.data_ptr(), mid.data_ptr(), tuple(images.shape), dtype, stream=stream)
        launch.lpd(module, mid.data_ptr(), out.data_ptr(), tuple(out.shape), dtype, stream=stream)
        return out

    return {"fused": fused, "normalize": plain, "two-pass": two_pass}[impl]


@pytest.mark.gpu
@NEEDS_GPU
@pytest.mark.parametrize("impl", ["fused", "two-pass", "normalize"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def bench_preprocess_gpu(benchmark, dtype, impl):
    benchmark.group = f"preprocess uint8 {'x'.join(map(str, PRE_SHAPE))} -> {str(dtype).removeprefix('torch.')} GPU"
    images = torch.randint(0, 256, PRE_SHAPE, dtype=torch.uint8, device="cuda")
    fn, baseline = _preprocess_fn(impl, images, dtype), _preprocess_fn("normalize", images, dtype)
    if impl == "fused":  # the two-pass result: bit for bit in float32; float16 two-pass rounds its midpoint too
        want = _preprocess_fn("two-pass", images, dtype)().clone()
        atol = 0 if dtype == torch.float32 else 5e-3
        torch.testing.assert_close(fn(), want, rtol=0, atol=atol)
    benchmark.pedantic(_batches, (fn,), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    moved = images.numel() + images.numel() * torch.finfo(dtype).bits // 8  # uint8 read once, output written once
    ms, base_ms = _event_ms(fn), _event_ms(baseline)
    benchmark.extra_info.update(
        ms_per_batch=round(ms, 4), images_per_s=round(PRE_SHAPE[0] / ms * 1e3),
        effective_GBps=round(moved / ms / 1e6, 1), normalize_ms=round(base_ms, 4),
        speed_vs_normalize=round(base_ms / ms, 3))
    print(f"\n{impl:9s} {benchmark.group}: {ms:.3f} ms/batch, {PRE_SHAPE[0] / ms * 1e3:,.0f} images/s, "
          f"{moved / ms / 1e6:,.0f} GB/s; {base_ms / ms:.2f}x the speed of normalize ({base_ms:.3f} ms)")


CPU_SHAPE = (2, 3, 128, 128)


@pytest.fixture(scope="module")
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)  # the CI machine's size; the host build is single-threaded
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("impl", ["original", "host-kernel"])
def bench_lpd_residual_cpu(benchmark, _threads, impl):
    benchmark.group = f"lpd-median-3x3 residual {'x'.join(map(str, CPU_SHAPE))} CPU"
    x = np.random.default_rng(0).standard_normal(CPU_SHAPE).astype(np.float32)
    xt = torch.from_numpy(x)
    if impl == "original":
        out = benchmark(lambda: (xt - lpd_reference(xt, SPEC, 3)).numpy())
    else:
        host.load_host_library()  # build outside the timing
        out = benchmark(host.lpd_residual_host, x, "median", 3)
    np.testing.assert_array_equal(out, (xt - lpd_reference(xt, SPEC, 3)).numpy())
