"""Batches in flight on a GPU, shared by the TensorRT and the ONNX Runtime CUDA backends.

A slot is one batch's worth of buffers allocated once (pinned staging for the input and the
logits, device input and output, the uint8 batch on the device when the GPU preprocesses), a
stream and an event marking the logits' arrival. ``submit`` enqueues a batch on a free slot and
returns at once; ``Pending.result`` waits for that slot's event and frees it. ``run`` pipelines
the chunks of a batch larger than ``max_batch``.

GPU preprocessing: a float-input model takes the decoded uint8 NHWC batch instead, copies those
bytes (a quarter of float32's) to the device and launches ``normalize`` (the LPD is in the graph) or
the fused ``preprocess_lpd`` (``--lpd external`` graphs) from ``lpd.cu`` on the slot's stream,
writing straight into the model's input buffer. ``info.preprocess`` then says uint8 NHWC, so the
``Detector`` sends decoded bytes and does no float work on the host.

Torch-free: buffers and streams come from ``ferret_runtime.cuda`` (cuda-python).
"""

from __future__ import annotations

import queue
from abc import abstractmethod
from collections import deque
from dataclasses import replace
from typing import Any

import numpy as np

from ..cuda import CudaError
from ..errors import ConfigError, FerretError
from .base import Backend, Pending, as_logits, external_lpd


class Slot:
    """One batch in flight: its buffers, stream and event (``context``: TensorRT's execution context)."""

    def __init__(self, stream: Any, done: Any, host_in: Any = None, dev_in: Any = None, host_out: Any = None,
                 dev_out: Any = None, dev_u8: Any = None, context: Any = None):
        self.stream, self.done, self.context = stream, done, context
        self.host_in, self.dev_in, self.host_out, self.dev_out = host_in, dev_in, host_out, dev_out
        self.dev_u8 = dev_u8  # the uint8 batch on the device, when the GPU preprocesses (host_in then holds uint8)
        self.rows = self.n = 0


class SlotPending(Pending):
    """A batch enqueued by :meth:`SlotBackend.submit`; ``result()`` waits for its logits and frees its
    slot. Call ``result()`` exactly once, from any thread."""

    def __init__(self, backend: SlotBackend, slot: Slot):
        self._backend, self._slot = backend, slot

    def result(self) -> np.ndarray:
        slot, self._slot = self._slot, None
        if slot is None:
            raise FerretError("Received a second result() call on one Pending batch; expected one (its slot is reused)")
        try:
            out = self._backend._collect(slot)
        finally:
            self._backend._free.put(slot)
        return as_logits(out, out.shape[0])


