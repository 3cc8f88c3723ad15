"""The ``ferret`` command. Subcommands come from the ``ferret.commands`` entry points.

Each entry point names a module with ``register(subparsers)``; modules defer heavy imports (torch,
onnxruntime) to run time so ``ferret --help`` stays fast and works on the base install.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from . import __version__
from .errors import FerretError

ENTRY_POINT_GROUP = "ferret.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferret",
        description="FerretNet deployment toolkit: detect AI-generated images, train, export, benchmark, serve.",
        epilog="Run 'ferret COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            ep.load().register(sub)
        except ImportError as e:  # its optional extra (e.g. torch for 'train') is not installed
            _register_unavailable(sub, ep.name, e)
    return parser


def _register_unavailable(sub: argparse._SubParsersAction, name: str, err: ImportError) -> None:
    reason = f"needs a package that is not installed ({err}); install the matching extra, e.g. " \
             f"pip install 'ferretnet-deploy[train,export]'"
    p = sub.add_parser(name, help=f"(unavailable: {reason})", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def fail(args: argparse.Namespace) -> int:
        raise FerretError(reason)

    p.set_defaults(func=fail)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FerretError as e:
        print(f"ferret {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `ferret detect ... | head`: the reader left, which is not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"ferret {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
