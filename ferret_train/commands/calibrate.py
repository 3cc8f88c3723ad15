"""``ferret calibrate``: fit a logit scaling and a decision threshold on labelled images, and write a
copy of the model that carries them (checkpoint, ONNX metadata or engine sidecar)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ferret_runtime.commands import HelpFormatter

from ..calibration import MIN_PER_CLASS, RULES, SCALINGS
from .eval import add_model_arguments, open_options

HELP = "fit a decision threshold (target FPR, max accuracy or EER) and temperature/Platt scaling on labelled images"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help=HELP, description=HELP + "; writes a new model file that carries them, so detect, serve "
        "and Triton exports use them. prob_fake = sigmoid(logit / T) (temperature) or sigmoid(a * logit + b) "
        "(Platt); the label is 'fake' when prob_fake > threshold; the raw logit stays the model's.",
        formatter_class=HelpFormatter,
        epilog=f"Data: a ForenSynths-layout folder (all subsets pooled), at least {MIN_PER_CLASS} images per class, "
               "and for --rule fpr at least 1/target-fpr real images (100 for 1%%). Calibrate on images the model "
               "was not trained on, and evaluate on others (--eval-data). \nExample:\n  ferret calibrate -w best.pt "
               "--data val/ --target-fpr 0.01 -o best-cal.pt --eval-data test/",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", "-w", help="PyTorch checkpoint")
    src.add_argument("--model", "-m", help="model file: .onnx or .engine (with its sidecar)")
    p.add_argument("--data", "-d", required=True, help="calibration images in the ForenSynths layout")
    p.add_argument("--output", "-o", required=True, metavar="OUT", help="the calibrated model (same suffix as the input)")
    p.add_argument("--rule", choices=RULES, default="fpr",
                   help="fpr: highest TPR with FPR on real images <= --target-fpr; accuracy: maximum accuracy; "
                        "eer: equal error rate")
    p.add_argument("--target-fpr", type=float, default=0.01, metavar="Q", help="false-positive rate of --rule fpr")
    p.add_argument("--scaling", choices=SCALINGS, default="temperature", help="how the logit is calibrated")
    p.add_argument("--eval-data", default=None, metavar="DIR", help="held-out images: before/after reported on them too")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="resamples for the threshold's 95%% confidence interval (0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--json", default=None, metavar="J", help="the report as JSON (default: OUT.calibration.json)")
    p.add_argument("--plot", default=None, metavar="PNG", help="reliability diagram (default: OUT.reliability.png)")
    add_model_arguments(p)
    p.set_defaults(func=run)


def _logits(det: Any, samples: list, bar: Any) -> Any:
    import numpy as np

    from ..evaluate import predict_all

    return np.array([r.logit for r in predict_all(det, [(str(s.path), s.path) for s in samples], bar.update)],
                    np.float64)


def _pooled(root: str) -> tuple[list, Any]:
    import numpy as np

    from ..data import find_subsets
    from .eval import _check_classes

    subsets = find_subsets(root, {"0_real": 0, "1_fake": 1})
    samples = [s for v in subsets.values() for s in v]
    _check_classes({Path(root).name: samples}, root)
    return samples, np.array([s.label for s in samples])


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ferret_runtime import Detector, __version__
    from ferret_runtime.errors import ConfigError
    from ferret_runtime.fileio import atomic_write, sha256

    from .. import calibration as cal
    from .eval import warn_if_calibrated_on

    model = Path(args.weights or args.model)
    out = Path(args.output)
    if args.bootstrap < 0:
        raise ConfigError(f"Received --bootstrap {args.bootstrap}; expected >= 0")
    samples, y = _pooled(args.data)
    cal.check_counts(int((y == 0).sum()), int((y == 1).sum()), args.rule, args.target_fpr, args.data)
    held = _pooled(args.eval_data) if args.eval_data else None
    if held is not None and cal.same_data({"data": cal.data_record(samples, args.data)}, held[0], args.eval_data):
        print(f"[calibrate] warning: --eval-data {args.eval_data} holds the same images as --data {args.data}; "
              "the 'held-out' numbers are not held out", file=sys.stderr)
    n = len(samples) + (len(held[0]) if held else 0)
    with Detector.open(model, **open_options(args, tiles=False)) as det, \
            tqdm(total=n, unit="img", file=sys.stderr, disable=None, leave=False) as bar:
        warn_if_calibrated_on(det, samples, args.data, "calibrate")
        before_scaling, before_threshold, crop = det.scaling, det.threshold, det.preprocess.crop
        logits = _logits(det, samples, bar)
        held_logits = _logits(det, held[0], bar) if held else None
    fit = cal.calibrate(logits, y, scaling=args.scaling, rule=args.rule, target_fpr=args.target_fpr,
                        n_resamples=args.bootstrap, seed=args.seed)
    columns = {"before": cal.metrics(logits, y, before_scaling, before_threshold),
               "after": cal.metrics(logits, y, fit.scaling, fit.threshold)}
    if held:
        columns["held-out before"] = cal.metrics(held_logits, held[1], before_scaling, before_threshold)
        columns["held-out after"] = cal.metrics(held_logits, held[1], fit.scaling, fit.threshold)
    data = cal.data_record(samples, args.data)
    record = {"scaling": fit.scaling.to_dict(), "threshold": fit.threshold, "threshold_ci": list(fit.threshold_ci),
              "rule": fit.rule, "target_fpr": fit.target_fpr, "crop": crop, "data": data,
              "source_model": model.name, "source_sha256": sha256(model), "toolkit_version": __version__}
    cal.write_calibrated(model, out, record)

    s = fit.scaling
    how = {"temperature": f"temperature T = {s.temperature:.4f}", "platt": f"Platt a = {s.a:.4f}, b = {s.b:.4f}",
           "none": "no scaling"}[s.method]
    rule = f"FPR <= {args.target_fpr:g}" if args.rule == "fpr" else {"accuracy": "max accuracy", "eer": "EER"}[args.rule]
    ci = f" (95% CI {fit.threshold_ci[0]:.4f}..{fit.threshold_ci[1]:.4f}, {args.bootstrap} bootstrap resamples)" \
        if args.bootstrap else ""
    print(f"[calibrate] {model.name} on {args.data}: {data['n_real']} real, {data['n_fake']} fake "
          f"(sha256 {data['sha256'][:12]})")
    print(f"[calibrate] scaling: {how}; threshold ({rule}): prob_fake > {fit.threshold:.4f}{ci}")
    print(cal.format_report(columns))
    report = {"model": str(model), "output": str(out), "calibration": record, "metrics": columns,
              "eval_data": args.eval_data}
    json_path = Path(args.json) if args.json else out.with_name(out.name + ".calibration.json")
    atomic_write(json_path, (json.dumps(report, indent=2, allow_nan=True) + "\n").encode())
    plot = Path(args.plot) if args.plot else out.with_name(out.name + ".reliability.png")
    probs = {"before": cal.sigmoid(before_scaling.apply(logits)), "after": cal.sigmoid(s.apply(logits))}
    cal.plot_reliability(plot, y, probs, f"{model.name} on {Path(args.data).name} ({len(y)} images)")
    print(f"[calibrate] wrote {out}, {json_path}, {plot}")
    if not all(math.isfinite(v) for v in fit.threshold_ci) and args.bootstrap:
        print("[calibrate] warning: the bootstrap interval is undefined (resamples without one class)", file=sys.stderr)
    return 0
