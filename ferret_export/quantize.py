"""``fp32 ONNX -> INT8 QDQ ONNX``: post-training static quantisation with ONNX Runtime, for TensorRT.

The precision lives in the graph as explicit QuantizeLinear/DequantizeLinear pairs (what a strongly
typed TensorRT network builds from), and ONNX Runtime's CPU provider runs the same file, so CI can
measure what INT8 costs in accuracy.

Placement follows TensorRT's Q/DQ recommendations:

- every input of a weighted op (Conv, Gemm) is quantised: activations per tensor, weights per
  output channel, both symmetric int8 (zero point 0); the weights are stored as int8;
- the outputs of weighted ops are not: TensorRT fuses what follows (bias, ReLU, the residual Add)
  into the convolution and quantises again where the next weighted op needs it;
- biases stay float32 (TensorRT takes no int32 bias DequantizeLinear);
- the second input of ``Add(conv(...), other)`` is quantised, so TensorRT can fuse the Add into
  the convolution that produces its first input, ``other`` read as an int8 residual.

The LPD network (Pad/Slice/Min/Max) and the residual ``x - lpd(x)`` stay float32: the residual
subtracts nearly equal neighbours, so quantising ``x`` or ``lpd(x)`` would leave almost nothing of
the signal. (The residual itself, a small-valued tensor with its own range, could be quantised as
the first convolution's input; by default that convolution stays float32, see below.)

Findings on the authors' FerretNet-S that shape the defaults (figures in tests/test_int8.py):

- the first two convolutions stay float32 (``float_layers=2``). They read the LPD residual and its
  first ReLU, whose information sits in rare large values: with them in int8 the logits move by up
  to 3 and 1.5% of proxy labels flip; without, agreement is 100% (they are 35% of the CNN's MACs:
  104 of 293 M per 256x256 image);
- per-tensor activation scales flatten narrow channels (the first ReLU's span 0.04..9): with
  ``float_layers=0`` :func:`equalize` halves the logit error; with the default it changes little;
- the tails matter, so calibrations that clip cost more than they save: ``percentile`` at 99.9999
  is the default; ``entropy`` (KL, as TensorRT's calibrator) clips hardest and is worst here.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ferret_runtime.errors import ConfigError, FerretError
from ferret_runtime.fileio import atomic_write, sha256
from ferret_runtime.metadata import PREFIX, decode
from ferret_runtime.preprocess import Preprocess, find_images, load_image, normalize, prepare

from .onnx_graph import PLUGIN_DOMAIN

METHODS = ("entropy", "percentile", "minmax")
ENTROPY_BINS = 512  # TensorRT uses 2048; ORT's KL search in Python then takes ~1 s per tensor
WEIGHTED_OPS = ("Conv", "Gemm")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class QuantizationError(FerretError):
    """A quantised model that cannot be produced or fails its own checks."""


@dataclass
class QuantResult:
    """What ``quantize_int8`` wrote and how it calibrated."""

    path: Path
    model: onnx.ModelProto
    method: str
    n_images: int
    images_sha256: str
    calib_seconds: float  # decoding, equalisation, calibration and quantisation
    quantized_nodes: list[str] = field(default_factory=list)  # the Conv/Gemm/Add nodes fed by DequantizeLinear


@dataclass
class Int8Comparison:
    """FP32 vs INT8 logits on the same preprocessed images."""

    n: int
    max_abs: float
    mean_abs: float
    agreement: float  # fraction of images with the same label at the models' threshold
    fp32_logits: np.ndarray
    int8_logits: np.ndarray

    def __str__(self) -> str:
        return (f"{'int8 vs fp32':<28} images {self.n:<6} logit max abs err {self.max_abs:.3e}  "
                f"mean abs err {self.mean_abs:.3e}  label agreement {100 * self.agreement:.2f}%")


# --------------------------------------------------------------------------------------- checks
def _load_source(src: Path) -> tuple[onnx.ModelProto, dict]:
    """The fp32 portable FerretNet ONNX to quantise, or ConfigError saying why not."""
    if not src.is_file():
        raise ConfigError(f"{src}: received a path that is not a file; expected an fp32 .onnx from 'ferret export onnx'")
    try:
        proto = onnx.load(str(src))
    except Exception as e:  # onnx raises DecodeError / ValueError depending on the damage
        raise ConfigError(f"{src}: received a file onnx cannot parse ({type(e).__name__}); expected an ONNX model") from None
    meta = decode({p.key: p.value for p in proto.metadata_props}, str(src))
    has_qdq = any(n.op_type in QDQ_OPS for n in proto.graph.node)
    if meta["precision"] != "fp32" or has_qdq:
        got = "int8 (Q/DQ nodes)" if has_qdq and meta["precision"] == "fp32" else meta["precision"]
        raise ConfigError(f"{src}: received an {got} model; expected an fp32 export to quantise "
                          "(export again without --fp16/--int8)")
    domains = {n.domain for n in proto.graph.node} - {"", "ai.onnx"}
    if meta["lpd_mode"] == "plugin" or PLUGIN_DOMAIN in domains:
        raise ConfigError(f"{src}: received a plugin-mode model (ferret.lpd_mode={meta['lpd_mode']}, "
                          f"node domains {sorted(domains) or '[]'}); expected a portable export (--lpd portable): "
                          "ONNX Runtime cannot calibrate a ferret::lpd node")
    if domains:
        raise ConfigError(f"{src}: received nodes in domains {sorted(domains)}; expected standard ONNX operators only")
    if meta["lpd_mode"] == "external":
        raise ConfigError(f"{src}: received a model without its LPD (ferret.lpd_mode=external); expected a portable "
                          "export (--lpd portable): calibration feeds normalised images")
    return proto, meta


def select_images(calib_images: Sequence[str | Path], n_images: int, seed: int = 0) -> list[Path]:
    """Expand files and folders, then take ``n_images`` of them, spread over the whole list.

    The choice is seeded, not the first N: a ForenSynths folder lists every real image before the
    fakes, and calibrating on one class alone would miss the other's activation ranges.
    """
    if n_images < 1:
        raise ConfigError(f"Received n_images {n_images}; expected >= 1")
    if isinstance(calib_images, (str, Path)):
        calib_images = [calib_images]
    if not calib_images:
        raise ConfigError("Received no calibration paths; expected image files or folders of images")
    for p in map(Path, calib_images):
        if not p.exists():
            raise ConfigError(f"{p}: received a calibration path that does not exist; expected an image or a folder of images")
    images = find_images(list(calib_images))
    if not images:
        raise ConfigError(f"Received calibration data {[str(p) for p in calib_images]} without images; expected "
                          "at least one image file (.png, .jpg, ...)")
    if len(images) <= n_images:
        return images
    pick = np.random.default_rng(seed).choice(len(images), n_images, replace=False)
    return [images[i] for i in sorted(pick)]


def images_digest(images: Sequence[Path]) -> str:
    """sha256 over (file name, content sha256) in order: names the calibration set wherever it lives."""
    h = hashlib.sha256()
    for p in images:
        h.update(f"{Path(p).name}\0{sha256(p)}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------- preprocessing
def _model_input(proto: onnx.ModelProto) -> tuple[str, int | None]:
    """(input name, fixed batch size or None when dynamic)."""
    inp = proto.graph.input[0]
    dim = inp.type.tensor_type.shape.dim[0]
    return inp.name, dim.dim_value if dim.HasField("dim_value") else None


def image_batches(images: Sequence[Path], pre: Preprocess, batch_size: int) -> Iterator[tuple[list[Path], np.ndarray]]:
    """(paths, uint8 NHWC batch) prepared exactly as the runtime does (``ferret_runtime.preprocess``).

    Consecutive images of one size share a batch; with ``crop=None`` (full-size models) sizes differ
    and a batch closes early. :func:`model_input` turns a batch into what the graph takes.
    """
    paths: list[Path] = []
    arrays: list[np.ndarray] = []
    for p in images:
        img = prepare(load_image(p), pre)
        if arrays and (len(arrays) == batch_size or img.shape != arrays[0].shape):
            yield paths, np.stack(arrays)
            paths, arrays = [], []
        paths.append(Path(p))
        arrays.append(img)
    if arrays:
        yield paths, np.stack(arrays)


def model_input(u8: np.ndarray, pre: Preprocess) -> np.ndarray:
    """uint8 NHWC as is for graphs that contain the preprocessing, else normalised float32 NCHW."""
    return u8 if pre.dtype == "uint8" else normalize(u8, pre.mean, pre.std)


def calibrate(proto: onnx.ModelProto, batches: Sequence[np.ndarray], input_name: str, method: str, *,
              percentile: float = 99.9999):
    """Activation ranges of every Conv/Gemm input and output with ONNX Runtime's calibrators (a ``TensorsData``).

    The batches go in one at a time (the calibrators otherwise keep every intermediate tensor of
    every image before building histograms: gigabytes for a few hundred 256x256 images). Percentile
    histograms have 2048 bins; entropy ``ENTROPY_BINS`` (quantize_static would use 128, which leaves
    the KL search a single candidate).
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    class OneBatch(CalibrationDataReader):
        def __init__(self, x: np.ndarray) -> None:
            self.x: np.ndarray | None = x

        def get_next(self) -> dict[str, np.ndarray] | None:
            x, self.x = self.x, None
            return None if x is None else {input_name: x}

    calib_method = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
                    "minmax": CalibrationMethod.MinMax}[method]
    options = {"symmetric": True, "num_bins": ENTROPY_BINS if method == "entropy" else 2048, "num_quantized_bins": 128,
               "percentile": percentile}
    with tempfile.TemporaryDirectory(prefix="ferret-calib-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        path = Path(tmp) / "model.onnx"
        onnx.save(onnx.shape_inference.infer_shapes(proto), str(path))  # value_info names the tensors to calibrate
        calibrator = create_calibrator(path, list(WEIGHTED_OPS), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=calib_method, extra_options=options)
        for x in batches:
            calibrator.collect_data(OneBatch(x))
        return calibrator.compute_data()


class _Normalized(Sequence):
    """The model inputs of uint8 batches, computed when read (float32 would take 4x the memory)."""

    def __init__(self, raw: list[np.ndarray], pre: Preprocess) -> None:
        self.raw, self.pre = raw, pre

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [model_input(u8, self.pre) for u8 in self.raw[i]]
        return model_input(self.raw[i], self.pre)


# ------------------------------------------------------------------------------ graph analysis
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


def equalizable(proto: onnx.ModelProto, targets: set[str]) -> list[tuple[onnx.NodeProto, onnx.NodeProto, list[onnx.NodeProto]]]:
    """(conv, relu, consumer convs) where ``relu(conv(.))`` feeds only convolutions in ``targets``, as their data input."""
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
            in_channel = (np.arange(w.shape[0]) // (w.shape[0] // groups))[:, None] * per_group + np.arange(per_group)[None, :]
            _set(inits[u.input[1]], w * s[in_channel][:, :, None, None])
        done += 1
    return proto, done


def _set(init: onnx.TensorProto, value: np.ndarray) -> None:
    init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))


