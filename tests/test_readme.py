"""Every ``ferret`` command the README shows parses with today's CLI: no documented flag that does not exist.

What each command does is tested where its feature is (e.g. test_serve_limits.py runs the serve flags
below against a real server); this test catches the README drifting from the parser, which no
feature test notices.
"""

from __future__ import annotations

import re
import shlex

import pytest

from ferret_runtime.cli import build_parser

from .conftest import ROOT


def readme_commands() -> list[str]:
    """The ``ferret ...`` lines of the README's bash blocks, comments removed."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "ferret":
                out.append(shlex.join(words))
    return out


COMMANDS = readme_commands()


def test_the_readme_shows_the_main_commands():
    # a regex that stopped matching would make the test below vacuous
    shown = {shlex.split(c)[1] for c in COMMANDS}
    assert {"detect", "serve", "train", "eval", "export", "bench", "data"} <= shown, shown
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command, capsys):
    parser = build_parser()
    try:
        args = parser.parse_args(shlex.split(command)[1:])
    except SystemExit as e:
        pytest.fail(f"README command does not parse (exit {e.code}): {command}\n{capsys.readouterr().err}")
    assert callable(getattr(args, "func", None)), command
