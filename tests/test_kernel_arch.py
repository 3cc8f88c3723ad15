"""lpd.cu on every GPU CUDA 13 builds for, checked on the CPU (issue 21, part 4).

NVRTC compiles CUBINs without a GPU, so every kernel is built here for every architecture this NVRTC
lists from sm_75 (T4) on, with ptxas's report: no spills, no stack, no warning, the register bound of
__launch_bounds__ met. The TensorRT plugin's PTX (compute_75, JIT-compiled by the driver for whatever
GPU the engine runs on) is compiled for each of them too, by nvJitLink. A GPU NVRTC no longer builds
for (a V100 under CUDA 13) is refused in one line before NVRTC runs.
"""

from __future__ import annotations

import concurrent.futures
import re
import types

import pytest

from ferret_runtime import cuda
from ferret_runtime.kernels import SOURCE_PATH, launch, read_source
from ferret_runtime.kernels import nvrtc as nvrtc_api

KERNELS = sorted(f"{k}_{s}" for k in launch.KERNELS for s in ("f32", "f16"))
DEPLOYED = {75, 80, 86, 89, 90}  # T4, A100, A10/A40/RTX 30, L4/L40/RTX 40, H100/H200
SMALL_SM = {75, 107}  # at most 1024 threads per SM: ptxas ignores a bound of 6 blocks of 256 there


def blocks_per_sm(kernel: str, arch: int) -> int:
    """The blocks of 256 threads per SM lpd.cu's __launch_bounds__ asks for (FERRET_BLOCKS_3X3 and
    FERRET_BLOCKS_PREPROCESS); 0 for lpd_generic, which asks for none."""
    if kernel == "lpd_generic":
        return 0
    if arch == 75:
        return 4
    if arch >= 100:
        return 2 if kernel == "preprocess_lpd" else 4
    return 6


@pytest.fixture(scope="module")
def nvrtc() -> tuple[tuple[int, int], tuple[int, ...]]:
    try:
        return nvrtc_api.nvrtc_version(), nvrtc_api.nvrtc_supported_archs()
    except cuda.CudaError as e:
        pytest.skip(f"NVRTC unavailable: {e}")


@pytest.fixture(scope="module")
def archs(nvrtc) -> list[int]:
    return [a for a in nvrtc[1] if a >= 75]


def test_nvrtc_builds_for_the_gpus_people_deploy_on(nvrtc, archs):
    version, supported = nvrtc
    assert DEPLOYED <= set(archs), supported
    if version[0] >= 13:
        assert min(supported) == 75  # CUDA 13 no longer targets Volta (V100, sm_70) and older


@pytest.fixture(scope="module")
def cubin_logs(archs) -> dict[int, str]:
    """ptxas's report on all kernels (every window) for each arch, two NVRTC builds at a time (~3 s each)."""

    def build(arch: int) -> tuple[int, str]:
        log: list[str] = []
        nvrtc_api.nvrtc_compile(read_source(), SOURCE_PATH.name, f"sm_{arch}", "cubin", f"lpd.cu for sm_{arch}",
                             ("--ptxas-options=-v",), log=log)
        return arch, log[0]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(pool.map(build, archs))


def check_report(arch: int, log: str, kernels: list[str], blocks, allowed_warnings: str = "") -> list[str]:
    """What is wrong with one ptxas report: a kernel missing, a spill, a stack frame, more registers than
    ``blocks(kernel)`` blocks of 256 threads leave, a warning (but the ``allowed_warnings`` pattern)."""
    usage, problems = nvrtc_api.ptxas_usage(log), []
    if sorted(usage) != kernels:
        problems.append(f"sm_{arch}: kernels {sorted(usage)}")
    for name, u in sorted(usage.items()):
        if u["spill_stores"] or u["spill_loads"] or u["stack"]:
            problems.append(f"sm_{arch} {name}: {u}")
        n = blocks(name.removeprefix("trt_").rsplit("_", 1)[0])
        if n and u["registers"] * 256 * n > 65536:
            problems.append(f"sm_{arch} {name}: {u['registers']} registers, too many for {n} blocks of 256 threads")
    warnings = [w for w in re.findall(r"^.*warning.*$", log, re.M)
                if not (allowed_warnings and re.search(allowed_warnings, w))]
    problems += [f"sm_{arch}: {w}" for w in warnings]
    return problems


