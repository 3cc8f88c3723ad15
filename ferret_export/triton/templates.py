"""The text files of a Triton model directory: ``config.pbtxt`` (protobuf text format of Triton's
``inference.ModelConfig``) and ``README.md`` (the exact preprocessing a client must apply)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ferret_runtime import __version__
from ferret_runtime.sidecar import TensorSpec

if TYPE_CHECKING:
    from ferret_export.triton.model import ModelDescription

KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
# numpy dtype name -> Triton data type
TRITON_TYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64", "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32",
    "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
    "bfloat16": "TYPE_BF16", "string": "TYPE_STRING",
}


# ------------------------------------------------------------------------------------- config.pbtxt
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


def triton_dims(t: TensorSpec, max_batch: int) -> tuple[list[int], bool]:
    """(dims, reshape_to_scalar): without the batch dimension when Triton batches."""
    dims = list(t.shape[1:] if max_batch > 0 else t.shape)
    return (dims, False) if dims else ([1], True)  # a per-item scalar: dims [1] reshaped to []


def _tensor_block(t: TensorSpec, max_batch: int) -> str:
    dims, scalar = triton_dims(t, max_batch)
    lines = ["  {", f"    name: {_quote(t.name)}", f"    data_type: {TRITON_TYPES[t.dtype]}",
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
    parts.append("\n".join(["instance_group [", "  {", f"    count: {instances}", f"    kind: {KINDS[kind]}", "  }",
                            "]"]))
    for key, value in sorted(desc.props.items()):
        parts.append(f"parameters {{\n  key: {_quote(key)}\n  value: {{ string_value: {_quote(value)} }}\n}}")
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------- README
def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(repr(float(v)) for v in values) + ")"


def readme_text(desc: ModelDescription, *, name: str, max_batch: int, repo: str = "REPO", kind: str = "gpu") -> str:
    """README.md of the model directory: inputs, outputs, the exact preprocessing, serving."""
    meta, inp = desc.meta, desc.inputs[0]
    batch = "N" if max_batch > 0 else str(inp.shape[0])
    shape = " x ".join([batch] + ["any" if d == -1 else str(d) for d in inp.shape[1:]])
    io_rows = "\n".join(f"| {kind_} | `{t.name}` | {TRITON_TYPES[t.dtype]} | "
                        f"{', '.join(map(str, triton_dims(t, max_batch)[0]))} |"
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
    lines += [f"{i}. {s}" for i, s in enumerate(_steps(desc, shape), 1)]
    lines += _numpy_lines(desc)
    lines += [f"The output `{desc.outputs[0].name}` holds one logit per image: `prob_fake = 1 / (1 + exp(-logit))`, "
              f"and the image is labelled fake when `prob_fake > {meta['threshold']}` (the threshold stored in the "
              "model).", "",
              "The same facts are in `config.pbtxt` as parameters (`ferret.preprocess` as JSON, `ferret.threshold`, "
              "...), which a client can read from the server: `GET /v2/models/" + name + "/config`.", ""]
    return "\n".join(lines + _serving_lines(desc, name=name, max_batch=max_batch, repo=repo, kind=kind))


def _steps(desc: ModelDescription, shape: str) -> list[str]:
    """The preprocessing, step by step, in words."""
    pre, inp = desc.meta["preprocess"], desc.inputs[0]
    crop = (f"centre-crop to {pre.crop} x {pre.crop}" if pre.crop is not None
            else "no crop (full size; the model takes any H x W)")
    steps = [
        "Decode the image with Pillow as stored (no EXIF rotation) and convert to RGB: uint8, H x W x 3.",
        f"{crop[0].upper() + crop[1:]}" + (": if a side is smaller, pad with zeros first (the extra pixel goes "
                                            "right/bottom), then take the window at offset "
                                            f"`int(round((H - {pre.crop}) / 2))`, `int(round((W - {pre.crop}) / 2))` "
                                            "(Python's round, half to even), as torchvision's `CenterCrop`."
                                            if pre.crop is not None else "."),
    ]
    if pre.dtype == "uint8":
        return steps + [f"Send the uint8 pixels as they are, layout {pre.layout} ({shape}): scaling and normalisation "
                        "are inside the model."]
    return steps + [
        "Convert to float32 and divide by 255.",
        f"Subtract the per-channel (R, G, B) mean `{_fmt(pre.mean)}` "
        f"and divide by the std `{_fmt(pre.std)}`, in float32.",
        f"Transpose to {pre.layout} and stack: {inp.dtype} {shape}"
        + (" (cast to float16 last)" if inp.dtype == "float16" else "") + ".",
    ]


def _numpy_lines(desc: ModelDescription) -> list[str]:
    """The same preprocessing in numpy."""
    pre, inp = desc.meta["preprocess"], desc.inputs[0]
    lines = ["", "In numpy (`client_example.py` in the repository root has it as a function):", "", "```python",
             "import numpy as np", "from PIL import Image", "",
             "img = np.asarray(Image.open(path).convert(\"RGB\"), dtype=np.uint8)"]
    if pre.crop is not None:
        lines += [f"# centre crop to {pre.crop} (zero-pad smaller images first; see step 2)",
                  f"top, left = int(round((img.shape[0] - {pre.crop}) / 2)), "
                  f"int(round((img.shape[1] - {pre.crop}) / 2))",
                  f"img = img[top:top + {pre.crop}, left:left + {pre.crop}]"]
    if pre.dtype == "uint8":
        lines += ["batch = img[None]  # uint8 N x H x W x 3"]
    else:
        lines += ["x = img.astype(np.float32) / np.float32(255.0)",
                  f"x -= np.asarray({_fmt(pre.mean)}, np.float32)",
                  f"x /= np.asarray({_fmt(pre.std)}, np.float32)",
                  "batch = np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # float32 N x 3 x H x W"
                  + (".astype(np.float16)" if inp.dtype == "float16" else "")]
    return lines + ["```", ""]


def _serving_lines(desc: ModelDescription, *, name: str, max_batch: int, repo: str, kind: str) -> list[str]:
    """How to serve it, and what an engine or an ONNX model needs there."""
    lines = ["## Serving", "", "```sh",
             f"docker run --rm {'--gpus all ' if kind == 'gpu' else ''}-p 8000:8000 -p 8001:8001 -p 8002:8002 "
             f"-v \"$(realpath {repo}):/models\" \\",
             "    nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models",
             f"python {repo}/client_example.py image.jpg --url localhost:8000 --model {name}",
             "```", ""]
    if desc.kind == "tensorrt":
        lines += ["## TensorRT engine", "",
                  "`1/model.plan` only runs on the GPU model and TensorRT version it was built with"
                  + (f" (TensorRT {desc.tensorrt_version})" if desc.tensorrt_version else "")
                  + ": use the Triton container whose TensorRT matches (NVIDIA's frameworks support matrix), "
                    "or rebuild the engine inside it.", ""]
        if desc.meta["lpd_mode"] == "plugin":
            lines += ["This engine contains the `ferret::lpd` plugin as an ahead-of-time (AOT) Python plugin: its "
                      "CUDA kernel's PTX is embedded in the engine, so Triton's TensorRT backend runs it with no "
                      "plugin library and no Python.", ""]
    elif max_batch > 0:
        lines += ["On GPUs, ONNX Runtime can hand the graph to TensorRT inside Triton: add "
                  "`optimization { execution_accelerators { gpu_execution_accelerator : "
                  "[ { name : \"tensorrt\" } ] } }` "
                  "to config.pbtxt (first requests are slow while it builds).", ""]
    return lines


