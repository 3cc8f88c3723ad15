"""Model files that lie are refused by name, before anything is built or served.

Checkpoints: the model_config must agree with the weights' shapes and stay in bounds, a known
architecture name must have its known shape, and the preprocessing must be valid. ONNX graphs and
TensorRT sidecars: exactly one output with one logit per image, metadata in range, and (ONNX) weights
the size of the architecture the metadata names.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from ferret_export.onnx.export import export_onnx
from ferret_export.onnx.graph import GraphOptions
from ferret_runtime import Detector
from ferret_runtime.errors import CheckpointError, ConfigError
from ferret_runtime.metadata import ARCHS
from ferret_runtime.preprocess import Preprocess
from ferret_train import create_model
from ferret_train.checkpoint import load_checkpoint, save_checkpoint
from ferret_train.models import FerretConfig, FerretNet

from .conftest import REFERENCE, run_ferret


def _quiet(*_):
    pass


def _lying_ckpt(tmp_path: Path, **edits) -> Path:
    """``x.pth``: FerretNet-S in our format, its model_config edited afterwards with torch.save."""
    path = save_checkpoint(tmp_path / "x.pth", create_model("ferretnet-s").eval())
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["model_config"].update(edits)
    torch.save(ckpt, path)
    return path


def _image(tmp_path: Path) -> Path:
    from PIL import Image

    out = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(out)
    return out


def _one_line_error(proc: subprocess.CompletedProcess, path: Path, message: str) -> None:
    """Exit 2, one stderr line naming the file, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and message in lines[0], proc.stderr[-3000:]


# ------------------------------------------------------------------------------------ registry
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_known_archs_table_is_what_the_registry_builds(arch):
    m = create_model(arch)
    assert (m.cfg.dim, m.cfg.depths) == (ARCHS[arch].dim, ARCHS[arch].depths)
    assert sum(p.numel() for p in m.parameters()) == ARCHS[arch].params


# --------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("edits, match", [
    ({"dim": 2**22}, r"x\.pth: model_config says dim 4194304; the weights have dim 32$"),
    ({"dim": "32"}, r"x\.pth: model_config says dim '32'; the weights have dim 32$"),
    ({"depths": [2, 2, 2]}, r"x\.pth: model_config says depths \[2, 2, 2\]; the weights have depths \[2, 2\]$"),
    ({"depths": []}, r"x\.pth: model_config says depths \[\]; the weights have depths \[2, 2\]$"),
    ({"num_classes": 1000}, r"x\.pth: model_config says num_classes 1000; the weights have num_classes 1$"),
    ({"in_channels": 4}, r"x\.pth: model_config says in_channels 4; the weights have in_channels 3$"),
    ({"arch": "ferretnet-b"},
     r"x\.pth: model_config says arch ferretnet-b, which has dim 96; the weights have dim 32$"),
    ({"window_size": 4}, r"x\.pth: model_config says window_size 4; expected one of \(3, 5, 7\)$"),
    ({"lpd_func": "mean"}, r"x\.pth: model_config says lpd_func 'mean'; expected one of median, .*origin$"),
    ({"arch": ""}, r"x\.pth: model_config says arch ''; expected a name such as ferretnet-s, ferretnet-b$"),
    ({"evil": 1}, r"x\.pth: received model_config keys \['evil'\]; expected a subset of \['arch', 'depths'"),
])
def test_model_config_that_lies_is_refused_before_building(tmp_path, edits, match):
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(_lying_ckpt(tmp_path, **edits))


def test_b_config_on_s_weights_names_the_first_disagreeing_field(tmp_path):
    path = _lying_ckpt(tmp_path, arch="ferretnet-b", dim=96)  # the config of B, the weights of S
    with pytest.raises(CheckpointError, match=r"x\.pth: model_config says dim 96; the weights have dim 32$"):
        load_checkpoint(path)


def test_model_config_of_the_wrong_type_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "x.pth", create_model("ferretnet-s"))
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"] = [32, 2, 2]
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"x\.pth: received model_config of type list; expected a dict"):
        load_checkpoint(path)


