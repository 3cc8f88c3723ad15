"""NVRTC: lpd.cu -> PTX or a CUBIN for one compute capability, cached on disk per (source, options, arch,
NVRTC version); which archs this NVRTC builds for, and whether the driver can load what it builds.

NVRTC needs no GPU or driver, so everything here but the driver check runs on CPU-only machines.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..cuda import CudaError, bindings, call, parse_arch, status_text
from ..errors import ConfigError
from ..lpd_spec import check_window
from . import SOURCE_PATH, cache_dir, read_source, source_hash, write_atomic

# No --use_fast_math: IEEE division keeps normalisation bit-identical to numpy's.
NVRTC_OPTIONS: tuple[str, ...] = ("--std=c++17",)


class KernelCompileError(CudaError):
    """NVRTC rejected lpd.cu; ``log`` holds the compiler's output."""

    def __init__(self, message: str, log: str):
        super().__init__(f"{message}\n{log}", call="nvrtcCompileProgram")
        self.log = log


@dataclass(frozen=True)
class CompiledModule:
    """NVRTC output: PTX text or a CUBIN for one arch, and whether it came from the disk cache."""

    data: bytes
    target: str
    arch: int
    path: Path
    from_cache: bool
    seconds: float = 0.0  # NVRTC's time for this build (0 when read from the cache)


def nvrtc_version() -> tuple[int, int]:
    return call("nvrtcVersion", bindings("nvrtc").nvrtcVersion)


def nvrtc_supported_archs() -> tuple[int, ...]:
    """The compute capabilities this NVRTC builds CUBINs for (nvrtcGetSupportedArchs): NVRTC 13.x from 75
    (Turing) up, since CUDA 13 no longer targets Maxwell, Pascal and Volta; NVRTC 12.x from 50."""
    return tuple(sorted(int(a) for a in call("nvrtcGetSupportedArchs", bindings("nvrtc").nvrtcGetSupportedArchs)))


def check_arch(arch: int, nvrtc: tuple[int, int] | None = None, supported: tuple[int, ...] | None = None,
               gpu: str = "") -> None:
    """Refuse, in one line and before NVRTC fails on it, an arch this NVRTC does not build for.

    ``gpu`` names the device ("GPU 0 (Tesla V100-SXM2-16GB)") when the arch is a device's. A V100 (sm_70)
    or older under CUDA 13 is told to use CUDA 12, whose NVRTC still targets it (lpd.cu itself needs
    nothing newer: its sm_80 instructions have fallbacks), or to run the LPD in the model's graph.
    """
    nvrtc = nvrtc or nvrtc_version()
    supported = tuple(supported or nvrtc_supported_archs())
    if arch in supported:
        return
    lo, hi = min(supported), max(supported)
    what = f"{gpu} is sm_{arch}" if gpu else f"Received sm_{arch}"
    builds = f"NVRTC {nvrtc[0]}.{nvrtc[1]} builds lpd.cu for sm_{lo} to sm_{hi}"
    if arch < lo and arch >= 50 and nvrtc[0] >= 13:
        message = (f"{what}; {builds} (CUDA 13 dropped Maxwell, Pascal and Volta): for this GPU use CUDA 12, whose "
                   "NVRTC still builds for it (pip install 'cuda-python>=12.8,<13' nvidia-cuda-nvrtc-cu12, with a "
                   "driver for CUDA 12 or newer), or run the LPD in the model's graph (ONNX Runtime or PyTorch) "
                   "instead")
    elif arch < lo:
        message = f"{what}; {builds}: too old for these kernels; run the LPD in the model's graph instead"
    elif arch > hi:
        message = f"{what}; {builds}, not yet for sm_{arch}: expected a newer NVRTC (pip install -U nvidia-cuda-nvrtc)"
    else:
        message = f"{what}; {builds} but not sm_{arch} (it lists {', '.join(map(str, supported))})"
    raise CudaError(message, "nvrtcGetSupportedArchs")


def check_nvrtc_driver(target: str, nvrtc: tuple[int, int], driver: tuple[int, int]) -> None:
    """Refuse a build the driver cannot load, before compiling it.

    PTX is JIT-compiled by the driver, which rejects a PTX ISA newer than its own (NVRTC 13.5 writes
    ``.version 9.5``; a 13.0 driver stops at 9.0). A CUBIN is machine code: within one CUDA major
    version it loads on an older driver (minor version compatibility), across majors it does not.
    """
    newer = nvrtc > driver if target == "ptx" else nvrtc[0] > driver[0]
    if newer:
        need = f"{nvrtc[0]}.{nvrtc[1]}" if target == "ptx" else f"{nvrtc[0]}.0"
        pin = (f"'nvidia-cuda-nvrtc=={driver[0]}.{driver[1]}.*'" if target == "ptx"
               else f"'nvidia-cuda-nvrtc<{driver[0] + 1}'")
        raise CudaError(f"Received NVRTC {nvrtc[0]}.{nvrtc[1]} {'PTX' if target == 'ptx' else 'CUBINs'} "
                        f"for a driver of CUDA {driver[0]}.{driver[1]}; expected a driver for CUDA {need} or newer, "
                        f"or pip install {pin}",
                        "cuDriverGetVersion")


