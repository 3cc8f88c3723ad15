"""Every install the README lists, from the built wheel in a fresh venv (not the development environment).

One venv, grown the way a user grows it: the base package alone, then + onnxruntime (the torch-free
runtime for an ONNX model), + [serve], + [scan], + [video], + [export], + torch and [train]. At each step
the commands that step enables run for real (detect, serve with a real client, scan, export), and the
commands still missing their extra answer one line naming it, exit 2, no traceback. Packages come from
the package index like a user's; the test skips with the reason when pip cannot reach one.

Not here: [gpu] and [trt] (onnxruntime-gpu and TensorRT need an NVIDIA GPU; `make gpu-check` covers
them), [ray], [triton] and [dev] (large; the development environment that runs this suite installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT, assert_logits_close, free_port, png, small_onnx

pytestmark = pytest.mark.slow

PIP_ENV = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
for _var in ("PYTHONPATH", "VIRTUAL_ENV"):
    PIP_ENV.pop(_var, None)


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=PIP_ENV, capture_output=True, text=True, timeout=timeout)


class Venv:
    """A fresh venv outside the checkout; commands run from a folder that holds no project code."""

    def __init__(self, path: Path, wheel: Path):
        self.path, self.wheel, self.cwd = path, wheel, path.parent
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
        self.python = path / "bin" / "python"

    def install(self, *specs: str) -> None:
        proc = _run([str(self.python), "-m", "pip", "install", "-q", *specs], self.cwd)
        if proc.returncode != 0 and ("Could not find a version" in proc.stderr or "NewConnectionError" in proc.stderr):
            pytest.skip(f"pip cannot reach a package index here: {proc.stderr.strip().splitlines()[-1]}")
        assert proc.returncode == 0, proc.stderr[-3000:]

    def extra(self, name: str) -> None:
        self.install(f"{self.wheel}[{name}]")

    def ferret(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return _run([str(self.path / "bin" / "ferret"), *args], self.cwd, timeout)

    def has(self, module: str) -> bool:
        code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
        return _run([str(self.python), "-c", code], self.cwd).returncode == 0


def _source_tree(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked, and untracked but not ignored), copied to ``dest``:
    building in the checkout would reuse an ignored build/ folder and ship modules that moved away."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out, src = tmp_path_factory.mktemp("wheel"), _source_tree(tmp_path_factory.mktemp("src"))
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)], out)
    if proc.returncode != 0 and "Could not find a version" in proc.stderr:
        pytest.skip(f"pip cannot reach a package index for the build backend: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deprecat" not in proc.stderr.lower(), proc.stderr  # e.g. the old project.license table
    (whl,) = out.glob("ferretnet_deploy-*.whl")
    return whl


def test_the_wheel_holds_exactly_the_packages_modules(wheel):
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.endswith((".py", ".cu")) and ".dist-info/" not in n}
    tree = {str(p.relative_to(ROOT)) for pkg in ("ferret_runtime", "ferret_train", "ferret_export")
            for p in (ROOT / pkg).rglob("*") if p.suffix in (".py", ".cu") and "__pycache__" not in p.parts}
    assert shipped == tree, {"in the wheel only": sorted(shipped - tree), "in the tree only": sorted(tree - shipped)}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """An ONNX model, two images and the logits the development environment gives them."""
    from ferret_runtime import Detector

    d = tmp_path_factory.mktemp("assets")
    model = small_onnx(d, size=64)
    images = d / "images"
    images.mkdir()
    for i in range(2):
        (images / f"{i}.png").write_bytes(png(64, seed=i))
    with Detector.open(model, crop=64) as det:
        want = {p.name: r.logit for p, r in zip(sorted(images.iterdir()), det.predict(sorted(images.iterdir())))}
    return model, images, want


def _refuses(proc: subprocess.CompletedProcess, command: str, extra: str) -> None:
    """One line on stderr naming the extra, exit 2, no traceback."""
    assert proc.returncode == 2, (command, proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"ferret {command}: error:" in lines[0], proc.stderr
    assert f"ferretnet-deploy[{extra}" in lines[0] or f",{extra}]" in lines[0], (extra, lines[0])


def _detect_rows(env: Venv, model: Path, images: Path) -> dict[str, float]:
    proc = env.ferret("detect", str(images), "-m", str(model), "--json", "--crop", "64")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return {Path(json.loads(line)["path"]).name: json.loads(line)["logit"] for line in proc.stdout.splitlines()}


def _serve_once(env: Venv, model: Path, image: Path) -> float:
    """``ferret serve`` on 127.0.0.1 from the venv, one real request, the logit it answers."""
    port = free_port()
    proc = subprocess.Popen([str(env.path / "bin" / "ferret"), "serve", "-m", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "--crop", "64", "--log-level", "warning"], cwd=env.cwd,
                            env=PIP_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert time.time() < deadline, "ferret serve from the wheel never became ready"
                time.sleep(0.3)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/detect", data=image.read_bytes(), method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["results"][0]["logit"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_every_listed_install_runs_its_commands_from_the_wheel(wheel, assets, tmp_path):
    model, images, want = assets
    env = Venv(tmp_path / "venv", wheel)

    # the base package: the CLI and its help, every optional command naming its extra
    env.install(str(wheel))
    assert not env.has("torch") and not env.has("onnxruntime")
    proc = env.ferret("--help")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    for command in ("detect", "scan", "serve", "train", "export", "bench", "eval", "calibrate"):
        assert command in proc.stdout
    assert env.ferret("detect", "--help").returncode == 0
    _refuses(env.ferret("train", "--epochs", "1"), "train", "train")
    _refuses(env.ferret("export", "onnx", "-w", "x.pth"), "export", "export")
    _refuses(env.ferret("detect", str(images), "-m", str(model)), "detect", "export")  # onnxruntime's extra

    # + onnxruntime: the torch-free runtime runs an ONNX model with the development environment's logits
    env.install("onnxruntime")
    got = _detect_rows(env, model, images)
    assert_logits_close([got[n] for n in sorted(want)], [want[n] for n in sorted(want)], "detect from the wheel")
    _refuses(env.ferret("serve", "-m", str(model)), "serve", "serve")
    _refuses(env.ferret("scan", str(images), "--out", str(tmp_path / "o.parquet"), "-m", str(model)), "scan", "scan")

    # + [serve]: a real server and a real request
    env.extra("serve")
    first = sorted(images.iterdir())[0]
    assert_logits_close([_serve_once(env, model, first)], [want[first.name]], "serve from the wheel")

    # + [scan]: Parquet rows
    env.extra("scan")
    out = tmp_path / "scan.parquet"
    proc = env.ferret("scan", str(images), "--out", str(out), "-m", str(model))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    import pyarrow.parquet as pq

    rows = {Path(r["path"]).name: r["logit"] for r in pq.read_table(out).to_pylist()}
    assert_logits_close([rows[n] for n in sorted(want)], [want[n] for n in sorted(want)], "scan from the wheel")

    # + [export]: onnx and onnxruntime; exporting a checkpoint still needs torch, and says so
    env.extra("export")
    assert env.has("onnx")
    _refuses(env.ferret("export", "onnx", "-w", "x.pth"), "export", "train")

    # + [video]: PyAV decodes the reference video's frames
    video = ROOT.parent / "shared" / "reference" / "real-kunming-1.mp4"
    env.extra("video")
    if video.is_file():
        proc = env.ferret("detect", str(video), "-m", str(model), "--json", "--crop", "64", "--max-frames", "2")
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert len(proc.stdout.splitlines()) >= 1

    # + torch and [train] (the README: install your torch build first): training's commands and exporting
    env.install("torch==2.13.0")
    env.extra("train")
    assert env.ferret("train", "--help").returncode == 0
    proc = env.ferret("export", "onnx", "-w", str(model.with_suffix(".pth")), "-o", str(tmp_path / "again.onnx"),
                      "--input-size", "64")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert_logits_close(list(_detect_rows(env, tmp_path / "again.onnx", images).values()),
                        list(_detect_rows(env, model, images).values()), "export from the wheel")
