"""``ferret compare``: every file on the same images; accuracy, flips and |Δlogit| against independent
runs of each model, and a file that cannot run here as a row saying why."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ferret_runtime import Detector
from ferret_runtime.samples import write_proxy_dataset

from .conftest import run_ferret


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import torch

    from ferret_runtime.preprocess import Preprocess
    from ferret_train import create_model
    from ferret_train.calibration import write_calibrated
    from ferret_train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("cmp")
    write_proxy_dataset(root / "data", size=48, n_train=1, n_val=1, n_test=5, seed=4)
    torch.manual_seed(0)
    pt = save_checkpoint(root / "r.pt", create_model("ferretnet-s").eval(), preprocess=Preprocess(crop=48))
    proc = run_ferret("export", "onnx", "-w", str(pt), "--out", str(root / "r.onnx"), "--input-size", "48",
                      "--no-verify")
    assert proc.returncode == 0, proc.stderr
    with Detector.open(pt, device="cpu") as det:  # a threshold at the median logit: about half the labels flip
        med = float(np.median([r.logit for r in det.predict(sorted((root / "data" / "test").rglob("*.png")))]))
    shifted = write_calibrated(pt, root / "r-cal.pt",
                               {"scaling": {"method": "none"}, "threshold": float(1 / (1 + np.exp(-med)))})
    return root / "data" / "test", [pt, root / "r.onnx", shifted, root / "absent.engine"]


def test_compare_against_independent_runs(files, tmp_path):
    from sklearn.metrics import accuracy_score, average_precision_score

    data, models = files
    out = tmp_path / "c.json"
    proc = run_ferret("compare", *map(str, models), "--data", str(data), "--json", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert (tmp_path / "c.png").stat().st_size > 10_000
    rows = {r["model"]: r for r in doc["models"]}
    assert "error" in rows[str(models[3])] and "not run:" in proc.stdout  # a row, not a crash

    paths = sorted(data.rglob("*.png"))
    y = np.array([p.parent.name == "1_fake" for p in paths])
    runs = {}
    for m in models[:3]:
        with Detector.open(m, device="cpu") as det:
            res = det.predict(paths)
        runs[m] = (np.array([r.logit for r in res]), np.array([r.label == "fake" for r in res]))
    ref_logit, ref_fake = runs[models[0]]
    for m in models[:3]:
        logit, fake = runs[m]
        row = rows[str(m)]
        assert row["acc"] == pytest.approx(100 * accuracy_score(y, fake))
        assert row["ap"] == pytest.approx(100 * average_precision_score(y, logit), abs=1e-3)
        assert row["flips"] == int((fake != ref_fake).sum())
        assert row["max_dlogit"] == pytest.approx(np.abs(logit - ref_logit).max(), abs=1e-5)
        assert row["images_per_s"] > 0
    assert rows[str(models[1])]["max_dlogit"] < 1e-3 and rows[str(models[1])]["flips"] <= 1  # ONNX = PyTorch
    assert rows[str(models[2])]["flips"] > 5  # the same logits, another threshold


def test_nothing_runs_is_an_error(files):
    data, models = files
    proc = run_ferret("compare", str(models[3]), "--data", str(data))
    assert proc.returncode == 2 and "none of which runs here" in proc.stderr
