"""MkDocs hook: the CLI reference page, written at build time from the ``ferret`` parsers.

Generated rather than committed so it cannot fall behind a flag someone adds: the page in the repository
(docs/reference/cli.md) holds a marker, and every build replaces it with each command's ``--help``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

MARKER = "<!-- ferret-cli-reference -->"
WIDTH = "100"  # help text wrapped the same on every machine, whatever the terminal


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("ferret",)):
    """(words, parser) for ``parser`` and every subcommand beneath it, depth first, in help order."""
    yield path, parser
    for action in parser._actions:  # argparse keeps no public list of subparsers
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, path + (name,))


def cli_reference() -> str:
    """Markdown: one section per command, its ``--help`` as argparse prints it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ferret_runtime.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        sections = []
        for words, parser in commands(build_parser()):
            level = "#" * min(len(words) + 1, 4)
            sections.append(f"{level} {' '.join(words)}\n\n```text\n{parser.format_help().rstrip()}\n```\n")
        return "\n".join(sections)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_reference())
