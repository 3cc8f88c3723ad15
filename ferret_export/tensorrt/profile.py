"""What a TensorRT build takes from its graph and options: the LPD mode, the optimisation profile,
and the record the engine's sidecar keeps of both (``ferret_runtime.sidecar``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ferret_export.onnx.model import OnnxModel
from ferret_export.pipeline import LPD_MODES, PRECISIONS
from ferret_export.tensorrt.plugin import PLUGIN_CONTROL_ATTRS
from ferret_runtime import __version__
from ferret_runtime.errors import ConfigError
from ferret_runtime.sidecar import ENGINE_KEY, LPD_ALIASES

DEFAULT_BATCH: tuple[int, int, int] = (1, 64, 256)
MIN_HW = 8  # as 'ferret export onnx --input-size'


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


def lpd_mode(lpd: str | None) -> str | None:
    """``--lpd``, with 'native' (the old name) read as 'portable'; ConfigError for anything else."""
    lpd = LPD_ALIASES.get(lpd, lpd) if lpd is not None else None
    if lpd is not None and lpd not in LPD_MODES:
        raise ConfigError(f"Received --lpd {lpd!r}; expected one of {', '.join(LPD_MODES)}")
    return lpd


# ------------------------------------------------------------------------------------ the graph
def check_buildable(model: OnnxModel) -> None:
    """One 4-D image input, one output, a precision the build knows."""
    if model.precision not in PRECISIONS:
        raise ConfigError(f"{model.path}: received ferret.precision={model.precision!r}; expected one of "
                          f"{', '.join(PRECISIONS)}")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ConfigError(f"{model.path}: received {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
                          "expected one each")
    if len(model.input_shape) != 4:
        raise ConfigError(f"{model.path}: received an input of rank {len(model.input_shape)}; "
                          "expected a 4-D image batch")


def resolve_lpd(model: OnnxModel, lpd: str | None) -> str:
    """The build's LPD mode: the graph decides; ``lpd`` may only confirm it."""
    lpd = lpd_mode(lpd)
    graph = model.meta["lpd_mode"] if model.meta["lpd_mode"] in ("plugin", "external") else "portable"
    if lpd is not None and lpd != graph:
        what = {"plugin": "the ferret::lpd plugin node", "external": "no LPD (its input is the LPD residual)",
                "portable": "the LPD as standard operators"}[graph]
        raise ConfigError(f"Received --lpd {lpd} for {model.path.name}, a graph with {what}; "
                          f"expected --lpd {graph}, or a graph exported with 'ferret export onnx --lpd {lpd}' "
                          "(or --weights W, which exports one)")
    if graph == "plugin":
        from ferret_export.tensorrt.plugin import ATTRIBUTES, OPS, PLUGIN_NAMESPACE, check_attributes

        for op, attrs in model.plugin_nodes:
            if op not in OPS or attrs.get("plugin_namespace", b"").decode() not in ("", PLUGIN_NAMESPACE):
                raise ConfigError(f"{model.path}: received a custom node {op!r} ({attrs}); expected ferret::lpd")
            passed = [k for k in sorted(attrs) if k not in PLUGIN_CONTROL_ATTRS]
            if passed != sorted(ATTRIBUTES):
                raise ConfigError(f"{model.path}: received ferret::{op} attributes {passed}; "
                                  f"expected {list(ATTRIBUTES)}")
            check_attributes(attrs["func"].decode(), attrs["window_size"])
    return graph


# ------------------------------------------------------------------------------------ the profile
@dataclass(frozen=True)
class Profile:
    """The optimisation profile of the engine's one input."""

    input: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def hw_axes(model: OnnxModel) -> tuple[int, int]:
    """The input's height and width axes."""
    return (1, 2) if model.layout == "NHWC" else (2, 3)


def profile_shapes(model: OnnxModel, batch: tuple[int, int, int] | None = None,
                   dynamic_hw: tuple[int, int, int] | None = None) -> Profile:
    """min/opt/max input shapes: static dims as in the graph, the batch from ``batch`` (default
    DEFAULT_BATCH, or the graph's fixed batch), dynamic H and W both from ``dynamic_hw``."""
    shape, name = model.input_shape, model.path.name
    axes, c_axis = hw_axes(model), 3 if model.layout == "NHWC" else 1
    if shape[c_axis] != 3:
        raise ConfigError(f"{name}: received input shape {shape} in {model.layout}; expected 3 channels")
    n = shape[0]
    if n is not None:
        if batch is not None and tuple(batch) != (n, n, n):
            raise ConfigError(f"Received --batch {','.join(map(str, batch))} for {name}, whose batch is fixed at {n}; "
                              f"expected --batch {n},{n},{n} (or a graph exported with --dynamic)")
        batch = (n, n, n)
    batch = check_triple(tuple(batch or DEFAULT_BATCH), "--batch")
    dynamic = [a for a in axes if shape[a] is None]
    if dynamic and dynamic_hw is None:
        raise ConfigError(f"{name} has a dynamic height/width; expected --dynamic-hw MIN,OPT,MAX (square sizes, e.g. "
                          "224,256,512)")
    if not dynamic and dynamic_hw is not None:
        raise ConfigError(f"Received --dynamic-hw for {name}, whose input is fixed at {shape[axes[0]]}x"
                          f"{shape[axes[1]]}; expected no --dynamic-hw (or a graph exported with --dynamic-hw)")
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


# ---------------------------------------------------------------------------------- the record
def engine_record(model: OnnxModel, profile: Profile, *, tensorrt_version: str, gpu_name: str,
                  compute_capability: str, hardware_compat: bool, lpd: str, engine_sha256: str,
                  workspace_mb: int, plugin: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sidecar's ``ferret.engine`` entry: what the runtime checks before loading, and provenance."""
    return {
        "tensorrt_version": tensorrt_version, "gpu_name": gpu_name, "compute_capability": compute_capability,
        "hardware_compat": bool(hardware_compat), "lpd": lpd, "plugin": plugin, "precision": model.precision,
        "profiles": [{"input": profile.input, **profile.to_dict()}], "workspace_mb": workspace_mb,
        "source_onnx": model.path.name, "source_onnx_sha256": model.sha256, "source_onnx_weights": model.weights,
        "engine_sha256": engine_sha256, "toolkit_version": __version__,
    }


def sidecar_content(model: OnnxModel, profile: Profile, record: dict[str, Any]
                    ) -> tuple[dict[str, str], list[dict[str, Any]], list[dict[str, Any]]]:
    """(props, inputs, outputs) for ``ferret_runtime.sidecar.write``: the graph's ferret.* metadata
    (arch, LPD, preprocessing, threshold, precision, provenance), the build record, and the I/O."""
    props = dict(model.props)
    props[ENGINE_KEY] = json.dumps(record, sort_keys=True)
    inputs = [{**model.inputs[0].to_dict(), "profile": profile.to_dict()}]
    outputs = [model.outputs[0].to_dict()]
    return props, inputs, outputs
