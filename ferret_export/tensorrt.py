"""``ONNX -> TensorRT engine``: parse, build for one optimisation profile, verify against ONNX Runtime,
then write the engine and its sidecar.

Precision comes from the graph (``ferret.precision``: float32, float16 tensors, or Q/DQ for INT8):
the network is strongly typed, which TensorRT 11 always is and TensorRT 10 is with
``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; no precision builder flag is set (11 removed
them). For float32 graphs TF32 is switched off, so "fp32" means float32 arithmetic.

The LPD is either standard layers (``native``: the portable graph) or the ``ferret::lpd`` plugin
(``plugin``: the graph exported with ``--lpd plugin``; the kernel is embedded as PTX, see
``trt_plugin``). Before anything is written, TensorRT's logits are compared with ONNX Runtime's
(CPU) on real images and random batches at the profile's min/opt/max batch; a plugin graph is
compared with the same graph whose plugin node is replaced by the portable LPD.

Tolerances (TensorRT vs ONNX Runtime, both from the same graph):
  fp32  atol 1e-3 + rtol 1e-3   two float32 implementations (other conv algorithms, sum orders)
  fp16  atol 5e-2 + rtol 5e-3   twice the ONNX export's fp16 budget: each side is within it of float32
  int8  atol 2.5e-1 + rtol 5e-2 requantisation rounding may move a value by one step
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ferret_runtime import __version__
from ferret_runtime.backends.tensorrt import ENGINE_KEY, sidecar_path
from ferret_runtime.errors import ConfigError, FerretError
from ferret_runtime.fileio import atomic_write, sha256
from ferret_runtime.lpd_spec import get_lpd_spec
from ferret_runtime.metadata import PREFIX, decode
from ferret_runtime.preprocess import Preprocess, find_images, load_image, median_residual, normalize, prepare

from .verify import Comparison, ParityError, Tolerance, compare

DEFAULT_BATCH: tuple[int, int, int] = (1, 64, 256)
DEFAULT_WORKSPACE_MB = 4096
MIN_HW = 8  # as 'ferret export onnx --input-size'
LPD_MODES = ("native", "plugin", "external")  # external: no LPD in the engine (ferret export onnx --lpd external)
TOLERANCE = {"fp32": Tolerance(1e-3, 1e-3), "fp16": Tolerance(5e-2, 5e-3), "int8": Tolerance(2.5e-1, 5e-2)}
TRT_MISSING = "TensorRT is not installed: pip install 'ferretnet-deploy[trt]' (pulls tensorrt-cu13 from NVIDIA's index)"
PLUGIN_CONTROL_ATTRS = ("plugin_namespace", "plugin_version", "aot")  # read by the parser, not passed to the plugin


# --------------------------------------------------------------------------------------- options
def parse_triple(text: str, option: str) -> tuple[int, int, int]:
    """'1,64,256' -> (1, 64, 256) for --batch / --dynamic-hw; MIN <= OPT <= MAX, all >= 1."""
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ConfigError(f"Received {option} {text!r}; expected MIN,OPT,MAX, three integers such as 1,64,256")
    return check_triple(values, option)


def check_triple(values: tuple[int, ...], option: str, minimum: int = 1) -> tuple[int, int, int]:
    lo, opt, hi = values
    if lo < minimum:
        raise ConfigError(f"Received {option} {lo},{opt},{hi}; expected sizes >= {minimum}")
    if not lo <= opt <= hi:
        raise ConfigError(f"Received {option} {lo},{opt},{hi}; expected MIN <= OPT <= MAX")
    return lo, opt, hi


# ------------------------------------------------------------------------------------ the graph
@dataclass(frozen=True)
class OnnxModel:
    """What the build needs from an exported graph (weights not loaded)."""

    path: Path
    sha256: str
    props: dict[str, str]  # ferret.* metadata_props as strings
    meta: dict[str, Any]  # the same, decoded
    input_name: str
    input_dtype: str
    input_shape: tuple[int | None, ...]  # None: dynamic
    output_name: str
    output_dtype: str
    output_shape: tuple[int | None, ...]
    plugin_nodes: tuple[tuple[str, dict[str, Any]], ...] = ()  # (op_type, attributes) of ferret-domain nodes

    @property
    def precision(self) -> str:
        return self.meta["precision"]

    @property
    def layout(self) -> str:
        return self.meta["preprocess"].layout


_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 10: "float16", 6: "int32", 7: "int64", 16: "bfloat16"}


def _value_info(v, path: Path) -> tuple[str, str, tuple[int | None, ...]]:
    t = v.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim)
    if t.elem_type not in _ONNX_DTYPES:
        raise ConfigError(f"{path}: tensor {v.name!r} has ONNX element type {t.elem_type}; expected one of "
                          f"{', '.join(_ONNX_DTYPES.values())}")
    return v.name, _ONNX_DTYPES[t.elem_type], dims


def read_onnx_model(path: str | Path) -> OnnxModel:
    """Metadata, I/O and plugin nodes of a graph exported by 'ferret export onnx'."""
    try:
        import onnx
        from onnx import helper
    except ImportError:
        raise ConfigError("building an engine needs onnx: pip install 'ferretnet-deploy[export]'") from None
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and onnx's own errors
        raise ConfigError(f"{path}: received a file that is not an ONNX model ({type(e).__name__}); expected a .onnx "
                          "written by 'ferret export onnx'") from None
    props = {p.key: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}
    meta = decode(props, str(path))
    if meta["precision"] not in TOLERANCE:
        raise ConfigError(f"{path}: received ferret.precision={meta['precision']!r}; expected one of {', '.join(TOLERANCE)}")
    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise ConfigError(f"{path}: received {len(inputs)} inputs and {len(model.graph.output)} outputs; expected one each")
    in_name, in_dtype, in_shape = _value_info(inputs[0], path)
    out_name, out_dtype, out_shape = _value_info(model.graph.output[0], path)
    if len(in_shape) != 4:
        raise ConfigError(f"{path}: received an input of rank {len(in_shape)}; expected a 4-D image batch")
    plugins = tuple((n.op_type, {a.name: helper.get_attribute_value(a) for a in n.attribute})
                    for n in model.graph.node if n.domain not in ("", "ai.onnx"))
    return OnnxModel(path, sha256(path), props, meta, in_name, in_dtype, in_shape, out_name, out_dtype, out_shape,
                     plugins)


def resolve_lpd(model: OnnxModel, lpd: str | None) -> str:
    """The build's LPD mode: the graph decides; ``lpd`` may only confirm it."""
    if lpd is not None and lpd not in LPD_MODES:
        raise ConfigError(f"Received --lpd {lpd!r}; expected one of {', '.join(LPD_MODES)}")
    graph = model.meta["lpd_mode"] if model.meta["lpd_mode"] in ("plugin", "external") else "native"
    if lpd is not None and lpd != graph:
        what = {"plugin": "the ferret::lpd plugin node", "external": "no LPD (its input is the LPD residual)",
                "native": "the LPD as standard operators"}[graph]
        raise ConfigError(f"Received --lpd {lpd} for {model.path.name}, a graph with {what}; expected --lpd {graph}, or "
                          f"a graph exported with 'ferret export onnx --lpd {'portable' if lpd == 'native' else lpd}'"
                          " (or --weights W, which exports one)")
    if graph == "plugin":
        from .trt_plugin import ATTRIBUTES, OPS, PLUGIN_NAMESPACE, check_attributes

        for op, attrs in model.plugin_nodes:
            if op not in OPS or attrs.get("plugin_namespace", b"").decode() not in ("", PLUGIN_NAMESPACE):
                raise ConfigError(f"{model.path}: received a custom node {op!r} ({attrs}); expected ferret::lpd")
            passed = [k for k in sorted(attrs) if k not in PLUGIN_CONTROL_ATTRS]
            if passed != sorted(ATTRIBUTES):
                raise ConfigError(f"{model.path}: received ferret::{op} attributes {passed}; expected {list(ATTRIBUTES)}")
            check_attributes(attrs["func"].decode(), attrs["window_size"])
    return graph


