"""Launching lpd.cu on a GPU: launch tuples, and the module in a device's context (the driver API).

Torch-free: tensors travel as device pointers (ints) and streams as ``CUstream`` handles (ints), so
PyTorch (``tensor.data_ptr()``, ``torch.cuda.current_stream().cuda_stream``) and any other CUDA
library can call in. cuda-python is imported on first use (the ``gpu`` extra); every driver or
NVRTC status other than success becomes a ``CudaError`` naming the call.
"""

from __future__ import annotations

import ctypes
import functools
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cuda import CudaError, bindings, call, driver_version, parse_arch
from ..errors import ConfigError
from ..lpd_spec import check_window
from ..preprocess import MEAN, STD
from . import variant_id
from .nvrtc import CompiledModule, check_arch, check_nvrtc_driver, compile_lpd, nvrtc_version

# Must agree with lpd.cu (a test parses FERRET_ROWS_PER_THREAD, FERRET_MAX_THREADS and FERRET_RES_* there).
BLOCK: tuple[int, int, int] = (32, 8, 1)  # lpd_generic: a warp per row, coalesced loads and stores
ROWS_PER_THREAD = 2  # lpd_generic: each thread writes 2 rows, so a block covers a 32 x 16 tile
BLOCK_3X3: tuple[int, int, int] = (32, 8, 1)  # lpd_residual, preprocess_lpd: compile-time in lpd.cu
ROWS_3X3 = 8  # each thread slides down 8 rows of its column: a block covers a 32 x 64 tile
NORM_THREADS, NORM_PIXELS = 256, 4  # normalize: 256 threads of 4 consecutive pixels each
MAX_THREADS = 256  # __launch_bounds__
MAX_GRID_YZ = 65535  # gridDim.y and gridDim.z limits; planes beyond gridDim.z are a grid-stride loop
MAX_INT = 2**31 - 1  # the kernels take int sizes

KERNELS: tuple[str, ...] = ("lpd_residual", "lpd_generic", "preprocess_lpd", "normalize")
NHWC_KERNELS: tuple[str, ...] = ("preprocess_lpd", "normalize")  # uint8 (N, H, W, 3) in, NCHW out
DTYPE_SUFFIX: dict[str, str] = {"float32": "f32", "float16": "f16"}
# Kernel parameters in order ("ptr": a device pointer); a test checks them against lpd.cu's signatures.
KERNEL_ARGS: dict[str, tuple[str, ...]] = {
    "lpd_residual": ("ptr", "ptr", "int", "int", "int", "int"),  # x, out, N, C, H, W
    "lpd_generic": ("ptr", "ptr", "int", "int", "int", "int", "int", "int", "int"),  # ..., k, variant, residual
    "preprocess_lpd": ("ptr", "ptr", "int", "int", "int", *("float",) * 6),  # image, out, N, H, W, mean, std
    "normalize": ("ptr", "ptr", "int", "int", "int", *("float",) * 6),  # the same, without the LPD
}


@dataclass(frozen=True)
class LaunchConfig:
    """One launch: the extern "C" kernel, the arch it is built for, grid, block, dynamic shared memory."""

    name: str
    arch: int
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem_bytes: int
    window: int = 0  # lpd_generic: the window size its build is specialised to (0: any)


def kernel_family(base: str) -> tuple[str, int]:
    """('lpd_generic', 5) from 'lpd_generic5', (name, 3) for the others: the launch_config kernel and window."""
    m = re.fullmatch(r"(lpd_generic)(\d)?", base)
    if m:
        return m.group(1), int(m.group(2) or 3)
    return base, 3


def tile_shape(kernel: str, k: int = 3) -> tuple[int, int]:
    """Output columns and rows one block writes (normalize: pixels of the flattened image, one row)."""
    if kernel in ("lpd_residual", "preprocess_lpd"):
        return BLOCK_3X3[0], BLOCK_3X3[1] * ROWS_3X3
    if kernel == "normalize":
        return NORM_THREADS * NORM_PIXELS, 1
    return BLOCK[0], BLOCK[1] * ROWS_PER_THREAD


