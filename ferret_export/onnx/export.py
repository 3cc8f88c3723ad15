"""``checkpoint -> ONNX``: build, check, verify against PyTorch, then write atomically."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from ferret_export.onnx.graph import GraphOptions, build_graph
from ferret_export.verify import Comparison, ParityError, Tolerance, compare
from ferret_runtime import __version__
from ferret_runtime.backends import EXTERNAL_LPD
from ferret_runtime.errors import ConfigError
from ferret_runtime.fileio import atomic_write, sha256
from ferret_runtime.metadata import encode
from ferret_runtime.preprocess import Preprocess, find_images, load_image, median_residual, normalize, prepare
from ferret_runtime.samples import write_samples

# fp16: float16's epsilon (~1e-3) as rtol, since out-of-distribution inputs (noise) reach logits of ~35
TOLERANCE = {"fp32": Tolerance(1e-4), "fp16": Tolerance(2e-2, 1e-3)}
MIN_OPSET, MAX_OPSET = 17, 21
LPD_MODES = ("portable", "plugin", "external")
DEFAULT_GRAPH_OPTIONS = GraphOptions()  # frozen, so one shared default is safe


@dataclass
class ExportResult:
    path: Path
    model: onnx.ModelProto
    comparisons: list[Comparison]


def _metadata(loaded, opts: GraphOptions, pre: Preprocess, weights: Path, threshold: float | None) -> dict[str, str]:
    cfg = loaded.config
    if threshold is None:  # the checkpoint's calibrated threshold, else the paper's 0.5
        threshold = float(loaded.calibration["threshold"]) if loaded.calibration else 0.5
    return encode({
        "arch": cfg.arch, "lpd_func": cfg.lpd_func, "window_size": cfg.window_size,
        "lpd_mode": "none" if cfg.lpd_func == "origin" else opts.lpd,
        "precision": "fp16" if opts.fp16 else "fp32", "preprocess": pre.to_dict(), "threshold": threshold,
        "toolkit_version": __version__,
        "provenance": {"checkpoint": weights.name, "checkpoint_sha256": sha256(weights),
                       "source_format": loaded.source_format, "lpd_source": loaded.lpd_source,
                       "train_config": loaded.train_config, "opset": opts.opset,
                       # a calibrated checkpoint's scaling and threshold travel with the export
                       **({"calibration": loaded.calibration} if loaded.calibration else {})},
    })


def graph_preprocess(pre: Preprocess, opts: GraphOptions) -> Preprocess:
    """The preprocessing the runtime must apply before this graph's input."""
    crop = pre.crop if opts.dynamic_hw else opts.input_size
    if opts.preprocess:
        return replace(pre, crop=crop, layout="NHWC", dtype="uint8")
    return replace(pre, crop=crop, layout="NCHW", dtype="float32")  # fp16 graphs too: see build_graph


