"""The ``ferret`` command. Subcommands come from the ``ferret.commands`` entry points.

Each entry point names a module with ``register(subparsers)``; modules defer heavy imports (torch,
onnxruntime) to run time so ``ferret --help`` stays fast and works on the base install. A command module
(or its package) may list the optional packages it needs in ``REQUIRES``: when one is missing the command
is listed as unavailable and says which extra installs it. Registration is all or nothing: a command whose
``register`` fails half-way leaves no parser behind. The built-in commands are registered from this table
too, so a plain checkout (not pip-installed, no entry points) has them all.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from importlib import import_module
from importlib.metadata import entry_points

from . import __version__
from .errors import FerretError

ENTRY_POINT_GROUP = "ferret.commands"
PACKAGE = "ferretnet-deploy"

# The built-in commands (the entry points in pyproject.toml list the same modules): an installed
# package adds nothing new, a plain checkout still has every command.
BUILTIN_COMMANDS = {
    "detect": "ferret_runtime.commands.detect",
    "scan": "ferret_runtime.commands.scan",
    "serve": "ferret_runtime.commands.serve",
    "data": "ferret_runtime.commands.data",
    "calibrate": "ferret_train.commands.calibrate",
    "compare": "ferret_train.commands.compare",
    "demo": "ferret_train.commands.demo",
    "eval": "ferret_train.commands.eval",
    "train": "ferret_train.commands.train",
    "export": "ferret_export.commands.export",
    "bench": "ferret_export.commands.bench",
}

# Which extra of pyproject.toml installs each optional top-level module.
EXTRA_OF = {
    "torch": "train", "sklearn": "train", "matplotlib": "train", "tensorboard": "train",
    "onnx": "export", "onnxruntime": "export",
    "starlette": "serve", "uvicorn": "serve", "multipart": "serve", "python_multipart": "serve",
    "prometheus_client": "serve",
    "av": "video", "pyarrow": "scan", "ray": "ray", "tritonclient": "triton",
    "tensorrt": "trt", "cuda": "gpu", "openvino": "openvino",
}


def install_hint(modules: list[str]) -> str:
    """``needs torch, onnx (pip install 'ferretnet-deploy[train,export]')``: the extras that bring ``modules``."""
    extras = sorted({EXTRA_OF.get(m, "") for m in modules} - {""})
    how = f"pip install '{PACKAGE}[{','.join(extras)}]'" if extras else f"pip install {' '.join(modules)}"
    return f"needs {', '.join(modules)}, not installed ({how})"


def _missing(module: object) -> list[str]:
    """The packages in the command module's (or its package's) ``REQUIRES`` that cannot be imported."""
    requires = getattr(module, "REQUIRES", None)
    if requires is None:
        requires = getattr(sys.modules.get(getattr(module, "__package__", "") or ""), "REQUIRES", ())
    return [m for m in requires if importlib.util.find_spec(m) is None]


def _commands() -> dict[str, object]:
    """name -> loader (a module path, or an entry point) for every command, the built-ins first."""
    found: dict[str, object] = dict(BUILTIN_COMMANDS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in found or found[ep.name] != ep.value:  # our own entry points name the same modules
            found[ep.name] = ep
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferret",
        description="FerretNet deployment toolkit: detect AI-generated images, train, export, benchmark, serve.",
        epilog="Run 'ferret COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, loader in sorted(_commands().items()):
        _register(sub, name, loader)
    return parser


def _register(sub: argparse._SubParsersAction, name: str, loader: object) -> None:
    """Add one command, whole, or its 'unavailable' stand-in naming the extra that installs it."""
    try:
        module = import_module(loader) if isinstance(loader, str) else loader.load()
        missing = _missing(module)
        if missing:
            _register_unavailable(sub, name, install_hint(missing))
            return
        module.register(sub)
    except ImportError as e:  # imported something its REQUIRES did not list: the same answer
        _forget(sub, name)
        _register_unavailable(sub, name, install_hint([(e.name or str(e)).split(".")[0]]))


def _forget(sub: argparse._SubParsersAction, name: str) -> None:
    """Undo a half-done ``register``: the parser it added and its line in the help."""
    sub._name_parser_map.pop(name, None)  # argparse keeps no public way to remove a subparser
    sub._choices_actions[:] = [a for a in sub._choices_actions if a.dest != name]


def _register_unavailable(sub: argparse._SubParsersAction, name: str, reason: str) -> None:
    # no option prefix: whatever follows (``--epochs 3``, ``--help``) is taken as is and answered with the reason
    p = sub.add_parser(name, help=f"(unavailable: {reason})", add_help=False, prefix_chars="\0")
    p.add_argument("rest", nargs="*")

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
    except ModuleNotFoundError as e:  # an optional package the command imports when it runs
        top = (e.name or "").split(".")[0]
        if top not in EXTRA_OF:
            raise
        print(f"ferret {args.command}: error: {install_hint([top])}", file=sys.stderr)
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
