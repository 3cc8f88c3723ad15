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

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..metadata import check_arch_size, check_logit_output, decode
from .base import ModelInfo
from .slots import Slot, SlotBackend

_LEVELS = ("disable", "basic", "extended", "all")
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}
NO_SYNC = "disable_synchronize_execution_providers"  # run config key: return once the work is enqueued


class OrtBackend(SlotBackend):
    """An ``onnxruntime.InferenceSession`` with the CUDA provider for ``device='cuda'``, else CPU.

    ``threads`` sets intra-op threads (0: ONNX Runtime's choice, one per physical core);
    ``optimization`` the graph optimisation level; ``session_options`` any further
    ``SessionOptions`` attributes by name; ``io_binding`` (default: on for CUDA) binds the input
    and output explicitly so the session does not allocate and copy them per call.

    CUDA only: ``gpu_pipeline`` (default: on when cuda-python can reach the GPU) runs on our stream
    and buffers with ``slots`` batches of at most ``max_batch`` in flight; ``gpu_preprocess``
    (default True) then takes uint8 NHWC and normalises (and, for ``--lpd external`` graphs,
    computes the LPD) on the GPU.
    """

    name = "onnxruntime"
    suffixes = (".onnx",)
    shape_hint = "the graph's fixed height and width; export with --dynamic-hw for any size"

    def __init__(self, path: str | Path, *, device: str = "auto", threads: int = 0, optimization: str = "all",
                 session_options: dict[str, Any] | None = None, io_binding: bool | None = None,
                 gpu_pipeline: bool | None = None, gpu_preprocess: bool = True, slots: int = 2, max_batch: int = 64):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("ONNX models need onnxruntime: pip install 'ferretnet-deploy[export]' "
                              "(or onnxruntime-gpu for CUDA)") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"{self.path}: no such model file")
        if optimization not in _LEVELS:
            raise ConfigError(f"Received optimization {optimization!r}; expected one of {_LEVELS}")
        self.slots, self._closers = 0, []  # slots: batches in flight, only with the GPU pipeline
        providers = self._providers(ort, device)
        if isinstance(providers[0], tuple) and gpu_pipeline is not False:
            providers = self._open_gpu(providers, required=gpu_pipeline is True, slots=slots, max_batch=max_batch)
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_{'ENABLE_' if optimization != 'disable' else ''}{optimization.upper()}")
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        for key, value in (session_options or {}).items():
            if not hasattr(so, key):
                raise ConfigError(f"Received session option {key!r}; not an onnxruntime.SessionOptions attribute")
            setattr(so, key, value)
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/NotImplemented types
            self.close()
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{self.path}: ONNX Runtime cannot load this model ({first})") from None
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
                              extra={k: meta[k] for k in ("lpd_mode", "precision", "toolkit_version", "provenance") if k in meta})
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.io_binding = self.device == "cuda" if io_binding is None else io_binding
        if self.slots:
            try:
                self._start_gpu(ort, inputs[0], outputs[0], gpu_preprocess)
            except BaseException:
                self.close()
                raise

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
            raise ConfigError(f"{self.path}: cannot read the graph's initializers ({e}); expected an ONNX model") from None
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
                raise ConfigError(f"Received gpu_pipeline=True, but cuda-python cannot reach GPU {self._index}: {e}") from None
            return providers
        self._own(self._ctx)
        self._stream = self._own(cuda.Stream(self._ctx))
        self._cuda, self.slots, self._max_batch = cuda, slots, max_batch
        return [(name, {**options, "user_compute_stream": str(self._stream.handle)}), *providers[1:]]

    def _start_gpu(self, ort, inp, out, gpu_preprocess: bool) -> None:
        if self.device != "cuda":
            raise ConfigError(f"{self.path}: ONNX Runtime did not start its CUDA provider (providers: "
                              f"{', '.join(self.session.get_providers())}); expected CUDAExecutionProvider")
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
        for attr, size, kind in (("host_in", staged_bytes, cuda.PinnedBuffer), ("dev_in", model_bytes, cuda.DeviceBuffer),
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
    def _providers(ort, device: str) -> list[str]:
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
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]  # type: ignore[list-item]
        raise ConfigError(f"Received device {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")

    def run_impl(self, batch: np.ndarray) -> np.ndarray:
        if self.slots:
            return super().run_impl(batch)
        if not self.io_binding:
            return self.session.run([self.output_name], {self.input_name: batch})[0]
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)  # one host->device copy, done by the provider
        binding.bind_output(self.output_name, "cpu")  # logits are tiny: bring them straight back
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def close(self) -> None:
        """Release the session, then our buffers, stream and context (idempotent)."""
        if getattr(self, "_closers", None):
            self._drain()  # a batch submitted and never collected must not run on freed buffers
        self.session = None  # type: ignore[assignment]
        self._release()


# ONNX Runtime does not expose a graph's initializers and the runtime does not depend on the onnx
# package, so the few protobuf fields needed to count the weights are read here (ModelProto.graph = 7,
# GraphProto.initializer = 5, TensorProto.dims = 1: onnx/onnx.proto3).
def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message: varints as ints, the rest as bytes views."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        else:
            if wire == 2:  # length-delimited: a sub-message, bytes or a packed array
                size, i = _varint(buf, i)
            elif wire in (1, 5):  # fixed 64 or 32 bits
                size = 8 if wire == 1 else 4
            else:
                raise ValueError(f"unsupported protobuf wire type {wire}")
            if i + size > len(buf):
                raise ValueError(f"field {number} runs past the end of its message")
            value, i = buf[i:i + size], i + size
        yield number, wire, value


def initializer_values(model: bytes) -> int:
    """How many values an ONNX model's initializers hold (the product of each one's dims, summed)."""
    total = 0
    for number, wire, graph in _fields(memoryview(model)):
        if number != 7 or wire != 2:
            continue
        for g_number, g_wire, tensor in _fields(graph):
            if g_number != 5 or g_wire != 2:
                continue
            dims: list[int] = []
            for t_number, t_wire, value in _fields(tensor):
                if t_number == 1 and t_wire == 0:
                    dims.append(value)
                elif t_number == 1 and t_wire == 2:  # packed repeated int64
                    j = 0
                    while j < len(value):
                        d, j = _varint(value, j)
                        dims.append(d)
            total += math.prod(dims)
    return total
