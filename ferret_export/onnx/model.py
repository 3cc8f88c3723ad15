"""What an exported ONNX file says about itself, read once for every consumer (the TensorRT build,
the Triton repository): I/O names, dtypes and shapes, ``ferret.*`` metadata, plugin nodes,
external-data files and the size of its weights. The weights themselves are not loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ferret_runtime.errors import ConfigError
from ferret_runtime.fileio import sha256
from ferret_runtime.metadata import PREFIX, decode
from ferret_runtime.sidecar import TensorSpec

# ONNX TensorProto element type -> numpy dtype name
ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string",
               9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}
STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class OnnxModel:
    """An exported graph as its consumers see it."""

    path: Path
    props: dict[str, str]  # ferret.* metadata_props as strings
    meta: dict[str, Any]  # the same, decoded
    inputs: tuple[TensorSpec, ...]  # -1: a dynamic dimension
    outputs: tuple[TensorSpec, ...]
    plugin_nodes: tuple[tuple[str, dict[str, Any]], ...] = ()  # (op_type, attributes) of custom-domain nodes
    external_files: tuple[str, ...] = ()  # external-data files, relative to the model's folder
    weights: int = 0  # values the initializers hold (what check_arch_size measures)

    @cached_property
    def sha256(self) -> str:
        return sha256(self.path)

    @property
    def precision(self) -> str:
        return self.meta["precision"]

    @property
    def layout(self) -> str:
        return self.meta["preprocess"].layout

    @property
    def input_name(self) -> str:
        return self.inputs[0].name

    @property
    def input_dtype(self) -> str:
        return self.inputs[0].dtype

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        """The input's shape, None for a dynamic dimension."""
        return tuple(None if d == -1 else d for d in self.inputs[0].shape)

    @property
    def output_name(self) -> str:
        return self.outputs[0].name

    @property
    def output_dtype(self) -> str:
        return self.outputs[0].dtype

    @property
    def output_shape(self) -> tuple[int | None, ...]:
        return tuple(None if d == -1 else d for d in self.outputs[0].shape)


def describe_onnx(path: str | Path) -> OnnxModel:
    """Inputs, outputs, ``ferret.*`` metadata, plugin nodes and external files of a .onnx."""
    try:
        import onnx
        from onnx import helper
    except ImportError:
        raise ConfigError("reading an ONNX model needs onnx: pip install 'ferretnet-deploy[export]'") from None
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, onnx's own errors
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: received a file that is not an ONNX model ({first}); expected a .onnx "
                          "written by 'ferret export onnx'") from None
    props = {p.key: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}
    meta = decode(props, str(path))
    inits = {t.name for t in model.graph.initializer}
    plugins = tuple((n.op_type, {a.name: helper.get_attribute_value(a) for a in n.attribute})
                    for n in model.graph.node if n.domain not in STANDARD_DOMAINS)
    weights = sum(math.prod(t.dims) for t in model.graph.initializer)
    return OnnxModel(path, props, meta, _tensors(model.graph.input, inits, path, "input"),
                     _tensors(model.graph.output, set(), path, "output"), plugins, _external_files(model, path),
                     weights)


def _tensors(values, initializers: set[str], path: Path, what: str) -> tuple[TensorSpec, ...]:
    out = []
    for v in values:
        if v.name in initializers:  # IR < 4 lists initializers among the inputs
            continue
        if not v.type.HasField("tensor_type"):
            raise ConfigError(f"{path}: received {what} {v.name!r} that is not a tensor; expected tensors only")
        tt = v.type.tensor_type
        if tt.elem_type not in ONNX_DTYPES:
            raise ConfigError(f"{path}: received {what} {v.name!r} of ONNX element type {tt.elem_type}; "
                              f"expected one of {sorted(set(ONNX_DTYPES.values()))}")
        if not tt.HasField("shape"):
            raise ConfigError(f"{path}: received {what} {v.name!r} without a shape; expected a tensor of known rank")
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim)
        out.append(TensorSpec(v.name, ONNX_DTYPES[tt.elem_type], shape))
    return tuple(out)


def _external_files(model, path: Path) -> tuple[str, ...]:
    """Relative paths of the external-data files the graph's initializers point to."""
    from onnx import TensorProto

    files = []
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), None)
        rel = Path(loc) if loc else None
        if rel is None or rel.is_absolute() or ".." in rel.parts:
            raise ConfigError(f"{path}: received external data location {loc!r} for tensor {t.name!r}; "
                              "expected a path relative to the model's folder")
        if not (path.parent / rel).is_file():
            raise ConfigError(f"{path}: external data file {path.parent / rel} (tensor {t.name!r}) does not exist")
        if str(rel) not in files:
            files.append(str(rel))
    return tuple(files)