def test_every_kernel_builds_for_every_arch_without_spills(cubin_logs):
    # sm_75 needs the fallback of cvt.rn.f16x2.f32 (sm_80+) and 4 blocks per SM, Blackwell fewer blocks than
    # Hopper (its ptxas spills at 40 registers); none of them may spill, and each bound must hold
    problems = [p for arch, log in sorted(cubin_logs.items())
                for p in check_report(arch, log, KERNELS, lambda kernel, arch=arch: blocks_per_sm(kernel, arch))]
    for arch, log in sorted(cubin_logs.items()):
        usage = nvrtc_api.ptxas_usage(log)
        print(f"sm_{arch}: " + ", ".join(f"{k} {u['registers']}" for k, u in sorted(usage.items())))
    assert not problems, "\n".join(problems)


def test_a_kernel_built_for_sm80_only_is_caught(nvrtc):
    # the check above is not vacuous: lpd.cu with the sm_80 instruction unguarded fails to build for sm_75
    source = read_source().replace("#ifdef FERRET_F16X2\n__device__ __forceinline__ unsigned int ferret_cvt_f16x2",
                                   "#if 1\n__device__ __forceinline__ unsigned int ferret_cvt_f16x2", 1)
    assert source != read_source()
    with pytest.raises(nvrtc_api.KernelCompileError, match=r"cvt\.f16x2\.f32' requires \.target sm_80"):
        nvrtc_api.nvrtc_compile(source, SOURCE_PATH.name, "sm_75", "cubin", "lpd.cu, unguarded",
                             ("-DFERRET_ONLY", "-DFERRET_WANT_normalize_f16"))


# ------------------------------------------------------------------------------------------------ TensorRT
@pytest.fixture(scope="module")
def trt_ptx(nvrtc, tmp_path_factory) -> bytes:
    from ferret_export.tensorrt import plugin as trt_plugin

    assert trt_plugin.PTX_ARCH == 75
    return trt_plugin.compile_trt_ptx(cache=tmp_path_factory.mktemp("trt"))


def test_plugin_ptx_has_no_sm80_instruction(trt_ptx):
    text = trt_ptx.decode()
    assert re.search(r"^\.target sm_75$", text, re.M)
    assert re.findall(r"\.entry (\w+)", text)  # something to look at
    assert not re.findall(r"^\s*(?:cvt\.\w+\.f16x2\.f32|(?:min|max)[.\w]*\.f16x2)\b", text, re.M)


def _nvjitlink():
    try:
        from cuda.bindings import nvjitlink

        version = tuple(nvjitlink.version())  # loads libnvJitLink
    except Exception as e:  # ImportError, or the library missing
        pytest.skip(f"compiling PTX needs nvJitLink (pip install nvidia-nvjitlink): {type(e).__name__}: {e}")
    if version < tuple(nvrtc_api.nvrtc_version()):  # it reads PTX ISA versions up to its own
        pytest.skip(f"nvJitLink {version} is older than NVRTC {nvrtc_api.nvrtc_version()}, whose PTX it cannot read")
    return nvjitlink


def link_ptx(nvjitlink, ptx: bytes, arch: int) -> str:
    """The driver's JIT of ``ptx`` for sm_{arch}, done by nvJitLink: ptxas's -v report."""
    handle = nvjitlink.create(2, [f"-arch=sm_{arch}", "-Xptxas=-v"])
    try:
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, ptx, len(ptx), "lpd_trt.ptx")
        try:
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError:
            size = nvjitlink.get_error_log_size(handle)
            text = bytearray(size)
            nvjitlink.get_error_log(handle, text)
            raise AssertionError(f"sm_{arch}: {bytes(text).decode(errors='replace')}") from None
        size = nvjitlink.get_info_log_size(handle)
        text = bytearray(size)
        nvjitlink.get_info_log(handle, text)
        return bytes(text).decode(errors="replace")
    finally:
        nvjitlink.destroy(handle)


