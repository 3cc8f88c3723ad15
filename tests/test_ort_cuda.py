"""The ONNX Runtime CUDA pipeline (our stream, our device buffers, IO binding, GPU preprocessing).

On a CPU: ONNX Runtime's CPU session behind a stand-in CUDA provider that binds "cuda" buffers as
the host memory they are under ``standins.fake_cuda``, and runs each ``run_with_iobinding`` on the
stream it was given as ``user_compute_stream``, when that lazy stream gets to it. So the binding
(names, dtypes, shapes, pointers), the stream handed to the provider, the order of upload, kernel,
inference and download on it, and the slots' reuse are checked; what the real CUDA provider does is
the ``gpu`` test's business (it needs onnxruntime-gpu).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ferret_export.onnx.export import export_onnx
from ferret_export.onnx.graph import GraphOptions
from ferret_runtime import Detector, cuda
from ferret_runtime.backends.onnxruntime import NO_SYNC, OrtBackend
from ferret_runtime.errors import ConfigError
from ferret_runtime.preprocess import normalize
from ferret_train import create_model
from ferret_train.checkpoint import save_checkpoint

from .standins import LazyStream, fake_cuda

REAL_SESSION = ort.InferenceSession


class StandInCudaSession:
    """ort.InferenceSession as the CUDA provider with a user compute stream would behave, on a CPU."""

    created: list[StandInCudaSession] = []

    def __init__(self, path, so, providers):
        self.cpu = providers == ["CPUExecutionProvider"]  # a CPU session: the real one, unchanged
        (name, options), *_ = [("CPUExecutionProvider", {})] if self.cpu else providers
        assert name == ("CPUExecutionProvider" if self.cpu else "CUDAExecutionProvider")
        self.options = options
        handle = options.get("user_compute_stream")
        self.stream = LazyStream.by_handle[int(handle)] if handle is not None else None
        self.real = REAL_SESSION(path, so, providers=["CPUExecutionProvider"])
        self.runs = 0
        StandInCudaSession.created.append(self)

    def __getattr__(self, name):  # get_modelmeta, get_inputs, get_outputs, run
        return getattr(self.real, name)

    def get_providers(self):
        return self.real.get_providers() if self.cpu else ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def io_binding(self):
        return self.real.io_binding() if self.cpu else StandInBinding(self.real.io_binding())

    def run_with_iobinding(self, binding, run_options=None):
        if not isinstance(binding, StandInBinding) or not binding.bound:  # host arrays: the provider copies, in order
            return self.real.run_with_iobinding(getattr(binding, "real", binding), run_options)
        assert run_options.get_run_config_entry(NO_SYNC) == "1"  # returns once enqueued
        self.runs += 1
        self.stream.enqueue(lambda: self.real.run_with_iobinding(binding.real))


class StandInBinding:
    def __init__(self, real):
        self.real, self.bound = real, []

    def _bind(self, method, name, device_type, device_id, element_type, shape, buffer_ptr):
        assert device_type == "cuda" and device_id == 0
        self.bound.append((name, np.dtype(element_type).name, tuple(shape), buffer_ptr))
        getattr(self.real, method)(name, "cpu", 0, element_type, shape, buffer_ptr)

    def bind_input(self, *args):
        self._bind("bind_input", *args)

    def bind_output(self, *args):
        if len(args) == 2:  # bind_output(name, "cpu"): the provider copies the output back itself
            return self.real.bind_output(*args)
        self._bind("bind_output", *args)

    def __getattr__(self, name):  # bind_cpu_input, copy_outputs_to_cpu (the host-array path)
        return getattr(self.real, name)


@pytest.fixture
def ort_cuda(monkeypatch):
    kernels = fake_cuda(monkeypatch)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", StandInCudaSession)
    StandInCudaSession.created.clear()
    return kernels


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ort_cuda")
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "m.pth", create_model("ferretnet-s").eval())
    out = {}
    for name, opts in {"portable": GraphOptions(input_size=32), "external": GraphOptions(input_size=32, lpd="external"),
                       "dynamic_hw": GraphOptions(input_size=32, dynamic_hw=True),
                       "nhwc": GraphOptions(input_size=32, preprocess=True)}.items():
        out[name] = root / f"{name}.onnx"
        export_onnx(ckpt, out[name], opts, run_verify=False, log=lambda *_: None)
    return out


def _want(graphs, u8: np.ndarray) -> np.ndarray:
    """The whole model on ONNX Runtime's CPU provider, host preprocessing."""
    return REAL_SESSION(str(graphs["dynamic_hw"]), providers=["CPUExecutionProvider"]).run(
        None, {"input": normalize(u8)})[0][:, 0]


