"""Subcommands of ``ferret`` that need only the base install, and the help formatter all commands share."""

from __future__ import annotations

import argparse
import textwrap


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults (except None ones, whose meaning the help text states); description and epilog
    keep their line breaks (example lines stay one per line) while each line is still wrapped."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            extra = " " * (len(line) - len(line.lstrip()) + 2) if line.startswith(" ") else ""
            lines.append(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent + extra,
                                       break_on_hyphens=False)
                         if line.strip() else "")
        return "\n".join(lines)


def streams_arg(text: str) -> int | None:
    """``--streams``: a count >= 1, or 'auto' (None: the backend's default from the core count)."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"received {text!r}; expected a number of streams >= 1 or 'auto'")
    return value


def add_streams_argument(p: argparse.ArgumentParser) -> None:
    """The same ``--streams`` on every command that opens a model."""
    p.add_argument("--streams", type=streams_arg, default=None, metavar="N|auto",
                   help="ONNX models on the CPU: N sessions with 1/N of the threads each, fed batches concurrently "
                        "(throughput streams; two 1-thread sessions beat one 2-thread session on small CPUs). "
                        "Default auto: one per core, at most 4")


def add_backend_argument(p: argparse.ArgumentParser) -> None:
    """The same ``--backend`` on every command that opens a model."""
    p.add_argument("--backend", default=None, metavar="NAME",
                   help="auto (default, or $FERRET_BACKEND): the model's backend by suffix; for .onnx on the CPU "
                        "the installed runtime (onnxruntime, openvino) measured fastest here, with its streams "
                        "and batch size (measured once per host and model, cached). A name forces that backend: "
                        "onnxruntime, openvino, torch, tensorrt")
