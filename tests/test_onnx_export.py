"""ONNX export: standard ops, parity with PyTorch for every LPD, precision modes, metadata, errors."""

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ferret_export.onnx.export import custom_domains, export_onnx
from ferret_export.onnx.graph import GraphOptions, lpd_graph
from ferret_export.verify import ParityError
from ferret_runtime import Detector
from ferret_runtime.errors import ConfigError
from ferret_runtime.lpd_spec import LPD_SPECS
from ferret_runtime.metadata import decode
from ferret_runtime.preprocess import normalize
from ferret_train import create_model
from ferret_train.checkpoint import save_checkpoint

from .conftest import lpd_tolerance, run_ferret


def _session(path_or_proto):
    data = path_or_proto.SerializeToString() if isinstance(path_or_proto, onnx.ModelProto) else str(path_or_proto)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _random_ckpt(tmp_path, name="ferretnet-s", seed=0, **kw):
    """Random weights with non-trivial BatchNorm statistics, so BN folding is exercised."""
    torch.manual_seed(seed)
    m = create_model(name, **kw).eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m, save_checkpoint(tmp_path / f"{name}-{seed}.pth", m)


def _quiet(*_):
    pass


# ------------------------------------------------------------------------------------------- LPD
@pytest.mark.parametrize("inp", ["continuous", "image"])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("func", sorted(LPD_SPECS))
def test_lpd_graph_matches_original(reference, func, k, inp):
    ref = np.load(reference / "lpd_reference.npz")
    x = ref[f"x_{inp}"]
    proto = lpd_graph(func, k, x.shape)
    onnx.checker.check_model(proto, full_check=True)
    got = _session(proto).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ref[f"{func}_k{k}_{inp}"], rtol=0, atol=lpd_tolerance(func, k, x))


@pytest.mark.parametrize("opset", [17, 18, 21])
@pytest.mark.parametrize("func", ["median", "excmed", "retmed"])
def test_lpd_graph_k7_and_opsets_with_ties(func, opset):
    from ferret_train.layers.lpd import lpd_reference

    x = (torch.randint(-2, 3, (2, 3, 11, 9)).float() / 2)
    got = _session(lpd_graph(func, 7, tuple(x.shape), opset=opset)).run(None, {"input": x.numpy()})[0]
    np.testing.assert_array_equal(got, lpd_reference(x, LPD_SPECS[func], 7).numpy())  # medians select: exact


# ----------------------------------------------------------------------------------- whole model
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("func", [*sorted(LPD_SPECS), "origin"])
def test_every_variant_exports_equal_to_pytorch(tmp_path, func, k):
    model, ckpt = _random_ckpt(tmp_path, lpd_func=func, window_size=k)
    res = export_onnx(ckpt, tmp_path / "m.onnx", GraphOptions(input_size=32, dynamic_hw=True), log=_quiet)
    assert not custom_domains(res.model)
    x = normalize(np.random.default_rng(k).integers(0, 256, (3, 40, 36, 3), dtype=np.uint8))
    got = _session(tmp_path / "m.onnx").run(None, {"input": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["ferretnet-s", "ferretnet-b"])
def test_random_s_and_b_fixed_size_static_batch(tmp_path, name):
    model, ckpt = _random_ckpt(tmp_path, name)
    export_onnx(ckpt, tmp_path / "m.onnx", GraphOptions(input_size=64, dynamic_batch=False), log=_quiet)
    sess = _session(tmp_path / "m.onnx")
    assert sess.get_inputs()[0].shape == [1, 3, 64, 64]
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"input": x})[0], model(torch.from_numpy(x)).numpy(), atol=1e-4)


