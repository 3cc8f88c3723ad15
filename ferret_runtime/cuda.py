"""CUDA memory, streams and events as owned objects, through cuda-python's driver API (torch-free).

The pattern of TensorRT's ``samples/python/common_runtime.py``: pinned host and device buffers
allocated once and paired by the caller, streams as context managers, every status other than
success raised as a named ``CudaError``. Objects live in a device's *primary* context, the one the
CUDA runtime (and so TensorRT and PyTorch) uses, made current around each call.

Every object is freed by ``close()`` (idempotent) or by leaving its ``with`` block; there is no
``__del__``: freeing GPU memory from the garbage collector could only hide a failure. cuda-python
is imported on first use (the ``gpu``/``trt`` extras); without it, or without a driver, the first
call raises ``CudaError`` saying which is missing.
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from .kernels.launch import CudaError, _bindings, _call  # one status check for every cuda-python call


@dataclass(frozen=True)
class DeviceInfo:
    """What an engine build records about its GPU and what the runtime checks it against."""

    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int
    driver_version: int  # e.g. 13000 for CUDA 13.0

    @property
    def sm(self) -> str:
        """'9.0' style compute capability."""
        return "%d.%d" % self.compute_capability


def _driver() -> Any:
    drv = _bindings("driver")
    _call("cuInit", drv.cuInit, 0)
    return drv


def device_count() -> int:
    """Number of CUDA devices; CudaError when cuda-python or the driver is missing."""
    return _call("cuDeviceGetCount", _driver().cuDeviceGetCount)


def device_info(index: int = 0) -> DeviceInfo:
    """Name, compute capability and memory of one device."""
    drv = _driver()
    count = _call("cuDeviceGetCount", drv.cuDeviceGetCount)
    if not 0 <= index < count:
        raise CudaError(f"Received device index {index}; expected 0..{count - 1} ({count} CUDA device(s) visible)",
                        "cuDeviceGet")
    dev = _call("cuDeviceGet", drv.cuDeviceGet, index)
    attr = drv.CUdevice_attribute
    major = _call("cuDeviceGetAttribute", drv.cuDeviceGetAttribute, attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
    minor = _call("cuDeviceGetAttribute", drv.cuDeviceGetAttribute, attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
    raw = _call("cuDeviceGetName", drv.cuDeviceGetName, 256, dev)
    name = bytes(raw).split(b"\0", 1)[0].decode(errors="replace").strip()
    total = _call("cuDeviceTotalMem", drv.cuDeviceTotalMem, dev)
    version = _call("cuDriverGetVersion", drv.cuDriverGetVersion)
    return DeviceInfo(index, name, (int(major), int(minor)), int(total), int(version))


class Context:
    """The primary context of one device, retained until ``close()``; ``current()`` makes it current."""

    def __init__(self, device: int = 0):
        self._drv = _driver()
        self.device = device
        self._dev = _call("cuDeviceGet", self._drv.cuDeviceGet, device)
        self._ctx: Any = _call("cuDevicePrimaryCtxRetain", self._drv.cuDevicePrimaryCtxRetain, self._dev)

    @property
    def closed(self) -> bool:
        return self._ctx is None

    @contextmanager
    def current(self) -> Iterator[None]:
        """Push this context for the calls inside (contexts are per thread), pop it after."""
        if self._ctx is None:
            raise CudaError(f"Received a closed Context for device {self.device}; expected an open one")
        _call("cuCtxPushCurrent", self._drv.cuCtxPushCurrent, self._ctx)
        try:
            yield
        finally:
            _call("cuCtxPopCurrent", self._drv.cuCtxPopCurrent)

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx = None
            _call("cuDevicePrimaryCtxRelease", self._drv.cuDevicePrimaryCtxRelease, self._dev)

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Owned:
    """An allocation in a Context: ``close()`` frees it once, inside the context."""

    _what = "resource"

    def __init__(self, context: Context):
        self.context = context
        self._drv = context._drv
        self._handle: Any = None

    def _free(self, handle: Any) -> None:
        raise NotImplementedError

    def _live(self) -> Any:
        if self._handle is None:
            raise CudaError(f"Received a closed {type(self).__name__}; expected an open one (it was freed by close())")
        return self._handle

    @property
    def closed(self) -> bool:
        return self._handle is None

    def close(self) -> None:
        """Free it (idempotent); errors are raised, not swallowed."""
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        with self.context.current():
            self._free(handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_nbytes(nbytes: int, what: str) -> int:
    if not isinstance(nbytes, (int, np.integer)) or isinstance(nbytes, bool) or nbytes < 1:
        raise CudaError(f"Received {what} size {nbytes!r}; expected a positive number of bytes")
    return int(nbytes)


class PinnedBuffer(_Owned):
    """Page-locked host memory (``cuMemHostAlloc``), so copies to and from the GPU can be asynchronous."""

    def __init__(self, nbytes: int, context: Context):
        super().__init__(context)
        self.nbytes = _check_nbytes(nbytes, "pinned buffer")
        with context.current():
            self._handle = _call("cuMemHostAlloc", self._drv.cuMemHostAlloc, self.nbytes, 0)

    @property
    def ptr(self) -> int:
        return int(self._live())

    def array(self, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        """A numpy view of the first bytes; valid until ``close()`` (do not keep it longer)."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * dtype.itemsize > self.nbytes:
            raise CudaError(f"Received a view of {shape} {dtype} ({count * dtype.itemsize} bytes); expected at most "
                            f"{self.nbytes} bytes, the buffer's size")
        raw = (ctypes.c_uint8 * (count * dtype.itemsize)).from_address(self.ptr)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def _free(self, handle: Any) -> None:
        _call("cuMemFreeHost", self._drv.cuMemFreeHost, handle)