def test_plugin_ptx_compiles_for_every_arch_without_spills(trt_ptx, archs):
    from ferret_export.tensorrt import plugin as trt_plugin

    nvjitlink = _nvjitlink()
    entries = sorted(f"{base}_{s}" for base in trt_plugin.TRT_KERNEL_ARGS for s in ("f32", "f16"))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        logs = dict(zip(archs, pool.map(lambda a: link_ptx(nvjitlink, trt_ptx, a), archs)))
    # the PTX asks for 6 blocks per SM (trt_plugin.PTX_OPTIONS), which the JIT of a GPU of 1024 threads per SM
    # (sm_75, sm_107) cannot give and ignores: its registers must still let 4 blocks run there
    problems = [p for arch, log in sorted(logs.items()) for p in check_report(
        arch, log, entries, lambda kernel, arch=arch: 0 if kernel == "lpd_generic" else 4 if arch in SMALL_SM else 6,
        r"minnctapersm will be ignored" if arch in SMALL_SM else "")]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------ refusal
CUDA13_ARCHS = (75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121)
V100 = ("GPU 0 (Tesla V100-SXM2-16GB) is sm_70; NVRTC 13.0 builds lpd.cu for sm_75 to sm_121 (CUDA 13 dropped "
        "Maxwell, Pascal and Volta): for this GPU use CUDA 12, whose NVRTC still builds for it (pip install "
        "'cuda-python>=12.8,<13' nvidia-cuda-nvrtc-cu12, with a driver for CUDA 12 or newer), or run the LPD in the "
        "model's graph (ONNX Runtime or PyTorch) instead")


def test_a_v100_is_refused_in_one_line():
    with pytest.raises(cuda.CudaError) as info:
        nvrtc_api.check_arch(70, (13, 0), CUDA13_ARCHS, gpu="GPU 0 (Tesla V100-SXM2-16GB)")
    assert str(info.value) == V100
    # NVRTC 12 still builds for it, so nothing is refused there
    nvrtc_api.check_arch(70, (12, 9), (50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90))
    with pytest.raises(cuda.CudaError, match=r"^Received sm_130; NVRTC 13\.0 builds lpd\.cu for sm_75 to sm_121, "
                                               r"not yet for sm_130: expected a newer NVRTC"):
        nvrtc_api.check_arch(130, (13, 0), CUDA13_ARCHS)
    with pytest.raises(cuda.CudaError, match=r"^Received sm_101; .* but not sm_101 \(it lists 75, 80, "):
        nvrtc_api.check_arch(101, (13, 0), CUDA13_ARCHS)  # Thor: sm_110 since CUDA 13


def test_this_nvrtc_takes_every_arch_it_lists(nvrtc, tmp_path):
    version, supported = nvrtc
    for arch in supported:
        nvrtc_api.check_arch(arch)
    if version[0] >= 13:
        for target in ("cubin", "ptx"):  # before NVRTC runs
            with pytest.raises(cuda.CudaError, match=r"^Received sm_70; NVRTC 13\.\d+ builds lpd\.cu for sm_75 to "):
                nvrtc_api.compile_lpd(70, target, cache=tmp_path, kernels=("lpd_residual_f32",))


def test_the_runtime_refuses_a_v100_before_compiling(monkeypatch):
    # LpdModule on a (stand-in) V100 driver: one line naming the GPU, and no context, no NVRTC build
    attr = types.SimpleNamespace(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR="major",
                                 CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR="minor")

    def untouched(*args):
        raise AssertionError("the runtime went on past an unsupported GPU")

    drv = types.SimpleNamespace(
        cuInit=lambda flags: (0,), cuDeviceGet=lambda index: (0, index), CUdevice_attribute=attr,
        cuDeviceGetAttribute=lambda a, dev: (0, {"major": 7, "minor": 0}[a]),
        cuDeviceGetName=lambda size, dev: (0, b"Tesla V100-SXM2-16GB" + b"\0" * (size - 20)),
        cuDriverGetVersion=untouched, cuDevicePrimaryCtxRetain=untouched)
    monkeypatch.setattr(launch, "bindings", lambda name: drv if name == "driver" else untouched())
    monkeypatch.setattr(nvrtc_api, "nvrtc_version", lambda: (13, 0))
    monkeypatch.setattr(nvrtc_api, "nvrtc_supported_archs", lambda: CUDA13_ARCHS)
    monkeypatch.setattr(launch, "nvrtc_version", lambda: (13, 0))
    monkeypatch.setattr(launch, "compile_lpd", untouched)
    with pytest.raises(cuda.CudaError) as info:
        launch.LpdModule(0)
    assert str(info.value) == V100
