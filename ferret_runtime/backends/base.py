"""The backend interface: one file per runtime behind this base, picked by file suffix (built-ins plus
``ferret.backends`` entry points)."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
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


class Pending(ABC):
    """A batch handed to :meth:`Backend.submit`; ``result()`` waits for its logits (N,). Call it once."""

    @abstractmethod
    def result(self) -> np.ndarray: ...


class Ready(Pending):
    """A batch that already ran: what a synchronous backend's ``submit`` returns."""

    def __init__(self, logits: np.ndarray):
        self._logits = logits

    def result(self) -> np.ndarray:
        return self._logits


def as_logits(out: Any, n: int) -> np.ndarray:
    """A backend's raw output for ``n`` images -> float32 logits (N,): one value per image, column 0."""
    return np.asarray(out, dtype=np.float32).reshape(n, -1)[:, 0]


class Backend(ABC):
    """Runs FerretNet on a batch in the model's input format and returns one logit per image.

    The contract every backend keeps, on every device (the ``Detector`` has one code path for all):
    ``run(batch)`` returns the logits; ``submit(batch, block)`` starts a batch and returns a
    :class:`Pending` (or None when ``block=False`` and all ``slots`` are busy); ``slots`` is how many
    batches may be in flight at once (1: ``submit`` runs the batch before returning); ``max_batch``
    the most images one ``submit`` takes (None: any). Public methods validate, then call ``*_impl``;
    use as a context manager to release resources.
    """

    name: str = ""
    suffixes: tuple[str, ...] = ()
    info: ModelInfo
    slots: int = 1
    max_batch: int | None = None

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits of shape (N,) for a batch in the model's input format (``info.preprocess``).

        Usually float32 NCHW, normalised; uint8 NHWC when the graph contains the preprocessing;
        the LPD residual of the normalised batch when it leaves the LPD out (lpd_mode "external").
        """
        self._validate(batch)
        return as_logits(self.run_impl(batch), batch.shape[0])

    def submit(self, batch: np.ndarray, block: bool = True) -> Pending | None:
        """Start one batch of at most ``max_batch`` images; ``result()`` of the returned Pending gives
        its logits. The caller may reuse ``batch`` as soon as this returns (a backend that keeps it
        copies it).

        With every slot holding an uncollected batch, waits for one (``block=True``) or returns None.
        A caller that holds pending batches of its own must not wait: it would wait on itself when
        every slot is its own. It tries ``block=False`` and, on None, collects its oldest batch first
        (what the ``Detector`` does).
        """
        self._validate(batch)
        if self.max_batch is not None and not 1 <= batch.shape[0] <= self.max_batch:
            raise ValueError(f"Received a batch of {batch.shape[0]}; expected 1..{self.max_batch} per submit "
                             "(run() splits larger ones)")
        return self.submit_impl(batch, block)

    def submit_impl(self, batch: np.ndarray, block: bool) -> Pending | None:
        """Synchronous by default: the batch runs now, one caller at a time (``slots`` = 1)."""
        with self._run_lock():
            return Ready(as_logits(self.run_impl(batch), batch.shape[0]))

    def _run_lock(self) -> threading.Lock:
        # created on first use: subclasses need not call a base __init__ (dict.setdefault is atomic)
        return self.__dict__.setdefault("_lock", threading.Lock())

    def _validate(self, batch: np.ndarray) -> None:
        pre = self.info.preprocess
        channel_axis = 1 if pre.layout == "NCHW" else 3
        if not isinstance(batch, np.ndarray) or batch.dtype != np.dtype(pre.dtype) or batch.ndim != 4 \
                or batch.shape[channel_axis] != 3:
            got = f"{type(batch).__name__} {getattr(batch, 'dtype', '')} {getattr(batch, 'shape', '')}"
            raise ValueError(f"Received batch {got}; expected {pre.dtype} ndarray in {pre.layout} layout "
                             "with 3 channels")

    @abstractmethod
    def run_impl(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027 (a hook, not abstract: a backend with nothing to release keeps it)
        """Release the model; idempotent."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The backends this package ships, by import path: registered here so that a plain checkout (not
# pip-installed, so without entry points) has them, and imported only when a model is opened, so the
# torch-free base never imports torch. Installed ``ferret.backends`` entry points add others.
BUILTIN_BACKENDS: dict[str, str] = {
    "torch": "ferret_train.backend:TorchBackend",
    "onnxruntime": "ferret_runtime.backends.onnxruntime:OrtBackend",
    "tensorrt": "ferret_runtime.backends.tensorrt:TrtBackend",
}

# Built-in backends that claim no suffix (another backend owns their files' suffix): chosen by name only,
# ``--backend openvino`` or by ``--backend auto`` (backends/auto.py). Such a class lists the suffixes it
# reads in ``reads``.
NAMED_BACKENDS: dict[str, str] = {
    "openvino": "ferret_runtime.backends.openvino:OvBackend",
}


def available_backends() -> dict[str, type[Backend]]:
    """Map file suffix -> backend class: the built-in backends, then the ``ferret.backends`` entry points.

    Backend modules defer their heavy imports (torch, onnxruntime, tensorrt) to load time, so
    listing them is cheap. Two backends claiming one suffix is an error, not a silent override;
    so is one name for two different classes.
    """
    table, _ = _load_backends()
    return table


def _registered() -> list[EntryPoint]:
    """The built-ins, then each installed entry point whose name is new. An installed entry point
    may repeat a built-in (this package's own, when it is pip-installed) if it names the same class;
    a name bound to two different classes is a ConfigError (torchvision's rule for its registry)."""
    found = {name: EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in BUILTIN_BACKENDS.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        first = found.setdefault(ep.name, ep)
        if first is not ep and first.value != ep.value and not _same_object(first, ep):
            raise ConfigError(f"Received backend {ep.name!r} twice: as {first.value} and as {ep.value} (an installed "
                              f"{ENTRY_POINT_GROUP} entry point); expected one class per name")
    return list(found.values())


def _same_object(a: EntryPoint, b: EntryPoint) -> bool:
    """Whether two import paths name one object (a re-export); False when either cannot be imported."""
    try:
        return a.load() is b.load()
    except ImportError:
        return False


def _load_backends() -> tuple[dict[str, type[Backend]], dict[str, str]]:
    table: dict[str, type[Backend]] = {}
    unavailable: dict[str, str] = {}
    for ep in _registered():
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


def backend_named(name: str, path: str | Path) -> type[Backend]:
    """The backend class called ``name`` (a suffix backend or one of NAMED_BACKENDS) for a model file, or a
    ConfigError naming the backends there are, or the extra that installs this one, or the suffixes it reads."""
    table, unavailable = _load_backends()
    by_name = {cls.name: cls for cls in table.values()}
    if name not in by_name and name in NAMED_BACKENDS:
        try:
            by_name[name] = EntryPoint(name, NAMED_BACKENDS[name], ENTRY_POINT_GROUP).load()
        except ImportError as e:
            unavailable[name] = str(e)
    if name not in by_name:
        if name in unavailable:
            raise ConfigError(f"Received backend {name!r}, which is not installed ({unavailable[name]})")
        known = sorted({*by_name, *NAMED_BACKENDS, *unavailable})
        raise ConfigError(f"Received backend {name!r}; expected auto or one of {', '.join(known)}")
    cls = by_name[name]
    reads = getattr(cls, "reads", None) or cls.suffixes
    suffix = Path(path).suffix.lower()
    if suffix not in reads:
        raise ConfigError(f"Received model file {str(path)!r} for backend {name!r}, which reads "
                          f"{', '.join(reads)} files; expected one of those (or --backend auto)")
    return cls
