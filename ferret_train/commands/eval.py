"""``ferret eval``: the paper's metrics per subset of a ForenSynths-layout folder, optionally under
degradations (``--perturb``) and split by file format (``--format-check``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ferret_runtime.commands import HelpFormatter
from ferret_runtime.tiling import add_tile_arguments, tile_options

HELP = "evaluate a model on a ForenSynths-layout folder: ACC, AP, real/fake ACC per subset and mean"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """How eval, calibrate and compare open a model: crop, batch, device, LPD of old checkpoints."""
    p.add_argument("--crop", default="model", help="centre crop size, 'none' (full size) or 'model'")
    p.add_argument("--batch-size", "-b", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--lpd", default=None, help="LPD function for checkpoints that do not record it")
    p.add_argument("--window", type=int, default=None, help="LPD window for such checkpoints")


def open_options(args: argparse.Namespace, tiles: bool = True) -> dict[str, Any]:
    """``Detector.open`` keyword arguments from ``add_model_arguments`` (and the tile options)."""
    from ferret_runtime.errors import ConfigError
    from ferret_runtime.preprocess import parse_crop

    if args.batch_size < 1:
        raise ConfigError(f"Received --batch-size {args.batch_size}; expected >= 1")
    options = {k: v for k, v in (("lpd_func", args.lpd), ("window_size", args.window)) if v is not None}
    crop = "model" if args.crop == "model" else parse_crop(args.crop)
    return {"device": args.device, "crop": crop, "batch_size": args.batch_size, **options,
            **(tile_options(args) if tiles else {})}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help=HELP, description=HELP + " (as the original SynTester), and TPR at FPR 1%%.",
        formatter_class=HelpFormatter,
        epilog="Layout: ROOT/<subset>/[<class>/]0_real|1_fake/*.png|jpg...; each subset is scored "
               "separately, then the mean. \nPerturbations (applied to real and fake images alike, after decoding, "
               "before the model's preprocessing; strength 0 = none): jpeg=QUALITY (1..100), resize=FACTOR "
               "(0.05..8, bicubic), blur=SIGMA (0.1..20 px), noise=SIGMA (0.1..255 levels, seeded). "
               "\nExamples:\n  ferret eval -w best.pt --data ForenSynths --json eval.json"
               "\n  ferret eval -m s.onnx --data test/ --perturb jpeg=95,75,50,30 resize=0.5,0.75,1.5 blur=1,2 "
               "noise=2,5 --format-check --json robust.json",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", "-w", help="PyTorch checkpoint")
    src.add_argument("--model", "-m", help="any model file a backend supports (e.g. .onnx)")
    p.add_argument("--data", "-d", required=True, help="test root in the ForenSynths layout")
    add_model_arguments(p)
    add_tile_arguments(p)
    p.add_argument("--json", default=None, metavar="OUT", help="write the metrics as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="precision-recall curves (default: beside --json)")
    p.add_argument("--perturb", nargs="+", default=[], metavar="KIND=S1,S2",
                   help="degradation sweeps, e.g. jpeg=95,75,50 resize=0.5,1.5 blur=1,2 noise=2,5; one plot per "
                        "kind beside --json (OUT-KIND.png)")
    p.add_argument("--format-check", action="store_true",
                   help="ACC by source file format (PNG, JPEG, ...), as is and with every image re-encoded as "
                        "JPEG at --format-quality: exposes a detector that learned the format instead of the content")
    p.add_argument("--format-quality", type=int, default=95, metavar="Q", help="JPEG quality of --format-check")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise perturbation")
    p.add_argument("--threshold", default="0.5", metavar="P|model",
                   help="ACC, R_ACC, F_ACC count prob_fake > P: 0.5 as the paper, or 'model' for the model's own "
                        "(e.g. fitted by ferret calibrate)")
    p.set_defaults(func=run)


def warn_if_calibrated_on(det: Any, samples: list, root: str | Path, what: str = "eval") -> bool:
    """Warn (stderr) when the model was calibrated on exactly these images: its threshold and
    probabilities look better here than they will on new data."""
    from ferret_runtime.metadata import calibration_record

    from ..calibration import same_data

    record = calibration_record(det.backend.info.extra)
    if record is None or not same_data(record, samples, root):
        return False
    print(f"[{what}] warning: {root} holds the images this model was calibrated on (sha256 "
          f"{record['data']['sha256'][:12]}); its threshold and prob_fake are fitted to them, so these numbers are "
          "optimistic: evaluate on held-out images", file=sys.stderr)
    return True


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ferret_runtime import Detector
    from ferret_runtime.errors import ConfigError

    from ..data import find_subsets
    from ..evaluate import evaluate_with_detector, format_table, plot_pr, save_report
    from ..perturb import KINDS, format_check, format_check_table, format_sweep, plot_sweep, sweep, sweep_json

    specs = _specs(args)
    if not 1 <= args.format_quality <= 100:
        raise ConfigError(f"Received --format-quality {args.format_quality}; expected a JPEG quality in 1..100")
    if args.format_check:  # the re-encoded run is one more JPEG strength (shared when the sweep has it)
        specs.setdefault("jpeg", [])
        specs["jpeg"] = sorted(set(specs["jpeg"]) | {float(args.format_quality)})
    subsets = find_subsets(args.data, {"0_real": 0, "1_fake": 1})
    check_classes(subsets, args.data)
    model = args.weights or args.model
    runs = 1 + sum(len([s for s in v if s != 0]) for v in specs.values())
    total = runs * sum(len(v) for v in subsets.values())
    with Detector.open(model, **open_options(args)) as det, \
            tqdm(total=total, unit="img", file=sys.stderr, disable=None, leave=False) as bar:
        warn_if_calibrated_on(det, [s for v in subsets.values() for s in v], args.data)
        threshold = det.threshold if args.threshold == "model" else _threshold(args.threshold)
        if specs:
            results = sweep(det, subsets, specs, seed=args.seed, progress=bar.update, threshold=threshold)
            metrics, preds = next(iter(results.values()))[0.0]
        else:
            metrics, preds = evaluate_with_detector(det, subsets, bar.update, threshold)
        crop_used = det.preprocess.crop
        tiling = {"tile": det.tile, "tile_stride": det.tile_stride, "aggregate": det.aggregate} if det.tile else None
    print(format_table(metrics))
    extra: dict[str, Any] = {"model": str(model), "data": str(args.data), "crop": crop_used, "tiling": tiling,
                             "threshold": threshold}
    user_specs = _specs(args)
    if user_specs:
        shown = {k: {s: v for s, v in results[k].items() if s == 0 or s in user_specs[k]} for k in user_specs}
        print(format_sweep(shown))
        extra["perturb"] = sweep_json(shown)
        extra["seed"] = args.seed
    if args.format_check:
        check = format_check(subsets, preds, results["jpeg"][float(args.format_quality)][1], args.format_quality,
                             threshold)
        print(format_check_table(check))
        extra["format_check"] = check
    if args.json:
        save_report(Path(args.json), metrics, extra)
        print(f"[eval] wrote {args.json}")
    plot = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if plot:
        plot_pr(Path(plot), preds, f"{Path(model).name} on {Path(args.data).name}")
        print(f"[eval] wrote {plot}")
        for kind in user_specs:
            out = Path(plot).with_name(f"{Path(plot).stem}-{kind}.png")
            plot_sweep(out, kind, shown[kind], f"{Path(model).name} on {Path(args.data).name}: {KINDS[kind].unit}")
            print(f"[eval] wrote {out}")
    return 0


def _threshold(text: str) -> float:
    from ferret_runtime.errors import ConfigError

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"Received --threshold {text!r}; expected a probability in [0, 1] or 'model'")
    return value


def _specs(args: argparse.Namespace) -> dict[str, list[float]]:
    from ..perturb import parse_specs

    return parse_specs(args.perturb)


def check_classes(subsets: dict[str, list], root: str | Path) -> None:
    """A subset without real or without fake images has no AP and no TPR at an FPR: name it."""
    from ferret_runtime.errors import ConfigError

    for name, samples in subsets.items():
        for label, folder in ((0, "0_real"), (1, "1_fake")):
            if not any(s.label == label for s in samples):
                raise ConfigError(f"{root}: received subset {name!r} without images in {folder}; expected real "
                                  "and fake images in every subset")
