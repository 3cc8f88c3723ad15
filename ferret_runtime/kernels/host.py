"""lpd.cu built for the CPU with a C++ compiler and called through ctypes, with numpy wrappers.

The host build runs the kernels' own ``__host__ __device__`` functions: per pixel
(``lpd_residual_host`` and friends) and per block (``emulate_*``: a kernel's blocks run for a
given ``LaunchConfig``, so tiles, halos and grid coverage are checked on the CPU too).

The float16 kernels run as the device runs them: float16 arrays in and out, each PTX instruction the
kernels use (cvt to and from float16, the packed cvt.rn.f16x2.f32, min/max.f16x2, __byte_perm, vector
loads and stores) implemented bit for bit by the host build, and the code around them shared, so a
swapped lane or a wrong pack changes the emulated output. ``cfg.arch`` picks the path lpd_residual_f16
takes (packed pairs from sm_80). The instructions themselves are exposed below for tests against their
specifications (``f16_bits`` etc.).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
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


def build_host_library(cache: Path | None = None, source: str | None = None) -> Path:
    """Compile lpd.cu into a shared library in the cache (keyed by source, flags and compiler).

    ``source``: another text to compile in its place (the tests build lpd.cu with a lane swapped, to see
    that the float16 tests fail on it)."""
    cxx = find_compiler()
    if source is None:
        key = source_hash(cxx, *CXX_FLAGS)
    else:
        key = "v" + hashlib.sha256("\0".join((source, cxx, *CXX_FLAGS)).encode()).hexdigest()[:16]
    out = (cache or cache_dir()) / f"lpd_host-{key}.so"
    if out.is_file():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable cache: build in a private temporary folder instead
        out = Path(tempfile.mkdtemp(prefix="ferret-host-")) / out.name
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    where = str(SOURCE_PATH) if source is None else "-"  # a variant goes in on standard input
    proc = subprocess.run([cxx, *CXX_FLAGS, "-o", str(tmp), where], capture_output=True, text=True, input=source)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise HostBuildError(f"Received exit status {proc.returncode} from {cxx} on "
                             f"{SOURCE_PATH if source is None else 'a variant of ' + SOURCE_PATH.name}; expected 0:\n"
                             f"{proc.stderr.strip()}")
    os.replace(tmp, out)
    return out


@functools.cache
def load_host_library() -> ctypes.CDLL:
    """The host build, compiled on first use and loaded once per process."""
    return bind_host_library(build_host_library())


def bind_host_library(path: Path) -> ctypes.CDLL:
    """A host build loaded, with the argument types of its C functions set."""
    lib = ctypes.CDLL(str(path))
    f32, u8, u16, u32 = (np.ctypeslib.ndpointer(t, flags="C") for t in (np.float32, np.uint8, np.uint16, np.uint32))
    i32, i64 = ctypes.c_int, ctypes.c_longlong
    ints = np.ctypeslib.ndpointer(np.int32, shape=(3,), flags="C")
    signatures = {
        "lpd_residual_host": [f32, f32, i32, i32, i32, i32, i32, i32],
        "lpd_reconstruct_host": [f32, f32, i32, i32, i32, i32, i32, i32],
        "preprocess_lpd_host": [u8, f32, i32, i32, i32, f32, f32],
        "ferret_reduce_rows_host": [f32, f32, i64, i32, i32],
    }
    for t, store in (("", f32), ("_f16", u16)):  # the float32 and float16 kernels
        signatures.update({
            f"lpd_generic{t}_emulate": [store, store, i32, i32, i32, i32, i32, i32, i32, ints, ints, i64],
            f"lpd_residual{t}_emulate": [store, store, i32, i32, i32, i32, ints, ints, i64, *([i32] if t else [])],
            f"preprocess_lpd{t}_emulate": [u8, store, i32, i32, i32, f32, f32, ints, ints, i64],
            f"normalize{t}_emulate": [u8, store, i32, i32, i32, f32, f32, ints, ints, i64],
        })
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    instructions = {
        "ferret_f2h_host": [f32, u16, i64], "ferret_h2f_host": [u16, f32, i64],
        "ferret_cvt_f16x2_host": [f32, f32, u32, i64], "ferret_byte_perm_host": [u32, u32, u32, u32, i64],
        "ferret_minmax_f32_host": [f32, f32, f32, i64, i32], "ferret_minmax_f16x2_host": [u32, u32, u32, i64, i32],
        "ferret_pack_host": [f32, f32, u32, i64], "ferret_unpack_host": [u32, f32, f32, i64],
    }
    for name, argtypes in instructions.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
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
        got = (f"{type(x).__name__} of dtype {x.dtype} and shape {x.shape}" if isinstance(x, np.ndarray)
               else type(x).__name__)
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


def _launch_arrays(cfg: LaunchConfig, kernel: str) -> tuple[np.ndarray, np.ndarray, str]:
    """grid and block as int32 arrays, and the storage suffix ('f32' or 'f16') of a config for ``kernel``."""
    base, _, suffix = cfg.name.rpartition("_")
    if base != kernel or suffix not in ("f32", "f16"):
        raise ConfigError(f"Received a launch config for {cfg.name!r}; expected one for {kernel}_f32 or {kernel}_f16")
    return np.asarray(cfg.grid, dtype=np.int32), np.asarray(cfg.block, dtype=np.int32), suffix


_STORAGE = {"f32": np.float32, "f16": np.float16}


def _storage_input(x: np.ndarray, cfg: LaunchConfig, suffix: str) -> np.ndarray:
    """x as the kernel stores it: float32 NCHW for *_f32, float16 NCHW for *_f16 (not converted: the caller
    decides how values become float16)."""
    want = _STORAGE[suffix]
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype != want:
        got = f"{x.dtype} of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ConfigError(f"Received x as {got} for {cfg.name}; expected {np.dtype(want).name} of shape (N, C, H, W)")
    return np.ascontiguousarray(x)


def _bits(a: np.ndarray) -> np.ndarray:
    """A float16 array as the uint16 bits the C functions take (float32 passes through)."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


