"""Degradations for robustness sweeps: JPEG re-encoding, resizing, Gaussian blur, Gaussian noise.

Each is applied to a decoded uint8 HxWx3 image, real and fake alike, before the model's own
preprocessing; strength 0 means "untouched" for every kind (the plain protocol). Deterministic:
the noise of one image depends only on the seed and the image's name.
"""

from __future__ import annotations

import io
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from ferret_runtime.errors import ConfigError


@dataclass(frozen=True)
class Kind:
    """One perturbation: the range of its strength (0 always allowed: none) and what it means."""

    lo: float
    hi: float
    integer: bool
    unit: str


KINDS: dict[str, Kind] = {
    "jpeg": Kind(1, 100, True, "JPEG quality (Pillow, 4:2:0)"),
    "resize": Kind(0.05, 8.0, False, "scale factor (bicubic)"),
    "blur": Kind(0.1, 20.0, False, "Gaussian sigma in pixels"),
    "noise": Kind(0.1, 255.0, False, "Gaussian noise sigma in 8-bit levels"),
}


def parse_spec(text: str) -> tuple[str, list[float]]:
    """``"jpeg=95,75"`` -> ``("jpeg", [95.0, 75.0])``, every strength checked against its kind's range."""
    name, sep, values = text.partition("=")
    name = name.strip().lower()
    if name not in KINDS:
        raise ConfigError(f"Received perturbation {name!r} (in {text!r}); expected one of {', '.join(KINDS)}")
    if not sep or not values.strip():
        raise ConfigError(f"Received --perturb {text!r}; expected {name}=S1,S2,... (e.g. jpeg=95,75,50)")
    kind, out = KINDS[name], []
    for raw in values.split(","):
        try:
            s = float(raw)
        except ValueError:
            raise ConfigError(f"Received {name} strength {raw.strip()!r}; expected a number") from None
        if s != 0 and not (kind.lo <= s <= kind.hi and (not kind.integer or s.is_integer())):
            raise ConfigError(f"Received {name} strength {raw.strip()}; expected 0 (none) or "
                              f"{'an integer ' if kind.integer else ''}{kind.lo:g}..{kind.hi:g} ({kind.unit})")
        out.append(s)
    return name, sorted(set(out))


def parse_specs(texts: list[str]) -> dict[str, list[float]]:
    """Several ``--perturb`` values; a kind named twice is an error, not a silent override."""
    specs: dict[str, list[float]] = {}
    for t in texts:
        name, strengths = parse_spec(t)
        if name in specs:
            raise ConfigError(f"Received perturbation {name!r} twice; "
                              "expected each kind once (strengths comma-separated)")
        specs[name] = strengths
    return specs


def seed_for(name: str, seed: int) -> np.random.Generator:
    """A generator that depends only on the image's name and the seed (not on order or threads)."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def apply(img: np.ndarray, kind: str, strength: float, *, name: str = "", seed: int = 0) -> np.ndarray:
    """The perturbed copy of a uint8 HxWx3 image (the image itself for strength 0)."""
    if strength == 0:
        return img
    if kind == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(strength))
        return np.asarray(Image.open(buf).convert("RGB"))
    if kind == "resize":
        h, w = img.shape[:2]
        size = (max(1, round(w * strength)), max(1, round(h * strength)))
        return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BICUBIC))
    if kind == "blur":
        return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=strength)))
    if kind == "noise":
        noise = seed_for(name, seed).normal(0.0, strength, img.shape)
        return np.clip(np.rint(img.astype(np.float64) + noise), 0, 255).astype(np.uint8)
    raise ConfigError(f"Received perturbation {kind!r}; expected one of {', '.join(KINDS)}")


def bounded_map(fn: Callable[[Any], Any], items: Iterable[Any], pool: Executor, ahead: int) -> Iterator[Any]:
    """``pool.map`` that keeps at most ``ahead`` results in memory (it submits everything at once)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ------------------------------------------------------------------------------------ sweeps
def _pairs(samples: list, kind: str, strength: float, seed: int, pool: Executor, ahead: int
           ) -> Iterator[tuple[str, Any]]:
    """(name, input) pairs for the Detector: the paths themselves at strength 0 (the plain protocol),
    else the decoded images perturbed on ``pool``, at most ``ahead`` in memory."""
    from ferret_runtime.preprocess import load_image

    if strength == 0:
        return ((str(s.path), s.path) for s in samples)

    def one(s: Any) -> tuple[str, Any]:
        # an unreadable image raises ImageError here, and again in the caller's thread: as without --perturb
        return str(s.path), apply(load_image(s.path, str(s.path)), kind, strength, name=s.path.name, seed=seed)

    return bounded_map(one, samples, pool, ahead)


def sweep(detector: Any, subsets: dict[str, list], specs: dict[str, list[float]], *, seed: int = 0,
          progress: Callable[[int], None] | None = None, workers: int = 4, threshold: float = 0.5
          ) -> dict[str, dict[float, tuple[dict[str, dict[str, float]], dict[str, dict[str, np.ndarray]]]]]:
    """For each perturbation and strength (0 first, run once and shared): (metrics, predictions) per subset."""
    from concurrent.futures import ThreadPoolExecutor

    from .evaluate import evaluate_pairs

    labels = {name: [s.label for s in samples] for name, samples in subsets.items()}
    done: dict[tuple[str, float], Any] = {}
    out: dict[str, dict[float, Any]] = {}
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="ferret-perturb") as pool:
        for kind, strengths in specs.items():
            out[kind] = {}
            for s in sorted(set([0.0, *strengths])):
                key = ("", 0.0) if s == 0 else (kind, s)
                if key not in done:
                    pairs = {name: _pairs(samples, kind, s, seed, pool, 4 * detector.batch_size)
                             for name, samples in subsets.items()}
                    done[key] = evaluate_pairs(detector, pairs, labels, progress, threshold)
                out[kind][s] = done[key]
    return out


