"""What ``ferret bench`` times in each cell: one callable per backend, built for a model and a batch size.

A runner is ``(one call, images per call, times on CUDA, release)``. Backends with batches in flight
(CPU streams, GPU slots) are timed with one batch per slot in flight at once, so a call's images are
``slots`` batches.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


class Skip(Exception):
    """This backend cannot run this model here; the message is the reason."""


def _is_ferret(name: str) -> bool:
    return name.startswith("ferretnet")


class Context:
    """Per-model state shared by the backends: the torch model, its checkpoint, its ONNX file."""

    def __init__(self, model: str, size: int, device: str, tmp: Path, threads: int | None, streams: int | None = None):
        import torch

        from ferret_train import create_model

        self.name, self.size, self.device, self.tmp, self.threads = model, size, device, tmp, threads
        self.streams = streams  # CPU streams of the ONNX Runtime rows (None: the backend's default)
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
            raise Skip(self._onnx_error)
        return self._onnx  # type: ignore[return-value]

    def _export(self) -> Path:
        import torch

        out = self.tmp / f"{self.name}.onnx"
        if _is_ferret(self.name):
            from ferret_export.onnx.export import export_onnx
            from ferret_export.onnx.graph import GraphOptions
            from ferret_train.checkpoint import save_checkpoint

            ckpt = save_checkpoint(self.tmp / f"{self.name}.pth", self.model)
            export_onnx(ckpt, out, GraphOptions(input_size=self.size, dynamic_hw=False), run_verify=False,
                        log=lambda *_: None)
            return out
        x = torch.zeros(1, 3, self.size, self.size)
        torch.onnx.export(self.model, (x,), str(out), input_names=["input"], output_names=["logit"],
                          dynamic_axes={"input": {0: "batch"}, "logit": {0: "batch"}}, opset_version=17, dynamo=False)
        return out


Runner = tuple[Callable[[], Any], int, bool, Callable[[], None]]  # (one call, images per call, on CUDA, release)


def _torch_runner(ctx: Context, backend: str, batch: int) -> Runner:
    import torch

    dev = torch.device(ctx.device)
    if backend == "torch-reference":
        if not _is_ferret(ctx.name):
            raise Skip("the unfold + median reference LPD exists only in FerretNet")
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

    return run, batch, dev.type == "cuda", lambda: None


def _ort_runner(ctx: Context, backend: str, batch: int) -> Runner:
    from ferret_runtime.backends.onnxruntime import OrtBackend

    path = ctx.onnx_path()
    x = np.random.default_rng(0).standard_normal((batch, 3, ctx.size, ctx.size)).astype(np.float32)
    if _is_ferret(ctx.name):
        # the session(s) alone on float input, as the other backend rows (the pipeline row times the rest)
        be = OrtBackend(path, device="cuda" if ctx.device.startswith("cuda") else "cpu", threads=ctx.threads or 0,
                        gpu_preprocess=False, max_batch=batch, streams=ctx.streams)
        return (*steady_state(be, x), False, be.close)
    import onnxruntime as ort  # peers: plain sessions (our backend wants FerretNet metadata) ...

    from ferret_runtime.backends.onnxruntime import CpuStreams, cpu_cores, default_streams

    # ... as many as the FerretNet rows get streams, so every model is timed the same way
    streams = ctx.streams or default_streams()
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, (ctx.threads or cpu_cores()) // streams)
    sessions = [ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]) for _ in range(streams)]
    name = sessions[0].get_inputs()[0].name
    if streams == 1:
        return (lambda: sessions[0].run(None, {name: x})), batch, False, lambda: None
    pool = CpuStreams(sessions, lambda session, b: session.run(None, {name: b})[0])

    def call() -> None:
        for pending in [pool.submit(x, block=True) for _ in range(streams)]:
            pending.result()

    return call, streams * batch, False, pool.close


def _openvino_runner(ctx: Context, backend: str, batch: int) -> Runner:
    """OpenVINO (f32) on the same export as the onnxruntime rows, with as many streams, on the CPU."""
    if importlib.util.find_spec("openvino") is None:
        raise Skip("OpenVINO is not installed (pip install 'ferretnet-deploy[openvino]')")
    if ctx.device != "cpu":
        raise Skip("the OpenVINO backend runs on the CPU")
    if not _is_ferret(ctx.name):
        raise Skip("the OpenVINO backend serves FerretNet exports (it reads their metadata)")
    from ferret_runtime.backends.openvino import OvBackend

    be = OvBackend(ctx.onnx_path(), device="cpu", threads=ctx.threads or 0, streams=ctx.streams)
    x = np.random.default_rng(0).standard_normal((batch, 3, ctx.size, ctx.size)).astype(np.float32)
    return (*steady_state(be, x), False, be.close)


def steady_state(be: Any, x: np.ndarray) -> tuple[Callable[[], Any], int]:
    """One call = one batch per slot, all in flight at once, then collected: a call's time is the
    backend's throughput for ``slots`` batches (timing each submit alone would alternate between
    instant and whole-batch calls, and their median would mean nothing)."""
    if be.slots < 2:
        return (lambda: be.run(x)), x.shape[0]

    def call() -> None:
        for pending in [be.submit(x) for _ in range(be.slots)]:
            pending.result()

    return call, be.slots * x.shape[0]


def _pipeline_runner(ctx: Context, backend: str, batch: int) -> Runner:
    if not _is_ferret(ctx.name):
        raise Skip("the runtime pipeline serves FerretNet models (ferret_runtime reads their metadata)")
    from PIL import Image

    from ferret_runtime import Detector

    det = Detector.open(ctx.onnx_path(), device="cuda" if ctx.device.startswith("cuda") else "cpu",
                        crop=ctx.size, batch_size=batch, backend="onnxruntime", threads=ctx.threads or 0,
                        max_batch=batch, streams=ctx.streams)
    rng = np.random.default_rng(0)
    images = []
    for _ in range(batch * max(det.backend.slots, 1)):  # one batch per slot, as `ferret detect` keeps them busy
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (ctx.size, ctx.size, 3), dtype=np.uint8)).save(buf, "PNG")
        images.append(buf.getvalue())
    return (lambda: det.predict(images)), len(images), False, det.close


def _trt_runner(ctx: Context, backend: str, batch: int) -> Runner:
    if importlib.util.find_spec("tensorrt") is None:
        raise Skip("TensorRT is not installed (pip install 'ferretnet-deploy[trt]' on a machine with an NVIDIA GPU)")
    if not ctx.device.startswith("cuda"):
        raise Skip("TensorRT needs a CUDA device")
    if not _is_ferret(ctx.name):
        raise Skip("TensorRT rows are built from our FerretNet export")
    precision = backend.split("-", 1)[1]
    if precision == "int8":
        raise Skip("INT8 engines need calibration images: build one with 'ferret export tensorrt --int8' "
                    "and time it with --backends pipeline on that engine")
    from ferret_export.tensorrt.build import export_and_build
    from ferret_runtime.backends.tensorrt import TrtBackend

    engine = ctx.tmp / f"{ctx.name}-{precision}-b{batch}.engine"
    if not engine.exists():
        export_and_build(ctx.tmp / f"{ctx.name}.pth" if (ctx.tmp / f"{ctx.name}.pth").exists() else _save(ctx),
                         engine, precision=precision, input_size=ctx.size, batch=(1, batch, batch), verify=False,
                         log=lambda *_: None)
    be = TrtBackend(engine, device="cuda", gpu_preprocess=False)  # the engine alone, as the other backend rows
    x = np.random.default_rng(0).standard_normal((batch, 3, ctx.size, ctx.size)).astype(
        np.float16 if be.info.preprocess.dtype == "float16" else np.float32)
    return (lambda: be.run(x)), batch, False, be.close


def _save(ctx: Context) -> Path:
    from ferret_train.checkpoint import save_checkpoint

    return save_checkpoint(ctx.tmp / f"{ctx.name}.pth", ctx.model)


RUNNERS: dict[str, Callable[[Context, str, int], Runner]] = {
    "torch-reference": _torch_runner, "torch": _torch_runner, "torch-compile": _torch_runner,
    "onnxruntime": _ort_runner, "openvino": _openvino_runner, "pipeline": _pipeline_runner,
    "tensorrt-fp32": _trt_runner, "tensorrt-fp16": _trt_runner, "tensorrt-int8": _trt_runner,
}
