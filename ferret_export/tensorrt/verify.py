"""A built engine against ONNX Runtime (CPU), before anything is written.

TensorRT's logits (through the runtime's ``TrtBackend``, as deployed) are compared with ONNX
Runtime's on real images and random batches at the profile's min/opt/max batch and, for a dynamic
H/W, its smallest and largest sizes and a non-square size (so a kernel that swaps H and W fails);
a plugin graph is compared with the same graph whose plugin node is replaced by the portable LPD.

Tolerances (TensorRT vs ONNX Runtime, both from the same graph):
  fp32  atol 1e-3 + rtol 1e-3   two float32 implementations (other conv algorithms, sum orders)
  fp16  atol 5e-2 + rtol 5e-3   twice the ONNX export's fp16 budget: each side is within it of float32
  int8  atol 2.5e-1 + rtol 5e-2 requantisation rounding may move a value by one step
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ferret_export.onnx.model import STANDARD_DOMAINS, OnnxModel
from ferret_export.tensorrt.profile import Profile, hw_axes
from ferret_export.verify import Comparison, ParityError, Tolerance, compare
from ferret_runtime import sidecar
from ferret_runtime.lpd_spec import get_lpd_spec
from ferret_runtime.preprocess import Preprocess, find_images, load_image, median_residual, normalize, prepare
from ferret_runtime.samples import natural_image

TOLERANCE = {"fp32": Tolerance(1e-3, 1e-3), "fp16": Tolerance(5e-2, 5e-3), "int8": Tolerance(2.5e-1, 5e-2)}


def portable_reference(model_path: Path) -> Any:
    """The graph as ONNX Runtime can run it: each ferret::lpd node replaced by the portable LPD."""
    import onnx
    from onnx import TensorProto, helper

    from ferret_export.onnx.graph import GraphBuilder, lpd_nodes

    proto = onnx.load(str(model_path))
    opset = next(o.version for o in proto.opset_import if o.domain in STANDARD_DOMAINS)
    nodes = []
    start = 10 * (len(proto.graph.node) + len(proto.graph.initializer))  # above every name the export numbered
    for node in proto.graph.node:
        if node.domain in STANDARD_DOMAINS:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        func, k = attrs["func"].decode(), int(attrs["window_size"])
        g = GraphBuilder(opset, TensorProto.FLOAT, _n=start)  # the LPD is float32 in every export
        x = node.input[0]
        rec = lpd_nodes(g, x, get_lpd_spec(func), k)
        out = g.op("Sub", [x, rec], "lpd_res") if node.op_type == "lpd_residual" else rec
        g.nodes.append(helper.make_node("Identity", [out], [node.output[0]], name=node.name + "_portable"))
        nodes += g.nodes
        proto.graph.initializer.extend(g.inits)
        start = g._n + 1
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    keep = [o for o in proto.opset_import if o.domain in STANDARD_DOMAINS]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    return proto


def _cases(model: OnnxModel, profile: Profile, images: list[Path]) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 NHWC batch): real images at the opt size, random batches at min/opt/max batch,
    and with a dynamic H/W the smallest and largest sizes, then the smallest height by the largest width."""
    axes = hw_axes(model)
    h, w = (profile.opt[a] for a in axes)
    pre: Preprocess = model.meta["preprocess"]
    real = np.stack([prepare(load_image(p), replace(pre, crop=h)) for p in images]) if h == w else None
    rng = np.random.default_rng(0)
    cases = []
    if real is not None:
        n = int(np.clip(len(real), profile.min[0], profile.max[0]))
        cases.append((f"real images ({len(images)})", np.resize(real, (n, *real.shape[1:]))))
    for label, b in zip(("min", "opt", "max"), (profile.min[0], profile.opt[0], profile.max[0])):
        cases.append((f"random, {label} batch {b}", rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)))
    (lo_h, lo_w), (hi_h, hi_w) = [tuple(s[a] for a in axes) for s in (profile.min, profile.max)]
    for label, sh, sw in (("min", lo_h, lo_w), ("max", hi_h, hi_w)):
        if (sh, sw) != (h, w):
            cases.append((f"random, {label} size {sh}x{sw}", rng.integers(0, 256, (profile.min[0], sh, sw, 3),
                                                                         dtype=np.uint8)))
    # dynamic H/W: taller than wide would read the same; a scene, since noise hides a wrong neighbourhood
    if lo_h != hi_w:
        scene = natural_image(rng, max(lo_h, hi_w))[:lo_h, :hi_w]
        cases.append((f"image, non-square {lo_h}x{hi_w}", np.repeat(scene[None], profile.min[0], axis=0)))
    return cases


def _feed(u8: np.ndarray, model: OnnxModel) -> np.ndarray:
    """The graph's input for decoded images, prepared on the host (ONNX Runtime's side of the check)."""
    pre: Preprocess = model.meta["preprocess"]
    if pre.dtype == "uint8":
        return u8 if pre.layout == "NHWC" else np.ascontiguousarray(u8.transpose(0, 3, 1, 2))
    x = normalize(u8, pre.mean, pre.std)
    if model.meta["lpd_mode"] == "external":
        x = median_residual(x)
    return x.astype(pre.dtype)


def _reference_session(model: OnnxModel) -> Any:
    import onnxruntime as ort

    reference = portable_reference(model.path) if model.plugin_nodes else None
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(reference.SerializeToString() if reference is not None else str(model.path), so,
                                providers=["CPUExecutionProvider"])


def verify_engine(blob: bytes, content: tuple, model: OnnxModel, profile: Profile, tol: Tolerance, out: Path,
                  verify_images: list | None, log: Callable[[str], None]) -> list[Comparison]:
    """TensorRT (through the runtime's TrtBackend) vs ONNX Runtime (CPU); ParityError on any failure."""
    from ferret_runtime.backends.tensorrt import TrtBackend
    from ferret_runtime.samples import write_samples

    sess = _reference_session(model)
    results = []
    with tempfile.TemporaryDirectory(prefix=".ferret-verify-", dir=out.parent if out.parent.is_dir() else None) as tmp:
        engine = Path(tmp) / out.name
        engine.write_bytes(blob)
        props, inputs, outputs = content
        sidecar.write(engine, props, inputs, outputs, tensorrt_version=_tensorrt_version(props))
        hw = profile.opt[hw_axes(model)[0]]
        images = find_images(verify_images) if verify_images else write_samples(Path(tmp) / "samples", n=2, size=hw)
        with TrtBackend(engine) as backend:  # as deployed: float engines get uint8, preprocessed on the GPU
            for name, u8 in _cases(model, profile, images):
                feed = _feed(u8, model)
                got = backend.run_impl(np.ascontiguousarray(u8) if backend.kernel else feed)
                ref = sess.run(None, {model.input_name: feed})[0]
                c = compare(name, feed.shape, np.asarray(got).reshape(ref.shape), ref, tol)
                log(f"[verify] {c}")
                results.append(c)
    failed = [c for c in results if not c.passed]
    if failed:
        raise ParityError(f"{out}: not written: {len(failed)} of {len(results)} verification cases exceed {tol} "
                          f"(worst max abs err {max(c.max_abs for c in failed):.3e})")
    return results


def _tensorrt_version(props: dict[str, str]) -> str:
    import json

    return json.loads(props[sidecar.ENGINE_KEY])["tensorrt_version"]