# ------------------------------------------------------------------------------------ Q/DQ pass
def _insert_residual_qdq(proto: onnx.ModelProto, adds: list[str], ranges: dict[str, tuple[float, float]]) -> int:
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
        graph.node.insert(idx, helper.make_node("DequantizeLinear", [q + "_Output", scale, zp], [dq + "_Output"], name=dq))
        graph.node.insert(idx, helper.make_node("QuantizeLinear", [t, scale, zp], [q + "_Output"], name=q))
        add.input[1] = dq + "_Output"
        inserted += 1
    return inserted


def _ranges(tensors) -> dict[str, tuple[float, float]]:
    """Tensor -> (rmin, rmax) from a calibrator's ``TensorsData``."""
    return {name: (float(np.min(r.range_value[0])), float(np.max(r.range_value[1]))) for name, r in tensors.data.items()}


def _metadata(src_meta_props: dict[str, str], calibration: dict) -> dict[str, str]:
    """The source's ``ferret.*`` props, precision int8 and the calibration under provenance."""
    out = {k: v for k, v in src_meta_props.items() if k.startswith(PREFIX)}
    out[PREFIX + "precision"] = "int8"
    prov = json.loads(out.get(PREFIX + "provenance", "{}"))
    prov["int8"] = calibration
    out[PREFIX + "provenance"] = json.dumps(prov, sort_keys=True)
    return out


