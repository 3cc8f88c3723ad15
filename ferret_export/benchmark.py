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
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferret_runtime.errors import ConfigError

# The backends a user can name, in table order. "pipeline" is the whole ferret_runtime path
# (encoded PNG bytes in, results out) over ONNX Runtime; the others time the model alone.
BACKENDS: dict[str, str] = {
    "torch-reference": "PyTorch eager, the original unfold + median LPD (FerretNet only)",
    "torch": "PyTorch eager, our LPD",
    "torch-compile": "torch.compile (inductor; CUDA graphs on GPU)",
    "onnxruntime": "ONNX Runtime on our export (CPU, or CUDA with onnxruntime-gpu)",
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
        import torch

        torch.cuda.synchronize()
        out = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        return out
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


# ----------------------------------------------------------------------------------- runners
class _Skip(Exception):
    """This backend cannot run this model here; the message is the reason."""


def _is_ferret(name: str) -> bool:
    return name.startswith("ferretnet")


class _Context:
    """Per-model state shared by the backends: the torch model, its checkpoint, its ONNX file."""

    def __init__(self, model: str, size: int, device: str, tmp: Path, threads: int | None):
        import torch

        from ferret_train import create_model

        self.name, self.size, self.device, self.tmp, self.threads = model, size, device, tmp, threads
        torch.manual_seed(0)
        self.model = create_model(model).eval()
        self._onnx: Path | None = None
        self._onnx_error: str | None = None

    def onnx_path(self) -> Path:
        if self._onnx is None and self._onnx_error is None:
            try:
                self._onnx = self._export()
            except Exception as e:  # an exporter's failure becomes this row's reason
                self._onnx_error = f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if self._onnx_error:
            raise _Skip(self._onnx_error)
        return self._onnx  # type: ignore[return-value]

    def _export(self) -> Path:
        import torch

        out = self.tmp / f"{self.name}.onnx"
        if _is_ferret(self.name):
            from ferret_train.checkpoint import save_checkpoint

            from .onnx_export import export_onnx
            from .onnx_graph import GraphOptions

            ckpt = save_checkpoint(self.tmp / f"{self.name}.pth", self.model)
            export_onnx(ckpt, out, GraphOptions(input_size=self.size, dynamic_hw=False), run_verify=False,
                        log=lambda *_: None)
            return out
        x = torch.zeros(1, 3, self.size, self.size)
        torch.onnx.export(self.model, (x,), str(out), input_names=["input"], output_names=["logit"],
                          dynamic_axes={"input": {0: "batch"}, "logit": {0: "batch"}}, opset_version=17, dynamo=False)
        return out


Runner = tuple[Callable[[], Any], bool, Callable[[], None]]  # (one batch, times on CUDA, release)


def _torch_runner(ctx: _Context, backend: str, batch: int) -> Runner:
    import torch

    dev = torch.device(ctx.device)
    if backend == "torch-reference":
        if not _is_ferret(ctx.name):
            raise _Skip("the unfold + median reference LPD exists only in FerretNet")
        from ferret_train import create_model

        model = create_model(ctx.name, lpd_impl="reference").eval()
        model.load_state_dict(ctx.model.state_dict())
    else:
        model = ctx.model
    model = model.to(dev)
    if backend == "torch-compile":
        mode = "reduce-overhead" if dev.type == "cuda" else None  # CUDA graphs on GPU
        model = torch.compile(model, mode=mode, dynamic=False)
    x = torch.randn(batch, 3, ctx.size, ctx.size, device=dev)

    def run() -> Any:
        with torch.inference_mode():
            return model(x)

    return run, dev.type == "cuda", lambda: None


def _ort_runner(ctx: _Context, backend: str, batch: int) -> Runner:
    from ferret_runtime.backends.onnxruntime import OrtBackend

    path = ctx.onnx_path()
    # the session alone on float input, as the other backend rows (the pipeline row times the rest)
    be = OrtBackend(path, device="cuda" if ctx.device.startswith("cuda") else "cpu", threads=ctx.threads or 0,
                    gpu_preprocess=False, max_batch=batch) if _is_ferret(ctx.name) else None
    if be is not None:
        x = np.random.default_rng(0).standard_normal((batch, 3, ctx.size, ctx.size)).astype(np.float32)
        return (lambda: be.run(x)), False, be.close
    import onnxruntime as ort  # peers: a plain session (our backend wants FerretNet metadata)

    so = ort.SessionOptions()
    if ctx.threads:
        so.intra_op_num_threads = ctx.threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, ctx.size, ctx.size)).astype(np.float32)
    name = sess.get_inputs()[0].name
    return (lambda: sess.run(None, {name: x})), False, lambda: None


