"""INT8 QDQ quantisation: accuracy against fp32 in ONNX Runtime, the Q/DQ graph, metadata, errors.

The authors' FerretNet-S (trained on ProGAN) is exported at crop 256 and calibrated on proxy train
images; fp32 and int8 are then compared on the 10 reference images and on a proxy test set. The
model calls many procedural *real* proxy images fake and sits near its threshold on some of them,
so the proxy comparison is one of agreement (int8 vs fp32), not of the model's quality.

Measured (2 CPU cores, 64 calibration images, defaults: percentile 99.9999, float_layers=2):
reference ACC 100 -> 100, max |dlogit| 2.6 (on logits of -14.6..7), mean 0.54; proxy (128) ACC
31.25 -> 31.25, agreement 100%, max |dlogit| 0.70, mean 0.19; 7.4 s; 0.51 MB -> 0.19 MB. With
every convolution in int8 (float_layers=0) two proxy labels flip (ACC -1.6 points), max |dlogit| 3.1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from ferret_export.int8.data import images_digest, select_images, verify_int8
from ferret_export.int8.graph import cnn_nodes, equalize
from ferret_export.int8.quantize import QuantResult, quantize_int8
from ferret_export.onnx.export import export_onnx
from ferret_export.onnx.graph import GraphOptions
from ferret_runtime import Detector
from ferret_runtime.errors import ConfigError
from ferret_runtime.metadata import decode
from ferret_runtime.preprocess import Preprocess, load_image, normalize, prepare
from ferret_runtime.samples import write_proxy_dataset
from ferret_train.evaluate import compute_metrics

N_CALIB = 64


def _quiet(*_):
    pass


def _props(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory) -> dict[str, Path]:
    """256x256 proxy images (the graph's fixed input): train 32+32 for calibration, test 4 decoders x (16+16)."""
    return write_proxy_dataset(tmp_path_factory.mktemp("proxy"), size=256, n_train=32, n_val=0, n_test=16, seed=1)


@pytest.fixture(scope="module")
def fp32_onnx(authors_ckpt: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp32") / "ferretnet-s.onnx"
    export_onnx(authors_ckpt, out, GraphOptions(input_size=256), run_verify=False, log=_quiet)
    return out


@pytest.fixture(scope="module")
def int8(fp32_onnx: Path, proxy: dict[str, Path], tmp_path_factory) -> QuantResult:
    out = tmp_path_factory.mktemp("int8") / "ferretnet-s.int8.onnx"
    res = quantize_int8(fp32_onnx, out, [proxy["train"]], n_images=N_CALIB, log=print)
    print(f"[int8] calibration {res.calib_seconds:.1f} s; sizes fp32 {fp32_onnx.stat().st_size / 1e6:.2f} MB, "
          f"int8 {out.stat().st_size / 1e6:.2f} MB")
    return res


def _labelled(kind: str, reference: Path, proxy: dict[str, Path]) -> tuple[list[Path], np.ndarray]:
    if kind == "reference":
        paths = sorted((reference / "images").glob("*.png"))
        return paths, np.array([p.name.startswith("fake_") for p in paths], np.float32)
    paths = sorted(proxy["test"].rglob("*.png"))
    return paths, np.array([p.parent.name == "1_fake" for p in paths], np.float32)


# ------------------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("kind", ["reference", "proxy"])
def test_int8_accuracy_within_one_point_of_fp32(int8, fp32_onnx, reference, proxy, kind):
    paths, y = _labelled(kind, reference, proxy)
    c = verify_int8(fp32_onnx, int8.path, paths, log=print)
    acc32 = compute_metrics(y, 1 / (1 + np.exp(-c.fp32_logits)))["acc"]
    acc8 = compute_metrics(y, 1 / (1 + np.exp(-c.int8_logits)))["acc"]
    confident = np.abs(c.fp32_logits) >= 1.0  # p(fake) outside 0.27..0.73
    agree_confident = np.mean((c.fp32_logits[confident] > 0) == (c.int8_logits[confident] > 0))
    print(f"[{kind}] {len(paths)} images: ACC fp32 {acc32:.2f}  int8 {acc8:.2f}  "
          f"label agreement {100 * c.agreement:.2f}% "
          f"(|fp32 logit| >= 1: {100 * agree_confident:.2f}% of {confident.sum()})  "
          f"max |dlogit| {c.max_abs:.3f}  mean {c.mean_abs:.3f}")
    assert abs(acc8 - acc32) <= 1.0
    assert c.agreement >= 0.99 and agree_confident == 1.0
    assert c.mean_abs < 1.0


def test_reference_fp32_at_crop_256_matches_the_original(int8, fp32_onnx, reference):
    """The fp32 export at crop 256 reproduces the original's centre-crop logits (10/10 correct)."""
    ref = json.loads((reference / "reference_logits.json").read_text())["images"]
    paths = sorted((reference / "images").glob("*.png"))
    c = verify_int8(fp32_onnx, int8.path, paths, log=_quiet)
    want = np.array([ref[p.name]["logit_center_crop_256"] for p in paths])
    np.testing.assert_allclose(c.fp32_logits, want, atol=1e-3)
    assert np.all((c.int8_logits > 0) == np.array([p.name.startswith("fake_") for p in paths]))


# ---------------------------------------------------------------------------------- the graph
def test_qdq_around_conv_and_gemm_none_in_the_lpd(int8, fp32_onnx):
    g = int8.model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    src = onnx.load(str(fp32_onnx))
    weighted = [n for n in g.node if n.op_type in ("Conv", "Gemm")]
    assert len(weighted) == sum(n.op_type in ("Conv", "Gemm") for n in src.graph.node) == 26
    kept, quantized = weighted[:2], weighted[2:]  # float_layers=2: the first two convolutions stay float32
    for n in kept:
        assert n.input[0] not in producer or producer[n.input[0]].op_type != "DequantizeLinear", n.name
        assert inits[n.input[1]].data_type == TensorProto.FLOAT, n.name
    for n in quantized:
        x, w = producer[n.input[0]], producer[n.input[1]]
        assert x.op_type == "DequantizeLinear" and producer[x.input[0]].op_type == "QuantizeLinear", n.name
        assert w.op_type == "DequantizeLinear" and inits[w.input[0]].data_type == TensorProto.INT8, n.name
        if n.op_type == "Conv":  # per output channel
            axis = next((a.i for a in w.attribute if a.name == "axis"), 1)
            assert axis == 0 and list(inits[w.input[1]].dims) == [inits[w.input[0]].dims[0]], n.name
        if len(n.input) > 2:  # bias stays float for TensorRT
            assert inits[n.input[2]].data_type == TensorProto.FLOAT, n.name
    # activation Q/DQ pairs feed only a weighted op's data input or an Add's residual input: a
    # Conv's output is not quantised for its own sake, TensorRT fuses bias, ReLU and Add into it
    for dq in (n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits):
        uses = [(c.op_type, list(c.input).index(dq.output[0])) for c in g.node if dq.output[0] in c.input]
        assert uses in ([("Conv", 0)], [("Gemm", 0)], [("Add", 1)]), (dq.name, uses)
    adds = [n for n in g.node if n.op_type == "Add"]
    assert len(adds) == 8
    for n in adds:  # residual: second input int8, first straight from a Conv
        assert producer[n.input[0]].op_type == "Conv" and producer[n.input[1]].op_type == "DequantizeLinear", n.name
    zero_points = [inits[n.input[2]] for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert zero_points and all(z.data_type == TensorProto.INT8 and not numpy_helper.to_array(z).any()
                               for z in zero_points)
    # nothing before the CNN touched: the LPD's Min/Max and the residual Sub read float tensors only
    front = {n.name for n in src.graph.node} - cnn_nodes(src)
    lpd = [n for n in g.node if n.name in front]
    assert sorted(n.op_type for n in lpd) == sorted(n.op_type for n in src.graph.node if n.name in front)
    assert {"Min", "Max", "Sub"} <= {n.op_type for n in lpd}
    assert all(producer[i].op_type not in ("QuantizeLinear", "DequantizeLinear")
               for n in lpd for i in n.input if i in producer)


def test_float_layers_zero_quantizes_the_residual_input(fp32_onnx, proxy, tmp_path):
    res = quantize_int8(fp32_onnx, tmp_path / "all.onnx", [proxy["train"]], n_images=4, float_layers=0,
                        method="minmax", log=_quiet)
    g = res.model.graph
    producer = {o: n for n in g.node for o in n.output}
    first = next(n for n in g.node if n.op_type == "Conv")
    q = producer[producer[first.input[0]].input[0]]
    assert q.op_type == "QuantizeLinear" and producer[q.input[0]].op_type == "Sub"  # x - lpd(x), as one tensor
    with pytest.raises(ConfigError, match=r"Received float_layers 26; expected fewer than the model's 26"):
        quantize_int8(fp32_onnx, tmp_path / "none.onnx", [proxy["train"]], n_images=4, float_layers=26, log=_quiet)


def test_equalize_keeps_the_float_function(fp32_onnx, proxy):
    src = onnx.load(str(fp32_onnx))
    batch = normalize(np.stack([prepare(load_image(p), Preprocess()) for p in select_images([proxy["train"]], 6)]))
    targets = {n.name for n in src.graph.node if n.op_type in ("Conv", "Gemm")}
    eq, n = equalize(src, [batch], "input", targets)
    assert n == 6  # every relu(conv) that feeds only convolutions
    run = lambda m: (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                     .run(None, {"input": batch})[0])
    np.testing.assert_allclose(run(eq), run(src), atol=1e-4)


def test_metadata_carried_over_and_the_detector_runs_it(int8, fp32_onnx, proxy, reference):
    src, got = _props(onnx.load(str(fp32_onnx))), _props(onnx.load(str(int8.path)))
    assert {k for k in got if k.startswith("ferret.")} == {k for k in src if k.startswith("ferret.")}
    for k in src:
        if k not in ("ferret.precision", "ferret.provenance"):
            assert got[k] == src[k], k
    meta = decode(got, "int8")
    assert meta["precision"] == "int8"
    cal = meta["provenance"]["int8"]
    assert (cal["method"], cal["n_images"], cal["per_channel"]) == ("percentile", N_CALIB, True)
    assert len(cal["float_layers"]) == 2 and cal["residual_adds"] == 8
    assert cal["images_sha256"] == images_digest(select_images([proxy["train"]], N_CALIB)) == int8.images_sha256
    assert meta["provenance"]["checkpoint_sha256"] == json.loads(src["ferret.provenance"])["checkpoint_sha256"]
    paths = sorted((reference / "images").glob("*.png"))[:4]
    det = Detector.open(int8.path, device="cpu", workers=1)
    assert det.backend.info.extra["precision"] == "int8"
    results = [r for r, _ in det.predict_iter(paths)]
    assert [r.label for r in results] == ["fake" if p.name.startswith("fake_") else "real" for p in paths]


def test_calibration_spreads_over_both_classes(proxy):
    picked = select_images([proxy["train"]], 8)
    assert len(picked) == 8 and {p.parent.name for p in picked} == {"0_real", "1_fake"}
    assert select_images([proxy["train"]], 8) == picked  # seeded


def test_minmax_on_a_few_images(fp32_onnx, proxy, tmp_path):
    out = tmp_path / "mm.onnx"
    res = quantize_int8(fp32_onnx, out, [proxy["train"] / "1_fake"], n_images=4, method="minmax", batch_size=3,
                        log=_quiet)
    assert res.n_images == 4 and out.is_file()
    assert decode(_props(res.model), "mm")["provenance"]["int8"]["method"] == "minmax"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left nothing behind


# ------------------------------------------------------------------------------------- errors
def _edited(src: Path, dst: Path, **props: str | None) -> Path:
    m = onnx.load(str(src))
    kept = {p.key: p.value for p in m.metadata_props}
    for k, v in props.items():
        if v is None:
            kept.pop("ferret." + k, None)
        else:
            kept["ferret." + k] = v
    del m.metadata_props[:]
    m.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v) for k, v in kept.items())
    onnx.save(m, str(dst))
    return dst


def test_calibration_data_errors(fp32_onnx, tmp_path):
    out = tmp_path / "q.onnx"
    with pytest.raises(ConfigError, match=r"nope: received a calibration path that does not exist; expected an image"):
        quantize_int8(fp32_onnx, out, [tmp_path / "nope"], log=_quiet)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigError, match=r"Received calibration data .*empty.* without images; expected at least one"):
        quantize_int8(fp32_onnx, out, [tmp_path / "empty"], log=_quiet)
    with pytest.raises(ConfigError, match=r"Received n_images 0; expected >= 1"):
        quantize_int8(fp32_onnx, out, [tmp_path / "empty"], n_images=0, log=_quiet)
    with pytest.raises(ConfigError,
                       match=r"Received calibration method 'kl'; expected one of entropy, percentile, minmax"):
        quantize_int8(fp32_onnx, out, [tmp_path], method="kl", log=_quiet)
    assert not out.exists()


