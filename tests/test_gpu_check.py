"""benchmarks/gpu_check.py on a CPU: the no-GPU exit, the report writer and the table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import gpu_check
from tests.conftest import ROOT, _driver_gpus


@pytest.mark.skipif(_driver_gpus() > 0, reason="checks the machine without a GPU")
def test_without_a_gpu_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no GPU: "), proc.stdout
    assert not proc.stderr.strip()


def _synthetic() -> gpu_check.Result:
    result = gpu_check.Result(env={"gpu": "NVIDIA H100 80GB HBM3", "driver_cuda": "13.0", "nvrtc": "13.0"})
    result.add("env", "gpu", None, "NVIDIA H100 80GB HBM3 (sm_90, 80 GiB)")
    result.add("kernels", "median k=3", True, "16 cases")
    result.add("kernels", "max k=7", False, "16 cases", "f16 (1, 1, 1, 1) residual=True")
    result.add("speed", "lpd_residual float32", None, "3,000 GB/s, 90% of a copy")
    return result


def test_report_writer_and_table(tmp_path):
    result = _synthetic()
    path = gpu_check.write_report(result, tmp_path)
    assert path == tmp_path / "nvidia-h100-80gb-hbm3" / "gpu-check.json"
    data = json.loads(path.read_text())
    assert data["failed"] == 1 and data["env"]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert [r["ok"] for r in data["rows"]] == [None, True, False, None]
    table = gpu_check.format_table(result).splitlines()
    assert table[0].split()[:3] == ["section", "check", "result"]
    assert "FAIL" in table[3] and "f16 (1, 1, 1, 1)" in table[3] and "PASS" in table[2]
    assert table[-1].split()[-5:] == ["1", "failed", "of", "2", "checks"] and " FAIL " in table[-1]


def test_a_section_that_raises_is_a_failed_row():
    result = gpu_check.Result()

    def boom(r):
        raise RuntimeError("cuModuleLoadData: received CUDA_ERROR_UNSUPPORTED_PTX_VERSION")

    gpu_check.section(result, "plugin", boom)
    row, = result.rows
    assert (row.section, row.ok) == ("plugin", False) and "UNSUPPORTED_PTX_VERSION" in row.value


def test_every_section_is_listed_in_order():
    assert list(gpu_check.SECTIONS) == ["env", "kernels", "preprocess", "plugin", "torch", "speed", "backends", "pytest"]
    assert gpu_check.slug("NVIDIA H200") == "nvidia-h200"


def test_backends_section_without_a_cuda_provider_or_tensorrt_only_reports(monkeypatch):
    # CPU onnxruntime (no CUDA provider) and no TensorRT: two informative rows, nothing built, nothing failed
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorrt" else real(name, *a))
    result = gpu_check.Result()
    gpu_check.check_backends(result)
    rows = {r.name: r for r in result.rows}
    assert set(rows) == {"onnxruntime-gpu", "tensorrt"} and not result.failed
    assert rows["onnxruntime-gpu"].value.endswith("CUDA provider no") and rows["tensorrt"].value == "not installed"