@pytest.mark.parametrize("graph, kernel", [("portable", "normalize"), ("external", "preprocess_lpd"), ("nhwc", None)])
def test_cuda_pipeline_on_our_stream_and_buffers(ort_cuda, graphs, graph, kernel):
    u8 = np.random.default_rng(1).integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)
    want = _want(graphs, u8)
    with OrtBackend(graphs[graph], device="cuda", max_batch=16) as backend:
        session, = StandInCudaSession.created
        assert backend.slots == 2 and backend.kernel == kernel
        assert session.options["user_compute_stream"] == str(backend._stream.handle)  # the provider runs on ours
        assert backend.info.preprocess.dtype == "uint8" and backend.info.preprocess.layout == "NHWC"
        assert backend.profile_max == (16, 32, 32, 3)
        np.testing.assert_allclose(backend.run(u8), want, rtol=1e-5, atol=1e-5)  # chunks 16, 16, 5
        assert session.runs == 3
        launched = [(cfg.name, args[:3]) for cfg, args in ort_cuda.launches]
        assert launched == ([] if kernel is None else [(f"{kernel}_f32", (n, 32, 32)) for n in (16, 16, 5)])
        buffers = [(s.host_in, s.dev_in, s.dev_u8) for s in backend._slots]
        np.testing.assert_allclose(backend.run(u8[:16]), want[:16], rtol=1e-5, atol=1e-5)
        assert [(s.host_in, s.dev_in, s.dev_u8) for s in backend._slots][0] == buffers[0]  # reused, not reallocated
        with pytest.raises(ValueError, match=r"Received a batch of 17; expected 1..16 per submit"):
            backend.submit(np.resize(u8, (17, 32, 32, 3)))
        with pytest.raises(ValueError, match=r"Received a batch of shape \(1, 16, 32, 3\); expected shapes from .*"
                                             r"\(the graph's fixed height and width; export with --dynamic-hw"):
            backend.run(u8[:1, :16])
    assert all(obj.closed for obj in backend._slots[0].__dict__.values() if hasattr(obj, "closed"))


def test_cuda_pipeline_binds_what_it_allocated(ort_cuda, graphs, monkeypatch):
    bound = []
    real_io_binding = StandInCudaSession.io_binding

    def spy(self):
        b = real_io_binding(self)
        bound.append(b)
        return b

    monkeypatch.setattr(StandInCudaSession, "io_binding", spy)
    u8 = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with OrtBackend(graphs["portable"], device="cuda") as backend:
        backend.run(u8)
        slot = backend._slots[0]
        assert bound[0].bound == [("input", "float32", (3, 3, 32, 32), slot.dev_in.ptr),
                                  ("logit", "float32", (3, 1), slot.dev_out.ptr)]
        backend.submit(u8)  # never collected
        stream = backend._stream
        assert stream.done < len(stream.ops)
    assert stream.done == len(stream.ops)  # close() let the batch finish before freeing its buffers


def test_cuda_pipeline_any_size_grows_buffers_only_when_needed(ort_cuda, graphs):
    rng = np.random.default_rng(3)
    small, large = (rng.integers(0, 256, (4, h, w, 3), dtype=np.uint8) for h, w in ((24, 20), (40, 36)))
    with OrtBackend(graphs["dynamic_hw"], device="cuda", slots=1) as backend:
        assert backend.profile_max == (64, 0, 0, 3)  # 0: any height and width
        np.testing.assert_allclose(backend.run(large), _want(graphs, large), rtol=1e-5, atol=1e-5)
        slot = backend._slots[0]
        first = slot.dev_in
        np.testing.assert_allclose(backend.run(small), _want(graphs, small), rtol=1e-5, atol=1e-5)
        assert slot.dev_in is first  # a smaller batch fits the buffers it has
        both = np.concatenate([large, large])
        np.testing.assert_allclose(backend.run(both), _want(graphs, both), rtol=1e-5, atol=1e-5)
        assert slot.dev_in is not first and first.closed  # grown once, the old one freed


def test_detector_over_the_cuda_pipeline_equals_the_cpu(ort_cuda, graphs):
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (40 + i % 3, 36 + i % 5, 3), dtype=np.uint8) for i in range(19)]
    inputs = images[:5] + [b"not an image"] + images[5:]
    with Detector(OrtBackend(graphs["portable"], device="cpu"), batch_size=4) as ref:
        want = ref.predict(inputs)
    with Detector.open(graphs["external"], device="cuda", batch_size=4, max_batch=4) as det:
        assert det.pipelined and det.preprocess.dtype == "uint8"
        got = det.predict(inputs)
    assert [r.path for r in got] == [r.path for r in want] and got[5].error == want[5].error
    np.testing.assert_allclose([r.logit for r in got if r.error is None], [r.logit for r in want if r.error is None],
                               rtol=1e-5, atol=1e-5)