def dtype_name(dtype: Any) -> str:
    """'float32' / 'float16' from a string, numpy dtype or torch dtype (no torch import)."""
    try:
        import numpy as np

        return np.dtype(dtype).name
    except TypeError:
        return str(dtype).removeprefix("torch.")


def launch_config(kernel: str, shape: tuple[int, ...], dtype: Any, arch: int | str | tuple[int, int],
                  k: int = 3) -> LaunchConfig:
    """The grid, block and shared memory for ``kernel`` on ``shape`` ((N, C, H, W), or (N, H, W, 3)
    for preprocess_lpd and normalize), the only place launch tuples are computed; cached per shape."""
    if kernel not in KERNELS:
        raise ConfigError(f"Received kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    name = dtype_name(dtype)
    if name not in DTYPE_SUFFIX:
        raise ConfigError(f"Received dtype {name}; expected one of {', '.join(DTYPE_SUFFIX)}")
    return _launch_config(kernel, tuple(int(s) for s in shape), name, parse_arch(arch), k)


@functools.lru_cache(maxsize=1024)
def _launch_config(kernel: str, shape: tuple[int, ...], name: str, arch: int, k: int) -> LaunchConfig:
    if kernel in NHWC_KERNELS:
        if len(shape) != 4 or shape[3] != 3:
            raise ConfigError(f"Received shape {shape} for {kernel}; expected (N, H, W, 3)")
        (_, h, w, _), planes, channels = shape, shape[0], 3
    else:
        if len(shape) != 4:
            raise ConfigError(f"Received shape {shape} for {kernel}; expected (N, C, H, W)")
        (_, _, h, w), planes, channels = shape, shape[0] * shape[1], 1
    if min(shape) < 1 or max(shape) > MAX_INT:
        raise ConfigError(f"Received shape {shape}; expected sizes from 1 to {MAX_INT} (callers skip empty tensors)")
    k = check_window(k)
    if kernel != "lpd_generic" and k != 3:
        raise ConfigError(f"Received k={k} for {kernel}; expected 3 (other windows run in lpd_generic)")
    suffix = DTYPE_SUFFIX[name]
    tile_w, tile_h = tile_shape(kernel, k)
    if math.ceil(h / tile_h) > MAX_GRID_YZ and kernel != "normalize":
        raise ConfigError(f"Received height {h}; expected at most {MAX_GRID_YZ * tile_h}")
    if h * w * channels > MAX_INT:  # the kernels index within a plane (an image) in 32 bits
        raise ConfigError(f"Received shape {shape}; expected at most {MAX_INT} values per plane (height x width"
                          f"{' x 3' if channels == 3 else ''})")
    if kernel == "normalize":
        grid = (math.ceil(h * w / (NORM_THREADS * NORM_PIXELS)), 1, min(planes, MAX_GRID_YZ))
        return LaunchConfig(f"{kernel}_{suffix}", arch, grid, (NORM_THREADS, 1, 1), 0)
    grid = (math.ceil(w / tile_w), math.ceil(h / tile_h), min(planes, MAX_GRID_YZ))
    if kernel != "lpd_generic":  # static shared memory, a compile-time block
        return LaunchConfig(f"{kernel}_{suffix}", arch, grid, BLOCK_3X3, 0)
    r = k // 2
    shared = (BLOCK[0] + 2 * r) * (tile_h + 2 * r) * channels * 4  # a float tile with its k//2 halo
    return LaunchConfig(f"{kernel}_{suffix}", arch, grid, BLOCK, shared, window=k)


# ------------------------------------------------------------------------------------------------
# Driver API: the module in a device's primary context, launches on a caller's stream
# ------------------------------------------------------------------------------------------------

_CTYPES = {"ptr": ctypes.c_void_p, "int": ctypes.c_int, "float": ctypes.c_float}


class LpdModule:
    """lpd.cu's kernels loaded into the primary context of one device (the context PyTorch's runtime
    uses), each compiled (or read from the disk cache) and loaded on its first launch, alone."""

    def __init__(self, device: int = 0, cache: Path | None = None):
        self._drv = drv = bindings("driver")
        call("cuInit", drv.cuInit, 0)
        self.device, self._cache = device, cache
        self._dev = call("cuDeviceGet", drv.cuDeviceGet, device)
        attr = drv.CUdevice_attribute
        major = call("cuDeviceGetAttribute", drv.cuDeviceGetAttribute,
                      attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self._dev)
        minor = call("cuDeviceGetAttribute", drv.cuDeviceGetAttribute,
                      attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self._dev)
        self.arch = major * 10 + minor
        name = call("cuDeviceGetName", drv.cuDeviceGetName, 256, self._dev)
        self.name = bytes(name).split(b"\0", 1)[0].decode(errors="replace").strip()
        check_arch(self.arch, gpu=f"GPU {device} ({self.name})")  # e.g. a V100 under CUDA 13: one line, no NVRTC log
        self.driver = driver_version()
        check_nvrtc_driver("cubin", nvrtc_version(), self.driver)
        self.compiled: dict[tuple[str, int], CompiledModule] = {}
        self._ctx = call("cuDevicePrimaryCtxRetain", drv.cuDevicePrimaryCtxRetain, self._dev)
        self._modules: dict[tuple[str, int], Any] = {}
        self._functions: dict[tuple[str, int], Any] = {}
        self._params: dict[tuple[str, tuple[Any, ...]], tuple[int, Any, list[Any]]] = {}

    PARAMS_CACHE = 256  # argument arrays kept per module (a serving loop reuses a few pointer sets)

    @contextmanager
    def current(self) -> Iterator[None]:
        """Make this device's primary context current for the calls inside."""
        call("cuCtxPushCurrent", self._drv.cuCtxPushCurrent, self._ctx)
        try:
            yield
        finally:
            call("cuCtxPopCurrent", self._drv.cuCtxPopCurrent)

    def function(self, name: str, window: int = 0) -> Any:
        """The CUfunction of kernel ``name`` (lpd_generic: its build for ``window``), loaded on first use."""
        key = (name, window)
        if key not in self._functions:
            if self._ctx is None:
                raise CudaError(f"Received a closed LpdModule for device {self.device}; expected an open one")
            compiled = compile_lpd(self.arch, "cubin", self._cache, kernels=(name,), window=window)
            with self.current():
                try:
                    module = call("cuModuleLoadData", self._drv.cuModuleLoadData, compiled.data)
                except CudaError as e:
                    raise CudaError(f"{e} (loading {compiled.path.name}, a CUBIN for sm_{self.arch} from NVRTC "
                                    "%d.%d, on a driver for CUDA %d.%d; a CUBIN loads on any driver of its CUDA major "
                                    "version, so suspect the file: delete it and it is rebuilt)"
                                    % (*nvrtc_version(), *self.driver), e.call, e.result) from None
                self._modules[key] = module
                self._functions[key] = call("cuModuleGetFunction", self._drv.cuModuleGetFunction, module, name.encode())
            self.compiled[key] = compiled
        return self._functions[key]

    def launch(self, cfg: LaunchConfig, args: tuple[Any, ...], stream: int = 0) -> None:
        """Enqueue one launch on ``stream`` (a CUstream handle as an int; 0 is the legacy default stream)."""
        if cfg.arch != self.arch:
            raise ConfigError(f"Received a launch config for sm_{cfg.arch}; expected sm_{self.arch} "
                              f"(device {self.device})")
        key = (cfg.name, args)
        params = self._params.get(key)
        if params is None:  # the ctypes argument array, built once per kernel and argument set (pointers, sizes)
            types = KERNEL_ARGS[cfg.name.rsplit("_", 1)[0]]
            if len(args) != len(types):
                raise ConfigError(f"Received {len(args)} arguments for {cfg.name}; expected {len(types)} "
                                  f"({', '.join(types)})")
            values = [_CTYPES[t](a) for t, a in zip(types, args)]
            array = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
            if len(self._params) >= self.PARAMS_CACHE:
                self._params.pop(next(iter(self._params)))  # the oldest
            self._params[key] = params = (ctypes.addressof(array), array, values)  # the array keeps its values alive
        fn = self.function(cfg.name, cfg.window)
        with self.current():
            call("cuLaunchKernel", self._drv.cuLaunchKernel, fn, *cfg.grid, *cfg.block, cfg.shared_mem_bytes,
                  self._drv.CUstream(stream), params[0], 0)

    def close(self) -> None:
        """Unload the modules and release the primary context (errors are raised, not swallowed)."""
        if self._ctx is None:
            return
        with self.current():
            for module in self._modules.values():
                call("cuModuleUnload", self._drv.cuModuleUnload, module)
        self._modules, self._functions = {}, {}
        self._ctx = None
        call("cuDevicePrimaryCtxRelease", self._drv.cuDevicePrimaryCtxRelease, self._dev)

    def __enter__(self) -> LpdModule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@functools.cache
def get_module(device: int = 0) -> LpdModule:
    """The process's LpdModule for ``device``, loaded once (kept for the process's lifetime)."""
    return LpdModule(device)


def lpd(module: LpdModule, x_ptr: int, out_ptr: int, shape: tuple[int, int, int, int], dtype: Any,
        func: str = "median", k: int = 3, residual: bool = True, stream: int = 0) -> None:
    """Enqueue ``out = x - lpd(x)`` (or ``lpd(x)``) for contiguous NCHW x and out on the device.

    The paper's setting (median, 3x3, residual) runs the specialised kernel, the rest lpd_generic.
    """
    variant = variant_id(func)
    if 0 in shape:
        return
    if residual and func == "median" and k == 3:
        cfg = launch_config("lpd_residual", shape, dtype, module.arch)
        module.launch(cfg, (x_ptr, out_ptr, *shape), stream)
    else:
        cfg = launch_config("lpd_generic", shape, dtype, module.arch, k)
        module.launch(cfg, (x_ptr, out_ptr, *shape, k, variant, int(residual)), stream)


def preprocess_lpd(module: LpdModule, image_ptr: int, out_ptr: int, shape: tuple[int, int, int, int], dtype: Any,
                   mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD, stream: int = 0) -> None:
    """Enqueue uint8 NHWC ``image`` -> normalise -> median-LPD residual -> NCHW ``out`` (float32/16)."""
    _launch_nhwc("preprocess_lpd", module, image_ptr, out_ptr, shape, dtype, mean, std, stream)


def normalize(module: LpdModule, image_ptr: int, out_ptr: int, shape: tuple[int, int, int, int], dtype: Any,
              mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD, stream: int = 0) -> None:
    """Enqueue uint8 NHWC ``image`` -> ((v / 255 - mean) / std) -> NCHW ``out`` (float32/16), no LPD."""
    _launch_nhwc("normalize", module, image_ptr, out_ptr, shape, dtype, mean, std, stream)


def _launch_nhwc(kernel: str, module: LpdModule, image_ptr: int, out_ptr: int, shape: tuple[int, int, int, int],
                 dtype: Any, mean: tuple[float, ...], std: tuple[float, ...], stream: int) -> None:
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(f"Received mean {tuple(mean)} and std {tuple(std)}; expected 3 values each")
    if 0 in shape:
        return
    cfg = launch_config(kernel, shape, dtype, module.arch)
    n, h, w, _ = shape
    module.launch(cfg, (image_ptr, out_ptr, n, h, w, *map(float, mean), *map(float, std)), stream)
