"""ONNX Runtime backend: ``.onnx`` files exported by ``ferret export onnx``, on CPU or CUDA.

On CUDA (``onnxruntime-gpu``) with cuda-python installed, the session runs on a stream of ours
(the CUDA provider's ``user_compute_stream``) and reads and writes our own device buffers through
IO binding: per slot a pinned staging buffer, the batch on the device (uint8 when the GPU
preprocesses, see ``slots``), the model's input and its logits; ``run_with_iobinding`` returns once
the work is enqueued (``disable_synchronize_execution_providers``), the logits' copy back and an
event follow on the same stream, and ``submit``/``Pending`` keep ``slots`` batches in flight as
the TensorRT backend does. One stream: copies and compute of successive batches are ordered on it,
while decoding and staging the next batch overlap on the host.
"""

from __future__ import annotations

import os
import queue
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..metadata import check_arch_size, check_logit_output, decode
from ..onnx_weights import initializer_values
from .base import Backend, ModelInfo, Pending, as_logits
from .slots import Slot, SlotBackend

# --optimization -> the name of its onnxruntime.GraphOptimizationLevel member
_LEVEL_NAMES = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                "all": "ORT_ENABLE_ALL"}
_LEVELS = tuple(_LEVEL_NAMES)
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}
NO_SYNC = "disable_synchronize_execution_providers"  # run config key: return once the work is enqueued
# CUDA provider defaults. use_tf32=0: TF32 convolutions keep 10 mantissa bits (~1e-3 relative error), which
# breaks the 1e-4 float32 parity with the CPU; pass cuda_options={"use_tf32": 1} for up to ~2x faster
# convolutions on Ampere and newer at that cost. HEURISTIC: EXHAUSTIVE (ORT's default) benchmarks every
# algorithm again at each new input shape, seconds per shape for any-size graphs.
CUDA_OPTIONS: dict[str, Any] = {"use_tf32": 0, "cudnn_conv_algo_search": "HEURISTIC"}


def cuda_provider_failure(ort: Any) -> str:
    """Why ONNX Runtime's CUDA provider did not load, as far as we can tell: the error from loading its
    library (most often a missing CUDA or cuDNN library), else a pointer to ORT's own log."""
    import ctypes

    lib = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not lib.is_file():
        return f"no {lib.name} in {lib.parent} (this onnxruntime has no CUDA provider: pip install onnxruntime-gpu)"
    try:
        ctypes.CDLL(str(lib))
    except OSError as e:
        return f"loading {lib.name}: {e} (install the CUDA and cuDNN versions this onnxruntime-gpu was built for)"
    return ("its library loads, but ONNX Runtime fell back to the CPU "
            "(session_options={'log_severity_level': 0} shows why)")


