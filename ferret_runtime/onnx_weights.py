"""How many weight values an ONNX file holds, read without the onnx package (the runtime is onnx-free)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any


# ONNX Runtime does not expose a graph's initializers and the runtime does not depend on the onnx
# package, so the few protobuf fields needed to count the weights are read here (ModelProto.graph = 7,
# GraphProto.initializer = 5, TensorProto.dims = 1: onnx/onnx.proto3).
def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message: varints as ints, the rest as bytes views."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        else:
            if wire == 2:  # length-delimited: a sub-message, bytes or a packed array
                size, i = _varint(buf, i)
            elif wire in (1, 5):  # fixed 64 or 32 bits
                size = 8 if wire == 1 else 4
            else:
                raise ValueError(f"unsupported protobuf wire type {wire}")
            if i + size > len(buf):
                raise ValueError(f"field {number} runs past the end of its message")
            value, i = buf[i:i + size], i + size
        yield number, wire, value


def initializer_values(model: bytes) -> int:
    """How many values an ONNX model's initializers hold (the product of each one's dims, summed)."""
    total = 0
    for number, wire, graph in _fields(memoryview(model)):
        if number != 7 or wire != 2:
            continue
        for g_number, g_wire, tensor in _fields(graph):
            if g_number != 5 or g_wire != 2:
                continue
            dims: list[int] = []
            for t_number, t_wire, value in _fields(tensor):
                if t_number == 1 and t_wire == 0:
                    dims.append(value)
                elif t_number == 1 and t_wire == 2:  # packed repeated int64
                    j = 0
                    while j < len(value):
                        d, j = _varint(value, j)
                        dims.append(d)
            total += math.prod(dims)
    return total
