"""``make gpu-check``'s CPU parts on the machine it will meet: a venv with exactly the bare GPU image's
packages and a plain copy of this checkout, not pip-installed (issue 21).

The image: Python, PyTorch, onnx, onnxruntime (CPU build), cuda-python, NVRTC 13.0, CuPy, pytest,
hypothesis, numpy, Pillow, PyYAML; no starlette, uvicorn, tensorrt, onnxruntime-gpu (nor httpx,
pytest-benchmark or tqdm). Here: this interpreter's Python (3.11; the image has 3.12), torch 2.13.0 CPU
(a CUDA build needs a GPU to matter), and no CuPy (large, and nothing in this project imports it).
The checkout is copied from git's file list, so no ``*.egg-info`` rides along: its entry points would
hide a registry that only works when installed. Every command runs from the copy with PYTHONPATH unset.
One venv per session; skipped with pip's reason where no package index can be reached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import ROOT, _driver_gpus, assert_logits_close, small_onnx

pytestmark = pytest.mark.slow

BARE_PACKAGES = ("numpy", "Pillow", "PyYAML", "onnx", "onnxruntime", "cuda-python", "nvidia-cuda-nvrtc==13.0.*",
                 "pytest", "hypothesis", "torch==2.13.0")
ABSENT = ("starlette", "uvicorn", "httpx", "tensorrt", "onnxruntime-gpu", "pytest-benchmark", "tqdm",
          "ferretnet-deploy")
NO_INDEX = ("Could not find a version", "No matching distribution", "NewConnectionError", "Network is unreachable",
            "Temporary failure in name resolution")

ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
ENV.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")


@dataclass
class Bare:
    python: Path
    checkout: Path

    def run(self, *args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.python), *args], cwd=cwd or self.checkout, env=ENV, capture_output=True,
                              text=True, timeout=timeout)

    def script(self, code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.run("-c", code, *args, timeout=timeout)


def plain_checkout(dest: Path) -> Path:
    """What a clone of this work tree holds: git's tracked and not-ignored files, nothing built or installed."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:  # not a git work tree: copy it without what a build or an install leaves
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
            ".git", ".venv", "*.egg-info", "__pycache__", "build", "dist", ".pytest_cache", ".benchmarks", "demo_out",
            "runs"))
        return dest
    for rel in filter(None, listed.stdout.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the work tree is not there to copy
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="session")
def bare(tmp_path_factory) -> Bare:
    root = tmp_path_factory.mktemp("bare-gpu-image")
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=300, env=ENV)
    python = root / "venv" / "bin" / "python"
    # --no-compile: byte-compiling all of torch's 7,000 files takes longer than compiling, once, what is imported
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-compile", *BARE_PACKAGES], cwd=root,
                          env=ENV, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and any(s in proc.stderr for s in NO_INDEX):
        pytest.skip(f"pip cannot reach a package index here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"bare venv built in {time.monotonic() - t0:.0f} s")
    return Bare(python, plain_checkout(root / "checkout"))  # about 1.4 GB; pytest keeps the last 3 basetemps


def test_the_venv_is_the_bare_image_and_the_checkout_is_not_installed(bare):
    listed = bare.run("-m", "pip", "list", "--format=json")
    assert listed.returncode == 0, listed.stderr
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    wanted = {p.split("=")[0].lower().replace("_", "-") for p in BARE_PACKAGES}
    assert wanted <= names, wanted - names
    assert not names & set(ABSENT), names & set(ABSENT)
    proc = bare.script("import json, ferret_runtime, importlib.metadata as m\n"
                       "print(json.dumps([ferret_runtime.__file__, "
                       "[e.name for e in m.entry_points(group='ferret.backends')],"
                       " [e.name for e in m.entry_points(group='ferret.commands')]]))")
    assert proc.returncode == 0, proc.stderr
    where, backends, commands = json.loads(proc.stdout)
    assert Path(where) == bare.checkout / "ferret_runtime" / "__init__.py"
    assert (backends, commands) == ([], [])  # no entry point: the registries' built-ins alone
    assert not list(bare.checkout.glob("*.egg-info"))


@pytest.mark.skipif(_driver_gpus() > 0, reason="checks the machine without a GPU")
def test_make_gpu_check_without_a_gpu_is_one_line_and_exit_2(bare, tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    proc = subprocess.run(["make", "-s", "gpu-check", f"PYTHON={bare.python}", f"OUT={tmp_path / 'out'}"],
                          cwd=bare.checkout, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Error 2" in proc.stderr, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no GPU: "), proc.stdout
    assert "Traceback" not in proc.stderr
    direct = bare.run("-m", "benchmarks.gpu_check")
    assert direct.returncode == 2 and direct.stdout == proc.stdout and not direct.stderr.strip()


DETECT = """
import json, sys
from ferret_runtime import Detector
out = {}
for model in sys.argv[2:]:
    with Detector.open(model, crop=64) as det:
        out[model] = [det.backend.__class__.__name__, [r.logit for r in det.predict([sys.argv[1]])]]
print(json.dumps(out))
"""


def test_detector_opens_onnx_and_checkpoints_through_the_builtin_backends(bare, tmp_path):
    """gpu-check section 5's failure: Detector.open said 'no backend installed' from a plain checkout."""
    from ferret_runtime import Detector
    from ferret_runtime.samples import write_samples

    onnx_path = small_onnx(tmp_path)  # writes s.pth beside s.onnx: FerretNet-S, seeded weights
    pth = tmp_path / "s.pth"
    image = write_samples(tmp_path / "images", n=1, size=96)[0]
    proc = bare.script(DETECT, str(image), str(onnx_path), str(pth))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert [got[str(onnx_path)][0], got[str(pth)][0]] == ["OrtBackend", "TorchBackend"]
    for model in (onnx_path, pth):  # the same logit this development environment gives
        with Detector.open(model, crop=64) as det:
            want = [r.logit for r in det.predict([image])]
        assert_logits_close(got[str(model)][1], want, f"{model.name} in the bare venv")


def test_the_pytest_row_collects_every_module_and_passes(bare):
    """The gpu tests as gpu_check runs them: every test module collected (or skipped with its reason),
    none errors; pytest's own command on the same tree is refused (pyproject's --benchmark-disable)."""
    plain = bare.run("-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests")
    assert plain.returncode == 4 and "--benchmark-disable" in plain.stderr, plain.stdout + plain.stderr
    proc = bare.script("import json, time\n"
                       "from benchmarks import gpu_check as g\n"
                       "r = g.Result(deadline=time.monotonic() + 240)\n"
                       "g.section(r, 'pytest', g.check_pytest, 240)\n"
                       "print(json.dumps([r.__dict__ for r in r.rows]))", timeout=300)
    assert proc.returncode == 0, proc.stderr
    row, = json.loads(proc.stdout)
    assert row["ok"] is True and "error" not in row["value"] and " deselected in " in row["value"], row
    if _driver_gpus() == 0:
        assert "passed" not in row["value"] and "no CUDA GPU visible to" in row["detail"], row


def test_gpu_checks_cpu_tests_pass_in_the_bare_venv(bare):
    """tests/test_gpu_check.py, tests/test_backend_registry.py and tests/test_decode_gpu.py (no nvImageCodec
    in the image: the decode section's skip line), run by the bare venv from the copy (the pytest section's
    own run is the test above)."""
    proc = bare.run("-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra", "tests/test_gpu_check.py",
                    "tests/test_backend_registry.py", "tests/test_decode_gpu.py", "-k",
                    "not test_the_pytest_section_on_this_checkout", timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    closing = proc.stdout.strip().splitlines()[-1]
    assert " passed" in closing and "failed" not in closing and "error" not in closing, closing
