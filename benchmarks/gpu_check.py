"""``make gpu-check``: the whole GPU story in one command, on a bare GPU machine, in under 6 minutes.

Needs numpy, Pillow, PyYAML, a CUDA PyTorch, cuda-python (with NVRTC) and g++; installs nothing,
reaches no network and runs from a plain checkout (not pip-installed). Sections, each a block of rows
in the one printed table:

1. env: GPU, driver and NVRTC versions, whether NVRTC is newer than the driver (PTX would not load);
2. kernels: every lpd.cu kernel bit-exact with the host build (g++): all variants, k = 3, 5, 7,
   residual and reconstruction, float32 equal and float16 equal to the host result rounded once;
   odd sizes, 1x1, more than 65,535 planes (grid-stride), more than 2^31 elements;
3. preprocess: normalize and preprocess_lpd exact; pinned -> device -> pinned on a non-blocking stream;
4. plugin: the TensorRT plugin's PTX JIT-loaded (cuModuleLoadData) and launched with TensorRT's
   argument order, equal to the runtime kernels;
5. torch: torch.ops.ferret.lpd on CUDA, and the authors' checkpoint through it: reference logits <= 1e-4;
6. speed: each kernel's bandwidth as % of a device-to-device copy of the same bytes (timed behind a
   queued delay, so launch overhead does not count); then every model in eager mode, each batch a cell
   with its own time budget; then, last and optional, torch.compile (CUDA graphs) with what time is
   left: a model that cannot compile (no triton, say) says why in its row;
7. decode: camera-like 12 Mpx JPEGs (4:2:0, q85-95) decoded on the GPU (nvImageCodec: the hardware
   JPEG engine and nvJPEG's CUDA decoder, batched, centre-crop region) against the CPU (Pillow): img/s
   of the decode alone and of decode + preprocess_lpd + FerretNet-S, and the decision parity (verdict
   flips, |delta logit|, |delta pixel|) that decides whether GPU decoding may be the default;
   skipped, saying why, without nvImageCodec;
8. backends: ONNX Runtime (CUDA) and TensorRT rows when installed;
9. pytest: the ``gpu`` tests, when pytest is installed; a test module whose optional package is
   missing is skipped with that reason (``benchmarks/gpu_check_pytest.py``), not a collection error.

Time: the run has one budget (``--budget``, 330 s by default, so the whole run with its imports ends
within 6 minutes on one H100). The correctness sections 1-5 always run; speed, decode, backends and pytest
take what is left, each up to its own share, and what the budget cut is named in the summary.

Results: ``--out DIR`` gets ``gpu-check.json`` (environment, timings, every row) and ``gpu-check.txt``
(the printed table). By default DIR is ``benchmarks/results/<gpu-name>/`` in the checkout, beside the
other measured results; where that cannot be written (a read-only checkout), a folder in the system's
temporary directory, said on the last line.

Exit status: 0 all correct, 1 any correctness failure, 2 no GPU (one line says why) or a bad option.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REFERENCE = Path(os.environ.get("FERRET_REFERENCE", ROOT.parent / "shared" / "reference"))
FUNCS = ("median", "excmed", "retmed", "min", "max", "avg")
BATCHES = (1, 8, 32, 64, 128, 256)
MODELS = ("ferretnet-s", "ferretnet-b", "npr", "cnndetection", "freqnet", "safe")

# Time. The whole run: 330 s, so that it ends within 6 minutes on one H100 with Python's start-up, the
# imports and the writes. Sections 1-5 (correctness) always run, about 2 minutes; the three below
# take at most their share of what is left, and keep RESERVE_S seconds for each later one that will run.
RUN_BUDGET_S = 330.0
SECTION_BUDGET_S = {"speed": 100.0, "decode": 50.0, "backends": 150.0, "pytest": 150.0}
RESERVE_S = {"decode": 30.0, "backends": 60.0, "pytest": 90.0}
EAGER_CELL_S = 8.0  # one batch of one model in eager mode: a cell expected to take longer is left out ("-")
COMPILE_CELL_S = 60.0  # one torch.compile cell (the compile itself included)
PYTEST_MIN_S = 20.0  # pytest is not started with less than this left
TRT_BUILD_S = 60.0  # one TensorRT engine built and verified: not started with less than this left


def now() -> float:
    """The clock every budget is kept on (seconds, monotonic)."""
    return time.monotonic()


@dataclass
class Row:
    """One line of the table: ``ok`` True/False for a correctness check, None for a measurement or a skip."""

    section: str
    name: str
    ok: bool | None
    value: str = ""
    detail: str = ""


@dataclass
class Result:
    rows: list[Row] = field(default_factory=list)
    env: dict[str, Any] = field(default_factory=dict)
    deadline: float = math.inf  # now() at which the run's budget ends
    section_end: float = math.inf  # ... and the running section's share of it
    cut: list[str] = field(default_factory=list)  # what the budget left out, named in the summary

    def add(self, section: str, name: str, ok: bool | None, value: str = "", detail: str = "") -> None:
        self.rows.append(Row(section, name, ok, value, detail))

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.ok is False]

    def left(self) -> float:
        """Seconds left to the running section: its share, within the run's budget."""
        return min(self.deadline, self.section_end) - now()


# ---------------------------------------------------------------------------------------------- report
def same_bits(got: Any, want: Any) -> bool:
    """Equal bit patterns (uint16/uint32 views), not equal values: -0 and +0 differ, as the kernels promise."""
    import numpy as np

    got, want = np.ascontiguousarray(got), np.ascontiguousarray(want)
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    view = {2: np.uint16, 4: np.uint32, 1: np.uint8, 8: np.uint64}[got.dtype.itemsize]
    return bool(np.array_equal(got.view(view), want.view(view)))


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the results folder)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def format_table(result: Result) -> str:
    """One table: section, check, PASS/FAIL/'' and the value; then the time and the correctness summary."""
    width = max([len(r.name) for r in result.rows] + [11])
    lines = [f"{'section':10s} {'check':{width}s} {'result':6s} value"]
    for r in result.rows:
        mark = {True: "PASS", False: "FAIL", None: ""}[r.ok]
        lines.append(f"{r.section:10s} {r.name:{width}s} {mark:6s} {r.value}" + (f"  ({r.detail})" if r.detail else ""))
    if "budget_s" in result.env:
        spent = result.env.get("total_s", sum(result.env.get("seconds", {}).values()))
        budget = f"{spent:.0f} s of the {result.env['budget_s']:.0f} s budget"
        lines.append(f"{'summary':10s} {'time':{width}s} {'':6s} {budget}"
                     + (f"; cut short: {'; '.join(result.cut)}" if result.cut else ""))
    failed = len(result.failed)
    lines.append(f"{'summary':10s} {'correctness':{width}s} {'FAIL' if failed else 'PASS':6s} "
                 f"{failed} failed of {sum(r.ok is not None for r in result.rows)} checks")
    return "\n".join(lines)


