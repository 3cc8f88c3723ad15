"""The CUDA driver through cuda-python (torch-free): one status check for every call (``call``,
``CudaError``), the driver's version, compute capabilities, and memory, streams and events as owned objects.

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError, FerretError


# ------------------------------------------------------------------- cuda-python: imports, status checks
class CudaError(FerretError):
    """A CUDA driver or NVRTC call that did not succeed, or cuda-python/the driver missing."""

    def __init__(self, message: str, call: str = "", result: Any = None):
        super().__init__(message)
        self.call, self.result = call, result


def parse_arch(arch: int | str | tuple[int, int]) -> int:
    """80 from 80, 'sm_80', '8.0' or (8, 0)."""
    try:
        if isinstance(arch, tuple):
            value = arch[0] * 10 + arch[1]
        elif isinstance(arch, str):
            s = arch.lower().removeprefix("sm_").removeprefix("compute_")
            value = int(s.replace(".", "")) if "." in s else int(s)
        else:
            value = int(arch)
    except (TypeError, ValueError, IndexError):
        value = -1
    if value < 50:
        raise ConfigError(f"Received arch {arch!r}; expected a compute capability such as 80, 'sm_90' or (9, 0)")
    return value


def bindings(name: str) -> Any:
    try:
        import importlib

        return importlib.import_module(f"cuda.bindings.{name}")
    except ImportError as e:
        raise CudaError(f"Received no cuda-python ({e}); "
                        "expected it installed: pip install 'ferretnet-deploy[gpu]'") from None


def status_text(result: Any) -> str:
    """'CUDA_ERROR_NO_DEVICE (100: no CUDA-capable device is detected)' for a CUresult or nvrtcResult."""
    name = getattr(result, "name", str(result))
    try:
        if type(result).__name__ == "nvrtcResult":
            return f"{name} ({int(result)})"
        err, text = bindings("driver").cuGetErrorString(result)
        return f"{name} ({int(result)}: {text.decode()})" if int(err) == 0 else f"{name} ({int(result)})"
    except Exception:  # describing an error must not raise another one
        return f"{name} ({int(result)})"


def call(call: str, fn: Any, *args: Any) -> Any:
    """Run one cuda-python call; its status (first item of the returned tuple) must be success."""
    try:
        out = fn(*args)
    except RuntimeError as e:  # cuda.pathfinder's DynamicLibNotFoundError: libcuda or libnvrtc missing
        lib = "NVRTC library" if call.startswith("nvrtc") else "CUDA driver"
        hint = "pip install nvidia-cuda-nvrtc" if lib == "NVRTC library" else "an NVIDIA driver and a GPU"
        raise CudaError(f"{call}: received no {lib} ({str(e).splitlines()[0]}); expected {hint}", call) from None
    status, *values = out if isinstance(out, tuple) else (out,)
    if int(status) != 0:
        raise CudaError(f"{call}: received {status_text(status)}; expected success", call, status)
    return values[0] if len(values) == 1 else tuple(values)


def driver_version() -> tuple[int, int]:
    """The CUDA version the installed driver supports, e.g. (13, 0); CudaError without a driver."""
    v = call("cuDriverGetVersion", bindings("driver").cuDriverGetVersion)
    return int(v) // 1000, int(v) % 1000 // 10


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
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


def _driver() -> Any:
    drv = bindings("driver")
    call("cuInit", drv.cuInit, 0)
    return drv


def device_count() -> int:
    """Number of CUDA devices; CudaError when cuda-python or the driver is missing."""
    return call("cuDeviceGetCount", _driver().cuDeviceGetCount)


def device_info(index: int = 0) -> DeviceInfo:
    """Name, compute capability and memory of one device."""
    drv = _driver()
    count = call("cuDeviceGetCount", drv.cuDeviceGetCount)
    if not 0 <= index < count:
        raise CudaError(f"Received device index {index}; expected 0..{count - 1} ({count} CUDA device(s) visible)",
                        "cuDeviceGet")
    dev = call("cuDeviceGet", drv.cuDeviceGet, index)
    attr = drv.CUdevice_attribute
    major = call("cuDeviceGetAttribute", drv.cuDeviceGetAttribute,
                 attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
    minor = call("cuDeviceGetAttribute", drv.cuDeviceGetAttribute,
                 attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
    raw = call("cuDeviceGetName", drv.cuDeviceGetName, 256, dev)
    name = bytes(raw).split(b"\0", 1)[0].decode(errors="replace").strip()
    total = call("cuDeviceTotalMem", drv.cuDeviceTotalMem, dev)
    version = call("cuDriverGetVersion", drv.cuDriverGetVersion)
    return DeviceInfo(index, name, (int(major), int(minor)), int(total), int(version))


class Context:
    """The primary context of one device, retained until ``close()``; ``current()`` makes it current."""

    def __init__(self, device: int = 0):
        self._drv = _driver()
        self.device = device
        self._dev = call("cuDeviceGet", self._drv.cuDeviceGet, device)
        self._ctx: Any = call("cuDevicePrimaryCtxRetain", self._drv.cuDevicePrimaryCtxRetain, self._dev)

    @property
    def closed(self) -> bool:
        return self._ctx is None

    @contextmanager
    def current(self) -> Iterator[None]:
        """Push this context for the calls inside (contexts are per thread), pop it after."""
        if self._ctx is None:
            raise CudaError(f"Received a closed Context for device {self.device}; expected an open one")
        call("cuCtxPushCurrent", self._drv.cuCtxPushCurrent, self._ctx)
        try:
            yield
        finally:
            call("cuCtxPopCurrent", self._drv.cuCtxPopCurrent)

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx = None
            call("cuDevicePrimaryCtxRelease", self._drv.cuDevicePrimaryCtxRelease, self._dev)

    def __enter__(self) -> Context:
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
            self._handle = call("cuMemHostAlloc", self._drv.cuMemHostAlloc, self.nbytes, 0)

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
        call("cuMemFreeHost", self._drv.cuMemFreeHost, handle)


class DeviceBuffer(_Owned):
    """Global memory on the context's device (``cuMemAlloc``)."""

    def __init__(self, nbytes: int, context: Context):
        super().__init__(context)
        self.nbytes = _check_nbytes(nbytes, "device buffer")
        with context.current():
            self._handle = call("cuMemAlloc", self._drv.cuMemAlloc, self.nbytes)

    @property
    def ptr(self) -> int:
        return int(self._live())

    def _free(self, handle: Any) -> None:
        call("cuMemFree", self._drv.cuMemFree, handle)


