"""Evaluation as the original SynTester: per subset ACC at 0.5, AP, real ACC, fake ACC (in %), and the mean."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ferret_runtime.errors import ImageError

from .data import Sample

METRICS = ("acc", "ap", "r_acc", "f_acc")


def compute_metrics(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, float]:
    """The original's numbers (float32 probabilities, threshold > 0.5); NaN where a class is absent."""
    from sklearn.metrics import accuracy_score, average_precision_score

    y_true = np.asarray(y_true, dtype=np.float32)
    y_prob = np.asarray(y_prob, dtype=np.float32)
    real, fake = y_true == 0, y_true == 1
    both = bool(real.any() and fake.any())
    return {
        "acc": 100.0 * accuracy_score(y_true, y_prob > 0.5),
        "ap": 100.0 * average_precision_score(y_true, y_prob) if both else math.nan,
        "r_acc": 100.0 * accuracy_score(y_true[real], y_prob[real] > 0.5) if real.any() else math.nan,
        "f_acc": 100.0 * accuracy_score(y_true[fake], y_prob[fake] > 0.5) if fake.any() else math.nan,
        "n": int(len(y_true)),
    }


def summarize(per_subset: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean over subsets (the paper's 'mean ACC/AP')."""
    return {m: float(np.nanmean([r[m] for r in per_subset.values()])) for m in METRICS} | \
        {"n": sum(r["n"] for r in per_subset.values())}


def evaluate_with_detector(detector, subsets: dict[str, list[Sample]], progress: Callable[[int], None] | None = None
                           ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, np.ndarray]]]:
    """Metrics and raw predictions per subset with any runtime backend; an unreadable image is an error."""
    metrics, preds = {}, {}
    for name, samples in subsets.items():
        probs = []
        for r, _ in detector.predict_iter([s.path for s in samples]):
            if r.error is not None:
                raise ImageError(r.error)
            probs.append(r.prob_fake)
            progress and progress(1)
        y_true = np.array([s.label for s in samples], np.float32)
        y_prob = np.array(probs, np.float32)
        metrics[name] = compute_metrics(y_true, y_prob)
        preds[name] = {"y_true": y_true, "y_prob": y_prob}
    return metrics, preds


def format_table(per_subset: dict[str, dict[str, float]]) -> str:
    """A terminal table, one row per subset and the mean."""
    width = max([len(k) for k in per_subset] + [6])
    lines = [f"{'subset':<{width}}  {'images':>6}  {'ACC':>7}  {'AP':>7}  {'R_ACC':>7}  {'F_ACC':>7}"]
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
