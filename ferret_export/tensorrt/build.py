"""``ONNX -> TensorRT engine``: parse, build for one optimisation profile, verify against ONNX Runtime
(``trt_verify``), then write the engine and its sidecar (``ferret_runtime.sidecar``).

Precision comes from the graph (``ferret.precision``: float32, float16 tensors, or Q/DQ for INT8):
the network is strongly typed, which TensorRT 11 always is and TensorRT 10 is with
``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; no precision builder flag is set (11 removed
them). For float32 graphs TF32 is switched off, so "fp32" means float32 arithmetic.

The LPD is either standard layers (``portable``: the portable graph) or the ``ferret::lpd`` plugin
(``plugin``: the graph exported with ``--lpd plugin``; the kernel is embedded as PTX, see
``trt_plugin``). From a checkpoint, :func:`export_and_build` runs the export pipeline's stages
first (``pipeline``: ONNX, then INT8 by the same rules as ``ferret export onnx --int8``).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferret_export.onnx.model import OnnxModel, describe_onnx
from ferret_export.pipeline import Int8Options, check_out, check_request
from ferret_export.tensorrt.profile import (
    DEFAULT_BATCH,
    Profile,
    check_buildable,
    engine_record,
    lpd_mode,
    profile_shapes,
    resolve_lpd,
    sidecar_content,
)
from ferret_export.tensorrt.verify import TOLERANCE, verify_engine
from ferret_export.verify import Comparison
from ferret_runtime import sidecar
from ferret_runtime.errors import ConfigError, FerretError
from ferret_runtime.fileio import atomic_write

__all__ = ["DEFAULT_BATCH", "DEFAULT_WORKSPACE_MB", "BuildResult", "build_engine", "export_and_build"]

DEFAULT_WORKSPACE_MB = 4096
TRT_MISSING = "TensorRT is not installed: pip install 'ferretnet-deploy[trt]' (pulls tensorrt-cu13 from NVIDIA's index)"


# --------------------------------------------------------------------------------- environment
def import_tensorrt() -> Any:
    """``tensorrt``, or one ConfigError line saying how to install it."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:
        detail = "" if isinstance(e, ModuleNotFoundError) else f" ({type(e).__name__}: {e})"
        raise ConfigError(TRT_MISSING + detail) from None
    return tensorrt


def require_gpu(index: int = 0) -> Any:
    """The GPU TensorRT will build for (``ferret_runtime.cuda.DeviceInfo``), or ConfigError."""
    from ferret_runtime import cuda

    try:
        return cuda.device_info(index)
    except cuda.CudaError as e:
        raise ConfigError(f"TensorRT needs a CUDA GPU and driver; found none ({e})") from None


def network_flags(trt: Any, plugin: bool) -> int:
    """Strongly typed on TensorRT 10 (the flag is deprecated and always on in 11), and AOT plugins preferred."""
    flags = 0
    kinds = trt.NetworkDefinitionCreationFlag
    if int(str(trt.__version__).split(".")[0]) < 11:
        flags |= 1 << int(kinds.STRONGLY_TYPED)
    if plugin and hasattr(kinds, "PREFER_AOT_PYTHON_PLUGINS"):
        flags |= 1 << int(kinds.PREFER_AOT_PYTHON_PLUGINS)
    return flags


