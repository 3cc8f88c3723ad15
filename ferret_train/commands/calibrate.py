"""``ferret calibrate``: fit a logit scaling and a decision threshold on labelled images, and write a
copy of the model that carries them (checkpoint, ONNX metadata or engine sidecar)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from ferret_runtime.commands import HelpFormatter

from ..calibration import AUC_WARN, MIN_PER_CLASS, RULES, SCALINGS
from .eval import add_model_arguments, open_options

HELP = "fit a decision threshold (target FPR, max accuracy or EER) and temperature/Platt scaling on labelled images"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help=HELP, description=HELP + "; writes a new model file that carries them, so detect, serve "
        "and Triton exports use them. prob_fake = sigmoid(logit / T) (temperature) or sigmoid(a * logit + b) "
        "(Platt); the label is 'fake' when prob_fake > threshold; the raw logit stays the model's.",
        formatter_class=HelpFormatter,
        epilog=f"Data: a ForenSynths-layout folder (all subsets pooled), at least {MIN_PER_CLASS} images per class, "
               "and for --rule fpr at least 1/target-fpr real images (100 for 1%). Calibrate on images the model "
               "was not trained on, and evaluate on others (--eval-data). Both scalings are fitted to Platt's "
               "targets ((n+1)/(n+2) fake, 1/(n+2) real), so logits that separate the data perfectly still get a "
               "finite fit (with a warning that says so).\n"
               "Outputs: -o, --json, --plot (and an engine's sidecar) must each be a new path: not an input (by "
               "file identity, so a hard link or symlink to the model counts), not another output, not inside "
               "--data or --eval-data; they are checked before any work and written only after the fit succeeds.\n"
               f"Warnings (stderr, one line each; the model is still written): ROC AUC below {AUC_WARN} on --data "
               "(the logits barely separate the classes), or perfect separation (the threshold's error rates are "
               "then only bounded). A ROC AUC <= 0.5 is refused whatever --scaling.\n"
               "Exit status: 0 written (with any warnings); 2 refused: bad input or options, one line on stderr, "
               "and nothing written or overwritten; 130 interrupted (every file is written atomically: whole or "
               "not at all).\nExample:\n  ferret calibrate -w best.pt "
               "--data val/ --target-fpr 0.01 -o best-cal.pt --eval-data test/",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", "-w", help="PyTorch checkpoint")
    src.add_argument("--model", "-m", help="model file: .onnx or .engine (with its sidecar)")
    p.add_argument("--data", "-d", required=True, help="calibration images in the ForenSynths layout")
    p.add_argument("--output", "-o", required=True, metavar="OUT",
                   help="the calibrated model (same suffix as the input)")
    p.add_argument("--rule", choices=RULES, default="fpr",
                   help="fpr: highest TPR with FPR on real images <= --target-fpr; accuracy: maximum accuracy; "
                        "eer: equal error rate")
    p.add_argument("--target-fpr", type=float, default=0.01, metavar="Q", help="false-positive rate of --rule fpr")
    p.add_argument("--scaling", choices=SCALINGS, default="temperature", help="how the logit is calibrated")
    p.add_argument("--eval-data", default=None, metavar="DIR",
                   help="held-out images: before/after reported on them too")
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


def pooled(root: str) -> tuple[list, Any]:
    """Every labelled image under ``root`` (all subsets pooled) and their labels; both classes required."""
    import numpy as np

    from ..data import find_subsets
    from .eval import check_classes

    subsets = find_subsets(root, {"0_real": 0, "1_fake": 1})
    samples = [s for v in subsets.values() for s in v]
    check_classes({Path(root).name: samples}, root)
    return samples, np.array([s.label for s in samples])




def check_paths(args: argparse.Namespace, outputs: dict[str, Path]) -> None:
    """Refuse, before any work, an output that is an input (by file identity), another output, a
    folder, or inside a data folder: a refused or finished run never overwrites what it reads."""
    from ferret_runtime import sidecar
    from ferret_runtime.errors import ConfigError

    from ..calibration import same_file

    model = Path(args.weights or args.model)
    inputs = {f"--{'weights' if args.weights else 'model'} {args.weights or args.model}": model}
    if model.suffix.lower() == ".engine":
        inputs[f"the sidecar {sidecar.path(model)} of --model"] = sidecar.path(model)
    folders = {f"--data {args.data}": Path(args.data)}
    if args.eval_data:
        folders[f"--eval-data {args.eval_data}"] = Path(args.eval_data)
    seen = dict(inputs)
    for name, path in outputs.items():
        if path.is_dir():
            raise ConfigError(f"Received {name}, a folder; expected a file path")
        for other, taken in seen.items():
            if same_file(path, taken):
                raise ConfigError(f"Received {name}, the same file as {other}; expected a path of its own "
                                  "(an input or another output is never overwritten)")
        for other, folder in folders.items():
            if folder.resolve() in path.resolve().parents:
                raise ConfigError(f"Received {name}, inside {other}; expected a path outside the data (an image "
                                  "written there would join the data)")
        seen[name] = path


def _outputs(args: argparse.Namespace, out: Path) -> tuple[dict[str, Path], Path, Path]:
    """Every file the run writes, named as the user would recognise it; and the report and diagram paths."""
    from ferret_runtime import sidecar

    json_path = Path(args.json) if args.json else out.with_name(out.name + ".calibration.json")
    plot = Path(args.plot) if args.plot else out.with_name(out.name + ".reliability.png")
    named = {f"-o {args.output}": out}
    if out.suffix.lower() == ".engine":
        named[f"the sidecar {sidecar.path(out)} of -o"] = sidecar.path(out)
    named[f"--json {args.json}" if args.json else f"the report {json_path} (--json's default)"] = json_path
    named[f"--plot {args.plot}" if args.plot else f"the diagram {plot} (--plot's default)"] = plot
    return named, json_path, plot


def run(args: argparse.Namespace) -> int:
    from ferret_runtime.errors import ConfigError

    from .. import calibration as cal

    model, out = Path(args.weights or args.model), Path(args.output)
    if args.bootstrap < 0:
        raise ConfigError(f"Received --bootstrap {args.bootstrap}; expected >= 0")
    named, json_path, plot = _outputs(args, out)
    check_paths(args, named)
    cal.model_writer(model, out)  # -o's suffix, before the images are read
    samples, y = pooled(args.data)
    cal.check_counts(int((y == 0).sum()), int((y == 1).sum()), args.rule, args.target_fpr, args.data)
    held = pooled(args.eval_data) if args.eval_data else None
    data = cal.data_record(samples, args.data)
    if held is not None and cal.same_data({"data": data}, held[0], args.eval_data):
        print(f"[calibrate] warning: --eval-data {args.eval_data} holds the same images as --data {args.data}; "
              "the 'held-out' numbers are not held out", file=sys.stderr)
    before, logits, held_logits = _predict(args, model, samples, held)
    fit = cal.calibrate(logits, y, scaling=args.scaling, rule=args.rule, target_fpr=args.target_fpr,
                        n_resamples=args.bootstrap, seed=args.seed, source=args.data)
    columns = {"before": cal.metrics(logits, y, *before[:2]),
               "after": cal.metrics(logits, y, fit.scaling, fit.threshold)}
    if held:
        columns["held-out before"] = cal.metrics(held_logits, held[1], *before[:2])
        columns["held-out after"] = cal.metrics(held_logits, held[1], fit.scaling, fit.threshold)
    warnings = cal.fit_warnings(fit, logits, y, args.data)
    if args.bootstrap and not all(math.isfinite(v) for v in fit.threshold_ci):
        warnings.append("the bootstrap interval is undefined (resamples without one class)")
    _summary(args, model, fit, data, columns)
    for line in warnings:
        print(f"[calibrate] warning: {line}", file=sys.stderr)
    record = {"scaling": fit.scaling.to_dict(), "threshold": fit.threshold, "threshold_ci": list(fit.threshold_ci),
              "rule": fit.rule, "target_fpr": fit.target_fpr, "crop": before[2], "data": data,
              "separation": fit.separation.to_dict()}
    report = {"model": str(model), "output": str(out), "metrics": columns, "eval_data": args.eval_data,
              "warnings": warnings}
    probs = {"before": cal.sigmoid(before[0].apply(logits)), "after": cal.sigmoid(fit.scaling.apply(logits))}
    _write(model, (out, json_path, plot), record, report, (y, probs, f"{model.name} on {Path(args.data).name}"))
    return 0


def _predict(args: argparse.Namespace, model: Path, samples: list, held: tuple | None) -> tuple[tuple, Any, Any]:
    """The model's (scaling, threshold, crop) as it stands, and its logits on --data and --eval-data."""
    from tqdm import tqdm

    from ferret_runtime import Detector

    from .eval import warn_if_calibrated_on

    n = len(samples) + (len(held[0]) if held else 0)
    with Detector.open(model, **open_options(args, tiles=False)) as det, \
            tqdm(total=n, unit="img", file=sys.stderr, disable=None, leave=False) as bar:
        warn_if_calibrated_on(det, samples, args.data, "calibrate")
        before = det.scaling, det.threshold, det.preprocess.crop
        return before, _logits(det, samples, bar), _logits(det, held[0], bar) if held else None


