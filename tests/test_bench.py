"""``ferret bench``: a real (tiny) run writes the table, a complete JSON record and the plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ferret_export.bench.run import SCHEMA, timings_summary

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


def _saved_figures(monkeypatch, record, tmp_path):
    """The figures ``bench_report.plot`` saves, caught as they are saved (so already laid out and drawn)."""
    import matplotlib.figure

    from ferret_export.bench.report import plot

    saved, real = [], matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        saved.append(fig)
        return real(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    paths = plot(record, tmp_path)
    assert [p.name for p in paths] == ["throughput.png", "latency.png"] and len(saved) == 2
    return saved


def _shown_tick_labels(axis) -> list:
    """The tick labels drawn on ``axis``: inside the view, visible, with text."""
    lo, hi = sorted(axis.get_view_interval())
    ticks = axis.get_major_ticks() + axis.get_minor_ticks()
    return [t.label1 for t in ticks if lo <= t.get_loc() <= hi and t.label1.get_visible() and t.label1.get_text()]


def _sweep_record() -> dict:
    """A GPU-shaped sweep by hand: batch 1..256, values over four decades, one panel within a factor of 2,
    and a backend the second model lacks (so a colour cycle that advances per line would shift there)."""
    batches = [1, 8, 32, 64, 128, 256]
    cells = []
    for model, wide in (("wide", True), ("narrow", False)):
        for i, backend in enumerate(("torch-reference", "torch", "onnxruntime", "tensorrt-fp16")):
            for b in batches:
                img_s = 50.0 * (i + 1) * (b ** 0.9 if wide else 1.0 + b / 512)
                ok = wide or backend != "torch-reference"
                cells.append({"model": model, "backend": backend, "batch": b, "status": "ok" if ok else "skipped",
                              "img_s_median": img_s, "latency_ms_p50": 1000.0 * b / img_s})
    return {"models": [{"model": "wide"}, {"model": "narrow"}], "cells": cells, "device": "cuda",
            "hardware": {"gpu": "a GPU", "cpu": "a CPU"}}


RECORDS = ["committed cpu-2c record", "GPU-shaped sweep"]


def _record(which: str) -> dict:
    from .conftest import ROOT

    if which.startswith("committed"):
        return json.loads((ROOT / "benchmarks/results/cpu-2c/bench/bench.json").read_text())
    return _sweep_record()


@pytest.mark.parametrize("which", RECORDS)
def test_bench_plot_tick_labels_do_not_overlap(which, monkeypatch, tmp_path):
    """Every panel's log axes carry at least two tick labels, and no two of them overlap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for fig in _saved_figures(monkeypatch, _record(which), tmp_path):
        canvas = FigureCanvasAgg(fig)  # plot() closed it: draw it again as it was saved
        canvas.draw()
        renderer = canvas.get_renderer()
        for ax in fig.axes:
            assert ax.get_xscale() == ax.get_yscale() == "log"
            for axis in (ax.xaxis, ax.yaxis):
                labels = _shown_tick_labels(axis)
                assert len(labels) >= 2, (ax.get_title(), [t.get_text() for t in labels])
                boxes = [(t.get_window_extent(renderer), t.get_text()) for t in labels]
                for i, (a, ta) in enumerate(boxes):
                    for b, tb in boxes[i + 1:]:
                        overlap = a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1
                        assert not overlap, f"{ax.get_title()}: tick labels {ta!r} and {tb!r} overlap"


@pytest.mark.parametrize("which", RECORDS)
def test_bench_plot_one_colour_per_backend(which, monkeypatch, tmp_path):
    """A backend's line has the same colour in every panel, and two backends never share one."""
    from matplotlib.colors import to_hex

    for fig in _saved_figures(monkeypatch, _record(which), tmp_path):
        colours: dict[str, set] = {}
        for ax in fig.axes:
            for line in ax.get_lines():
                if not line.get_label().startswith("_"):
                    colours.setdefault(line.get_label(), set()).add(to_hex(line.get_color()))
        assert len(colours) >= 3 and all(len(c) == 1 for c in colours.values()), colours
        assert len({next(iter(c)) for c in colours.values()}) == len(colours), colours


@pytest.mark.gpu
def test_cuda_event_timer_measures_queued_gpu_work():
    import torch

    from ferret_export.bench.timing import cuda_event_ms

    one = cuda_event_ms(lambda: torch.cuda._sleep(2_000_000), iters=1, rounds=3, warmup=1)
    four = cuda_event_ms(lambda: torch.cuda._sleep(2_000_000), iters=4, rounds=3, queue_behind=True)
    assert len(one) == 3 and len(four) == 3 and min(one) > 0
    # per call: four queued sleeps of the same length take about as long each as one
    assert 0.5 < sorted(four)[1] / sorted(one)[1] < 2.0
