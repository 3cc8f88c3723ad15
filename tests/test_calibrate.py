"""``ferret calibrate``: the fitted threshold, scaling and metrics against independent computations,
the calibrated model files (checkpoint, ONNX, engine sidecar) read back by the runtime, and refusals."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from ferret_runtime.metadata import Scaling
from ferret_runtime.samples import write_proxy_dataset
from ferret_train.calibration import MIN_PER_CLASS, ece, fit_scaling, fit_threshold, metrics, tpr_at_fpr

from .conftest import run_ferret


def _sig(z):
    return 1 / (1 + np.exp(-np.asarray(z, np.float64)))


# ------------------------------------------------------------------------------------ the numbers
def test_ece_against_a_hand_computed_example():
    # 15 bins of width 1/15: 0.05 -> bin 0, 0.10 -> 1, 0.50 -> 7, 0.62 -> 9, 0.91 and 0.92 -> 13, 0.95 -> 14
    p = np.array([0.05, 0.10, 0.50, 0.91, 0.92, 0.95, 0.62])
    y = np.array([0, 0, 1, 1, 0, 1, 0])
    # per bin |fraction fake - mean p| weighted by its share: bin 13 holds two, |0.5 - 0.915| = 0.415
    hand = (0.05 + 0.10 + 0.50 + 2 * 0.415 + 0.05 + 0.62) / 7
    assert ece(y, p) == pytest.approx(hand, abs=1e-12)
    assert ece(np.array([0, 1]), np.array([0.0, 1.0])) == 0.0


@pytest.fixture(scope="module")
def scores():
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(0, 1, 400), rng.normal(2.5, 1, 300)])
    return z, np.r_[np.zeros(400, int), np.ones(300, int)]


@pytest.mark.parametrize("q", [0.01, 0.05])
def test_threshold_at_fpr_checked_by_counting(scores, q):
    z, y = scores
    t = fit_threshold(z, y, "fpr", q)
    reals, fakes = np.sort(z[y == 0])[::-1], z[y == 1]
    allowed = int(math.floor(q * len(reals)))
    assert (reals > t).sum() <= allowed  # at most q of the real images above it
    # and no threshold with as few false positives catches more fakes: it must stay above the
    # (allowed + 1)-th highest real score, and every fake above that is caught
    assert t >= reals[allowed] and (fakes > t).sum() == (fakes > reals[allowed]).sum()
    assert tpr_at_fpr(y, z, q) == pytest.approx((fakes > t).mean())


def test_accuracy_and_eer_thresholds_by_brute_force(scores):
    z, y = scores
    cuts = np.sort(np.unique(z))
    mids = (cuts[1:] + cuts[:-1]) / 2
    acc = np.array([((z > c) == y).mean() for c in mids])
    assert ((z > fit_threshold(z, y, "accuracy")) == y).mean() == acc.max()
    gap = np.array([abs((z[y == 0] > c).mean() - (z[y == 1] <= c).mean()) for c in mids])
    t = fit_threshold(z, y, "eer")
    assert abs((z[y == 0] > t).mean() - (z[y == 1] <= t).mean()) == pytest.approx(gap.min())


@pytest.mark.parametrize("method, truth", [("temperature", {"temperature": 3.0}), ("platt", {"a": 0.5, "b": -1.0})])
def test_scaling_recovers_a_known_miscalibration(method, truth):
    # labels drawn from a calibrated z; the model's logit is z distorted by the inverse of the truth
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2.5, 40_000)
    y = (rng.random(z.size) < _sig(z)).astype(int)
    logit = z * truth["temperature"] if method == "temperature" else (z - truth["b"]) / truth["a"]
    fitted = fit_scaling(logit, y, method).to_dict()
    for k, v in truth.items():
        assert fitted[k] == pytest.approx(v, rel=0.05, abs=0.05)


def test_metrics_match_sklearn(scores):
    from sklearn.metrics import brier_score_loss

    z, y = scores
    s = Scaling("temperature", temperature=2.0)
    m = metrics(z, y, s, 0.7)
    p = _sig(z / 2.0)
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert m["fpr"] == pytest.approx((p[y == 0] > 0.7).mean()) and m["tpr"] == pytest.approx((p[y == 1] > 0.7).mean())


# ------------------------------------------------------------------------------------ the command
def quick_model(train: Path, out: Path, steps: int = 5) -> Path:
    """FerretNet-S after a few Adam steps on 64x64 proxy images: it ranks fake above real, with
    logits far from calibrated (what calibration is for). A few seconds on a CPU."""
    import torch
    from PIL import Image

    from ferret_runtime.preprocess import Preprocess, normalize
    from ferret_train import create_model
    from ferret_train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    paths = sorted(train.rglob("*.png"))
    x = torch.from_numpy(normalize(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])))
    y = torch.tensor([p.parent.name == "1_fake" for p in paths], dtype=torch.float32)
    model = create_model("ferretnet-s")
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randint(0, len(x), (16,), generator=g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[i]).squeeze(1), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(out, model.eval(), preprocess=Preprocess(crop=64))


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy")
    write_proxy_dataset(root, size=64, n_train=40, n_val=60, n_test=8, seed=5)
    return root


@pytest.fixture(scope="module")
def quick(proxy, tmp_path_factory):
    return quick_model(proxy / "train", tmp_path_factory.mktemp("model") / "q.pt")


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _logits(model, paths):
    from ferret_runtime import Detector

    with Detector.open(model, device="cpu") as det:
        return np.array([r.logit for r in det.predict(paths)]), det


def test_calibrate_checkpoint_then_detect_and_eval_use_it(proxy, quick, tmp_path):
    out = tmp_path / "q-cal.pt"
    proc = _ok(run_ferret("calibrate", "-w", str(quick), "--data", str(proxy / "val"), "--target-fpr", "0.02",
                          "-o", str(out), "--bootstrap", "200", "--device", "cpu"))
    assert "ECE (15 bins)" in proc.stdout and "TPR @ FPR 1%" in proc.stdout
    report = json.loads((tmp_path / "q-cal.pt.calibration.json").read_text())
    rec = report["calibration"]
    assert (tmp_path / "q-cal.pt.reliability.png").stat().st_size > 10_000
    T, t = rec["scaling"]["temperature"], rec["threshold"]
    lo, hi = rec["threshold_ci"]
    assert lo <= t <= hi

    # the threshold by counting, on logits from an independent run of the uncalibrated model
    paths = sorted((proxy / "val").rglob("*.png"))
    y = np.array([p.parent.name == "1_fake" for p in paths])
    logit, _ = _logits(quick, paths)
    p = _sig(logit / T)
    assert (p[~y] > t).sum() <= math.floor(0.02 * (~y).sum())
    assert report["metrics"]["after"]["tpr"] == pytest.approx((p[y] > t).mean())
    assert report["metrics"]["after"]["ece"] == pytest.approx(ece(y, p))
    assert report["metrics"]["before"]["ece"] == pytest.approx(ece(y, _sig(logit)))
    # provenance: the data's size and hash (relative path, label, content of each image)
    h = hashlib.sha256()
    for q in sorted(paths, key=lambda q: q.relative_to(proxy / "val").as_posix()):
        h.update(f"{q.relative_to(proxy / 'val').as_posix()}\0{int(q.parent.name == '1_fake')}\0".encode())
        h.update(hashlib.sha256(q.read_bytes()).digest())
    assert rec["data"] == {"path": str((proxy / "val").resolve()), "n_real": 60, "n_fake": 60, "sha256": h.hexdigest()}

    # detect: raw logit unchanged, prob_fake calibrated, label at the fitted threshold
    got = [json.loads(ln) for ln in _ok(run_ferret("detect", "-w", str(out), *map(str, paths[:40]), "--json",
                                                   "--device", "cpu", "-q")).stdout.splitlines()]
    for r, raw in zip(got, logit[:40]):
        assert r["logit"] == pytest.approx(raw, abs=1e-5)
        assert r["prob_fake"] == pytest.approx(_sig(raw / T), abs=1e-6)
        assert r["label"] == ("fake" if r["prob_fake"] > t else "real")

    # eval on the calibration folder warns; --threshold model counts at the fitted threshold
    ev = _ok(run_ferret("eval", "-w", str(out), "--data", str(proxy / "val"), "--threshold", "model",
                        "--json", str(tmp_path / "ev.json"), "--device", "cpu"))
    assert "calibrated on" in ev.stderr
    r = json.loads((tmp_path / "ev.json").read_text())["subsets"]["val"]
    assert r["r_acc"] == pytest.approx(100 * (p[~y] <= t).mean())
    assert r["f_acc"] == pytest.approx(100 * (p[y] > t).mean())
    assert "calibrated on" not in _ok(run_ferret("eval", "-w", str(out), "--data", str(proxy / "test"),
                                                 "--device", "cpu")).stderr


def test_calibrate_onnx_writes_its_metadata_and_the_runtime_applies_it(proxy, quick, tmp_path):
    import onnx

    onnx_path = tmp_path / "q.onnx"
    _ok(run_ferret("export", "onnx", "-w", str(quick), "--out", str(onnx_path), "--input-size", "64", "--no-verify"))
    out = tmp_path / "q-cal.onnx"
    _ok(run_ferret("calibrate", "-m", str(onnx_path), "--data", str(proxy / "val"), "--rule", "eer", "--scaling",
                   "platt", "-o", str(out), "--bootstrap", "0", "--eval-data", str(proxy / "val")))
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    rec = json.loads(props["ferret.provenance"])["calibration"]
    assert float(props["ferret.threshold"]) == rec["threshold"] and rec["rule"] == "eer"
    paths = sorted((proxy / "test").rglob("*.png"))[:24]
    raw, _ = _logits(onnx_path, paths)
    from ferret_runtime import Detector

    with Detector.open(out, device="cpu") as det:
        res = det.predict(paths)
    a, b = rec["scaling"]["a"], rec["scaling"]["b"]
    assert [r.logit for r in res] == pytest.approx(list(raw), abs=1e-6)
    assert [r.prob_fake for r in res] == pytest.approx(list(_sig(a * raw + b)), abs=1e-6)
    assert [r.label for r in res] == ["fake" if q > rec["threshold"] else "real" for q in _sig(a * raw + b)]


def test_engine_sidecar_carries_the_calibration(tmp_path):
    from ferret_runtime import sidecar
    from ferret_runtime.backends.tensorrt import TrtBackend
    from ferret_runtime.metadata import scaling_of
    from ferret_train.calibration import write_calibrated

    from .test_sidecar import BLOB, INPUTS, META, OUTPUTS, _record

    engine = tmp_path / "m.engine"
    engine.write_bytes(BLOB)
    from ferret_runtime.metadata import encode

    sidecar.write(engine, encode(META) | {sidecar.ENGINE_KEY: json.dumps(_record())}, INPUTS, OUTPUTS)
    record = {"scaling": {"method": "temperature", "temperature": 2.5}, "threshold": 0.83}
    write_calibrated(engine, tmp_path / "m-cal.engine", record)
    side = sidecar.read(tmp_path / "m-cal.engine")
    assert (tmp_path / "m-cal.engine").read_bytes() == BLOB and side.engine == sidecar.read(engine).engine
    info = TrtBackend._model_info(side)
    assert info.threshold == 0.83 and scaling_of(info.extra, "m") == Scaling("temperature", temperature=2.5)
    assert side.inputs == sidecar.read(engine).inputs  # profiles kept


# ------------------------------------------------------------------------------------ refusals
def _small(root: Path, proxy: Path, n_real: int, n_fake: int, swap: bool = False) -> Path:
    """n_real + n_fake validation images; ``swap`` files the real ones as fake and the fake ones as real."""
    for cls, src_cls, n in (("0_real", "0_real", n_real), ("1_fake", "1_fake", n_fake)):
        (root / cls).mkdir(parents=True)
        src_cls = {"0_real": "1_fake", "1_fake": "0_real"}[src_cls] if swap else src_cls
        for src in sorted((proxy / "val" / src_cls).iterdir())[:n]:
            shutil.copy(src, root / cls / src.name)
    return root


@pytest.mark.parametrize("case", ["few", "fpr", "empty class", "no layout", "scaling reversed"])
def test_bad_input_is_one_line_and_exit_2(proxy, quick, tmp_path, case):
    args = ["--target-fpr", "0.01"]
    if case == "few":
        data = _small(tmp_path / "d", proxy, 60, MIN_PER_CLASS - 1)
        msg = f"received {MIN_PER_CLASS - 1} fake (1_fake) images; expected at least {MIN_PER_CLASS} per class"
    elif case == "fpr":
        data = _small(tmp_path / "d", proxy, 60, 60)
        msg = "received 60 real images for --target-fpr 0.01; expected at least 100"
    elif case == "empty class":
        data = _small(tmp_path / "d", proxy, 60, 0)
        msg = "without images in 1_fake"
    elif case == "no layout":
        data = tmp_path / "flat"
        data.mkdir()
        shutil.copy(next((proxy / "val" / "0_real").iterdir()), data / "a.png")
        msg = "none inside a folder named 0_real or 1_fake"
    else:
        data, args = _small(tmp_path / "d", proxy, 60, 60, swap=True), ["--rule", "accuracy"]
        msg = "expected a model that ranks fake images above real ones"
    proc = run_ferret("calibrate", "-w", str(quick), "--data", str(data), "-o", str(tmp_path / "o.pt"), *args,
                      "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    assert msg in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.pt").exists()


def test_a_calibrated_checkpoint_exports_with_its_calibration_and_the_triton_client_applies_it(proxy, quick,
                                                                                                  tmp_path):
    from ferret_export.triton.client import logit_scaling
    from ferret_runtime import Detector

    cal = tmp_path / "q-cal.pt"
    _ok(run_ferret("calibrate", "-w", str(quick), "--data", str(proxy / "val"), "--rule", "accuracy", "-o", str(cal),
                   "--bootstrap", "0", "--device", "cpu"))
    rec = json.loads((tmp_path / "q-cal.pt.calibration.json").read_text())["calibration"]
    onnx_path = tmp_path / "q-cal.onnx"
    _ok(run_ferret("export", "onnx", "-w", str(cal), "--out", str(onnx_path), "--input-size", "64", "--no-verify"))
    paths = sorted((proxy / "test").rglob("*.png"))[:16]
    with Detector.open(cal, device="cpu") as a, Detector.open(onnx_path, device="cpu") as b:
        assert b.threshold == rec["threshold"]  # not the paper's 0.5: the export kept the fitted one
        pt, ox = a.predict(paths), b.predict(paths)
    assert [r.prob_fake for r in ox] == pytest.approx([r.prob_fake for r in pt], abs=1e-5)
    assert [r.label for r in ox] == [r.label for r in pt]
    # the client that ferret export triton writes reads the same scaling from the config parameters
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    scale, shift = logit_scaling(props)
    assert (scale, shift) == (pytest.approx(1 / rec["scaling"]["temperature"]), 0.0)
    for r in ox:
        assert r.prob_fake == pytest.approx(float(_sig(scale * r.logit + shift)), abs=1e-9)
    assert logit_scaling({}) == (1.0, 0.0)
