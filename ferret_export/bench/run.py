"""``ferret bench``: the paper's efficiency table (image size, params, FLOPs, FPS) on your hardware.

Every (model, backend, batch size) cell is timed the same way: ``warmup`` untimed batches, then
``iters`` timed ones (CUDA events on a GPU, ``perf_counter`` on the CPU), one random batch reused.
Throughput is reported as the median and interquartile range of per-batch images/s, latency as
p50/p99 of the per-batch time. Backends that cannot run here are rows with ``status: skipped``
and the reason.

The paper's FPS column does not state a batch size. Our reading: batch 1, PyTorch eager on one
GPU. The five small CNNs all land between 720 and 772 FPS (1.3-1.4 ms per image) although their
FLOPs differ, which is the signature of kernel-launch-bound batch-1 inference; FreqNet's FFTs
(more, slower launches) explain its 200 FPS. So our table's FPS column is batch 1, and the sweep
shows what batching adds.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferret_export.bench.runners import RUNNERS, Context, Skip
from ferret_runtime.errors import ConfigError

# The backends a user can name, in table order. "pipeline" is the whole ferret_runtime path
# (encoded PNG bytes in, results out) over ONNX Runtime; the others time the model alone.
BACKENDS: dict[str, str] = {
    "torch-reference": "PyTorch eager, the original unfold + median LPD (FerretNet only)",
    "torch": "PyTorch eager, our LPD",
    "torch-compile": "torch.compile (inductor; CUDA graphs on GPU)",
    "onnxruntime": "ONNX Runtime on our export (CPU, or CUDA with onnxruntime-gpu)",
    "openvino": "OpenVINO (f32) on our export, CPU, same streams as onnxruntime",
    "pipeline": "ferret_runtime Detector: PNG bytes -> decode -> preprocess -> ONNX Runtime -> results",
    "tensorrt-fp32": "TensorRT engine, float32",
    "tensorrt-fp16": "TensorRT engine, float16 graph",
    "tensorrt-int8": "TensorRT engine, INT8 Q/DQ graph",
}
DEFAULT_MODELS = ("ferretnet-s", "ferretnet-b", "npr", "freqnet", "safe")
SCHEMA = "ferret-bench/1"


@dataclass
class Cell:
    model: str
    backend: str
    batch: int
    device: str
    status: str = "ok"  # or "skipped"
    reason: str = ""
    img_s_median: float | None = None
    img_s_iqr: float | None = None
    latency_ms_p50: float | None = None
    latency_ms_p99: float | None = None
    iters: int = 0


@dataclass
class ModelRow:
    model: str
    image_size: int
    params: int
    flops: int  # FlopCounterMode's count (a multiply-add is 2)
    gflops_paper_convention: float
    paper: dict[str, Any] = field(default_factory=dict)


def timings_summary(batch: int, seconds: list[float]) -> dict[str, float]:
    """Median/IQR of images/s and p50/p99 latency (ms) over per-batch times."""
    ips = sorted(batch / s for s in seconds)
    q = np.percentile(ips, [25, 50, 75])
    lat = np.percentile(np.array(seconds) * 1e3, [50, 99])
    return {"img_s_median": float(q[1]), "img_s_iqr": float(q[2] - q[0]),
            "latency_ms_p50": float(lat[0]), "latency_ms_p99": float(lat[1])}


def time_fn(fn: Callable[[], Any], warmup: int, iters: int, cuda: bool = False) -> list[float]:
    """Per-call seconds; on CUDA bracketed by events on the current stream."""
    for _ in range(warmup):
        fn()
    if cuda:
        from ferret_export.bench.timing import cuda_event_ms

        return [ms / 1e3 for ms in cuda_event_ms(fn, rounds=iters)]
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def hardware() -> dict[str, Any]:
    """What a result is only valid for: CPU, cores, GPU, driver, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_cores": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform(), "gpu": None, "driver": None, "libraries": {}}
    try:
        affinity = len(os.sched_getaffinity(0))
        info["cpu_cores_usable"] = affinity
    except AttributeError:
        pass
    for lib in ("torch", "onnxruntime", "onnx", "numpy", "tensorrt", "ferret_runtime"):
        if importlib.util.find_spec(lib) is not None:
            mod = __import__(lib)
            info["libraries"][lib] = getattr(mod, "__version__", "?")
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["cuda"] = torch.version.cuda
            import subprocess

            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except ImportError:
        pass
    return info


# ------------------------------------------------------------------------------------- driver
@dataclass
class BenchConfig:
    models: tuple[str, ...] = DEFAULT_MODELS
    backends: tuple[str, ...] = ("torch-reference", "torch", "onnxruntime", "pipeline", "tensorrt-fp16")
    batch_sizes: tuple[int, ...] = (1, 8)
    image_size: int = 256
    warmup: int = 1
    iters: int = 5
    device: str = "auto"
    threads: int | None = None
    streams: int | None = None  # CPU streams of the ONNX Runtime rows (None: one per core, at most 4)


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"Received --device {device}; PyTorch sees no CUDA device")
    elif device != "cpu":
        raise ConfigError(f"Received --device {device!r}; expected auto, cpu or cuda[:N]")
    return device


