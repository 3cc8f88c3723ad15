"""`make demo`, the README's first command, on a reduced setting: the files it promises and the table it prints.

README: "`make demo` (`ferret demo --out demo_out`) ... Outputs: demo_out/runs/train/{best.pt,last.pt,
curves.png,metrics.jsonl}, demo_out/eval.json, demo_out/eval.png ... and demo_out/explain/*.png", and a
table of subset rows (bilinear, nearest, pixelshuffle, tconv: 80 images each) under a mean row (320).
The run here is the same command with two training overrides (2 epochs of 3 steps), so it takes seconds.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SUBSETS = ["bilinear", "nearest", "pixelshuffle", "tconv"]  # the README's table: the four decoders, sorted
IMAGES_PER_SUBSET = 80  # 40 real + 40 fake per decoder (the README's table: 80 each, 320 in all)
EPOCHS, STEPS = 2, 3
ROW = re.compile(r"^(\S+)\s+(\d+)\s+(\d+\.\d\d)\s+(\d+\.\d\d)\s+(\d+\.\d\d)\s+(\d+\.\d\d)\s+(\d+\.\d\d)$")


def _make_rule(target: str) -> tuple[list[str], list[str], dict[str, str]]:
    """(prerequisites, recipe lines, variables) of ``target`` in the Makefile."""
    text = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+)\s*[?:]?=\s*(.*?)\s*$", text, re.M))
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{target}\s*:(?!=)", line))
    prereqs = lines[start].split(":", 1)[1].split()
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line[1:])
    return prereqs, recipe, variables


def test_make_demo_runs_ferret_demo_out_demo_out():
    prereqs, recipe, variables = _make_rule("demo")
    assert prereqs == ["$(STAMP)"]  # the install, then the one command
    assert recipe == ["$(VENV)/bin/ferret demo --out demo_out"]
    argv = shlex.split(recipe[0].replace("$(VENV)", variables["VENV"]))
    assert argv == [".venv/bin/ferret", "demo", "--out", "demo_out"]
    # .venv/bin/ferret is the console script pyproject.toml declares, which this test runs below
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "ferret"]
    assert script.value == "ferret_runtime.cli:main"


def _ferret() -> list[str]:
    """The installed console script beside this interpreter (as .venv/bin/ferret), else its module."""
    script = Path(sys.executable).with_name("ferret")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ferret_runtime.cli"]


def _table(stdout: str) -> tuple[list[tuple], tuple]:
    """The evaluation table: the one whose rows are the decoders; (subset rows, mean row)."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.split() != ["subset", "images", "ACC", "AP", "R_ACC", "F_ACC", "TPR@1%"]:  # the README's columns
            continue
        rows, j = [], i + 1
        while j < len(lines) and ROW.match(lines[j]):
            rows.append(ROW.match(lines[j]).groups())
            j += 1
        if [r[0] for r in rows] == SUBSETS:
            assert set(lines[j]) == {"-"}, lines[j]
            mean = ROW.match(lines[j + 1])
            assert mean and mean.group(1) == "mean", lines[j + 1]
            parse = lambda r: (r[0], int(r[1]), *map(float, r[2:]))  # noqa: E731
            return [parse(r) for r in rows], parse(mean.groups())
    raise AssertionError(f"no table with rows {SUBSETS} in:\n{stdout}")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo_out"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([*_ferret(), "demo", "--out", str(out), f"total_epochs={EPOCHS}",
                           f"trainer.max_steps_per_epoch={STEPS}"], capture_output=True, text=True, env=env,
                          cwd=tmp_path_factory.mktemp("cwd"), timeout=300)
    return out, proc


def test_demo_writes_what_the_readme_lists(demo):
    out, proc = demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    run = out / "runs" / "train"
    for path in (run / "best.pt", run / "last.pt", out / "eval.json"):
        assert path.is_file() and path.stat().st_size > 0, path
    for png in (run / "curves.png", out / "eval.png"):
        with Image.open(png) as im:
            assert im.format == "PNG" and min(im.size) > 100, (png, im.size)
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["type"] == "epoch"] == list(range(1, EPOCHS + 1))
    panels = sorted((out / "explain").glob("*.png"))
    assert len(panels) == 4  # two fake and two real held-out (pixelshuffle) images
    assert sum("pixelshuffle" in p.name for p in panels) == 2  # the fakes' files carry their decoder's name
    for p in panels:
        with Image.open(p) as im:
            assert im.format == "PNG"
    assert re.search(r"\[demo\] done in \d+ s", proc.stderr)


def test_demo_prints_the_evaluation_table(demo):
    out, proc = demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, mean = _table(proc.stdout)
    assert [r[1] for r in rows] == [IMAGES_PER_SUBSET] * 4 and mean[1] == 4 * IMAGES_PER_SUBSET
    for r in (*rows, mean):
        assert all(0.0 <= v <= 100.0 for v in r[2:]), r
    for col in range(2, 7):  # the mean row is the mean over subsets (each shown to 0.01: off by 0.01 at most)
        assert abs(mean[col] - sum(r[col] for r in rows) / 4) <= 0.0101, (col, mean, rows)
    # the table and eval.json (written by the same evaluation) agree to the printed precision
    saved = json.loads((out / "eval.json").read_text())
    for name, n, *values in (*rows, mean):
        entry = saved["mean"] if name == "mean" else saved["subsets"][name]
        assert entry["n"] == n
        got = [round(entry[k], 2) for k in ("acc", "ap", "r_acc", "f_acc", "tpr1")]
        assert got == pytest.approx(values, abs=0.0051)