# ------------------------------------------------------------------------------ authors' weights
@pytest.fixture(scope="module")
def authors_onnx(authors_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "ferretnet-s.onnx"
    export_onnx(authors_ckpt, out, GraphOptions(dynamic_hw=True), log=_quiet)
    return out


@pytest.fixture(scope="module")
def ref_logits(reference):
    return json.loads((reference / "reference_logits.json").read_text())["images"]


@pytest.mark.parametrize("crop, key", [(256, "logit_center_crop_256"), (None, "logit_full")])
def test_authors_model_through_runtime(authors_onnx, reference, ref_logits, crop, key):
    names = sorted(ref_logits)
    with Detector.open(authors_onnx, crop=crop, backend="onnxruntime") as det:
        assert det.backend.name == "onnxruntime"
        results = det.predict([reference / "images" / n for n in names])
    for n, r in zip(names, results):
        assert abs(r.logit - ref_logits[n][key]) <= 1e-4, (n, r.logit)


def test_authors_model_through_cli(authors_onnx, reference, ref_logits):
    proc = run_ferret("detect", str(reference / "images"), "--model", str(authors_onnx), "--json")
    assert proc.returncode == 0, proc.stderr
    for row in map(json.loads, proc.stdout.splitlines()):
        assert abs(row["logit"] - ref_logits[row["path"].rsplit("/", 1)[-1]]["logit_center_crop_256"]) <= 1e-4


def test_fp16_within_2e2_and_half_weights(authors_ckpt, reference, ref_logits, tmp_path):
    res = export_onnx(authors_ckpt, tmp_path / "h.onnx", GraphOptions(fp16=True), log=_quiet)
    conv_weights = [i for i in res.model.graph.initializer if i.name.startswith("cbr1_w")]
    assert conv_weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in conv_weights)
    names = sorted(ref_logits)
    with Detector.open(tmp_path / "h.onnx") as det:
        results = det.predict([reference / "images" / n for n in names])
    for n, r in zip(names, results):
        assert abs(r.logit - ref_logits[n]["logit_center_crop_256"]) <= 2e-2


def test_preprocess_folded_takes_uint8_nhwc(authors_ckpt, reference, ref_logits, tmp_path):
    export_onnx(authors_ckpt, tmp_path / "p.onnx", GraphOptions(preprocess=True), log=_quiet)
    inp = _session(tmp_path / "p.onnx").get_inputs()[0]
    assert inp.type == "tensor(uint8)" and inp.shape[1:] == [256, 256, 3]
    names = sorted(ref_logits)[:4]
    with Detector.open(tmp_path / "p.onnx") as det:
        results = det.predict([reference / "images" / n for n in names])
    for n, r in zip(names, results):
        assert abs(r.logit - ref_logits[n]["logit_center_crop_256"]) <= 1e-4


def test_metadata_round_trips(authors_ckpt, authors_onnx):
    proto = onnx.load(authors_onnx)
    props = {p.key: p.value for p in proto.metadata_props}
    meta = decode(props, "test")
    assert (meta["arch"], meta["lpd_func"], meta["window_size"]) == ("ferretnet-s", "median", 3)
    assert (meta["lpd_mode"], meta["precision"], meta["threshold"]) == ("portable", "fp32", 0.5)
    assert meta["preprocess"].mean == (0.48145466, 0.4578275, 0.40821073) and meta["preprocess"].crop == 256
    assert meta["provenance"]["checkpoint_sha256"] == hashlib.sha256(authors_ckpt.read_bytes()).hexdigest()
    assert meta["provenance"]["source_format"] == "original"
    assert meta["toolkit_version"] == "0.1.0"


def test_plugin_mode_has_one_ferret_node(authors_ckpt, tmp_path):
    res = export_onnx(authors_ckpt, tmp_path / "pl.onnx", GraphOptions(lpd="plugin"), log=_quiet)
    custom = [n for n in res.model.graph.node if n.domain == "ferret"]
    assert len(custom) == 1 and custom[0].op_type == "lpd"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in custom[0].attribute}
    assert attrs == {"func": b"median", "window_size": 3, "plugin_namespace": b"ferret", "aot": 1}
    assert custom_domains(res.model) == {"ferret"}
    assert not any(n.op_type in ("Min", "Max", "Pad") for n in res.model.graph.node)  # the LPD is the node
    assert all(c.passed for c in res.comparisons)  # verified through the portable twin