class SlotBackend(Backend):
    """A backend with ``slots`` batches in flight. Subclasses set ``profile_min``/``profile_max`` (in
    the layout callers send; 0 for a size any value of which runs), ``input_dtype``, ``_ctx`` and
    ``_cuda``, call :meth:`_gpu_preprocessing` before allocating and :meth:`_start_slots` after, and
    implement ``_enqueue`` (upload with :meth:`_upload`, run, download, record ``slot.done``)."""

    slots: int = 2
    kernel: str | None = None  # the lpd.cu kernel preprocessing each batch on the GPU, if any
    profile_min: tuple[int, ...]
    profile_max: tuple[int, ...]
    input_dtype: np.dtype
    shape_hint = "the model's input sizes"  # what bounds the shapes, said when a batch is outside them

    def _gpu_preprocessing(self, index: int) -> None:
        """Take uint8 NHWC from now on: the model's float input is written by an lpd.cu kernel."""
        from ..kernels import launch

        info, pre = self.info, self.info.preprocess
        external = external_lpd(info, str(self.path))
        try:
            self._module = launch.get_module(index)  # NVRTC-compiled on first use, cached on disk per GPU
        except CudaError as e:
            raise ConfigError(f"{self.path}: GPU preprocessing needs lpd.cu compiled by NVRTC ({e}); expected "
                              "cuda-python with NVRTC (pip install 'ferretnet-deploy[gpu]'), or gpu_preprocess=False "
                              "to prepare batches on the host") from None
        self.kernel = "preprocess_lpd" if external else "normalize"
        self._model_pre = pre  # mean/std for the kernel, dtype of the model's input
        self.info = replace(info, preprocess=replace(pre, layout="NHWC", dtype="uint8"))

    def _caller_shape(self, model_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(N, 3, H, W) of the model -> (N, H, W, 3) when callers send uint8 for the GPU to preprocess."""
        if not self.kernel:
            return tuple(model_shape)
        n, c, h, w = model_shape
        return (n, h, w, c)

    def _start_slots(self, slots: list[Slot]) -> None:
        self._slots = slots
        self._free: queue.Queue[Slot] = queue.Queue()
        for slot in slots:
            self._free.put(slot)

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        lo, hi = self.profile_min, self.profile_max
        if len(shape) != len(hi) or any(not (a <= s <= b) for a, s, b in zip(lo[1:], shape[1:], hi[1:]) if b):
            raise ValueError(f"Received a batch of shape {shape}; expected shapes from {lo} to {hi} "
                             f"({self.shape_hint})")

    @property
    def max_batch(self) -> int:
        """The largest batch one ``submit`` takes."""
        return self.profile_max[0]

    def run_impl(self, batch: np.ndarray) -> np.ndarray:
        if batch.shape[0] == 0:
            return np.empty((0, self._out_per_item), self.output_dtype)
        self._check_shape(batch.shape)
        step, out, inflight = self.max_batch, [], deque()
        for i in range(0, batch.shape[0], step):  # chunk i+1 is copied while chunk i computes
            if len(inflight) == self.slots:
                out.append(inflight.popleft().result())
            inflight.append(self._submit(batch[i : i + step]))
        out.extend(p.result() for p in inflight)
        return np.concatenate(out)

    def submit_impl(self, batch: np.ndarray, block: bool) -> Pending | None:
        """Enqueue on a free slot (the batch is copied into its pinned buffer) and return at once."""
        self._check_shape(batch.shape)
        return self._submit(batch, block)

    def _submit(self, batch: np.ndarray, block: bool = True) -> Pending | None:
        try:
            slot = self._free.get(block=block)
        except queue.Empty:
            return None
        try:
            self._enqueue(slot, batch)
        except BaseException:
            self._free.put(slot)
            raise
        return SlotPending(self, slot)

    @abstractmethod
    def _enqueue(self, slot: Slot, batch: np.ndarray) -> None: ...

    def _upload(self, slot: Slot, batch: np.ndarray) -> tuple[int, ...]:
        """Stage ``batch`` (padded with zeros to the profile's smallest batch) in pinned memory and
        enqueue it into ``slot.dev_in`` on the slot's stream, through the preprocessing kernel when
        there is one; returns the model-side shape. Call with the context current."""
        n = batch.shape[0]
        pad = max(0, self.profile_min[0] - n)  # a profile whose smallest batch is > 1: pad with zeros, drop after
        shape = (n + pad, *batch.shape[1:])
        host_in = slot.host_in.array(batch.dtype, shape)
        np.copyto(host_in[:n], batch, casting="no")
        host_in[n:] = 0
        slot.rows, slot.n = shape[0], n
        if not self.kernel:
            self._cuda.copy_htod_async(slot.dev_in, slot.host_in, host_in.nbytes, slot.stream)
            return shape
        from ..kernels import launch

        # uint8 over PCIe, then normalise (+ LPD) into the model's input on the same stream
        self._cuda.copy_htod_async(slot.dev_u8, slot.host_in, host_in.nbytes, slot.stream)
        pre = self._model_pre
        getattr(launch, self.kernel)(self._module, slot.dev_u8.ptr, slot.dev_in.ptr, shape, self.input_dtype,
                                     pre.mean, pre.std, stream=slot.stream.handle)
        return (shape[0], 3, shape[1], shape[2])

    def _download(self, slot: Slot) -> None:
        """Enqueue the logits' copy to pinned memory and record the slot's event after it."""
        nbytes = slot.rows * self._out_per_item * self.output_dtype.itemsize
        self._cuda.copy_dtoh_async(slot.host_out, slot.dev_out, nbytes, slot.stream)
        slot.done.record(slot.stream)

    def _own(self, obj: Any) -> Any:
        """Register a CUDA object (context first, then streams and buffers) for :meth:`_release`."""
        self._closers.append(obj)
        return obj

    def _release(self) -> None:
        """Close what :meth:`_own` registered, newest first, so the context goes last (idempotent)."""
        closers, self._closers = getattr(self, "_closers", []), []
        for obj in reversed(closers):
            obj.close()

    def _drain(self) -> None:
        """Wait for the work still enqueued on the slots' streams (before their buffers are freed)."""
        for stream in {id(s.stream): s.stream for s in getattr(self, "_slots", [])}.values():
            if not stream.closed:
                stream.synchronize()

    def _collect(self, slot: Slot) -> np.ndarray:
        slot.done.synchronize()
        out = slot.host_out.array(self.output_dtype, (slot.rows, self._out_per_item))
        return out[: slot.n].copy()  # the pinned buffer is reused by the slot's next batch