def _pipeline_runner(ctx: _Context, backend: str, batch: int) -> Runner:
    if not _is_ferret(ctx.name):
        raise _Skip("the runtime pipeline serves FerretNet models (ferret_runtime reads their metadata)")
    from PIL import Image

    from ferret_runtime import Detector

    det = Detector.open(ctx.onnx_path(), device="cuda" if ctx.device.startswith("cuda") else "cpu",
                        crop=ctx.size, batch_size=batch, threads=ctx.threads or 0, max_batch=batch)
    rng = np.random.default_rng(0)
    images = []
    for _ in range(batch):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (ctx.size, ctx.size, 3), dtype=np.uint8)).save(buf, "PNG")
        images.append(buf.getvalue())
    return (lambda: det.predict(images)), False, det.close


def _trt_runner(ctx: _Context, backend: str, batch: int) -> Runner:
    if importlib.util.find_spec("tensorrt") is None:
        raise _Skip("TensorRT is not installed (pip install 'ferretnet-deploy[trt]' on a machine with an NVIDIA GPU)")
    if not ctx.device.startswith("cuda"):
        raise _Skip("TensorRT needs a CUDA device")
    if not _is_ferret(ctx.name):
        raise _Skip("TensorRT rows are built from our FerretNet export")
    precision = backend.split("-", 1)[1]
    if precision == "int8":
        raise _Skip("INT8 engines need calibration images: build one with 'ferret export tensorrt --int8' "
                    "and time it with --backends pipeline on that engine")
    from ferret_runtime.backends.tensorrt import TrtBackend

    from .tensorrt import export_and_build

    engine = ctx.tmp / f"{ctx.name}-{precision}-b{batch}.engine"
    if not engine.exists():
        export_and_build(ctx.tmp / f"{ctx.name}.pth" if (ctx.tmp / f"{ctx.name}.pth").exists() else _save(ctx),
                         engine, precision=precision, input_size=ctx.size, batch=(1, batch, batch), verify=False,
                         log=lambda *_: None)
    be = TrtBackend(engine, device="cuda", gpu_preprocess=False)  # the engine alone, as the other backend rows
    x = np.random.default_rng(0).standard_normal((batch, 3, ctx.size, ctx.size)).astype(
        np.float16 if be.info.preprocess.dtype == "float16" else np.float32)
    return (lambda: be.run(x)), False, be.close


def _save(ctx: _Context) -> Path:
    from ferret_train.checkpoint import save_checkpoint

    return save_checkpoint(ctx.tmp / f"{ctx.name}.pth", ctx.model)


RUNNERS: dict[str, Callable[[_Context, str, int], Runner]] = {
    "torch-reference": _torch_runner, "torch": _torch_runner, "torch-compile": _torch_runner,
    "onnxruntime": _ort_runner, "pipeline": _pipeline_runner,
    "tensorrt-fp32": _trt_runner, "tensorrt-fp16": _trt_runner, "tensorrt-int8": _trt_runner,
}


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


def validate(cfg: BenchConfig) -> None:
    from ferret_train import list_models

    known = list_models()
    for m in cfg.models:
        if m not in known:
            raise ConfigError(f"Received model {m!r}; expected some of {', '.join(known)}")
    for b in cfg.backends:
        if b not in BACKENDS:
            raise ConfigError(f"Received backend {b!r}; expected some of {', '.join(BACKENDS)}")
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
                ctx = _Context(name, cfg.image_size, device, Path(tmp), cfg.threads)
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
            "hardware": hardware(), "config": asdict(cfg), "paper_fps_reading": "batch 1, PyTorch eager, one GPU",
            "models": [asdict(m) for m in models], "cells": [asdict(c) for c in cells]}


def _measure(ctx: _Context, backend: str, batch: int, cfg: BenchConfig, device: str) -> Cell:
    cell = Cell(ctx.name, backend, batch, device)
    try:
        fn, cuda, release = RUNNERS[backend](ctx, backend, batch)
    except _Skip as e:
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
    for k, v in timings_summary(batch, seconds).items():
        setattr(cell, k, v)
    return cell


