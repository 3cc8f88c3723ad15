"""lpd.cu built for the CPU with a C++ compiler and called through ctypes, with numpy wrappers.

The host build runs the kernels' own ``__host__ __device__`` functions: per pixel
(``lpd_residual_host`` and friends) and per block (``emulate_*``: a kernel's blocks run for a
given ``LaunchConfig``, so tiles, halos and grid coverage are checked on the CPU too).
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..errors import ConfigError, FerretError
from ..lpd_spec import check_window
from ..preprocess import MEAN, STD
from . import SOURCE_PATH, cache_dir, source_hash, variant_id
from .launch import LaunchConfig

CXX_FLAGS: tuple[str, ...] = ("-x", "c++", "-O2", "-shared", "-fPIC", "-DFERRET_HOST_BUILD")
_CODES = {1: "window size not in (3, 5, 7)", 2: "unknown LPD variant", 3: "bad grid or block",
          4: "dynamic shared memory smaller than the block's tiles", 5: "out of memory"}


class HostBuildError(FerretError):
    """lpd.cu could not be built or run on the host (no compiler, a compile error, a bad launch)."""


def find_compiler() -> str:
    """$CXX, else the first of g++, c++, clang++ on PATH."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise HostBuildError(f"Received no C++ compiler (looked for {', '.join(names)} on PATH); expected one, "
                         "e.g. `apt-get install g++`, to build the host LPD kernel")


