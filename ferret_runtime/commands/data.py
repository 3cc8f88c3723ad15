"""``ferret data proxy``: write the generated proxy dataset (no download)."""

from __future__ import annotations

import argparse
import sys

from ferret_runtime.commands import HelpFormatter

HELP = "generate datasets"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help=HELP, description=HELP + ".")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    q = kinds.add_parser(
        "proxy", help="the proxy dataset: procedural 'real' scenes vs their re-synthesis by generator-like decoders",
        formatter_class=HelpFormatter,
        description="Write a deterministic proxy dataset in the ForenSynths layout: train/ and val/ with "
                    "nearest, bilinear and transposed-convolution decoders; test/<decoder>/ for each decoder, "
                    "with pixel-shuffle held out of training. A proxy for demos and tests, not a benchmark.")
    q.add_argument("out_dir", metavar="OUT_DIR")
    q.add_argument("--size", type=int, default=96, help="image side in pixels")
    q.add_argument("--train", type=int, default=300, help="training images per class")
    q.add_argument("--val", type=int, default=60, help="validation images per class")
    q.add_argument("--test", type=int, default=40, help="test images per class and decoder")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=run_proxy)


def run_proxy(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from ..errors import ConfigError
    from ..samples import DECODERS, write_proxy_dataset

    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: exists and is not empty; choose a new folder (nothing was overwritten)")
    if min(args.size, args.train, args.val, args.test) < 1 or args.size < 16:
        raise ConfigError("Received sizes/counts below the minimum; expected --size >= 16 and counts >= 1")
    total = 2 * (args.train + args.val + args.test * len(DECODERS))
    with tqdm(total=total, unit="img", file=sys.stderr, disable=None, leave=False) as bar:
        splits = write_proxy_dataset(out, size=args.size, n_train=args.train, n_val=args.val, n_test=args.test,
                                     seed=args.seed, progress=lambda: bar.update(1))
    for name, path in splits.items():
        print(f"[data] {name}: {path}")
    return 0