@pytest.fixture(scope="module")
def external_onnx(authors_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_ext") / "ferretnet-s-ext.onnx"
    res = export_onnx(authors_ckpt, out, GraphOptions(lpd="external"), log=_quiet)
    assert res.comparisons and all(c.passed for c in res.comparisons)  # the CNN fed our residual == the whole model
    return out


def test_external_lpd_graph_is_the_cnn_alone(external_onnx, authors_onnx):
    proto = onnx.load(external_onnx)
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"Pad", "Slice", "Min", "Max"} and custom_domains(proto) == set()
    assert decode({p.key: p.value for p in proto.metadata_props}, "t")["lpd_mode"] == "external"
    inp = _session(external_onnx).get_inputs()[0]
    assert inp.type == "tensor(float)" and inp.shape[1:] == [3, 256, 256]
    # what the portable graph computes before its CNN is exactly our residual: same logits on the same pixels
    u8 = np.random.default_rng(5).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    x = normalize(u8)
    from ferret_runtime.preprocess import median_residual

    whole = _session(authors_onnx).run(None, {"input": x})[0]
    cnn = _session(external_onnx).run(None, {"input": median_residual(x)})[0]
    np.testing.assert_allclose(cnn, whole, rtol=0, atol=1e-4)
    assert np.abs(_session(external_onnx).run(None, {"input": x})[0] - whole).max() > 0.1  # it needs the residual


def test_external_lpd_through_detector_and_cli(external_onnx, reference, ref_logits):
    names = sorted(ref_logits)
    with Detector.open(external_onnx) as det:
        assert det.external_lpd
        results = det.predict([reference / "images" / n for n in names])
    for n, r in zip(names, results):
        assert abs(r.logit - ref_logits[n]["logit_center_crop_256"]) <= 1e-4, (n, r.logit)
    proc = run_ferret("detect", str(reference / "images"), "--model", str(external_onnx), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {row["path"].rsplit("/", 1)[-1]: row["logit"] for row in map(json.loads, proc.stdout.splitlines())}
    assert rows == {n: r.logit for n, r in zip(names, results)}


def test_external_lpd_refusals(tmp_path, capsys):
    from ferret_runtime.cli import main

    _, ckpt = _random_ckpt(tmp_path, lpd_func="excmed")
    with pytest.raises(ConfigError, match="--lpd external for a model with LPD excmed/3; expected median/3"):
        export_onnx(ckpt, tmp_path / "x.onnx", GraphOptions(lpd="external"), log=_quiet)
    with pytest.raises(ConfigError, match="--lpd external with --preprocess"):
        export_onnx(ckpt, tmp_path / "x.onnx", GraphOptions(lpd="external", preprocess=True), log=_quiet)
    assert not (tmp_path / "x.onnx").exists()
    rc = main(["export", "onnx", "-w", str(ckpt), "-o", str(tmp_path / "q.onnx"), "--int8", "--calib-data",
               str(tmp_path), "--lpd", "external"])
    assert rc == 2 and "--int8 with --lpd external" in capsys.readouterr().err
    # a model file claiming an external LPD other than median/3 is refused by the runtime, not mis-run
    _, med = _random_ckpt(tmp_path, seed=1)
    export_onnx(med, tmp_path / "m.onnx", GraphOptions(lpd="external", input_size=32), run_verify=False, log=_quiet)
    proto = onnx.load(tmp_path / "m.onnx")
    for prop in proto.metadata_props:
        if prop.key == "ferret.lpd_func":
            prop.value = "min"
    onnx.save(proto, tmp_path / "m2.onnx")
    with pytest.raises(ConfigError, match="whose LPD is min/3; expected median/3"):
        Detector.open(tmp_path / "m2.onnx")


# ------------------------------------------------------------------------------------------ errors
def test_parity_failure_writes_nothing_and_keeps_old_file(tmp_path, monkeypatch):
    import ferret_export.onnx.export as ex

    _, ckpt = _random_ckpt(tmp_path)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous export")
    real_build = ex.build_graph

    def broken(model, opts, mean=None, std=None):
        proto = real_build(model, opts, mean, std)
        fc_b = next(i for i in proto.graph.initializer if i.name.startswith("fc_b"))
        fc_b.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(fc_b) + 1, fc_b.name))
        return proto

    monkeypatch.setattr(ex, "build_graph", broken)
    with pytest.raises(ParityError, match=r"m\.onnx: not written: .* exceed atol 1e-04"):
        export_onnx(ckpt, out, GraphOptions(input_size=32), log=_quiet)
    assert out.read_bytes() == b"previous export"