def test_out_of_bounds_shapes_are_refused_even_when_config_and_weights_agree(tmp_path):
    # three logits per image, stored consistently: still not a detector the runtime can serve
    three = save_checkpoint(tmp_path / "three.pth", FerretNet(FerretConfig(num_classes=3, arch="three")))
    with pytest.raises(CheckpointError, match=r"three\.pth: model_config says num_classes 3; expected 1 \(one logit"):
        load_checkpoint(three)
    # the original format has no config: the bounds apply to the shapes inferred from the weights
    deep = tmp_path / "deep.pth"
    torch.save({"model": FerretNet(FerretConfig(depths=(1, 65), arch="deep")).state_dict()}, deep)
    with pytest.raises(CheckpointError,
                       match=r"deep\.pth: the state dict says a stage depth 65; expected an int in 1\.\.64"):
        load_checkpoint(deep)


def test_bad_preprocess_in_a_checkpoint_names_the_file(tmp_path):
    path = save_checkpoint(tmp_path / "x.pth", create_model("ferretnet-s"))
    ckpt = torch.load(path, weights_only=True)
    ckpt["preprocess"]["bogus"] = 1
    torch.save(ckpt, path)
    with pytest.raises(ConfigError, match=r"x\.pth: received preprocessing keys \['bogus'\]; expected a subset of"):
        load_checkpoint(path)


def test_invalid_preprocess_values_name_the_file(tmp_path):
    try:
        Preprocess(crop=-3)
    except ConfigError:
        pass
    else:
        pytest.skip("Preprocess does not validate its values in this tree")
    path = save_checkpoint(tmp_path / "x.pth", create_model("ferretnet-s"))
    ckpt = torch.load(path, weights_only=True)
    ckpt["preprocess"]["crop"] = -3
    torch.save(ckpt, path)
    with pytest.raises(ConfigError, match=r"x\.pth: received preprocess crop -3; expected"):
        load_checkpoint(path)