def _verify_cases(opts: GraphOptions, pre: Preprocess, images: list[Path]) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 NHWC batch): the real images, then random batches of several sizes."""
    size = opts.input_size
    crop_pre = replace(pre, crop=size)
    real = np.stack([prepare(load_image(p), crop_pre) for p in images])
    rng = np.random.default_rng(0)
    batches = [1, 3, 8] if opts.dynamic_batch else [1]
    cases = [(f"real images ({len(images)})", real)] if opts.dynamic_batch else \
        [(f"real image {p.name}", real[i : i + 1]) for i, p in enumerate(images)]
    cases += [(f"random batch of {n}", rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)) for n in batches]
    if opts.dynamic_hw:  # a size other than the one the user named, odd on purpose
        cases.append(("random, other H/W", rng.integers(0, 256, (2, size // 2 + 3, size // 2 + 17, 3), dtype=np.uint8)))
    return cases


def verify(model_proto: onnx.ModelProto, loaded, opts: GraphOptions, pre: Preprocess, images: list[Path],
           log: Callable[[str], None]) -> list[Comparison]:
    """ONNX Runtime (CPU) vs PyTorch float32 on real images and random batches."""
    import onnxruntime as ort
    import torch

    # plugin mode: ONNX Runtime cannot run ferret::lpd, so verify the same weights with the portable LPD
    runnable = build_graph(loaded.model, replace(opts, lpd="portable"), pre.mean, pre.std) \
        if opts.lpd == "plugin" else model_proto
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(runnable.SerializeToString(), so, providers=["CPUExecutionProvider"])
    tol = TOLERANCE["fp16" if opts.fp16 else "fp32"]
    model = loaded.model.float().eval()
    results = []
    for name, u8 in _verify_cases(opts, pre, images):
        x = normalize(u8, pre.mean, pre.std)
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).numpy()
        # external: the CNN gets what the runtime feeds it, the residual from ferret_runtime's own LPD
        feed = u8 if opts.preprocess else median_residual(x) if opts.lpd == "external" else x
        got = sess.run(None, {"input": feed})[0]
        c = compare(name, feed.shape, got, ref, tol)
        log(f"[verify] {c}")
        results.append(c)
    return results


def export_onnx(weights: str | Path, out: str | Path, opts: GraphOptions = DEFAULT_GRAPH_OPTIONS, *,
                lpd_func: str | None = None, window_size: int | None = None, verify_images: list | None = None,
                check: bool = True, run_verify: bool = True, simplify: bool = False, threshold: float | None = None,
                log: Callable[[str], None] = print) -> ExportResult:
    """Export a checkpoint; the file is written only after the checks pass."""
    from ferret_train.checkpoint import load_checkpoint

    if not MIN_OPSET <= opts.opset <= MAX_OPSET:
        raise ConfigError(f"Received opset {opts.opset}; expected {MIN_OPSET}..{MAX_OPSET}")
    if opts.lpd not in LPD_MODES:
        raise ConfigError(f"Received LPD mode {opts.lpd!r}; expected one of {', '.join(LPD_MODES)}")
    if opts.lpd == "external" and opts.preprocess:
        raise ConfigError("Received --lpd external with --preprocess; expected one of them (with an external LPD the "
                          "runtime does all the preprocessing, in one kernel on a GPU)")
    if opts.input_size < 8:
        raise ConfigError(f"Received input size {opts.input_size}; expected >= 8")
    weights, out = Path(weights), Path(out)
    loaded = load_checkpoint(weights, lpd_func=lpd_func, window_size=window_size)
    cfg = loaded.config
    if opts.lpd == "external" and (cfg.lpd_func, cfg.window_size) != EXTERNAL_LPD:
        raise ConfigError(f"{weights}: received --lpd external for a model with LPD {cfg.lpd_func}/{cfg.window_size}; "
                          f"expected {EXTERNAL_LPD[0]}/{EXTERNAL_LPD[1]}, the LPD the fused preprocessing kernel "
                          "computes (export this model with --lpd portable)")
    pre = graph_preprocess(loaded.preprocess, opts)
    proto = build_graph(loaded.model, opts, pre.mean, pre.std)
    if simplify:
        proto = _simplify(proto)
    for k, v in _metadata(loaded, opts, pre, weights, threshold).items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    log(f"[export] {loaded.config.arch} lpd={loaded.config.lpd_func}/{loaded.config.window_size} "
        f"({loaded.lpd_source}) opset {opts.opset} {'fp16' if opts.fp16 else 'fp32'} lpd-mode {opts.lpd} "
        f"{len(proto.graph.node)} nodes")
    if check:
        full = opts.lpd != "plugin"  # a ferret::lpd node has no schema for shape inference
        onnx.checker.check_model(proto, full_check=full)
        log("[check] onnx.checker " + ("full check" if full else "(custom domain: structure only)") + " PASSED")
    comparisons: list[Comparison] = []
    if run_verify:
        with tempfile.TemporaryDirectory() as tmp:
            images = find_images(verify_images) if verify_images else write_samples(tmp, n=2, size=opts.input_size)
            comparisons = verify(proto, loaded, opts, pre, images, log)
        failed = [c for c in comparisons if not c.passed]
        if failed:
            raise ParityError(f"{out}: not written: {len(failed)} of {len(comparisons)} verification cases exceed "
                              f"{failed[0].tol} (worst max abs err {max(c.max_abs for c in failed):.3e})")
    atomic_write(out, lambda f: f.write(proto.SerializeToString()))
    log(f"[export] wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return ExportResult(out, proto, comparisons)


def _simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        import onnxslim
    except ImportError:
        raise ConfigError("--simplify needs onnxslim: pip install onnxslim") from None
    return onnxslim.slim(copy.deepcopy(proto))


def custom_domains(proto: onnx.ModelProto) -> set[str]:
    """Operator domains other than the standard one (empty for a portable export)."""
    return {n.domain for n in proto.graph.node} - {"", "ai.onnx"}
