"""Stand-ins for the GPU side, so the runtime's own GPU code paths run on a CPU.

``fake_cuda(monkeypatch)`` swaps ``ferret_runtime.cuda``'s buffers for host memory and its streams for
``LazyStream``, whose work runs only when an event on it (or the stream) is synchronised, as late as a
real GPU may run it; kernel launches (``launch.get_module``) go to ``HostLpdModule``, which runs the
kernels' blocks on the CPU when the stream gets to them. What real CUDA does is the GPU tests' business.
"""

from __future__ import annotations

import numpy as np

from ferret_runtime import cuda
from ferret_runtime.kernels import host, launch, nvrtc

def _driver_for_local_nvrtc() -> int:
    """A driver as new as the NVRTC installed here, as a working deployment has (the engine refuses
    plugin PTX from a newer NVRTC: tested on its own with an explicit older driver)."""
    try:
        major, minor = nvrtc.nvrtc_version()
    except cuda.CudaError:
        return 13000
    return major * 1000 + minor * 10


GPU = cuda.DeviceInfo(0, "NVIDIA H100 80GB HBM3", (9, 0), 80 << 30, _driver_for_local_nvrtc())


class HostMemory:
    """ferret_runtime.cuda's buffers, in host memory."""

    def __init__(self, nbytes, context=None):
        self.nbytes, self._mem, self.closed = nbytes, np.zeros(nbytes, np.uint8), False

    @property
    def ptr(self):
        return self._mem.ctypes.data

    def array(self, dtype, shape):
        return self._mem[: int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    def close(self):
        self.closed = True


def fake_cuda(monkeypatch):
    import contextlib
    import ctypes

    class Ctx:
        closed = False

        def __init__(self, device=0):
            pass

        @contextlib.contextmanager
        def current(self):
            yield

        def close(self):
            self.closed = True

    def copy(dst, src, nbytes, stream):
        stream.enqueue(lambda: ctypes.memmove(dst.ptr, src.ptr, nbytes))

    for name, value in dict(device_info=lambda index=0: GPU, Context=Ctx, PinnedBuffer=HostMemory,
                            DeviceBuffer=HostMemory, Stream=LazyStream, Event=LazyEvent, copy_htod_async=copy,
                            copy_dtoh_async=copy).items():
        monkeypatch.setattr(cuda, name, value)
    module = HostLpdModule()
    monkeypatch.setattr(launch, "get_module", lambda device=0: module)
    return module


class HostLpdModule:
    """launch.LpdModule whose launches run the kernel's blocks on the CPU (host.emulate_*) when the stand-in
    stream gets to them: the launch tuple, pointers, sizes and stream order are the real ones."""

    arch = 90

    def __init__(self):
        self.launches = []

    def launch(self, cfg, args, stream=0):
        self.launches.append((cfg, args[2:]))
        LazyStream.by_handle[stream].enqueue(lambda: self._run(cfg, args))

    @staticmethod
    def _run(cfg, args):
        import ctypes

        image_ptr, out_ptr, n, h, w, *norm = args
        images = np.frombuffer((ctypes.c_uint8 * (n * h * w * 3)).from_address(image_ptr), np.uint8).reshape(n, h, w, 3)
        emulate = host.emulate_preprocess_lpd if cfg.name.startswith("preprocess_lpd") else host.emulate_normalize
        out = emulate(images, cfg, tuple(norm[:3]), tuple(norm[3:]))  # NaN where no block writes
        ctypes.memmove(out_ptr, out.ctypes.data, out.nbytes)


class LazyStream:
    """A stream whose work runs only when an event on it (or the stream) is synchronised, as late as a
    real GPU may run it: a slot reused before its logits were collected would be caught."""

    by_handle: dict = {}

    def __init__(self, ctx=None):
        self.ops, self.done, self.closed = [], 0, False
        self.handle = 1000 + len(LazyStream.by_handle)
        LazyStream.by_handle[self.handle] = self

    def enqueue(self, op):
        self.ops.append(op)

    def run_until(self, n):
        while self.done < n:
            self.ops[self.done]()
            self.done += 1

    def synchronize(self):
        self.run_until(len(self.ops))

    def close(self):
        self.closed = True


class LazyEvent:
    def __init__(self, ctx=None, timing=True):
        self.stream, self.mark, self.closed = None, 0, False

    def record(self, stream):
        self.stream, self.mark = stream, len(stream.ops)

    def synchronize(self):
        self.stream.run_until(self.mark)

    def close(self):
        self.closed = True


# ------------------------------------------------------------------------- TensorRT AOT plugin kernels
class KernelFault(RuntimeError):
    """What a real launch would report as a CUDA error (a missing symbol, an out-of-bounds access)."""


# The entry points of trt_plugin.TRT_ENTRY_SOURCE as TensorRT launches them, (inputs..., extra int32 arguments...,
# outputs...), and the lpd.cu kernel each forwards to, run by the host build's block emulator with (x, out, extra...).
# Written from the CUDA source, not from trt_plugin's Python: what aot_impl returns must fit these.
TRT_ENTRIES = {
    "trt_lpd_generic_f32": ("lpd_generic_emulate", ("N", "C", "H", "W", "k", "variant", "residual")),
    "trt_lpd_residual_f32": ("lpd_residual_emulate", ("N", "C", "H", "W")),
}


def run_trt_entry(name: str, ptx: bytes, x: np.ndarray, extra: list[int], grid: tuple[int, int, int],
                  block: tuple[int, int, int], shared_mem: int) -> np.ndarray:
    """Run the plugin kernel ``name`` as TensorRT would launch it from ``aot_impl``'s answer: looked up
    in the PTX the plugin embeds, given the extra arguments in the order returned, launched on the
    grid/block/shared memory returned. The output buffer starts as NaN (pixels no block writes)."""
    if f".entry {name}(" not in ptx.decode(errors="replace"):
        raise KernelFault(f"cuModuleGetFunction: named symbol {name!r} not found in the plugin's PTX")
    if name not in TRT_ENTRIES:  # e.g. lpd.cu's own kernels, which take the output second
        raise KernelFault(f"{name} is not a TensorRT entry point (inputs, extra int32 arguments, outputs) of the "
                          f"plugin's PTX; expected one of {sorted(TRT_ENTRIES)} (float32: the stand-in's only dtype)")
    emulator, params = TRT_ENTRIES[name]
    if len(extra) != len(params):
        raise KernelFault(f"{name}: received {len(extra)} extra arguments; the entry point takes {params}")
    if x.dtype != np.float32 or int(np.prod(extra[:4], dtype=np.int64)) != x.size:
        raise KernelFault(f"{name}: sizes {extra[:4]} do not fit the {x.dtype} input of shape {x.shape} "
                          "(an illegal memory access on a GPU)")
    x = np.ascontiguousarray(x)
    out = np.full_like(x, np.nan)
    ints = lambda v: np.asarray(v, dtype=np.int32)  # noqa: E731
    code = getattr(host.load_host_library(), emulator)(x, out, *map(int, extra), ints(grid), ints(block), int(shared_mem))
    if code != 0:
        raise KernelFault(f"{name}: the kernel refused its launch ({emulator} returned {code})")
    return out
