"""``ferret export FORMAT``: one subcommand per row of ``ferret_export.pipeline.FORMATS``, each in
its own module (``export_onnx``, ``export_tensorrt``, ``export_triton``)."""

from __future__ import annotations

import argparse
from importlib import import_module

from ..pipeline import FORMATS

HELP = "export a checkpoint to ONNX, a TensorRT engine or a Triton model repository (each verified before written)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help=HELP, description=HELP + ".")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    for name in FORMATS:
        import_module(f".export_{name}", __package__).add_parser(formats)
