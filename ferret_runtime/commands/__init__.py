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
