"""``ferret calibrate`` on logits that separate the classes perfectly (a good detector on a few
hundred images) and on logits that barely separate them: fitted, not refused, and said plainly.

Expected values come from closed forms (Platt's targets on two-point data), from counting, and
from the authors' checkpoint run through the runtime apart from the command."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from ferret_runtime.errors import ConfigError
from ferret_train.calibration import AUC_WARN, calibrate, fit_scaling, fit_warnings

from .conftest import run_ferret


def _sig(z):
    return 1 / (1 + np.exp(-np.asarray(z, np.float64)))


def _auc_by_pairs(y, s):
    """P(fake scores above real) + half the ties, over every (fake, real) pair."""
    f, r = s[y == 1][:, None], s[y == 0][None, :]
    return float(((f > r).sum() + 0.5 * (f == r).sum()) / (f.size * r.size))


def _two_points(m: float, n_real: int, n_fake: int):
    return np.r_[np.full(n_real, -m), np.full(n_fake, m)], np.r_[np.zeros(n_real, int), np.ones(n_fake, int)]


# ------------------------------------------------------------------------------------ the fits
def test_temperature_on_separated_logits_is_finite_with_platts_closed_form():
    # every real at -m, every fake at +m, n each: Platt's targets ask for sigmoid(m / T) = (n + 1) / (n + 2),
    # so T = m / ln(n + 1); the unregularised fit has no minimum (T -> 0), and the old code refused it
    m, n = 3.0, 70
    logits, y = _two_points(m, n, n)
    assert fit_scaling(logits, y, "temperature").temperature == pytest.approx(m / math.log(n + 1), rel=1e-6)


def test_platt_on_separated_logits_is_finite_with_platts_closed_form():
    # a * m + b = logit((nf + 1) / (nf + 2)) = ln(nf + 1) and -a * m + b = logit(1 / (nr + 2)) = -ln(nr + 1)
    m, nr, nf = 3.0, 90, 60
    s = fit_scaling(*_two_points(m, nr, nf), "platt")
    assert s.a == pytest.approx((math.log(nf + 1) + math.log(nr + 1)) / (2 * m), rel=1e-6)
    assert s.b == pytest.approx((math.log(nf + 1) - math.log(nr + 1)) / 2, rel=1e-6)


@pytest.fixture(scope="module")
def separated():
    """Spread-out logits like the authors' model on its own images: real -17..-3, fake 1.2..9."""
    rng = np.random.default_rng(3)
    return np.r_[rng.uniform(-17, -3, 80), rng.uniform(1.2, 9, 65)], np.r_[np.zeros(80, int), np.ones(65, int)]


@pytest.mark.parametrize("scaling", ["temperature", "platt", "none"])
@pytest.mark.parametrize("rule", ["fpr", "accuracy", "eer"])
def test_every_rule_puts_the_threshold_in_the_gap(separated, scaling, rule):
    # --target-fpr 0.02 allows one false positive in 80 real images; a threshold below the highest
    # real logit spends it for no true positive (the old fpr rule did), so the gap is the only answer
    logits, y = separated
    fit = calibrate(logits, y, scaling=scaling, rule=rule, target_fpr=0.02, n_resamples=50)
    p = _sig(fit.scaling.apply(logits))
    assert p[y == 0].max() < fit.threshold < p[y == 1].min()
    lo, hi = fit.threshold_ci
    assert p[y == 0].max() < lo <= fit.threshold <= hi < p[y == 1].min()


def test_the_separation_warning_states_the_margin_and_the_bounds(separated):
    logits, y = separated
    fit = calibrate(logits, y, scaling="temperature", rule="fpr", target_fpr=0.02, n_resamples=0)
    (line,) = fit_warnings(fit, logits, y, "val/")
    margin = logits[y == 1].min() - logits[y == 0].max()
    p = _sig(logits / fit.scaling.temperature)
    assert f"separate fake from real perfectly on val/ (margin {margin:.3g} " in line
    assert f"T = {fit.scaling.temperature:.4g} is fitted to Platt's targets (66/67 fake, 1/82 real)" in line
    assert f"prob_fake {p.min():.3g}..{p.max():.4g}" in line
    assert "below 0.037 and 0.046 at 95%" in line  # 3 / 80, 3 / 65
    assert fit.separation.to_dict()["separated"] and fit.separation.margin == pytest.approx(margin)


@pytest.mark.parametrize("scaling", ["temperature", "platt", "none"])
def test_logits_no_better_than_a_coin_are_refused_for_every_scaling(scaling):
    # reals all above fakes: AUC 0 by counting; all equal: AUC 0.5. --scaling none used to write these
    for logits, auc in ((_two_points(-1.0, 60, 60)[0], 0.0), (np.zeros(120), 0.5)):
        y = np.r_[np.zeros(60, int), np.ones(60, int)]
        assert _auc_by_pairs(y, logits) == auc
        want = rf"received logits with ROC AUC {auc:.3f}; expected a model that ranks fake images above"
        with pytest.raises(ConfigError, match=want):
            calibrate(logits, y, scaling=scaling, rule="accuracy", n_resamples=0)


