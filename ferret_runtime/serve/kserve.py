"""The Open Inference Protocol (KServe v2) as ``ferret serve`` speaks it: the model's tensors, the
request/response codec (JSON and Triton's binary tensor data extension), metadata and config.

Our model takes exactly one of two inputs per request:

- ``images`` ``BYTES`` ``[N]``: encoded image files, one element per image (any shape of N elements);
- ``pixels`` ``UINT8`` ``[N, H, W, 3]``: decoded RGB images, as the runtime decodes them;

and answers ``logits`` ``FP32 [N]``, ``prob_fake`` ``FP64 [N]`` (exactly ``ferret detect``'s float)
and ``labels`` ``BYTES [N]`` (``real`` / ``fake``). The crop and normalisation run on the server, so
its ``ferret.preprocess`` parameter tells a client to send uint8 NHWC pixels, as a Triton model
exported with ``--preprocess`` does.

Binary data (Triton's ``extension_binary_data.md``): the JSON header is ``Inference-Header-Content-Length``
bytes long, the tensors whose input carries ``"binary_data_size"`` follow it in input order (little-endian,
row-major; a BYTES element is a 4-byte little-endian length and its bytes). Outputs are binary when
their ``"binary_data"`` parameter says so, else when the request's ``"binary_data_output"`` does.
Pure functions of bytes and numbers: no web framework here (``v2.py`` routes to them).

Any request costs work linear in its size, and anything malformed is a ProtocolError naming the
field: the JSON part is at most ``max_json`` bytes (json.loads holds the GIL throughout and builds
objects of up to 20x the text; the server parses off its event loop), a shape has at most MAX_RANK
int64 dimensions (so counting its elements is a few multiplications), tensor data nests no deeper
than its shape, BYTES strings are UTF-8 strictly, flags are JSON booleans, and a client's values
appear in messages cut short.
"""

from __future__ import annotations

import gc
import json
import re
import reprlib
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import FerretError

IMAGES, PIXELS = "images", "pixels"
LOGITS, PROB_FAKE, LABELS = "logits", "prob_fake", "labels"
INPUTS: dict[str, str] = {PIXELS: "UINT8", IMAGES: "BYTES"}  # the UINT8 one first: clients that take input[0]
OUTPUTS: dict[str, str] = {LOGITS: "FP32", PROB_FAKE: "FP64", LABELS: "BYTES"}  # logits first, likewise
NUMPY = {"UINT8": np.uint8, "FP32": np.float32, "FP64": np.float64}
CONFIG_TYPES = {"UINT8": "TYPE_UINT8", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64", "BYTES": "TYPE_STRING"}
HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ("binary_tensor_data", "model_configuration")
MB = 1024 * 1024
DEFAULT_MAX_JSON = 1 * MB  # the JSON part of a request: --max-json-mb
MAX_RANK, MAX_DIM = 8, 2**63 - 1  # a shape: ours have 1 or 4 dimensions; Triton's are int64


class ProtocolError(FerretError):
    """A request that breaks the protocol or our model's contract (answered 400)."""


@dataclass
class InferRequest:
    """A decoded inference request: named images, and how each output is wanted."""

    id: str | None
    items: list[tuple[str, Any]]  # (name, encoded bytes or uint8 HxWx3 array), one per image
    outputs: dict[str, bool] = field(default_factory=dict)  # requested output -> binary


# ------------------------------------------------------------------------------------ bytes tensors
def encode_bytes(elements: list[bytes]) -> bytes:
    """BYTES elements as binary tensor data: each a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def decode_bytes(buf: bytes | memoryview, count: int, name: str) -> list[bytes]:
    """``count`` length-prefixed elements filling ``buf`` exactly; ProtocolError otherwise."""
    out, pos, view = [], 0, memoryview(buf)
    for i in range(count):
        if pos + 4 > len(view):
            raise ProtocolError(f"Received input {name!r} whose binary data ends inside element {i}'s length; "
                                f"expected {count} elements, each a 4-byte little-endian length and its bytes")
        (n,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + n > len(view):
            raise ProtocolError(f"Received input {name!r} whose element {i} claims {n} bytes with {len(view) - pos} "
                                "left; expected the lengths to add up to binary_data_size")
        out.append(bytes(view[pos:pos + n]))
        pos += n
    if pos != len(view):
        raise ProtocolError(f"Received input {name!r} with {len(view) - pos} bytes after its {count} elements; "
                            "expected the elements to fill binary_data_size exactly")
    return out


# ------------------------------------------------------------------------------------------ request
def _show(value: Any) -> str:
    """A client's value in an error message, cut short: a 30 MB list or a deep nest prints a few dozen chars."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxlong, _REPR.maxother = 2, 4, 4, 60, 40, 60


def _json_object(data: bytes, what: str, max_json: int) -> dict[str, Any]:
    """The JSON object ``data`` holds. Called off the event loop; ``max_json`` bounds how long json.loads
    holds the GIL and the objects it builds (up to about 20x the text for nested arrays)."""
    if len(data) > max_json:
        raise JsonOverLimit(what, len(data), max_json)
    collecting = gc.isenabled()
    gc.disable()  # the collector's passes over the growing heap would run inside json.loads, under the GIL: 3x its time
    try:
        obj = json.loads(data)
    except RecursionError:  # json's C scanner counts nesting against the recursion limit
        raise ProtocolError(f"Received {what} nested too deeply for the JSON parser; expected an inference request "
                            "(tensor data nested at most as deep as its shape)") from None
    except (UnicodeDecodeError, ValueError) as e:  # ValueError: also an integer of over 4300 digits
        raise ProtocolError(f"Received {what} that is not JSON ({e}); expected an inference request object") from None
    finally:
        if collecting:
            gc.enable()
    if not isinstance(obj, dict):
        raise ProtocolError(f"Received {what} of JSON type {type(obj).__name__}; expected an object")
    return obj


def _shape(inp: dict[str, Any], name: str) -> list[int]:
    """The declared shape, rank and dimensions bounded first, so counting its elements is a few multiplications."""
    shape = inp.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape):
        raise ProtocolError(f"Received input {name!r} with shape {_show(shape)}; expected a list of at most {MAX_RANK} "
                            f"integers in 0..{MAX_DIM}")
    return shape