def test_corrupt_and_foreign_onnx_files(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x01garbage")
    with pytest.raises(ConfigError, match=r"junk\.onnx: ONNX Runtime cannot load this model"):
        Detector.open(tmp_path / "junk.onnx")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    foreign = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    foreign.ir_version = 9
    onnx.save(foreign, tmp_path / "foreign.onnx")
    with pytest.raises(ConfigError, match=r"foreign\.onnx: received a model without FerretNet metadata"):
        Detector.open(tmp_path / "foreign.onnx")
    with pytest.raises(ConfigError, match=r"missing\.onnx: no such model file"):
        Detector.open(tmp_path / "missing.onnx")


def test_fixed_size_model_refuses_other_crops(tmp_path):
    _, ckpt = _random_ckpt(tmp_path)
    export_onnx(ckpt, tmp_path / "m.onnx", GraphOptions(input_size=64), log=_quiet)
    with pytest.raises(ConfigError, match=r"received crop None; this model takes a fixed 64x64 input"):
        Detector.open(tmp_path / "m.onnx", crop=None)


def test_cli_export_and_errors(tmp_path):
    _, ckpt = _random_ckpt(tmp_path)
    ok = run_ferret("export", "onnx", "-w", str(ckpt), "-o", str(tmp_path / "c.onnx"), "--input-size", "32")
    assert ok.returncode == 0, ok.stderr
    assert "[check] onnx.checker full check PASSED" in ok.stdout and ok.stdout.count("PASSED") >= 4
    bad = run_ferret("export", "onnx", "-w", str(ckpt), "-o", str(tmp_path / "d.onnx"), "--opset", "11")
    assert bad.returncode == 2 and "Received opset 11; expected 17..21" in bad.stderr
    assert not (tmp_path / "d.onnx").exists()
    helptext = run_ferret("export", "onnx", "--help").stdout
    for opt in ["--opset", "--dynamic", "--dynamic-hw", "--input-size", "--fp16", "--preprocess", "--lpd",
                "--simplify", "--verify", "--verify-images"]:
        assert opt in helptext


def test_io_binding_path_gives_the_same_logits(tmp_path):
    from ferret_runtime.backends.onnxruntime import OrtBackend

    _, ckpt = _random_ckpt(tmp_path)
    export_onnx(ckpt, tmp_path / "m.onnx", GraphOptions(input_size=32), log=_quiet)
    x = np.random.default_rng(3).standard_normal((5, 3, 32, 32)).astype(np.float32)
    with OrtBackend(tmp_path / "m.onnx", io_binding=True) as bound, OrtBackend(tmp_path / "m.onnx") as plain:
        assert bound.io_binding and not plain.io_binding
        np.testing.assert_array_equal(bound.run(x), plain.run(x))


def test_cuda_without_provider_is_a_clear_error(tmp_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    _, ckpt = _random_ckpt(tmp_path)
    export_onnx(ckpt, tmp_path / "m.onnx", GraphOptions(input_size=32), log=_quiet)
    with pytest.raises(ConfigError, match="Received device 'cuda', but this onnxruntime has no CUDA provider"):
        Detector.open(tmp_path / "m.onnx", device="cuda")


def test_auto_device_picks_what_is_available(tmp_path):
    _, ckpt = _random_ckpt(tmp_path)
    export_onnx(ckpt, tmp_path / "m.onnx", GraphOptions(input_size=32), log=_quiet)
    with Detector.open(tmp_path / "m.onnx") as det:
        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        assert det.backend.device == ("cuda" if has_cuda else "cpu")
        assert det.backend.session.get_providers()[0] == ("CUDAExecutionProvider" if has_cuda
                                                          else "CPUExecutionProvider")
