"""``ferret::lpd`` for TensorRT: a quickly deployable Python plugin (QDP) with an ahead-of-time kernel.

TensorRT's Python wheels ship no C++ headers, so the plugin is written with ``tensorrt.plugin``:
``@trtp.register`` describes the output (the input's shape and dtype), ``@trtp.autotune`` offers
float32 and float16 in the linear layout, and ``@trtp.aot_impl`` returns the kernel's name, its PTX
(lpd.cu compiled by NVRTC) and its launch: grid, block and shared memory as symbolic expressions
of the input shape, and the kernel's int arguments. TensorRT embeds all of it in the engine, so
the engine runs without this module, Python or a plugin library (``trtexec``, Triton, C++).

Two ops (the ONNX node's ``op_type``, namespace ``ferret``):

- ``lpd``: the reconstruction ``lpd(x)``, what ``onnx_graph.lpd_plugin_node`` emits (the graph
  subtracts it from ``x`` in a ``Sub`` node). Runs ``lpd_generic`` with ``residual = 0``.
- ``lpd_residual``: ``x - lpd(x)`` in the kernel (the fused ``lpd_residual`` kernel for the
  paper's median 3x3), for a graph that drops the ``Sub``.

TensorRT's AOT launch passes (inputs..., extra int32 arguments..., outputs...), while lpd.cu's
kernels take (x, out, sizes...), so ``TRT_ENTRY_SOURCE`` adds entry points with the output last,
compiled with lpd.cu in one PTX module.

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` checks the annotations of the
decorated functions as classes (``issubclass``), which string annotations would break.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferret_export.onnx.graph import PLUGIN_DOMAIN, PLUGIN_OP
from ferret_runtime.cuda import CudaError, driver_version
from ferret_runtime.errors import ConfigError
from ferret_runtime.kernels import cache_dir, read_source, source_hash, variant_id, write_atomic
from ferret_runtime.kernels.launch import MAX_GRID_YZ, launch_config, tile_shape
from ferret_runtime.kernels.nvrtc import (
    NVRTC_OPTIONS,
    check_nvrtc_driver,
    nvrtc_compile,
    nvrtc_version,
    selection_options,
)
from ferret_runtime.lpd_spec import check_window

PLUGIN_NAMESPACE = PLUGIN_DOMAIN
OPS: dict[str, bool] = {PLUGIN_OP: False, "lpd_residual": True}  # op name -> the output is the residual x - lpd(x)
ATTRIBUTES: tuple[str, ...] = ("func", "window_size")  # in register order; the AOT call passes them in node order
PLUGIN_CONTROL_ATTRS = ("plugin_namespace", "plugin_version", "aot")  # read by the parser, not passed to the plugin
# PTX for compute_75 (Turing, the oldest GPU TensorRT 10 supports): the driver compiles it for the GPU the
# engine loads on, so one PTX serves every GPU and --hardware-compat engines. lpd.cu's sm_80 instructions
# (cvt.rn.f16x2.f32, min/max.f16x2) are behind __CUDA_ARCH__ >= 800, so this PTX has their sm_75 fallback.
PTX_ARCH = 75
# The 3x3 kernels' __launch_bounds__ in the PTX: 6 blocks of 256 threads per SM, what every GPU from sm_80 runs
# (40 registers; lpd.cu's own sm_75 choice of 4 would let their JIT take 56 and lose a third of the warps).
# sm_75's JIT cannot meet 6 (1024 threads per SM), ignores it with a warning no one sees, and takes the
# registers it takes under 4 (at most 64: 4 blocks). tests/test_kernel_arch.py compiles this PTX for every GPU.
PTX_OPTIONS: tuple[str, ...] = ("-DFERRET_BLOCKS_PER_SM=6",)
TRT_PREFIX = "trt_"

TRT_ENTRY_SOURCE = r"""
// ---------------------------------------------------------------------------------------------
// TensorRT AOT plugin entry points (appended by ferret_export/trt_plugin.py): TensorRT passes
// (inputs..., extra int32 arguments..., outputs...), so these are the kernels above with `out` last.
// ---------------------------------------------------------------------------------------------
#ifdef __CUDACC__
#if !defined(FERRET_ONLY) || defined(FERRET_WANT_trt_lpd_residual_f32)
FERRET_KERNEL_3X3 trt_lpd_residual_f32(const float* x, int N, int C, int H, int W, float* out) {
    ferret_median_residual_kernel(x, out, N, C, H, W);
}
#endif
#if !defined(FERRET_ONLY) || defined(FERRET_WANT_trt_lpd_residual_f16)
FERRET_KERNEL_3X3 trt_lpd_residual_f16(const unsigned short* x, int N, int C, int H, int W, unsigned short* out) {
    ferret_median_residual_kernel(x, out, N, C, H, W);
}
#endif
#if !defined(FERRET_ONLY) || defined(FERRET_WANT_trt_lpd_generic_f32)
FERRET_KERNEL trt_lpd_generic_f32(const float* x, int N, int C, int H, int W, int k, int variant, int residual,
                                  float* out) {
    ferret_lpd_kernel(x, out, N, C, H, W, k, variant, residual);
}
#endif
#if !defined(FERRET_ONLY) || defined(FERRET_WANT_trt_lpd_generic_f16)
FERRET_KERNEL trt_lpd_generic_f16(const unsigned short* x, int N, int C, int H, int W, int k, int variant,
                                  int residual, unsigned short* out) {
    ferret_lpd_kernel(x, out, N, C, H, W, k, variant, residual);
}
#endif
#endif
"""
# Parameters of the entry points above, in order (a test compares them with the PTX NVRTC emits).
TRT_KERNEL_ARGS: dict[str, tuple[str, ...]] = {
    "trt_lpd_residual": ("ptr", "int", "int", "int", "int", "ptr"),  # x, N, C, H, W, out
    "trt_lpd_generic": ("ptr", *("int",) * 7, "ptr"),  # x, N, C, H, W, k, variant, residual, out
}


# ---------------------------------------------------------------------------------------------- launch
@dataclass(frozen=True)
class AotLaunch:
    """What ``aot_impl`` returns, before it becomes TensorRT objects; values may be symbolic."""

    kernel: str
    grid: tuple[Any, Any, Any]
    block: tuple[int, int, int]
    shared_mem: int
    extra_args: tuple[Any, ...]  # the int32 arguments between the input and the output pointer


def check_attributes(func: str, window_size: int) -> tuple[str, int]:
    """The node's attributes, validated as the kernels need them."""
    variant_id(func)  # ConfigError for unknown functions and 'origin'
    return func, check_window(int(window_size))


