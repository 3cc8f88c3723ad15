"""``Detector``: images in, FerretNet verdicts out, over any backend."""

from __future__ import annotations

import inspect
import math
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import tiling
from .backends import Backend, auto, external_lpd
from .backends.base import Pending
from .decode import load_prepared
from .errors import ConfigError, FerretError, ImageError
from .metadata import Scaling, scaling_of
from .preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageInput,
    Preprocess,
    check_max_pixels,
    load_image,
    median_residual,
    normalize,
    prepare,
)


@dataclass
class Result:
    """One image's verdict, or the reason it has none."""

    path: str
    logit: float | None = None
    prob_fake: float | None = None
    label: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "logit": self.logit, "prob_fake": self.prob_fake, "label": self.label}


def sigmoid(x: float) -> float:
    """Numerically stable logistic function."""
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _name(item: ImageInput, i: int) -> str:
    return str(item) if isinstance(item, (str, os.PathLike)) else f"<input {i}>"


class _Batch:
    """One batch of inputs: results made once all of its groups' logits (one per image, or one per
    tile) have arrived."""

    def __init__(self, det: Detector, names: list[str], decoded: list):
        self.det, self.names, self.decoded = det, names, decoded
        self.out: list = [None] * len(names)
        self.logits: list[list[float]] = [[] for _ in names]  # per image: its logit, or its tiles' logits
        self.parts: list[tuple[list[int], Any]] = []  # (image index per row, pending logits), oldest first

    def collect_oldest(self) -> None:
        idx, pending = self.parts.pop(0)
        for i, logit in zip(idx, pending.result()):
            self.logits[i].append(float(logit))

    def finish(self) -> list[tuple[Result, np.ndarray | None]]:
        while self.parts:
            self.collect_oldest()
        for i, logits in enumerate(self.logits):
            if self.out[i] is None:
                logit = (logits[0] if self.det.tile is None
                         else tiling.aggregate(logits, self.det.aggregate, self.det.topk))
                self.out[i] = (self.det._result(self.names[i], logit), self.decoded[i])
        return self.out


