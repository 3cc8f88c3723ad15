"""Shared fixtures: the reference material in ../shared/reference, and GPU/TensorRT gating."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("FERRET_REFERENCE", ROOT.parent / "shared" / "reference"))

# The suite names its runtime: Detector.open's default (--backend auto) measures the installed CPU
# runtimes once per host and model (seconds each) and may pick either, which would make every test that
# opens a model pay that and depend on the choice. Tests of auto itself pass backend="auto" or clear this.
os.environ.setdefault("FERRET_BACKEND", "onnxruntime")

# Logit parity between two float32 computations of the same network whose reductions may run in another
# order (SIMD width: AVX2 8 lanes, AVX-512 16; thread count; oneDNN or MLAS kernel; batch size): the
# README's bound, relative to the logit's magnitude. Each reordered sum moves its result by a few
# roundings of float32 (unit eps = 2**-23); through FerretNet the largest move measured on the
# reference images is 1.9 eps * |logit| on an AMD EPYC (AVX2) and 1.1 eps * |logit| on an Intel Xeon
# (AVX-512, AMX). 16 eps * max(1, |ref|) (1.9e-6 relative; 1.9e-6 absolute below |ref| = 1) is a bound
# no reordering of a correct computation reaches, and a wrong weight, layer or pixel far exceeds it.
EPS32 = 2.0 ** -23
PARITY_EPS = 16


def logit_tolerance(ref: float) -> float:
    """The README's parity bound for a logit whose reference value is ``ref``."""
    return PARITY_EPS * EPS32 * max(1.0, abs(float(ref)))


def lpd_tolerance(func: str, k: int, x) -> float:
    """How far two correct float32 LPDs (or residuals x - lpd) of ``x`` may differ, for every machine.

    Selections (median, excmed, retmed, min, max) pick one of the inputs: exact, 0. ``avg`` sums k*k values
    in an order each implementation chooses: a float32 sum of n terms is within (n - 1) u sum|x_i| of the
    exact sum (u = 2**-24), so two sums differ by at most 2 (n - 1) u n max|x|; divided by n, plus one
    rounding of each quotient and of each residual (2 u max|x| and 4 u max|x|): (2n + 4) u max|x|."""
    import numpy as np

    from ferret_runtime.lpd_spec import LPD_SPECS

    if LPD_SPECS[func].reduce != "mean":
        return 0.0
    return (2 * k * k + 4) * 2.0 ** -24 * float(np.abs(np.asarray(x, np.float32)).max())


def assert_logits_close(got, want, what: str = "") -> None:
    """Every logit within :func:`logit_tolerance` of its reference, reporting the worst in float32 eps."""
    import numpy as np

    got, want = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = np.maximum(1.0, np.abs(want))
    worst = float((np.abs(got - want) / (EPS32 * scale)).max()) if got.size else 0.0
    assert worst <= PARITY_EPS, f"{what}: worst |logit - ref| is {worst:.2f} eps * max(1, |ref|); bound {PARITY_EPS}"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _driver_gpus() -> int:
    """CUDA devices the driver sees (cuda-python), whatever torch build is installed; 0 without either."""
    try:
        from ferret_runtime import cuda

        return cuda.device_count()
    except Exception:  # CudaError without cuda-python or a driver
        return 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests need PyTorch's CUDA, except TensorRT ones (``trt``) and ``gpu(torch=False)`` ones:
    those use torch on the CPU at most and reach the GPU through cuda-python, so a GPU the driver
    sees is enough (a CPU-only torch on a GPU machine does not skip them)."""
    no_torch_gpu = pytest.mark.skip(reason="no CUDA GPU visible to PyTorch on this machine")
    no_gpu = pytest.mark.skip(reason="no CUDA GPU visible to the CUDA driver (cuda-python) on this machine")
    no_trt = pytest.mark.skip(reason="TensorRT (the 'tensorrt' package) is not installed")
    has_torch_gpu, has_trt = _cuda_available(), importlib.util.find_spec("tensorrt") is not None
    has_gpu = has_torch_gpu or _driver_gpus() > 0
    for item in items:
        if "gpu" in item.keywords:
            driver_only = "trt" in item.keywords or item.get_closest_marker("gpu").kwargs.get("torch") is False
            if driver_only and not has_gpu:
                item.add_marker(no_gpu)
            elif not driver_only and not has_torch_gpu:
                item.add_marker(no_torch_gpu)
        if "trt" in item.keywords and not has_trt:
            item.add_marker(no_trt)


@pytest.fixture(scope="session")
def reference() -> Path:
    if not (REFERENCE / "README.md").is_file():
        pytest.skip(f"reference material not found at {REFERENCE} (set FERRET_REFERENCE or place ../shared/reference)")
    return REFERENCE


@pytest.fixture(scope="session")
def authors_ckpt(reference: Path) -> Path:
    return reference / "ferretnet-s-median-3.pth"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (every test server stays on loopback)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(size: int = 256, seed: int = 0) -> bytes:
    """A noise PNG (incompressible: its size on the wire is about its pixel count x 3)."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def run_ferret(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (the installed console script's module)."""
    return subprocess.run([sys.executable, "-m", "ferret_runtime.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def small_onnx(tmp: Path, name: str = "s.onnx", size: int = 64) -> Path:
    """A small real ONNX export: FerretNet-S with seeded random weights, fixed input ``size``."""
    import torch

    from ferret_export.onnx.export import export_onnx
    from ferret_export.onnx.graph import GraphOptions
    from ferret_train import create_model
    from ferret_train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp / "s.pth", create_model("ferretnet-s").eval())
    export_onnx(ckpt, tmp / name, GraphOptions(input_size=size), run_verify=False, log=lambda *_: None)
    return tmp / name
