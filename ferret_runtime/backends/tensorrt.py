"""TensorRT backend: ``.engine``/``.plan`` files built by ``ferret export tensorrt``, on a CUDA GPU.

An engine is opaque without TensorRT and only runs with the TensorRT version and on the GPU it was
built for, so every engine has a sidecar ``M.engine.json`` (format: ``ferret_runtime.sidecar``)
whose ``ferret.engine`` entry records how it was built. The backend reads and checks the sidecar,
and checks the engine file's SHA-256 against it, before TensorRT is imported; then refuses a
different TensorRT version or GPU with ``check_engine_compat``, the one rule shared with the build.

Engines built with ``--lpd plugin`` embed the ``ferret::lpd`` kernel as PTX (a TensorRT AOT
Python plugin), so they deserialise without this toolkit's Python code or any plugin library:
nothing is registered here, and ``trtexec``, Triton or C++ can run them too.

Batches in flight and GPU preprocessing: ``ferret_runtime.backends.slots``.

Torch-free: buffers and the stream come from ``ferret_runtime.cuda`` (cuda-python).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import sidecar
from ..cuda import CudaError
from ..errors import ConfigError, FerretError
from ..metadata import check_logit_output
from .base import ModelInfo
from .slots import Pending, Slot, SlotBackend

__all__ = ["Pending", "TrtBackend", "check_engine_compat", "check_plugin_ptx"]

HARDWARE_COMPAT_MIN_CC = (8, 0)  # HardwareCompatibilityLevel.AMPERE_PLUS
AOT_IMPLEMENTATION = "aot"


def _version_key(version: str) -> tuple[int, ...]:
    """'10.9.0.34' -> (10, 9, 0): major.minor.patch, the part an engine must match."""
    parts = []
    for p in str(version).split(".")[:3]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits) if digits else -1)
    return tuple(parts)


def _cc(value: Any) -> tuple[int, int]:
    """(9, 0) from '9.0', [9, 0] or (9, 0)."""
    try:
        if isinstance(value, str):
            major, minor = value.split(".")
        else:
            major, minor = value
        return int(major), int(minor)
    except (TypeError, ValueError):
        raise ConfigError(f"Received compute capability {value!r}; expected 'MAJOR.MINOR' such as '9.0'") from None


def check_engine_compat(engine: Mapping[str, Any], trt_version: str, gpu_name: str,
                        compute_capability: str | tuple[int, int], source: str = "engine") -> None:
    """Refuse an engine built for another TensorRT or GPU; ``engine`` is the sidecar's ``ferret.engine``.

    TensorRT: major.minor.patch must equal the builder's (TensorRT's default: a plan deserialises
    only with the version that built it; the fourth, build, number is ignored).
    GPU: the same compute capability and the same device name; with ``hardware_compat`` (built with
    ``HardwareCompatibilityLevel.AMPERE_PLUS``) any GPU of compute capability 8.0 or newer.
    """
    built_trt = str(engine.get("tensorrt_version", "?"))
    if _version_key(built_trt) != _version_key(trt_version):
        raise ConfigError(f"{source}: built with TensorRT {built_trt}; this runtime has TensorRT {trt_version}; "
                          "expected the same major.minor.patch (a TensorRT engine only loads with the version that "
                          "built it): rebuild it here with 'ferret export tensorrt'")
    have = _cc(compute_capability)
    built_cc = _cc(engine.get("compute_capability"))
    built_gpu = str(engine.get("gpu_name", "?"))
    if engine.get("hardware_compat"):
        if have < HARDWARE_COMPAT_MIN_CC:
            raise ConfigError(f"{source}: built with --hardware-compat (Ampere and newer GPUs); this GPU is {gpu_name} "
                              f"(compute capability {have[0]}.{have[1]}); expected compute capability "
                              f"{HARDWARE_COMPAT_MIN_CC[0]}.{HARDWARE_COMPAT_MIN_CC[1]} or newer")
        return
    if have != built_cc or gpu_name != built_gpu:
        raise ConfigError(f"{source}: built for {built_gpu} (compute capability {built_cc[0]}.{built_cc[1]}); "
                          f"this GPU is {gpu_name} (compute capability {have[0]}.{have[1]}); expected the same GPU "
                          "model (engines are tuned for one GPU): rebuild it here, or build with --hardware-compat "
                          "for any Ampere or newer GPU")


def check_plugin_ptx(plugin: Mapping[str, Any], driver: tuple[int, int], source: str = "engine") -> None:
    """Refuse an engine whose plugin PTX came from an NVRTC newer than this driver: the driver's JIT
    would reject it inside TensorRT with an opaque error at the first run."""
    from ..kernels.nvrtc import check_nvrtc_driver

    raw = plugin.get("ptx_nvrtc")
    if not raw:
        return  # built before the sidecar recorded it: TensorRT's own error will have to do
    try:
        nvrtc = tuple(int(v) for v in str(raw).split("."))[:2]
    except ValueError:
        raise ConfigError(f"{source}: received plugin ptx_nvrtc {raw!r}; expected 'MAJOR.MINOR'") from None
    try:
        check_nvrtc_driver("ptx", nvrtc, driver)  # type: ignore[arg-type]
    except CudaError as e:
        raise ConfigError(f"{source}: its ferret::lpd plugin: {e}; or rebuild the engine with that NVRTC") from None


def _import_tensorrt() -> Any:
    try:
        import tensorrt
    except (ImportError, OSError) as e:
        raise ConfigError(f"TensorRT engines need TensorRT: pip install 'ferretnet-deploy[trt]' (pulls tensorrt-cu13 "
                          f"from NVIDIA's index) ({type(e).__name__}: {e})") from None
    return tensorrt


def _device_index(device: str) -> int:
    if device in ("auto", "cuda"):
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    if device == "cpu":
        raise ConfigError("Received device 'cpu'; TensorRT engines run on CUDA GPUs only; expected 'auto', 'cuda' or "
                          "'cuda:N' (run the .onnx with ONNX Runtime on a CPU)")
    raise ConfigError(f"Received device {device!r}; expected 'auto', 'cuda' or 'cuda:N'")


class TrtBackend(SlotBackend):
    """A TensorRT engine with ``slots`` batches in flight (default 2): each slot is an execution
    context with pinned host and device buffers allocated once for the profile's largest batch, a
    stream and an event, so one batch's copies overlap another's compute. ``run`` pipelines the
    chunks of a batch larger than the profile; ``submit``/``Pending.result`` let a caller (the
    ``Detector``) prepare the next batch while this one runs.

    ``gpu_preprocess`` (default True): an engine with a float input takes uint8 NHWC batches and
    normalises them (and computes the LPD residual, for ``--lpd external`` engines) on the GPU;
    False takes the engine's own input format, prepared on the host."""

    name = "tensorrt"
    suffixes = (".engine", ".plan")
    shape_hint = "the engine's optimisation profile; rebuild with other --batch/--dynamic-hw ranges"

    def __init__(self, path: str | Path, *, device: str = "auto", verbose: bool = False, slots: int = 2,
                 gpu_preprocess: bool = True):
        if not isinstance(slots, int) or slots < 1:
            raise ConfigError(f"Received slots {slots!r}; expected an int >= 1 (batches in flight on the GPU)")
        self.slots = slots
        self.path = Path(path)
        self._closers: list[Any] = []
        if not self.path.is_file():
            raise ConfigError(f"{self.path}: no such engine file")
        side = sidecar.read(self.path, "a TensorRT engine needs the sidecar written beside it by 'ferret export "
                            "tensorrt' (the TensorRT version and GPU it was built for, its preprocessing); expected it "
                            f"next to {self.path.name}")
        build = side.engine
        plugin = build.get("plugin")
        if plugin and plugin.get("implementation") != AOT_IMPLEMENTATION:
            raise ConfigError(f"{self.path}: received a plugin implementation {plugin.get('implementation')!r}; "
                              f"expected {AOT_IMPLEMENTATION!r} (the kernel embedded as PTX, nothing to register "
                              "at runtime)")
        blob = self.path.read_bytes()
        digest = hashlib.sha256(blob).hexdigest()
        if digest != build["engine_sha256"]:
            raise ConfigError(f"{self.path}: received an engine with SHA-256 {digest[:16]}...; its sidecar describes "
                              f"{str(build['engine_sha256'])[:16]}...; expected the pair written together by "
                              "'ferret export tensorrt'")
        index = _device_index(device)
        trt = _import_tensorrt()
        from .. import cuda

        try:
            gpu = cuda.device_info(index)
        except cuda.CudaError as e:
            raise ConfigError(f"TensorRT engines need a CUDA GPU and driver: {e}") from None
        check_engine_compat(build, trt.__version__, gpu.name, gpu.compute_capability, str(self.path))
        if plugin:
            v = gpu.driver_version  # e.g. 13000 for CUDA 13.0
            check_plugin_ptx(plugin, (v // 1000, v % 1000 // 10), str(self.path))
        self.info = self._model_info(side)
        self.device = f"cuda:{index}"
        if gpu_preprocess and self.info.preprocess.dtype != "uint8":
            self._gpu_preprocessing(index)
        try:
            self._load(trt, cuda, blob, index, verbose)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _model_info(side: sidecar.Sidecar) -> ModelInfo:
        meta, pre = side.meta, side.meta["preprocess"]
        shape = side.inputs[0].shape
        hw = (shape[1:3] if pre.layout == "NHWC" else shape[2:4]) if len(shape) == 4 else []
        fixed = tuple(hw) if len(hw) == 2 and all(isinstance(d, int) and d > 0 for d in hw) else None
        extra = {k: meta[k] for k in ("lpd_mode", "precision", "toolkit_version", "provenance") if k in meta}
        extra["engine"] = side.engine
        return ModelInfo(meta["arch"], meta["lpd_func"], meta["window_size"], pre, meta["threshold"],
                         input_hw=fixed, extra=extra)

    def _load(self, trt: Any, cuda: Any, blob: bytes, index: int, verbose: bool) -> None:
        self._ctx = cuda.Context(index)
        self._own(self._ctx)
        logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
        with self._ctx.current():
            self._runtime = trt.Runtime(logger)
            self._engine = self._runtime.deserialize_cuda_engine(blob)
            if self._engine is None:
                raise ConfigError(f"{self.path}: TensorRT {trt.__version__} could not deserialise this engine (see its "
                                  "log above); expected an engine from 'ferret export tensorrt' with this TensorRT")
            names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
            ins = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            outs = [n for n in names if n not in ins]
            if len(ins) != 1 or len(outs) != 1:
                raise ConfigError(f"{self.path}: received an engine with inputs {ins} and outputs {outs}; "
                                  "expected one each")
            self.input_name, self.output_name = ins[0], outs[0]
            self.input_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self.input_name)))
            self.output_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self.output_name)))
            declared = (self._model_pre if self.kernel else self.info.preprocess).dtype
            if self.input_dtype != np.dtype(declared):
                raise ConfigError(f"{self.path}: the engine's input is {self.input_dtype}; its sidecar says "
                                  f"{declared}; expected the pair written together")
            lo, _, hi = (tuple(int(d) for d in s) for s in self._engine.get_tensor_profile_shape(self.input_name, 0))
            if self.kernel and (len(hi) != 4 or hi[1] != 3):
                raise ConfigError(f"{self.path}: received an engine input profile up to {hi}; expected (N, 3, H, W) "
                                  "for GPU preprocessing (or gpu_preprocess=False)")
            # the profile in the layout callers send: uint8 (N, H, W, 3) when the GPU preprocesses
            self.profile_min, self.profile_max = (self._caller_shape(s) for s in (lo, hi))
            out_shape = tuple(int(d) for d in self._engine.get_tensor_shape(self.output_name))
            check_logit_output([out_shape], str(self.path))  # the engine itself, not only its sidecar
            self._out_per_item = int(np.prod(out_shape[1:])) if len(out_shape) > 1 else 1
            max_batch = hi[0]
            in_bytes = int(np.prod(hi)) * self.input_dtype.itemsize
            host_bytes = int(np.prod(hi)) if self.kernel else in_bytes  # uint8 staging, or the input itself
            out_bytes = max_batch * self._out_per_item * self.output_dtype.itemsize
            slots: list[Slot] = []
            for _ in range(self.slots):
                context = self._engine.create_execution_context()
                if context is None:
                    raise ConfigError(f"{self.path}: TensorRT could not create execution context {len(slots) + 1} "
                                      f"of {self.slots} (out of GPU memory?); expected slots=1 to fit")
                slot = Slot(self._own(cuda.Stream(self._ctx)), self._own(cuda.Event(self._ctx, timing=False)),
                            host_in=self._own(cuda.PinnedBuffer(host_bytes, self._ctx)),
                            dev_in=self._own(cuda.DeviceBuffer(in_bytes, self._ctx)),
                            host_out=self._own(cuda.PinnedBuffer(out_bytes, self._ctx)),
                            dev_out=self._own(cuda.DeviceBuffer(out_bytes, self._ctx)),
                            dev_u8=self._own(cuda.DeviceBuffer(host_bytes, self._ctx)) if self.kernel else None,
                            context=context)
                # the buffers never move, so their addresses are bound once per context
                context.set_tensor_address(self.input_name, slot.dev_in.ptr)
                context.set_tensor_address(self.output_name, slot.dev_out.ptr)
                slots.append(slot)
            self._start_slots(slots)
        self._cuda = cuda

    def _enqueue(self, slot: Slot, batch: np.ndarray) -> None:
        with self._ctx.current():
            shape = self._upload(slot, batch)
            if not slot.context.set_input_shape(self.input_name, shape):
                raise FerretError(f"TensorRT rejected input shape {shape} for {self.input_name!r}")
            if not slot.context.execute_async_v3(slot.stream.handle):
                raise FerretError(f"{self.path}: TensorRT execute_async_v3 failed (see its log above)")
            self._download(slot)

    def close(self) -> None:
        """Release the context and engine, then buffers and stream, then the CUDA context (idempotent)."""
        ctx = getattr(self, "_ctx", None)
        if ctx is not None and not ctx.closed:
            self._drain()  # a batch submitted and never collected must not run on freed buffers
            with ctx.current():  # TensorRT objects go first, in their context, while the buffers are alive
                for slot in getattr(self, "_slots", []):
                    slot.context = None
                for attr in ("_engine", "_runtime"):
                    setattr(self, attr, None)
        self._release()