def quantized_inputs(proto: onnx.ModelProto) -> list[str]:
    """Names of the non-Q/DQ nodes that take at least one input from a DequantizeLinear."""
    dq_out = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in proto.graph.node if n.op_type not in QDQ_OPS and any(i in dq_out for i in n.input)]


# ------------------------------------------------------------------------------------- public
def quantize_int8(src_onnx: str | Path, out_onnx: str | Path, calib_images: Sequence[str | Path], *,
                  n_images: int = 256, method: str = "percentile", per_channel: bool = True, float_layers: int = 2,
                  equalize_channels: bool = True,
                  quantize_residual: bool = True, percentile: float = 99.9999, batch_size: int = 16, seed: int = 0,
                  log: Callable[[str], None] = print) -> QuantResult:
    """Calibrate on real images through our preprocessing and write an INT8 QDQ model atomically."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    src, out = Path(src_onnx), Path(out_onnx)
    if method not in METHODS:
        raise ConfigError(f"Received calibration method {method!r}; expected one of {', '.join(METHODS)}")
    if batch_size < 1:
        raise ConfigError(f"Received batch_size {batch_size}; expected >= 1")
    if float_layers < 0:
        raise ConfigError(f"Received float_layers {float_layers}; expected >= 0")
    proto, meta = _load_source(src)
    images = select_images(calib_images, n_images, seed)
    pre: Preprocess = meta["preprocess"]
    input_name, fixed_batch = _model_input(proto)
    batch_size = fixed_batch or (1 if pre.crop is None else batch_size)  # full-size images differ in size
    digest = images_digest(images)
    t0 = time.perf_counter()
    raw = [u8 for _, u8 in image_batches(images, pre, batch_size)]  # decoded once, kept as uint8 (192 KB an image)
    batches = _Normalized(raw, pre)
    t_decode = time.perf_counter() - t0

    allowed = cnn_nodes(proto)
    weighted = [n.name for n in proto.graph.node if n.name in allowed and n.op_type in WEIGHTED_OPS]
    kept, targets = weighted[:float_layers], weighted[float_layers:]
    if not targets:  # quantize_static reads an empty node list as "all nodes"
        raise ConfigError(f"Received float_layers {float_layers}; expected fewer than the model's {len(weighted)} Conv/Gemm layers")
    n_eq = 0
    if equalize_channels:
        proto, n_eq = equalize(proto, batches[: max(1, 32 // batch_size)], input_name, set(targets))
    adds = [n.name for n in residual_adds(proto, allowed)] if quantize_residual else []
    log(f"[int8] {src.name}: {len(targets)} Conv/Gemm nodes in int8 ({len(kept)} first kept float32), {len(adds)} residual "
        f"Adds, {n_eq} equalised activations; "
        f"calibrating ({method}) on {len(images)} images in batches of {batch_size}")
    t1 = time.perf_counter()
    tensors = calibrate(proto, batches, input_name, method, percentile=percentile)
    t_calib = time.perf_counter() - t1
    extra = {
        "ActivationSymmetric": True, "WeightSymmetric": True,  # zero points 0, as TensorRT requires
        "QuantizeBias": False,  # float bias: TensorRT takes no int32 DequantizeLinear
        "DedicatedQDQPair": True,  # one pair per consumer: TensorRT does not share them
        "OpTypesToExcludeOutputQuantization": list(WEIGHTED_OPS),
    }
    with tempfile.TemporaryDirectory(prefix="ferret-int8-") as tmp:
        tmp_out, cache = Path(tmp) / "int8.onnx", Path(tmp) / "calibration.json"
        save_tensors_data(tensors, cache)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # ORT warns about skipped pre-processing: our graph is already clean
        try:
            quantize_static(proto, tmp_out, None, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(WEIGHTED_OPS),
                            nodes_to_quantize=targets, per_channel=per_channel, activation_type=QuantType.QInt8,
                            weight_type=QuantType.QInt8, calibrate_method=tensors.calibration_method,
                            extra_options=extra, calibration_cache_path=cache)
        finally:
            root.setLevel(level)
        qproto = onnx.load(str(tmp_out))
    n_residual = _insert_residual_qdq(qproto, adds, _ranges(tensors))
    seconds = time.perf_counter() - t0

    calibration = {"method": method, "n_images": len(images), "images_sha256": digest, "per_channel": per_channel,
                   "activations": "int8 symmetric per-tensor", "weights": "int8 symmetric " +
                   ("per-channel" if per_channel else "per-tensor"), "equalized_activations": n_eq, "float_layers": kept,
                   "residual_adds": n_residual, "float32": "preprocessing, LPD and x - lpd(x); biases"}
    del qproto.metadata_props[:]
    for k, v in _metadata({p.key: p.value for p in proto.metadata_props}, calibration).items():
        qproto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    qproto.producer_name = proto.producer_name or "ferretnet-deploy"
    _check(qproto, allowed, out)
    atomic_write(out, lambda f: f.write(qproto.SerializeToString()))
    log(f"[int8] {seconds:.1f} s (decode {t_decode:.1f} s, calibration {t_calib:.1f} s); wrote {out} "
        f"({out.stat().st_size / 1e6:.2f} MB; fp32 {src.stat().st_size / 1e6:.2f} MB)")
    return QuantResult(out, qproto, method, len(images), digest, seconds, quantized_inputs(qproto))


def _check(proto: onnx.ModelProto, allowed: set[str], out: Path) -> None:
    """onnx.checker, and what TensorRT and the LPD rely on: zero points 0, no Q/DQ before the CNN."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise QuantizationError(f"{out}: not written: the quantised graph fails onnx.checker ({e})") from None
    inits = {i.name: i for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type in QDQ_OPS and len(n.input) > 2 and n.input[2] in inits:
            zp = inits[n.input[2]]
            if zp.data_type != TensorProto.INT8 or np.any(numpy_helper.to_array(zp) != 0):
                raise QuantizationError(f"{out}: not written: {n.name} has a non-zero or non-int8 zero point")
    dq_out = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for n in proto.graph.node:
        if n.op_type not in QDQ_OPS and n.name not in allowed and any(i in dq_out for i in n.input):
            raise QuantizationError(f"{out}: not written: Q/DQ feeds {n.op_type} {n.name}, before the CNN")


def verify_int8(fp32_onnx: str | Path, int8_onnx: str | Path, images: Sequence[str | Path], *,
                batch_size: int = 16, log: Callable[[str], None] = print) -> Int8Comparison:
    """Run both models in ONNX Runtime (CPU) on the same preprocessed images; compare logits and labels."""
    from ferret_runtime.backends.onnxruntime import OrtBackend

    paths = find_images(list(images))
    if not paths:
        raise ConfigError(f"Received images {[str(p) for p in images]}; expected at least one image")
    with OrtBackend(fp32_onnx, device="cpu") as ref, OrtBackend(int8_onnx, device="cpu") as q:
        pre = ref.info.preprocess
        if q.info.preprocess != pre:
            raise ConfigError(f"{int8_onnx}: received preprocessing {q.info.preprocess}; expected the fp32 model's {pre}")
        fixed = ref.session.get_inputs()[0].shape[0]  # an int for graphs exported without --dynamic
        bs = fixed if isinstance(fixed, int) else 1 if pre.crop is None else batch_size
        got, want = [], []
        for _, u8 in image_batches(paths, pre, bs):
            x = model_input(u8, pre)
            want.append(ref.run(x))
            got.append(q.run(x))
        threshold = ref.info.threshold
    a, b = np.concatenate(want), np.concatenate(got)
    diff = np.abs(a.astype(np.float64) - b)
    # labels as the Detector gives them: sigmoid(logit) > threshold
    la, lb = 1 / (1 + np.exp(-a.astype(np.float64))) > threshold, 1 / (1 + np.exp(-b.astype(np.float64))) > threshold
    c = Int8Comparison(len(a), float(diff.max()), float(diff.mean()), float(np.mean(la == lb)), a, b)
    log(f"[verify] {c}")
    return c
