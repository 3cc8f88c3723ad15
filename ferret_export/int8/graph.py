"""Where INT8 goes in a FerretNet graph, and the rewrites that prepare it (ONNX protos in, out).

The CNN after the LPD residual may be quantised, the LPD network before it never (:func:`cnn_nodes`);
residual Adds get their own Q/DQ pair so TensorRT fuses them into the convolution
(:func:`residual_adds`, :func:`insert_residual_qdq`); :func:`equalize` evens out channel ranges
first. The reasons and measurements are in ``ferret_export.int8.quantize``'s docstring.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ferret_runtime.errors import ConfigError, FerretError

WEIGHTED_OPS = ("Conv", "Gemm")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class QuantizationError(FerretError):
    """A quantised model that cannot be produced or fails its own checks."""


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def cnn_nodes(proto: onnx.ModelProto) -> set[str]:
    """Names of the nodes after the LPD residual: the CNN that may be quantised.

    Everything the graph input reaches before the first weighted op (the optional preprocessing,
    the LPD network, the residual Sub) is excluded, found by walking back from the first Conv.
    """
    graph = proto.graph
    producers = _producers(graph)
    first = next((n for n in graph.node if n.op_type in WEIGHTED_OPS), None)
    if first is None:
        raise ConfigError("Received a graph without Conv/Gemm nodes; expected a FerretNet CNN")
    front: set[str] = set()
    stack = [first.input[0]]
    while stack:
        node = producers.get(stack.pop())
        if node is not None and node.name not in front:
            front.add(node.name)
            stack.extend(node.input)
    return {n.name for n in graph.node} - front


def residual_adds(proto: onnx.ModelProto, allowed: set[str]) -> list[onnx.NodeProto]:
    """``Add(conv_out, other)`` nodes in the CNN: TensorRT fuses them into the Conv, ``other`` as residual."""
    producers = _producers(proto.graph)
    inits = {i.name for i in proto.graph.initializer}
    out = []
    for n in proto.graph.node:
        if n.op_type != "Add" or n.name not in allowed or len(n.input) != 2 or n.input[1] in inits:
            continue
        first = producers.get(n.input[0])
        if first is not None and first.op_type == "Conv":
            out.append(n)
    return out


# ------------------------------------------------------------------------------- equalisation
def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def equalizable(proto: onnx.ModelProto, targets: set[str]
                ) -> list[tuple[onnx.NodeProto, onnx.NodeProto, list[onnx.NodeProto]]]:
    """(conv, relu, consumer convs) where ``relu(conv(.))`` feeds only convolutions in ``targets``, as their
    data input."""
    consumers = _consumers(proto.graph)
    allowed = cnn_nodes(proto)
    out = []
    for conv in proto.graph.node:
        if conv.op_type != "Conv" or conv.name not in allowed:
            continue
        after = consumers.get(conv.output[0], [])
        if len(after) != 1 or after[0].op_type != "Relu":
            continue
        relu = after[0]
        users = consumers.get(relu.output[0], [])
        if users and all(u.op_type == "Conv" and u.name in targets and list(u.input).count(relu.output[0]) == 1
                         and u.input[0] == relu.output[0] for u in users):
            out.append((conv, relu, users))
    return out


def _attr(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def equalize(proto: onnx.ModelProto, batches: Sequence[np.ndarray], input_name: str,
             targets: set[str]) -> tuple[onnx.ModelProto, int]:
    """Rescale the channels of ``relu(conv(.))`` tensors to one range; the network computes the same function.

    Per-tensor int8 gives every channel of an activation the step of the widest one: where one
    channel reaches 9 and another 0.04 (FerretNet's first ReLU), the narrow channels round to a few
    levels. ReLU commutes with a positive per-channel scale, so dividing channel c of the producing
    convolution (weights and bias) by ``s_c = range_c / max range`` and multiplying the consumers'
    input channel c by ``s_c`` leaves the float function unchanged while the activation's channels
    share one range (cross-layer equalisation with the activations' own maxima on a few batches; a
    per-channel percentile instead amplifies channels that are rarely active and then clip).
    Returns the new model and how many tensors were rescaled.
    """
    import onnxruntime as ort

    proto = copy.deepcopy(proto)
    cands = equalizable(proto, targets)
    if not cands:
        return proto, 0
    probe = copy.deepcopy(proto)
    names = [relu.output[0] for _, relu, _ in cands]
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    acts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for x in batches:
        for n, v in zip(names, sess.run(names, {input_name: x})):
            acts[n].append(np.moveaxis(v, 1, 0).reshape(v.shape[1], -1))  # (C, N*H*W)
    inits = {i.name: i for i in proto.graph.initializer}
    uses = _consumers(proto.graph)
    done = 0
    for conv, relu, users in cands:
        a = np.max([m.max(axis=1) for m in acts[relu.output[0]]], axis=0).astype(np.float64)
        params = [conv.input[1], *conv.input[2:3]] + [u.input[1] for u in users]
        if a.max() <= 0 or any(len(uses[p]) != 1 or p not in inits for p in params):
            continue  # dead tensor, or shared/non-constant weights: leave as is
        s = np.where(a > 0, a / a.max(), 1.0)
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        _set(inits[conv.input[1]], w / s[:, None, None, None])
        if len(conv.input) > 2 and conv.input[2]:
            _set(inits[conv.input[2]], numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) / s)
        for u in users:
            w = numpy_helper.to_array(inits[u.input[1]]).astype(np.float64)
            groups, per_group = _attr(u, "group", 1), w.shape[1]
            in_channel = ((np.arange(w.shape[0]) // (w.shape[0] // groups))[:, None] * per_group
                          + np.arange(per_group)[None, :])
            _set(inits[u.input[1]], w * s[in_channel][:, :, None, None])
        done += 1
    return proto, done


def _set(init: onnx.TensorProto, value: np.ndarray) -> None:
    init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))



def insert_residual_qdq(proto: onnx.ModelProto, adds: list[str], ranges: dict[str, tuple[float, float]]) -> int:
    """Quantise the second input of each residual Add with a dedicated Q/DQ pair; returns how many.

    The scale is the one ONNX Runtime gave the same tensor where it feeds a Conv, else computed
    from the calibrated range the same way (symmetric int8: amax / 127).
    """
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    graph = proto.graph
    existing = {n.input[0]: (n.input[1], n.input[2]) for n in graph.node if n.op_type == "QuantizeLinear"}
    by_name = {n.name: n for n in graph.node}
    qmin, qmax = get_qmin_qmax_for_qType(TensorProto.INT8, symmetric=True)
    inserted = 0
    for name in adds:
        add = by_name[name]
        t = add.input[1]
        if t in existing:
            scale, zp = existing[t]
        elif t in ranges:
            lo, hi = ranges[t]
            _, s = compute_scale_zp(np.float32(lo), np.float32(hi), qmin, qmax, symmetric=True)
            scale, zp = f"{t}_residual_scale", f"{t}_residual_zero_point"
            graph.initializer.extend([numpy_helper.from_array(np.asarray(s, np.float32), scale),
                                      numpy_helper.from_array(np.asarray(0, np.int8), zp)])
            existing[t] = (scale, zp)
        else:
            raise QuantizationError(f"residual input {t!r} of {name!r} has no calibrated range")
        q, dq = f"{t}_{name}_QuantizeLinear", f"{t}_{name}_DequantizeLinear"
        idx = list(graph.node).index(add)
        graph.node.insert(idx, helper.make_node("DequantizeLinear", [q + "_Output", scale, zp], [dq + "_Output"],
                                                name=dq))
        graph.node.insert(idx, helper.make_node("QuantizeLinear", [t, scale, zp], [q + "_Output"], name=q))
        add.input[1] = dq + "_Output"
        inserted += 1
    return inserted



def quantized_inputs(proto: onnx.ModelProto) -> list[str]:
    """Names of the non-Q/DQ nodes that take at least one input from a DequantizeLinear."""
    dq_out = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in proto.graph.node if n.op_type not in QDQ_OPS and any(i in dq_out for i in n.input)]
