"""``ferret bench``: a real (tiny) run writes the table, a complete JSON record and the plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ferret_export.benchmark import SCHEMA, timings_summary

from .conftest import run_ferret


def test_timing_summary_by_hand():
    # 4 batches of 8 images: 0.1, 0.2, 0.2, 0.4 s -> 80, 40, 40, 20 img/s
    s = timings_summary(8, [0.1, 0.2, 0.2, 0.4])
    assert s["img_s_median"] == pytest.approx(40.0)
    assert s["img_s_iqr"] == pytest.approx(np.percentile([20, 40, 40, 80], 75) - np.percentile([20, 40, 40, 80], 25))
    assert s["latency_ms_p50"] == pytest.approx(200.0)
    assert 300.0 < s["latency_ms_p99"] <= 400.0


def test_bench_cli_writes_table_json_and_plots(tmp_path):
    out = tmp_path / "bench"
    proc = run_ferret("bench", "--models", "ferretnet-s,npr", "--backends", "torch,onnxruntime,pipeline,tensorrt-fp16",
                      "--batch-sizes", "1,2", "--iters", "2", "--warmup", "1", "--image-size", "64", "--threads", "1",
                      "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "bench.json").read_text())
    assert record["schema"] == SCHEMA and record["device"] == "cpu"
    hw = record["hardware"]
    assert {"cpu", "cpu_cores", "gpu", "driver", "python", "libraries"} <= set(hw)
    assert {"torch", "onnxruntime", "numpy"} <= set(hw["libraries"])
    assert [m["model"] for m in record["models"]] == ["ferretnet-s", "npr"]
    npr = record["models"][1]
    assert round(npr["params"] / 1e6, 2) == 1.44  # the paper: 1.44M
    assert npr["paper"]["fps"] == 720.9 and npr["paper"]["gflops"] == 2.29
    cells = {(c["model"], c["backend"], c["batch"]): c for c in record["cells"]}
    assert len(cells) == 2 * 4 * 2
    for batch in (1, 2):
        for key in (("ferretnet-s", "torch"), ("ferretnet-s", "onnxruntime"), ("ferretnet-s", "pipeline"),
                    ("npr", "torch"), ("npr", "onnxruntime")):
            c = cells[(*key, batch)]
            assert c["status"] == "ok" and c["iters"] == 2, c
            assert c["img_s_median"] > 0 and c["latency_ms_p99"] >= c["latency_ms_p50"] > 0
        assert "TensorRT" in cells[("ferretnet-s", "tensorrt-fp16", batch)]["reason"]
        assert cells[("npr", "pipeline", batch)]["status"] == "skipped"
    table = (out / "table.txt").read_text()
    assert "paper FPS" in table and "720.9" in table and "skipped: TensorRT" in table
    for png in ("throughput.png", "latency.png"):
        assert (out / png).stat().st_size > 10_000
    assert "Method" in proc.stdout


@pytest.mark.parametrize("args, match", [
    (["--models", "resnet9000"], "Received model 'resnet9000'"),
    (["--backends", "tensorflow"], "Received backend 'tensorflow'"),
    (["--batch-sizes", "0"], "Received batch sizes"),
    (["--device", "tpu"], "expected auto, cpu or cuda"),
])
def test_bench_usage_errors(args, match):
    proc = run_ferret("bench", *args)
    assert proc.returncode == 2 and match in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bench_torch_compile_row(tmp_path):
    proc = run_ferret("bench", "--models", "ferretnet-s", "--backends", "torch-compile", "--batch-sizes", "1",
                      "--iters", "1", "--warmup", "1", "--image-size", "32", "--threads", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (cell,) = json.loads((tmp_path / "bench.json").read_text())["cells"]
    assert cell["backend"] == "torch-compile" and cell["status"] == "ok" and cell["img_s_median"] > 0
