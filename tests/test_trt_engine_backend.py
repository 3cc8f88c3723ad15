"""The runtime's TensorRT backend (ferret_runtime/backends/tensorrt.py), checked on a CPU.

The compatibility rule an engine's sidecar is held to (TensorRT version, GPU model, --hardware-compat),
the refusals made before TensorRT is imported, the plugin PTX against the driver, ferret_runtime.cuda
without a driver, and engines built by the stand-in TensorRT run through TrtBackend and Detector over
host-memory CUDA whose streams run work only when waited on (``standins.fake_cuda``): chunks padded to
the profile, two batches in flight in their own slots, uint8 preprocessing by the GPU kernel.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from dataclasses import replace

import numpy as np
import pytest

from ferret_export.tensorrt import build as trt_export
from ferret_runtime import cuda
from ferret_runtime.backends import tensorrt as trt_backend
from ferret_runtime.errors import ConfigError, FerretError
from ferret_runtime.kernels import launch
from ferret_runtime.preprocess import normalize

from . import trt_fixtures
from .standins import GPU
from .trt_fixtures import has_driver, ort_session, quiet, write_pair

ckpt, graphs, fake_trt = trt_fixtures.ckpt, trt_fixtures.graphs, trt_fixtures.fake_trt  # shared fixtures


# ---------------------------------------------------------------------------------- compat rule
BUILT = {"tensorrt_version": "10.9.0.34", "gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0",
         "hardware_compat": False}


@pytest.mark.parametrize("trt_version, gpu, cc", [
    ("10.9.0.34", "NVIDIA A100-SXM4-80GB", (8, 0)),
    ("10.9.0.99", "NVIDIA A100-SXM4-80GB", "8.0"),  # the build number is not part of the rule
])
def test_compat_accepts(trt_version, gpu, cc):
    trt_backend.check_engine_compat(BUILT, trt_version, gpu, cc)


@pytest.mark.parametrize("trt_version, gpu, cc, message", [
    ("10.8.0.43", "NVIDIA A100-SXM4-80GB", (8, 0),
     r"m\.engine: built with TensorRT 10\.9\.0\.34; this runtime has TensorRT 10\.8\.0\.43; expected the same "
     r"major\.minor\.patch \(a TensorRT engine only loads with the version that built it\): rebuild it here with "
     r"'ferret export tensorrt'"),
    ("10.9.1.2", "NVIDIA A100-SXM4-80GB", (8, 0),
     r"built with TensorRT 10\.9\.0\.34; this runtime has TensorRT 10\.9\.1\.2"),
    ("11.0.0.1", "NVIDIA A100-SXM4-80GB", (8, 0), r"this runtime has TensorRT 11\.0\.0\.1"),
    ("10.9.0.34", "NVIDIA A100-SXM4-40GB", (8, 0),
     r"m\.engine: built for NVIDIA A100-SXM4-80GB \(compute capability 8\.0\); this GPU is NVIDIA A100-SXM4-40GB "
     r"\(compute capability 8\.0\); expected the same GPU model \(engines are tuned for one GPU\): rebuild it here, "
     r"or build with --hardware-compat for any Ampere or newer GPU"),
    ("10.9.0.34", "NVIDIA H100 80GB HBM3", (9, 0), r"this GPU is NVIDIA H100 80GB HBM3 \(compute capability 9\.0\)"),
])
def test_compat_refuses(trt_version, gpu, cc, message):
    with pytest.raises(ConfigError, match=message):
        trt_backend.check_engine_compat(BUILT, trt_version, gpu, cc, "m.engine")


def test_compat_with_hardware_compat():
    built = {**BUILT, "hardware_compat": True}
    trt_backend.check_engine_compat(built, "10.9.0.34", "NVIDIA H100 80GB HBM3", (9, 0))
    trt_backend.check_engine_compat(built, "10.9.0.34", "NVIDIA GeForce RTX 3090", (8, 6))
    with pytest.raises(ConfigError, match=r"built with --hardware-compat \(Ampere and newer GPUs\); this GPU is "
                                          r"Tesla T4 \(compute capability 7\.5\); expected compute capability 8\.0 "
                                          r"or newer"):
        trt_backend.check_engine_compat(built, "10.9.0.34", "Tesla T4", (7, 5), "engine")
    with pytest.raises(ConfigError, match=r"this runtime has TensorRT 10\.10\.0\.31"):  # the version rule still holds
        trt_backend.check_engine_compat(built, "10.10.0.31", "NVIDIA H100 80GB HBM3", (9, 0))


# -------------------------------------------------------------------------------- the backend
def test_backend_refuses_before_importing_tensorrt(graphs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # importing it would raise a different message
    with pytest.raises(ConfigError, match=r"nope\.engine: no such engine file"):
        trt_backend.TrtBackend(tmp_path / "nope.engine")
    bare = tmp_path / "bare.plan"
    bare.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"bare\.plan\.json: no such file; a TensorRT engine needs the sidecar"):
        trt_backend.TrtBackend(bare)
    engine = write_pair(tmp_path, graphs["portable"])
    side = engine.with_name("m.engine.json")
    data = json.loads(side.read_text())
    side.write_text(json.dumps({k: v for k, v in data.items() if k != "ferret.engine"}))
    with pytest.raises(ConfigError, match=r"received no valid 'ferret\.engine' entry .*expected a sidecar written by "
                                          r"'ferret export tensorrt'"):
        trt_backend.TrtBackend(engine)
    side.write_text(json.dumps({**data, "version": 2}))
    with pytest.raises(ConfigError, match=r"received sidecar version 2; expected 1\.\.1"):
        trt_backend.TrtBackend(engine)
    side.write_text(json.dumps(data))
    engine.write_bytes(b"another engine")
    with pytest.raises(ConfigError, match=r"m\.engine: received an engine with SHA-256 [0-9a-f]{16}\.\.\.; its sidecar "
                                          r"describes [0-9a-f]{16}\.\.\.; expected the pair written together"):
        trt_backend.TrtBackend(engine)
    engine.write_bytes(b"engine bytes")
    with pytest.raises(ConfigError, match=r"Received device 'cpu'; TensorRT engines run on CUDA GPUs only"):
        trt_backend.TrtBackend(engine, device="cpu")
    with pytest.raises(ConfigError, match=r"TensorRT engines need TensorRT: pip install 'ferretnet-deploy\[trt\]'"):
        trt_backend.TrtBackend(engine)  # everything else was in order


def test_backend_refuses_another_tensorrt_or_gpu(graphs, tmp_path, monkeypatch):
    engine = write_pair(tmp_path, graphs["portable"])
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.8.0.43"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(cuda, "device_info", lambda index=0: GPU)
    with pytest.raises(ConfigError, match=r"m\.engine: built with TensorRT 10\.9\.0\.34; this runtime has "
                                          r"TensorRT 10\.8"):
        trt_backend.TrtBackend(engine)
    fake.__version__ = "10.9.0.34"
    monkeypatch.setattr(cuda, "device_info", lambda index=0: replace(GPU, name="Tesla T4", compute_capability=(7, 5)))
    with pytest.raises(ConfigError, match=r"built for NVIDIA H100 80GB HBM3 \(compute capability 9\.0\); this GPU is "
                                          r"Tesla T4 \(compute capability 7\.5\)"):
        trt_backend.TrtBackend(engine)


def test_runtime_modules_are_torch_and_onnx_free():
    code = ("import sys\n"
            "import ferret_runtime.backends.tensorrt, ferret_runtime.cuda\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'onnxruntime', 'tensorrt')]\n"
            "print(bad)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# -------------------------------------------------------------------------------- cuda.py, no driver
@pytest.mark.skipif(has_driver(), reason="checks the errors raised where no CUDA driver is installed")
def test_cuda_without_a_driver_raises_cuda_error():
    if importlib.util.find_spec("cuda.bindings") is None:
        with pytest.raises(cuda.CudaError, match="Received no cuda-python"):
            cuda.device_count()
        return
    for call in (cuda.device_count, cuda.device_info, cuda.Context):
        with pytest.raises(cuda.CudaError, match=r"cuInit: received (no CUDA driver|CUDA_ERROR_NO_DEVICE)") as e:
            call()
        assert e.value.call == "cuInit"


# ------------------------------------------------------------------------- with the stand-in TensorRT
def test_backend_runs_in_chunks_and_pads_to_the_profile(fake_trt, graphs, tmp_path):
    engine = trt_export.build_engine(graphs["nhwc"], tmp_path / "m.plan", batch=(2, 3, 4), verify=False,
                                     log=quiet).path
    u8 = np.random.default_rng(4).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    want = ort_session(graphs["nhwc"]).run(None, {"input": u8})[0][:, 0]
    with trt_backend.TrtBackend(engine) as backend:
        assert backend.info.preprocess.dtype == "uint8" and backend.info.input_hw == (32, 32)
        assert backend.info.extra["engine"]["gpu_name"] == GPU.name
        np.testing.assert_allclose(backend.run(u8), want, rtol=1e-6, atol=1e-6)  # chunks of 4, 4, 1 (padded to 2)
        np.testing.assert_allclose(backend.run(u8[:1]), want[:1], rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match=r"Received a batch of shape \(1, 16, 32, 3\); expected shapes from "
                                             r"\(2, 32, 32, 3\) to \(4, 32, 32, 3\)"):
            backend.run(u8[:1, :16])
        buffers = backend._closers[1:]
    assert all(b.closed for b in buffers) and len(buffers) == 2 * 6  # 2 slots: stream, 4 buffers, event


def test_submit_keeps_two_batches_in_flight(fake_trt, graphs, tmp_path):
    """The stand-in stream runs work only when it is waited on: results must come from each batch's own slot."""
    import threading

    engine = trt_export.build_engine(graphs["nhwc"], tmp_path / "m.plan", batch=(1, 3, 4), verify=False,
                                     log=quiet).path
    rng = np.random.default_rng(5)
    a, b, c = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (4, 3, 2))
    want = {k: ort_session(graphs["nhwc"]).run(None, {"input": v})[0][:, 0] for k, v in dict(a=a, b=b, c=c).items()}
    with trt_backend.TrtBackend(engine) as backend:
        pa, pb = backend.submit(a), backend.submit(b)  # both enqueued, neither has run yet
        got_c = []
        t = threading.Thread(target=lambda: got_c.append(backend.submit(c).result()))
        t.start()
        t.join(0.3)
        assert t.is_alive()  # no free slot until a result is collected
        np.testing.assert_allclose(pa.result(), want["a"], rtol=1e-6, atol=1e-6)
        t.join(10)
        assert not t.is_alive()
        np.testing.assert_allclose(got_c[0], want["c"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(pb.result(), want["b"], rtol=1e-6, atol=1e-6)
        with pytest.raises(FerretError, match="second result"):
            pb.result()
        with pytest.raises(ValueError, match=r"Received a batch of 5; expected 1..4 per submit"):
            backend.submit(np.resize(a, (5, 32, 32, 3)))
        with pytest.raises(ValueError, match="expected uint8 ndarray"):
            backend.submit(a.astype(np.float32))
        np.testing.assert_allclose(backend.run(np.concatenate([a, b, c])), np.concatenate(list(want.values())),
                                   rtol=1e-6, atol=1e-6)  # 3 chunks through 2 slots
    with trt_backend.TrtBackend(engine) as backend:
        backend.submit(a)  # never collected
        stream = backend._slots[0].stream
    assert stream.done == len(stream.ops) > 0  # close() let the batch finish before freeing its buffers
    with trt_backend.TrtBackend(engine, slots=1) as one:
        np.testing.assert_allclose(one.run(np.concatenate([a, b])), np.concatenate([want["a"], want["b"]]),
                                   rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="Received slots 0; expected an int >= 1"):
        trt_backend.TrtBackend(engine, slots=0)


@pytest.mark.parametrize("graph, kernel", [("portable", "normalize"), ("external", "preprocess_lpd")])
def test_backend_preprocesses_uint8_on_the_gpu(fake_trt, graphs, tmp_path, graph, kernel):
    """Float engines take decoded uint8: one kernel on the slot's stream writes the engine's input (the stand-in
    runs the kernel's blocks on the CPU); the logits are ONNX Runtime's on the host-prepared input."""
    engine = trt_export.build_engine(graphs[graph], tmp_path / "m.engine", batch=(2, 3, 4), log=quiet).path
    assert fake_trt.kernels.launches  # the build's verification went through the kernel too
    u8 = np.random.default_rng(8).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    want = ort_session(graphs["portable"]).run(None, {"input": normalize(u8)})[0][:, 0]  # the whole model
    with trt_backend.TrtBackend(engine) as backend:
        assert backend.kernel == kernel and backend.info.preprocess.dtype == "uint8"
        assert backend.info.preprocess.layout == "NHWC" and backend.profile_max == (4, 32, 32, 3)
        fake_trt.kernels.launches.clear()
        np.testing.assert_allclose(backend.run(u8), want, rtol=1e-5, atol=1e-5)  # chunks 4, 3
        assert [(cfg.name, args[:3]) for cfg, args in fake_trt.kernels.launches] == \
            [(f"{kernel}_f32", (4, 32, 32)), (f"{kernel}_f32", (3, 32, 32))]
        np.testing.assert_allclose(backend.run(u8[:1]), want[:1], rtol=1e-5, atol=1e-5)  # padded to the min batch 2
        with pytest.raises(ValueError, match="expected uint8 ndarray in NHWC layout"):
            backend.run(normalize(u8))
        assert len(backend._closers[1:]) == 2 * 7  # per slot: stream, 5 buffers (one for the uint8 batch), event
    if graph == "portable":
        with trt_backend.TrtBackend(engine, gpu_preprocess=False) as host_side:
            assert host_side.kernel is None and host_side.info.preprocess.dtype == "float32"
            np.testing.assert_allclose(host_side.run(normalize(u8)), want, rtol=1e-5, atol=1e-5)


def test_gpu_preprocessing_without_nvrtc_is_a_clear_error(fake_trt, graphs, tmp_path, monkeypatch):
    engine = trt_export.build_engine(graphs["portable"], tmp_path / "m.engine", batch=(1, 2, 4), verify=False,
                                     log=quiet).path

    def no_nvrtc(device=0):
        raise cuda.CudaError("nvrtcVersion: received no NVRTC library (libnvrtc.so.13 not found)")

    monkeypatch.setattr(launch, "get_module", no_nvrtc)
    with pytest.raises(ConfigError, match=r"m\.engine: GPU preprocessing needs lpd\.cu compiled by NVRTC .*libnvrtc"
                                          r".*or gpu_preprocess=False"):
        trt_backend.TrtBackend(engine)
    with trt_backend.TrtBackend(engine, gpu_preprocess=False) as backend:
        assert backend.kernel is None


def test_detector_pipelines_batches_through_the_slots(fake_trt, graphs, tmp_path):
    """Detector over the (lazy) stand-in engine equals Detector over ONNX Runtime: same order, same logits, the
    unreadable input reported in place, batches larger than the profile split, four threads at once."""
    import threading

    from ferret_runtime import Detector
    from ferret_runtime.backends.onnxruntime import OrtBackend

    engine = trt_export.build_engine(graphs["portable"], tmp_path / "m.engine", batch=(1, 2, 4), verify=False,
                                     log=quiet).path
    rng = np.random.default_rng(6)
    images = [rng.integers(0, 256, (40 + i % 3, 36 + i % 5, 3), dtype=np.uint8) for i in range(23)]
    inputs = images[:7] + [b"not an image"] + images[7:]
    with Detector(OrtBackend(graphs["portable"], device="cpu"), batch_size=5, workers=2) as ref:
        want = ref.predict(inputs)
    assert want[7].error is not None and sum(r.error is None for r in want) == 23
    for batch_size in (3, 10):  # 10: groups above the profile's max 4 go in chunks
        with Detector(trt_backend.TrtBackend(engine), batch_size=batch_size, workers=2) as det:
            assert det.pipelined
            got = det.predict(inputs)
        assert [r.path for r in got] == [r.path for r in want] and got[7].error == want[7].error
        np.testing.assert_allclose([r.logit for r in got if r.error is None],
                                   [r.logit for r in want if r.error is None], rtol=1e-5, atol=1e-5)
    with Detector(trt_backend.TrtBackend(engine, slots=2), batch_size=2, workers=2) as det:
        results: dict[int, list] = {}

        def worker(k: int) -> None:
            results[k] = det.predict(images[k::4])

        threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads)  # no thread waits for a slot while holding one
    for k in range(4):
        want_k = [want[i + (i >= 7)].logit for i in range(k, 23, 4)]
        np.testing.assert_allclose([r.logit for r in results[k]], want_k, rtol=1e-5, atol=1e-5)


def test_engine_with_plugin_ptx_newer_than_the_driver_is_refused_by_name():
    from ferret_runtime.backends.tensorrt import check_plugin_ptx

    plugin = {"id": "ferret::lpd", "implementation": "aot", "ptx_nvrtc": "13.5"}
    with pytest.raises(ConfigError, match=r"s\.engine: its ferret::lpd plugin: Received NVRTC 13\.5 PTX for a driver "
                                          r"of CUDA 13\.0; expected a driver for CUDA 13\.5 or newer"):
        check_plugin_ptx(plugin, (13, 0), "s.engine")
    check_plugin_ptx(plugin, (13, 5), "s.engine")  # the same version, or a newer driver, loads
    check_plugin_ptx(plugin, (14, 0), "s.engine")
    check_plugin_ptx({"implementation": "aot"}, (12, 0), "s.engine")  # older sidecars: nothing recorded or checked
    with pytest.raises(ConfigError, match=r"received plugin ptx_nvrtc 'x\.y'"):
        check_plugin_ptx({"ptx_nvrtc": "x.y"}, (13, 0), "s.engine")