def aot_launch(shape: tuple[Any, Any, Any, Any], dtype: str, func: str, k: int, residual: bool, *,
               cdiv: Callable[[Any, int], Any], minimum: Callable[[Any, int], Any], arch: int = PTX_ARCH) -> AotLaunch:
    """The launch of ``ferret::lpd`` on an (N, C, H, W) input whose sizes may be symbolic.

    Mirrors ``launch.launch_config`` (the one place launch tuples are defined): the kernel name,
    block and shared memory do not depend on the shape, so they are taken from it directly; the
    grid is its formula written with ``cdiv``/``minimum`` (``trtp.cdiv``/``trtp.min`` for TensorRT's
    expressions, integer functions in tests, which compare the two for many shapes).
    """
    func, k = check_attributes(func, k)
    n, c, h, w = shape
    kernel = "lpd_residual" if residual and func == "median" and k == 3 else "lpd_generic"
    cfg = launch_config(kernel, (1, 1, 1, 1), dtype, arch, k)
    tile_w, tile_h = tile_shape(kernel, k)
    grid = (cdiv(w, tile_w), cdiv(h, tile_h), minimum(n * c, MAX_GRID_YZ))
    extra = (n, c, h, w) if kernel == "lpd_residual" else (n, c, h, w, k, variant_id(func), int(residual))
    return AotLaunch(TRT_PREFIX + cfg.name, grid, cfg.block, cfg.shared_mem_bytes, extra)


# ------------------------------------------------------------------------------------------------ PTX
def check_ptx_driver(nvrtc: tuple[int, int] | None = None) -> None:
    """Refuse to embed PTX this machine's driver could not JIT: one line naming both versions and the fix.
    Without a driver (a CPU-only build machine) there is nothing to compare; the sidecar records NVRTC's version."""
    try:
        driver = driver_version()
    except CudaError:
        return
    check_nvrtc_driver("ptx", nvrtc or nvrtc_version(), driver)


def compile_trt_ptx(arch: int = PTX_ARCH, cache: Path | None = None, kernels: tuple[str, ...] | None = None,
                    window: int = 0) -> bytes:
    """lpd.cu plus the TensorRT entry points, compiled by NVRTC to PTX for ``compute_{arch}``; cached on disk.

    ``kernels``/``window``: only those entry points, lpd_generic for one window (what one plugin node
    runs: a few tens of KB of PTX where every kernel for every window is over a megabyte).
    """
    major, minor = nvrtc_version()
    check_ptx_driver((major, minor))
    options = (*selection_options(kernels, window), *PTX_OPTIONS)
    key = source_hash(TRT_ENTRY_SOURCE, *NVRTC_OPTIONS, *options, f"nvrtc{major}.{minor}")
    what = "all" if kernels is None else "-".join(sorted(kernels)) + (f"-k{window}" if window else "")
    path = (cache or cache_dir()) / f"lpd-trt-{key}-compute{arch}-nvrtc{major}{minor}-{what}.ptx"
    if path.is_file():
        return path.read_bytes()
    entries = tuple(f"{base}_{s}" for base in TRT_KERNEL_ARGS for s in ("f32", "f16"))
    data = nvrtc_compile(read_source() + TRT_ENTRY_SOURCE, "lpd_trt.cu", f"compute_{arch}", "ptx",
                         f"lpd.cu with the TensorRT entry points (compute_{arch})",
                         (*selection_options(entries if kernels is None else kernels, window), *PTX_OPTIONS))
    data = data.rstrip(b"\0")  # TensorRT takes the PTX text; NVRTC's size counts the terminating NUL
    write_atomic(path, data)
    return data


