"""The TensorRT engine sidecar ``M.engine.json``: its one definition, written by ``ferret export
tensorrt``, read by the runtime's TensorRT backend and by ``ferret export triton``.

An engine is opaque without TensorRT and only runs on the GPU and TensorRT it was built with, so
what the runtime must check before loading it, and what Triton's config needs, lives beside it.
Torch-free and TensorRT-free: a wrong file is refused here, before either is imported.

Format (version 1)::

    {
      "format": "ferret-tensorrt-sidecar",        # optional when reading
      "version": 1,                               # optional when reading; > 1 is refused
      "ferret.arch": "ferretnet-s",               # every ferret.* key of the ONNX model the engine was
      "ferret.preprocess": "{\\"crop\\": 256, ...}", #   built from, as in its metadata_props: strings,
      ...                                         #   dict values as JSON text (JSON objects/numbers
                                                  #   are accepted too and encoded the same way)
      "ferret.engine": {...},                     # how it was built (the runtime requires it):
                                                  #   tensorrt_version, gpu_name, compute_capability,
                                                  #   hardware_compat, engine_sha256, lpd, plugin,
                                                  #   profiles, source_onnx(_sha256, _weights), ...
      "inputs":  [{"name": "input", "dtype": "float32", "shape": [-1, 3, 256, 256],
                   "profile": {"min": [1, 3, 256, 256], "opt": [16, 3, 256, 256],
                               "max": [64, 3, 256, 256]}}],          # profile: optional
      "outputs": [{"name": "logit", "dtype": "float32", "shape": [-1, 1]}],
      "tensorrt_version": "10.x.y"                # optional, informative
    }

``shape`` includes the batch dimension; -1 marks a dynamic dimension. ``dtype`` is a numpy name
(``float32``, ``float16``, ``uint8``, ``int32``, ``int64``, ``bool``, ...) or a TensorRT
``DataType`` name (``FLOAT``, ``HALF``, ``UINT8``, ...). ``source_onnx_weights`` (how many values
the source graph's weights hold) is checked against the architecture ``ferret.arch`` names, as the
ONNX backend checks a graph; sidecars written before it was recorded are read without that check.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .fileio import atomic_write
from .metadata import PREFIX, check_arch_size, check_logit_output, decode

FORMAT, VERSION = "ferret-tensorrt-sidecar", 1
ENGINE_KEY = PREFIX + "engine"  # the build record
ENGINE_REQUIRED = ("tensorrt_version", "gpu_name", "compute_capability", "hardware_compat", "engine_sha256")
DTYPES = ("bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "float32",
          "float64", "bfloat16", "string")  # numpy names
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
              "INT32": "int32", "INT64": "int64", "BOOL": "bool"}
LPD_ALIASES = {"native": "portable"}  # the build record's LPD mode as toolkits before 0.1 wrote it


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: numpy dtype name, shape with the batch dimension (-1: dynamic)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    max_batch: int | None = None  # the largest batch a TensorRT profile allows, when known

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Sidecar:
    """A sidecar, checked: the ferret.* props as strings and decoded, the I/O, the build record."""

    path: Path
    props: dict[str, str]
    meta: dict[str, Any]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    engine: dict[str, Any] | None  # the ferret.engine record; None only where read(require_engine=False)
    tensorrt_version: str | None = None


def path(engine: str | Path) -> Path:
    """``M.engine`` -> ``M.engine.json``."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def write(engine: str | Path, props: dict[str, str], inputs: Sequence[dict[str, Any]],
          outputs: Sequence[dict[str, Any]], *, tensorrt_version: str | None = None) -> Path:
    """Write ``ENGINE.json`` atomically and check it by reading it back; returns its path.

    ``props``: the ``ferret.*`` metadata_props of the ONNX model the engine was built from (with
    ``ferret.engine``, the build record, for the runtime). ``inputs``/``outputs``: dicts with
    ``name``, ``dtype``, ``shape`` (batch dimension included, -1 dynamic) and optionally ``profile``.
    """
    engine = Path(engine)
    data: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    data.update({k: v for k, v in sorted(props.items()) if k.startswith(PREFIX)})
    data["inputs"], data["outputs"] = [dict(t) for t in inputs], [dict(t) for t in outputs]
    if tensorrt_version is not None:
        data["tensorrt_version"] = tensorrt_version
    out = atomic_write(path(engine), (json.dumps(data, indent=2) + "\n").encode("utf-8"))
    if engine.is_file():
        read(engine, "written just now", require_engine=False)
    return out


def rewrite(engine: str | Path, out_engine: str | Path, updates: dict[str, str]) -> Path:
    """Write ``OUT.engine.json``: the sidecar of ``engine`` with the ``ferret.*`` props in ``updates``
    replaced (e.g. by ``ferret calibrate``), everything else (I/O, profiles, build record) kept; checked
    by reading it back. The engine itself must already be at ``out_engine``."""
    bad = [k for k in updates if not k.startswith(PREFIX) or k == ENGINE_KEY]
    if bad:
        raise ConfigError(f"Received sidecar updates {bad}; expected {PREFIX}* metadata keys other than {ENGINE_KEY}")
    read(engine)  # the source must be valid before a copy is made of it
    data = _load(path(engine), MISSING)
    data.update(updates)
    out = atomic_write(path(out_engine), (json.dumps(data, indent=2) + "\n").encode("utf-8"))
    read(out_engine, "written just now")
    return out


