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


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="no CUDA GPU visible to PyTorch on this machine")
    no_trt = pytest.mark.skip(reason="TensorRT (the 'tensorrt' package) is not installed")
    has_gpu, has_trt = _cuda_available(), importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(no_gpu)
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


def run_ferret(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (the installed console script's module)."""
    return subprocess.run([sys.executable, "-m", "ferret_runtime.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)