def format_sweep(results: dict[str, dict[float, Any]]) -> str:
    """One block per perturbation: a row per strength and subset (and their mean)."""
    from .evaluate import METRICS, summarize

    lines = []
    for kind, by_strength in results.items():
        lines.append(f"perturbation {kind} ({KINDS[kind].unit}; 0 = none)")
        names = list(next(iter(by_strength.values()))[0])
        width = max([len(n) for n in names] + [6])
        lines.append(f"  {'strength':>8}  {'subset':<{width}}  {'ACC':>7}  {'AP':>7}  {'R_ACC':>7}  {'F_ACC':>7}  "
                     f"{'TPR@1%':>7}")
        for s, (metrics, _) in by_strength.items():
            rows = list(metrics.items()) + ([("mean", summarize(metrics))] if len(metrics) > 1 else [])
            for name, r in rows:
                lines.append(f"  {s:>8g}  {name:<{width}}  " + "  ".join(f"{r[m]:7.2f}" for m in METRICS))
    return "\n".join(lines)


def sweep_json(results: dict[str, dict[float, Any]]) -> dict[str, Any]:
    """{kind: {strength: {"subsets": {...}, "mean": {...}}}} (strengths as JSON keys, e.g. "75")."""
    from .evaluate import summarize

    return {kind: {f"{s:g}": {"subsets": m, "mean": summarize(m)} for s, (m, _) in by_strength.items()}
            for kind, by_strength in results.items()}


def plot_sweep(path: Any, kind: str, by_strength: dict[float, Any], title: str) -> None:
    """ACC and AP against strength, a line per subset (and the mean, dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluate import summarize

    strengths = list(by_strength)
    names = list(by_strength[strengths[0]][0])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, metric, label in zip(axes, ("acc", "ap", "tpr1"), ("ACC (%)", "AP (%)", "TPR at FPR 1% (%)")):
        for name in names:
            ax.plot(strengths, [by_strength[s][0][name][metric] for s in strengths], marker="o", label=name)
        if len(names) > 1:
            ax.plot(strengths, [summarize(by_strength[s][0])[metric] for s in strengths], "k--", label="mean")
        ax.set(xlabel=f"{kind}: {KINDS[kind].unit} (0 = none)", ylabel=label, ylim=(0, 101))
        ax.grid(alpha=0.3)
    if kind == "jpeg":  # quality falls as the sweep goes right: read it as "more compression"
        for ax in axes:
            ax.set_xticks(strengths)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------ format shortcut
def source_format(path: Any) -> str:
    """The file's format from its header (Pillow), e.g. PNG, JPEG, WEBP."""
    with Image.open(path) as im:
        return str(im.format)


def format_check(subsets: dict[str, list], plain: dict[str, dict[str, np.ndarray]],
                 reencoded: dict[str, dict[str, np.ndarray]], quality: int, threshold: float = 0.5) -> dict[str, Any]:
    """ACC, R_ACC, F_ACC by source file format, as is and with every image re-encoded as JPEG at
    ``quality``: a detector that learned "PNG = fake" loses its fake accuracy on re-encoded PNGs."""
    from .evaluate import compute_metrics

    fmt, y, p0, p1 = [], [], [], []
    for name, samples in subsets.items():
        fmt += [source_format(s.path) for s in samples]
        y.append(plain[name]["y_true"])
        p0.append(plain[name]["y_prob"])
        p1.append(reencoded[name]["y_prob"])
    fmt_a, y_a, p0_a, p1_a = np.array(fmt), np.concatenate(y), np.concatenate(p0), np.concatenate(p1)
    out: dict[str, Any] = {"quality": quality, "formats": {}}
    for f in sorted(set(fmt)):
        m = fmt_a == f
        row = {"n_real": int((y_a[m] == 0).sum()), "n_fake": int((y_a[m] == 1).sum())}
        for tag, p in (("as_is", p0_a), ("reencoded", p1_a)):
            r = compute_metrics(y_a[m], p[m], threshold=threshold)
            row[tag] = {k: r[k] for k in ("acc", "r_acc", "f_acc")}
        out["formats"][f] = row
    return out


def format_check_table(check: dict[str, Any]) -> str:
    """The format check as lines, with a note where a format holds one class only (the confound)."""
    q = check["quality"]
    lines = [f"format check (all subsets; re-encoded: every image saved as JPEG quality {q} first)",
             f"  {'format':<6}  {'real':>5}  {'fake':>5}  {'ACC':>7}  {'R_ACC':>7}  {'F_ACC':>7}  |  "
             f"{'ACC':>7}  {'R_ACC':>7}  {'F_ACC':>7}  (re-encoded)"]
    notes = []
    for f, row in check["formats"].items():
        a, b = row["as_is"], row["reencoded"]
        lines.append(f"  {f:<6}  {row['n_real']:>5}  {row['n_fake']:>5}  " +
                     "  ".join(f"{a[k]:7.2f}" for k in ("acc", "r_acc", "f_acc")) + "  |  " +
                     "  ".join(f"{b[k]:7.2f}" for k in ("acc", "r_acc", "f_acc")))
        if len(check["formats"]) > 1 and (row["n_real"] == 0 or row["n_fake"] == 0):
            notes.append(f"  note: {f} files are all {'fake' if row['n_real'] == 0 else 'real'}: the format alone "
                         "separates the classes here; trust the re-encoded columns")
    return "\n".join(lines + notes)
