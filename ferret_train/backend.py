"""PyTorch backend for ``ferret_runtime.Detector``: runs ``.pth``/``.pt`` checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ferret_runtime.backends.base import Backend, ModelInfo
from ferret_runtime.errors import ConfigError


class TorchBackend(Backend):
    """Eager PyTorch on CPU or CUDA, float32, no autograd."""

    name = "torch"
    suffixes = (".pth", ".pt")

    def __init__(self, path: str | Path, *, device: str = "auto", lpd_func: str | None = None,
                 window_size: int | None = None, lpd_impl: str = "fast"):
        import torch  # deferred: the base install has no torch

        from .checkpoint import load_checkpoint

        self._torch = torch
        self.path = Path(path)  # error rows name the model file
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError:
            raise ConfigError(f"Received device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"Received device {device!r}, but PyTorch sees no CUDA device")
        self.loaded = load_checkpoint(path, lpd_func=lpd_func, window_size=window_size, lpd_impl=lpd_impl)
        self.model = self.loaded.model.to(self.device)
        cfg = self.loaded.config
        cal = self.loaded.calibration  # the threshold and logit scaling 'ferret calibrate' fitted
        extra: dict[str, Any] = {"source_format": self.loaded.source_format, "lpd_source": self.loaded.lpd_source}
        if cal is not None:
            extra["provenance"] = {"calibration": cal}  # where ONNX models carry it too
        self.info = ModelInfo(cfg.arch, cfg.lpd_func, cfg.window_size, self.loaded.preprocess,
                              threshold=float(cal["threshold"]) if cal is not None else 0.5, extra=extra)

    def run_impl(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            x = self._torch.from_numpy(batch).to(self.device)
            return self.model(x).float().cpu().numpy()

    def explainer(self, out_dir: Path) -> Callable[[np.ndarray, Any], Path]:
        """A callable that saves the Grad-CAM panel of one prepared uint8 image."""
        from .explain import Explainer

        return Explainer(self.model, self.info.preprocess, out_dir)

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
