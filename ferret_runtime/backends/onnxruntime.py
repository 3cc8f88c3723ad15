"""ONNX Runtime backend: ``.onnx`` files exported by ``ferret export onnx``, on CPU or CUDA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..metadata import decode
from .base import Backend, ModelInfo

_LEVELS = ("disable", "basic", "extended", "all")


class OrtBackend(Backend):
    """An ``onnxruntime.InferenceSession`` with the CUDA provider for ``device='cuda'``, else CPU.

    ``threads`` sets intra-op threads (0: ONNX Runtime's choice, one per physical core);
    ``optimization`` the graph optimisation level; ``session_options`` any further
    ``SessionOptions`` attributes by name; ``io_binding`` (default: on for CUDA) binds the input
    and output explicitly so the session does not allocate and copy them per call.
    """

    name = "onnxruntime"
    suffixes = (".onnx",)

    def __init__(self, path: str | Path, *, device: str = "auto", threads: int = 0, optimization: str = "all",
                 session_options: dict[str, Any] | None = None, io_binding: bool | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("ONNX models need onnxruntime: pip install 'ferretnet-deploy[export]' "
                              "(or onnxruntime-gpu for CUDA)") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"{self.path}: no such model file")
        if optimization not in _LEVELS:
            raise ConfigError(f"Received optimization {optimization!r}; expected one of {_LEVELS}")
        providers = self._providers(ort, device)
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_{'ENABLE_' if optimization != 'disable' else ''}{optimization.upper()}")
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        for key, value in (session_options or {}).items():
            if not hasattr(so, key):
                raise ConfigError(f"Received session option {key!r}; not an onnxruntime.SessionOptions attribute")
            setattr(so, key, value)
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/NotImplemented types
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{self.path}: ONNX Runtime cannot load this model ({first})") from None
        meta = decode(self.session.get_modelmeta().custom_metadata_map, str(self.path))
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0].shape) != 4:
            raise ConfigError(f"{self.path}: received a model with {len(inputs)} inputs / {len(outputs)} outputs; "
                              "expected one 4-D input and one output")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        pre = meta["preprocess"]
        hw = inputs[0].shape[1:3] if pre.layout == "NHWC" else inputs[0].shape[2:4]
        self.info = ModelInfo(meta["arch"], meta["lpd_func"], meta["window_size"], pre, meta["threshold"],
                              input_hw=tuple(hw) if all(isinstance(d, int) for d in hw) else None,
                              extra={k: meta[k] for k in ("lpd_mode", "precision", "toolkit_version", "provenance") if k in meta})
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.io_binding = self.device == "cuda" if io_binding is None else io_binding

    @staticmethod
    def _providers(ort, device: str) -> list[str]:
        available = ort.get_available_providers()
        if device == "auto":
            device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        if device == "cpu":
            return ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in available:
                raise ConfigError(f"Received device {device!r}, but this onnxruntime has no CUDA provider "
                                  f"(available: {', '.join(available)}); pip install onnxruntime-gpu")
            index = int(device.split(":")[1]) if ":" in device else 0
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]  # type: ignore[list-item]
        raise ConfigError(f"Received device {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")

    def run_impl(self, batch: np.ndarray) -> np.ndarray:
        if not self.io_binding:
            return self.session.run([self.output_name], {self.input_name: batch})[0]
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)  # one host->device copy, done by the provider
        binding.bind_output(self.output_name, "cpu")  # logits are tiny: bring them straight back
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
