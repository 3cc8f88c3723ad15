"""``make gpu-check``: the whole GPU story in one command, on a bare GPU machine.

Needs numpy, Pillow, PyYAML, a CUDA PyTorch, cuda-python (with NVRTC) and g++; installs nothing and
reaches no network. Sections, each a block of rows in the printed table and in
``benchmarks/results/<gpu-name>/gpu-check.json``:

1. env: GPU, driver and NVRTC versions, whether NVRTC is newer than the driver (PTX would not load);
2. kernels: every lpd.cu kernel bit-exact with the host build (g++): all variants, k = 3, 5, 7,
   residual and reconstruction, float32 equal and float16 equal to the host result rounded once;
   odd sizes, 1x1, more than 65,535 planes (grid-stride), more than 2^31 elements;
3. preprocess: normalize and preprocess_lpd exact; pinned -> device -> pinned on a non-blocking stream;
4. plugin: the TensorRT plugin's PTX JIT-loaded (cuModuleLoadData) and launched with TensorRT's
   argument order, equal to the runtime kernels;
5. torch: torch.ops.ferret.lpd on CUDA, and the authors' checkpoint through it: reference logits <= 1e-4;
6. speed: each kernel's bandwidth as % of a device-to-device copy of the same bytes (timed behind a
   queued delay, so launch overhead does not count); models in eager and torch.compile (CUDA graphs);
7. backends: ONNX Runtime (CUDA) and TensorRT rows when installed;
8. pytest: the ``gpu`` tests, when pytest is installed.

Exit status: 0 all correct, 1 any correctness failure, 2 no GPU (one line says why).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REFERENCE = Path(os.environ.get("FERRET_REFERENCE", ROOT.parent / "shared" / "reference"))
FUNCS = ("median", "excmed", "retmed", "min", "max", "avg")
BATCHES = (1, 8, 32, 64, 128, 256)
MODELS = ("ferretnet-s", "ferretnet-b", "npr", "cnndetection", "freqnet", "safe")


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

    def add(self, section: str, name: str, ok: bool | None, value: str = "", detail: str = "") -> None:
        self.rows.append(Row(section, name, ok, value, detail))

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.ok is False]


# ---------------------------------------------------------------------------------------------- report
def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the results folder)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def format_table(result: Result) -> str:
    """One table: section, check, PASS/FAIL/'' and the value."""
    width = max([len(r.name) for r in result.rows] + [10])
    lines = [f"{'section':10s} {'check':{width}s} {'result':6s} value"]
    for r in result.rows:
        mark = {True: "PASS", False: "FAIL", None: ""}[r.ok]
        lines.append(f"{r.section:10s} {r.name:{width}s} {mark:6s} {r.value}" + (f"  ({r.detail})" if r.detail else ""))
    failed = len(result.failed)
    lines.append(f"{'summary':10s} {'correctness':{width}s} {'FAIL' if failed else 'PASS':6s} "
                 f"{failed} failed of {sum(r.ok is not None for r in result.rows)} checks")
    return "\n".join(lines)


def write_report(result: Result, root: Path = RESULTS) -> Path:
    """``<root>/<gpu-name>/gpu-check.json``: the environment and every row."""
    out = root / slug(result.env.get("gpu", "gpu")) / "gpu-check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"env": result.env, "failed": len(result.failed), "rows": [asdict(r) for r in result.rows]}
    out.write_text(json.dumps(data, indent=1) + "\n")
    return out


def no_gpu_reason() -> str | None:
    """None when the CUDA driver sees a GPU, else the one line saying why not."""
    try:
        from ferret_runtime import cuda

        count = cuda.device_count()
    except Exception as e:  # CudaError: no cuda-python, no driver, no device
        return f"gpu-check: no GPU: {str(e).splitlines()[0]}"
    return None if count > 0 else "gpu-check: no GPU: the CUDA driver sees 0 devices"


def section(result: Result, name: str, fn: Callable[[Result], None]) -> None:
    """Run one section; an exception is a failed row with its last line, not the end of the run."""
    start = time.perf_counter()
    try:
        fn(result)
    except Exception as e:
        tb = traceback.format_exc().strip().splitlines()
        result.add(name, "section raised", False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                   tb[-3].strip() if len(tb) > 2 else "")
    result.env.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)


# ------------------------------------------------------------------------------------------ 1. env
def check_env(result: Result) -> None:
    import torch

    from ferret_runtime import cuda
    from ferret_runtime.kernels import launch

    info = cuda.device_info(0)
    nvrtc, driver = launch.nvrtc_version(), launch.driver_version()
    result.env.update(gpu=info.name, sm=info.sm, memory_gb=round(info.total_memory / 2**30, 1),
                      driver_cuda="%d.%d" % driver, nvrtc="%d.%d" % nvrtc, torch=torch.__version__,
                      torch_cuda=torch.version.cuda, python=platform.python_version())
    result.add("env", "gpu", None, f"{info.name} (sm_{info.sm.replace('.', '')}, {info.total_memory / 2**30:.0f} GiB)")
    result.add("env", "driver / nvrtc", None, f"CUDA {driver[0]}.{driver[1]} / NVRTC {nvrtc[0]}.{nvrtc[1]}")
    try:
        launch.check_nvrtc_driver("ptx", nvrtc, driver)
        result.add("env", "nvrtc <= driver (PTX loads)", True, "yes")
    except launch.CudaError as e:  # the runtime's CUBINs still load; the plugin's PTX would not
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


def check_kernels(result: Result) -> None:
    import numpy as np
    import torch

    from ferret_runtime.kernels import host

    shapes = [(1, 1, 1, 1), (2, 3, 3, 5), (1, 3, 67, 129), (3, 3, 257, 511)]
    for func in FUNCS:
        for k in (3, 5, 7):
            bad = []
            for shape in shapes:
                x = _input(shape, k)
                for residual in (True, False):
                    want = (host.lpd_residual_host if residual else host.lpd_reconstruct_host)(x, func, k)
                    got = _lpd_gpu(torch.from_numpy(x).cuda(), func, k, residual).cpu().numpy()
                    if not np.array_equal(got, want):
                        bad.append(f"f32 {shape} residual={residual}")
                    x16 = x.astype(np.float16)
                    want16 = (host.lpd_residual_host if residual else host.lpd_reconstruct_host)(
                        x16.astype(np.float32), func, k).astype(np.float16)
                    got16 = _lpd_gpu(torch.from_numpy(x16).cuda(), func, k, residual).cpu().numpy()
                    if not np.array_equal(got16, want16):
                        bad.append(f"f16 {shape} residual={residual}")
            result.add("kernels", f"{func} k={k}", not bad, f"{len(shapes) * 4} cases", "; ".join(bad[:3]))
    # more planes than gridDim.z (65,535): the grid-stride loop
    x = _input((70000, 1, 5, 7), 1)
    for func, k in (("median", 3), ("excmed", 5)):
        got = _lpd_gpu(torch.from_numpy(x).cuda(), func, k, True).cpu().numpy()
        result.add("kernels", f"70000 planes {func} k={k}", bool(np.array_equal(got, host.lpd_residual_host(x, func, k))))
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
    result.add("kernels", "> 2^31 elements (f16)", bool(np.array_equal(got, want)), f"{n:,} elements")
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
                ok &= bool(np.array_equal(out.cpu().numpy(), want.astype(np.float16 if dtype == torch.float16 else np.float32)))
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
    result.add("preprocess", "pinned -> device -> pinned, our stream", bool(np.array_equal(got, normalize(images))))


# --------------------------------------------------------------------------------------- 4. plugin
def check_plugin(result: Result) -> None:
    import ctypes

    import torch
    from cuda.bindings import driver as drv

    from ferret_export import trt_plugin
    from ferret_runtime.kernels import launch
    from ferret_runtime.kernels.launch import _call

    ptx = trt_plugin.compile_trt_ptx()  # refused in one line when NVRTC is newer than the driver
    result.add("plugin", "PTX size (all entries)", None, f"{len(ptx) / 1e3:.0f} KB")
    module = launch.get_module(0)
    with module.current():
        mod = _call("cuModuleLoadData", drv.cuModuleLoadData, ptx + b"\0")  # JIT by the driver, as TensorRT does
        try:
            for func, k, residual in (("median", 3, True), ("median", 3, False), ("excmed", 5, False), ("max", 7, True)):
                for dtype in (torch.float32, torch.float16):
                    x = torch.from_numpy(_input((2, 3, 67, 129), k)).to(dtype).cuda()
                    op = "lpd_residual" if residual and func == "median" else "lpd"
                    got = trt_plugin.aot_launch(tuple(x.shape), str(dtype).removeprefix("torch."), func, k,
                                                trt_plugin.OPS[op], cdiv=lambda a, b: -(-a // b), minimum=min)
                    out = torch.empty_like(x)
                    fn = _call("cuModuleGetFunction", drv.cuModuleGetFunction, mod, got.kernel.encode())
                    values = [ctypes.c_void_p(x.data_ptr()), *map(ctypes.c_int, got.extra_args),
                              ctypes.c_void_p(out.data_ptr())]  # TensorRT's order: inputs, extra ints, outputs
                    params = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
                    torch.cuda.synchronize()
                    _call("cuLaunchKernel", drv.cuLaunchKernel, fn, *got.grid, *got.block, got.shared_mem,
                          drv.CUstream(torch.cuda.current_stream().cuda_stream), ctypes.addressof(params), 0)
                    torch.cuda.synchronize()
                    want = _lpd_gpu(x, func, k, residual)
                    result.add("plugin", f"{got.kernel} {func} k={k}", bool(torch.equal(out, want)), "== runtime kernel")
        finally:
            _call("cuModuleUnload", drv.cuModuleUnload, mod)


# ---------------------------------------------------------------------------------------- 5. torch
def check_torch(result: Result) -> None:
    import numpy as np
    import torch

    from ferret_runtime.kernels import host
    from ferret_train.layers import lpd  # noqa: F401  registers torch.ops.ferret.lpd

    x = torch.from_numpy(_input((4, 3, 61, 77), 5))
    for func in FUNCS:
        for k in (3, 5, 7):
            got = torch.ops.ferret.lpd(x.cuda(), func, k).cpu().numpy()
            ok = bool(np.array_equal(got, host.lpd_reconstruct_host(x.numpy(), func, k)))
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
def _timed(fn: Callable[[], Any], iters: int = 20) -> float:
    """Milliseconds per call from CUDA events, the calls queued behind a GPU-side delay so the host's
    launch overhead overlaps the delay instead of being timed."""
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(50_000_000)  # ~25 ms of GPU time: the launches below queue up meanwhile
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def check_speed(result: Result) -> None:
    import torch

    from ferret_runtime.kernels import launch
    from ferret_runtime.preprocess import MEAN, STD

    module, stream = launch.get_module(0), torch.cuda.current_stream().cuda_stream
    for dtype in (torch.float32, torch.float16):
        x = torch.randn((256, 3, 256, 256), device="cuda", dtype=dtype)
        out = torch.empty_like(x)
        copy_ms = _timed(lambda: out.copy_(x))
        for name, func, k, residual in (("lpd_residual", "median", 3, True), ("lpd_generic k3", "median", 3, False),
                                        ("lpd_generic k5", "median", 5, False), ("lpd_generic k7", "median", 7, False)):
            ms = _timed(lambda: launch.lpd(module, x.data_ptr(), out.data_ptr(), tuple(x.shape), dtype, func, k,
                                           residual, stream=stream))
            gbs = 2 * x.numel() * x.element_size() / ms / 1e6
            result.add("speed", f"{name} {str(dtype)[6:]}", None, f"{gbs:,.0f} GB/s, {copy_ms / ms:.0%} of a copy")
        images = torch.randint(0, 256, (256, 256, 256, 3), dtype=torch.uint8, device="cuda")
        moved = images.numel() * (1 + x.element_size())  # uint8 read once, the output written once
        src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        copy_ms = _timed(lambda: dst.copy_(src))  # reads and writes `moved` bytes in all
        for kernel in ("normalize", "preprocess_lpd"):
            ms = _timed(lambda: getattr(launch, kernel)(module, images.data_ptr(), out.data_ptr(), tuple(images.shape),
                                                        dtype, MEAN, STD, stream=stream))
            result.add("speed", f"{kernel} {str(dtype)[6:]}", None,
                       f"{moved / ms / 1e6:,.0f} GB/s, {copy_ms / ms:.0%} of a copy of {moved / 2 / 1e6:.0f} MB")
        del x, out, images, src, dst
    torch.cuda.empty_cache()
    check_models(result)


def check_models(result: Result, batches: tuple[int, ...] = BATCHES, budget_s: float = 120.0) -> None:
    import torch

    from ferret_train import create_model

    start = time.perf_counter()
    for arch in MODELS:
        model = create_model(arch).eval().cuda()
        for mode in ("eager", "compile"):
            run = model if mode == "eager" else torch.compile(model, mode="reduce-overhead")  # CUDA graphs
            cells = []
            for b in batches:
                if time.perf_counter() - start > budget_s:
                    cells.append(f"b{b} -")
                    continue
                x = torch.randn((b, 3, 256, 256), device="cuda")
                with torch.inference_mode():
                    try:
                        ms = _timed(lambda: run(x), iters=5)
                        cells.append(f"b{b} {b / ms * 1e3:,.0f}/s")
                    except torch.cuda.OutOfMemoryError:
                        cells.append(f"b{b} OOM")
                        torch.cuda.empty_cache()
            result.add("models", f"{arch} {mode}", None, ", ".join(cells), "images/s at 256x256")
        del model
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------- 7. backends
def check_backends(result: Result) -> None:
    """ONNX Runtime CUDA and TensorRT, where installed: build, parity with the reference logits, FPS."""
    import importlib.util
    import tempfile

    have_ort = importlib.util.find_spec("onnxruntime") is not None
    if have_ort:
        import onnxruntime as ort

        have_ort = "CUDAExecutionProvider" in ort.get_available_providers()
        result.add("backends", "onnxruntime-gpu", None, f"{ort.__version__}, CUDA provider {'yes' if have_ort else 'no'}")
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
            from ferret_export.onnx_export import export_onnx
            from ferret_export.onnx_graph import GraphOptions

            onnx_path = Path(tmp) / "s.onnx"
            export_onnx(weights, onnx_path, GraphOptions(input_size=256), run_verify=False, log=lambda *_: None)
            _backend_rows(result, "onnxruntime-cuda", onnx_path, 1e-4, authors)
        if have_trt:
            from ferret_export.tensorrt import export_and_build

            for precision, tol in (("fp32", 1e-3), ("fp16", 5e-2)):
                engine = Path(tmp) / f"s-{precision}.engine"
                t0 = time.perf_counter()
                export_and_build(weights, engine, precision=precision, batch=(1, 32, 64), log=lambda *_: None)
                result.add("backends", f"tensorrt {precision} build (verified)", True, f"{time.perf_counter() - t0:.0f} s")
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

    from ferret_export.bench_runners import steady_state
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


# --------------------------------------------------------------------------------------- 8. pytest
def check_pytest(result: Result) -> None:
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        result.add("pytest", "gpu tests", None, "skipped", "pytest not installed")
        return
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    result.add("pytest", "pytest -m gpu tests", proc.returncode in (0, 5), tail)


SECTIONS: dict[str, Callable[[Result], None]] = {
    "env": check_env, "kernels": check_kernels, "preprocess": check_preprocess, "plugin": check_plugin,
    "torch": check_torch, "speed": check_speed, "backends": check_backends, "pytest": check_pytest}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="FerretNet GPU check: correctness, then speed, in one run")
    ap.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run only these sections")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results root (default benchmarks/results)")
    args = ap.parse_args(argv)
    reason = no_gpu_reason()
    if reason:
        print(reason)
        return 2
    result = Result()
    for name in args.only or SECTIONS:
        section(result, name, SECTIONS[name])
        if name == "env" and result.failed and result.env.get("gpu") is None:
            break
    print(format_table(result))
    print(f"written: {write_report(result, args.out)}")
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
