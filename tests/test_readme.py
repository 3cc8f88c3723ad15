"""The README is the front page: short, the two set-up commands with the demo's table, and links that resolve.

Its commands run with the manual's (tests/test_docs.py); here, what makes it a front page: at most about
10 KB, exactly the two set-up commands, the demo table the manual shows (test_demo.py checks the command
prints that table's rows and columns), and every relative link landing on a file and heading that exist.
"""

from __future__ import annotations

import re
from pathlib import Path

from markdown.extensions.toc import slugify

from .conftest import ROOT

README = ROOT / "README.md"
MAX_BYTES = 10 * 1024
DEMO_COLUMNS = ["subset", "images", "ACC", "AP", "R_ACC", "F_ACC", "TPR@1%"]  # test_demo.py's
DEMO_ROWS = ["bilinear", "nearest", "pixelshuffle", "tconv", "mean"]


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _demo_table(text: str) -> str:
    """The fenced block whose first line is the demo table's header."""
    for block in re.findall(r"```text\n(.*?)```", text, flags=re.S):
        if block.split("\n", 1)[0].split() == DEMO_COLUMNS:
            return block
    raise AssertionError("no demo table")


def test_readme_is_a_front_page():
    size = len(README.read_bytes())
    assert size <= MAX_BYTES, f"README.md is {size} bytes; expected at most {MAX_BYTES}: move detail into docs/"


def test_readme_has_exactly_the_two_setup_commands():
    setup = _section(README.read_text(), "Set-up: the two commands")
    blocks = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
    commands = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()
                if line.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]


def test_readme_shows_the_demo_table_the_manual_shows():
    table = _demo_table(README.read_text())
    assert [line.split()[0] for line in table.splitlines()[1:] if not set(line) <= {"-"}] == DEMO_ROWS
    assert table == _demo_table((ROOT / "docs/getting-started.md").read_text())


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slugify(h.strip(), "-") for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_readme_links_resolve():
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    relative = [link for link in links if not re.match(r"^[a-z]+://", link)]
    assert len(relative) >= 20, relative
    for link in relative:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README links to {link}: no such file"
        if anchor:
            assert anchor in _anchors(target), f"README links to {link}: no such heading in {path}"


def test_readme_links_every_page_of_the_manual():
    linked = {ROOT / link.partition("#")[0] for link in re.findall(r"\]\((docs/[^)\s]+)\)", README.read_text())}
    pages = set((ROOT / "docs").rglob("*.md"))
    assert not pages - linked, sorted(str(p.relative_to(ROOT)) for p in pages - linked)