# ------------------------------------------------------------------------------------- output
def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def paper_table(record: dict[str, Any]) -> str:
    """Shaped like the paper's: Method, Ref, Image size, Params, FLOPs, FPS (paper | ours), ACC/AP (paper)."""
    best: dict[str, tuple[float, str]] = {}
    for c in record["cells"]:
        if c["status"] == "ok" and c["batch"] == 1 and c["backend"] != "pipeline":
            if c["img_s_median"] > best.get(c["model"], (0.0, ""))[0]:
                best[c["model"]] = (c["img_s_median"], c["backend"])
    head = (f"{'Method':<13} {'Ref':<13} {'Size':>5} {'Params':>8} {'FLOPs':>8} {'paper FLOPs':>11} "
            f"{'paper FPS':>9} {'FPS b=1 (ours)':>22} {'ACC / AP (paper)':>17}")
    lines = [head, "-" * len(head)]
    for m in record["models"]:
        p = m["paper"]
        fps, how = best.get(m["model"], (None, ""))
        acc = f"{p['acc']:.1f} / {p['ap']:.1f}" if "acc" in p else "-"
        lines.append(f"{m['model']:<13} {p.get('ref', '-'):<13} {str(m['image_size']) + '²':>5} "
                     f"{m['params'] / 1e6:>7.2f}M {m['gflops_paper_convention']:>7.2f}G "
                     f"{_fmt(p.get('gflops'), '.2f') + 'G' if 'gflops' in p else '-':>11} "
                     f"{_fmt(p.get('fps'), '.1f'):>9} {(_fmt(fps, '.1f') + ' ' + how) if fps else '-':>22} {acc:>17}")
    lines.append("FLOPs: multiply-adds (the paper's unit, thop MACs) from FlopCounterMode / 2, convolutions and linear "
                 "layers only (BatchNorm, pooling, FFTs not counted; see ferret_train.models.peers). Paper FPS: its GPU; "
                 "ours: fastest backend at batch 1 on this machine.")
    return "\n".join(lines)


def sweep_table(record: dict[str, Any]) -> str:
    lines = [f"{'model':<13} {'backend':<16} {'batch':>5} {'img/s':>10} {'IQR':>8} {'p50 ms':>9} {'p99 ms':>9}  note"]
    for c in record["cells"]:
        if c["status"] == "ok":
            lines.append(f"{c['model']:<13} {c['backend']:<16} {c['batch']:>5} {c['img_s_median']:>10.1f} "
                         f"{c['img_s_iqr']:>8.1f} {c['latency_ms_p50']:>9.2f} {c['latency_ms_p99']:>9.2f}")
        else:
            lines.append(f"{c['model']:<13} {c['backend']:<16} {c['batch']:>5} {'-':>10} {'-':>8} {'-':>9} {'-':>9}"
                         f"  skipped: {c['reason']}")
    return "\n".join(lines)


def plot(record: dict[str, Any], out_dir: Path) -> list[Path]:
    """throughput.png (img/s vs batch) and latency.png (ms per batch vs batch), one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m["model"] for m in record["models"]]
    paths = []
    for key, ylabel, fname in (("img_s_median", "images / s (median)", "throughput.png"),
                               ("latency_ms_p50", "latency per batch, p50 (ms)", "latency.png")):
        fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), squeeze=False)
        for ax, model in zip(axes[0], models):
            for backend in dict.fromkeys(c["backend"] for c in record["cells"]):
                pts = [(c["batch"], c[key]) for c in record["cells"]
                       if c["model"] == model and c["backend"] == backend and c["status"] == "ok"]
                if pts:
                    ax.plot(*zip(*pts), "o-", label=backend)
            ax.set(title=model, xlabel="batch size", ylabel=ylabel, xscale="log", yscale="log")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
        hw = record["hardware"]
        fig.suptitle(f"{hw.get('gpu') or hw['cpu']} ({record['device']})", fontsize=9)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_outputs(record: dict[str, Any], out_dir: Path) -> list[Path]:
    from ferret_runtime.fileio import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    text = paper_table(record) + "\n\n" + sweep_table(record) + "\n"
    atomic_write(out_dir / "table.txt", lambda f: f.write(text.encode()))
    atomic_write(out_dir / "bench.json", lambda f: f.write(json.dumps(record, indent=2).encode()))
    return [out_dir / "table.txt", out_dir / "bench.json", *plot(record, out_dir)]


def default_out_dir(base: str | Path = "runs/bench") -> Path:
    from ferret_train.engine import next_run_dir

    return next_run_dir(base)


def main_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