class OrtBackend(SlotBackend):
    """An ``onnxruntime.InferenceSession`` with the CUDA provider for ``device='cuda'``, else CPU.

    ``threads`` sets intra-op threads (0: ONNX Runtime's choice, one per physical core);
    ``optimization`` the graph optimisation level; ``session_options`` any further
    ``SessionOptions`` attributes by name; ``io_binding`` (default: on for CUDA) binds the input
    and output explicitly so the session does not allocate and copy them per call.

    CPU only: ``streams`` sessions with ``threads // streams`` threads each run batches concurrently
    (throughput streams, OpenVINO's term): on small CPUs two one-thread sessions beat one two-thread
    session, whose depthwise convolutions leave its second thread idle much of the time. ``None``:
    :func:`default_streams`. ``slots`` then equals ``streams``.

    CUDA only: ``cuda_options`` overrides CUDA_OPTIONS (TF32 off, heuristic cuDNN algorithm search);
    ``gpu_pipeline`` (default: on when cuda-python can reach the GPU) runs on our stream and buffers
    with ``slots`` batches of at most ``max_batch`` in flight; ``gpu_preprocess`` (default True) then
    takes uint8 NHWC and normalises (and, for ``--lpd external`` graphs, computes the LPD) on the GPU.
    """

    name = "onnxruntime"
    suffixes = (".onnx",)
    shape_hint = "the graph's fixed height and width; export with --dynamic-hw for any size"

    def __init__(self, path: str | Path, *, device: str = "auto", threads: int = 0, optimization: str = "all",
                 session_options: dict[str, Any] | None = None, io_binding: bool | None = None,
                 gpu_pipeline: bool | None = None, gpu_preprocess: bool = True, slots: int = 2, max_batch: int = 64,
                 streams: int | None = None, cuda_options: dict[str, Any] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("ONNX models need onnxruntime: pip install 'ferretnet-deploy[export]' "
                              "(or onnxruntime-gpu for CUDA)") from None
        if hasattr(ort, "disable_telemetry_events"):  # a screening service sends nothing anywhere it was not told to
            ort.disable_telemetry_events()
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"{self.path}: no such model file")
        if optimization not in _LEVELS:
            raise ConfigError(f"Received optimization {optimization!r}; expected one of {_LEVELS}")
        if streams is not None and (not isinstance(streams, int) or isinstance(streams, bool) or streams < 1):
            raise ConfigError(f"Received streams {streams!r}; expected an integer >= 1 (or None for the default)")
        # slots: batches in flight (GPU pipeline slots, or CPU streams); 1 runs each batch in submit()
        self.slots, self._gpu, self._streams, self._closers = 1, False, None, []
        providers = self._providers(ort, device, cuda_options)
        if isinstance(providers[0], tuple) and gpu_pipeline is not False:
            providers = self._open_gpu(providers, required=gpu_pipeline is True, slots=slots, max_batch=max_batch)
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVEL_NAMES[optimization])
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        for key, value in (session_options or {}).items():
            if not hasattr(so, key):
                raise ConfigError(f"Received session option {key!r}; not an onnxruntime.SessionOptions attribute")
            setattr(so, key, value)
        self.session = self._session(ort, so, providers)
        try:
            meta = self._check_graph()
        except BaseException:
            self.close()
            raise
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        pre = meta["preprocess"]
        hw = inputs[0].shape[1:3] if pre.layout == "NHWC" else inputs[0].shape[2:4]
        self.info = ModelInfo(meta["arch"], meta["lpd_func"], meta["window_size"], pre, meta["threshold"],
                              input_hw=tuple(hw) if all(isinstance(d, int) for d in hw) else None,
                              extra={k: meta[k] for k in ("lpd_mode", "precision", "toolkit_version", "provenance")
                                     if k in meta})
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.cuda_failure = None
        if isinstance(providers[0], tuple) and self.device == "cpu":  # asked for CUDA, got the CPU: say why
            self.cuda_failure = cuda_provider_failure(ort)
            if not self._gpu:
                warnings.warn(f"{self.path}: ONNX Runtime's CUDA provider did not start, running on the CPU: "
                              f"{self.cuda_failure}", RuntimeWarning, stacklevel=2)
        self.io_binding = self.device == "cuda" if io_binding is None else io_binding
        try:
            if self._gpu:
                self._start_gpu(ort, inputs[0], outputs[0], gpu_preprocess)
            elif self.device == "cpu":
                self._start_streams(ort, so, threads, default_streams() if streams is None else streams)
        except BaseException:
            self.close()
            raise

    def _session(self, ort: Any, so: Any, providers: list) -> Any:
        try:
            return ort.InferenceSession(str(self.path), so, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/NotImplemented types
            self.close()
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{self.path}: ONNX Runtime cannot load this model ({first})") from None

    def _start_streams(self, ort: Any, so: Any, threads: int, streams: int) -> None:
        """``streams`` CPU sessions sharing the threads (the first one is ``self.session``)."""
        if streams == 1:
            return
        so.intra_op_num_threads = max(1, (threads or cpu_cores()) // streams)
        sessions = [self._session(ort, so, ["CPUExecutionProvider"]) for _ in range(streams)]
        self.session = sessions[0]
        self._streams = CpuStreams(sessions, self._run_session)
        self.slots = streams

    @property
    def max_batch(self) -> int | None:  # type: ignore[override]
        """The largest batch one ``submit`` takes: the GPU slots' size; any on the CPU."""
        return self.profile_max[0] if self._gpu else None

    def submit_impl(self, batch: np.ndarray, block: bool) -> Pending | None:
        if self._gpu:
            return super().submit_impl(batch, block)
        if self._streams is not None:
            return self._streams.submit(batch, block)
        return Backend.submit_impl(self, batch, block)

    def _check_graph(self) -> dict[str, Any]:
        """The metadata, after checking it against the graph: one 4-D input, one logit per image,
        and weights the size of the architecture the metadata names."""
        meta = decode(self.session.get_modelmeta().custom_metadata_map, str(self.path))
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ConfigError(f"{self.path}: received a model with {len(inputs)} inputs of shapes "
                              f"{[i.shape for i in inputs]}; expected one 4-D input")
        check_logit_output([o.shape for o in outputs], str(self.path))
        try:
            weights = initializer_values(self.path.read_bytes())
        except (ValueError, IndexError) as e:  # ORT read it, so this is a protobuf we misread: say so
            raise ConfigError(f"{self.path}: cannot read the graph's initializers ({e}); "
                              "expected an ONNX model") from None
        check_arch_size(meta["arch"], weights, str(self.path))
        return meta

    def _open_gpu(self, providers: list, required: bool, slots: int, max_batch: int) -> list:
        """Our context and stream, handed to the CUDA provider as its compute stream; without
        cuda-python or a driver the provider's own stream and copies are used (unless required)."""
        from .. import cuda

        if not isinstance(slots, int) or slots < 1 or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"Received slots {slots!r} and max_batch {max_batch!r}; expected ints >= 1")
        name, options = providers[0]
        self._index = options["device_id"]
        try:
            self._ctx = cuda.Context(self._index)
        except cuda.CudaError as e:
            if required:
                raise ConfigError(f"Received gpu_pipeline=True, but cuda-python cannot reach GPU {self._index}: "
                                  f"{e}") from None
            return providers
        self._own(self._ctx)
        self._stream = self._own(cuda.Stream(self._ctx))
        self._cuda, self.slots, self._max_batch, self._gpu = cuda, slots, max_batch, True
        return [(name, {**options, "user_compute_stream": str(self._stream.handle)}), *providers[1:]]

    def _start_gpu(self, ort, inp, out, gpu_preprocess: bool) -> None:
        if self.device != "cuda":
            raise ConfigError(f"{self.path}: ONNX Runtime did not start its CUDA provider (providers: "
                              f"{', '.join(self.session.get_providers())}); expected CUDAExecutionProvider: "
                              f"{self.cuda_failure}")
        self.input_dtype, self.output_dtype = (np.dtype(_DTYPES.get(t.type, np.float32)) for t in (inp, out))
        if gpu_preprocess and self.info.preprocess.dtype != "uint8":
            self._gpu_preprocessing(self._index)
        dims = [d if isinstance(d, int) and d > 0 else 0 for d in inp.shape[1:]]  # 0: any size
        self.profile_min = self._caller_shape((1, *dims))
        self.profile_max = self._caller_shape((self._max_batch, *dims))
        self._out_per_item = int(np.prod([d for d in out.shape[1:] if isinstance(d, int)] or [1]))
        self._run_options = ort.RunOptions()
        self._run_options.add_run_config_entry(NO_SYNC, "1")
        out_bytes = self._max_batch * self._out_per_item * self.output_dtype.itemsize
        cuda, ctx = self._cuda, self._ctx
        self._start_slots([Slot(self._stream, self._own(cuda.Event(ctx, timing=False)),
                                host_out=self._own(cuda.PinnedBuffer(out_bytes, ctx)),
                                dev_out=self._own(cuda.DeviceBuffer(out_bytes, ctx))) for _ in range(self.slots)])

    def _reserve(self, slot: Slot, shape: tuple[int, ...]) -> None:
        """Size the slot's input buffers for a batch of ``shape`` (the caller's layout): allocated on
        first use and grown, never shrunk, so a steady stream of batches reuses them."""
        n, rest = shape[0], shape[1:]
        model_bytes = max(n, self.profile_min[0]) * int(np.prod(rest)) * self.input_dtype.itemsize
        staged_bytes = model_bytes // self.input_dtype.itemsize if self.kernel else model_bytes
        cuda, ctx = self._cuda, self._ctx
        for attr, size, kind in (("host_in", staged_bytes, cuda.PinnedBuffer),
                                 ("dev_in", model_bytes, cuda.DeviceBuffer),
                                 ("dev_u8", staged_bytes if self.kernel else 0, cuda.DeviceBuffer)):
            old = getattr(slot, attr)
            if size and (old is None or old.nbytes < size):
                if old is not None:
                    self._closers.remove(old)
                    old.close()
                setattr(slot, attr, self._own(kind(size, ctx)))

    def _enqueue(self, slot: Slot, batch: np.ndarray) -> None:
        with self._ctx.current():
            self._reserve(slot, batch.shape)
            shape = self._upload(slot, batch)
            binding = self.session.io_binding()
            binding.bind_input(self.input_name, "cuda", self._index, self.input_dtype, list(shape), slot.dev_in.ptr)
            binding.bind_output(self.output_name, "cuda", self._index, self.output_dtype,
                                [shape[0], self._out_per_item], slot.dev_out.ptr)
            self.session.run_with_iobinding(binding, self._run_options)  # enqueued on our stream, not waited for
            self._download(slot)

    @staticmethod
    def _providers(ort, device: str, cuda_options: dict[str, Any] | None = None) -> list[str]:
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
            options = {**CUDA_OPTIONS, **(cuda_options or {}), "device_id": index}
            return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]  # type: ignore[list-item]
        raise ConfigError(f"Received device {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")

    def run_impl(self, batch: np.ndarray) -> np.ndarray:
        if self._gpu:
            return super().run_impl(batch)
        if self._streams is not None:
            return self._streams.submit(batch, block=True).result()
        return self._run_session(self.session, batch)

    def _run_session(self, session: Any, batch: np.ndarray) -> np.ndarray:
        if not self.io_binding:
            return session.run([self.output_name], {self.input_name: batch})[0]
        binding = session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)  # one host->device copy, done by the provider
        binding.bind_output(self.output_name, "cpu")  # logits are tiny: bring them straight back
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def close(self) -> None:
        """Release the session(s), then our buffers, stream and context (idempotent)."""
        streams, self._streams = getattr(self, "_streams", None), None
        if streams is not None:
            streams.close()  # batches still running on the stream threads finish first
        if getattr(self, "_closers", None):
            self._drain()  # a batch submitted and never collected must not run on freed buffers
        self.session = None  # type: ignore[assignment]
        self._release()


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask: a container's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_streams(cores: int | None = None) -> int:
    """CPU streams by default: one per core up to 4 (2 cores: two 1-thread sessions, measured +25-45%
    over one 2-thread session for FerretNet-B; 16 cores: four 4-thread sessions)."""
    return max(1, min(4, cpu_cores() if cores is None else cores))


class _StreamPending(Pending):
    def __init__(self, future: Future, n: int):
        self._future, self._n = future, n

    def result(self) -> np.ndarray:
        return as_logits(self._future.result(), self._n)


class CpuStreams:
    """Sessions run concurrently, each on its own thread: a batch takes whichever session is free."""

    def __init__(self, sessions: list[Any], run: Any):
        self._run, self._free = run, queue.Queue()
        for session in sessions:
            self._free.put(session)
        self._pool = ThreadPoolExecutor(len(sessions), thread_name_prefix="ferret-stream")

    def submit(self, batch: np.ndarray, block: bool) -> Pending | None:
        try:
            session = self._free.get(block=block)
        except queue.Empty:
            return None
        batch = batch.copy()  # the caller may reuse its buffer as soon as submit returns

        def work() -> np.ndarray:
            try:
                return self._run(session, batch)
            finally:
                self._free.put(session)  # free once run: the logits wait in the future, not in the session

        return _StreamPending(self._pool.submit(work), batch.shape[0])

    def close(self) -> None:
        self._pool.shutdown(wait=True)
