"""``ferret export triton``: an exported .onnx or TensorRT engine to a Triton model repository."""

from __future__ import annotations

import argparse

from ferret_runtime.commands import HelpFormatter

HELP = "a Triton Inference Server model repository from an exported .onnx or TensorRT engine"


def add_parser(formats: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``triton`` format to ``ferret export``'s subcommands."""
    t = formats.add_parser(
        "triton", help=HELP, formatter_class=HelpFormatter,
        description="Write a Triton Inference Server model repository: REPO/NAME/config.pbtxt, REPO/NAME/1/model.onnx "
                    "(platform onnxruntime_onnx) or REPO/NAME/1/model.plan (tensorrt_plan), REPO/NAME/README.md with "
                    "the exact preprocessing, and REPO/client_example.py (tritonclient.http, numpy only). Input names, "
                    "dtypes and shapes are read from the ONNX graph; a TensorRT engine needs its sidecar ENGINE.json "
                    "(written by the TensorRT export). The model's ferret.* metadata goes into the config's "
                    "parameters.",
        epilog="\nExample:\n  ferret export triton --model ferretnet-s.onnx --repo models --max-batch 64 "
               "--preferred-batch 8,16,32 --instances 2",
    )
    t.add_argument("--model", "-m", required=True, help="exported model: .onnx (from 'ferret export onnx') or a "
                   "TensorRT .engine/.plan with its .json sidecar beside it")
    t.add_argument("--repo", "-r", required=True, help="model repository directory (created if missing; other "
                   "models in it are left alone)")
    t.add_argument("--name", default="ferretnet", help="model name: the directory REPO/NAME and the name clients use")
    t.add_argument("--max-batch", type=int, default=64, help="max_batch_size; needs a dynamic batch dimension "
                   "(0: Triton does not batch and the dims include the batch dimension)")
    t.add_argument("--instances", type=int, default=1, help="model instances (instance_group count) per device")
    t.add_argument("--preferred-batch", type=_batch_sizes, default="8,16,32", metavar="N,N,...",
                   help="dynamic batching preferred_batch_size ('none' for none); sizes above --max-batch are dropped "
                        "from the default, and refused when given")
    t.add_argument("--max-queue-delay-us", type=int, default=500,
                   help="dynamic batching max_queue_delay_microseconds: how long a request may wait for a fuller batch")
    t.add_argument("--kind", choices=["gpu", "cpu"], default="gpu", help="instance_group kind (KIND_GPU/KIND_CPU)")
    t.add_argument("--force", action="store_true", help="replace an existing REPO/NAME (the new one is renamed into "
                   "place whole)")
    t.set_defaults(func=run)
    return t


def _batch_sizes(text: str) -> list[int]:
    """'8,16,32' -> [8, 16, 32]; 'none' or '' -> []."""
    if text.strip().lower() in ("", "none"):
        return []
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"Received {text!r}; expected comma-separated positive integers, e.g. 8,16,32")
    return sizes


def run(args: argparse.Namespace) -> int:
    from ferret_export.triton.repository import DEFAULT_PREFERRED, write_triton_repo

    preferred = None if args.preferred_batch == list(DEFAULT_PREFERRED) else args.preferred_batch
    write_triton_repo(args.model, args.repo, name=args.name, max_batch=args.max_batch, instances=args.instances,
                      preferred_batch=preferred, max_queue_delay_us=args.max_queue_delay_us, kind=args.kind,
                      force=args.force)
    return 0