@dataclass(frozen=True)
class Profile:
    """The optimisation profile of the engine's one input."""

    input: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def profile_shapes(model: OnnxModel, batch: tuple[int, int, int] | None = None,
                   dynamic_hw: tuple[int, int, int] | None = None) -> Profile:
    """min/opt/max input shapes: static dims as in the graph, the batch from ``batch`` (default
    DEFAULT_BATCH, or the graph's fixed batch), dynamic H and W both from ``dynamic_hw``."""
    shape, name = model.input_shape, model.path.name
    hw_axes, c_axis = ((1, 2), 3) if model.layout == "NHWC" else ((2, 3), 1)
    if shape[c_axis] != 3:
        raise ConfigError(f"{name}: received input shape {shape} in {model.layout}; expected 3 channels")
    n = shape[0]
    if n is not None:
        if batch is not None and tuple(batch) != (n, n, n):
            raise ConfigError(f"Received --batch {','.join(map(str, batch))} for {name}, whose batch is fixed at {n}; "
                              f"expected --batch {n},{n},{n} (or a graph exported with --dynamic)")
        batch = (n, n, n)
    batch = check_triple(tuple(batch or DEFAULT_BATCH), "--batch")
    dynamic = [a for a in hw_axes if shape[a] is None]
    if dynamic and dynamic_hw is None:
        raise ConfigError(f"{name} has a dynamic height/width; expected --dynamic-hw MIN,OPT,MAX (square sizes, e.g. "
                          "224,256,512)")
    if not dynamic and dynamic_hw is not None:
        raise ConfigError(f"Received --dynamic-hw for {name}, whose input is fixed at {shape[hw_axes[0]]}x"
                          f"{shape[hw_axes[1]]}; expected no --dynamic-hw (or a graph exported with --dynamic-hw)")
    if dynamic:
        dynamic_hw = check_triple(tuple(dynamic_hw), "--dynamic-hw", MIN_HW)
    shapes = []
    for i in range(3):
        s = list(shape)
        s[0] = batch[i]
        for a in dynamic:
            s[a] = dynamic_hw[i]
        shapes.append(tuple(int(d) for d in s))
    return Profile(model.input_name, *shapes)


