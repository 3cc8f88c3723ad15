"""Evaluation as the original SynTester: per subset ACC at 0.5, AP, real ACC, fake ACC (in %), and the
mean; with TPR at FPR 1%, and the same under degradations (``sweep``) and by file format."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ferret_runtime.errors import ImageError

from .data import Sample

METRICS = ("acc", "ap", "r_acc", "f_acc", "tpr1")  # tpr1: TPR (%) at FPR <= 1%


def compute_metrics(y_true: np.ndarray, y_prob: np.ndarray, y_score: np.ndarray | None = None,
                    threshold: float = 0.5) -> dict[str, float]:
    """The original's numbers (float32 probabilities, fake when > ``threshold``: 0.5 as the paper) and TPR at FPR 1%,
    ranked by ``y_score`` (the logits: probabilities tie at 1.0 in float32) or else ``y_prob``; NaN where a class is
    absent."""
    from sklearn.metrics import accuracy_score, average_precision_score

    from .calibration import tpr_at_fpr

    y_true = np.asarray(y_true, dtype=np.float32)
    y_prob = np.asarray(y_prob, dtype=np.float32)
    real, fake = y_true == 0, y_true == 1
    both = bool(real.any() and fake.any())
    return {
        "acc": 100.0 * accuracy_score(y_true, y_prob > threshold),
        "ap": 100.0 * average_precision_score(y_true, y_prob) if both else math.nan,
        "r_acc": 100.0 * accuracy_score(y_true[real], y_prob[real] > threshold) if real.any() else math.nan,
        "f_acc": 100.0 * accuracy_score(y_true[fake], y_prob[fake] > threshold) if fake.any() else math.nan,
        "tpr1": 100.0 * tpr_at_fpr(y_true, y_prob if y_score is None else y_score, 0.01) if both else math.nan,
        "n": int(len(y_true)),
    }


def summarize(per_subset: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean over subsets (the paper's 'mean ACC/AP')."""
    return {m: float(np.nanmean([r[m] for r in per_subset.values()])) for m in METRICS} | \
        {"n": sum(r["n"] for r in per_subset.values())}


def evaluate_with_detector(detector, subsets: dict[str, list[Sample]], progress: Callable[[int], None] | None = None,
                           threshold: float = 0.5
                           ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, np.ndarray]]]:
    """Metrics and raw predictions per subset with any runtime backend; an unreadable image is an error."""
    return evaluate_pairs(detector,
                          {name: [(str(s.path), s.path) for s in samples] for name, samples in subsets.items()},
                          {name: [s.label for s in samples] for name, samples in subsets.items()}, progress, threshold)


def evaluate_pairs(detector, pairs: dict[str, Iterable[tuple[str, Any]]], labels: dict[str, list[int]],
                   progress: Callable[[int], None] | None = None, threshold: float = 0.5
                   ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, np.ndarray]]]:
    """As ``evaluate_with_detector`` for (name, input) pairs per subset: paths, or decoded arrays."""
    metrics, preds = {}, {}
    for name, items in pairs.items():
        results = predict_all(detector, items, progress)
        y_true = np.array(labels[name], np.float32)
        y_prob = np.array([r.prob_fake for r in results], np.float32)
        y_logit = np.array([r.logit for r in results], np.float64)
        metrics[name] = compute_metrics(y_true, y_prob, y_logit, threshold)
        preds[name] = {"y_true": y_true, "y_prob": y_prob, "y_logit": y_logit}
    return metrics, preds


def predict_all(detector, pairs: Iterable[tuple[str, Any]], progress: Callable[[int], None] | None = None) -> list:
    """The Detector's Results for (name, input) pairs, in order; an unreadable image is an error, not a row."""
    out = []
    for r, _ in detector.predict_named(pairs):
        if r.error is not None:
            raise ImageError(r.error)
        out.append(r)
        progress and progress(1)
    return out


def format_table(per_subset: dict[str, dict[str, float]]) -> str:
    """A terminal table, one row per subset and the mean."""
    width = max([len(k) for k in per_subset] + [6])
    lines = [f"{'subset':<{width}}  {'images':>6}  {'ACC':>7}  {'AP':>7}  {'R_ACC':>7}  {'F_ACC':>7}  {'TPR@1%':>7}"]
    rows = list(per_subset.items()) + [("mean", summarize(per_subset))]
    for name, r in rows:
        if name == "mean":
            lines.append("-" * len(lines[0]))
        lines.append(f"{name:<{width}}  {r['n']:>6}  " + "  ".join(f"{r[m]:7.2f}" for m in METRICS))
    return "\n".join(lines)


def save_report(path: Path, per_subset: dict[str, dict[str, float]], extra: dict[str, Any]) -> None:
    from ferret_runtime.fileio import atomic_write

    doc = {"subsets": per_subset, "mean": summarize(per_subset), **extra}
    text = json.dumps(doc, indent=2, allow_nan=True)
    atomic_write(path, lambda f: f.write(text.encode()))


def plot_pr(path: Path, preds: dict[str, dict[str, np.ndarray]], title: str) -> None:
    """Precision-recall curves, one per subset, with AP in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig, ax = plt.subplots(figsize=(6, 5))
    for name, p in preds.items():
        if len(np.unique(p["y_true"])) < 2:
            continue
        prec, rec, _ = precision_recall_curve(p["y_true"], p["y_prob"])
        ax.plot(rec, prec, label=f"{name} (AP {100 * average_precision_score(p['y_true'], p['y_prob']):.1f})")
    ax.set(xlabel="recall (fake)", ylabel="precision (fake)", xlim=(0, 1.01), ylim=(0, 1.01), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