def test_source_model_errors(fp32_onnx, int8, authors_ckpt, proxy, tmp_path):
    out, calib = tmp_path / "q.onnx", [proxy["train"]]
    with pytest.raises(ConfigError, match=r"missing\.onnx: received a path that is not a file; expected an fp32"):
        quantize_int8(tmp_path / "missing.onnx", out, calib, log=_quiet)
    bare = _edited(fp32_onnx, tmp_path / "bare.onnx", precision=None, arch=None)
    with pytest.raises(ConfigError, match=r"bare\.onnx: received a model without FerretNet metadata"):
        quantize_int8(bare, out, calib, log=_quiet)
    half = _edited(fp32_onnx, tmp_path / "half.onnx", precision="fp16")
    with pytest.raises(ConfigError, match=r"half\.onnx: received an fp16 model; expected an fp32 export"):
        quantize_int8(half, out, calib, log=_quiet)
    with pytest.raises(ConfigError, match=r"int8\.onnx: received an int8 model; expected an fp32 export"):
        quantize_int8(int8.path, out, calib, log=_quiet)
    relabelled = _edited(int8.path, tmp_path / "relabelled.onnx", precision="fp32")
    with pytest.raises(ConfigError, match=r"received an int8 \(Q/DQ nodes\) model; expected an fp32 export"):
        quantize_int8(relabelled, out, calib, log=_quiet)
    plugin = tmp_path / "plugin.onnx"
    export_onnx(authors_ckpt, plugin, GraphOptions(input_size=256, lpd="plugin"), run_verify=False, log=_quiet)
    with pytest.raises(ConfigError, match=r"plugin\.onnx: received a plugin-mode model .*; expected a portable export"):
        quantize_int8(plugin, out, calib, log=_quiet)
    external = tmp_path / "external.onnx"
    export_onnx(authors_ckpt, external, GraphOptions(input_size=256, lpd="external"), run_verify=False, log=_quiet)
    with pytest.raises(ConfigError, match=r"external\.onnx: received a model without its LPD .*expected a portable"):
        quantize_int8(external, out, calib, log=_quiet)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match=r"junk\.onnx: received a file onnx cannot parse"):
        quantize_int8(junk, out, calib, log=_quiet)
    assert not out.exists()