def test_barely_separating_logits_warn_with_the_measured_auc():
    # 50 real at 0; of 50 fake, 10 at +1 and 40 at 0: AUC = 10/50 + 0.5 * 40/50 = 0.6 by hand
    logits = np.r_[np.zeros(50), np.ones(10), np.zeros(40)]
    y = np.r_[np.zeros(50, int), np.ones(50, int)]
    fit = calibrate(logits, y, scaling="none", rule="accuracy", n_resamples=0)
    (line,) = fit_warnings(fit, logits, y, "d/")
    assert line.startswith(f"ROC AUC 0.600 on d/ (50 real, 50 fake images), below {AUC_WARN}: the logits barely")


# ------------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def reference_crops(reference, tmp_path_factory):
    """256x256 crops of the reference images near their centres (up to 48 px off, a 4 x 4 grid):
    65 fake and 80 real, which the authors' FerretNet-S separates perfectly (logits -17..-2.9 and
    1.2..8.8). Crops further out are not separated, so the grid stays near the centre."""
    from PIL import Image

    root = tmp_path_factory.mktemp("refcrops")
    for src in sorted((reference / "images").glob("*.png")):
        cls = root / ("1_fake" if src.name.startswith("fake") else "0_real")
        cls.mkdir(exist_ok=True)
        with Image.open(src) as im:
            im = im.convert("RGB")
            w, h = im.size
            offsets = {(min(max((w - 256) // 2 + dx, 0), w - 256), min(max((h - 256) // 2 + dy, 0), h - 256))
                       for dx in (-48, -16, 16, 48) for dy in (-48, -16, 16, 48)}
            for x, y in sorted(offsets):
                im.crop((x, y, x + 256, y + 256)).save(cls / f"{src.stem}_{x}_{y}.png")
    return root


def test_authors_model_on_data_it_separates_perfectly_is_calibrated_with_a_warning(reference_crops, authors_ckpt,
                                                                                   tmp_path):
    from ferret_runtime import Detector

    out = tmp_path / "ref-cal.pth"
    proc = run_ferret("calibrate", "-w", str(authors_ckpt), "--data", str(reference_crops), "-o", str(out),
                      "--target-fpr", "0.02", "--bootstrap", "100", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [ln for ln in proc.stderr.splitlines() if "warning" in ln]
    paths = sorted(reference_crops.rglob("*.png"))
    y = np.array([p.parent.name == "1_fake" for p in paths])
    with Detector.open(authors_ckpt, device="cpu") as det:
        logits = np.array([r.logit for r in det.predict(paths)])
    margin = logits[y].min() - logits[~y].max()
    assert (y.sum(), (~y).sum()) == (65, 80) and margin > 4  # the data are what the fixture says
    assert len(warnings) == 1 and f"perfectly on {reference_crops} (margin {margin:.3g} " in warnings[0]

    rec = json.loads(out.with_name(out.name + ".calibration.json").read_text())["calibration"]
    T, t = rec["scaling"]["temperature"], rec["threshold"]
    p = _sig(logits / T)
    assert p[~y].max() < t < p[y].min()  # in the gap although one false positive was allowed
    assert 0.5 < T < 5 and p.max() < 0.999  # finite, and not claiming the certainty T = 1 does (0.99985)
    assert rec["separation"]["margin"] == pytest.approx(margin, abs=1e-4) and rec["separation"]["auc"] == 1.0
    with Detector.open(out, device="cpu") as det:  # the written model carries it
        assert det.threshold == t and [r.label for r in det.predict(paths[:3])] == ["real"] * 3


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A quickly trained model, and a folder whose 0_real holds 15 real and 35 fake images (1_fake: 50
    other fakes): whatever the model, its logits barely separate these 'classes'."""
    from ferret_runtime.samples import write_proxy_dataset

    from .test_calibrate import quick_model

    root = tmp_path_factory.mktemp("mixed")
    write_proxy_dataset(root / "proxy", size=64, n_train=40, n_val=90, n_test=1, seed=7)
    model = quick_model(root / "proxy" / "train", root / "q.pt")
    val, data = root / "proxy" / "val", root / "data"
    reals, fakes = sorted((val / "0_real").iterdir()), sorted((val / "1_fake").iterdir())
    for folder, files in (("0_real", reals[:15] + fakes[:35]), ("1_fake", fakes[35:85])):
        (data / folder).mkdir(parents=True)
        for f in files:
            shutil.copy(f, data / folder / f"{f.parent.name}-{f.name}")
    return model, data


def test_scaling_none_on_data_it_barely_separates_writes_with_a_warning(mixed, tmp_path):
    from ferret_runtime import Detector

    model, data = mixed
    out = tmp_path / "none.pt"
    proc = run_ferret("calibrate", "-w", str(model), "--data", str(data), "-o", str(out), "--scaling", "none",
                      "--rule", "accuracy", "--bootstrap", "0", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = sorted(data.rglob("*.png"))
    y = np.array([p.parent.name == "1_fake" for p in paths])
    with Detector.open(model, device="cpu") as det:
        auc = _auc_by_pairs(y, np.array([r.logit for r in det.predict(paths)]))
    assert 0.5 < auc < AUC_WARN  # what the mix is for
    warnings = [ln for ln in proc.stderr.splitlines() if "warning" in ln]
    assert warnings == [f"[calibrate] warning: ROC AUC {auc:.3f} on {data} (50 real, 50 fake images), below "
                        f"{AUC_WARN}: the logits barely separate fake from real on this data, and labels at any "
                        "threshold are little better than chance"]
    report = json.loads(Path(str(out) + ".calibration.json").read_text())
    assert report["warnings"] == [warnings[0].removeprefix("[calibrate] warning: ")] and out.is_file()