def _logger(trt: Any, log: Callable[[str], None]) -> Any:
    class Logger(trt.ILogger):
        """Prints warnings and errors through ``log`` and keeps errors for the exception message."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                log(f"[tensorrt] {msg}")

    return Logger()


# ------------------------------------------------------------------------------------------ build
@dataclass
class BuildResult:
    path: Path
    sidecar: Path
    record: dict[str, Any]
    profile: Profile
    comparisons: list[Comparison] = field(default_factory=list)
    build_seconds: float = 0.0


def _parse(trt: Any, network: Any, logger: Any, model: OnnxModel) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model.path)):  # from the file, so external weights are found beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "; ".join(logger.errors)
        raise ConfigError(f"{model.path}: TensorRT's ONNX parser refused the graph: {errors}")


def _timing_cache(config: Any, path: Path | None, log: Callable[[str], None]) -> None:
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):  # from another GPU or TensorRT: start a new one
        log(f"[build] timing cache {path} does not match this GPU/TensorRT; starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), False)
    elif data:
        log(f"[build] timing cache {path}: {len(data) / 1e3:.0f} kB reused")


def build_engine(onnx_path: str | Path, out_engine: str | Path, *, batch: tuple[int, int, int] | None = None,
                 dynamic_hw: tuple[int, int, int] | None = None, workspace_mb: int = DEFAULT_WORKSPACE_MB,
                 timing_cache: Path | None = None, hardware_compat: bool = False, lpd: str | None = None,
                 verify: bool = True, verify_images: list | None = None,
                 log: Callable[[str], None] = print) -> BuildResult:
    """Build ``out_engine`` and ``out_engine.json`` from an exported graph; nothing is written unless
    verification passes. ``batch=None``: DEFAULT_BATCH (1, 64, 256), or the graph's fixed batch;
    ``lpd=None``: the graph's LPD ('plugin' for a graph with the ferret::lpd node, else 'portable')."""
    out = Path(out_engine)
    check_out("tensorrt", out)
    if not isinstance(workspace_mb, int) or workspace_mb < 1:
        raise ConfigError(f"Received --workspace-mb {workspace_mb!r}; expected a positive number of MiB")
    model = describe_onnx(onnx_path)
    check_buildable(model)
    lpd = resolve_lpd(model, lpd)
    profile = profile_shapes(model, batch, dynamic_hw)
    trt = import_tensorrt()
    gpu = require_gpu()
    if hardware_compat and gpu.compute_capability < (8, 0):
        raise ConfigError(f"Received --hardware-compat on {gpu.name} (compute capability {gpu.sm}); expected an "
                          "Ampere or newer GPU (compute capability 8.0+) to build hardware-compatible engines")
    plugin = _prepare_plugin(model, profile) if lpd == "plugin" else None
    log(f"[build] {model.path.name} ({model.meta['arch']} {model.meta['lpd_func']}/{model.meta['window_size']}, "
        f"{model.precision}, lpd {lpd}) -> {out.name}: TensorRT {trt.__version__} on {gpu.name} (sm {gpu.sm}), "
        f"profile {profile.min} / {profile.opt} / {profile.max}")
    blob, seconds = _build(trt, model, profile, workspace_mb=workspace_mb, timing_cache=timing_cache,
                           hardware_compat=hardware_compat, plugin=plugin is not None, log=log)
    record = engine_record(model, profile, tensorrt_version=trt.__version__, gpu_name=gpu.name,
                           compute_capability=gpu.sm, hardware_compat=hardware_compat, lpd=lpd,
                           engine_sha256=hashlib.sha256(blob).hexdigest(), workspace_mb=workspace_mb, plugin=plugin)
    content = sidecar_content(model, profile, record)
    comparisons: list[Comparison] = []
    if verify:
        comparisons = verify_engine(blob, content, model, profile, TOLERANCE[model.precision], out, verify_images, log)
    _write(out, blob, content, trt.__version__)
    log(f"[build] wrote {out} and {sidecar.path(out).name}")
    return BuildResult(out, sidecar.path(out), record, profile, comparisons, seconds)


