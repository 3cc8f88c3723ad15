"""Calibration: a logit scaling that makes prob_fake mean what it says, and a decision threshold
fitted for a stated rule (a false-positive rate on real images, maximum accuracy, or the equal
error rate), with the numbers that show what changed.

Conventions (the runtime's, ``ferret_runtime.metadata.Scaling``): z = scaling(logit) is the
calibrated logit, prob_fake = sigmoid(z), the label is "fake" when prob_fake > threshold. Thresholds
are fitted on z (a probability saturates to 1.0 in floating point long before a logit does) and
stored as sigmoid(z_threshold), the same decision on the calibrated probability.

Both scalings are fitted to Platt's regularised targets rather than 0 and 1: a model that separates
its calibration images perfectly (common for a good detector on a few hundred images) otherwise has
no finite fit, and the command says so in a warning instead of failing or claiming certainty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ferret_runtime.errors import ConfigError
from ferret_runtime.metadata import Scaling

# re-exported: ``ferret eval`` and the tests import them from here
from .calibration_io import data_record, model_writer, same_data, same_file, write_calibrated  # noqa: F401

# Fewer images than this per class and the fitted numbers are noise: refused, not fitted. The FPR
# rule needs more: at least 1 / target_fpr real images, or the target is finer than one image.
MIN_PER_CLASS = 50
RULES: tuple[str, ...] = ("fpr", "accuracy", "eer")
SCALINGS: tuple[str, ...] = ("temperature", "platt", "none")
ECE_BINS = 15
REPORT_FPRS = (0.01, 0.05)
# Below this ROC AUC on the calibration data the command warns that the logits barely separate the
# classes: 0.7 is the usual floor of "acceptable" discrimination (Hosmer and Lemeshow, Applied
# Logistic Regression, 3rd ed., 5.2.4). At or below 0.5 (no better than a coin) the fit is refused.
AUC_WARN = 0.7


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Elementwise logistic function, float64, without overflow warnings."""
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def logit_of(p: float) -> float:
    """The inverse of sigmoid on [0, 1] (+-inf at the ends)."""
    return math.inf if p >= 1 else -math.inf if p <= 0 else math.log(p / (1 - p))


def ece(y: np.ndarray, p: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of prob_fake with ``n_bins`` equal-width bins over [0, 1]:
    sum over bins of (share of images in the bin) * |fraction fake - mean prob_fake|.

    Binned as sklearn's ``calibration_curve(strategy="uniform")`` bins (a value on an inner edge goes
    to the lower bin; 1.0 to the last), so the reliability diagram shows the same bins.
    """
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], p)
    total = 0.0
    for b in range(n_bins):
        in_bin = ids == b
        if in_bin.any():
            total += in_bin.mean() * abs(y[in_bin].mean() - p[in_bin].mean())
    return float(total)


def tpr_at_fpr(y: np.ndarray, score: np.ndarray, fpr_max: float) -> float:
    """The highest true-positive rate at a false-positive rate <= ``fpr_max`` (any threshold)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, score, drop_intermediate=False)
    return float(tpr[np.searchsorted(fpr, fpr_max, side="right") - 1])


# ------------------------------------------------------------------------------------ fitting
def platt_targets(y: np.ndarray) -> np.ndarray:
    """Platt's (1999, section 2.2) regularised targets: (N_fake + 1) / (N_fake + 2) for a fake image,
    1 / (N_real + 2) for a real one, instead of 1 and 0.

    With 0/1 targets a model that separates its calibration images perfectly has no finite
    maximum-likelihood fit (T -> 0, a -> inf: a step function claiming certainty from N images);
    these targets give every fit a finite optimum and cap prob_fake near 1 - 1/N, what N images can
    support. sklearn's sigmoid calibration uses the same targets.
    """
    y = np.asarray(y)
    n_fake, n_real = int((y == 1).sum()), int((y == 0).sum())
    return np.where(y == 1, (n_fake + 1) / (n_fake + 2), 1 / (n_real + 2))