# ------------------------------------------------------------------------------------------ CLI
def test_cli_export_int8_writes_a_verified_qdq_graph(authors_ckpt, reference, proxy, tmp_path, capsys):
    from ferret_runtime.cli import main

    out = tmp_path / "models" / "s.int8.onnx"
    rc = main(["export", "onnx", "-w", str(authors_ckpt), "-o", str(out), "--int8", "--calib-data", str(proxy["train"]),
               "--calib-images", "16", "--verify-images", str(reference / "images")])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "label agreement 100.00%" in text and "images 10 " in text  # int8 vs fp32 on the 10 reference images
    proto = onnx.load(str(out))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = decode(_props(proto), "s.int8.onnx")
    cal = meta["provenance"]["int8"]
    assert meta["precision"] == "int8" and cal["n_images"] == 16 and cal["method"] == "percentile"
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # the temporary fp32 graph is gone
    paths, y = _labelled("reference", reference, proxy)
    with Detector.open(out) as det:
        acc = np.mean([(r.label == "fake") == bool(t) for r, t in zip(det.predict(paths), y)])
    assert acc == 1.0


@pytest.mark.parametrize("extra, message", [
    ([], "without --calib-data"),
    (["--calib-data", "CALIB", "--fp16"], "--int8 with --fp16"),
    (["--calib-data", "CALIB", "--lpd", "plugin"], "--int8 with --lpd plugin"),
    (["--calib-data", "MISSING"], "does not exist"),
])
def test_cli_int8_bad_options_name_the_problem_and_keep_the_old_file(authors_ckpt, proxy, tmp_path, capsys, extra,
                                                                     message):
    from ferret_runtime.cli import main

    out = tmp_path / "old.onnx"
    out.write_bytes(b"previous model")
    extra = [str(proxy["train"]) if a == "CALIB" else str(tmp_path / "nope") if a == "MISSING" else a for a in extra]
    rc = main(["export", "onnx", "-w", str(authors_ckpt), "-o", str(out), "--int8", "--no-verify", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.onnx"]


def test_cli_int8_fails_below_the_agreement_floor_and_writes_nothing(authors_ckpt, proxy, tmp_path, capsys):
    """All-int8 with entropy calibration on 16 images agrees on ~95% of proxy test labels (measured 94.5%):
    the default floor of 99% must refuse it."""
    from ferret_runtime.cli import main

    out = tmp_path / "old.onnx"
    out.write_bytes(b"previous model")
    rc = main(["export", "onnx", "-w", str(authors_ckpt), "-o", str(out), "--int8", "--no-verify",
               "--calib-data", str(proxy["train"]), "--calib-images", "16", "--int8-float-layers", "0",
               "--calib-method", "entropy", "--verify-images", str(proxy["test"])])
    err = capsys.readouterr().err
    assert rc == 2 and "not written" in err and "labels agree on" in err, err
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.onnx"]


def test_quantize_verified_decodes_each_calibration_image_once(fp32_onnx, proxy, tmp_path, monkeypatch):
    """Calibration and its verification read the same drawn images: one decode each, not two."""
    import ferret_export.int8.data as int8_data
    from ferret_export.pipeline import Int8Options, quantize_verified

    decoded: list[Path] = []
    real = int8_data.load_image

    def counting(path, *args, **kwargs):
        decoded.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(int8_data, "load_image", counting)
    opts = Int8Options(calib_data=[proxy["train"]], calib_images=6, min_agreement=0.0)
    res = quantize_verified(fp32_onnx, tmp_path / "q.onnx", opts, log=_quiet)
    assert res.n_images == 6 and len(decoded) == 6 and len(set(decoded)) == 6, decoded
    assert (tmp_path / "q.onnx").is_file()