def _write(model: Path, paths: tuple[Path, Path, Path], record: dict, report: dict, diagram: tuple) -> None:
    """Render the diagram, then write the model, the report and the diagram, each atomically: nothing
    is written until everything is computed, so a failure leaves every existing file as it was."""
    import json

    from ferret_runtime import __version__
    from ferret_runtime.fileio import atomic_write, sha256

    from ..calibration import write_calibrated
    from ..reliability import reliability_png

    out, json_path, plot = paths
    y, probs, title = diagram
    png = reliability_png(y, probs, f"{title} ({len(y)} images)")
    record = {**record, "source_model": model.name, "source_sha256": sha256(model), "toolkit_version": __version__}
    write_calibrated(model, out, record)
    atomic_write(json_path, (json.dumps({**report, "calibration": record}, indent=2, allow_nan=True) + "\n").encode())
    atomic_write(plot, png)
    print(f"[calibrate] wrote {out}, {json_path}, {plot}")


def _summary(args: argparse.Namespace, model: Path, fit: Any, data: dict[str, Any], columns: dict) -> None:
    """What was fitted, on what, and the before/after table (stdout)."""
    from .. import calibration as cal

    s = fit.scaling
    how = {"temperature": f"temperature T = {s.temperature:.4f}", "platt": f"Platt a = {s.a:.4f}, b = {s.b:.4f}",
           "none": "no scaling"}[s.method]
    rule = (f"FPR <= {args.target_fpr:g}" if args.rule == "fpr"
            else {"accuracy": "max accuracy", "eer": "EER"}[args.rule])
    ci = f" (95% CI {fit.threshold_ci[0]:.4f}..{fit.threshold_ci[1]:.4f}, {args.bootstrap} bootstrap resamples)" \
        if args.bootstrap else ""
    print(f"[calibrate] {model.name} on {args.data}: {data['n_real']} real, {data['n_fake']} fake "
          f"(sha256 {data['sha256'][:12]}); ROC AUC {fit.separation.auc:.4f}")
    print(f"[calibrate] scaling: {how}; threshold ({rule}): prob_fake > {fit.threshold:.4f}{ci}")
    print(cal.format_report(columns))
