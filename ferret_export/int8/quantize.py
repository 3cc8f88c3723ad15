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
import io
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ferret_export.int8.data import DecodedImages, Normalized, decode_images, graph_input, images_digest, select_images
from ferret_export.int8.graph import (
    QDQ_OPS,
    WEIGHTED_OPS,
    QuantizationError,
    cnn_nodes,
    equalize,
    insert_residual_qdq,
    quantized_inputs,
    residual_adds,
)
from ferret_export.onnx.graph import PLUGIN_DOMAIN
from ferret_runtime.errors import ConfigError
from ferret_runtime.fileio import atomic_write
from ferret_runtime.metadata import PREFIX, decode
from ferret_runtime.preprocess import Preprocess

METHODS = ("entropy", "percentile", "minmax")
ENTROPY_BINS = 512  # TensorRT uses 2048; ORT's KL search in Python then takes ~1 s per tensor


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
    images: DecodedImages | None = field(default=None, repr=False)  # the calibration set, decoded once


# --------------------------------------------------------------------------------------- checks
def _load_source(src: Path) -> tuple[onnx.ModelProto, dict]:
    """The fp32 portable FerretNet ONNX to quantise, or ConfigError saying why not."""
    if not src.is_file():
        raise ConfigError(f"{src}: received a path that is not a file; "
                          "expected an fp32 .onnx from 'ferret export onnx'")
    try:
        proto = onnx.load(str(src))
    except Exception as e:  # onnx raises DecodeError / ValueError depending on the damage
        raise ConfigError(f"{src}: received a file onnx cannot parse ({type(e).__name__}); "
                          "expected an ONNX model") from None
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


# ------------------------------------------------------------------------------------ Q/DQ pass
def _ranges(tensors) -> dict[str, tuple[float, float]]:
    """Tensor -> (rmin, rmax) from a calibrator's ``TensorsData``."""
    return {name: (float(np.min(r.range_value[0])), float(np.max(r.range_value[1])))
            for name, r in tensors.data.items()}


def _metadata(src_meta_props: dict[str, str], calibration: dict) -> dict[str, str]:
    """The source's ``ferret.*`` props, precision int8 and the calibration under provenance."""
    out = {k: v for k, v in src_meta_props.items() if k.startswith(PREFIX)}
    out[PREFIX + "precision"] = "int8"
    prov = json.loads(out.get(PREFIX + "provenance", "{}"))
    prov["int8"] = calibration
    out[PREFIX + "provenance"] = json.dumps(prov, sort_keys=True)
    return out


# ------------------------------------------------------------------------------------- public
def quantize_int8(src_onnx: str | Path, out_onnx: str | Path, calib_images: Sequence[str | Path], *,
                  n_images: int = 256, method: str = "percentile", per_channel: bool = True, float_layers: int = 2,
                  equalize_channels: bool = True,
                  quantize_residual: bool = True, percentile: float = 99.9999, batch_size: int = 16, seed: int = 0,
                  log: Callable[[str], None] = print) -> QuantResult:
    """Calibrate on real images through our preprocessing and write an INT8 QDQ model atomically."""
    src, out = Path(src_onnx), Path(out_onnx)
    _check_options(method, batch_size, float_layers)
    proto, meta = _load_source(src)
    images = select_images(calib_images, n_images, seed)
    pre: Preprocess = meta["preprocess"]
    input_name, fixed_batch = graph_input(proto)
    batch_size = fixed_batch or (1 if pre.crop is None else batch_size)  # full-size images differ in size
    digest = images_digest(images)
    t0 = time.perf_counter()
    decoded = decode_images(images, pre, batch_size)  # once, as uint8; verification reuses it
    batches = Normalized(list(decoded.batches), pre)
    t_decode = time.perf_counter() - t0

    allowed = cnn_nodes(proto)
    kept, targets = _split_layers(proto, allowed, float_layers)
    n_eq = 0
    if equalize_channels:
        proto, n_eq = equalize(proto, batches[: max(1, 32 // batch_size)], input_name, set(targets))
    adds = [n.name for n in residual_adds(proto, allowed)] if quantize_residual else []
    log(f"[int8] {src.name}: {len(targets)} Conv/Gemm nodes in int8 ({len(kept)} first kept float32), "
        f"{len(adds)} residual Adds, {n_eq} equalised activations; "
        f"calibrating ({method}) on {len(images)} images in batches of {batch_size}")
    t1 = time.perf_counter()
    tensors = calibrate(proto, batches, input_name, method, percentile=percentile)
    t_calib = time.perf_counter() - t1
    qproto = _quantize_static(proto, tensors, targets, per_channel)
    n_residual = insert_residual_qdq(qproto, adds, _ranges(tensors))
    seconds = time.perf_counter() - t0

    calibration = {"method": method, "n_images": len(images), "images_sha256": digest, "per_channel": per_channel,
                   "activations": "int8 symmetric per-tensor", "weights": "int8 symmetric " +
                   ("per-channel" if per_channel else "per-tensor"), "equalized_activations": n_eq,
                   "float_layers": kept, "residual_adds": n_residual,
                   "float32": "preprocessing, LPD and x - lpd(x); biases"}
    del qproto.metadata_props[:]
    for k, v in _metadata({p.key: p.value for p in proto.metadata_props}, calibration).items():
        qproto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    qproto.producer_name = proto.producer_name or "ferretnet-deploy"
    _check(qproto, allowed, out)
    atomic_write(out, qproto.SerializeToString())
    log(f"[int8] {seconds:.1f} s (decode {t_decode:.1f} s, calibration {t_calib:.1f} s); wrote {out} "
        f"({out.stat().st_size / 1e6:.2f} MB; fp32 {src.stat().st_size / 1e6:.2f} MB)")
    return QuantResult(out, qproto, method, len(images), digest, seconds, quantized_inputs(qproto), decoded)


def _check_options(method: str, batch_size: int, float_layers: int) -> None:
    if method not in METHODS:
        raise ConfigError(f"Received calibration method {method!r}; expected one of {', '.join(METHODS)}")
    if batch_size < 1:
        raise ConfigError(f"Received batch_size {batch_size}; expected >= 1")
    if float_layers < 0:
        raise ConfigError(f"Received float_layers {float_layers}; expected >= 0")


def _split_layers(proto: onnx.ModelProto, allowed: set[str], float_layers: int) -> tuple[list[str], list[str]]:
    """(kept float32, quantised): the CNN's Conv/Gemm nodes, the first ``float_layers`` kept."""
    weighted = [n.name for n in proto.graph.node if n.name in allowed and n.op_type in WEIGHTED_OPS]
    kept, targets = weighted[:float_layers], weighted[float_layers:]
    if not targets:  # quantize_static reads an empty node list as "all nodes"
        raise ConfigError(f"Received float_layers {float_layers}; "
                          f"expected fewer than the model's {len(weighted)} Conv/Gemm layers")
    return kept, targets


def _quantize_static(proto: onnx.ModelProto, tensors, targets: list[str], per_channel: bool) -> onnx.ModelProto:
    """ONNX Runtime's Q/DQ pass over ``targets`` with the calibrated ranges, placed as TensorRT wants them."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

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
        return onnx.load(str(tmp_out))


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