MISSING = "expected it beside the engine, as 'ferret export tensorrt' writes it"


def read(engine: str | Path, missing: str = MISSING, *, require_engine: bool = True) -> Sidecar:
    """The checked sidecar of ``engine``. ``missing``: what to say, after the path, when it is absent;
    ``require_engine``: refuse a sidecar without the build record (the runtime needs it)."""
    src = path(engine)
    data = _load(src, missing)
    props = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) if isinstance(v, dict) else str(v)
             for k, v in data.items() if k.startswith(PREFIX)}
    record = _engine_record(data, src) if require_engine or ENGINE_KEY in data else None
    meta = decode(props, str(src))
    inputs, outputs = _tensors(data, "inputs", src), _tensors(data, "outputs", src)
    # the engine is opaque without TensorRT: its declared outputs and weights are checked here, so a
    # file claiming several logits per image, or another architecture's size, is refused first
    check_logit_output([list(t.shape) for t in outputs], str(src))
    if record is not None and "source_onnx_weights" in record:
        check_arch_size(meta["arch"], int(record["source_onnx_weights"]), str(src))
    trt = data.get("tensorrt_version")
    return Sidecar(src, props, meta, inputs, outputs, record, str(trt) if trt is not None else None)


def _load(src: Path, missing: str) -> dict[str, Any]:
    """The JSON object, after the checks every reader needs: file, JSON object, format, version."""
    if not src.is_file():
        raise ConfigError(f"{src}: no such file; {missing}")
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{src}: received invalid JSON ({e}); expected a TensorRT sidecar object") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: received a JSON {type(data).__name__}; expected an object")
    if data.get("format", FORMAT) != FORMAT:
        raise ConfigError(f"{src}: received format {data['format']!r}; expected {FORMAT!r}")
    version = data.get("version", VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        raise ConfigError(f"{src}: received sidecar version {version!r}; expected 1..{VERSION} (a newer toolkit "
                          "wrote it)")
    return data


def _engine_record(data: dict[str, Any], src: Path) -> dict[str, Any]:
    block = data.get(ENGINE_KEY)
    if isinstance(block, str):
        try:
            block = json.loads(block)
        except json.JSONDecodeError:
            block = None
    if not isinstance(block, dict) or any(k not in block for k in ENGINE_REQUIRED):
        raise ConfigError(f"{src}: received no valid {ENGINE_KEY!r} entry (keys {', '.join(ENGINE_REQUIRED)}); "
                          "expected a sidecar written by 'ferret export tensorrt', which records the TensorRT version "
                          "and GPU")
    if block.get("lpd") in LPD_ALIASES:  # read both names, write one
        block = {**block, "lpd": LPD_ALIASES[block["lpd"]]}
    return block


def _dtype(raw: Any, where: str) -> str:
    if isinstance(raw, str):
        s = raw.strip()
        s = s.split(".", 1)[1] if s.startswith("DataType.") else s
        if s.upper() in TRT_DTYPES:
            return TRT_DTYPES[s.upper()]
        if s.lower() in DTYPES:
            return s.lower()
    raise ConfigError(f"{where}: received dtype {raw!r}; expected a numpy name ({', '.join(DTYPES)}) "
                      f"or a TensorRT DataType ({', '.join(TRT_DTYPES)})")


def _shape(raw: Any, where: str, what: str = "shape") -> tuple[int, ...]:
    if not isinstance(raw, list) or not raw or \
            not all(isinstance(d, int) and not isinstance(d, bool) and (d > 0 or d == -1) for d in raw):
        raise ConfigError(f"{where}: received {what} {raw!r}; expected a non-empty list of positive integers "
                          "and -1 for dynamic dimensions")
    return tuple(raw)


def _tensors(data: dict, key: str, src: Path) -> tuple[TensorSpec, ...]:
    items = data.get(key)
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{src}: received {key!r} = {items!r}; expected a non-empty list of "
                          "{\"name\", \"dtype\", \"shape\"} objects")
    out = []
    for i, item in enumerate(items):
        where = f"{src}: {key}[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise ConfigError(f"{where}: received {item!r}; expected an object with a non-empty \"name\"")
        shape = _shape(item.get("shape"), where)
        max_batch = None
        profile = item.get("profile")
        if profile is not None:
            if not isinstance(profile, dict) or "max" not in profile:
                raise ConfigError(f"{where}: received profile {profile!r}; "
                                  f"expected {{\"min\", \"opt\", \"max\"}} shapes")
            pmax = _shape(profile["max"], where, "profile max")
            if len(pmax) != len(shape):
                raise ConfigError(f"{where}: received profile max {list(pmax)} of rank {len(pmax)}; "
                                  f"expected rank {len(shape)} as the shape {list(shape)}")
            max_batch = pmax[0]
        out.append(TensorSpec(item["name"], _dtype(item.get("dtype"), where), shape, max_batch))
    return tuple(out)