def _build(trt: Any, model: OnnxModel, profile: Profile, *, workspace_mb: int, timing_cache: Path | None,
           hardware_compat: bool, plugin: bool, log: Callable[[str], None]) -> tuple[bytes, float]:
    """(serialized engine, build seconds); the timing cache, if any, saved back."""
    logger = _logger(trt, log)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, plugin))
    _parse(trt, network, logger, model)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if model.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # float32 graphs get float32 convolutions, not TF32's 10-bit mantissa
    if hardware_compat:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    _timing_cache(config, timing_cache, log)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(profile.input, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(opt_profile)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise FerretError(f"{model.path}: TensorRT could not build an engine: "
                          f"{'; '.join(logger.errors) or 'see its log'}")
    blob = bytes(serialized)
    log(f"[build] built in {seconds:.1f} s ({len(blob) / 1e6:.1f} MB)")
    if timing_cache is not None:
        cache = bytes(config.get_timing_cache().serialize())
        atomic_write(timing_cache, cache)
        log(f"[build] timing cache saved to {timing_cache} ({len(cache) / 1e3:.0f} kB)")
    return blob, seconds


def _prepare_plugin(model: OnnxModel, profile: Profile) -> dict[str, Any]:
    """Check the kernel's limits, register ferret::lpd; the sidecar's record of the plugin."""
    from ferret_export.tensorrt import plugin as trt_plugin

    _check_plugin_launch(model, profile)
    trt_plugin.register_plugin()
    return trt_plugin.plugin_record()


def _check_plugin_launch(model: OnnxModel, profile: Profile) -> None:
    """The kernel's limits (launch_config's checks) at the profile's largest shape, before building."""
    from ferret_export.tensorrt.plugin import PTX_ARCH
    from ferret_runtime.kernels.launch import launch_config

    n, *rest = profile.max
    h, w = rest[:2] if model.layout == "NHWC" else rest[1:]
    for _op, attrs in model.plugin_nodes:
        launch_config("lpd_generic", (n, 3, h, w), "float32", PTX_ARCH, int(attrs["window_size"]))


def _write(out: Path, blob: bytes, content: tuple, tensorrt_version: str) -> None:
    """The engine, then its sidecar, each atomically; the old sidecar goes first, so a crash in
    between leaves an engine without a sidecar (refused), never a sidecar describing another engine."""
    sidecar.path(out).unlink(missing_ok=True)
    atomic_write(out, blob)
    props, inputs, outputs = content
    sidecar.write(out, props, inputs, outputs, tensorrt_version=tensorrt_version)


# ------------------------------------------------------------------------------ from a checkpoint
def export_and_build(weights: str | Path, out_engine: str | Path, *, precision: str = "fp32", input_size: int = 256,
                     dynamic_hw: tuple[int, int, int] | None = None, lpd: str | None = None,
                     verify_images: list | None = None, int8: Int8Options | None = None,
                     log: Callable[[str], None] = print, **build_options: Any) -> BuildResult:
    """Export ``weights`` to ONNX in a temporary directory (options matching the build), then build.

    ``precision``: 'fp32', 'fp16' (float16 graph) or 'int8' (the pipeline's INT8 stage: calibrated on
    ``int8.calib_data``, which it then requires, and held to ``int8.min_agreement``).
    ``lpd=None`` means 'portable'. TensorRT and the GPU are checked before the (slower) export.
    """
    from ferret_export.onnx.graph import GraphOptions
    from ferret_export.pipeline import to_onnx

    lpd = lpd_mode(lpd) or "portable"
    check_request("tensorrt", precision=precision, lpd=lpd, int8=int8)
    check_out("tensorrt", out_engine)
    import_tensorrt()
    require_gpu()
    opts = GraphOptions(fp16=precision == "fp16", dynamic_batch=True, dynamic_hw=dynamic_hw is not None,
                        input_size=input_size, lpd=lpd)
    with tempfile.TemporaryDirectory(prefix="ferret-trt-") as tmp:
        onnx_path = Path(tmp) / (Path(out_engine).stem + ".onnx")
        to_onnx(weights, onnx_path, opts, int8 if precision == "int8" else None, verify_images=verify_images, log=log)
        return build_engine(onnx_path, out_engine, dynamic_hw=dynamic_hw, lpd=lpd, verify_images=verify_images,
                            log=log, **build_options)