@functools.cache
def _ptx(arch: int) -> bytes:
    """Every TensorRT entry point for every window (tests, gpu_check)."""
    return compile_trt_ptx(arch)


@functools.cache
def _entry_ptx(arch: int, kernel: str, window: int) -> bytes:
    """The PTX one plugin node embeds: its entry point alone, lpd_generic built for its window."""
    return compile_trt_ptx(arch, kernels=(kernel,), window=window if "generic" in kernel else 0)


# ---------------------------------------------------------------------------------------- registration
def _import_plugin_api() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except (ImportError, OSError) as e:
        raise ConfigError("TensorRT is not installed: pip install 'ferretnet-deploy[trt]' (pulls tensorrt-cu13 from "
                          f"NVIDIA's index) ({type(e).__name__}: {e})") from None
    if not hasattr(trtp, "aot_impl"):
        raise ConfigError(f"Received TensorRT {trt.__version__} without tensorrt.plugin.aot_impl; expected TensorRT "
                          "10.8 or newer for --lpd plugin (or build with --lpd portable)")
    return trt, trtp


def _registered(trtp: Any, op: str) -> bool:
    """Whether ``ferret::op`` is in tensorrt.plugin's registry (registering twice is an error there)."""
    try:
        return hasattr(getattr(trtp.op, PLUGIN_NAMESPACE), op)
    except AttributeError:  # no plugin in the namespace yet
        return False


def register_plugin() -> list[str]:
    """Register ``ferret::lpd`` and ``ferret::lpd_residual`` with TensorRT (idempotent); returns their ids.

    Needed while building an engine from a graph with the plugin node (the ONNX parser finds the
    plugin by op_type and the node's ``plugin_namespace``), never to run one.
    """
    trt, trtp = _import_plugin_api()
    for op, residual in OPS.items():
        if not _registered(trtp, op):
            _register(trt, trtp, op, residual)
    return [f"{PLUGIN_NAMESPACE}::{op}" for op in OPS]


def _register(trt: Any, trtp: Any, op: str, residual: bool) -> None:
    plugin_id = f"{PLUGIN_NAMESPACE}::{op}"

    @trtp.register(plugin_id)
    def describe(x: trtp.TensorDesc, func: str, window_size: int) -> trtp.TensorDesc:
        check_attributes(func, window_size)
        if x.ndim != 4:
            raise ConfigError(f"{plugin_id}: received an input of rank {x.ndim}; expected (N, C, H, W)")
        return x.like()  # same shape and dtype as the input

    @trtp.autotune(plugin_id)
    def formats(x: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
        # input and output share one dtype (fp32 or fp16), linear NCHW; one kernel, no custom tactics
        return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16", "LINEAR")]

    @trtp.aot_impl(plugin_id)
    def compiled(x: trtp.TensorDesc, func: str, window_size: int, outputs: tuple[trtp.TensorDesc], tactic: int
                 ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        dtype = "float16" if x.dtype == trt.float16 else "float32"
        launch = aot_launch(tuple(x.shape_expr), dtype, func, window_size, residual, cdiv=trtp.cdiv, minimum=trtp.min)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = launch.grid
        params.block_x, params.block_y, params.block_z = launch.block
        params.shared_mem = launch.shared_mem
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in launch.extra_args])  # SymInt32 each: required
        return launch.kernel, _entry_ptx(PTX_ARCH, launch.kernel, window_size), params, extra


def plugin_record() -> dict[str, Any]:
    """What an engine's sidecar says about the plugin it embeds."""
    try:
        nvrtc = "{}.{}".format(*nvrtc_version())
    except CudaError:
        nvrtc = None
    # PTX from NVRTC X.Y runs only on drivers for CUDA X.Y or newer: the engine's runtime checks this
    return {"id": f"{PLUGIN_NAMESPACE}::{PLUGIN_OP}", "implementation": "aot", "ptx_arch": PTX_ARCH,
            "kernel_source": source_hash(TRT_ENTRY_SOURCE), "ptx_nvrtc": nvrtc}
