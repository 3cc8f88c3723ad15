"""What a Triton model repository needs to know about a model file: ``ModelDescription``, read from an
ONNX graph (names, dtypes, shapes, ``ferret.*`` metadata) or from a TensorRT engine's sidecar.

Beneath both the repository writer and the text templates, which each take a description."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferret_export.onnx.model import describe_onnx
from ferret_export.pipeline import FORMATS
from ferret_runtime import sidecar
from ferret_runtime.errors import ConfigError
from ferret_runtime.sidecar import TensorSpec

ONNX_SUFFIXES, ENGINE_SUFFIXES = FORMATS["onnx"].suffixes, FORMATS["tensorrt"].suffixes
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}


@dataclass(frozen=True)
class ModelDescription:
    """What the repository needs to know about a model file."""

    path: Path
    kind: str  # "onnx" or "tensorrt"
    props: dict[str, str]  # the ferret.* metadata as strings, as in metadata_props
    meta: dict[str, Any]  # the same, decoded (ferret_runtime.metadata.decode)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    extra_files: tuple[str, ...] = ()  # ONNX external-data files, relative to the model's folder
    tensorrt_version: str | None = None

    @property
    def platform(self) -> str:
        return PLATFORMS[self.kind][0]

    @property
    def filename(self) -> str:
        return PLATFORMS[self.kind][1]


# ----------------------------------------------------------------------------------------- reading
def describe_model(path: str | os.PathLike) -> ModelDescription:
    """Read names, dtypes, shapes and metadata from a .onnx, or from a TensorRT engine's sidecar."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in ONNX_SUFFIXES + ENGINE_SUFFIXES:
        raise ConfigError(f"{path}: received a model with suffix {path.suffix!r}; expected .onnx, .engine or .plan "
                          "(export a checkpoint first: ferret export onnx)")
    if not path.is_file():
        raise ConfigError(f"{path}: no such model file")
    desc = _describe_onnx(path) if suffix in ONNX_SUFFIXES else _describe_engine(path)
    if desc.meta["lpd_mode"] == "external":
        raise ConfigError(f"{path}: received a model without its LPD (ferret.lpd_mode=external), whose input is the "
                          "LPD residual the ferret runtime computes; expected a model with the LPD inside for Triton "
                          "(export with --lpd portable, or --lpd plugin for a TensorRT engine)")
    return desc


def _describe_onnx(path: Path) -> ModelDescription:
    model = describe_onnx(path)
    if model.meta["lpd_mode"] == "plugin":
        raise ConfigError(f"{path}: received an ONNX model with the ferret::lpd plugin node (ferret.lpd_mode=plugin); "
                          "expected a portable export for Triton's onnxruntime backend (export without --lpd plugin, "
                          "or build a TensorRT engine from it and pass the .engine)")
    return ModelDescription(path, "onnx", model.props, model.meta, model.inputs, model.outputs, model.external_files)


def _describe_engine(engine: Path) -> ModelDescription:
    side = sidecar.read(engine, "a TensorRT engine's input names, shapes and ferret.* metadata are read from this "
                        f"sidecar (TensorRT cannot be assumed here), expected next to {engine.name} as written by the "
                        "toolkit's TensorRT export (format: ferret_runtime/sidecar.py)", require_engine=False)
    return ModelDescription(engine, "tensorrt", side.props, side.meta, side.inputs, side.outputs,
                            tensorrt_version=side.tensorrt_version)