class Stream(_Owned):
    """A non-blocking stream: work on it does not wait for the legacy default stream."""

    def __init__(self, context: Context):
        super().__init__(context)
        with context.current():
            self._handle = call("cuStreamCreate", self._drv.cuStreamCreate,
                                 int(self._drv.CUstream_flags.CU_STREAM_NON_BLOCKING))

    @property
    def handle(self) -> int:
        """The CUstream as an int (what TensorRT's ``execute_async_v3`` takes)."""
        return int(self._live())

    def synchronize(self) -> None:
        with self.context.current():
            call("cuStreamSynchronize", self._drv.cuStreamSynchronize, self._live())

    def _free(self, handle: Any) -> None:
        call("cuStreamDestroy", self._drv.cuStreamDestroy, handle)


class Event(_Owned):
    """A CUDA event, for timing (``elapsed_ms``) or for waiting on part of a stream."""

    def __init__(self, context: Context, timing: bool = True):
        super().__init__(context)
        flags = 0 if timing else int(self._drv.CUevent_flags.CU_EVENT_DISABLE_TIMING)
        with context.current():
            self._handle = call("cuEventCreate", self._drv.cuEventCreate, flags)

    def record(self, stream: Stream) -> None:
        with self.context.current():
            call("cuEventRecord", self._drv.cuEventRecord, self._live(), stream._live())

    def synchronize(self) -> None:
        with self.context.current():
            call("cuEventSynchronize", self._drv.cuEventSynchronize, self._live())

    def elapsed_ms(self, end: Event) -> float:
        """Milliseconds from this event to ``end`` (both recorded and completed)."""
        with self.context.current():
            return float(call("cuEventElapsedTime", self._drv.cuEventElapsedTime, self._live(), end._live()))

    def _free(self, handle: Any) -> None:
        call("cuEventDestroy", self._drv.cuEventDestroy, handle)


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
        call("cuMemcpyHtoDAsync", stream._drv.cuMemcpyHtoDAsync, dst._live(), src.ptr, nbytes, stream._live())


def copy_dtoh_async(dst: PinnedBuffer, src: DeviceBuffer, nbytes: int, stream: Stream) -> None:
    """Enqueue ``nbytes`` from the device to pinned host memory on ``stream``."""
    nbytes = _check_copy(nbytes, dst, src)
    with stream.context.current():
        call("cuMemcpyDtoHAsync", stream._drv.cuMemcpyDtoHAsync, dst.ptr, src._live(), nbytes, stream._live())
