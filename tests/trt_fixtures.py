"""Fixtures and helpers the test_trt_* files share, so that no test file imports another.

One seeded FerretNet-S checkpoint and its ONNX exports in every variant the TensorRT build reads
(``graphs``), the plugin's PTX as NVRTC compiles it here (``trt_ptx``), and the stand-in TensorRT of
``standins`` installed as ``tensorrt`` over a host-memory ``ferret_runtime.cuda`` (``fake_trt``), with
the stand-in ``tensorrt.plugin`` too (``plugin_trt``). A test file binds the fixtures it uses to
module names (``graphs = trt_fixtures.graphs``); module-scoped ones are then built once per file.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from ferret_export.onnx.export import export_onnx
from ferret_export.onnx.graph import GraphOptions
from ferret_export.onnx.model import describe_onnx
from ferret_export.tensorrt import plugin as trt_plugin
from ferret_export.tensorrt import profile as trt_profile
from ferret_runtime import cuda, sidecar
from ferret_runtime.kernels import nvrtc
from ferret_train import create_model
from ferret_train.checkpoint import save_checkpoint

from . import standins
from .standins import GPU, FakeTRT, fake_cuda, fake_plugin_api


def quiet(*_):
    pass


def ort_session(proto_or_path):
    data = proto_or_path.SerializeToString() if isinstance(proto_or_path, onnx.ModelProto) else str(proto_or_path)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def has_driver() -> bool:
    try:
        cuda.device_count()
    except cuda.CudaError:
        return False
    return True


def _record(model, profile, blob=b"engine bytes", **kw):
    args = dict(tensorrt_version="10.9.0.34", gpu_name=GPU.name, compute_capability=GPU.sm, hardware_compat=False,
                lpd="portable", engine_sha256=hashlib.sha256(blob).hexdigest(), workspace_mb=1024)
    args.update(kw)
    return trt_profile.engine_record(model, profile, **args)


def write_pair(tmp_path, graph, blob=b"engine bytes", **kw) -> Path:
    """An engine file (``blob``) and the sidecar 'ferret export tensorrt' writes for ``graph``, batch 1,8,16."""
    model = describe_onnx(graph)
    profile = trt_profile.profile_shapes(model, (1, 8, 16))
    props, inputs, outputs = trt_profile.sidecar_content(model, profile, _record(model, profile, blob, **kw))
    engine = tmp_path / "m.engine"
    engine.write_bytes(blob)
    sidecar.write(engine, props, inputs, outputs, tensorrt_version="10.9.0.34")
    return engine


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.pth", create_model("ferretnet-s").eval())


@pytest.fixture(scope="module")
def graphs(ckpt, tmp_path_factory):
    """Exports of one checkpoint (no PyTorch verification: these tests check the build's reading of them)."""
    root = tmp_path_factory.mktemp("onnx")
    variants = {
        "portable": GraphOptions(input_size=32),
        "plugin": GraphOptions(input_size=32, lpd="plugin"),
        "plugin_hw": GraphOptions(input_size=32, lpd="plugin", dynamic_hw=True),
        "plugin_nhwc": GraphOptions(input_size=32, lpd="plugin", preprocess=True),
        "dynamic_hw": GraphOptions(input_size=32, dynamic_hw=True),
        "static": GraphOptions(input_size=32, dynamic_batch=False),
        "nhwc": GraphOptions(input_size=32, preprocess=True),
        "fp16": GraphOptions(input_size=32, fp16=True),
        "external": GraphOptions(input_size=32, lpd="external"),
    }
    out = {}
    for name, opts in variants.items():
        export_onnx(ckpt, root / f"{name}.onnx", opts, run_verify=False, log=quiet)
        out[name] = root / f"{name}.onnx"
    return out


@pytest.fixture(scope="module")
def trt_ptx(tmp_path_factory):
    try:
        nvrtc.nvrtc_version()
    except cuda.CudaError as e:
        pytest.skip(f"NVRTC unavailable: {e}")
    return trt_plugin.compile_trt_ptx(cache=tmp_path_factory.mktemp("ptx")).decode()


@pytest.fixture
def fake_trt(monkeypatch):
    trt = FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    trt.kernels = fake_cuda(monkeypatch)
    return trt


@pytest.fixture
def plugin_trt(monkeypatch, trt_ptx):
    """The stand-in TensorRT with the stand-in tensorrt.plugin, so register_plugin registers ferret::lpd there
    and the engine runs the launch that plugin's aot_impl returns."""
    _, api = fake_plugin_api()
    trt = FakeTRT(plugin_api=api)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", api)
    trt.kernels = fake_cuda(monkeypatch)
    launches = []
    real = standins.run_trt_entry
    monkeypatch.setattr(standins, "run_trt_entry",
                        lambda name, ptx, x, extra, *a: launches.append((name, extra)) or real(name, ptx, x, extra, *a))
    trt.plugin_launches = launches
    return trt
