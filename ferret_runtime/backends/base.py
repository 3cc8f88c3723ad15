"""The backend interface: one file per runtime behind this base, picked by file suffix."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..preprocess import Preprocess

ENTRY_POINT_GROUP = "ferret.backends"


@dataclass
class ModelInfo:
    """What a loaded model says about itself (from checkpoint config or ONNX metadata)."""

    arch: str
    lpd_func: str
    window_size: int
    preprocess: Preprocess = field(default_factory=Preprocess)
    threshold: float = 0.5
    input_hw: tuple[int, int] | None = None  # fixed input size of the graph; None when any size runs
    extra: dict[str, Any] = field(default_factory=dict)


EXTERNAL_LPD = ("median", 3)  # the LPD a graph exported with --lpd external leaves to the runtime


def external_lpd(info: ModelInfo, source: str) -> bool:
    """Whether the model leaves its LPD to the runtime (lpd_mode "external"); ConfigError when that
    LPD is not the one the runtime computes (preprocess_lpd on a GPU, median_residual on a CPU)."""
    if info.extra.get("lpd_mode") != "external":
        return False
    if (info.lpd_func, info.window_size) != EXTERNAL_LPD:
        raise ConfigError(f"{source}: received a model without its LPD (lpd_mode external) whose LPD is "
                          f"{info.lpd_func}/{info.window_size}; expected {EXTERNAL_LPD[0]}/{EXTERNAL_LPD[1]}, the only "
                          "LPD the runtime computes outside the graph")
    return True


class Backend(ABC):
    """Runs FerretNet on a normalised float32 NCHW batch and returns one logit per image.

    Public methods validate, then call ``*_impl``; use as a context manager to release resources.
    """

    name: str = ""
    suffixes: tuple[str, ...] = ()
    info: ModelInfo

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits of shape (N,) for a batch in the model's input format (``info.preprocess``).

        Usually float32 NCHW, normalised; uint8 NHWC when the graph contains the preprocessing;
        the LPD residual of the normalised batch when it leaves the LPD out (lpd_mode "external").
        """
        self._validate(batch)
        out = np.asarray(self.run_impl(batch), dtype=np.float32).reshape(batch.shape[0], -1)
        return out[:, 0]

    def _validate(self, batch: np.ndarray) -> None:
        pre = self.info.preprocess
        channel_axis = 1 if pre.layout == "NCHW" else 3
        if not isinstance(batch, np.ndarray) or batch.dtype != np.dtype(pre.dtype) or batch.ndim != 4 \
                or batch.shape[channel_axis] != 3:
            got = f"{type(batch).__name__} {getattr(batch, 'dtype', '')} {getattr(batch, 'shape', '')}"
            raise ValueError(f"Received batch {got}; expected {pre.dtype} ndarray in {pre.layout} layout with 3 channels")

    @abstractmethod
    def run_impl(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None:
        """Release the model; idempotent."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def available_backends() -> dict[str, type[Backend]]:
    """Map file suffix -> backend class, from the ``ferret.backends`` entry points.

    Backend modules defer their heavy imports (torch, onnxruntime, tensorrt) to load time, so
    listing them is cheap. Two backends claiming one suffix is an error, not a silent override.
    """
    table, _ = _load_backends()
    return table


def _load_backends() -> tuple[dict[str, type[Backend]], dict[str, str]]:
    table: dict[str, type[Backend]] = {}
    unavailable: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except ImportError as e:  # a backend whose optional extra is not installed
            unavailable[ep.name] = str(e)
            continue
        for suffix in cls.suffixes:
            if suffix in table and table[suffix] is not cls:
                raise ConfigError(f"Backends {table[suffix].__name__} and {cls.__name__} both claim {suffix!r}")
            table[suffix] = cls
    return table, unavailable


def backend_for(path: str | Path) -> type[Backend]:
    """The backend class for a model file, or ConfigError listing the valid suffixes."""
    suffix = Path(path).suffix.lower()
    table, unavailable = _load_backends()
    if suffix not in table:
        missing = "".join(f"; backend {k!r} is not installed ({v})" for k, v in sorted(unavailable.items()))
        raise ConfigError(
            f"Received model file {str(path)!r} with suffix {suffix!r}; expected one of "
            f"{', '.join(sorted(table)) or '(no backend installed)'}{missing}"
        )
    return table[suffix]