# ---------------------------------------------------------------------------------- the sidecar
def engine_record(model: OnnxModel, profile: Profile, *, tensorrt_version: str, gpu_name: str,
                  compute_capability: str, hardware_compat: bool, lpd: str, engine_sha256: str,
                  workspace_mb: int, plugin: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sidecar's ``ferret.engine`` entry: what the runtime checks before loading, and provenance."""
    return {
        "tensorrt_version": tensorrt_version, "gpu_name": gpu_name, "compute_capability": compute_capability,
        "hardware_compat": bool(hardware_compat), "lpd": lpd, "plugin": plugin, "precision": model.precision,
        "profiles": [{"input": profile.input, **profile.to_dict()}], "workspace_mb": workspace_mb,
        "source_onnx": model.path.name, "source_onnx_sha256": model.sha256, "engine_sha256": engine_sha256,
        "toolkit_version": __version__,
    }


def sidecar_content(model: OnnxModel, profile: Profile, record: dict[str, Any]
                    ) -> tuple[dict[str, str], list[dict[str, Any]], list[dict[str, Any]]]:
    """(props, inputs, outputs) for ``triton.write_engine_sidecar``: the graph's ferret.* metadata
    (arch, LPD, preprocessing, threshold, precision, provenance), the build record, and the I/O."""
    props = dict(model.props)
    props[ENGINE_KEY] = json.dumps(record, sort_keys=True)
    dims = lambda s: [d if d is not None else -1 for d in s]  # noqa: E731
    inputs = [{"name": model.input_name, "dtype": model.input_dtype, "shape": dims(model.input_shape),
               "profile": profile.to_dict()}]
    outputs = [{"name": model.output_name, "dtype": model.output_dtype, "shape": dims(model.output_shape)}]
    return props, inputs, outputs


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
    ``lpd=None``: the graph's LPD ('plugin' for a graph with the ferret::lpd node, else 'native')."""
    out = Path(out_engine)
    if out.suffix.lower() not in (".engine", ".plan"):
        raise ConfigError(f"Received --out {out}; expected a .engine or .plan path")
    if not isinstance(workspace_mb, int) or workspace_mb < 1:
        raise ConfigError(f"Received --workspace-mb {workspace_mb!r}; expected a positive number of MiB")
    model = read_onnx_model(onnx_path)
    lpd = resolve_lpd(model, lpd)
    profile = profile_shapes(model, batch, dynamic_hw)
    tol = TOLERANCE[model.precision]
    trt = import_tensorrt()
    gpu = require_gpu()
    if hardware_compat and gpu.compute_capability < (8, 0):
        raise ConfigError(f"Received --hardware-compat on {gpu.name} (compute capability {gpu.sm}); expected an "
                          "Ampere or newer GPU (compute capability 8.0+) to build hardware-compatible engines")
    plugin = None
    if lpd == "plugin":
        from . import trt_plugin

        _check_plugin_launch(model, profile)
        trt_plugin.register_plugin()
        plugin = trt_plugin.plugin_record()
    log(f"[build] {model.path.name} ({model.meta['arch']} {model.meta['lpd_func']}/{model.meta['window_size']}, "
        f"{model.precision}, lpd {lpd}) -> {out.name}: TensorRT {trt.__version__} on {gpu.name} (sm {gpu.sm}), "
        f"profile {profile.min} / {profile.opt} / {profile.max}")

    logger = _logger(trt, log)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, plugin is not None))
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
        raise FerretError(f"{model.path}: TensorRT could not build an engine: {'; '.join(logger.errors) or 'see its log'}")
    blob = bytes(serialized)
    log(f"[build] built in {seconds:.1f} s ({len(blob) / 1e6:.1f} MB)")
    if timing_cache is not None:
        cache = bytes(config.get_timing_cache().serialize())
        atomic_write(timing_cache, lambda f: f.write(cache))
        log(f"[build] timing cache saved to {timing_cache} ({len(cache) / 1e3:.0f} kB)")

    record = engine_record(model, profile, tensorrt_version=trt.__version__, gpu_name=gpu.name,
                           compute_capability=gpu.sm, hardware_compat=hardware_compat, lpd=lpd,
                           engine_sha256=hashlib.sha256(blob).hexdigest(), workspace_mb=workspace_mb, plugin=plugin)
    content = sidecar_content(model, profile, record)
    comparisons: list[Comparison] = []
    if verify:
        comparisons = verify_engine(blob, content, model, profile, tol, out, verify_images, log)
    _write(out, blob, content)
    log(f"[build] wrote {out} and {sidecar_path(out).name}")
    return BuildResult(out, sidecar_path(out), record, profile, comparisons, seconds)