def default_out(gpu: str) -> Path:
    """benchmarks/results/<gpu-name>/ in the checkout, beside the other measured results."""
    return RESULTS / slug(gpu)


def write_report(result: Result, out: Path) -> tuple[Path, Path]:
    """``<out>/gpu-check.json`` (the environment, the timings, what the budget cut and every row) and
    ``<out>/gpu-check.txt`` (the table as printed)."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"env": result.env, "failed": len(result.failed), "checks": sum(r.ok is not None for r in result.rows),
            "cut": result.cut, "rows": [asdict(r) for r in result.rows]}
    json_path, table_path = out / "gpu-check.json", out / "gpu-check.txt"
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    table_path.write_text(format_table(result) + "\n")
    return json_path, table_path


def no_gpu_reason() -> str | None:
    """None when the CUDA driver sees a GPU, else the one line saying why not."""
    try:
        from ferret_runtime import cuda

        count = cuda.device_count()
    except Exception as e:  # CudaError: no cuda-python, no driver, no device
        return f"gpu-check: no GPU: {str(e).splitlines()[0]}"
    return None if count > 0 else "gpu-check: no GPU: the CUDA driver sees 0 devices"


def reason(e: BaseException, limit: int = 160) -> str:
    """'Type: first line' of the innermost cause (torch wraps a compiler's error, e.g. no triton, in its own)."""
    seen = {id(e)}
    while True:
        inner = getattr(e, "inner_exception", None) or e.__cause__
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        e = inner
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    text = f"{type(e).__name__}: {line}" if line else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def section(result: Result, name: str, fn: Callable[[Result], None], budget_s: float | None = None) -> None:
    """Run one section within ``budget_s`` (None: no share of its own, only the run's deadline); an
    exception is a failed row with its last line, not the end of the run."""
    start = now()
    result.section_end = start + budget_s if budget_s is not None else math.inf
    try:
        fn(result)
    except Exception as e:
        tb = traceback.format_exc().strip().splitlines()
        result.add(name, "section raised", False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                   tb[-3].strip() if len(tb) > 2 else "")
    finally:
        result.section_end = math.inf
        result.env.setdefault("seconds", {})[name] = round(now() - start, 1)


def _installed(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(dist)
    except PackageNotFoundError:
        return False
    return True


def will_run(name: str) -> bool:
    """Whether a budgeted section has work to do here (so a section before it keeps time for it)."""
    import importlib.util

    if name == "backends":
        return importlib.util.find_spec("tensorrt") is not None or _installed("onnxruntime-gpu")
    if name == "pytest":
        return importlib.util.find_spec("pytest") is not None
    if name == "decode":
        return nvimgcodec_missing() is None
    return True


def section_budget(name: str, later: list[str], result: Result) -> float | None:
    """A budgeted section's share: at most SECTION_BUDGET_S, and the run's time left less what each
    later section that will run keeps (RESERVE_S). None for a correctness section (always runs)."""
    if name not in SECTION_BUDGET_S:
        return None
    keep = sum(RESERVE_S.get(n, 0.0) for n in later if n in RESERVE_S and will_run(n))
    return max(0.0, min(SECTION_BUDGET_S[name], result.deadline - now() - keep))


# ------------------------------------------------------------------------------------------ 1. env
def check_env(result: Result) -> None:
    import torch

    from ferret_runtime import cuda
    from ferret_runtime.kernels.nvrtc import check_nvrtc_driver, nvrtc_version

    info = cuda.device_info(0)
    nvrtc, driver = nvrtc_version(), cuda.driver_version()
    result.env.update(gpu=info.name, sm=info.sm, memory_gb=round(info.total_memory / 2**30, 1),
                      driver_cuda=f"{driver[0]}.{driver[1]}", nvrtc=f"{nvrtc[0]}.{nvrtc[1]}", torch=torch.__version__,
                      torch_cuda=torch.version.cuda, python=platform.python_version())
    result.add("env", "gpu", None, f"{info.name} (sm_{info.sm.replace('.', '')}, {info.total_memory / 2**30:.0f} GiB)")
    result.add("env", "driver / nvrtc", None, f"CUDA {driver[0]}.{driver[1]} / NVRTC {nvrtc[0]}.{nvrtc[1]}")
    try:
        check_nvrtc_driver("ptx", nvrtc, driver)
        result.add("env", "nvrtc <= driver (PTX loads)", True, "yes")
    except cuda.CudaError as e:  # the runtime's CUBINs still load; the plugin's PTX would not
        result.add("env", "nvrtc <= driver (PTX loads)", False, str(e))
    result.add("env", "torch sees the GPU", torch.cuda.is_available(), torch.__version__)


# -------------------------------------------------------------------------------------- 2. kernels
def _lpd_gpu(x, func: str, k: int, residual: bool):
    import torch

    from ferret_runtime.kernels import launch

    out = torch.empty_like(x)
    launch.lpd(launch.get_module(0), x.data_ptr(), out.data_ptr(), tuple(x.shape), x.dtype, func, k, residual,
               stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return out


def _input(shape, seed: int):
    import numpy as np

    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    x[..., ::3, ::2] = np.round(x[..., ::3, ::2])  # ties
    x[..., 1::5, 1::3] = 0.0  # zeros (and the masked centre's value)
    return x


def _host_lpd(shape, func: str, k: int, residual: bool, half: bool):
    """What the GPU must give for ``_input(shape, k)``: the host build on float32, or on the float16
    values with the result rounded once."""
    import numpy as np

    from ferret_runtime.kernels import host

    x = _input(shape, k)
    fn = host.lpd_residual_host if residual else host.lpd_reconstruct_host
    return fn(x.astype(np.float16).astype(np.float32), func, k).astype(np.float16) if half else fn(x, func, k)


def check_kernels(result: Result) -> None:
    import numpy as np
    import torch

    from ferret_runtime.kernels import host

    shapes = [(1, 1, 1, 1), (2, 3, 3, 5), (1, 3, 67, 129), (3, 3, 257, 511)]
    host.load_host_library()  # built once here, before the threads below share it
    # The host results are the slow part (about a minute on one core): computed on every core at once
    # (ctypes lets go of the GIL), in the order the GPU side below asks for them.
    cases = [(func, k, shape, residual, half) for func in FUNCS for k in (3, 5, 7) for shape in shapes
             for residual in (True, False) for half in (False, True)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        wants = [pool.submit(_host_lpd, shape, func, k, residual, half)
                 for func, k, shape, residual, half in cases]
        bad: dict[tuple[str, int], list[str]] = {}
        for (func, k, shape, residual, half), want in zip(cases, wants):
            x = _input(shape, k)
            x = torch.from_numpy(x.astype(np.float16) if half else x).cuda()
            got = _lpd_gpu(x, func, k, residual).cpu().numpy()
            if not same_bits(got, want.result()):
                bad.setdefault((func, k), []).append(f"{'f16' if half else 'f32'} {shape} residual={residual}")
            if shape == shapes[-1] and residual is False and half:  # the last case of this (func, k)
                errors = bad.get((func, k), [])
                result.add("kernels", f"{func} k={k}", not errors, f"{len(shapes) * 4} cases", "; ".join(errors[:3]))
    # more planes than gridDim.z (65,535): the grid-stride loop
    x = _input((70000, 1, 5, 7), 1)
    for func, k in (("median", 3), ("excmed", 5)):
        got = _lpd_gpu(torch.from_numpy(x).cuda(), func, k, True).cpu().numpy()
        result.add("kernels", f"70000 planes {func} k={k}", same_bits(got, host.lpd_residual_host(x, func, k)))
    # more than 2^31 elements (float16, two planes of 32768 x 32769): the last rows of the last plane
    free, _ = torch.cuda.mem_get_info()
    n = 2 * 32768 * 32769
    if free < 4 * n + (1 << 30):
        result.add("kernels", "> 2^31 elements", None, "skipped", f"needs {4 * n / 2**30:.0f} GiB free")
        return
    big = torch.randn((2, 1, 32768, 32769), device="cuda", dtype=torch.float16)
    out = _lpd_gpu(big, "median", 3, True)
    tail = big[1:, :, -40:].float().cpu().numpy()  # crop: its first row has a different halo, skip it
    want = host.lpd_residual_host(np.ascontiguousarray(tail), "median", 3).astype(np.float16)[..., 1:, :]
    got = out[1:, :, -39:].cpu().numpy()
    result.add("kernels", "> 2^31 elements (f16)", same_bits(got, want), f"{n:,} elements")
    del big, out
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------- 3. preprocess
def check_preprocess(result: Result) -> None:
    import numpy as np
    import torch

    from ferret_runtime import cuda
    from ferret_runtime.kernels import host, launch
    from ferret_runtime.preprocess import MEAN, STD, normalize

    module, rng = launch.get_module(0), np.random.default_rng(2)
    for shape in [(1, 1, 1, 3), (2, 3, 5, 3), (3, 257, 511, 3), (70000, 2, 3, 3), (4, 224, 224, 3)]:
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        n, h, w, _ = shape
        img = torch.from_numpy(images).cuda()
        for kernel in ("normalize", "preprocess_lpd"):
            want = normalize(images) if kernel == "normalize" else host.preprocess_lpd_host(images)
            ok = True
            for dtype in (torch.float32, torch.float16):
                out = torch.empty((n, 3, h, w), dtype=dtype, device="cuda")
                getattr(launch, kernel)(module, img.data_ptr(), out.data_ptr(), shape, dtype, MEAN, STD,
                                        stream=torch.cuda.current_stream().cuda_stream)
                torch.cuda.synchronize()
                ok &= same_bits(out.cpu().numpy(), want.astype(np.float16 if dtype == torch.float16 else np.float32))
            result.add("preprocess", f"{kernel} {shape}", ok, "f32 and f16")
    # pinned -> device -> kernel -> device -> pinned on a non-blocking stream of ours, ordered by an event
    shape = (8, 96, 80, 3)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    n_out = 8 * 3 * 96 * 80 * 4
    with cuda.Context(0) as ctx, cuda.Stream(ctx) as stream, cuda.Event(ctx) as done, \
            cuda.PinnedBuffer(images.nbytes, ctx) as h_in, cuda.DeviceBuffer(images.nbytes, ctx) as d_in, \
            cuda.DeviceBuffer(n_out, ctx) as d_out, cuda.PinnedBuffer(n_out, ctx) as h_out:
        h_in.array(np.uint8, shape)[...] = images
        cuda.copy_htod_async(d_in, h_in, images.nbytes, stream)
        launch.normalize(module, d_in.ptr, d_out.ptr, shape, "float32", MEAN, STD, stream=stream.handle)
        cuda.copy_dtoh_async(h_out, d_out, n_out, stream)
        done.record(stream)
        done.synchronize()
        got = h_out.array(np.float32, (8, 3, 96, 80)).copy()
    result.add("preprocess", "pinned -> device -> pinned, our stream", same_bits(got, normalize(images)))


# --------------------------------------------------------------------------------------- 4. plugin
def check_plugin(result: Result) -> None:
    import ctypes

    import torch
    from cuda.bindings import driver as drv

    from ferret_export.tensorrt import plugin as trt_plugin
    from ferret_runtime.cuda import call
    from ferret_runtime.kernels import launch

    ptx = trt_plugin.compile_trt_ptx()  # refused in one line when NVRTC is newer than the driver
    result.add("plugin", "PTX size (all entries)", None, f"{len(ptx) / 1e3:.0f} KB")
    module = launch.get_module(0)
    with module.current():
        mod = call("cuModuleLoadData", drv.cuModuleLoadData, ptx + b"\0")  # JIT by the driver, as TensorRT does
        try:
            for func, k, residual in (("median", 3, True), ("median", 3, False), ("excmed", 5, False),
                                      ("max", 7, True)):
                for dtype in (torch.float32, torch.float16):
                    x = torch.from_numpy(_input((2, 3, 67, 129), k)).to(dtype).cuda()
                    op = "lpd_residual" if residual and func == "median" else "lpd"
                    got = trt_plugin.aot_launch(tuple(x.shape), str(dtype).removeprefix("torch."), func, k,
                                                trt_plugin.OPS[op], cdiv=lambda a, b: -(-a // b), minimum=min)
                    out = torch.empty_like(x)
                    fn = call("cuModuleGetFunction", drv.cuModuleGetFunction, mod, got.kernel.encode())
                    values = [ctypes.c_void_p(x.data_ptr()), *map(ctypes.c_int, got.extra_args),
                              ctypes.c_void_p(out.data_ptr())]  # TensorRT's order: inputs, extra ints, outputs
                    params = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
                    torch.cuda.synchronize()
                    call("cuLaunchKernel", drv.cuLaunchKernel, fn, *got.grid, *got.block, got.shared_mem,
                          drv.CUstream(torch.cuda.current_stream().cuda_stream), ctypes.addressof(params), 0)
                    torch.cuda.synchronize()
                    want = _lpd_gpu(x, func, k, residual)
                    result.add("plugin", f"{got.kernel} {func} k={k}", bool(torch.equal(out, want)),
                               "== runtime kernel")
        finally:
            call("cuModuleUnload", drv.cuModuleUnload, mod)


# ---------------------------------------------------------------------------------------- 5. torch
def check_torch(result: Result) -> None:
    import torch

    from ferret_runtime.kernels import host
    from ferret_train.layers import lpd  # noqa: F401  registers torch.ops.ferret.lpd

    x = torch.from_numpy(_input((4, 3, 61, 77), 5))
    for func in FUNCS:
        for k in (3, 5, 7):
            got = torch.ops.ferret.lpd(x.cuda(), func, k).cpu().numpy()
            ok = same_bits(got, host.lpd_reconstruct_host(x.numpy(), func, k))
            if not ok:
                result.add("torch", f"op {func} k={k}", False, "differs from the host build")
    result.add("torch", "torch.ops.ferret.lpd, 18 variants", not any(r.section == "torch" and r.ok is False
                                                                     for r in result.rows))
    ckpt, logits = REFERENCE / "ferretnet-s-median-3.pth", REFERENCE / "reference_logits.json"
    if not ckpt.is_file():
        result.add("torch", "authors' checkpoint", None, "skipped", f"no {ckpt} (set FERRET_REFERENCE)")
        return
    from ferret_runtime import Detector

    ref = json.loads(logits.read_text())["images"]
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with Detector.open(ckpt, crop=256, lpd_impl="op", device="cuda") as det:
            results = det.predict([REFERENCE / "images" / n for n in sorted(ref)])
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    worst = max(abs(r.logit - ref[n]["logit_center_crop_256"]) for n, r in zip(sorted(ref), results))
    result.add("torch", "authors' checkpoint, reference logits", worst <= 1e-4, f"max |diff| {worst:.2e}", "<= 1e-4")


# ---------------------------------------------------------------------------------------- 6. speed
def _timed(fn: Callable[[], Any], iters: int = 20, warmup: int = 1) -> float:
    """Milliseconds per call from CUDA events, the calls queued behind a GPU-side delay so the host's
    launch overhead overlaps the delay instead of being timed."""
    from ferret_export.bench.timing import cuda_event_ms

    return cuda_event_ms(fn, iters=iters, warmup=warmup, queue_behind=True)[0]


def check_speed(result: Result, compile: bool = True) -> None:
    import torch

    from ferret_runtime.kernels import launch
    from ferret_runtime.preprocess import MEAN, STD

    module, stream = launch.get_module(0), torch.cuda.current_stream().cuda_stream
    for dtype in (torch.float32, torch.float16):
        if result.left() < 5:
            result.cut.append(f"speed: kernel bandwidth {str(dtype)[6:]}")
            continue
        x = torch.randn((256, 3, 256, 256), device="cuda", dtype=dtype)
        out = torch.empty_like(x)
        copy_ms = _timed(lambda x=x, out=out: out.copy_(x))  # defaults: _timed calls it in this iteration
        for name, func, k, residual in (("lpd_residual", "median", 3, True), ("lpd_generic k3", "median", 3, False),
                                        ("lpd_generic k5", "median", 5, False), ("lpd_generic k7", "median", 7, False)):
            ms = _timed(lambda x=x, out=out, dtype=dtype, func=func, k=k, residual=residual:
                        launch.lpd(module, x.data_ptr(), out.data_ptr(), tuple(x.shape), dtype, func, k, residual,
                                   stream=stream))
            gbs = 2 * x.numel() * x.element_size() / ms / 1e6
            result.add("speed", f"{name} {str(dtype)[6:]}", None, f"{gbs:,.0f} GB/s, {copy_ms / ms:.0%} of a copy")
        images = torch.randint(0, 256, (256, 256, 256, 3), dtype=torch.uint8, device="cuda")
        moved = images.numel() * (1 + x.element_size())  # uint8 read once, the output written once
        src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        copy_ms = _timed(lambda src=src, dst=dst: dst.copy_(src))  # reads and writes `moved` bytes in all
        for kernel in ("normalize", "preprocess_lpd"):
            ms = _timed(lambda kernel=kernel, images=images, out=out, dtype=dtype:
                        getattr(launch, kernel)(module, images.data_ptr(), out.data_ptr(), tuple(images.shape),
                                                dtype, MEAN, STD, stream=stream))
            result.add("speed", f"{kernel} {str(dtype)[6:]}", None,
                       f"{moved / ms / 1e6:,.0f} GB/s, {copy_ms / ms:.0%} of a copy of {moved / 2 / 1e6:.0f} MB")
        x = out = images = src = dst = None  # free them before the next dtype
    torch.cuda.empty_cache()
    check_models(result, compile=compile)


def measure_cells(result: Result, batches: tuple[int, ...], measure: Callable[[int], float], cell_s: float,
                  oom: tuple[type[BaseException], ...] = (), scales: bool = True) -> tuple[list[str], str | None]:
    """One row of cells, smallest batch first: ``measure(b)`` gives milliseconds per call of a batch of b.

    A cell is left out ("b64 -") when the cell before it says it would take more than ``cell_s`` seconds
    (its wall time times the batch ratio where ``scales``, else the same time) or more than the section
    has left; the larger ones with it. Out of memory ends the row at that cell ("b256 OOM"); any other
    exception ends it too ("b1 error") and is returned, for the row to say why.
    """
    cells: list[str] = []
    last: tuple[int, float] | None = None  # (batch, wall seconds) of the cell before
    for i, b in enumerate(batches):
        expect = 0.0 if last is None else last[1] * (b / last[0] if scales else 1.0)
        if result.left() <= 0 or expect > min(cell_s, result.left()):
            return cells + [f"b{rest} -" for rest in batches[i:]], None
        t0 = now()
        try:
            ms = measure(b)
        except oom:
            return cells + [f"b{b} OOM"], None
        except Exception as e:
            return cells + [f"b{b} error"], reason(e)
        last = (b, now() - t0)
        cells.append(f"b{b} {b / ms * 1e3:,.0f}/s")
    return cells, None


def _left_out(result: Result, what: str, cells: list[str]) -> None:
    if any(c.endswith(" -") for c in cells):
        result.cut.append(f"{what} {sum(c.endswith(' -') for c in cells)} of {len(cells)} cells")


def check_models(result: Result, batches: tuple[int, ...] = BATCHES, compile: bool = True,
                 models: tuple[str, ...] = MODELS, cell_s: float = EAGER_CELL_S,
                 compile_cell_s: float = COMPILE_CELL_S, device: str = "cuda",
                 timer: Callable[..., float] = _timed, size: int = 256) -> None:
    """Images/s at ``size`` x ``size`` (256): every model in eager mode first (the paper's FPS column), a
    time budget per cell; then torch.compile (CUDA graphs), last and optional, with what the section has
    left. A model that fails in eager mode fails its row only; a compile that raises (no triton, say) is
    its row's reason, and the models after it are not compiled (they would fail the same way)."""
    import torch

    from ferret_train import create_model

    oom = (torch.cuda.OutOfMemoryError,)

    def measure(run: Callable[[Any], Any], warmup: int) -> Callable[[int], float]:
        def at(b: int) -> float:
            x = torch.randn((b, 3, size, size), device=device)
            with torch.inference_mode():
                return timer(lambda: run(x), iters=5, warmup=warmup)
        return at

    def release() -> None:
        if device == "cuda":
            torch.cuda.empty_cache()

    broken: list[str] = []  # models whose eager row failed: not compiled
    for arch in models:  # eager first, every model
        try:
            model = create_model(arch).eval().to(device)
        except Exception as e:
            result.add("models", f"{arch} eager", False, "not run", f"creating it raised {reason(e)}")
            broken.append(arch)
            continue
        cells, error = measure_cells(result, batches, measure(model, warmup=1), cell_s, oom)
        del model
        release()
        _left_out(result, f"{arch} eager", cells)
        if error:
            broken.append(arch)
        result.add("models", f"{arch} eager", False if error else None, ", ".join(cells),
                   error or f"images/s at {size}x{size}")
    if not compile:
        result.add("models", "torch.compile", None, "not run (--no-compile)")
        return
    failed: str | None = None  # the first model whose compile failed
    for arch in models:  # then torch.compile, while the section has time for a whole compile
        if arch in broken:
            result.add("models", f"{arch} compile", None, "not run", "it failed in eager mode")
            continue
        if failed:
            result.add("models", f"{arch} compile", None, "not run", f"torch.compile failed on {failed}")
            continue
        if result.left() < compile_cell_s:
            result.add("models", f"{arch} compile", None, "not run",
                       f"{max(result.left(), 0):.0f} s left; a compile may take {compile_cell_s:.0f} s")
            result.cut.append(f"{arch} compile")
            continue
        model = run = None
        try:
            model = create_model(arch).eval().to(device)
            run = torch.compile(model, mode="reduce-overhead")  # CUDA graphs; compiles on the first call
            cells, error = measure_cells(result, batches, measure(run, warmup=3), compile_cell_s, oom, scales=False)
        except Exception as e:  # torch.compile itself refusing (an unsupported Python, say)
            cells, error = [], reason(e)
        finally:
            del model, run
            try:
                torch._dynamo.reset()
            except Exception:  # noqa: S110  resetting is best effort: the next model compiles anew either way
                pass
            release()
        if error and not any(c.endswith("/s") for c in cells):
            failed = arch
            result.add("models", f"{arch} compile", None, "not run", f"torch.compile failed: {error}")
            continue
        _left_out(result, f"{arch} compile", cells)
        result.add("models", f"{arch} compile", None, ", ".join(cells),
                   error or f"images/s at {size}x{size}, CUDA graphs")


# --------------------------------------------------------------------------------------- 7. decode
DECODE_IMAGES = 6  # camera-like JPEGs in the set: one batch (two progressive, three with EXIF orientation)
DECODE_SIZE = (4000, 3000)  # 12 Mpx, width x height
DECODE_QUALITIES = (85, 90, 95)
DECODE_CROP = 256
DECODE_ROW_S = 1.5  # seconds of repeats per throughput row (after one warm-up batch)


def nvimgcodec_missing() -> str | None:
    """None when nvImageCodec can be imported, else the skip reason (and how to install it)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("nvidia.nvimgcodec") is not None
    except (ImportError, ValueError):  # no 'nvidia' namespace at all
        found = False
    if found:
        return None
    from ferret_runtime.decode.gpu import PIN

    return f"nvImageCodec is not installed: pip install 'ferretnet-deploy[gpu-decode]' ({PIN})"


def _camera_jpeg(i: int, seed: int, size: tuple[int, int], quality: int) -> bytes:
    """One camera-like JPEG: smooth colour fields (a bicubic-upsampled coarse grid), edges, sensor
    noise; 4:2:0 at ``quality``. Deterministic in (i, seed)."""
    import io

    import numpy as np
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed * 1000 + i)
    coarse = Image.fromarray(rng.integers(0, 256, (h // 64 + 2, w // 64 + 2, 3), dtype=np.uint8))
    base = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.int16)
    base[h // 3:h // 3 + h // 50] //= 2  # a hard edge, as in a photo
    noisy = np.clip(base + rng.integers(-6, 7, (h, w, 3), dtype=np.int16), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, "JPEG", quality=quality, subsampling=2)  # 2: 4:2:0
    return buf.getvalue()


def camera_jpegs(n: int = DECODE_IMAGES, seed: int = 0, size: tuple[int, int] = DECODE_SIZE,
                 qualities: tuple[int, ...] = DECODE_QUALITIES) -> list[bytes]:
    """The decode section's JPEG set, made on every core: ferret_export.bench.workload's camera set
    (12 Mpx, 4:2:0, q85-95, every third progressive, EXIF orientation on every other) where it is here,
    else made here with Pillow (baseline JPEGs only; ``seed``, ``size`` and ``qualities`` apply to these)."""
    try:
        from ferret_export.bench.workload import make_file

        def make(i: int) -> bytes:
            return make_file("camera", i)[1]
    except ImportError:
        def make(i: int) -> bytes:
            return _camera_jpeg(i, seed, size, qualities[i % len(qualities)])
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(make, range(n)))


def _reference_jpegs() -> list[bytes]:
    """The authors' reference images re-encoded as JPEG (q90, 4:2:0), where the material is here: their
    logits sit on both sides of the threshold, so a flip there is a decision that changed."""
    import io

    from PIL import Image

    out = []
    for p in sorted((REFERENCE / "images").glob("*.png")) if (REFERENCE / "images").is_dir() else []:
        buf = io.BytesIO()
        with Image.open(p) as im:
            im.convert("RGB").save(buf, "JPEG", quality=90, subsampling=2)
        out.append(buf.getvalue())
    return out


def _per_second(fn: Callable[[], Any], n: int, budget_s: float) -> float:
    """Images/s of ``fn`` (a whole batch of n, synchronised): one warm-up call, then repeats for budget_s."""
    fn()
    t0, done = time.perf_counter(), 0
    while True:
        fn()
        done += n
        if time.perf_counter() - t0 >= budget_s:
            return done / (time.perf_counter() - t0)


def check_decode(result: Result) -> None:
    """GPU JPEG decoding (nvImageCodec) vs the CPU's: throughput, the bad-image isolation, and parity."""
    why = nvimgcodec_missing()
    if why:
        result.add("decode", "gpu decode", None, "skipped", why)
        return
    import numpy as np

    from ferret_runtime import cuda
    from ferret_runtime.decode import gpu, load_prepared
    from ferret_runtime.errors import FerretError
    from ferret_runtime.preprocess import Preprocess

    pre, size = Preprocess(crop=DECODE_CROP), DECODE_CROP
    t0 = time.perf_counter()
    jpegs = camera_jpegs()
    result.add("decode", "jpeg set", None, f"{len(jpegs)} camera-like JPEGs, "
               f"{sum(map(len, jpegs)) / len(jpegs) / 1e6:.1f} MB each", f"made in {time.perf_counter() - t0:.1f} s")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        def cpu_batch(region: bool) -> np.ndarray:
            return np.stack(list(pool.map(lambda b: load_prepared(b, pre, region=region), jpegs)))

        cpu_crops = cpu_batch(False)  # Pillow's full decode, then the crop: the reference pixels
        for region, what in ((False, "full decode, then crop"), (True, "region decode where it can")):
            rate = _per_second(lambda region=region: cpu_batch(region), len(jpegs), DECODE_ROW_S)
            result.add("decode", f"cpu decode ({'region' if region else 'full'})", None, f"{rate:,.1f} img/s",
                       f"{os.cpu_count()} threads, load_prepared: {what}, crop {size}")
    decoders: dict[str, Any] = {}
    for backend in ("auto", "cuda"):  # auto: the hardware engine first, nvJPEG CUDA for what it cannot take
        try:
            decoders[backend] = gpu.GpuDecoder(size, backend=backend)
        except FerretError as e:
            result.add("decode", f"gpu-{backend}", None, "not available", str(e))
    if not decoders:
        return
    bad = [jpegs[0][:len(jpegs[0]) // 2], b"not a jpeg"]  # truncated (its header parses), garbage
    ref = _reference_jpegs()
    with cuda.Context(0) as ctx, cuda.Stream(ctx) as stream, \
            cuda.DeviceBuffer(max(len(jpegs), len(ref)) * size * size * 3, ctx) as d_u8:
        def gpu_batch(dec: Any, data: list[bytes] = jpegs) -> list[Any]:
            got = dec.decode(data, stream=stream.handle)
            gpu.assemble(got, size, d_u8.ptr, stream)
            stream.synchronize()
            return got

        for name, dec in list(decoders.items()):
            if result.left() < 3 * DECODE_ROW_S:
                result.cut.append(f"decode gpu-{name}")
                continue
            got = gpu_batch(dec)
            errors = [str(g) for g in got if isinstance(g, Exception)]
            if errors:  # none decoded: no such engine here (an 'hw' decoder on a GPU without one)
                result.add("decode", f"gpu-{name} decode", None if len(errors) == len(got) else False,
                           f"{len(errors)} of {len(got)} failed", errors[0])
                if len(errors) == len(got):
                    decoders.pop(name)
                continue
            gpu_crops = gpu.assemble_host(got, size)
            diff = np.abs(gpu_crops.astype(np.int16) - cpu_crops.astype(np.int16))
            rate = _per_second(lambda dec=dec: gpu_batch(dec), len(jpegs), DECODE_ROW_S)
            result.add("decode", f"gpu-{name} decode (roi)", None, f"{rate:,.1f} img/s",
                       f"max |d pixel| {int(diff.max())}, {float((diff > 0).mean()):.1%} of values differ")
            full = gpu.GpuDecoder(size, backend=name, region=False)
            rate = _per_second(lambda full=full: gpu_batch(full), len(jpegs), DECODE_ROW_S)
            roi_same = bool(np.array_equal(gpu.assemble_host(gpu_batch(full), size), gpu_crops))
            result.add("decode", f"gpu-{name} decode (full)", None, f"{rate:,.1f} img/s",
                       f"roi == crop of the full decode: {'yes' if roi_same else 'no'}")
            mixed = dec.decode([jpegs[0], *bad, jpegs[1]], stream=stream.handle)
            stream.synchronize()
            good = [m for i, m in enumerate(mixed) if i in (0, 3)]
            alone = isinstance(mixed[2], FerretError) and all(
                isinstance(m, gpu.Decoded) and np.array_equal(m.window_pixels(), gpu_crops[j])
                for m, j in zip(good, (0, 1)))
            cut = "an error" if isinstance(mixed[1], FerretError) else "decoded (nvJPEG fills the rest)"
            result.add("decode", f"gpu-{name} bad jpeg fails alone", alone, "garbage and a truncated JPEG in 4",
                       f"the good two intact; the truncated one: {cut}")
        _decode_model_rows(result, decoders, jpegs, ref, cpu_crops, gpu_batch, d_u8.ptr)


def _decode_model_rows(result: Result, decoders: dict[str, Any], jpegs: list[bytes], ref: list[bytes],
                       cpu_crops: Any, gpu_batch: Callable[..., list[Any]], d_u8: int) -> None:
    """decode + preprocess_lpd + FerretNet-S (the authors' weights where here, else seeded): img/s, CPU
    decode vs GPU decode, and the decision parity of the two decodes' logits."""
    import numpy as np
    import torch

    from ferret_runtime.decode import gpu, load_prepared
    from ferret_runtime.kernels import launch
    from ferret_runtime.preprocess import Preprocess

    if result.left() < 4 * DECODE_ROW_S:
        result.cut.append("decode + model")
        return
    ckpt = REFERENCE / "ferretnet-s-median-3.pth"
    if ckpt.is_file():
        from ferret_train.checkpoint import load_checkpoint

        model, weights = load_checkpoint(ckpt).model, "the authors' FerretNet-S"
    else:
        from ferret_train import create_model

        torch.manual_seed(0)
        model, weights = create_model("ferretnet-s").eval(), "FerretNet-S, seeded weights"
    model = model.cuda()
    size, module = DECODE_CROP, launch.get_module(0)
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def logits(ptr: int, n: int) -> np.ndarray:  # uint8 NHWC at ptr -> preprocess_lpd -> the CNN (LPD done)
        x = torch.empty((n, 3, size, size), dtype=torch.float32, device="cuda")
        launch.preprocess_lpd(module, ptr, x.data_ptr(), (n, size, size, 3), torch.float32,
                              stream=torch.cuda.current_stream().cuda_stream)
        with torch.inference_mode():
            y = model.feature(model.cbr2(model.cbr1(x)))
            out = model.logit(torch.flatten(model.avg_pool(y), 1))
        return out.float().reshape(-1).cpu().numpy()

    def from_host(crops: np.ndarray) -> np.ndarray:
        dev = torch.from_numpy(np.ascontiguousarray(crops)).cuda()
        return logits(dev.data_ptr(), len(crops))

    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    try:
        pre = Preprocess(crop=size)
        ref_cpu = (np.stack([load_prepared(b, pre, region=False) for b in ref]) if ref
                   else np.zeros((0, size, size, 3), np.uint8))
        cpu_px = np.concatenate([cpu_crops, ref_cpu])
        cpu_logits = np.concatenate([from_host(cpu_crops), from_host(ref_cpu) if ref else np.zeros(0)])
        rate = _per_second(lambda: from_host(np.stack(list(pool.map(lambda b: load_prepared(b, pre), jpegs)))),
                           len(jpegs), DECODE_ROW_S)
        result.add("decode", "cpu decode + model", None, f"{rate:,.1f} img/s",
                   f"{weights}, {os.cpu_count()} threads decoding")
        best = None
        for name, dec in decoders.items():
            if result.left() < 2 * DECODE_ROW_S:
                result.cut.append(f"decode + model gpu-{name}")
                continue

            def run(dec: Any = dec, data: list[bytes] = jpegs) -> tuple[np.ndarray, list[Any]]:
                got = gpu_batch(dec, data)
                return logits(d_u8, len(data)), got

            rate = _per_second(run, len(jpegs), DECODE_ROW_S)
            result.add("decode", f"gpu-{name} decode + model", None, f"{rate:,.1f} img/s", weights)
            gpu_logits, got = run()
            gpu_px = [gpu.assemble_host(got, size)]
            if ref:
                ref_logits, ref_got = run(dec, ref)
                gpu_logits = np.concatenate([gpu_logits, ref_logits])
                gpu_px.append(gpu.assemble_host(ref_got, size))
            parity = gpu.decision_parity(cpu_logits, gpu_logits, 0.5, cpu_px, np.concatenate(gpu_px))
            result.env.setdefault("decode_parity", {})[name] = {**parity.__dict__, "ok": parity.ok}
            result.add("decode", f"gpu-{name} decision parity", None, parity.summary(),
                       f"{len(jpegs)} camera + {len(ref)} reference JPEGs; GPU decode "
                       f"{'may be the default' if parity.ok else 'stays an option'}")
            best = parity if best is None or (parity.ok and not best.ok) else best
        result.env["decode_default"] = gpu.default_decode(best)
    finally:
        pool.shutdown()
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------- 8. backends
def check_backends(result: Result) -> None:
    """ONNX Runtime CUDA and TensorRT, where installed: build, parity with the reference logits, FPS."""
    import importlib.util
    import tempfile

    have_ort = importlib.util.find_spec("onnxruntime") is not None
    if have_ort:
        import onnxruntime as ort

        have_ort = "CUDAExecutionProvider" in ort.get_available_providers()
        result.add("backends", "onnxruntime-gpu", None,
                   f"{ort.__version__}, CUDA provider {'yes' if have_ort else 'no'}")
    else:
        result.add("backends", "onnxruntime-gpu", None, "not installed")
    have_trt = importlib.util.find_spec("tensorrt") is not None
    result.add("backends", "tensorrt", None, __import__("tensorrt").__version__ if have_trt else "not installed")
    if not (have_ort or have_trt):
        return
    if importlib.util.find_spec("onnx") is None:
        result.add("backends", "export", None, "skipped", "exporting the model to ONNX needs the onnx package")
        return
    with tempfile.TemporaryDirectory(prefix="ferret-gpu-check-") as tmp:
        weights = _backend_weights(Path(tmp))
        authors = weights == REFERENCE / "ferretnet-s-median-3.pth"  # parity with the original logits only then
        if have_ort:
            from ferret_export.onnx.export import export_onnx
            from ferret_export.onnx.graph import GraphOptions

            onnx_path = Path(tmp) / "s.onnx"
            export_onnx(weights, onnx_path, GraphOptions(input_size=256), run_verify=False, log=lambda *_: None)
            _backend_rows(result, "onnxruntime-cuda", onnx_path, 1e-4, authors)
        if have_trt:
            from ferret_export.tensorrt.build import export_and_build

            for precision, tol in (("fp32", 1e-3), ("fp16", 5e-2)):
                if result.left() < TRT_BUILD_S:
                    result.add("backends", f"tensorrt {precision}", None, "not run",
                               f"{max(result.left(), 0):.0f} s left; a build may take {TRT_BUILD_S:.0f} s")
                    result.cut.append(f"tensorrt {precision}")
                    continue
                engine = Path(tmp) / f"s-{precision}.engine"
                t0 = time.perf_counter()
                export_and_build(weights, engine, precision=precision, batch=(1, 32, 64), log=lambda *_: None)
                result.add("backends", f"tensorrt {precision} build (verified)", True,
                           f"{time.perf_counter() - t0:.0f} s")
                _backend_rows(result, f"tensorrt-{precision}", engine, tol, authors)


def _backend_weights(tmp: Path) -> Path:
    """The authors' checkpoint when the reference material is here (parity is then checked), else
    FerretNet-S with seeded random weights (speed only)."""
    ckpt = REFERENCE / "ferretnet-s-median-3.pth"
    if ckpt.is_file():
        return ckpt
    import torch

    from ferret_train import create_model
    from ferret_train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(tmp / "s.pth", create_model("ferretnet-s").eval())


def _backend_rows(result: Result, name: str, model: Path, tol: float, authors: bool) -> None:
    """Reference logits through the whole Detector (GPU preprocessing included), then images/s of
    the backend alone with its slots kept busy."""
    import numpy as np

    from ferret_export.bench.runners import steady_state
    from ferret_runtime import Detector

    with Detector.open(model, device="cuda", crop=256) as det:
        if authors:
            ref = json.loads((REFERENCE / "reference_logits.json").read_text())["images"]
            got = det.predict([REFERENCE / "images" / n for n in sorted(ref)])
            worst = max(abs(r.logit - ref[n]["logit_center_crop_256"]) for n, r in zip(sorted(ref), got))
            result.add("backends", f"{name} reference logits", worst <= tol, f"max |diff| {worst:.2e}", f"<= {tol:g}")
        be, pre = det.backend, det.backend.info.preprocess
        cells = []
        for b in (1, 32, 64):
            if be.max_batch is not None and b > be.max_batch:
                continue
            if result.left() < 3:
                cells.append(f"b{b} -")
                result.cut.append(f"{name} b{b}")
                continue
            shape = (b, 256, 256, 3) if pre.layout == "NHWC" else (b, 3, 256, 256)
            x = (np.random.default_rng(0).integers(0, 256, shape).astype(pre.dtype) if pre.dtype == "uint8"
                 else np.random.default_rng(0).standard_normal(shape).astype(pre.dtype))
            call, per_call = steady_state(be, x)
            call()
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < 2.0:
                call()
                n += per_call
            cells.append(f"b{b} {n / (time.perf_counter() - t0):,.0f}/s")
        result.add("backends", f"{name} throughput", None, ", ".join(cells), "images/s, host to logits, slots busy")


# --------------------------------------------------------------------------------------- 9. pytest
# The gpu tests from the checkout: addopts replaced (pyproject's --benchmark-disable needs pytest-benchmark,
# which a bare image lacks), a test module whose optional package is missing skipped with that reason.
PYTEST_ARGS = ("-q", "-m", "gpu", "-p", "no:cacheprovider", "-p", "benchmarks.gpu_check_pytest", "-o", "addopts=-ra",
               "tests")


def pytest_row(output: str, returncode: int | None, timed_out: bool, timeout_s: float) -> tuple[bool | None, str, str]:
    """(ok, value, detail) of the pytest row from pytest's -q -ra output: the closing counts, and the
    failures' names or else the skip reasons. Stopped at the budget: the counts so far, FAIL only if one
    failed by then (else neither PASS nor FAIL)."""
    lines = output.strip().splitlines()
    failures = [ln.split(" - ")[0].split(" ", 1)[1] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    skips: Counter[str] = Counter()
    for ln in lines:
        m = re.match(r"SKIPPED \[(\d+)\] [^:]+(?::\d+)?: (.*)$", ln)
        if m:
            skips[m.group(2).strip()] += int(m.group(1))
    if timed_out:
        marks = Counter("".join(ln.split("[")[0].strip() for ln in lines
                                if re.fullmatch(r"[.sFExX]+\s*(\[\s*\d+%\])?", ln.strip())))
        bad = marks["F"] + marks["E"]
        so_far = f"{marks['.']} passed, {bad} failed, {marks['s']} skipped so far"
        return False if bad else None, f"stopped at the {timeout_s:.0f} s budget: {so_far}", "; ".join(failures[:3])
    closing = next((ln.strip("= ") for ln in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|deselected|"
                                                                           r"errors?)|no tests ran", ln)), "")
    value = closing or (lines[-1].strip() if lines else f"exit status {returncode}")
    if failures:
        detail = "failed: " + ", ".join(failures[:3]) + (f" and {len(failures) - 3} more" if len(failures) > 3 else "")
    else:
        detail = "; ".join(f"{n} skipped: {why}" for why, n in skips.most_common(2))
    return returncode in (0, 5), value, detail


def run_pytest(args: tuple[str, ...] | list[str], cwd: Path, timeout: float) -> tuple[str, int | None, bool]:
    """``python -m pytest *args`` in ``cwd``: (output, exit status, whether it was stopped at ``timeout``)."""
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"})
    try:
        output, _ = proc.communicate(timeout=timeout)
        return output, proc.returncode, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the CLI subprocesses some tests start go too
        output, _ = proc.communicate()
        return output, None, True


def check_pytest(result: Result) -> None:
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        result.add("pytest", "gpu tests", None, "skipped", "pytest not installed")
        return
    timeout = result.left()
    if timeout < PYTEST_MIN_S:
        result.add("pytest", "pytest -m gpu tests", None, "not run", f"{max(timeout, 0):.0f} s left in the budget")
        result.cut.append("pytest")
        return
    output, returncode, timed_out = run_pytest(PYTEST_ARGS, ROOT, timeout)
    if timed_out:
        result.cut.append("pytest (stopped)")
    ok, value, detail = pytest_row(output, returncode, timed_out, timeout)
    result.add("pytest", "pytest -m gpu tests", ok, value, detail)


SECTIONS: dict[str, Callable[[Result], None]] = {
    "env": check_env, "kernels": check_kernels, "preprocess": check_preprocess, "plugin": check_plugin,
    "torch": check_torch, "speed": check_speed, "decode": check_decode, "backends": check_backends,
    "pytest": check_pytest}


def writable(folder: Path) -> str | None:
    """None when ``folder`` is, or could be made, a writable folder; else why not. Creates nothing."""
    p = folder.absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return f"{p} is not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable"
    return None


def main(argv: list[str] | None = None) -> int:
    start = now()
    ap = argparse.ArgumentParser(description="FerretNet GPU check: correctness, then speed, in one run")
    ap.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run only these sections")
    ap.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help="folder for gpu-check.json and gpu-check.txt (default: benchmarks/results/<gpu-name>/, "
                         "or a temporary folder where the checkout cannot be written)")
    ap.add_argument("--budget", type=float, default=RUN_BUDGET_S, metavar="SECONDS",
                    help=f"the whole run's time (default {RUN_BUDGET_S:.0f}): speed, backends and pytest take what "
                         "the correctness sections leave")
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the speed section")
    args = ap.parse_args(argv)
    if not args.budget > 0:
        ap.error(f"--budget {args.budget:g}: expected a positive number of seconds")
    if args.out is not None and (why := writable(args.out)):
        ap.error(f"--out {args.out}: cannot write there ({why})")
    reason_ = no_gpu_reason()
    if reason_:
        print(reason_)
        return 2
    result = Result(deadline=start + args.budget)
    result.env["budget_s"] = args.budget
    names = args.only or list(SECTIONS)
    for i, name in enumerate(names):
        fn = SECTIONS[name]
        if name == "speed" and args.no_compile:
            fn = lambda r: check_speed(r, compile=False)  # noqa: E731
        section(result, name, fn, section_budget(name, names[i + 1:], result))
        if name == "env" and result.failed and result.env.get("gpu") is None:
            break
    result.env["total_s"] = round(now() - start, 1)
    print(format_table(result))
    out, note = args.out, ""
    if out is None:
        out = default_out(result.env.get("gpu", "gpu"))
        why = writable(out)
        if why:
            note = f" ({out} cannot be written: {why})"
            out = Path(tempfile.gettempdir()) / f"ferret-gpu-check-{slug(result.env.get('gpu', 'gpu'))}"
    try:
        json_path, table_path = write_report(result, out)
        print(f"written: {json_path} and {table_path.name}{note}")
    except OSError as e:  # the results are in the table above; a write that fails is no correctness failure
        print(f"not written: {out}: {e}")
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