def emulate_lpd(x: np.ndarray, cfg: LaunchConfig, func: str = "median", k: int = 3,
                residual: bool = True) -> np.ndarray:
    """Run lpd_residual or lpd_generic (``cfg.name``: its _f32 or _f16 kernel) block by block on the CPU as
    ``cfg`` would launch it; x and the result are float32 or float16 as the kernel stores them.

    The output starts as NaN, so a pixel no block writes stays NaN. lpd_residual_f16 takes the path the
    device build for ``cfg.arch`` takes: from sm_80 its outputs two rows at a time, packed in __half2 lanes
    (min.f16x2/max.f16x2), below that one at a time on floats; both must give the same bits.
    """
    k, variant = check_window(k), variant_id(func)
    lib = load_host_library()
    if cfg.name.startswith("lpd_residual"):
        grid, block, suffix = _launch_arrays(cfg, "lpd_residual")
        if (func, k, residual) != ("median", 3, True):
            raise ConfigError(f"Received func={func!r}, k={k}, residual={residual} for {cfg.name}; "
                              "expected 'median', 3, True (other variants run in lpd_generic)")
        x = _storage_input(x, cfg, suffix)
        out = np.full_like(x, np.nan)
        if suffix == "f16":  # the arch picks the path, as the device build's __CUDA_ARCH__ does
            code = lib.lpd_residual_f16_emulate(_bits(x), _bits(out), *x.shape, grid, block, cfg.shared_mem_bytes,
                                                cfg.arch)
        else:
            code = lib.lpd_residual_emulate(x, out, *x.shape, grid, block, cfg.shared_mem_bytes)
        _check(code, f"lpd_residual_{suffix}_emulate")
    else:
        grid, block, suffix = _launch_arrays(cfg, "lpd_generic")
        x = _storage_input(x, cfg, suffix)
        if cfg.window and cfg.window != k:  # the GPU build for another window would write nothing
            raise ConfigError(f"Received k={k} for an lpd_generic build specialised to k={cfg.window}; "
                              f"expected {cfg.window}")
        out = np.full_like(x, np.nan)
        call = f"lpd_generic{'_f16' if suffix == 'f16' else ''}_emulate"
        _check(getattr(lib, call)(_bits(x), _bits(out), *x.shape, k, variant, int(residual), grid, block,
                                  cfg.shared_mem_bytes), call)
    return out


def emulate_preprocess_lpd(images: np.ndarray, cfg: LaunchConfig, mean: tuple[float, ...] = MEAN,
                           std: tuple[float, ...] = STD) -> np.ndarray:
    """Run preprocess_lpd_f32 or _f16 block by block on the CPU as ``cfg`` would launch it (NaN where
    unwritten); float32 or float16 NCHW out."""
    return _emulate_nhwc("preprocess_lpd", images, cfg, mean, std)


