"""``ferret eval``: the paper's metrics per subset of a ForenSynths-layout folder."""

from __future__ import annotations

import argparse

from ferret_runtime.commands import HelpFormatter
import sys
from pathlib import Path

HELP = "evaluate a model on a ForenSynths-layout folder: ACC, AP, real/fake ACC per subset and mean"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help=HELP, description=HELP + " (as the original SynTester).",
        formatter_class=HelpFormatter,
        epilog="Layout: ROOT/<subset>/[<class>/]0_real|1_fake/*.png|jpg...; each subset is scored "
               "separately, then the mean. \nExample:\n  ferret eval -w best.pt --data ForenSynths --json eval.json",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", "-w", help="PyTorch checkpoint")
    src.add_argument("--model", "-m", help="any model file a backend supports (e.g. .onnx)")
    p.add_argument("--data", "-d", required=True, help="test root in the ForenSynths layout")
    p.add_argument("--crop", default="model", help="centre crop size, 'none' (full size) or 'model'")
    p.add_argument("--batch-size", "-b", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, metavar="OUT", help="write the metrics as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="precision-recall curves (default: beside --json)")
    p.add_argument("--lpd", default=None, help="LPD function for checkpoints that do not record it")
    p.add_argument("--window", type=int, default=None, help="LPD window for such checkpoints")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ferret_runtime import Detector
    from ferret_runtime.preprocess import parse_crop

    from ..data import find_subsets
    from ..evaluate import evaluate_with_detector, format_table, plot_pr, save_report

    subsets = find_subsets(args.data, {"0_real": 0, "1_fake": 1})
    crop = "model" if args.crop == "model" else parse_crop(args.crop)
    options = {k: v for k, v in (("lpd_func", args.lpd), ("window_size", args.window)) if v is not None}
    model = args.weights or args.model
    total = sum(len(v) for v in subsets.values())
    from tqdm import tqdm

    with Detector.open(model, device=args.device, crop=crop, batch_size=args.batch_size, **options) as det, \
            tqdm(total=total, unit="img", file=sys.stderr, disable=None, leave=False) as bar:
        metrics, preds = evaluate_with_detector(det, subsets, bar.update)
        crop_used = det.preprocess.crop
    print(format_table(metrics))
    if args.json:
        save_report(Path(args.json), metrics, {"model": str(model), "data": str(args.data), "crop": crop_used})
        print(f"[eval] wrote {args.json}")
    plot = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if plot:
        plot_pr(Path(plot), preds, f"{Path(model).name} on {Path(args.data).name}")
        print(f"[eval] wrote {plot}")
    return 0
