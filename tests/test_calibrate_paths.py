"""``ferret calibrate`` never writes over what it reads or over its own other outputs: each output
path is checked against every input and output by file identity (hard links and symlinks
included) and against the data folders, before any work, with one line naming both options."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from .conftest import run_ferret


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A real FerretNet-S checkpoint (seeded random weights): what must survive every refused run."""
    import torch

    from ferret_train import create_model
    from ferret_train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.pt", create_model("ferretnet-s").eval())


def _tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` (links as links) with the SHA-256 of what it holds."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p)] = "dir"
    return out


# each case: (extra arguments, the option refused, the option it collides with); m.pt is the model,
# D the data folder (absent on purpose: a check made after reading it would complain about it)
CASES = {
    "json is the model": (["--json", "m.pt"], "--json m.pt", "--weights m.pt"),
    "plot is the model, spelled differently": (["--plot", "./sub/../m.pt"], "--plot ./sub/../m.pt", "--weights m.pt"),
    "json is a hard link to the model": (["--json", "hard.json"], "--json hard.json", "--weights m.pt"),
    "plot is a symlink to the model": (["--plot", "soft.png"], "--plot soft.png", "--weights m.pt"),
    "-o is a hard link to the model": (["-o", "hard.pt"], "-o hard.pt", "--weights m.pt"),
    "-o is the model": (["-o", "m.pt"], "-o m.pt", "--weights m.pt"),
    "json is -o": (["--json", "o.pt"], "--json o.pt", "-o o.pt"),
    "plot is json": (["--json", "r.json", "--plot", "r.json"], "--plot r.json", "--json r.json"),
    "plot is a symlink to the default report": (["--plot", "soft-report"], "--plot soft-report",
                                                "the report o.pt.calibration.json (--json's default)"),
    "plot inside the data": (["--plot", "D/0_real/p.png"], "--plot D/0_real/p.png", "inside --data D"),
    "json is a folder": (["--json", "sub"], "--json sub, a folder", ""),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_output_that_is_an_input_or_another_output_is_refused_before_any_work(ckpt, tmp_path, case):
    extra, refused, other = CASES[case]
    (tmp_path / "m.pt").write_bytes(ckpt.read_bytes())
    os.link(tmp_path / "m.pt", tmp_path / "hard.json")
    os.link(tmp_path / "m.pt", tmp_path / "hard.pt")
    (tmp_path / "soft.png").symlink_to("m.pt")
    (tmp_path / "soft-report").symlink_to("o.pt.calibration.json")  # dangling: the report does not exist yet
    (tmp_path / "sub").mkdir()
    (tmp_path / "o.pt").write_bytes(b"an earlier output, kept when the run is refused")
    args = ["calibrate", "-w", "m.pt", "--data", "D", *(["-o", "o.pt"] if "-o" not in extra else []), *extra]
    before = _tree(tmp_path)
    proc = run_ferret(*args, "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout
    assert f"error: Received {refused}" in proc.stderr and other in proc.stderr
    assert _tree(tmp_path) == before  # nothing written, nothing replaced, no temporary file left


def test_an_engines_sidecar_is_an_input_too(tmp_path):
    (tmp_path / "m.engine").write_bytes(b"engine bytes")
    (tmp_path / "m.engine.json").write_text('{"format": "sidecar"}')
    before = _tree(tmp_path)
    proc = run_ferret("calibrate", "-m", "m.engine", "--data", "D", "-o", "c.engine", "--json", "m.engine.json",
                      cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Received --json m.engine.json, the same file as the sidecar m.engine.json of --model" in proc.stderr
    assert _tree(tmp_path) == before
    # and -o's own sidecar is an output: the report may not take its name
    proc = run_ferret("calibrate", "-m", "m.engine", "--data", "D", "-o", "c.engine", "--plot", "c.engine.json",
                      cwd=tmp_path)
    assert "Received --plot c.engine.json, the same file as the sidecar c.engine.json of -o" in proc.stderr
    assert proc.returncode == 2 and _tree(tmp_path) == before


@pytest.fixture(scope="module")
def val(tmp_path_factory) -> Path:
    """50 + 50 real proxy images: data on which the whole run would succeed (and, unchecked, write)."""
    from ferret_runtime.samples import write_proxy_dataset

    root = tmp_path_factory.mktemp("proxy")
    return write_proxy_dataset(root, size=32, n_train=1, n_val=50, n_test=1, seed=2)["val"]


@pytest.mark.parametrize("option, link", [("--json", None), ("--plot", "hard")])
def test_the_model_survives_a_run_that_would_otherwise_succeed(ckpt, val, tmp_path, option, link):
    # the case: with data the fit accepts (--scaling none fits anything), --json naming the
    # model replaced it with the report and exited 0; a hard-linked --plot wrote the PNG through the link
    model = tmp_path / "m.pt"
    model.write_bytes(ckpt.read_bytes())
    target = model
    if link:
        target = tmp_path / "m-link.png"
        os.link(model, target)
    before = _tree(tmp_path)
    proc = run_ferret("calibrate", "-w", str(model), "--data", str(val), "-o", str(tmp_path / "o.pt"), option,
                      str(target), "--scaling", "none", "--rule", "accuracy", "--bootstrap", "0", "--crop", "none",
                      "--device", "cpu")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"Received {option} {target}, the same file as --weights {model}" in proc.stderr
    assert _tree(tmp_path) == before and model.read_bytes() == ckpt.read_bytes()