def check_names(what: str, names: Iterable[str], known: Iterable[str], more: str = "") -> None:
    """ConfigError naming the first of ``names`` that is not ``known`` (``more``: other accepted words)."""
    known = list(known)
    for n in names:
        if n not in known:
            raise ConfigError(f"Received {what} {n!r}; expected some of {', '.join(known)}{more}")


def validate(cfg: BenchConfig) -> None:
    from ferret_train import list_models

    check_names("model", cfg.models, list_models())
    check_names("backend", cfg.backends, BACKENDS)
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise ConfigError(f"Received batch sizes {cfg.batch_sizes}; expected positive integers")
    if cfg.iters < 1 or cfg.warmup < 0:
        raise ConfigError(f"Received --iters {cfg.iters} --warmup {cfg.warmup}; expected iters >= 1, warmup >= 0")
    if cfg.image_size < 32:
        raise ConfigError(f"Received --image-size {cfg.image_size}; expected >= 32")


# The rest of the paper's efficiency row (the authors' README, "More sota methods comparison"; FPS on
# their GPU, ACC/AP averaged over ForenSynths, Diffusion-6-cls, Synthetic-Pop and Synthetic-Aesthetic).
# Params and FLOPs come from ferret_train.models.peers.PAPER_TABLE.
PAPER_ROWS: dict[str, dict[str, Any]] = {
    "ferretnet-b": {"ref": "NeurIPS 2025", "fps": 772.1, "acc": 97.1, "ap": 99.6},
    "npr": {"ref": "CVPR 2024", "fps": 720.9, "acc": 86.5, "ap": 89.4},
    "freqnet": {"ref": "AAAI 2024", "fps": 200.2, "acc": 79.2, "ap": 86.8},
    "safe": {"ref": "KDD 2025", "fps": 770.2, "acc": 96.8, "ap": 99.3},
}


def model_row(name: str, model, size: int) -> ModelRow:
    from ferret_train.models.peers import FLOPS_PER_MAC, PAPER_TABLE, count_flops

    flops = count_flops(model, size)
    paper = {**PAPER_TABLE.get(name, {}), **PAPER_ROWS.get(name, {})}
    return ModelRow(name, size, sum(p.numel() for p in model.parameters()), flops, flops / FLOPS_PER_MAC / 1e9, paper)


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print, progress=None) -> dict[str, Any]:
    """Measure every cell; returns the JSON record (see SCHEMA)."""
    import torch

    validate(cfg)
    device = resolve_device(cfg.device)
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    models, cells = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="ferret-bench-") as tmp:
            for name in cfg.models:
                ctx = Context(name, cfg.image_size, device, Path(tmp), cfg.threads, cfg.streams)
                row = model_row(name, ctx.model, cfg.image_size)
                models.append(row)
                log(f"[bench] {name}: {row.params / 1e6:.2f}M params, {row.gflops_paper_convention:.2f} GFLOPs "
                    f"(paper convention) at {cfg.image_size}x{cfg.image_size}")
                for backend in cfg.backends:
                    for batch in cfg.batch_sizes:
                        cells.append(_measure(ctx, backend, batch, cfg, device))
                        c = cells[-1]
                        log(f"[bench]   {backend:<16} b={batch:<4} " + (
                            f"{c.img_s_median:9.1f} img/s (IQR {c.img_s_iqr:.1f}), p50 {c.latency_ms_p50:.2f} ms"
                            if c.status == "ok" else f"skipped: {c.reason}"))
                        progress and progress()
    finally:
        torch.set_num_threads(old_threads)
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device,
            "hardware": hardware(), "config": asdict(cfg), "onnxruntime_cpu_streams": _effective_streams(cfg),
            "paper_fps_reading": "batch 1, PyTorch eager, one GPU",
            "models": [asdict(m) for m in models], "cells": [asdict(c) for c in cells]}


def _effective_streams(cfg: BenchConfig) -> int:
    from ferret_runtime.backends.onnxruntime import default_streams

    return cfg.streams or default_streams()


def _measure(ctx: Context, backend: str, batch: int, cfg: BenchConfig, device: str) -> Cell:
    cell = Cell(ctx.name, backend, batch, device)
    try:
        fn, per_call, cuda, release = RUNNERS[backend](ctx, backend, batch)
    except Skip as e:
        cell.status, cell.reason = "skipped", str(e)
        return cell
    try:
        seconds = time_fn(fn, cfg.warmup, cfg.iters, cuda)
    finally:
        # an idle ONNX Runtime session keeps threads (and spinning) alive: release every runner
        # before the next cell, so no cell competes with the previous one's threads
        release()
        del fn
        gc.collect()
    cell.iters = len(seconds)
    seconds = [t * batch / per_call for t in seconds]  # per `batch` images, whatever a call ran
    for k, v in timings_summary(batch, seconds).items():
        setattr(cell, k, v)
    return cell