def build_host_library(cache: Path | None = None) -> Path:
    """Compile lpd.cu into a shared library in the cache (keyed by source, flags and compiler)."""
    cxx = find_compiler()
    out = (cache or cache_dir()) / f"lpd_host-{source_hash(cxx, *CXX_FLAGS)}.so"
    if out.is_file():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable cache: build in a private temporary folder instead
        out = Path(tempfile.mkdtemp(prefix="ferret-host-")) / out.name
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    proc = subprocess.run([cxx, *CXX_FLAGS, "-o", str(tmp), str(SOURCE_PATH)], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise HostBuildError(f"Received exit status {proc.returncode} from {cxx} on {SOURCE_PATH}; expected 0:\n"
                             f"{proc.stderr.strip()}")
    os.replace(tmp, out)
    return out


@functools.lru_cache(maxsize=None)
def load_host_library() -> ctypes.CDLL:
    """The host build, compiled on first use and loaded once per process."""
    lib = ctypes.CDLL(str(build_host_library()))
    f32, u8, i32, i64 = (np.ctypeslib.ndpointer(np.float32, flags="C"), np.ctypeslib.ndpointer(np.uint8, flags="C"),
                         ctypes.c_int, ctypes.c_longlong)
    ints = np.ctypeslib.ndpointer(np.int32, shape=(3,), flags="C")
    signatures = {
        "lpd_residual_host": [f32, f32, i32, i32, i32, i32, i32, i32],
        "lpd_reconstruct_host": [f32, f32, i32, i32, i32, i32, i32, i32],
        "preprocess_lpd_host": [u8, f32, i32, i32, i32, f32, f32],
        "ferret_reduce_rows_host": [f32, f32, i64, i32, i32],
        "lpd_generic_emulate": [f32, f32, i32, i32, i32, i32, i32, i32, i32, ints, ints, i64],
        "lpd_residual_emulate": [f32, f32, i32, i32, i32, i32, ints, ints, i64],
        "lpd_residual_pairs_emulate": [f32, f32, i32, i32, i32, i32, ints, ints, i64],
        "preprocess_lpd_emulate": [u8, f32, i32, i32, i32, f32, f32, ints, ints, i64],
        "normalize_emulate": [u8, f32, i32, i32, i32, f32, f32, ints, ints, i64],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    lib.ferret_emulated_interior_blocks.argtypes, lib.ferret_emulated_interior_blocks.restype = [], i64
    return lib


def emulated_interior_blocks() -> int:
    """Blocks of the last emulated lpd_residual/preprocess_lpd launch that took the interior path
    (no bounds checks); the others took the edge path."""
    return int(load_host_library().ferret_emulated_interior_blocks())


def _check(code: int, call: str) -> None:
    if code != 0:
        raise HostBuildError(f"{call} returned {code} ({_CODES.get(code, 'unknown error')}); expected 0")


def _nchw_f32(x: np.ndarray, name: str = "x") -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype != np.float32:
        got = f"{type(x).__name__} of dtype {x.dtype} and shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ConfigError(f"Received {name} as {got}; expected a float32 numpy array of shape (N, C, H, W)")
    return np.ascontiguousarray(x)


def _nhwc_u8(images: np.ndarray) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        got = f"{images.dtype} of shape {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ConfigError(f"Received images as {got}; expected uint8 of shape (N, H, W, 3), RGB")
    return np.ascontiguousarray(images)


def _norm(values: tuple[float, ...], name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float32)
    if arr.shape != (3,):
        raise ConfigError(f"Received {name} of shape {arr.shape}; expected 3 values, one per RGB channel")
    return arr


def _lpd(x: np.ndarray, func: str, k: int, residual: bool) -> np.ndarray:
    x = _nchw_f32(x)
    k, variant = check_window(k), variant_id(func)
    out = np.empty_like(x)
    call = "lpd_residual_host" if residual else "lpd_reconstruct_host"
    _check(getattr(load_host_library(), call)(x, out, *x.shape, k, variant), call)
    return out


def lpd_residual_host(x: np.ndarray, func: str = "median", k: int = 3) -> np.ndarray:
    """``x - lpd(x)`` for float32 NCHW x, pixel by pixel through the kernels' per-pixel code."""
    return _lpd(x, func, k, residual=True)


def lpd_reconstruct_host(x: np.ndarray, func: str = "median", k: int = 3) -> np.ndarray:
    """``lpd(x)`` (what the LPD module returns) through the kernels' per-pixel code."""
    return _lpd(x, func, k, residual=False)


def preprocess_lpd_host(images: np.ndarray, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> np.ndarray:
    """uint8 NHWC -> ((v / 255 - mean) / std) -> median-LPD residual -> float32 NCHW, in one pass."""
    images = _nhwc_u8(images)
    n, h, w, _ = images.shape
    out = np.empty((n, 3, h, w), dtype=np.float32)
    _check(load_host_library().preprocess_lpd_host(images, out, n, h, w, _norm(mean, "mean"), _norm(std, "std")),
           "preprocess_lpd_host")
    return out


def reduce_rows_host(rows: np.ndarray, func: str, k: int) -> np.ndarray:
    """The kernels' reduction on rows of k*k window values (row-major, centre at k*k // 2)."""
    k, variant = check_window(k), variant_id(func)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != k * k:
        raise ConfigError(f"Received rows of shape {rows.shape}; expected (n, {k * k}) for k={k}")
    out = np.empty(rows.shape[0], dtype=np.float32)
    _check(load_host_library().ferret_reduce_rows_host(rows, out, rows.shape[0], k, variant), "ferret_reduce_rows_host")
    return out


def _launch_arrays(cfg: LaunchConfig, expected: str) -> tuple[np.ndarray, np.ndarray]:
    if cfg.name != expected:
        raise ConfigError(f"Received a launch config for {cfg.name!r}; expected one for {expected!r} "
                          "(the host emulator runs float32 kernels only)")
    return np.asarray(cfg.grid, dtype=np.int32), np.asarray(cfg.block, dtype=np.int32)


def emulate_lpd(x: np.ndarray, cfg: LaunchConfig, func: str = "median", k: int = 3, residual: bool = True,
                packed_pairs: bool = False) -> np.ndarray:
    """Run lpd_residual_f32 or lpd_generic_f32 block by block on the CPU as ``cfg`` would launch it.

    The output starts as NaN, so a pixel no block writes stays NaN. ``packed_pairs`` runs the residual's
    outputs as lpd_residual_f16 does on sm_80+: two rows of a column per min/max, packed (the device's
    __half2 and min.f16x2, emulated here by float min/max lane by lane), on float32 data.
    """
    x = _nchw_f32(x)
    k, variant = check_window(k), variant_id(func)
    out = np.full_like(x, np.nan)
    lib = load_host_library()
    if cfg.name.startswith("lpd_residual"):
        if (func, k, residual) != ("median", 3, True):
            raise ConfigError(f"Received func={func!r}, k={k}, residual={residual} for lpd_residual_f32; "
                              "expected 'median', 3, True (other variants run in lpd_generic_f32)")
        grid, block = _launch_arrays(cfg, "lpd_residual_f32")
        call = "lpd_residual_pairs_emulate" if packed_pairs else "lpd_residual_emulate"
        _check(getattr(lib, call)(x, out, *x.shape, grid, block, cfg.shared_mem_bytes), call)
    else:
        if packed_pairs:
            raise ConfigError("Received packed_pairs=True for lpd_generic; expected it for lpd_residual only")
        grid, block = _launch_arrays(cfg, "lpd_generic_f32")
        if cfg.window and cfg.window != k:  # the GPU build for another window would write nothing
            raise ConfigError(f"Received k={k} for an lpd_generic build specialised to k={cfg.window}; expected {cfg.window}")
        _check(lib.lpd_generic_emulate(x, out, *x.shape, k, variant, int(residual), grid, block, cfg.shared_mem_bytes),
               "lpd_generic_emulate")
    return out


def emulate_preprocess_lpd(images: np.ndarray, cfg: LaunchConfig, mean: tuple[float, ...] = MEAN,
                           std: tuple[float, ...] = STD) -> np.ndarray:
    """Run preprocess_lpd_f32 block by block on the CPU as ``cfg`` would launch it (NaN where unwritten)."""
    return _emulate_nhwc("preprocess_lpd", images, cfg, mean, std)


def emulate_normalize(images: np.ndarray, cfg: LaunchConfig, mean: tuple[float, ...] = MEAN,
                      std: tuple[float, ...] = STD) -> np.ndarray:
    """Run normalize_f32 block by block on the CPU as ``cfg`` would launch it (NaN where unwritten)."""
    return _emulate_nhwc("normalize", images, cfg, mean, std)


def _emulate_nhwc(kernel: str, images: np.ndarray, cfg: LaunchConfig, mean: tuple[float, ...],
                  std: tuple[float, ...]) -> np.ndarray:
    images = _nhwc_u8(images)
    n, h, w, _ = images.shape
    out = np.full((n, 3, h, w), np.nan, dtype=np.float32)
    grid, block = _launch_arrays(cfg, f"{kernel}_f32")
    _check(getattr(load_host_library(), f"{kernel}_emulate")(images, out, n, h, w, _norm(mean, "mean"), _norm(std, "std"),
                                                             grid, block, cfg.shared_mem_bytes), f"{kernel}_emulate")
    return out