def emulate_normalize(images: np.ndarray, cfg: LaunchConfig, mean: tuple[float, ...] = MEAN,
                      std: tuple[float, ...] = STD) -> np.ndarray:
    """Run normalize_f32 or _f16 block by block on the CPU as ``cfg`` would launch it (NaN where unwritten)."""
    return _emulate_nhwc("normalize", images, cfg, mean, std)


def _emulate_nhwc(kernel: str, images: np.ndarray, cfg: LaunchConfig, mean: tuple[float, ...],
                  std: tuple[float, ...]) -> np.ndarray:
    images = _nhwc_u8(images)
    n, h, w, _ = images.shape
    grid, block, suffix = _launch_arrays(cfg, kernel)
    out = np.full((n, 3, h, w), np.nan, dtype=_STORAGE[suffix])
    call = f"{kernel}{'_f16' if suffix == 'f16' else ''}_emulate"
    _check(getattr(load_host_library(), call)(images, _bits(out), n, h, w, _norm(mean, "mean"), _norm(std, "std"),
                                              grid, block, cfg.shared_mem_bytes), call)
    return out


# ------------------------------------------------------------------------------------------------
# The device instructions as the host build implements them (uint16/uint32 bit patterns)
# ------------------------------------------------------------------------------------------------


def _arrays(*arrays: np.ndarray, dtype: type) -> list[np.ndarray]:
    out = [np.ascontiguousarray(a, dtype=dtype).ravel() for a in arrays]
    if len({a.size for a in out}) > 1:
        raise ConfigError(f"Received arrays of sizes {[a.size for a in out]}; expected equal sizes")
    return out


def _elementwise(function: str, inputs: tuple[np.ndarray, ...], dtype: type, out_dtype: type,
                 *extra: int) -> np.ndarray:
    """Run the host library's ``function(inputs..., out, n, extra...)`` over equal-sized flat arrays."""
    arrays = _arrays(*inputs, dtype=dtype)
    out = np.empty(arrays[0].size, out_dtype)
    getattr(load_host_library(), function)(*arrays, out, arrays[0].size, *extra)
    return out


def f16_bits(x: np.ndarray) -> np.ndarray:
    """cvt.rn.f16.f32 of float32 values: float16 bit patterns (uint16)."""
    return _elementwise("ferret_f2h_host", (x,), np.float32, np.uint16)


def f16_to_f32(bits: np.ndarray) -> np.ndarray:
    """cvt.f32.f16 of float16 bit patterns (uint16): float32 values."""
    return _elementwise("ferret_h2f_host", (bits,), np.uint16, np.float32)


def cvt_f16x2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """cvt.rn.f16x2.f32 d, a, b: a rounded into bits 16..31 of d, b into bits 0..15 (uint32)."""
    return _elementwise("ferret_cvt_f16x2_host", (a, b), np.float32, np.uint32)


def byte_perm(x: np.ndarray, y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """__byte_perm(x, y, s) on uint32 arrays."""
    return _elementwise("ferret_byte_perm_host", (x, y, s), np.uint32, np.uint32)


def minmax_f32(a: np.ndarray, b: np.ndarray, op: str) -> np.ndarray:
    """The kernels' float32 min or max (FMNMX: minimumNumber/maximumNumber) of two float32 arrays."""
    return _elementwise("ferret_minmax_f32_host", (a, b), np.float32, np.float32, {"min": 0, "max": 1}[op])


def minmax_f16x2(a: np.ndarray, b: np.ndarray, op: str) -> np.ndarray:
    """min.f16x2 or max.f16x2 of two arrays of packed float16 pairs (uint32)."""
    return _elementwise("ferret_minmax_f16x2_host", (a, b), np.uint32, np.uint32, {"min": 0, "max": 1}[op])


def pack_f16x2(lane0: np.ndarray, lane1: np.ndarray) -> np.ndarray:
    """lpd.cu's ferret_pack: two float32 lanes into one __half2 word (uint32)."""
    return _elementwise("ferret_pack_host", (lane0, lane1), np.float32, np.uint32)


def unpack_f16x2(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """lpd.cu's ferret_unpack: a __half2 word (uint32) back to its two lanes as float32."""
    (bits,) = _arrays(bits, dtype=np.uint32)
    lane0, lane1 = np.empty(bits.size, np.float32), np.empty(bits.size, np.float32)
    load_host_library().ferret_unpack_host(bits, lane0, lane1, bits.size)
    return lane0, lane1