class Detector:
    """Classifies images as real or AI-generated with a FerretNet model of any supported format."""

    def __init__(self, backend: Backend, *, preprocess: Preprocess | None = None, threshold: float | None = None,
                 batch_size: int = 32, workers: int = 4, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 tile: int | None = None, tile_stride: int | None = None, aggregate: str = "max", topk: int = 3,
                 scaling: Scaling | None = None):
        """``tile``: classify every ``tile`` x ``tile`` crop of the whole image (``tile_stride`` apart,
        the last aligned to the border; smaller images zero-padded) and ``aggregate`` their logits
        ("max", "mean", or "topk": the mean of the ``topk`` largest); None: the preprocessing's crop.
        ``scaling``: the logit's calibration (default: the model's, from ``ferret calibrate``)."""
        if batch_size < 1:
            raise ValueError(f"Received batch_size {batch_size}; expected >= 1")
        self.max_pixels = check_max_pixels(max_pixels)  # larger images are refused from their header
        # how results name the model (Detector.open sets the file name; a backend may know its path)
        self.model_name = Path(str(getattr(backend, "path", backend.name))).name or backend.name
        # a graph exported with --lpd external takes the LPD residual: this pipeline computes it
        self.external_lpd = external_lpd(backend.info, str(getattr(backend, "path", backend.name)))
        self.backend = backend
        self.preprocess = preprocess or backend.info.preprocess
        self.tile, self.aggregate, self.topk = tile, aggregate, topk
        if tile is not None:
            self.tile_stride = tiling.check_tiling(tile, tile_stride, aggregate, topk)
            self.preprocess = replace(self.preprocess, crop=None)  # tiles are cut from the whole image
        self.threshold = backend.info.threshold if threshold is None else threshold
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"Received threshold {self.threshold!r}; expected a probability in [0, 1]")
        self.scaling = scaling_of(backend.info.extra, self.model_name) if scaling is None else scaling
        self.batch_size = batch_size
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="ferret-decode")
        self.prefetch = 2  # batches decoded ahead of the one running
        self._local = threading.local()  # each thread's normalisation buffer
        self.auto_choice: auto.Choice | None = None  # what backend auto measured and took (Detector.open)

    @classmethod
    def open(cls, path: str | Path, *, device: str = "auto", crop: int | None | str = "model",
             threshold: float | None = None, batch_size: int | None = None, workers: int = 4,
             max_pixels: int | None = DEFAULT_MAX_PIXELS, streams: int | None = None,
             tile: int | None | str = None, tile_stride: int | None = None, aggregate: str = "max",
             topk: int = 3, backend: str | None = None, **backend_options: Any) -> Detector:
        """Load a model file; the backend is chosen by suffix (or named), preprocessing read from the model.

        ``backend="auto"``: the suffix's backend, except an ``.onnx`` model on the CPU: the installed CPU
        runtime (ONNX Runtime, OpenVINO) measured fastest on this host for this model, once, cached on
        disk (``backends/auto.py``); ``auto_choice`` on the Detector and its backend says what it took.
        A name (``"onnxruntime"``, ``"openvino"``, ...) forces that backend; None: ``$FERRET_BACKEND`` for the files it
        reads, else auto.
        ``batch_size``: images per batch (None: the measured one under auto, else 32).
        ``device="auto"`` takes the GPU when the backend can use one, else the CPU.
        ``crop="model"`` keeps the model's own crop; an int or None (full size) overrides it.
        ``max_pixels`` refuses larger images from their header (None: only Pillow's 178.9 Mpx limit).
        ``streams``: CPU throughput streams of the ONNX Runtime backend (None: its default, from the
        core count); other ``backend_options`` go to the backend's constructor.
        ``tile="model"`` tiles with the model's own input size (its crop); an int sets it (see ``__init__``).
        """
        check_max_pixels(max_pixels)  # before loading a model for nothing
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"Received batch_size {batch_size}; expected >= 1")
        cls_backend, choice = auto.resolve(path, backend, device, streams, batch_size, backend_options)
        if choice is not None:
            streams, batch_size = choice.streams, batch_size or choice.batch
        batch_size = batch_size or 32
        if streams is not None:
            backend_options["streams"] = streams
        unknown = set(backend_options) - set(inspect.signature(cls_backend).parameters)
        if unknown:
            own = ", ".join(p for p in inspect.signature(cls_backend).parameters if p not in ("path", "device"))
            raise ConfigError(f"{path}: received option(s) {', '.join(sorted(unknown))} for the {cls_backend.name} "
                              f"backend; expected its own: {own}")
        try:
            opened = cls_backend(path, device=device, **backend_options)
        except FerretError as e:
            # errors from deep inside loading (e.g. Preprocess.from_dict on invalid preprocessing) do
            # not know which file they came from; the user needs it. The same exception, its message
            # prefixed: subclasses may carry more than a message
            if str(path) not in str(e) and len(e.args) == 1 and isinstance(e.args[0], str):
                e.args = (f"{path}: {e.args[0]}",)
            raise
        backend = opened
        backend.auto_choice = choice  # type: ignore[attr-defined]
        pre = backend.info.preprocess
        if crop != "model":
            pre = replace(pre, crop=crop)
        fixed = backend.info.input_hw
        if tile == "model":
            tile = backend.info.preprocess.crop or (fixed[0] if fixed is not None else None)
            if tile is None:
                backend.close()
                raise ConfigError(f"{path}: received tile 'model', but this model has no crop or fixed input size; "
                                  "expected a tile size such as 256")
        side = tile if tile is not None else pre.crop
        if fixed is not None and (side is None or (side, side) != tuple(fixed)):
            backend.close()
            raise ConfigError(f"{path}: received {'tile' if tile is not None else 'crop'} {side}; this model takes a "
                              f"fixed {fixed[0]}x{fixed[1]} input (export it with --dynamic-hw for other sizes)")
        try:
            det = cls(backend, preprocess=pre, threshold=threshold, batch_size=batch_size, workers=workers,
                      max_pixels=max_pixels, tile=tile, tile_stride=tile_stride, aggregate=aggregate, topk=topk)
        except BaseException:
            backend.close()
            raise
        det.model_name = Path(path).name
        det.auto_choice = choice
        return det

    def _decode(self, item: ImageInput, name: str) -> np.ndarray | FerretError:
        try:
            if self.tile is None:  # only the crop is decoded where a region decoder can (decode/)
                return load_prepared(item, self.preprocess, name, max_pixels=self.max_pixels)
            return prepare(load_image(item, name, max_pixels=self.max_pixels), self.preprocess)
        except FerretError as e:
            return e
        except Exception as e:  # MemoryError included: whatever one input does, the others go on
            return ImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})")

    def _result(self, name: str, logit: float) -> Result:
        if not math.isfinite(logit):
            # NaN/inf is a model (or weights) failure, never a verdict: no label, no prob_fake
            return Result(name, error=f"model {self.model_name} produced a non-finite logit ({logit}) for this image")
        p = sigmoid(float(self.scaling.apply(logit)))  # the raw logit stays the model's; prob_fake is calibrated
        return Result(name, float(logit), p, "fake" if p > self.threshold else "real")

    def predict_iter(self, inputs: Iterable[ImageInput]) -> Iterator[tuple[Result, np.ndarray | None]]:
        """Yield (result, prepared uint8 image or None) in input order, ``batch_size`` images at a time.

        Images of equal size share a batch; an unreadable image yields a Result with ``error`` set
        and does not stop the others. The next ``prefetch`` batches are decoded on the thread pool
        while one runs in the backend. Safe to call from several threads at once.
        """
        return self.predict_named((_name(item, i), item) for i, item in enumerate(inputs))

    def predict_named(self, pairs: Iterable[tuple[str, ImageInput]]) -> Iterator[tuple[Result, np.ndarray | None]]:
        """As :meth:`predict_iter`, for (name, input) pairs: the name becomes ``Result.path``."""
        decoding: deque[tuple[list[str], list[Future]]] = deque()
        running: deque[_Batch] = deque()  # started on the backend, yielded in order
        chunk: list[tuple[str, ImageInput]] = []

        def submit() -> None:
            decoding.append(([n for n, _ in chunk], [self._pool.submit(self._decode, item, n) for n, item in chunk]))

        def start_next() -> Iterator[tuple[Result, np.ndarray | None]]:
            running.append(self._start(*decoding.popleft(), running))
            while len(running) >= max(self.backend.slots, 1):  # slots - 1 batches stay in flight
                yield from running.popleft().finish()

        for name, item in pairs:
            chunk.append((name, item))
            if len(chunk) == self.batch_size:
                submit()
                chunk = []
                if len(decoding) > self.prefetch:
                    yield from start_next()
        if chunk:
            submit()
        while decoding:
            yield from start_next()
        while running:
            yield from running.popleft().finish()

    def run_chunk(self, chunk: list[tuple[str, ImageInput]]) -> list[tuple[Result, np.ndarray | None]]:
        """Decode (on the pool) and classify one chunk of (name, input) pairs, in order: what a
        batcher hands over once it has gathered a batch. Safe to call from several threads."""
        futures = [self._pool.submit(self._decode, item, n) for n, item in chunk]
        return self._start([n for n, _ in chunk], futures, deque()).finish()

    @property
    def pipelined(self) -> bool:
        """The backend keeps batches in flight (GPU slots, CPU streams): submit now, collect later."""
        return self.backend.slots >= 2

    def _start(self, names: list[str], futures: list[Future], running: deque[_Batch]) -> _Batch:
        """Wait for one batch's decoding, then submit its images, grouped by size, at most
        ``backend.max_batch`` at a time (one code path for every backend: a synchronous one has
        run them when ``submit`` returns)."""
        decoded = [f.result() for f in futures]
        batch = _Batch(self, names, decoded)
        groups: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}  # shape -> (image index, array) rows
        for i, img in enumerate(decoded):
            if isinstance(img, FerretError):
                batch.out[i] = (Result(names[i], error=str(img)), None)
            elif self.tile is not None:
                for t in tiling.make_tiles(img, self.tile, self.tile_stride):
                    groups.setdefault(t.shape, []).append((i, t))
            else:
                groups.setdefault(img.shape, []).append((i, img))
        for rows in groups.values():
            step = self.backend.max_batch or len(rows)
            if self.tile is not None:  # tiles multiply the rows: at most batch_size of them per submit
                step = min(step, self.batch_size)
            for j in range(0, len(rows), step):
                part = rows[j : j + step]
                batch.parts.append(([i for i, _ in part], self._submit(np.stack([a for _, a in part]), running, batch)))
        return batch

    def _submit(self, u8: np.ndarray, running: deque[_Batch], current: _Batch) -> Pending:
        """Hand one group to the backend. When all its slots are taken, this caller first collects its
        own oldest batch (earlier batches in ``running``, then this one's groups): a thread never waits
        for a slot while holding one, which would deadlock when every slot is its own."""
        x = self._batch(u8)  # this thread's buffer: the backend copies what it keeps
        while True:
            held = [b for b in running if b.parts] + ([current] if current.parts else [])
            pending = self.backend.submit(x, block=not held)
            if pending is not None:
                return pending
            held[0].collect_oldest()

    def _batch(self, u8: np.ndarray) -> np.ndarray:
        """uint8 NHWC -> the model's input format (the graph may do the normalisation itself, or
        leave the LPD to us)."""
        pre = self.preprocess
        if pre.dtype == "uint8":
            return u8 if pre.layout == "NHWC" else np.ascontiguousarray(u8.transpose(0, 3, 1, 2))
        shape = (u8.shape[0], 3, u8.shape[1], u8.shape[2])
        buf = getattr(self._local, "buffer", None)
        if buf is None or buf.shape != shape:
            buf = self._local.buffer = np.empty(shape, np.float32)  # per thread, reused while batches keep their shape
        x = normalize(u8, pre.mean, pre.std, out=buf)
        if self.external_lpd:
            x = median_residual(x)
        return x if pre.dtype == "float32" else x.astype(pre.dtype)

    def predict(self, inputs: ImageInput | Iterable[ImageInput]) -> list[Result]:
        """Results for one input or many, in input order."""
        if isinstance(inputs, (str, os.PathLike, bytes, np.ndarray)) or not isinstance(inputs, Iterable):
            inputs = [inputs]
        return [r for r, _ in self.predict_iter(inputs)]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.backend.close()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
