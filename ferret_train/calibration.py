"""Calibration: a logit scaling that makes prob_fake mean what it says, and a decision threshold
fitted for a stated rule (a false-positive rate on real images, maximum accuracy, or the equal
error rate), with the numbers that show what changed.

Conventions (the runtime's, ``ferret_runtime.metadata.Scaling``): z = scaling(logit) is the
calibrated logit, prob_fake = sigmoid(z), the label is "fake" when prob_fake > threshold. Thresholds
are fitted on z (a probability saturates to 1.0 in floating point long before a logit does) and
stored as sigmoid(z_threshold), the same decision on the calibrated probability.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ferret_runtime.errors import ConfigError
from ferret_runtime.metadata import CALIBRATION_KEY, PREFIX, Scaling

from .data import Sample

# Fewer images than this per class and the fitted numbers are noise: refused, not fitted. The FPR
# rule needs more: at least 1 / target_fpr real images, or the target is finer than one image.
MIN_PER_CLASS = 50
RULES: tuple[str, ...] = ("fpr", "accuracy", "eer")
SCALINGS: tuple[str, ...] = ("temperature", "platt", "none")
ECE_BINS = 15
REPORT_FPRS = (0.01, 0.05)


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
def fit_scaling(logits: np.ndarray, y: np.ndarray, method: str) -> Scaling:
    """Temperature (one T > 0 minimising the negative log-likelihood) or Platt (logistic regression
    on the logit); a model that ranks real above fake has no monotone calibration and is refused."""
    logits, y = np.asarray(logits, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if method == "none":
        return Scaling()
    if method == "temperature":
        from scipy.optimize import minimize_scalar

        sign = 2 * y - 1

        def nll(log_t: float) -> float:
            return float(np.logaddexp(0.0, -sign * logits / math.exp(log_t)).mean())

        best = minimize_scalar(nll, bounds=(-7.0, 7.0), method="bounded", options={"xatol": 1e-6})
        if (logits[y == 1].mean() <= logits[y == 0].mean()) or abs(best.x) > 6.9:
            raise ConfigError("Received predictions whose logits do not separate fake from real (the temperature "
                              f"fit ran to its bound, T = {math.exp(best.x):.3g}); expected a model that ranks fake "
                              "images above real ones on the calibration data")
        return Scaling("temperature", temperature=float(math.exp(best.x)))
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=np.inf, max_iter=1000).fit(logits.reshape(-1, 1), y)
        a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        if not a > 0:
            raise ConfigError(f"Received predictions that Platt scaling fits with slope {a:.3g}; expected a model "
                              "that ranks fake images above real ones on the calibration data (slope > 0)")
        return Scaling("platt", a=a, b=b)
    raise ConfigError(f"Received scaling {method!r}; expected one of {', '.join(SCALINGS)}")


def fit_threshold(z: np.ndarray, y: np.ndarray, rule: str, target_fpr: float = 0.01) -> float:
    """The calibrated-logit threshold for ``rule``; the decision is ``z > threshold``.

    From sklearn's ROC (a point i labels ``z >= thresholds[i]`` fake): fpr, the point with the
    highest TPR whose FPR <= ``target_fpr``; accuracy, the point of maximum accuracy; eer, the point
    where FPR and FNR are closest. The threshold is placed halfway to the next lower score, so
    ``z > threshold`` labels exactly the same images as the point does.
    """
    from sklearn.metrics import roc_curve

    z, y = np.asarray(z, dtype=np.float64), np.asarray(y)
    n_fake, n_real = int((y == 1).sum()), int((y == 0).sum())
    if n_fake == 0 or n_real == 0:
        return math.nan  # a bootstrap resample without one class
    fpr, tpr, thr = roc_curve(y, z, drop_intermediate=False)
    if rule == "fpr":
        i = int(np.searchsorted(fpr, target_fpr, side="right")) - 1
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
    """What ``calibrate`` fitted: the scaling, the threshold on prob_fake and its interval."""

    scaling: Scaling
    threshold: float
    threshold_ci: tuple[float, float]
    rule: str
    target_fpr: float | None


def calibrate(logits: np.ndarray, y: np.ndarray, *, scaling: str = "temperature", rule: str = "fpr",
              target_fpr: float = 0.01, n_resamples: int = 1000, seed: int = 0) -> Fit:
    """Fit the scaling on the logits, then the threshold for ``rule`` on the calibrated logits."""
    s = fit_scaling(logits, y, scaling)
    z = s.apply(np.asarray(logits, dtype=np.float64))
    zt = fit_threshold(z, y, rule, target_fpr)
    lo, hi = bootstrap_threshold(z, y, rule, target_fpr, n_resamples, seed) if n_resamples else (math.nan, math.nan)
    to_p = lambda v: float(sigmoid(v)) if math.isfinite(v) else math.nan  # noqa: E731
    return Fit(s, to_p(zt), (to_p(lo), to_p(hi)), rule, target_fpr if rule == "fpr" else None)


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


def plot_reliability(path: Path, y: np.ndarray, probs: dict[str, np.ndarray], title: str) -> None:
    """Reliability diagram (sklearn's calibration_curve, 15 uniform bins) with the ECE in the legend,
    and the histogram of prob_fake below it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 7), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    for name, p in probs.items():
        frac, mean = calibration_curve(y, p, n_bins=ECE_BINS, strategy="uniform")
        ax.plot(mean, frac, marker="o", label=f"{name} (ECE {ece(y, p):.3f})")
        hist.hist(p, bins=np.linspace(0, 1, ECE_BINS + 1), alpha=0.5, label=name)
    ax.set(ylabel="fraction fake", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    hist.set(xlabel="prob_fake", ylabel="images")
    hist.set_yscale("log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------ data and files
def data_digest(samples: list[Sample], root: str | Path) -> str:
    """SHA-256 over the labelled images (relative path, label, content), in path order: the same
    images give the same digest wherever the folder lies."""
    root = Path(root)
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: s.path.relative_to(root).as_posix()):
        h.update(f"{s.path.relative_to(root).as_posix()}\0{s.label}\0".encode())
        with open(s.path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def data_record(samples: list[Sample], root: str | Path) -> dict[str, Any]:
    """What the provenance says about the calibration data: where, how many, which bytes."""
    return {"path": str(Path(root).resolve()), "n_real": sum(s.label == 0 for s in samples),
            "n_fake": sum(s.label == 1 for s in samples), "sha256": data_digest(samples, root)}


def same_data(record: dict[str, Any] | None, samples: list[Sample], root: str | Path) -> bool:
    """Whether ``samples`` are the images a calibration ``record`` was fitted on (counts first, so a
    different folder is not hashed)."""
    data = (record or {}).get("data")
    if not isinstance(data, dict):
        return False
    if (data.get("n_real"), data.get("n_fake")) != (sum(s.label == 0 for s in samples), sum(s.label == 1 for s in samples)):
        return False
    return data.get("path") == str(Path(root).resolve()) or data.get("sha256") == data_digest(samples, root)


def write_calibrated(src: str | Path, out: str | Path, record: dict[str, Any]) -> Path:
    """A copy of the model file ``src`` at ``out`` whose metadata holds the calibration ``record``
    (and its threshold): checkpoint key, ONNX ``ferret.*`` props, or the engine's sidecar."""
    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise ConfigError(f"Received -o {out}, the input model itself; expected a new file (the input is kept)")
    if out.suffix.lower() != src.suffix.lower():
        raise ConfigError(f"Received -o {out}; expected a {src.suffix} file like the input {src.name}")
    writers: dict[str, Callable[[Path, Path, dict[str, Any]], None]] = {
        ".pt": _write_checkpoint, ".pth": _write_checkpoint, ".onnx": _write_onnx, ".engine": _write_engine}
    writer = writers.get(src.suffix.lower())
    if writer is None:
        raise ConfigError(f"Received model {src} with suffix {src.suffix!r}; expected one of {', '.join(writers)}")
    writer(src, out, record)
    return out


def _write_checkpoint(src: Path, out: Path, record: dict[str, Any]) -> None:
    import torch

    from ferret_runtime.fileio import atomic_write

    from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint

    ckpt = read_checkpoint(src)
    if "model_config" not in ckpt:
        # an original checkpoint: its LPD may be known only from its file name, which -o changes, so
        # it is written in our format, which records it
        loaded = load_checkpoint(src)
        save_checkpoint(out, loaded.model, preprocess=loaded.preprocess, meta={"converted_from": src.name},
                        extra={CALIBRATION_KEY: record})
        return
    ckpt = {**ckpt, CALIBRATION_KEY: record}
    atomic_write(out, lambda f: torch.save(ckpt, f))


def _write_onnx(src: Path, out: Path, record: dict[str, Any]) -> None:
    import onnx

    from ferret_runtime.fileio import atomic_write

    model = onnx.load(str(src))
    props = {p.key: p for p in model.metadata_props}
    prov_key, thr_key = PREFIX + "provenance", PREFIX + "threshold"
    provenance = json.loads(props[prov_key].value) if prov_key in props else {}
    provenance[CALIBRATION_KEY] = record
    for key, value in ((prov_key, json.dumps(provenance, sort_keys=True)), (thr_key, str(record["threshold"]))):
        if key in props:
            props[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)
    atomic_write(out, model.SerializeToString())


def _write_engine(src: Path, out: Path, record: dict[str, Any]) -> None:
    from ferret_runtime import sidecar

    side = sidecar.read(src)  # checked before anything is written
    provenance = dict(side.meta.get("provenance", {}))
    provenance[CALIBRATION_KEY] = record
    shutil.copyfile(src, out)
    sidecar.rewrite(src, out, {PREFIX + "provenance": json.dumps(provenance, sort_keys=True),
                               PREFIX + "threshold": str(record["threshold"])})