def _split_body(body: bytes, header_length: str | None, max_json: int) -> tuple[dict[str, Any], memoryview]:
    """(JSON header, the binary data after it)."""
    if header_length is None:
        return _json_object(body, "a body", max_json), memoryview(b"")
    # ASCII digits only: str.isdigit() also takes '²', and int() refuses over 4300 digits
    if not re.fullmatch(r"[0-9]{1,12}", header_length.strip()) or int(header_length) > len(body):
        raise ProtocolError(f"Received Inference-Header-Content-Length {_show(header_length)} with a body of "
                            f"{len(body)} bytes; expected the JSON header's length, at most the body's")
    n = int(header_length)
    return _json_object(body[:n], "an inference header", max_json), memoryview(body)[n:]


def parse_infer_request(body: bytes, header_length: str | None, *, max_images: int,
                        max_json: int = DEFAULT_MAX_JSON) -> InferRequest:
    """Decode a request of either form into named images; ProtocolError names what is wrong.

    Linear in the body: the JSON part is at most ``max_json`` bytes (else :class:`JsonOverLimit`), the
    shape's rank and dimensions are bounded before its elements are counted, and ``max_images``
    bounds the element count before anything per element is built. CPU-bound: run it off the event loop.
    """
    head, binary = _split_body(body, header_length, max_json)
    inputs = head.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        given = [i.get("name") for i in inputs[:8] if isinstance(i, dict)] if isinstance(inputs, list) else inputs
        raise ProtocolError(f"Received inputs {_show(given)}; expected exactly one: {PIXELS!r} (UINT8 [N, H, W, 3]) "
                            f"or {IMAGES!r} (BYTES [N], encoded image files)")
    (inp,) = inputs
    name, datatype = inp.get("name"), inp.get("datatype")
    if not isinstance(name, str) or name not in INPUTS:
        raise ProtocolError(f"Received input {_show(name)}; expected {PIXELS!r} (UINT8 [N, H, W, 3]) or "
                            f"{IMAGES!r} (BYTES [N], encoded image files)")
    if datatype != INPUTS[name]:
        raise ProtocolError(f"Received input {name!r} of datatype {_show(datatype)}; expected {INPUTS[name]}")
    shape = _shape(inp, name)
    params = inp.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
            raise ProtocolError(f"Received input {name!r} with binary_data_size {_show(size)} and {len(binary)} bytes "
                                "of binary data after the header; expected them equal")
        raw: Any = binary
    elif "data" in inp:
        if len(binary):
            raise ProtocolError(f"Received {len(binary)} bytes after the header and no input with binary_data_size; "
                                "expected binary data only for a binary input")
        raw = inp["data"]
    else:
        raise ProtocolError(f"Received input {name!r} without data; expected \"data\" or a binary_data_size parameter")
    if name == PIXELS:
        items = _pixels(shape, raw, max_images)
    else:
        items = _images(shape, raw, max_images)
    return InferRequest(head.get("id") if isinstance(head.get("id"), str) else None, items,
                        _requested_outputs(head))


