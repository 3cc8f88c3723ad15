"""``ferret compare``: several model files (checkpoint, ONNX FP32/FP16/INT8, engine) on the same
labelled images: accuracy, decision flips and logit differences against the first, throughput."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ferret_runtime.commands import HelpFormatter
from ferret_runtime.tiling import add_tile_arguments

from .eval import add_model_arguments, open_options

HELP = "run several model files on the same labelled images: ACC/AP, decision flips and |logit| differences " \
       "against the first, throughput"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help=HELP, description=HELP + ". A file whose backend cannot run here (an .engine without "
        "TensorRT) is a row saying why.", formatter_class=HelpFormatter,
        epilog="Labels are each model's own (its threshold and calibration); flips count images whose label differs "
               "from the first file's. \nExample:\n  ferret compare best.pt s.onnx s-fp16.onnx s-int8.onnx s.engine "
               "--data test/ --json compare.json")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model files; the first is the reference")
    p.add_argument("--data", "-d", required=True, help="labelled images in the ForenSynths layout (subsets pooled)")
    p.add_argument("--json", default=None, metavar="OUT", help="the table as JSON, with every flipped image")
    p.add_argument("--plot", default=None, metavar="PNG", help="bar charts (default: beside --json)")
    p.add_argument("--show-flips", type=int, default=10, metavar="N", help="flipped images listed per model")
    add_model_arguments(p)
    add_tile_arguments(p)
    p.set_defaults(func=run)


def run_one(path: str, samples: list, options: dict[str, Any], progress: Any) -> dict[str, Any]:
    """One model over the samples: its logits, labels and timing, or the reason it could not run."""
    from ferret_runtime import Detector
    from ferret_runtime.errors import FerretError, ImageError

    from ..evaluate import predict_all

    row: dict[str, Any] = {"model": path}
    try:
        det = Detector.open(path, **options)
    except ImageError:
        raise
    except (FerretError, ImportError, OSError) as e:  # a backend not installed here, a GPU it needs, a bad file
        row["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
        return row
    with det:
        row["backend"] = det.backend.name
        start = time.perf_counter()
        results = predict_all(det, [(str(s.path), s.path) for s in samples], progress)
        row["seconds"] = time.perf_counter() - start
    row["logit"] = np.array([r.logit for r in results], np.float64)
    row["prob"] = np.array([r.prob_fake for r in results], np.float64)
    row["fake"] = np.array([r.label == "fake" for r in results])
    return row


def summarize(rows: list[dict[str, Any]], samples: list, root: str | Path) -> tuple[list[dict[str, Any]], str | None]:
    """ACC, AP, images/s per row; flips and |Δlogit| against the first row that ran."""
    from sklearn.metrics import accuracy_score, average_precision_score

    y = np.array([s.label for s in samples])
    names = [s.path.relative_to(root).as_posix() for s in samples]
    ref = next((r for r in rows if "error" not in r), None)
    out = []
    for r in rows:
        if "error" in r:
            out.append({"model": r["model"], "error": r["error"]})
            continue
        d = np.abs(r["logit"] - ref["logit"])
        flipped = np.flatnonzero(r["fake"] != ref["fake"])
        out.append({"model": r["model"], "backend": r["backend"], "acc": 100.0 * accuracy_score(y, r["fake"]),
                    "ap": 100.0 * average_precision_score(y, r["logit"]), "flips": int(flipped.size),
                    "flipped": [names[i] for i in flipped], "max_dlogit": float(d.max()),
                    "p99_dlogit": float(np.percentile(d, 99)), "images_per_s": len(y) / r["seconds"]})
    return out, ref["model"] if ref else None


def format_table(rows: list[dict[str, Any]], show: int) -> str:
    width = max([len(Path(r["model"]).name) for r in rows] + [5])
    lines = [f"{'model':<{width}}  {'backend':<11}  {'ACC':>6}  {'AP':>6}  {'flips':>5}  {'max|Δlogit|':>11}  "
             f"{'p99|Δlogit|':>11}  {'img/s':>7}"]
    for r in rows:
        name = Path(r["model"]).name
        if "error" in r:
            lines.append(f"{name:<{width}}  not run: {r['error']}")
            continue
        lines.append(f"{name:<{width}}  {r['backend']:<11}  {r['acc']:6.2f}  {r['ap']:6.2f}  {r['flips']:>5}  "
                     f"{r['max_dlogit']:11.3g}  {r['p99_dlogit']:11.3g}  {r['images_per_s']:7.1f}")
    for r in rows:
        if r.get("flips"):
            more = f" ... and {r['flips'] - show} more" if r["flips"] > show else ""
            lines.append(f"flips of {Path(r['model']).name}: {', '.join(r['flipped'][:show])}{more}")
    return "\n".join(lines)


def plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """ACC and AP, images/s, and max/p99 |Δlogit|, one bar group per model that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in rows if "error" not in r]
    x, labels = np.arange(len(ran)), [Path(r["model"]).name for r in ran]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, keys, ylabel in ((axes[0], ("acc", "ap"), "%"), (axes[1], ("images_per_s",), "images/s"),
                             (axes[2], ("max_dlogit", "p99_dlogit"), "|Δlogit| vs the first")):
        w = 0.8 / len(keys)
        for j, k in enumerate(keys):
            ax.bar(x + (j - (len(keys) - 1) / 2) * w, [r[k] for r in ran], w, label=k)
        ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        if len(keys) > 1:
            ax.legend(fontsize=8)
    if any(r["max_dlogit"] > 0 for r in ran):
        axes[2].set_yscale("symlog", linthresh=1e-4)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ferret_runtime.errors import ConfigError
    from ferret_runtime.fileio import atomic_write

    from .calibrate import pooled

    if args.show_flips < 0:
        raise ConfigError(f"Received --show-flips {args.show_flips}; expected >= 0")
    samples, _ = pooled(args.data)
    options = open_options(args)
    rows = []
    with tqdm(total=len(samples) * len(args.models), unit="img", file=sys.stderr, disable=None, leave=False) as bar:
        for m in args.models:
            rows.append(run_one(m, samples, options, bar.update))
    table, ref = summarize(rows, samples, args.data)
    if ref is None:
        reasons = "; ".join(f"{r['model']}: {r['error']}" for r in table)
        raise ConfigError(f"Received {len(rows)} model files, none of which runs here; "
                          f"expected at least one ({reasons})")
    print(f"[compare] {len(samples)} images from {args.data}; flips and |Δlogit| against {Path(ref).name}")
    print(format_table(table, args.show_flips))
    if args.json:
        doc = {"data": str(args.data), "images": len(samples), "reference": ref, "models": table}
        atomic_write(Path(args.json), (json.dumps(doc, indent=2) + "\n").encode())
        print(f"[compare] wrote {args.json}")
    out = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if out:
        plot(Path(out), table, f"{len(samples)} images from {Path(args.data).name}")
        print(f"[compare] wrote {out}")
    return 0
