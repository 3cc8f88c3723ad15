"""``ferret demo``: write sample images and classify them with FerretNet (the README's main command)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "generate sample images and classify them with FerretNet, with Grad-CAM panels"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help=HELP, description=HELP + ".", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="demo_out", help="folder for the sample images and the explanation panels")
    p.add_argument("--weights", default=None,
                   help="checkpoint to use; when missing, a randomly initialised FerretNet-S is written "
                        "instead (its verdicts are meaningless, it only shows the pipeline)")
    p.add_argument("--images", type=int, default=3, help="number of scenes (each gives 1 real + 2 fake images)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ferret_runtime.cli import main as ferret_main
    from ferret_runtime.samples import write_samples

    out = Path(args.out)
    write_samples(out / "images", n=args.images)
    weights = Path(args.weights) if args.weights else None
    if weights is None or not weights.is_file():
        import torch

        from ..checkpoint import save_checkpoint
        from ..registry import create_model

        print(f"ferret demo: no checkpoint at {weights}; using a randomly initialised FerretNet-S "
              "(scores are meaningless; pass --weights ferretnet-s-median-3.pth for the authors' model)",
              file=sys.stderr)
        torch.manual_seed(0)
        weights = save_checkpoint(out / "random-ferretnet-s.pth", create_model("ferretnet-s").eval())
    print(f"ferret demo: classifying {out / 'images'} with {weights}", file=sys.stderr)
    rc = ferret_main(["detect", str(out / "images"), "--weights", str(weights), "--explain", str(out / "explain")])
    print(f"ferret demo: panels (image, LPD reconstruction, residual, Grad-CAM) in {out / 'explain'}\n"
          "ferret demo: note: the 'real_*' images are procedural textures, not camera photographs, so a model "
          "trained on real photos vs. GAN/diffusion images may call them fake; the '*_nearest' ones carry the "
          "periodic up-sampling trace of generator decoders.", file=sys.stderr)
    return rc