def _fit_logistic(x: np.ndarray, t: np.ndarray, intercept: bool) -> tuple[float, float]:
    """(a, b) minimising the mean cross-entropy of sigmoid(a * x + b) against soft targets ``t``
    (b = 0 without ``intercept``); convex, with a finite optimum for targets strictly inside (0, 1)."""
    from scipy.optimize import minimize

    scale = float(np.sqrt(np.mean(x * x))) or 1.0  # conditioning only: the fit is invariant to it
    xs = x / scale

    def loss_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = w[0] * xs + (w[1] if intercept else 0.0)
        g = sigmoid(z) - t
        grad = [np.mean(g * xs), np.mean(g)] if intercept else [np.mean(g * xs)]
        return float(np.mean(np.logaddexp(0.0, z) - t * z)), np.array(grad)

    res = minimize(loss_grad, np.zeros(2 if intercept else 1), jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-10, "ftol": 1e-15, "maxiter": 1000})
    return float(res.x[0] / scale), float(res.x[1]) if intercept else 0.0


def fit_scaling(logits: np.ndarray, y: np.ndarray, method: str) -> Scaling:
    """Temperature (one T > 0) or Platt (a > 0, b) by maximum likelihood against Platt's targets
    (:func:`platt_targets`), so data the logits separate perfectly still get a finite fit; a model
    whose logits rank real above fake has no monotone calibration and is refused."""
    logits, y = np.asarray(logits, dtype=np.float64), np.asarray(y)
    if method == "none":
        return Scaling()
    if method not in ("temperature", "platt"):
        raise ConfigError(f"Received scaling {method!r}; expected one of {', '.join(SCALINGS)}")
    a, b = _fit_logistic(logits, platt_targets(y), intercept=method == "platt")
    if not a > 0:
        raise ConfigError(f"Received logits that {method} scaling fits with slope {a:.3g}; expected a model that "
                          "ranks fake images above real ones on the calibration data (slope > 0)")
    return Scaling("temperature", temperature=1.0 / a) if method == "temperature" else Scaling("platt", a=a, b=b)


@dataclass(frozen=True)
class Separation:
    """How far the raw logits separate the classes: the ROC AUC, and the margin between the lowest
    fake and the highest real logit (> 0: separated perfectly, no threshold errs on these images)."""

    auc: float
    lowest_fake: float
    highest_real: float

    @property
    def margin(self) -> float:
        return self.lowest_fake - self.highest_real

    def to_dict(self) -> dict[str, float | bool]:
        return {"auc": self.auc, "margin": self.margin, "lowest_fake_logit": self.lowest_fake,
                "highest_real_logit": self.highest_real, "separated": self.margin > 0}


def separation(logits: np.ndarray, y: np.ndarray) -> Separation:
    """The ROC AUC and the margin of the raw logits (any monotone scaling leaves both signs alone)."""
    from sklearn.metrics import roc_auc_score

    logits, y = np.asarray(logits, dtype=np.float64), np.asarray(y)
    return Separation(float(roc_auc_score(y, logits)), float(logits[y == 1].min()), float(logits[y == 0].max()))


def fit_threshold(z: np.ndarray, y: np.ndarray, rule: str, target_fpr: float = 0.01) -> float:
    """The calibrated-logit threshold for ``rule``; the decision is ``z > threshold``.

    From sklearn's ROC (a point i labels ``z >= thresholds[i]`` fake): fpr, the point with the
    highest TPR whose FPR <= ``target_fpr`` (the lowest FPR among ties); accuracy, the point of
    maximum accuracy; eer, the point where FPR and FNR are closest (the first of ties each time: on
    perfectly separated data every rule puts the threshold in the gap). The threshold is placed halfway
    to the next lower score, so ``z > threshold`` labels exactly the same images as the point does.
    """
    from sklearn.metrics import roc_curve

    z, y = np.asarray(z, dtype=np.float64), np.asarray(y)
    n_fake, n_real = int((y == 1).sum()), int((y == 0).sum())
    if n_fake == 0 or n_real == 0:
        return math.nan  # a bootstrap resample without one class
    fpr, tpr, thr = roc_curve(y, z, drop_intermediate=False)
    if rule == "fpr":  # of the points with the highest such TPR, the first: the fewest false positives
        allowed = int(np.searchsorted(fpr, target_fpr, side="right"))
        i = int(np.argmax(tpr[:allowed]))
    elif rule == "accuracy":
        i = int(np.argmax(tpr * n_fake + (1 - fpr) * n_real))
    elif rule == "eer":
        i = int(np.argmin(np.abs(fpr - (1 - tpr))))
    else:
        raise ConfigError(f"Received rule {rule!r}; expected one of {', '.join(RULES)}")
    # thr[0] is +inf (nothing fake): the threshold then sits above the highest score
    upper = thr[i] if math.isfinite(thr[i]) else thr[1] + 1.0
    lower = thr[i + 1] if i + 1 < len(thr) else thr[i] - 1.0
    return float((upper + lower) / 2)


