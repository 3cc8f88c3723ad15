"""``ferret train``: train or fine-tune FerretNet from a YAML config with key=value overrides."""

from __future__ import annotations

import argparse

from ferret_runtime.commands import HelpFormatter

HELP = "train FerretNet (CPU, one GPU, or several with torchrun)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help=HELP, description=HELP + ". Settings come from --config (YAML), then KEY=VALUE overrides.",
        formatter_class=HelpFormatter,
        epilog="Examples:\n  ferret train --config configs/train.yaml data.train_root=SID/progan-4cls optim.lr=1e-4\n"
               "  ferret train --resume runs/train/last.pt total_epochs=150\n"
               "  torchrun --nproc_per_node 4 -m ferret_runtime.cli train --config configs/train.yaml\n"
               "A run writes RUN_DIR/{config.yaml, last.pt, best.pt, metrics.jsonl, curves.png, events.*} "
               "(TensorBoard: tensorboard --logdir runs).",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. optim.lr=1e-3 trainer.batch_size=64 data.augment.jpeg_prob=0.1")
    p.add_argument("--config", "-c", default=None,
                   help="YAML config (default: the paper's settings, configs/train.yaml)")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue a run from its last.pt "
                        "(same config unless overridden; bit-for-bit on the same machine)")
    p.add_argument("--init", default=None, metavar="W",
                   help="fine-tune from any loadable checkpoint (the authors' or ours); sets model.init")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..engine import resume_config, train

    overrides = list(args.overrides) + ([f"model.init={args.init}"] if args.init else [])
    cfg = resume_config(args.resume, overrides) if args.resume else load_config(args.config, overrides)
    run_dir = train(cfg, resume=args.resume)
    print(f"[train] done: {run_dir}")
    return 0