class DeviceBuffer(_Owned):
    """Global memory on the context's device (``cuMemAlloc``)."""

    def __init__(self, nbytes: int, context: Context):
        super().__init__(context)
        self.nbytes = _check_nbytes(nbytes, "device buffer")
        with context.current():
            self._handle = _call("cuMemAlloc", self._drv.cuMemAlloc, self.nbytes)

    @property
    def ptr(self) -> int:
        return int(self._live())

    def _free(self, handle: Any) -> None:
        _call("cuMemFree", self._drv.cuMemFree, handle)


class Stream(_Owned):
    """A non-blocking stream: work on it does not wait for the legacy default stream."""

    def __init__(self, context: Context):
        super().__init__(context)
        with context.current():
            self._handle = _call("cuStreamCreate", self._drv.cuStreamCreate,
                                 int(self._drv.CUstream_flags.CU_STREAM_NON_BLOCKING))

    @property
    def handle(self) -> int:
        """The CUstream as an int (what TensorRT's ``execute_async_v3`` takes)."""
        return int(self._live())

    def synchronize(self) -> None:
        with self.context.current():
            _call("cuStreamSynchronize", self._drv.cuStreamSynchronize, self._live())

    def _free(self, handle: Any) -> None:
        _call("cuStreamDestroy", self._drv.cuStreamDestroy, handle)


class Event(_Owned):
    """A CUDA event, for timing (``elapsed_ms``) or for waiting on part of a stream."""

    def __init__(self, context: Context, timing: bool = True):
        super().__init__(context)
        flags = 0 if timing else int(self._drv.CUevent_flags.CU_EVENT_DISABLE_TIMING)
        with context.current():
            self._handle = _call("cuEventCreate", self._drv.cuEventCreate, flags)

    def record(self, stream: Stream) -> None:
        with self.context.current():
            _call("cuEventRecord", self._drv.cuEventRecord, self._live(), stream._live())

    def synchronize(self) -> None:
        with self.context.current():
            _call("cuEventSynchronize", self._drv.cuEventSynchronize, self._live())

    def elapsed_ms(self, end: "Event") -> float:
        """Milliseconds from this event to ``end`` (both recorded and completed)."""
        with self.context.current():
            return float(_call("cuEventElapsedTime", self._drv.cuEventElapsedTime, self._live(), end._live()))

    def _free(self, handle: Any) -> None:
        _call("cuEventDestroy", self._drv.cuEventDestroy, handle)


def _check_copy(nbytes: int, *buffers: PinnedBuffer | DeviceBuffer) -> int:
    nbytes = _check_nbytes(nbytes, "copy")
    for b in buffers:
        if nbytes > b.nbytes:
            raise CudaError(f"Received a copy of {nbytes} bytes; expected at most {b.nbytes}, the size of a "
                            f"{type(b).__name__}")
    return nbytes


def copy_htod_async(dst: DeviceBuffer, src: PinnedBuffer, nbytes: int, stream: Stream) -> None:
    """Enqueue ``nbytes`` from pinned host memory to the device on ``stream``."""
    nbytes = _check_copy(nbytes, dst, src)
    with stream.context.current():
        _call("cuMemcpyHtoDAsync", stream._drv.cuMemcpyHtoDAsync, dst._live(), src.ptr, nbytes, stream._live())


def copy_dtoh_async(dst: PinnedBuffer, src: DeviceBuffer, nbytes: int, stream: Stream) -> None:
    """Enqueue ``nbytes`` from the device to pinned host memory on ``stream``."""
    nbytes = _check_copy(nbytes, dst, src)
    with stream.context.current():
        _call("cuMemcpyDtoHAsync", stream._drv.cuMemcpyDtoHAsync, dst.ptr, src._live(), nbytes, stream._live())