def test_detect_and_serve_refuse_a_lying_checkpoint_in_one_line(tmp_path):
    path = _lying_ckpt(tmp_path, dim=2**22)
    message = "model_config says dim 4194304; the weights have dim 32"
    _one_line_error(run_ferret("detect", str(_image(tmp_path)), "--model", str(path)), path, message)
    # serve refuses before binding its port; a server that started would hit the timeout instead
    proc = subprocess.run([sys.executable, "-m", "ferret_runtime.cli", "serve", "--model", str(path), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    _one_line_error(proc, path, message)


# ---------------------------------------------------------------------------------------- ONNX
@pytest.fixture(scope="module")
def s_onnx(tmp_path_factory) -> Path:
    """A tiny FerretNet-S graph (32x32 input), exported as the project exports."""
    tmp = tmp_path_factory.mktemp("lying_onnx")
    ckpt = save_checkpoint(tmp / "s.pth", create_model("ferretnet-s").eval())
    out = tmp / "s.onnx"
    export_onnx(ckpt, out, GraphOptions(input_size=32), run_verify=False, log=_quiet)
    return out


def _edited(src: Path, dst: Path, *, props: dict[str, str] | None = None, extra_outputs: int = 0,
            logits_per_image: int = 1) -> Path:
    """``src`` with metadata replaced, extra outputs added, or its one output widened to several columns."""
    proto = onnx.load(src)
    for p in proto.metadata_props:
        if props and p.key in props:
            p.value = props[p.key]
    graph, logit = proto.graph, proto.graph.output[0].name
    for i in range(extra_outputs):
        graph.node.append(onnx.helper.make_node("Identity", [logit], [f"extra_{i}"]))
        graph.output.append(onnx.helper.make_tensor_value_info(f"extra_{i}", onnx.TensorProto.FLOAT, ["N", 1]))
    if logits_per_image > 1:
        graph.node.append(onnx.helper.make_node("Concat", [logit] * logits_per_image, ["wide"], axis=1))
        del graph.output[:]
        graph.output.append(onnx.helper.make_tensor_value_info("wide", onnx.TensorProto.FLOAT, ["N", logits_per_image]))
    onnx.checker.check_model(proto)
    onnx.save(proto, dst)
    return dst


def test_graph_with_three_outputs_is_refused(s_onnx, tmp_path):
    path = _edited(s_onnx, tmp_path / "three.onnx", extra_outputs=2)
    with pytest.raises(ConfigError, match=r"three\.onnx: received a model with 3 outputs; expected one output, "
                                          r"one logit per image \(\[N\] or \[N, 1\]\)"):
        Detector.open(path)


def test_graph_with_three_logits_per_image_is_refused(s_onnx, tmp_path):
    path = _edited(s_onnx, tmp_path / "wide.onnx", logits_per_image=3)
    with pytest.raises(ConfigError, match=r"wide\.onnx: received an output of shape \['N', 3\]; "
                                          r"expected one logit per image \(\[N\] or \[N, 1\]\)"):
        Detector.open(path)


def test_arch_metadata_must_match_the_graphs_weights(s_onnx, tmp_path):
    path = _edited(s_onnx, tmp_path / "b.onnx", props={"ferret.arch": "ferretnet-b"})
    message = ("metadata ferret.arch says ferretnet-b (1,057,777 parameters); the graph's weights hold 125,138 "
               "values, the size of ferretnet-s (126,289); expected metadata that matches the weights")
    with pytest.raises(ConfigError, match=rf"b\.onnx: {message.replace('(', '[(]').replace(')', '[)]')}"):
        Detector.open(path)
    _one_line_error(run_ferret("detect", str(_image(tmp_path)), "--model", str(path)), path, message)
    # a name that promises no size is not checked against one
    custom = _edited(s_onnx, tmp_path / "custom.onnx", props={"ferret.arch": "ferretnet-custom-d32"})
    with Detector.open(custom) as det:
        assert det.backend.info.arch == "ferretnet-custom-d32"


@pytest.mark.parametrize("key, value, match", [
    ("ferret.window_size", "4", r"received metadata ferret\.window_size=4; expected one of 3, 5, 7"),
    ("ferret.lpd_mode", "magic", r"received metadata ferret\.lpd_mode='magic'; expected one of portable, plugin"),
    ("ferret.precision", "int4", r"received metadata ferret\.precision='int4'; expected one of fp32, fp16, int8"),
    ("ferret.threshold", "nan", r"received metadata ferret\.threshold=nan; expected a probability in \[0, 1\]"),
    ("ferret.preprocess", "[1, 2]", r"metadata ferret\.preprocess='\[1, 2\]' is not a valid JSON object"),
    ("ferret.preprocess", json.dumps({"bogus": 1}), r"received preprocessing keys \['bogus'\]; expected a subset of"),
])
def test_metadata_out_of_range_names_the_file(s_onnx, tmp_path, key, value, match):
    path = _edited(s_onnx, tmp_path / "m.onnx", props={key: value})
    with pytest.raises(ConfigError, match=rf"m\.onnx: {match}"):
        Detector.open(path)


# ---------------------------------------------------------------------------- TensorRT sidecar
def _engine_with_sidecar(tmp_path: Path, s_onnx: Path, outputs: list[dict]) -> Path:
    """A stand-in engine file and the sidecar 'ferret export tensorrt' would write beside it."""
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not a real engine")
    props = {p.key: p.value for p in onnx.load(s_onnx).metadata_props}
    record = {"tensorrt_version": "10.9.0.34", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
              "hardware_compat": False, "engine_sha256": hashlib.sha256(engine.read_bytes()).hexdigest()}
    sidecar = {"format": "ferret-tensorrt-sidecar", "version": 1, **props, "ferret.engine": record,
               "inputs": [{"name": "input", "dtype": "float32", "shape": [-1, 3, 32, 32]}], "outputs": outputs}
    engine.with_name("m.engine.json").write_text(json.dumps(sidecar))
    return engine


def test_tensorrt_sidecar_with_several_logits_is_refused_without_tensorrt(s_onnx, tmp_path):
    from ferret_runtime.sidecar import read as read_sidecar

    ok = _engine_with_sidecar(tmp_path, s_onnx, [{"name": "logit", "dtype": "float32", "shape": [-1, 1]}])
    assert read_sidecar(ok).meta["arch"] == "ferretnet-s"
    engine = _engine_with_sidecar(tmp_path, s_onnx, [{"name": "logit", "dtype": "float32", "shape": [-1, 3]}])
    with pytest.raises(ConfigError,
                       match=r"m\.engine\.json: received an output of shape \[-1, 3\]; expected one logit"):
        read_sidecar(engine)
    engine = _engine_with_sidecar(tmp_path, s_onnx, [{"name": f"o{i}", "dtype": "float32", "shape": [-1, 1]}
                                                     for i in range(3)])
    _one_line_error(run_ferret("detect", str(_image(tmp_path)), "--model", str(engine)),
                    engine.with_name("m.engine.json"), "received a model with 3 outputs; expected one output")


def test_reference_checkpoint_still_loads():
    if not (REFERENCE / "ferretnet-s-median-3.pth").is_file():
        pytest.skip("reference checkpoint not available")
    loaded = load_checkpoint(REFERENCE / "ferretnet-s-median-3.pth")
    assert loaded.config.arch == "ferretnet-s" and sum(p.numel() for p in loaded.model.parameters()) == 126_289