def _count(shape: list[int]) -> int:
    n = 1
    for d in shape:  # at most MAX_RANK factors of at most MAX_DIM each
        n *= d
    return n


def _check_count(name: str, n: int, max_images: int) -> None:
    if n == 0:
        raise ProtocolError(f"Received input {name!r} with no image; expected at least one")
    if n > max_images:
        raise ImagesOverLimit(n, max_images)


class ImagesOverLimit(ProtocolError):
    """More images in one request than the server takes (answered 413)."""

    def __init__(self, n: int, limit: int):
        super().__init__(f"Received {n} images in one request; expected at most {limit} (--max-parts)")


class JsonOverLimit(ProtocolError):
    """A JSON part longer than the server parses (answered 413)."""

    def __init__(self, what: str, n: int, limit: int):
        super().__init__(f"Received {what} of {n} bytes of JSON; expected at most {limit / MB:g} MB (--max-json-mb; "
                         "send tensors as binary data instead: tritonclient's binary_data=True)")


def _images(shape: list[int], raw: Any, max_images: int) -> list[tuple[str, bytes]]:
    n = _count(shape) if shape else 1
    _check_count(IMAGES, n, max_images)
    if isinstance(raw, memoryview):
        elements = decode_bytes(raw, n, IMAGES)
    else:  # JSON: strings are their UTF-8 bytes (encoded images rarely are: send them binary)
        flat = _flatten(raw, IMAGES, n, len(shape))
        if len(flat) != n or not all(isinstance(e, str) for e in flat):
            raise ProtocolError(f"Received {IMAGES!r} data of {_many(flat, n)} element(s) for shape {shape}; "
                                f"expected {n} strings (or, for image files, binary data: "
                                "tritonclient's binary_data=True)")
        elements = [_utf8(e, f"{IMAGES}[{i}]") for i, e in enumerate(flat)]
    return [(f"{IMAGES}[{i}]", e) for i, e in enumerate(elements)]


def _utf8(text: str, name: str) -> bytes:
    try:
        return text.encode("utf-8")  # strict: a lone surrogate ("\ud800" in the JSON) has no UTF-8 form
    except UnicodeEncodeError as e:
        raise ProtocolError(f"Received {name} with {e.reason} at character {e.start}; expected a string that is "
                            "valid Unicode (or binary data)") from None


def _pixels(shape: list[int], raw: Any, max_images: int) -> list[tuple[str, np.ndarray]]:
    if len(shape) != 4 or shape[3] != 3:
        raise ProtocolError(f"Received {PIXELS!r} of shape {shape}; expected [N, H, W, 3] (RGB, uint8)")
    n, h, w, _ = shape
    _check_count(PIXELS, n, max_images)
    if h == 0 or w == 0:
        raise ProtocolError(f"Received {PIXELS!r} of shape {shape}; expected images of at least 1x1")
    count = n * h * w * 3
    if isinstance(raw, memoryview):
        if len(raw) != count:
            raise ProtocolError(f"Received {len(raw)} bytes of {PIXELS!r} for shape {shape}; expected {count}")
        arr = np.frombuffer(raw, np.uint8).reshape(shape)  # a view of the body: no copy
    else:
        flat = _flatten(raw, PIXELS, count, 4)
        # builtins over the list (C loops): type() rather than isinstance so true/false are refused
        if len(flat) != count or set(map(type, flat)) != {int} or min(flat) < 0 or max(flat) > 255:
            raise ProtocolError(f"Received {PIXELS!r} data of {_many(flat, count)} element(s) for shape {shape}; "
                                f"expected {count} integers in 0..255")
        arr = np.asarray(flat, np.uint8).reshape(shape)
    return [(f"{PIXELS}[{i}]", arr[i]) for i in range(n)]


def _flatten(data: Any, name: str, count: int, depth: int) -> list[Any]:
    """Row-major elements of JSON tensor data, flat or nested at most ``depth`` levels (the shape's rank);
    stops once past ``count`` elements, so the caller's mismatch error costs no more than the data."""
    if not isinstance(data, list):
        raise ProtocolError(f"Received {name!r} data of JSON type {type(data).__name__}; expected an array")
    out: list[Any] = []
    stack = [iter(data)]
    while stack and len(out) <= count:
        for v in stack[-1]:
            if isinstance(v, list):
                if len(stack) >= max(depth, 1):
                    raise ProtocolError(f"Received {name!r} data nested deeper than its shape's {depth} dimension(s); "
                                        "expected a flat array or one nested as the shape")
                stack.append(iter(v))
                break
            out.append(v)
            if len(out) > count:
                break
        else:
            stack.pop()
    return out