def test_host_preprocessing_and_the_providers_own_copies(ort_cuda, graphs, monkeypatch):
    u8 = np.random.default_rng(5).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    with OrtBackend(graphs["portable"], device="cuda", gpu_preprocess=False) as backend:
        assert backend.slots == 2 and backend.kernel is None and backend.info.preprocess.dtype == "float32"
        np.testing.assert_allclose(backend.run(normalize(u8)), _want(graphs, u8), rtol=1e-5, atol=1e-5)
    with OrtBackend(graphs["portable"], device="cuda", gpu_pipeline=False) as plain:
        assert plain.slots == 1 and "user_compute_stream" not in StandInCudaSession.created[-1].options
        np.testing.assert_allclose(plain.run(normalize(u8)), _want(graphs, u8), rtol=1e-5, atol=1e-5)

    def no_driver(index=0):
        raise cuda.CudaError("cuInit: received CUDA_ERROR_NO_DEVICE (100: no CUDA-capable device is detected)")

    monkeypatch.setattr(cuda, "Context", no_driver)
    with OrtBackend(graphs["portable"], device="cuda") as fallback:  # the provider's own stream and copies
        assert fallback.slots == 1 and fallback.io_binding
    with pytest.raises(ConfigError, match=r"Received gpu_pipeline=True, but cuda-python cannot reach GPU 0: cuInit"):
        OrtBackend(graphs["portable"], device="cuda", gpu_pipeline=True)
    with pytest.raises(ConfigError, match=r"Received slots 0 and max_batch 64; expected ints >= 1"):
        OrtBackend(graphs["portable"], device="cuda", slots=0)


@pytest.mark.gpu(torch=False)
def test_gpu_ort_cuda_pipeline_equals_cpu(graphs):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu (the CUDA provider) is not installed")
    u8 = np.random.default_rng(6).integers(0, 256, (70, 32, 32, 3), dtype=np.uint8)
    want = _want(graphs, u8)
    for graph in ("portable", "external"):
        with OrtBackend(graphs[graph], device="cuda", max_batch=32) as backend:
            assert backend.slots == 2 and backend.kernel is not None
            np.testing.assert_allclose(backend.run(u8), want, rtol=1e-4, atol=1e-4)  # cuDNN's float32 sums


def test_cuda_provider_options_keep_float32_parity(ort_cuda, graphs):
    with OrtBackend(graphs["portable"], device="cuda") as backend:
        options = StandInCudaSession.created[-1].options
        assert options["use_tf32"] == 0 and options["cudnn_conv_algo_search"] == "HEURISTIC"
        assert options["device_id"] == 0 and backend.cuda_failure is None
    with OrtBackend(graphs["portable"], device="cuda", cuda_options={"use_tf32": 1}):
        assert StandInCudaSession.created[-1].options["use_tf32"] == 1  # opted in, at TF32's precision


class FallingBackSession(StandInCudaSession):
    """The CUDA provider failing to load: ONNX Runtime runs the session on the CPU instead."""

    def get_providers(self):
        return ["CPUExecutionProvider"]


def test_cuda_provider_failure_is_reported(ort_cuda, graphs, monkeypatch):
    import ctypes

    from ferret_runtime.backends import onnxruntime as ort_backend

    monkeypatch.setattr(ort, "InferenceSession", FallingBackSession)
    real_cdll = ctypes.CDLL

    def cdll(path, *a, **kw):
        if str(path).endswith("libonnxruntime_providers_cuda.so"):
            raise OSError("libcudnn.so.9: cannot open shared object file: No such file or directory")
        return real_cdll(path, *a, **kw)

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(ort_backend.Path, "is_file", lambda self: True)  # as if onnxruntime-gpu were installed
    with pytest.raises(ConfigError, match=r"did not start its CUDA provider .*libcudnn\.so\.9: cannot open"):
        OrtBackend(graphs["portable"], device="cuda")
    with pytest.warns(RuntimeWarning, match=r"CUDA provider did not start, running on the CPU: .*libcudnn\.so\.9"):
        backend = OrtBackend(graphs["portable"], device="cuda", gpu_pipeline=False)
    assert backend.device == "cpu" and "libcudnn.so.9" in backend.cuda_failure
    backend.close()
