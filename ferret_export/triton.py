"""``ferret export triton``: an exported model -> a Triton Inference Server model repository.

What is written (``REPO/NAME`` appears all at once: it is assembled in a temporary directory beside
it and renamed into place, so a polling server never sees half a model)::

    REPO/NAME/config.pbtxt          platform, max_batch_size, input/output, dynamic_batching,
                                    instance_group, and the model's ``ferret.*`` metadata as parameters
    REPO/NAME/1/model.onnx          platform "onnxruntime_onnx"   (from a .onnx)
    REPO/NAME/1/model.plan          platform "tensorrt_plan"      (from a .engine or .plan)
    REPO/NAME/README.md             the exact preprocessing a client must apply, and how to serve it
    REPO/client_example.py          a numpy + tritonclient.http client (torch-free); it reads the
                                    preprocessing from the server's config, so it works for every
                                    FerretNet model in the repository

Input and output names, dtypes and shapes come from the ONNX graph itself (``onnx.load`` without the
external data), the preprocessing from its ``ferret.*`` ``metadata_props``
(``ferret_runtime.metadata``). A TensorRT engine cannot be inspected without TensorRT, so an engine
``M.engine`` (or ``M.plan``) must have a sidecar ``M.engine.json`` (``M.plan.json``) next to it, in
this format (version 1; ``write_engine_sidecar`` writes it, ``read_engine_sidecar`` checks it)::

    {
      "format": "ferret-tensorrt-sidecar",        # optional when reading
      "version": 1,                               # optional when reading; > 1 is refused
      "ferret.arch": "ferretnet-s",               # every ferret.* key of the ONNX model the engine was
      "ferret.preprocess": "{\"crop\": 256, ...}", #   built from, as in its metadata_props: strings,
      ...                                         #   dict values as JSON text (JSON objects/numbers
                                                  #   are accepted too and encoded the same way)
      "inputs":  [{"name": "input", "dtype": "float32", "shape": [-1, 3, 256, 256],
                   "profile": {"min": [1, 3, 256, 256], "opt": [16, 3, 256, 256],
                               "max": [64, 3, 256, 256]}}],          # profile: optional
      "outputs": [{"name": "logit", "dtype": "float32", "shape": [-1, 1]}],
      "tensorrt_version": "10.x.y"                # optional, informative
    }

``shape`` includes the batch dimension; -1 marks a dynamic dimension. ``dtype`` is a numpy name
(``float32``, ``float16``, ``uint8``, ``int32``, ``int64``, ``bool``, ...) or a TensorRT
``DataType`` name (``FLOAT``, ``HALF``, ``UINT8``, ...). With a ``profile``, ``--max-batch`` must
not exceed the profile's largest batch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferret_runtime import __version__
from ferret_runtime.backends.tensorrt import SIDECAR_FORMAT, SIDECAR_VERSION, load_sidecar, sidecar_path
from ferret_runtime.errors import ConfigError
from ferret_runtime.fileio import atomic_write, sha256
from ferret_runtime.metadata import PREFIX, decode

DEFAULT_NAME = "ferretnet"
DEFAULT_MAX_BATCH = 64
DEFAULT_PREFERRED = (8, 16, 32)
DEFAULT_QUEUE_DELAY_US = 500
VERSION = "1"
CLIENT_EXAMPLE = "client_example.py"
ONNX_SUFFIXES, ENGINE_SUFFIXES = (".onnx",), (".engine", ".plan")
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}
KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}

# numpy dtype name -> Triton data type
TRITON_TYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64", "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32",
    "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
    "bfloat16": "TYPE_BF16", "string": "TYPE_STRING",
}
# TensorRT DataType names accepted in a sidecar
_TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
               "INT32": "int32", "INT64": "int64", "BOOL": "bool"}
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: numpy dtype name, shape with the batch dimension (-1: dynamic)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    max_batch: int | None = None  # the largest batch a TensorRT profile allows, when known

    @property
    def triton_type(self) -> str:
        return TRITON_TYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


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
    desc = read_onnx(path) if suffix in ONNX_SUFFIXES else read_engine_sidecar(path)
    if desc.meta["lpd_mode"] == "external":
        raise ConfigError(f"{path}: received a model without its LPD (ferret.lpd_mode=external), whose input is the LPD "
                          "residual the ferret runtime computes; expected a model with the LPD inside for Triton "
                          "(export with --lpd portable, or --lpd plugin for a TensorRT engine)")
    return desc


_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string",
                9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}


def _onnx_tensors(values, initializers: set[str], path: Path, what: str) -> tuple[TensorSpec, ...]:
    out = []
    for v in values:
        if v.name in initializers:  # IR < 4 lists initializers among the inputs
            continue
        if not v.type.HasField("tensor_type"):
            raise ConfigError(f"{path}: received {what} {v.name!r} that is not a tensor; expected tensors only")
        tt = v.type.tensor_type
        if tt.elem_type not in _ONNX_DTYPES:
            raise ConfigError(f"{path}: received {what} {v.name!r} of ONNX element type {tt.elem_type}; "
                              f"expected one of {sorted(set(_ONNX_DTYPES.values()))}")
        if not tt.HasField("shape"):
            raise ConfigError(f"{path}: received {what} {v.name!r} without a shape; expected a tensor of known rank")
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim)
        out.append(TensorSpec(v.name, _ONNX_DTYPES[tt.elem_type], shape))
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


def read_onnx(path: str | os.PathLike) -> ModelDescription:
    """Inputs, outputs and ``ferret.*`` metadata of an ONNX file (its weights are not loaded)."""
    path = Path(path)
    try:
        import onnx
    except ImportError:
        raise ConfigError("reading an ONNX model needs onnx: pip install 'ferretnet-deploy[export]'") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, onnx's own errors
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: received a file that is not an ONNX model ({first}); expected a .onnx "
                          "written by 'ferret export onnx'") from None
    props = {p.key: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}
    meta = decode(props, str(path))
    if meta["lpd_mode"] == "plugin":
        raise ConfigError(f"{path}: received an ONNX model with the ferret::lpd plugin node (ferret.lpd_mode=plugin); "
                          "expected a portable export for Triton's onnxruntime backend (export without --lpd plugin, "
                          "or build a TensorRT engine from it and pass the .engine)")
    inits = {t.name for t in model.graph.initializer}
    return ModelDescription(path, "onnx", props, meta,
                            _onnx_tensors(model.graph.input, inits, path, "input"),
                            _onnx_tensors(model.graph.output, set(), path, "output"),
                            extra_files=_external_files(model, path))


def _sidecar_dtype(raw: Any, where: str) -> str:
    if isinstance(raw, str):
        s = raw.strip()
        s = s.split(".", 1)[1] if s.startswith("DataType.") else s
        if s.upper() in _TRT_DTYPES:
            return _TRT_DTYPES[s.upper()]
        if s.lower() in TRITON_TYPES:
            return s.lower()
    raise ConfigError(f"{where}: received dtype {raw!r}; expected a numpy name ({', '.join(TRITON_TYPES)}) "
                      f"or a TensorRT DataType ({', '.join(_TRT_DTYPES)})")


def _sidecar_shape(raw: Any, where: str, what: str = "shape") -> tuple[int, ...]:
    if not isinstance(raw, list) or not raw or \
            not all(isinstance(d, int) and not isinstance(d, bool) and (d > 0 or d == -1) for d in raw):
        raise ConfigError(f"{where}: received {what} {raw!r}; expected a non-empty list of positive integers "
                          "and -1 for dynamic dimensions")
    return tuple(raw)


def _sidecar_tensors(data: dict, key: str, src: Path) -> tuple[TensorSpec, ...]:
    items = data.get(key)
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{src}: received {key!r} = {items!r}; expected a non-empty list of "
                          "{\"name\", \"dtype\", \"shape\"} objects")
    out = []
    for i, item in enumerate(items):
        where = f"{src}: {key}[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise ConfigError(f"{where}: received {item!r}; expected an object with a non-empty \"name\"")
        shape = _sidecar_shape(item.get("shape"), where)
        max_batch = None
        profile = item.get("profile")
        if profile is not None:
            if not isinstance(profile, dict) or "max" not in profile:
                raise ConfigError(f"{where}: received profile {profile!r}; expected {{\"min\", \"opt\", \"max\"}} shapes")
            pmax = _sidecar_shape(profile["max"], where, "profile max")
            if len(pmax) != len(shape):
                raise ConfigError(f"{where}: received profile max {list(pmax)} of rank {len(pmax)}; "
                                  f"expected rank {len(shape)} as the shape {list(shape)}")
            max_batch = pmax[0]
        out.append(TensorSpec(item["name"], _sidecar_dtype(item.get("dtype"), where), shape, max_batch))
    return tuple(out)


def read_engine_sidecar(engine: str | os.PathLike) -> ModelDescription:
    """The description of a TensorRT engine from its ``.json`` sidecar (format: module docstring)."""
    engine = Path(engine)
    src = sidecar_path(engine)
    data, props = load_sidecar(engine, "a TensorRT engine's input names, shapes and ferret.* metadata are read from "
                               f"this sidecar (TensorRT cannot be assumed here), expected next to {engine.name} as "
                               "written by the toolkit's TensorRT export (format: ferret_export/triton.py)")
    meta = decode(props, str(src))
    trt = data.get("tensorrt_version")
    return ModelDescription(engine, "tensorrt", props, meta, _sidecar_tensors(data, "inputs", src),
                            _sidecar_tensors(data, "outputs", src),
                            tensorrt_version=str(trt) if trt is not None else None)


def write_engine_sidecar(engine: str | os.PathLike, props: dict[str, str], inputs: Sequence[dict[str, Any]],
                         outputs: Sequence[dict[str, Any]], *, tensorrt_version: str | None = None) -> Path:
    """Write ``ENGINE.json`` for a TensorRT engine (for the TensorRT export); returns its path.

    ``props``: the ``ferret.*`` metadata_props of the ONNX model the engine was built from (with
    ``ferret.preprocess`` describing the engine's input). ``inputs``/``outputs``: dicts with
    ``name``, ``dtype``, ``shape`` (batch dimension included, -1 dynamic) and optionally ``profile``.
    The result is checked by reading it back the way ``ferret export triton`` does.
    """
    engine = Path(engine)
    data: dict[str, Any] = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION}
    data.update({k: v for k, v in sorted(props.items()) if k.startswith(PREFIX)})
    data["inputs"], data["outputs"] = [dict(t) for t in inputs], [dict(t) for t in outputs]
    if tensorrt_version is not None:
        data["tensorrt_version"] = tensorrt_version
    text = json.dumps(data, indent=2) + "\n"
    out = atomic_write(sidecar_path(engine), lambda f: f.write(text.encode("utf-8")))
    if engine.is_file():
        read_engine_sidecar(engine)
    return out


# -------------------------------------------------------------------------------------- validation
def _check_options(name: str, max_batch: int, instances: int, preferred: Sequence[int] | None, delay_us: int,
                   kind: str) -> tuple[int, ...]:
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"Received model name {name!r}; expected letters, digits, '_', '-' and '.' "
                          "(it names the model's directory), not starting with '.' or '-'")
    if max_batch < 0:
        raise ConfigError(f"Received --max-batch {max_batch}; expected >= 0 (0: no batching by Triton)")
    if instances < 1:
        raise ConfigError(f"Received --instances {instances}; expected >= 1")
    if delay_us < 0:
        raise ConfigError(f"Received --max-queue-delay-us {delay_us}; expected >= 0")
    if kind not in KINDS:
        raise ConfigError(f"Received --kind {kind!r}; expected one of {', '.join(KINDS)}")
    if preferred is None:  # the default: the sizes that fit
        return tuple(b for b in DEFAULT_PREFERRED if b <= max_batch)
    sizes = tuple(sorted(set(int(b) for b in preferred)))
    if sizes and max_batch == 0:
        raise ConfigError(f"Received --preferred-batch {','.join(map(str, sizes))} with --max-batch 0; expected no "
                          "preferred sizes (dynamic batching needs max_batch_size > 0)")
    bad = [b for b in sizes if not 1 <= b <= max_batch]
    if bad:
        raise ConfigError(f"Received preferred batch size {bad[0]}; expected 1..{max_batch} (--max-batch)")
    return sizes


def _check_model(desc: ModelDescription, max_batch: int, kind: str) -> None:
    src = desc.path
    if desc.kind == "tensorrt" and kind != "gpu":
        raise ConfigError(f"{src}: received --kind {kind} for a TensorRT engine; expected gpu (engines run on GPUs only)")
    if len(desc.inputs) != 1:
        names = ", ".join(t.name for t in desc.inputs) or "none"
        raise ConfigError(f"{src}: received a model with {len(desc.inputs)} inputs ({names}); expected one image input")
    pre = desc.meta["preprocess"]
    inp = desc.inputs[0]
    if (pre.dtype == "uint8") != (inp.dtype == "uint8") or len(inp.shape) != 4:
        raise ConfigError(f"{src}: received input {inp.name!r} {inp.dtype} {list(inp.shape)} while ferret.preprocess "
                          f"says {pre.dtype} {pre.layout}; expected a 4-D input of the dtype the metadata names")
    for t in desc.inputs + desc.outputs:
        if t.dtype not in TRITON_TYPES:
            raise ConfigError(f"{src}: received tensor {t.name!r} of dtype {t.dtype}; expected one of {list(TRITON_TYPES)}")
        if max_batch > 0 and (not t.shape or t.shape[0] != -1):
            batch_dim = t.shape[0] if t.shape else "(none: a scalar)"
            raise ConfigError(f"{src}: received tensor {t.name!r} with a static batch dimension {batch_dim} "
                              f"(shape {list(t.shape)}); expected a dynamic first dimension for --max-batch {max_batch} "
                              "(re-export with --dynamic, or pass --max-batch 0 to serve it without batching)")
        if max_batch > 0 and t.max_batch is not None and max_batch > t.max_batch:
            raise ConfigError(f"{src}: received --max-batch {max_batch}; expected <= {t.max_batch}, the largest batch "
                              f"of the engine's optimisation profile for {t.name!r}")


# -------------------------------------------------------------------------------------- config text
def _quote(s: str) -> str:
    """A protobuf text-format string literal (UTF-8 bytes outside printable ASCII as octal escapes)."""
    out = []
    for b in s.encode("utf-8"):
        c = chr(b)
        if c in "\"\\":
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif 0x20 <= b < 0x7F:
            out.append(c)
        else:
            out.append(f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def _dims(t: TensorSpec, max_batch: int) -> tuple[list[int], bool]:
    """(dims, reshape_to_scalar): without the batch dimension when Triton batches."""
    dims = list(t.shape[1:] if max_batch > 0 else t.shape)
    return (dims, False) if dims else ([1], True)  # a per-item scalar: dims [1] reshaped to []


def _tensor_block(t: TensorSpec, max_batch: int) -> str:
    dims, scalar = _dims(t, max_batch)
    lines = ["  {", f"    name: {_quote(t.name)}", f"    data_type: {t.triton_type}",
             f"    dims: [ {', '.join(map(str, dims))} ]"]
    if scalar:
        lines.append("    reshape: { shape: [ ] }")
    return "\n".join(lines + ["  }"])


def config_text(desc: ModelDescription, *, name: str, max_batch: int, instances: int, preferred: Sequence[int],
                max_queue_delay_us: int, kind: str, source_sha256: str | None = None) -> str:
    """The config.pbtxt for one model (protobuf text format of Triton's ``inference.ModelConfig``)."""
    head = [f"# Triton model configuration written by ferretnet-deploy {__version__} (ferret export triton)",
            f"# from {desc.path.name}" + (f" (sha256 {source_sha256})" if source_sha256 else ""),
            "# The client must preprocess images as README.md beside this file says; the ferret.* parameters",
            "# below carry the same preprocessing for programs (parameter ferret.preprocess, JSON).",
            f"name: {_quote(name)}", f"platform: {_quote(desc.platform)}", f"max_batch_size: {max_batch}"]
    parts = ["\n".join(head),
             "input [\n" + ",\n".join(_tensor_block(t, max_batch) for t in desc.inputs) + "\n]",
             "output [\n" + ",\n".join(_tensor_block(t, max_batch) for t in desc.outputs) + "\n]"]
    if max_batch > 0:
        db = ["dynamic_batching {"]
        if preferred:
            db.append(f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]")
        db += [f"  max_queue_delay_microseconds: {max_queue_delay_us}", "}"]
        parts.append("\n".join(db))
    parts.append("\n".join(["instance_group [", "  {", f"    count: {instances}", f"    kind: {KINDS[kind]}", "  }", "]"]))
    for key, value in sorted(desc.props.items()):
        parts.append(f"parameters {{\n  key: {_quote(key)}\n  value: {{ string_value: {_quote(value)} }}\n}}")
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------ README, client
def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(repr(float(v)) for v in values) + ")"


def readme_text(desc: ModelDescription, *, name: str, max_batch: int, repo: str = "REPO", kind: str = "gpu") -> str:
    """README.md of the model directory: inputs, outputs, the exact preprocessing, serving."""
    meta, pre, inp = desc.meta, desc.meta["preprocess"], desc.inputs[0]
    out = desc.outputs[0]
    u8 = pre.dtype == "uint8"
    batch = "N" if max_batch > 0 else str(inp.shape[0])
    shape = " x ".join([batch] + ["any" if d == -1 else str(d) for d in inp.shape[1:]])
    crop = f"centre-crop to {pre.crop} x {pre.crop}" if pre.crop is not None else "no crop (full size; the model takes any H x W)"
    io_rows = "\n".join(f"| {kind_} | `{t.name}` | {t.triton_type} | {', '.join(map(str, _dims(t, max_batch)[0]))} |"
                        for kind_, ts in (("input", desc.inputs), ("output", desc.outputs)) for t in ts)
    lines = [
        f"# {name}: FerretNet on Triton Inference Server", "",
        f"Written by `ferret export triton` (ferretnet-deploy {__version__}) from `{desc.path.name}`: "
        f"{meta['arch']}, LPD {meta['lpd_func']}/{meta['window_size']} ({meta['lpd_mode']}), {meta['precision']}, "
        f"platform `{desc.platform}`, max_batch_size {max_batch}.", "",
        "| | name | data type | dims (without the batch dimension when max_batch_size > 0; -1: any) |",
        "| --- | --- | --- | --- |", io_rows, "",
        "## Preprocessing (the client's job)", "",
    ]
    steps = [
        "Decode the image with Pillow as stored (no EXIF rotation) and convert to RGB: uint8, H x W x 3.",
        f"{crop[0].upper() + crop[1:]}" + (": if a side is smaller, pad with zeros first (the extra pixel goes "
                                            "right/bottom), then take the window at offset "
                                            f"`int(round((H - {pre.crop}) / 2))`, `int(round((W - {pre.crop}) / 2))` "
                                            "(Python's round, half to even), as torchvision's `CenterCrop`."
                                            if pre.crop is not None else "."),
    ]
    if u8:
        steps.append(f"Send the uint8 pixels as they are, layout {pre.layout} ({shape}): scaling and normalisation "
                     "are inside the model.")
    else:
        steps += [
            "Convert to float32 and divide by 255.",
            f"Subtract the per-channel (R, G, B) mean `{_fmt(pre.mean)}` and divide by the std `{_fmt(pre.std)}`, in float32.",
            f"Transpose to {pre.layout} and stack: {inp.dtype} {shape}" + (" (cast to float16 last)" if inp.dtype == "float16" else "") + ".",
        ]
    lines += [f"{i}. {s}" for i, s in enumerate(steps, 1)]
    lines += ["", "In numpy (`client_example.py` in the repository root has it as a function):", "", "```python",
              "import numpy as np", "from PIL import Image", "",
              "img = np.asarray(Image.open(path).convert(\"RGB\"), dtype=np.uint8)"]
    if pre.crop is not None:
        lines += [f"# centre crop to {pre.crop} (zero-pad smaller images first; see step 2)",
                  f"top, left = int(round((img.shape[0] - {pre.crop}) / 2)), int(round((img.shape[1] - {pre.crop}) / 2))",
                  f"img = img[top:top + {pre.crop}, left:left + {pre.crop}]"]
    if u8:
        lines += ["batch = img[None]  # uint8 N x H x W x 3"]
    else:
        lines += ["x = img.astype(np.float32) / np.float32(255.0)",
                  f"x -= np.asarray({_fmt(pre.mean)}, np.float32)",
                  f"x /= np.asarray({_fmt(pre.std)}, np.float32)",
                  "batch = np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # float32 N x 3 x H x W"
                  + (".astype(np.float16)" if inp.dtype == "float16" else "")]
    lines += ["```", "",
              f"The output `{out.name}` holds one logit per image: `prob_fake = 1 / (1 + exp(-logit))`, and the image "
              f"is labelled fake when `prob_fake > {meta['threshold']}` (the threshold stored in the model).", "",
              "The same facts are in `config.pbtxt` as parameters (`ferret.preprocess` as JSON, `ferret.threshold`, "
              "...), which a client can read from the server: `GET /v2/models/" + name + "/config`.", "",
              "## Serving", "", "```sh",
              f"docker run --rm {'--gpus all ' if kind == 'gpu' else ''}-p 8000:8000 -p 8001:8001 -p 8002:8002 -v \"$(realpath {repo}):/models\" \\",
              "    nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models",
              f"python {repo}/client_example.py image.jpg --url localhost:8000 --model {name}",
              "```", ""]
    if desc.kind == "tensorrt":
        lines += ["## TensorRT engine", "",
                  "`1/model.plan` only runs on the GPU model and TensorRT version it was built with"
                  + (f" (TensorRT {desc.tensorrt_version})" if desc.tensorrt_version else "")
                  + ": use the Triton container whose TensorRT matches (NVIDIA's frameworks support matrix), "
                    "or rebuild the engine inside it.", ""]
        if meta["lpd_mode"] == "plugin":
            lines += ["This engine contains the `ferret::lpd` plugin as an ahead-of-time (AOT) Python plugin: its "
                      "CUDA kernel's PTX is embedded in the engine, so Triton's TensorRT backend runs it with no "
                      "plugin library and no Python.", ""]
    elif max_batch > 0:
        lines += ["On GPUs, ONNX Runtime can hand the graph to TensorRT inside Triton: add "
                  "`optimization { execution_accelerators { gpu_execution_accelerator : [ { name : \"tensorrt\" } ] } }` "
                  "to config.pbtxt (first requests are slow while it builds).", ""]
    return "\n".join(lines)


_CLIENT_TEMPLATE = '''\
#!/usr/bin/env python3
"""Classify images with a FerretNet model served by Triton (written by `ferret export triton`).

    pip install "tritonclient[http]" numpy pillow
    python client_example.py IMAGE [IMAGE ...] --url localhost:8000 --model @NAME@

The preprocessing is read from the served model's config (parameter ferret.preprocess), so this
works for every FerretNet model in the repository; the constants below, those of the model it was
written for, are the fallback. numpy and Pillow only: no torch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
from PIL import Image

MODEL_NAME = @NAME_REPR@
PREPROCESS = @PREPROCESS@  # crop (None: full size), mean, std, layout and dtype of the model's input
THRESHOLD = @THRESHOLD@
TRITON_DTYPES = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8"}
CONFIG_DTYPES = {"TYPE_FP32": "float32", "TYPE_FP16": "float16", "TYPE_UINT8": "uint8"}


def load_rgb(path: str) -> np.ndarray:
    """Decode as stored (no EXIF rotation) to uint8 H x W x 3 RGB."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """torchvision CenterCrop: zero-pad a smaller image (extra pixel right/bottom), then crop."""
    h, w = img.shape[:2]
    if h < size or w < size:
        top, left = max(size - h, 0) // 2, max(size - w, 0) // 2
        img = np.pad(img, ((top, max(size - h, 0) - top), (left, max(size - w, 0) - left), (0, 0)))
        h, w = img.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img[top:top + size, left:left + size]


def preprocess(img: np.ndarray, pre: dict = PREPROCESS) -> np.ndarray:
    """One uint8 H x W x 3 RGB image -> one model input, without the batch dimension."""
    if pre.get("crop") is not None:
        img = center_crop(img, int(pre["crop"]))
    if pre["dtype"] == "uint8":  # normalisation is inside the model
        x = img if pre["layout"] == "NHWC" else img.transpose(2, 0, 1)
        return np.ascontiguousarray(x)
    x = img.astype(np.float32) / np.float32(255.0)
    x -= np.asarray(pre["mean"], dtype=np.float32)
    x /= np.asarray(pre["std"], dtype=np.float32)
    if pre["layout"] == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x.astype(pre["dtype"]))


def served_model(client, model: str) -> tuple[dict, float, str, str, int]:
    """(preprocess, threshold, input name, output name, max_batch_size) from the server's config."""
    cfg = client.get_model_config(model)
    params = {k: v.get("string_value") for k, v in (cfg.get("parameters") or {}).items()}
    pre = dict(json.loads(params["ferret.preprocess"]) if params.get("ferret.preprocess") else PREPROCESS)
    pre["dtype"] = CONFIG_DTYPES.get(cfg["input"][0].get("data_type"), pre["dtype"])  # e.g. a float16 engine input
    threshold = float(params.get("ferret.threshold") or THRESHOLD)
    return pre, threshold, cfg["input"][0]["name"], cfg["output"][0]["name"], int(cfg.get("max_batch_size", 0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--url", default="localhost:8000", help="Triton HTTP endpoint")
    p.add_argument("--model", default=MODEL_NAME, help="model name in the repository")
    p.add_argument("--batch", type=int, default=8, help="images per request (capped by max_batch_size)")
    args = p.parse_args(argv)

    try:
        import tritonclient.http as httpclient
    except (ImportError, RuntimeError) as e:  # RuntimeError: tritonclient without its [http] extra
        sys.exit(f"this example needs Triton's HTTP client: pip install 'tritonclient[http]' ({e})")

    client = httpclient.InferenceServerClient(url=args.url)
    pre, threshold, in_name, out_name, max_batch = served_model(client, args.model)
    batch = max(1, min(args.batch, max_batch)) if max_batch > 0 else 1
    pending: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        x = np.stack([a for _, a in pending])
        inp = httpclient.InferInput(in_name, list(x.shape), TRITON_DTYPES[str(x.dtype)])
        inp.set_data_from_numpy(x, binary_data=True)
        res = client.infer(args.model, [inp], outputs=[httpclient.InferRequestedOutput(out_name, binary_data=True)])
        for (path, _), logit in zip(pending, res.as_numpy(out_name).reshape(len(pending), -1)[:, 0]):
            prob = 1.0 / (1.0 + math.exp(-float(logit))) if logit >= 0 else math.exp(float(logit)) / (1.0 + math.exp(float(logit)))
            print(json.dumps({"path": path, "logit": float(logit), "prob_fake": prob,
                              "label": "fake" if prob > threshold else "real"}))
        pending.clear()

    failed = 0
    for path in args.images:
        try:
            x = preprocess(load_rgb(path), pre)
        except (OSError, ValueError) as e:
            print(f"{path}: cannot read image ({e})", file=sys.stderr)
            failed += 1
            continue
        if pending and (len(pending) == batch or pending[0][1].shape != x.shape):
            flush()
        pending.append((path, x))
    if pending:
        flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
'''


def client_example_text(desc: ModelDescription, *, name: str) -> str:
    """client_example.py with this model's name and preprocessing as defaults."""
    pre = desc.meta["preprocess"]
    d = {"crop": pre.crop, "mean": list(pre.mean), "std": list(pre.std), "layout": pre.layout,
         "dtype": desc.inputs[0].dtype if desc.inputs[0].dtype in ("float32", "float16", "uint8") else pre.dtype}
    return (_CLIENT_TEMPLATE.replace("@NAME_REPR@", repr(name)).replace("@NAME@", name)
            .replace("@PREPROCESS@", repr(d)).replace("@THRESHOLD@", repr(float(desc.meta["threshold"]))))


# --------------------------------------------------------------------------------------- writing
def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_triton_repo(model_path: str | os.PathLike, repo: str | os.PathLike, *, name: str = DEFAULT_NAME,
                      max_batch: int = DEFAULT_MAX_BATCH, instances: int = 1,
                      preferred_batch: Sequence[int] | None = None, max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                      kind: str = "gpu", force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Write ``repo/name`` (config.pbtxt, 1/model.onnx|model.plan, README.md) and ``repo/client_example.py``.

    ``preferred_batch=None`` takes 8, 16, 32 where they do not exceed ``max_batch``; explicit sizes
    must lie in 1..max_batch. An existing ``repo/name`` is replaced only with ``force``, and the new
    one appears by a rename, whole. Returns the model directory.
    """
    preferred = _check_options(name, max_batch, instances, preferred_batch, max_queue_delay_us, kind)
    desc = describe_model(model_path)
    _check_model(desc, max_batch, kind)
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise ConfigError(f"{repo}: received a repository path that is a file; expected a directory (or a new path)")
    target = repo / name
    if (target.exists() or target.is_symlink()) and not force:
        raise ConfigError(f"{target}: received a model directory that already exists; expected a new one "
                          "(pass --force to replace it)")
    repo.mkdir(parents=True, exist_ok=True)
    digest = sha256(desc.path)
    config = config_text(desc, name=name, max_batch=max_batch, instances=instances, preferred=preferred,
                         max_queue_delay_us=max_queue_delay_us, kind=kind, source_sha256=digest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=repo))
    old: Path | None = None
    try:
        version_dir = tmp / VERSION
        version_dir.mkdir()
        _fsync_copy(desc.path, version_dir / desc.filename)
        for rel in desc.extra_files:
            _fsync_copy(desc.path.parent / rel, version_dir / rel)
        _fsync_write(tmp / "config.pbtxt", config.encode("utf-8"))
        _fsync_write(tmp / "README.md", readme_text(desc, name=name, max_batch=max_batch, repo=str(repo), kind=kind).encode("utf-8"))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a server in a container may run as another user
        if target.exists() or target.is_symlink():
            old = repo / f".{name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            if old is not None:
                os.rename(old, target)
                old = None
            raise
        _fsync_dir(repo)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    atomic_write(repo / CLIENT_EXAMPLE, lambda f: f.write(client_example_text(desc, name=name).encode("utf-8")))
    inp = desc.inputs[0]
    log(f"[triton] wrote {target} ({desc.platform}, max_batch_size {max_batch}, input {inp.name!r} "
        f"{inp.triton_type} [{', '.join(map(str, _dims(inp, max_batch)[0]))}], "
        + (f"dynamic batching {list(preferred)} / {max_queue_delay_us} us, " if max_batch > 0 else "")
        + f"{instances} x {KINDS[kind]})")
    log(f"[triton] wrote {repo / CLIENT_EXAMPLE}; serve with: tritonserver --model-repository={repo}")
    return target