def nvrtc_compile(source: str, name: str, gpu: str, target: str, what: str, options: tuple[str, ...] = (),
                  log: list[str] | None = None) -> bytes:
    """``source`` compiled by NVRTC for ``gpu`` ('sm_XX' for a CUBIN, 'compute_XX' for PTX) with
    NVRTC_OPTIONS and ``options``; KernelCompileError with NVRTC's log when it fails (``what`` names the build).
    ``log``, a list, receives NVRTC's log of a build that succeeds (with ``--ptxas-options=-v``: registers
    and spills per kernel, see :func:`ptxas_usage`)."""
    nvrtc = bindings("nvrtc")
    prog = call("nvrtcCreateProgram", nvrtc.nvrtcCreateProgram, source.encode(), name.encode(), 0, [], [])

    def program_log() -> str:
        size = call("nvrtcGetProgramLogSize", nvrtc.nvrtcGetProgramLogSize, prog)
        text = b" " * size
        call("nvrtcGetProgramLog", nvrtc.nvrtcGetProgramLog, prog, text)
        return text.decode(errors="replace").rstrip("\0 ")

    try:
        opts = [f"--gpu-architecture={gpu}".encode(), *(o.encode() for o in (*NVRTC_OPTIONS, *options))]
        status, = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if int(status) != 0:
            raise KernelCompileError(f"nvrtcCompileProgram: received {status_text(status)} for {what}; expected "
                                     "success", program_log())
        if log is not None:
            log.append(program_log())
        get_size, get = ((nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN) if target == "cubin"
                         else (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX))
        size = call(get_size.__name__, get_size, prog)
        data = b" " * size
        call(get.__name__, get, prog, data)
    finally:
        call("nvrtcDestroyProgram", nvrtc.nvrtcDestroyProgram, prog)
    return data


def ptxas_usage(log: str) -> dict[str, dict[str, int]]:
    """ptxas's -v report per kernel: {'lpd_residual_f32': {'registers': 40, 'stack': 0, 'spill_stores': 0,
    'spill_loads': 0}, ...}, from nvcc's, NVRTC's (--ptxas-options=-v) or nvJitLink's (-Xptxas=-v) log."""
    usage: dict[str, dict[str, int]] = {}
    entry = None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            entry = usage.setdefault(m.group(1), {})
        elif entry is not None and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                                   r"(\d+) bytes spill loads", line)):
            entry.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif entry is not None and (m := re.search(r"Used (\d+) registers", line)):
            entry["registers"] = int(m.group(1))
    return usage


def selection_options(kernels: tuple[str, ...] | None = None, window: int = 0) -> tuple[str, ...]:
    """NVRTC options building only ``kernels`` (all when None), lpd_generic for ``window`` only (0: every window)."""
    opts = () if kernels is None else ("-DFERRET_ONLY", *(f"-DFERRET_WANT_{k}" for k in sorted(kernels)))
    return (*opts, f"-DFERRET_WINDOW={check_window(window)}") if window else opts


def compile_lpd(arch: int | str | tuple[int, int], target: str = "cubin", cache: Path | None = None,
                kernels: tuple[str, ...] | None = None, window: int = 0) -> CompiledModule:
    """lpd.cu compiled by NVRTC for ``arch`` (CUBIN: sm_XX machine code; PTX: compute_XX), cached on disk.

    ``kernels`` (e.g. ``('lpd_residual_f32',)``) builds only those, ``window`` lpd_generic for one
    window size: one kernel compiles in a fraction of a second where all of them take seconds.
    NVRTC needs no GPU or driver, so this also runs on CPU-only machines.
    """
    if target not in ("cubin", "ptx"):
        raise ConfigError(f"Received target {target!r}; expected 'cubin' or 'ptx'")
    arch = parse_arch(arch)
    major, minor = nvrtc_version()
    check_arch(arch, (major, minor))  # NVRTC's list holds for compute_XX (PTX) as for sm_XX
    options = selection_options(kernels, window)
    key = source_hash(*NVRTC_OPTIONS, *options, f"nvrtc{major}.{minor}")
    what = "all" if kernels is None else "-".join(sorted(kernels)) + (f"-k{window}" if window else "")
    path = (cache or cache_dir()) / f"lpd-{key}-sm{arch}-nvrtc{major}{minor}-{what}.{target}"
    if path.is_file():
        return CompiledModule(path.read_bytes(), target, arch, path, from_cache=True)
    gpu = f"sm_{arch}" if target == "cubin" else f"compute_{arch}"
    start = time.perf_counter()
    data = nvrtc_compile(read_source(), SOURCE_PATH.name, gpu, target, f"{SOURCE_PATH.name} with {gpu}", options)
    seconds = time.perf_counter() - start
    write_atomic(path, data)  # best effort: a cache that cannot be written costs a rebuild, not a failure
    return CompiledModule(data, target, arch, path, from_cache=False, seconds=seconds)