def _check_plugin_launch(model: OnnxModel, profile: Profile) -> None:
    """The kernel's limits (launch_config's checks) at the profile's largest shape, before building."""
    from ferret_runtime.kernels.launch import launch_config

    from .trt_plugin import PTX_ARCH

    n, *rest = profile.max
    h, w = rest[:2] if model.layout == "NHWC" else rest[1:]
    for op, attrs in model.plugin_nodes:
        launch_config("lpd_generic", (n, 3, h, w), "float32", PTX_ARCH, int(attrs["window_size"]))


def _write(out: Path, blob: bytes, content: tuple) -> None:
    """The engine, then its sidecar, each atomically; the old sidecar goes first, so a crash in
    between leaves an engine without a sidecar (refused), never a sidecar describing another engine."""
    from .triton import write_engine_sidecar

    sidecar_path(out).unlink(missing_ok=True)
    atomic_write(out, lambda f: f.write(blob))
    props, inputs, outputs = content
    write_engine_sidecar(out, props, inputs, outputs, tensorrt_version=_record(props)["tensorrt_version"])


def _record(props: dict[str, str]) -> dict[str, Any]:
    return json.loads(props[ENGINE_KEY])


# ----------------------------------------------------------------------------------- verification
def portable_reference(model_path: Path) -> Any:
    """The graph as ONNX Runtime can run it: each ferret::lpd node replaced by the portable LPD."""
    import onnx
    from onnx import TensorProto, helper

    from .onnx_graph import GraphBuilder, lpd_nodes

    proto = onnx.load(str(model_path))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    nodes = []
    start = 10 * (len(proto.graph.node) + len(proto.graph.initializer))  # above every name the export numbered
    for node in proto.graph.node:
        if node.domain in ("", "ai.onnx"):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        func, k = attrs["func"].decode(), int(attrs["window_size"])
        g = GraphBuilder(opset, TensorProto.FLOAT, _n=start)  # the LPD is float32 in every export
        x = node.input[0]
        rec = lpd_nodes(g, x, get_lpd_spec(func), k)
        out = g.op("Sub", [x, rec], "lpd_res") if node.op_type == "lpd_residual" else rec
        g.nodes.append(helper.make_node("Identity", [out], [node.output[0]], name=node.name + "_portable"))
        nodes += g.nodes
        proto.graph.initializer.extend(g.inits)
        start = g._n + 1
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    keep = [o for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    return proto


def _cases(model: OnnxModel, profile: Profile, images: list[Path]) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 NHWC batch): real images at the opt size, random batches at min/opt/max batch,
    and with a dynamic H/W the smallest and largest sizes."""
    hw_axes = (1, 2) if model.layout == "NHWC" else (2, 3)
    h, w = (profile.opt[a] for a in hw_axes)
    pre: Preprocess = model.meta["preprocess"]
    real = np.stack([prepare(load_image(p), replace(pre, crop=h)) for p in images]) if h == w else None
    rng = np.random.default_rng(0)
    cases = []
    if real is not None:
        n = int(np.clip(len(real), profile.min[0], profile.max[0]))
        cases.append((f"real images ({len(images)})", np.resize(real, (n, *real.shape[1:]))))
    for label, b in zip(("min", "opt", "max"), (profile.min[0], profile.opt[0], profile.max[0])):
        cases.append((f"random, {label} batch {b}", rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)))
    for label, shape in (("min", profile.min), ("max", profile.max)):
        sh, sw = (shape[a] for a in hw_axes)
        if (sh, sw) != (h, w):
            cases.append((f"random, {label} size {sh}x{sw}", rng.integers(0, 256, (profile.min[0], sh, sw, 3),
                                                                          dtype=np.uint8)))
    return cases


def _feed(u8: np.ndarray, model: OnnxModel) -> np.ndarray:
    """The graph's input for decoded images, prepared on the host (ONNX Runtime's side of the check)."""
    pre: Preprocess = model.meta["preprocess"]
    if pre.dtype == "uint8":
        return u8 if pre.layout == "NHWC" else np.ascontiguousarray(u8.transpose(0, 3, 1, 2))
    x = normalize(u8, pre.mean, pre.std)
    if model.meta["lpd_mode"] == "external":
        x = median_residual(x)
    return x.astype(pre.dtype)


def verify_engine(blob: bytes, content: tuple, model: OnnxModel, profile: Profile, tol: Tolerance, out: Path,
                  verify_images: list | None, log: Callable[[str], None]) -> list[Comparison]:
    """TensorRT (through the runtime's TrtBackend) vs ONNX Runtime (CPU); ParityError on any failure."""
    import onnxruntime as ort

    from ferret_runtime.backends.tensorrt import TrtBackend
    from ferret_runtime.samples import write_samples

    from .triton import write_engine_sidecar

    reference = portable_reference(model.path) if model.plugin_nodes else None
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(reference.SerializeToString() if reference is not None else str(model.path), so,
                                providers=["CPUExecutionProvider"])
    results = []
    with tempfile.TemporaryDirectory(prefix=".ferret-verify-", dir=out.parent if out.parent.is_dir() else None) as tmp:
        engine = Path(tmp) / out.name
        engine.write_bytes(blob)
        props, inputs, outputs = content
        write_engine_sidecar(engine, props, inputs, outputs, tensorrt_version=_record(props)["tensorrt_version"])
        hw = profile.opt[1] if model.layout == "NHWC" else profile.opt[2]
        images = find_images(verify_images) if verify_images else write_samples(Path(tmp) / "samples", n=2, size=hw)
        with TrtBackend(engine) as backend:  # as deployed: float engines get uint8, preprocessed on the GPU
            for name, u8 in _cases(model, profile, images):
                feed = _feed(u8, model)
                got = backend.run_impl(np.ascontiguousarray(u8) if backend.kernel else feed)
                ref = sess.run(None, {model.input_name: feed})[0]
                c = compare(name, feed.shape, np.asarray(got).reshape(ref.shape), ref, tol)
                log(f"[verify] {c}")
                results.append(c)
    failed = [c for c in results if not c.passed]
    if failed:
        raise ParityError(f"{out}: not written: {len(failed)} of {len(results)} verification cases exceed {tol} "
                          f"(worst max abs err {max(c.max_abs for c in failed):.3e})")
    return results


# ------------------------------------------------------------------------------ from a checkpoint
def export_and_build(weights: str | Path, out_engine: str | Path, *, precision: str = "fp32", input_size: int = 256,
                     dynamic_hw: tuple[int, int, int] | None = None, lpd: str | None = None,
                     verify_images: list | None = None, log: Callable[[str], None] = print,
                     **build_options: Any) -> BuildResult:
    """Export ``weights`` to ONNX in a temporary directory (options matching the build), then build.

    ``precision``: 'fp32', 'fp16' (float16 graph) or 'int8' (Q/DQ graph from ``ferret_export.quantize``,
    calibrated on ``verify_images``, which it then requires).
    ``lpd=None`` means 'native'. TensorRT and the GPU are checked before the (slower) export.
    """
    from .onnx_export import export_onnx
    from .onnx_graph import GraphOptions

    if precision not in TOLERANCE:
        raise ConfigError(f"Received precision {precision!r}; expected one of {', '.join(TOLERANCE)}")
    lpd = lpd or "native"
    if lpd not in LPD_MODES:
        raise ConfigError(f"Received --lpd {lpd!r}; expected one of {', '.join(LPD_MODES)}")
    if precision == "int8" and (lpd != "native" or not verify_images):
        raise ConfigError("Received --int8 " + (f"with --lpd {lpd}; expected --lpd native (ONNX Runtime calibrates the "
                          "portable graph)" if lpd != "native" else "without --verify-images; expected real images to "
                          "calibrate the INT8 ranges on"))
    import_tensorrt()
    require_gpu()
    quantize = _quantizer() if precision == "int8" else None
    opts = GraphOptions(fp16=precision == "fp16", dynamic_batch=True, dynamic_hw=dynamic_hw is not None,
                        input_size=input_size, lpd="portable" if lpd == "native" else lpd)
    with tempfile.TemporaryDirectory(prefix="ferret-trt-") as tmp:
        onnx_path = Path(tmp) / (Path(out_engine).stem + ".onnx")
        export_onnx(weights, onnx_path, opts, verify_images=verify_images, log=log)
        if quantize is not None:
            q_path = onnx_path.with_name(onnx_path.stem + "-int8.onnx")
            quantize(onnx_path, q_path, verify_images, log=log)  # calibrated on the verification images
            onnx_path = q_path
        return build_engine(onnx_path, out_engine, dynamic_hw=dynamic_hw, lpd=lpd, verify_images=verify_images,
                            log=log, **build_options)


def _quantizer() -> Callable[..., Any]:
    try:
        from .quantize import quantize_int8
    except ImportError:
        raise ConfigError("Received --int8, but ferret_export.quantize (INT8 Q/DQ graphs) is not available in this "
                          "install; expected a Q/DQ graph passed with --onnx instead") from None
    return quantize_int8
