"""FerretNet as an ONNX graph of standard operators, built directly from the PyTorch module.

Why not ``torch.onnx.export``: ``aten::median`` has no ONNX symbolic, the TorchScript exporter is
deprecated, and the dynamo exporter turns the LPD's padded slicing with dynamic H/W into shape
arithmetic. FerretNet is a fixed, small architecture: writing its graph here keeps every node
standard and static (slices use negative ends, so dynamic H/W needs no Shape ops), folds
BatchNorm into the convolutions, and lets precision, preprocessing and the LPD mode be chosen per
export. Parity with PyTorch is verified at every export (``ferret_export.verify``).

The LPD reads ``ferret_runtime.lpd_spec``: for 3x3 medians the pruned median-of-9 network as
Min/Max nodes (30 for ``median``/``retmed``, 25 for ``excmed``); for larger windows a Concat of the
k*k slices and TopK; Min/Max/Sum for the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ferret_runtime.lpd_spec import LPDSpec, get_lpd_spec, median3x3_centre, median9, median_rank

INPUT, OUTPUT = "input", "logit"
PLUGIN_OP, PLUGIN_DOMAIN = "lpd", "ferret"  # the TensorRT plugin ferret::lpd (see ferret_export docs)
_INT_MAX = 2**62


@dataclass
class GraphBuilder:
    """Accumulates nodes and initializers with unique names."""

    opset: int
    float_type: int = TensorProto.FLOAT
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    _n: int = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value: np.ndarray | float, hint: str = "c", dtype: np.dtype | None = None) -> str:
        if dtype is None:
            dtype = np.float16 if self.float_type == TensorProto.FLOAT16 else np.float32
        arr = np.asarray(value, dtype=dtype)
        n = self.name(hint)
        self.inits.append(numpy_helper.from_array(arr, n))
        return n

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, domain: str = "", **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def op_multi(self, op_type: str, inputs: list[str], n_out: int, hint: str, **attrs) -> list[str]:
        outs = [self.name(f"{hint}_out{i}") for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(hint), **attrs))
        return outs

    def reduce(self, op_type: str, x: str, axis: int) -> str:
        """ReduceMin/Max over one axis, keepdims=0 (axes moved from attribute to input in opset 18)."""
        if self.opset >= 18:
            return self.op(op_type, [x, self.const(np.array([axis]), "axes", np.int64)], keepdims=0)
        return self.op(op_type, [x], axes=[axis], keepdims=0)


# ---------------------------------------------------------------------------------------------- LPD
def _windows(g: GraphBuilder, x: str, k: int, pad_value: float) -> list[str]:
    """Pad once, then the k*k shifted slices (row-major, centre at k*k // 2)."""
    p = k // 2
    pads = g.const(np.array([0, 0, p, p, 0, 0, p, p]), "pads", np.int64)
    xp = g.op("Pad", [x, pads, g.const(np.array(pad_value), "pad_value")], "lpd_pad", mode="constant")
    axes = g.const(np.array([2, 3]), "axes", np.int64)
    views = []
    for i in range(k):
        for j in range(k):
            # slice [i, H + i) of the padded H + 2p axis: end = i - 2p from the end (or to the end)
            ends = [i - 2 * p if i < 2 * p else _INT_MAX, j - 2 * p if j < 2 * p else _INT_MAX]
            views.append(g.op("Slice", [xp, g.const(np.array([i, j]), "starts", np.int64),
                                        g.const(np.array(ends), "ends", np.int64), axes], f"lpd_v{i}{j}"))
    return views


def lpd_nodes(g: GraphBuilder, x: str, spec: LPDSpec, k: int) -> str:
    """Emit the reconstruction ``lpd(x)`` for one spec and window; returns its tensor name."""
    views = _windows(g, x, k, spec.pad_value)
    c = k * k // 2
    neighbours = views[:c] + views[c + 1:]
    if spec.reduce == "median" and k == 3:
        def bin_op(op_type: str):
            return lambda a, b: g.op(op_type, [a, g.const(np.array(b)) if isinstance(b, float) else b],
                                     "lpd_" + op_type.lower())
        views[c] = median3x3_centre(spec, views[c])
        return median9(views, bin_op("Min"), bin_op("Max"))
    if spec.reduce in ("min", "max"):  # the masked centre is +-inf: leaving it out is the same
        return g.op(spec.reduce.capitalize(), neighbours, "lpd_" + spec.reduce)
    if spec.reduce == "mean":  # masked centre = 0 adds nothing; divide by k*k as the original
        return g.op("Div", [g.op("Sum", neighbours, "lpd_sum"), g.const(np.array(float(k * k)))], "lpd_mean")
    # median of a larger window: stack the values on a new axis, keep the r+1 smallest, take their max
    if spec.center == "mask":
        views[c] = g.op("Sub", [views[c], views[c]], "lpd_zero")  # the masked centre: 0 (x is finite)
    elif spec.center == "drop":
        views = neighbours
    unsq = g.const(np.array([2]), "axes", np.int64)
    stacked = g.op("Concat", [g.op("Unsqueeze", [v, unsq]) for v in views], "lpd_stack", axis=2)
    r = median_rank(spec, k)
    smallest, _ = g.op_multi("TopK", [stacked, g.const(np.array([r + 1]), "k", np.int64)], 2, "lpd_topk",
                             axis=2, largest=0, sorted=1)
    return g.reduce("ReduceMax", smallest, axis=2)


def lpd_plugin_node(g: GraphBuilder, x: str, func: str, k: int) -> str:
    """One ``ferret::lpd`` node for the TensorRT plugin (not runnable by standard ONNX consumers)."""
    # plugin_namespace + aot=1: TensorRT's ONNX parser maps the node to the Python plugin ferret::lpd and
    # asks for its ahead-of-time implementation, so the kernel's PTX is embedded in the engine
    return g.op(PLUGIN_OP, [x], "lpd_plugin", domain=PLUGIN_DOMAIN, func=func, window_size=k,
                plugin_namespace=PLUGIN_DOMAIN, aot=1)


# ---------------------------------------------------------------------------------------------- CNN
def _fold_bn(weight: np.ndarray, bias: np.ndarray | None, bn) -> tuple[np.ndarray, np.ndarray]:
    """Conv followed by eval-mode BatchNorm -> one conv (computed in float64)."""
    scale = bn.weight.detach().double().numpy() / np.sqrt(bn.running_var.detach().double().numpy() + bn.eps)
    w = weight.astype(np.float64) * scale[:, None, None, None]
    b = (bias.astype(np.float64) if bias is not None else 0.0) - bn.running_mean.detach().double().numpy()
    return w, b * scale + bn.bias.detach().double().numpy()


def _conv(g: GraphBuilder, x: str, conv, bn=None, hint: str = "conv") -> str:
    w = conv.weight.detach().double().numpy()
    b = conv.bias.detach().double().numpy() if conv.bias is not None else None
    if bn is not None:
        w, b = _fold_bn(w, b, bn)
    inputs = [x, g.const(w, hint + "_w")] + ([g.const(b, hint + "_b")] if b is not None else [])
    kh, kw = conv.kernel_size
    ph, pw = conv.padding
    return g.op("Conv", inputs, hint, kernel_shape=[kh, kw], strides=list(conv.stride), pads=[ph, pw, ph, pw],
                dilations=list(conv.dilation), group=conv.groups)


def ferretnet_nodes(g: GraphBuilder, model, x: str) -> str:
    """The CNN after the LPD: returns the (N, num_classes) logit tensor name."""
    x = g.op("Relu", [_conv(g, x, model.cbr1[0], model.cbr1[1], "cbr1")])
    x = g.op("Relu", [_conv(g, x, model.cbr2[0], model.cbr2[1], "cbr2")])
    for s, stage in enumerate(model.feature[:-1]):
        for b, block in enumerate(stage):
            name = f"s{s}b{b}"
            dil, bn1, _, sep, bn2 = block.layers
            y = g.op("Add", [_conv(g, x, dil.conv1, hint=name + "_d1"), _conv(g, x, dil.conv2, hint=name + "_d2")])
            y = g.op("Relu", [_conv(g, y, dil.conv3, bn1, name + "_mix")])
            y = _conv(g, _conv(g, y, sep.depth_wise, hint=name + "_dw"), sep.point_wise, bn2, name + "_pw")
            short = x if not hasattr(block.shortcut, "__getitem__") else \
                _conv(g, x, block.shortcut[0], block.shortcut[1], name + "_short")
            x = g.op("Relu", [g.op("Add", [y, short])], name + "_out")
    x = _conv(g, x, model.feature[-1], hint="head_conv")
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    lin = model.logit[1]
    return g.op("Gemm", [x, g.const(lin.weight.detach().double().numpy(), "fc_w"),
                         g.const(lin.bias.detach().double().numpy(), "fc_b")], "fc", transB=1)


def preprocess_nodes(g: GraphBuilder, x: str, mean, std) -> str:
    """uint8 NHWC -> normalised NCHW, in float32 in the order of ferret_runtime.preprocess.normalize."""
    f = g.op("Cast", [x], "to_float", to=TensorProto.FLOAT)
    f = g.op("Div", [f, g.const(np.float32(255.0), dtype=np.float32)])
    f = g.op("Sub", [f, g.const(np.asarray(mean, np.float32), "mean", np.float32)])
    f = g.op("Div", [f, g.const(np.asarray(std, np.float32), "std", np.float32)])
    return g.op("Transpose", [f], "to_nchw", perm=[0, 3, 1, 2])


@dataclass(frozen=True)
class GraphOptions:
    """What varies between exports of one model."""

    opset: int = 17
    fp16: bool = False
    dynamic_batch: bool = True
    dynamic_hw: bool = False
    input_size: int = 256
    preprocess: bool = False  # fold uint8 NHWC -> normalised float into the graph
    lpd: str = "portable"  # "plugin": one ferret::lpd node; "external": no LPD, the input is the residual


def build_graph(model, opts: GraphOptions, mean=None, std=None) -> onnx.ModelProto:
    """The whole model: [preprocess] -> x - lpd(x) -> [cast to float16] -> CNN -> logit (float32).

    ``lpd="external"`` leaves the LPD out: the input is the residual ``x - lpd(x)`` itself, which the
    runtime computes (the fused ``preprocess_lpd`` kernel on a GPU, ``median_residual`` on the CPU).

    With ``fp16`` the input and the LPD stay float32: the residual subtracts nearly equal
    neighbours, so rounding the input to float16 first (about 1e-3 on normalised pixels) would
    become a large relative error in what the CNN sees (up to 6e-2 on the authors' logits, against
    2e-3 this way). The residual is cast once; weights and activations after it are float16.
    """
    g = GraphBuilder(opts.opset, TensorProto.FLOAT)
    n = "N" if opts.dynamic_batch else 1
    h, w = ("H", "W") if opts.dynamic_hw else (opts.input_size, opts.input_size)
    if opts.preprocess:
        inp = helper.make_tensor_value_info(INPUT, TensorProto.UINT8, [n, h, w, 3])
        x = preprocess_nodes(g, INPUT, mean, std)
    else:
        inp = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [n, 3, h, w])
        x = INPUT
    cfg = model.cfg
    spec = get_lpd_spec(cfg.lpd_func)
    if spec is not None and opts.lpd != "external":
        rec = lpd_plugin_node(g, x, cfg.lpd_func, cfg.window_size) if opts.lpd == "plugin" \
            else lpd_nodes(g, x, spec, cfg.window_size)
        x = g.op("Sub", [x, rec], "lpd_residual")
    if opts.fp16:
        x = g.op("Cast", [x], "to_half", to=TensorProto.FLOAT16)
        g.float_type = TensorProto.FLOAT16
    logit = ferretnet_nodes(g, model, x)
    if opts.fp16:
        g.nodes.append(helper.make_node("Cast", [logit], [OUTPUT], name="output", to=TensorProto.FLOAT))
    else:
        g.nodes.append(helper.make_node("Identity", [logit], [OUTPUT], name="output"))
    out = helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [n, cfg.num_classes])
    graph = helper.make_graph(g.nodes, f"{cfg.arch}-{cfg.lpd_func}-{cfg.window_size}", [inp], [out], g.inits)
    opsets = [helper.make_opsetid("", opts.opset)]
    if opts.lpd == "plugin":
        opsets.append(helper.make_opsetid(PLUGIN_DOMAIN, 1))
    m = helper.make_model(graph, opset_imports=opsets, producer_name="ferretnet-deploy")
    m.ir_version = min(m.ir_version, 9)  # readable by ONNX Runtime >= 1.16 and TensorRT 10
    return m


def lpd_graph(func: str, k: int, shape: tuple[int, int, int, int], opset: int = 17,
              fp16: bool = False) -> onnx.ModelProto:
    """A graph of the LPD reconstruction alone (for tests and benchmarks)."""
    g = GraphBuilder(opset, TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT)
    spec = get_lpd_spec(func)
    rec = lpd_nodes(g, INPUT, spec, k)
    g.nodes.append(helper.make_node("Identity", [rec], ["rec"]))
    graph = helper.make_graph(g.nodes, f"lpd-{func}-{k}",
                              [helper.make_tensor_value_info(INPUT, g.float_type, list(shape))],
                              [helper.make_tensor_value_info("rec", g.float_type, list(shape))], g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = min(m.ir_version, 9)
    return m