def bootstrap_threshold(z: np.ndarray, y: np.ndarray, rule: str, target_fpr: float, n_resamples: int = 1000,
                        seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the fitted calibrated-logit threshold (images resampled)."""
    from scipy.stats import bootstrap

    res = bootstrap((np.asarray(z, np.float64), np.asarray(y)), lambda zz, yy: fit_threshold(zz, yy, rule, target_fpr),
                    paired=True, vectorized=False, n_resamples=n_resamples, confidence_level=level,
                    method="percentile", random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def check_counts(n_real: int, n_fake: int, rule: str, target_fpr: float, source: str) -> None:
    """Refuse data too small for the fit (see ``MIN_PER_CLASS``), naming the folder and the count."""
    for name, n in (("real (0_real)", n_real), ("fake (1_fake)", n_fake)):
        if n < MIN_PER_CLASS:
            raise ConfigError(f"{source}: received {n} {name} images; expected at least {MIN_PER_CLASS} per class "
                              "to fit a calibration")
    if rule == "fpr":
        if not 0.0 < target_fpr < 1.0:
            raise ConfigError(f"Received --target-fpr {target_fpr}; expected a rate in (0, 1), e.g. 0.01")
        need = math.ceil(1.0 / target_fpr - 1e-9)
        if n_real < need:
            raise ConfigError(f"{source}: received {n_real} real images for --target-fpr {target_fpr}; expected at "
                              f"least {need} (1 / target FPR), or one false positive is already more than the target")


# ------------------------------------------------------------------------------------ reporting
@dataclass(frozen=True)
class Fit:
    """What ``calibrate`` fitted: the scaling, the threshold on prob_fake and its interval, and how
    well the logits separate the classes."""

    scaling: Scaling
    threshold: float
    threshold_ci: tuple[float, float]
    rule: str
    target_fpr: float | None
    separation: Separation


def calibrate(logits: np.ndarray, y: np.ndarray, *, scaling: str = "temperature", rule: str = "fpr",
              target_fpr: float = 0.01, n_resamples: int = 1000, seed: int = 0,
              source: str = "the calibration data") -> Fit:
    """Fit the scaling on the logits, then the threshold for ``rule`` on the calibrated logits.

    Logits that rank fake no higher than real (ROC AUC <= 0.5) are refused whatever the scaling: no
    threshold on them labels better than a coin, and the likeliest cause is swapped class folders."""
    sep = separation(logits, y)
    if not sep.auc > 0.5:
        raise ConfigError(f"{source}: received logits with ROC AUC {sep.auc:.3f}; expected a model that "
                          "ranks fake images above real ones on the calibration data (AUC > 0.5; are 0_real and "
                          "1_fake swapped?)")
    s = fit_scaling(logits, y, scaling)
    z = s.apply(np.asarray(logits, dtype=np.float64))
    zt = fit_threshold(z, y, rule, target_fpr)
    lo, hi = bootstrap_threshold(z, y, rule, target_fpr, n_resamples, seed) if n_resamples else (math.nan, math.nan)
    to_p = lambda v: float(sigmoid(v)) if math.isfinite(v) else math.nan  # noqa: E731
    return Fit(s, to_p(zt), (to_p(lo), to_p(hi)), rule, target_fpr if rule == "fpr" else None, sep)


def fit_warnings(fit: Fit, logits: np.ndarray, y: np.ndarray, source: str) -> list[str]:
    """One line per thing the user should know before trusting the fit (see ``AUC_WARN``): logits that
    barely separate the classes, or that separate them perfectly (the scaling is then regularised,
    and the threshold's error rates are only bounded, not measured)."""
    sep, s = fit.separation, fit.scaling
    n_real, n_fake = int((np.asarray(y) == 0).sum()), int((np.asarray(y) == 1).sum())
    out = []
    if sep.auc < AUC_WARN:
        out.append(f"ROC AUC {sep.auc:.3f} on {source} ({n_real} real, {n_fake} fake images), below {AUC_WARN}: the "
                   "logits barely separate fake from real on this data, and labels at any threshold are little "
                   "better than chance")
    if sep.margin > 0:
        how = ""
        if s.method != "none":
            p = sigmoid(s.apply(np.asarray(logits, dtype=np.float64)))
            step, fitted = ("T to 0", f"T = {s.temperature:.4g}") if s.method == "temperature" else \
                ("a to infinity", f"a = {s.a:.4g}, b = {s.b:.4g}")
            how = (f"; unregularised, the {s.method} fit would take {step} (a step function), so {fitted} is fitted "
                   f"to Platt's targets ({n_fake + 1}/{n_fake + 2} fake, 1/{n_real + 2} real) instead: prob_fake "
                   f"{p.min():.3g}..{p.max():.4g} on these images")
        out.append(f"the logits separate fake from real perfectly on {source} (margin {sep.margin:.3g} between the "
                   f"lowest fake logit {sep.lowest_fake:.3g} and the highest real {sep.highest_real:.3g}){how}; the "
                   f"threshold sits in the gap, and its FPR 0 and TPR 1 here only bound the error rates (below "
                   f"{3 / n_real:.2g} and {3 / n_fake:.2g} at 95%, rule of three): calibrate on more or harder images "
                   "to measure them")
    return out


def metrics(logits: np.ndarray, y: np.ndarray, scaling: Scaling, threshold: float) -> dict[str, float]:
    """ECE (15 bins), Brier, NLL, TPR at FPR 1% and 5%, and the decision at ``threshold``."""
    from sklearn.metrics import accuracy_score, brier_score_loss, log_loss

    y = np.asarray(y)
    z = scaling.apply(np.asarray(logits, dtype=np.float64))
    p = sigmoid(z)
    fake = z > logit_of(threshold)  # the runtime's prob_fake > threshold, without saturation
    out = {"ece": ece(y, p), "brier": float(brier_score_loss(y, p)), "nll": float(log_loss(y, p, labels=[0, 1])),
           "threshold": float(threshold), "acc": float(accuracy_score(y, fake)),
           "fpr": float(fake[y == 0].mean()), "tpr": float(fake[y == 1].mean())}
    for q in REPORT_FPRS:
        out[f"tpr@fpr{q:g}"] = tpr_at_fpr(y, z, q)
    return out


ROWS = (("ece", "ECE (15 bins)"), ("brier", "Brier score"), ("nll", "log loss"), ("tpr@fpr0.01", "TPR @ FPR 1%"),
        ("tpr@fpr0.05", "TPR @ FPR 5%"), ("threshold", "threshold"), ("acc", "ACC @ threshold"),
        ("fpr", "FPR @ threshold"), ("tpr", "TPR @ threshold"))


def format_report(columns: dict[str, dict[str, float]]) -> str:
    """A terminal table: one row per metric, one column per (data, before/after)."""
    width = max(len(label) for _, label in ROWS)
    cw = max([len(c) for c in columns] + [8])
    lines = [f"{'':<{width}}  " + "  ".join(f"{c:>{cw}}" for c in columns)]
    for key, label in ROWS:
        lines.append(f"{label:<{width}}  " + "  ".join(f"{col[key]:>{cw}.4f}" for col in columns.values()))
    return "\n".join(lines)
