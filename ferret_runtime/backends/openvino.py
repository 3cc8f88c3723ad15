"""OpenVINO backend: the ``.onnx`` files ``ferret export onnx`` writes, run on the CPU by OpenVINO.

``.onnx`` belongs to ONNX Runtime in the suffix table; this backend is picked by name (``--backend openvino``,
``Detector.open(..., backend="openvino")``) or by ``--backend auto`` when it measured faster on this host.

Precision is pinned: ``INFERENCE_PRECISION_HINT=f32``. On CPUs with AMX or AVX-512 BF16 OpenVINO otherwise runs
float32 models in bfloat16 (8 mantissa bits), which moved the authors' FerretNet-S logits by up to 1.5; in f32 its
logits agree with ONNX Runtime's within the project's parity bound. Throughput streams as the ONNX Runtime backend:
``streams`` OpenVINO CPU streams (``NUM_STREAMS``) sharing ``threads``, one infer request each, fed batches
concurrently; ``slots`` then equals ``streams``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..metadata import check_arch_size, check_logit_output, decode
from ..onnx_weights import initializer_values
from .base import Backend, ModelInfo, Pending
from .onnxruntime import CpuStreams, cpu_cores, default_streams

# Always set, whatever ``config`` says: f32 keeps parity with ONNX Runtime (bf16 does not).
PINNED = {"INFERENCE_PRECISION_HINT": "f32"}


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None when it is not installed (nothing imported otherwise)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("openvino")
    except PackageNotFoundError:
        return None


class OvBackend(Backend):
    """An OpenVINO ``CompiledModel`` on the CPU.

    ``threads``: inference threads in all (0: one per usable core); ``streams``: concurrent CPU streams
    (None: :func:`default_streams`, as ONNX Runtime's); ``config``: further OpenVINO CPU properties by name
    (``INFERENCE_PRECISION_HINT`` stays f32).
    """

    name = "openvino"
    suffixes = ()  # .onnx is ONNX Runtime's in the suffix table: this one is chosen by name or by auto
    reads = (".onnx",)

    def __init__(self, path: str | Path, *, device: str = "auto", threads: int = 0, streams: int | None = None,
                 config: dict[str, Any] | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise ConfigError("The openvino backend needs OpenVINO: pip install 'ferretnet-deploy[openvino]'") from None
        self.path, self._streams, self.slots = Path(path), None, 1
        if device not in ("auto", "cpu"):
            raise ConfigError(f"Received device {device!r} for the openvino backend; expected 'cpu' or 'auto' "
                              "(it runs on the CPU; use the onnxruntime or tensorrt backend on a GPU)")
        if not self.path.is_file():
            raise ConfigError(f"{self.path}: no such model file")
        if streams is not None and (not isinstance(streams, int) or isinstance(streams, bool) or streams < 1):
            raise ConfigError(f"Received streams {streams!r}; expected an integer >= 1 (or None for the default)")
        if not isinstance(threads, int) or threads < 0:
            raise ConfigError(f"Received threads {threads!r}; expected an integer >= 0 (0: one per core)")
        streams = default_streams() if streams is None else streams
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except Exception as e:  # OpenVINO raises RuntimeError/GeneralFailure with multi-line text
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{self.path}: OpenVINO cannot read this model ({first})") from None
        meta = self._check_graph(model)
        props = {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": str(streams),
                 "INFERENCE_NUM_THREADS": str(max(threads or cpu_cores(), streams)), **(config or {}), **PINNED}
        try:
            self.compiled = core.compile_model(model, "CPU", props)
        except Exception as e:
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{self.path}: OpenVINO cannot compile this model for the CPU ({first})") from None
        precision = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        if precision != ov.Type.f32:  # never silently run a float32 model in bfloat16
            raise ConfigError(f"{self.path}: OpenVINO compiled with inference precision {precision}; expected f32")
        inp = model.inputs[0]
        pre = meta["preprocess"]
        dims = list(inp.get_partial_shape())
        hw = dims[1:3] if pre.layout == "NHWC" else dims[2:4]
        fixed = all(d.is_static for d in hw)
        self.info = ModelInfo(meta["arch"], meta["lpd_func"], meta["window_size"], pre, meta["threshold"],
                              input_hw=tuple(d.get_length() for d in hw) if fixed else None,
                              extra={k: meta[k] for k in ("lpd_mode", "precision", "toolkit_version", "provenance")
                                     if k in meta})
        self.device, self.streams = "cpu", streams
        self._requests = [self.compiled.create_infer_request() for _ in range(streams)]
        self._request_lock = threading.Lock()
        if streams > 1:
            self._streams = CpuStreams(self._requests, self._run_request)
            self.slots = streams

    def _check_graph(self, model: Any) -> dict[str, Any]:
        """The ferret metadata (ONNX metadata_props, which OpenVINO keeps under rt_info 'framework'), checked
        against the graph as the ONNX Runtime backend checks it."""
        rt = model.get_rt_info()
        props: dict[str, str] = {}
        if "framework" in rt.keys():
            framework = rt["framework"]
            props = {k: framework[k].astype(str) for k in framework.keys()}
        meta = decode(props, str(self.path))
        inputs = model.inputs
        if len(inputs) != 1 or len(inputs[0].get_partial_shape()) != 4:
            raise ConfigError(f"{self.path}: received a model with {len(inputs)} inputs of shapes "
                              f"{[str(i.get_partial_shape()) for i in inputs]}; expected one 4-D input")
        shapes = [[d.get_length() if d.is_static else None for d in o.get_partial_shape()] for o in model.outputs]
        check_logit_output(shapes, str(self.path))
        check_arch_size(meta["arch"], initializer_values(self.path.read_bytes()), str(self.path))
        return meta

    @staticmethod
    def _run_request(request: Any, batch: np.ndarray) -> np.ndarray:
        request.infer({0: batch})
        return request.get_output_tensor(0).data.copy()  # the request's buffer is reused by its next batch

    def run_impl(self, batch: np.ndarray) -> np.ndarray:
        if self._streams is not None:
            return self._streams.submit(batch, block=True).result()
        with self._request_lock:  # one infer request: one batch at a time (run() and submit() both come here)
            return self._run_request(self._requests[0], batch)

    def submit_impl(self, batch: np.ndarray, block: bool) -> Pending | None:
        if self._streams is not None:
            return self._streams.submit(batch, block)
        return super().submit_impl(batch, block)

    def close(self) -> None:
        """Finish the batches in flight, then release the compiled model (idempotent)."""
        streams, self._streams = getattr(self, "_streams", None), None
        if streams is not None:
            streams.close()
        self._requests, self.compiled = [], None