def _many(flat: list[Any], count: int) -> str:
    return f"more than {count}" if len(flat) > count else str(len(flat))  # _flatten stops past count


def _flag(params: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):  # "false" is a non-empty string: bool() would read it as true
        raise ProtocolError(f"Received {key} {_show(value)} {where}; expected true or false (a JSON boolean)")
    return value


def _requested_outputs(head: dict[str, Any]) -> dict[str, bool]:
    params = head.get("parameters")
    default = _flag(params if isinstance(params, dict) else {}, "binary_data_output", False,
                    "in the request parameters")
    wanted = head.get("outputs")
    if wanted is None:
        return {name: default for name in OUTPUTS}
    if not isinstance(wanted, list) or not wanted:
        raise ProtocolError(f"Received outputs {_show(wanted)}; expected a non-empty list of {list(OUTPUTS)} or none")
    out: dict[str, bool] = {}
    for o in wanted:
        name = o.get("name") if isinstance(o, dict) else None
        if not isinstance(name, str) or name not in OUTPUTS:
            raise ProtocolError(f"Received requested output {_show(name)}; expected one of {', '.join(OUTPUTS)}")
        p = o.get("parameters") or {}
        if not isinstance(p, dict):
            raise ProtocolError(f"Received parameters {_show(p)} for output {name!r}; expected an object")
        if p.get("class_count"):
            raise ProtocolError(f"Received class_count for output {name!r}; expected none (the classification "
                                "extension is not supported: the labels output carries the class)")
        out[name] = _flag(p, "binary_data", default, f"for output {name!r}")
    return out


# ----------------------------------------------------------------------------------------- response
def encode_infer_response(model: str, version: str, request: InferRequest, logits: list[float],
                          probs: list[float], labels: list[str]) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a successful inference: JSON, with the binary outputs appended."""
    values = {LOGITS: np.asarray(logits, np.float32), PROB_FAKE: np.asarray(probs, np.float64),
              LABELS: [s.encode() for s in labels]}
    outputs, blobs = [], []
    for name, binary in request.outputs.items():
        out: dict[str, Any] = {"name": name, "datatype": OUTPUTS[name], "shape": [len(labels)]}
        v = values[name]
        if binary:
            blob = encode_bytes(v) if name == LABELS else v.tobytes()  # numpy is little-endian on our platforms
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = labels if name == LABELS else v.tolist()  # float32 -> the exact value as a JSON number
        outputs.append(out)
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if request.id is not None:
        head["id"] = request.id
    text = json.dumps(head, allow_nan=False).encode()
    if not blobs:
        return text, {"content-type": "application/json"}
    return text + b"".join(blobs), {"content-type": "application/octet-stream",
                                    "inference-header-content-length": str(len(text))}


# ----------------------------------------------------------------------------------------- metadata
def model_metadata(name: str, version: str, parameters: dict[str, str]) -> dict[str, Any]:
    """``GET /v2/models/<name>``: the tensors (-1: any size) and our ``ferret.*`` parameters."""
    shapes = {PIXELS: [-1, -1, -1, 3], IMAGES: [-1], LOGITS: [-1], PROB_FAKE: [-1], LABELS: [-1]}
    return {"name": name, "versions": [version], "platform": "ferret",
            "inputs": [{"name": k, "datatype": t, "shape": shapes[k]} for k, t in INPUTS.items()],
            "outputs": [{"name": k, "datatype": t, "shape": shapes[k]} for k, t in OUTPUTS.items()],
            "parameters": dict(parameters)}


def model_config(name: str, max_batch: int, parameters: dict[str, str]) -> dict[str, Any]:
    """``GET /v2/models/<name>/config``: Triton's model configuration (JSON form of ``ModelConfig``),
    which tritonclient's ``get_model_config`` returns and the exported ``client_example.py`` reads."""
    def tensor(name_: str, datatype: str) -> dict[str, Any]:
        if name_ == PIXELS:
            return {"name": name_, "data_type": CONFIG_TYPES[datatype], "format": "FORMAT_NHWC", "dims": [-1, -1, 3]}
        return {"name": name_, "data_type": CONFIG_TYPES[datatype], "dims": [1], "reshape": {"shape": []}}

    return {"name": name, "platform": "ferret", "backend": "ferret", "max_batch_size": max_batch,
            "input": [tensor(k, t) for k, t in INPUTS.items()],
            "output": [tensor(k, t) for k, t in OUTPUTS.items()],
            "parameters": {k: {"string_value": v} for k, v in parameters.items()}}


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "ferret", "version": version, "extensions": list(EXTENSIONS)}
