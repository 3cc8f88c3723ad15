"""TensorRT export and runtime: everything a CPU can check, then builds and runs on a GPU with TensorRT.

On a CPU: --batch/--dynamic-hw parsing, profiles from real exported graphs, the sidecar, the
compatibility rule, the CLI's one-line errors, the plugin's AOT launch against ``launch_config``,
its PTX, its registration against a stand-in ``tensorrt.plugin``, the plugin node's meaning through
the host build of the kernel, the backend's refusals before TensorRT is imported, and
``ferret_runtime.cuda`` without a driver. Marked ``trt`` and ``gpu``: real builds (fp32, fp16,
INT8 when a Q/DQ quantizer exists), runs at min/opt/max batch, plugin vs portable, the timing
cache, and the authors' checkpoint through ``Detector.open("m.engine")``.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import itertools
import json
import re
import subprocess
import sys
import types
import typing
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ferret_export import tensorrt as trt_export
from ferret_export import trt_plugin, trt_profile, trt_verify
from ferret_export.commands.export_tensorrt import add_parser
from ferret_export.onnx_export import export_onnx
from ferret_export.onnx_graph import PLUGIN_DOMAIN, PLUGIN_OP, GraphOptions, lpd_graph
from ferret_export.onnx_model import describe_onnx
from ferret_export.pipeline import Int8Options
from ferret_export.triton import describe_model
from ferret_export.verify import ParityError
from ferret_runtime import cli, cuda, sidecar
from ferret_runtime.backends import tensorrt as trt_backend
from ferret_runtime.errors import ConfigError, FerretError
from ferret_runtime.fileio import sha256
from ferret_runtime.kernels import VARIANT_IDS, host, launch, nvrtc
from ferret_runtime.lpd_spec import LPD_SPECS
from ferret_runtime.preprocess import normalize
from ferret_train import create_model
from ferret_train.checkpoint import save_checkpoint

from .standins import GPU, KernelFault, LazyStream, fake_cuda, run_trt_entry

FUNCS = sorted(LPD_SPECS)


def _quiet(*_):
    pass


# --------------------------------------------------------------------------------------- fixtures
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
        export_onnx(ckpt, root / f"{name}.onnx", opts, run_verify=False, log=_quiet)
        out[name] = root / f"{name}.onnx"
    return out


def _session(proto_or_path):
    data = proto_or_path.SerializeToString() if isinstance(proto_or_path, onnx.ModelProto) else str(proto_or_path)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _has_driver() -> bool:
    try:
        cuda.device_count()
    except cuda.CudaError:
        return False
    return True


# ------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("text, expected", [("1,64,256", (1, 64, 256)), ("4,4,4", (4, 4, 4)), (" 1, 2 ,3", (1, 2, 3))])
def test_parse_triple(text, expected):
    assert trt_profile.parse_triple(text, "--batch") == expected


@pytest.mark.parametrize("text, message", [
    ("1,64", r"Received --batch '1,64'; expected MIN,OPT,MAX, three integers such as 1,64,256"),
    ("a,b,c", r"Received --batch 'a,b,c'; expected MIN,OPT,MAX"),
    ("64,1,256", r"Received --batch 64,1,256; expected MIN <= OPT <= MAX"),
    ("0,1,2", r"Received --batch 0,1,2; expected sizes >= 1"),
])
def test_parse_triple_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        trt_profile.parse_triple(text, "--batch")


def _parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="ferret")
    sub = top.add_subparsers(dest="command")
    export = sub.add_parser("export")
    add_parser(export.add_subparsers(dest="format", required=True))
    return top


def test_cli_options_parse_and_help():
    p = _parser()
    args = p.parse_args(["export", "tensorrt", "--onnx", "m.onnx", "-o", "m.engine", "--batch", "1,8,16",
                         "--dynamic-hw", "64,128,256", "--timing-cache", "t.cache", "--hardware-compat", "--lpd", "plugin"])
    assert (args.batch, args.dynamic_hw, args.timing_cache, args.hardware_compat, args.lpd) == \
        ((1, 8, 16), (64, 128, 256), Path("t.cache"), True, "plugin")
    assert args.verify and args.workspace_mb == trt_export.DEFAULT_WORKSPACE_MB
    tensorrt = p._subparsers._group_actions[0].choices["export"]._subparsers._group_actions[0].choices["tensorrt"]
    text = tensorrt.format_help()
    for action in tensorrt._actions:
        assert action.help, action.dest  # every option explains itself
    assert "Examples:" in text and "(default: 4096)" in text and "default: None" not in text
    with pytest.raises(SystemExit):  # exactly one source
        p.parse_args(["export", "tensorrt", "--onnx", "m.onnx", "--weights", "w.pth", "-o", "m.engine"])
    with pytest.raises(SystemExit):
        p.parse_args(["export", "tensorrt", "--weights", "w.pth", "-o", "m.engine", "--fp16", "--int8"])


def _cli(monkeypatch, argv):
    monkeypatch.setattr(cli, "build_parser", _parser)
    return cli.main(argv)


def test_cli_without_tensorrt_is_one_line(graphs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without it, even where it is installed
    rc = _cli(monkeypatch, ["export", "tensorrt", "--onnx", str(graphs["portable"]), "-o", str(tmp_path / "m.engine")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.strip() == f"ferret export: error: {trt_export.TRT_MISSING}"
    assert not (tmp_path / "m.engine").exists()


def test_cli_refuses_precision_flags_with_onnx(graphs, tmp_path, monkeypatch, capsys):
    rc = _cli(monkeypatch, ["export", "tensorrt", "--onnx", str(graphs["portable"]), "-o", str(tmp_path / "m.engine"),
                            "--fp16"])
    err = capsys.readouterr().err
    assert rc == 2 and "Received --fp16 with --onnx; expected it only with --weights" in err


def test_weights_without_tensorrt_fails_before_exporting(ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ConfigError, match=re.escape(trt_export.TRT_MISSING)):
        trt_export.export_and_build(ckpt, tmp_path / "m.engine", precision="fp16", log=_quiet)
    assert list(tmp_path.iterdir()) == []


def test_int8_follows_the_onnx_exports_rules(ckpt, tmp_path):
    """The INT8 rules of 'ferret export onnx --int8': calibration data, the portable LPD, no fp16."""
    with pytest.raises(ConfigError, match=r"Received --int8 without --calib-data; expected image files or folders to "
                                          r"calibrate on"):
        trt_export.export_and_build(ckpt, tmp_path / "m.engine", precision="int8", verify_images=["x"], log=_quiet)
    with pytest.raises(ConfigError, match=r"Received --int8 with --lpd plugin; expected --lpd portable"):
        trt_export.export_and_build(ckpt, tmp_path / "m.engine", precision="int8", lpd="plugin",
                                    int8=Int8Options(["x"]), log=_quiet)
    with pytest.raises(ConfigError, match=r"Received --int8 with --lpd external; expected --lpd portable"):
        trt_export.export_and_build(ckpt, tmp_path / "m.engine", precision="int8", lpd="external",
                                    int8=Int8Options(["x"]), log=_quiet)
    with pytest.raises(ConfigError, match=r"Received --int8-min-agreement 1\.5; expected 0\.\.1"):
        trt_export.export_and_build(ckpt, tmp_path / "m.engine", precision="int8",
                                    int8=Int8Options(["x"], min_agreement=1.5), log=_quiet)
    assert list(tmp_path.iterdir()) == []


def test_cli_int8_flags(ckpt, tmp_path, monkeypatch, capsys):
    p = _parser()
    args = p.parse_args(["export", "tensorrt", "-w", "w.pth", "-o", "m.engine", "--int8", "--calib-data", "a", "b",
                         "--calib-images", "8", "--calib-method", "minmax", "--int8-float-layers", "1",
                         "--int8-min-agreement", "0.9"])
    assert (args.int8, args.calib_data, args.calib_images, args.calib_method, args.int8_float_layers,
            args.int8_min_agreement) == (True, ["a", "b"], 8, "minmax", 1, 0.9)
    assert p.parse_args(["export", "tensorrt", "-w", "w.pth", "-o", "m.engine", "--lpd", "native"]).lpd == "portable"
    rc = _cli(monkeypatch, ["export", "tensorrt", "-w", str(ckpt), "-o", str(tmp_path / "m.engine"), "--int8"])
    assert rc == 2 and "Received --int8 without --calib-data" in capsys.readouterr().err
    rc = _cli(monkeypatch, ["export", "tensorrt", "-w", str(ckpt), "-o", str(tmp_path / "m.engine"), "--calib-data",
                            str(tmp_path)])
    assert rc == 2 and "Received --calib-data without --int8; expected both" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(_has_driver(), reason="checks the message where no CUDA driver is installed")
def test_without_gpu_the_message_is_about_the_gpu(graphs, tmp_path, monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.9.0.34"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(ConfigError, match=r"TensorRT needs a CUDA GPU and driver; found none \(cuInit: received no CUDA"):
        trt_export.build_engine(graphs["portable"], tmp_path / "m.engine", log=_quiet)


# ----------------------------------------------------------------------------------- profiles
def test_profile_of_a_dynamic_batch_graph(graphs):
    m = describe_onnx(graphs["portable"])
    assert (m.input_name, m.input_dtype, m.input_shape, m.output_shape) == ("input", "float32", (None, 3, 32, 32), (None, 1))
    p = trt_profile.profile_shapes(m)
    assert (p.min, p.opt, p.max) == ((1, 3, 32, 32), (64, 3, 32, 32), (256, 3, 32, 32))
    p = trt_profile.profile_shapes(m, (2, 8, 16))
    assert (p.min, p.opt, p.max) == ((2, 3, 32, 32), (8, 3, 32, 32), (16, 3, 32, 32))


def test_profile_of_dynamic_hw_and_nhwc_graphs(graphs):
    p = trt_profile.profile_shapes(describe_onnx(graphs["dynamic_hw"]), (1, 4, 8), (64, 224, 512))
    assert (p.min, p.opt, p.max) == ((1, 3, 64, 64), (4, 3, 224, 224), (8, 3, 512, 512))
    m = describe_onnx(graphs["nhwc"])
    assert (m.layout, m.input_dtype) == ("NHWC", "uint8")
    p = trt_profile.profile_shapes(m, (1, 2, 4))
    assert (p.min, p.max) == ((1, 32, 32, 3), (4, 32, 32, 3))


def test_profile_errors(graphs):
    static = describe_onnx(graphs["static"])
    assert trt_profile.profile_shapes(static).max == (1, 3, 32, 32)  # the graph's fixed batch by default
    with pytest.raises(ConfigError, match=r"Received --batch 1,64,256 for static\.onnx, whose batch is fixed at 1; "
                                          r"expected --batch 1,1,1 \(or a graph exported with --dynamic\)"):
        trt_profile.profile_shapes(static, (1, 64, 256))
    dyn = describe_onnx(graphs["dynamic_hw"])
    with pytest.raises(ConfigError, match=r"dynamic_hw\.onnx has a dynamic height/width; expected --dynamic-hw MIN,OPT,MAX"):
        trt_profile.profile_shapes(dyn)
    with pytest.raises(ConfigError, match=r"Received --dynamic-hw 4,64,128; expected sizes >= 8"):
        trt_profile.profile_shapes(dyn, None, (4, 64, 128))
    with pytest.raises(ConfigError, match=r"Received --dynamic-hw for portable\.onnx, whose input is fixed at 32x32"):
        trt_profile.profile_shapes(describe_onnx(graphs["portable"]), None, (32, 64, 128))


def test_lpd_mode_comes_from_the_graph(graphs):
    portable, plugin = (describe_onnx(graphs[k]) for k in ("portable", "plugin"))
    assert trt_profile.resolve_lpd(portable, None) == "portable" and trt_profile.resolve_lpd(plugin, None) == "plugin"
    assert trt_profile.resolve_lpd(portable, "native") == "portable"  # the old name of portable is still accepted
    assert plugin.plugin_nodes == ((PLUGIN_OP, {"func": b"median", "window_size": 3, "plugin_namespace": b"ferret", "aot": 1}),)
    with pytest.raises(ConfigError, match=r"Received --lpd plugin for portable\.onnx, a graph with the LPD as standard "
                                          r"operators; expected --lpd portable, or a graph exported with 'ferret export "
                                          r"onnx --lpd plugin'"):
        trt_profile.resolve_lpd(portable, "plugin")
    with pytest.raises(ConfigError, match=r"Received --lpd portable for plugin\.onnx, a graph with the ferret::lpd plugin "
                                          r"node; expected --lpd plugin"):
        trt_profile.resolve_lpd(plugin, "portable")
    with pytest.raises(ConfigError, match=r"Received --lpd 'cuda'; expected one of portable, plugin, external"):
        trt_profile.resolve_lpd(portable, "cuda")
    external = describe_onnx(graphs["external"])
    assert trt_profile.resolve_lpd(external, None) == trt_profile.resolve_lpd(external, "external") == "external"
    with pytest.raises(ConfigError, match=r"Received --lpd portable for external\.onnx, a graph with no LPD \(its input "
                                          r"is the LPD residual\); expected --lpd external"):
        trt_profile.resolve_lpd(external, "portable")
    with pytest.raises(ConfigError, match=r"Received --lpd external for portable\.onnx, .*onnx --lpd external'"):
        trt_profile.resolve_lpd(portable, "external")


def test_network_flags_strongly_typed_on_10_only():
    kinds = types.SimpleNamespace(STRONGLY_TYPED=1, PREFER_AOT_PYTHON_PLUGINS=2)
    trt10 = types.SimpleNamespace(__version__="10.9.0.34", NetworkDefinitionCreationFlag=kinds)
    trt11 = types.SimpleNamespace(__version__="11.3.0.5", NetworkDefinitionCreationFlag=kinds)
    assert trt_export.network_flags(trt10, plugin=False) == 1 << 1
    assert trt_export.network_flags(trt10, plugin=True) == (1 << 1) | (1 << 2)
    assert trt_export.network_flags(trt11, plugin=False) == 0  # deprecated there: always strongly typed
    assert trt_export.network_flags(trt11, plugin=True) == 1 << 2


# ------------------------------------------------------------------------------------- sidecar
def _record(model, profile, blob=b"engine bytes", **kw):
    import hashlib

    args = dict(tensorrt_version="10.9.0.34", gpu_name=GPU.name, compute_capability=GPU.sm, hardware_compat=False,
                lpd="portable", engine_sha256=hashlib.sha256(blob).hexdigest(), workspace_mb=1024)
    args.update(kw)
    return trt_profile.engine_record(model, profile, **args)


def _write_pair(tmp_path, graph, blob=b"engine bytes", **kw) -> Path:
    model = describe_onnx(graph)
    profile = trt_profile.profile_shapes(model, (1, 8, 16))
    props, inputs, outputs = trt_profile.sidecar_content(model, profile, _record(model, profile, blob, **kw))
    engine = tmp_path / "m.engine"
    engine.write_bytes(blob)
    sidecar.write(engine, props, inputs, outputs, tensorrt_version="10.9.0.34")
    return engine


def test_sidecar_from_a_real_export(graphs, tmp_path):
    engine = _write_pair(tmp_path, graphs["fp16"], lpd="portable")
    desc = describe_model(engine)  # what 'ferret export triton' reads
    assert desc.meta["arch"] == "ferretnet-s" and desc.meta["lpd_func"] == "median" and desc.meta["window_size"] == 3
    assert desc.meta["precision"] == "fp16" and desc.meta["threshold"] == 0.5
    assert desc.meta["preprocess"].crop == 32 and desc.meta["preprocess"].dtype == "float32"
    assert [(t.name, t.dtype, t.shape, t.max_batch) for t in desc.inputs] == [("input", "float32", (-1, 3, 32, 32), 16)]
    assert [(t.name, t.dtype, t.shape) for t in desc.outputs] == [("logit", "float32", (-1, 1))]
    assert desc.tensorrt_version == "10.9.0.34"
    rec = sidecar.read(engine).engine  # what the runtime reads
    assert rec["tensorrt_version"] == "10.9.0.34" and rec["gpu_name"] == GPU.name and rec["compute_capability"] == "9.0"
    assert rec["hardware_compat"] is False and rec["lpd"] == "portable" and rec["precision"] == "fp16"
    assert rec["profiles"] == [{"input": "input", "min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [16, 3, 32, 32]}]
    assert rec["source_onnx"] == "fp16.onnx" and rec["source_onnx_sha256"] == sha256(graphs["fp16"])
    assert rec["source_onnx_weights"] == describe_onnx(graphs["fp16"]).weights > 100_000  # ferretnet-s's size
    data = json.loads(engine.with_name("m.engine.json").read_text())
    assert data["ferret.provenance"] == describe_onnx(graphs["fp16"]).props["ferret.provenance"]


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
    ("10.9.1.2", "NVIDIA A100-SXM4-80GB", (8, 0), r"built with TensorRT 10\.9\.0\.34; this runtime has TensorRT 10\.9\.1\.2"),
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
    with pytest.raises(ConfigError, match=r"built with --hardware-compat \(Ampere and newer GPUs\); this GPU is Tesla T4 "
                                          r"\(compute capability 7\.5\); expected compute capability 8\.0 or newer"):
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
    engine = _write_pair(tmp_path, graphs["portable"])
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
    engine = _write_pair(tmp_path, graphs["portable"])
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.8.0.43"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(cuda, "device_info", lambda index=0: GPU)
    with pytest.raises(ConfigError, match=r"m\.engine: built with TensorRT 10\.9\.0\.34; this runtime has TensorRT 10\.8"):
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
@pytest.mark.skipif(_has_driver(), reason="checks the errors raised where no CUDA driver is installed")
def test_cuda_without_a_driver_raises_cuda_error():
    if importlib.util.find_spec("cuda.bindings") is None:
        with pytest.raises(cuda.CudaError, match="Received no cuda-python"):
            cuda.device_count()
        return
    for call in (cuda.device_count, cuda.device_info, cuda.Context):
        with pytest.raises(cuda.CudaError, match=r"cuInit: received (no CUDA driver|CUDA_ERROR_NO_DEVICE)") as e:
            call()
        assert e.value.call == "cuInit"


# ------------------------------------------------------------------------------ plugin: the launch
class Sym:
    """A symbolic size: only +, *, // and the plugin API's cdiv/min, as on TensorRT's expressions;
    comparisons, bool() and int() raise, so Python's min() or an ``if`` on a size would fail here."""

    def __init__(self, value: int, text: str):
        self.value, self.text = value, text

    def _op(self, other, op, sym):
        o = other.value if isinstance(other, Sym) else other
        return Sym(op(self.value, o), f"({self.text} {sym} {getattr(other, 'text', other)})")

    def __add__(self, other):
        return self._op(other, lambda a, b: a + b, "+")

    def __mul__(self, other):
        return self._op(other, lambda a, b: a * b, "*")

    def __floordiv__(self, other):
        return self._op(other, lambda a, b: a // b, "//")

    def _refuse(self, *_):
        raise TypeError(f"symbolic size {self.text} used as a concrete value")

    __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __int__ = __index__ = _refuse


def _cdiv(a, b):
    return Sym(-(-a.value // b), f"cdiv({a.text}, {b})") if isinstance(a, Sym) else -(-a // b)


def _min(a, b):
    return Sym(min(a.value, b), f"min({a.text}, {b})") if isinstance(a, Sym) else min(a, b)


def _value(v):
    return v.value if isinstance(v, Sym) else v


SHAPES = [(1, 1, 1, 1), (2, 3, 17, 33), (1, 3, 256, 256), (3, 3, 1823, 781), (5, 3, 7, 1), (8000, 9, 16, 32)]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("func", FUNCS)
def test_aot_launch_matches_launch_config(func, k, residual, dtype):
    for shape in SHAPES:
        sym = tuple(Sym(v, "NCHW"[i]) for i, v in enumerate(shape))
        got = trt_plugin.aot_launch(sym, dtype, func, k, residual, cdiv=_cdiv, minimum=_min)
        kernel = "lpd_residual" if residual and func == "median" and k == 3 else "lpd_generic"
        want = launch.launch_config(kernel, shape, dtype, trt_plugin.PTX_ARCH, k)
        assert got.kernel == "trt_" + want.name
        assert tuple(_value(g) for g in got.grid) == want.grid, (shape, [g.text for g in got.grid])
        assert (got.block, got.shared_mem) == (want.block, want.shared_mem_bytes)
        extra = tuple(_value(v) for v in got.extra_args)
        assert extra == (shape if kernel == "lpd_residual" else (*shape, k, launch.variant_id(func), int(residual)))


def test_aot_launch_refuses_what_the_kernels_cannot_do():
    with pytest.raises(ConfigError, match="Received LPD function 'origin'"):
        trt_plugin.aot_launch((1, 3, 8, 8), "float32", "origin", 3, False, cdiv=_cdiv, minimum=_min)
    with pytest.raises(ConfigError, match="window"):
        trt_plugin.aot_launch((1, 3, 8, 8), "float32", "median", 4, False, cdiv=_cdiv, minimum=_min)


# --------------------------------------------------------------------------------- plugin: the PTX
@pytest.fixture(scope="module")
def trt_ptx(tmp_path_factory):
    try:
        nvrtc.nvrtc_version()
    except cuda.CudaError as e:
        pytest.skip(f"NVRTC unavailable: {e}")
    return trt_plugin.compile_trt_ptx(cache=tmp_path_factory.mktemp("ptx")).decode()


def test_trt_entry_points_take_the_output_last(trt_ptx):
    assert re.search(rf"\.target sm_{trt_plugin.PTX_ARCH}\b", trt_ptx)
    kinds = {"ptr": "u64", "int": "u32"}
    for base, args in trt_plugin.TRT_KERNEL_ARGS.items():
        # the same parameters as the kernel it wraps, with `out` moved from second to last
        original = launch.KERNEL_ARGS[base.removeprefix("trt_")]
        assert args == (original[0], *original[2:], original[1])
        for suffix in ("f32", "f16"):
            m = re.search(rf"\.visible \.entry {base}_{suffix}\(([^)]*)\)", trt_ptx)
            assert m, f"{base}_{suffix} missing from the PTX"
            assert re.findall(r"\.param \.(\w+)", m.group(1)) == [kinds[a] for a in args]


# --------------------------------------------------------------------------- plugin: registration
def _fake_plugin_api():
    """A stand-in for tensorrt.plugin with the rules its decorators check (real classes as annotations,
    the aot_impl schema) and the objects aot_impl returns."""
    api = types.ModuleType("tensorrt.plugin")
    api.registry = {}

    class TensorDesc:
        def __init__(self, shape, dtype):
            self.shape_expr, self.dtype, self.ndim = tuple(shape), dtype, len(shape)

        def like(self):
            return TensorDesc(self.shape_expr, self.dtype)

    class SymInt32:
        def __init__(self, v):
            self.v = v

    class SymIntExprs(tuple):
        @classmethod
        def from_tuple(cls, items):
            return cls(items)

    class KernelLaunchParams:
        pass

    class AutoTuneCombination:
        def __init__(self, types_, layouts=""):
            self.types, self.layouts = types_, layouts

    api.TensorDesc, api.SymInt32, api.SymIntExprs = TensorDesc, SymInt32, SymIntExprs
    api.KernelLaunchParams, api.AutoTuneCombination = KernelLaunchParams, AutoTuneCombination
    api.cdiv, api.min = _cdiv, _min
    api.op = types.SimpleNamespace()

    def decorator(kind):
        def wrap(plugin_id):
            def record(fn):
                params = inspect.signature(fn).parameters
                for p in params.values():  # tensorrt.plugin calls issubclass() on these
                    assert not isinstance(p.annotation, str), f"{kind} {p.name}: string annotation {p.annotation!r}"
                if kind == "register":
                    assert plugin_id not in api.registry, f"{plugin_id} registered twice"
                    ns, name = plugin_id.split("::")
                    setattr(api.op, ns, getattr(api.op, ns, types.SimpleNamespace()))
                    setattr(getattr(api.op, ns), name, fn)
                api.registry.setdefault(plugin_id, {})[kind] = fn
                return fn
            return record
        return wrap

    api.register, api.autotune, api.aot_impl = decorator("register"), decorator("autotune"), decorator("aot_impl")
    trt = types.ModuleType("tensorrt")
    trt.__version__, trt.float32, trt.float16, trt.plugin = "10.9.0.34", "FLOAT", "HALF", api
    return trt, api


def test_register_plugin_against_the_plugin_api(monkeypatch, trt_ptx):
    trt, api = _fake_plugin_api()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", api)
    monkeypatch.setattr(trt_plugin, "_ptx", lambda arch: trt_ptx.encode())
    ids = trt_plugin.register_plugin()
    assert ids == ["ferret::lpd", "ferret::lpd_residual"] and trt_plugin.register_plugin() == ids  # idempotent
    for plugin_id, residual in zip(ids, (False, True)):
        fns = api.registry[plugin_id]
        reg, aot, tune = fns["register"], fns["aot_impl"], fns["autotune"]
        # the schemas tensorrt.plugin validates: tensors, attributes in register order, then outputs[, tactic]
        assert list(inspect.signature(reg).parameters) == ["x", *trt_plugin.ATTRIBUTES]
        assert list(inspect.signature(aot).parameters) == ["x", *trt_plugin.ATTRIBUTES, "outputs", "tactic"]
        assert list(inspect.signature(tune).parameters) == ["x", "outputs"]
        ret = inspect.signature(aot).return_annotation
        assert typing.get_origin(ret) is tuple and typing.get_args(ret)[2:] == (api.KernelLaunchParams, api.SymIntExprs)
        x = api.TensorDesc((Sym(2, "N"), Sym(3, "C"), Sym(40, "H"), Sym(70, "W")), trt.float16)
        out = reg(x, func="median", window_size=3)
        assert out.shape_expr == x.shape_expr and out.dtype == trt.float16  # output = input's shape and dtype
        assert [c.types for c in tune(x, (out,))] == ["FP32|FP16, FP32|FP16"]
        name, ptx, params, extra = aot(x, "median", 3, (out,), 0)
        want = launch.launch_config("lpd_residual" if residual else "lpd_generic", (2, 3, 40, 70), "float16",
                                    trt_plugin.PTX_ARCH, 3)
        assert name == "trt_" + want.name and f".entry {name}(" in ptx.decode()
        assert tuple(_value(getattr(params, f"grid_{a}")) for a in "xyz") == want.grid
        assert tuple(getattr(params, f"block_{a}") for a in "xyz") == want.block and params.shared_mem == want.shared_mem_bytes
        assert all(isinstance(e, api.SymInt32) for e in extra)
        assert [_value(e.v) for e in extra] == ([2, 3, 40, 70] if residual else [2, 3, 40, 70, 3, 0, 0])
        with pytest.raises(ConfigError, match="Received LPD function 'origin'"):
            reg(x, func="origin", window_size=3)


def test_register_plugin_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ConfigError, match=re.escape(trt_export.TRT_MISSING)):
        trt_plugin.register_plugin()


def test_plugin_node_attributes_are_what_the_plugin_declares(graphs):
    """The AOT call passes the node's attributes positionally in the node's order (the parser keeps
    plugin_namespace/plugin_version/aot for itself), so that order must be the register order."""
    node = next(n for n in onnx.load(str(graphs["plugin"])).graph.node if n.domain == PLUGIN_DOMAIN)
    assert (node.op_type, node.domain) == (PLUGIN_OP, trt_plugin.PLUGIN_NAMESPACE)
    passed = [a.name for a in node.attribute if a.name not in trt_plugin.PLUGIN_CONTROL_ATTRS]
    assert tuple(passed) == trt_plugin.ATTRIBUTES
    assert {a.name: a.s.decode() for a in node.attribute if a.name == "plugin_namespace"} == \
        {"plugin_namespace": trt_plugin.PLUGIN_NAMESPACE}


# ------------------------------------------------------------------------------ plugin: semantics
def _host_plugin(x: np.ndarray, op: str, func: str, k: int) -> np.ndarray:
    """What the engine's kernel computes for ``op``: the host build run block by block with the
    kernel, grid, block, shared memory and int arguments that aot_impl gives TensorRT."""
    got = trt_plugin.aot_launch(x.shape, "float32", func, k, trt_plugin.OPS[op], cdiv=_cdiv, minimum=_min)
    cfg = launch.LaunchConfig(got.kernel.removeprefix("trt_"), trt_plugin.PTX_ARCH, got.grid, got.block, got.shared_mem)
    if cfg.name.startswith("lpd_residual"):
        return host.emulate_lpd(x, cfg)
    *_, k_arg, variant, residual = got.extra_args
    func_of = {v: f for f, v in VARIANT_IDS.items()}
    return host.emulate_lpd(x, cfg, func_of[variant], k_arg, bool(residual))


@pytest.mark.parametrize("op", sorted(trt_plugin.OPS))
@pytest.mark.parametrize("func, k", [("median", 3), ("excmed", 3), ("retmed", 5), ("min", 3), ("avg", 7)])
def test_plugin_op_means_what_the_portable_graph_computes(func, k, op):
    x = np.random.default_rng(k).standard_normal((2, 3, 19, 37)).astype(np.float32)
    x[0, 1, 4:8, 5:9] = 0.25  # ties
    rec = _session(lpd_graph(func, k, x.shape)).run(None, {"input": x})[0]
    want = x - rec if trt_plugin.OPS[op] else rec
    np.testing.assert_allclose(_host_plugin(x, op, func, k), want, rtol=0, atol=1e-6)


def _cut_at_plugin(path: Path) -> tuple[onnx.ModelProto, str]:
    """The plugin graph with its ferret::lpd node removed and the node's output made a graph input."""
    proto = onnx.load(str(path))
    node = next(n for n in proto.graph.node if n.domain == PLUGIN_DOMAIN)
    proto.graph.node.remove(node)
    proto.graph.input.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT,
                                                                [None, 3, None, None]))
    keep = [o for o in proto.opset_import if o.domain != PLUGIN_DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    return proto, node.output[0]


def test_plugin_graph_with_the_kernel_equals_the_portable_graph(graphs):
    """The whole model: x -> (host build of the plugin's kernel) -> rest of the plugin graph gives the
    portable graph's logits, so ``lpd`` must return the reconstruction the graph subtracts from x."""
    x = normalize(np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    want = _session(graphs["portable"]).run(None, {"input": x})[0]
    cut, rec_name = _cut_at_plugin(graphs["plugin"])
    rec = _host_plugin(x, PLUGIN_OP, "median", 3)
    got = _session(cut).run(None, {"input": x, rec_name: rec})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # feeding the residual instead (the other reading of the node) gives something else
    wrong = _session(cut).run(None, {"input": x, rec_name: _host_plugin(x, "lpd_residual", "median", 3)})[0]
    assert np.abs(wrong - want).max() > 1e-3


def test_verification_reference_for_plugin_graphs(graphs):
    """build_engine compares a plugin engine with the plugin graph made portable again."""
    x = normalize(np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    ref = trt_verify.portable_reference(graphs["plugin"])
    onnx.checker.check_model(ref, full_check=True)
    np.testing.assert_allclose(_session(ref).run(None, {"input": x})[0],
                               _session(graphs["portable"]).run(None, {"input": x})[0], rtol=1e-6, atol=1e-6)


def test_verification_cases_cover_min_opt_max(graphs, tmp_path):
    from ferret_runtime.samples import write_samples

    model = describe_onnx(graphs["dynamic_hw"])
    profile = trt_profile.profile_shapes(model, (1, 3, 5), (16, 32, 48))
    images = write_samples(tmp_path, n=1, size=40)
    cases = dict(trt_verify._cases(model, profile, images))
    assert [(k, v.shape) for k, v in cases.items()] == [
        ("real images (3)", (3, 32, 32, 3)), ("random, min batch 1", (1, 32, 32, 3)),
        ("random, opt batch 3", (3, 32, 32, 3)), ("random, max batch 5", (5, 32, 32, 3)),
        ("random, min size 16x16", (1, 16, 16, 3)), ("random, max size 48x48", (1, 48, 48, 3)),
        ("image, non-square 16x48", (1, 16, 48, 3))]  # a kernel that swaps H and W fails here
    assert all(v.dtype == np.uint8 for v in cases.values())


# ============================================================================= GPU + TensorRT


@pytest.fixture(scope="module")
def built(ckpt, tmp_path_factory):
    """fp32 engines from one checkpoint, portable and plugin, sharing a timing cache."""
    root = tmp_path_factory.mktemp("engines")
    out = {}
    for lpd in ("portable", "plugin"):
        out[lpd] = trt_export.export_and_build(ckpt, root / f"{lpd}.engine", precision="fp32", input_size=64, lpd=lpd,
                                               batch=(1, 4, 8), timing_cache=root / "trt.cache", log=print)
    return out


@pytest.mark.parametrize("lpd", ["portable", "plugin"])
@pytest.mark.trt
@pytest.mark.gpu
def test_gpu_build_verifies_and_writes(built, lpd):
    res = built[lpd]
    assert res.comparisons and all(c.passed for c in res.comparisons)
    assert {c.case.split(",")[-1].strip() for c in res.comparisons} >= {"min batch 1", "opt batch 4", "max batch 8"}
    side = sidecar.read(res.path)
    assert side.engine["lpd"] == lpd and side.engine["engine_sha256"] == sha256(res.path)
    assert (side.engine["plugin"] is not None) == (lpd == "plugin")


@pytest.mark.trt
@pytest.mark.gpu
def test_gpu_runs_at_min_opt_max_batch_and_plugin_equals_portable(built):
    x = normalize(np.random.default_rng(3).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8))
    with trt_backend.TrtBackend(built["portable"].path, gpu_preprocess=False) as portable, \
            trt_backend.TrtBackend(built["plugin"].path, gpu_preprocess=False) as plugin:
        assert portable.profile_min[0] == 1 and portable.profile_max[0] == 8
        for n in (1, 4, 8, 11):  # 11: two chunks of the largest batch
            batch = np.resize(x, (n, *x.shape[1:]))
            a, b = portable.run(batch), plugin.run(batch)
            assert a.shape == (n,) and np.isfinite(a).all()
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3)
        with pytest.raises(ValueError, match=r"expected shapes from \(1, 3, 64, 64\) to \(8, 3, 64, 64\)"):
            portable.run(np.zeros((1, 3, 32, 32), np.float32))


@pytest.mark.trt
@pytest.mark.gpu
def test_gpu_preprocessing_equals_host_preprocessing(ckpt, built, tmp_path):
    u8 = np.random.default_rng(4).integers(0, 256, (11, 64, 64, 3), dtype=np.uint8)
    with trt_backend.TrtBackend(built["portable"].path, gpu_preprocess=False) as host_side:
        want = host_side.run(normalize(u8))
    with trt_backend.TrtBackend(built["portable"].path) as gpu_side:
        assert gpu_side.kernel == "normalize"
        np.testing.assert_allclose(gpu_side.run(u8), want, rtol=0, atol=0)  # the kernel normalises bit for bit
    external = trt_export.export_and_build(ckpt, tmp_path / "ext.engine", precision="fp32", input_size=64,
                                           lpd="external", batch=(1, 4, 8), log=print)
    assert all(c.passed for c in external.comparisons)
    with trt_backend.TrtBackend(external.path) as fused:
        assert fused.kernel == "preprocess_lpd"
        np.testing.assert_allclose(fused.run(u8), want, rtol=1e-3, atol=1e-3)


@pytest.mark.trt
@pytest.mark.gpu
def test_gpu_timing_cache_is_reused(ckpt, built, tmp_path):
    cache = built["portable"].path.with_name("trt.cache")
    before = cache.read_bytes()
    again = trt_export.export_and_build(ckpt, tmp_path / "again.engine", precision="fp32", input_size=64,
                                        batch=(1, 4, 8), timing_cache=cache, verify=False, log=print)
    assert cache.read_bytes() == before or again.build_seconds < built["portable"].build_seconds


@pytest.mark.trt
@pytest.mark.gpu
def test_gpu_fp16_build(ckpt, tmp_path):
    res = trt_export.export_and_build(ckpt, tmp_path / "fp16.engine", precision="fp16", input_size=64, batch=(1, 2, 4),
                                      log=print)
    assert sidecar.read(res.path).meta["precision"] == "fp16"
    assert all(c.passed and c.tol == trt_verify.TOLERANCE["fp16"] for c in res.comparisons)


@pytest.mark.trt
@pytest.mark.gpu
def test_gpu_int8_build(ckpt, tmp_path):
    if importlib.util.find_spec("ferret_export.quantize") is None:
        pytest.skip("ferret_export.quantize (INT8 Q/DQ graphs) is not available")
    from ferret_runtime.samples import write_samples

    images = write_samples(tmp_path / "calib", n=4, size=64)
    res = trt_export.export_and_build(ckpt, tmp_path / "int8.engine", precision="int8", input_size=64, batch=(1, 2, 4),
                                      int8=Int8Options(images, calib_images=4), log=print)
    assert sidecar.read(res.path).meta["precision"] == "int8"


@pytest.mark.trt
@pytest.mark.gpu
def test_gpu_detector_gives_the_reference_logits(authors_ckpt, reference, tmp_path):
    from ferret_runtime import Detector

    ref = json.loads((reference / "reference_logits.json").read_text())["images"]
    engine = tmp_path / "m.engine"
    trt_export.export_and_build(authors_ckpt, engine, precision="fp32", batch=(1, 8, 16), log=print)
    names = sorted(ref)
    with Detector.open(engine) as det:  # needs the 'tensorrt' entry point in ferret.backends
        results = det.predict([reference / "images" / n for n in names])
    for name, r in zip(names, results):
        assert r.error is None
        assert abs(r.logit - ref[name]["logit_center_crop_256"]) <= 1e-3, (name, r.logit)


@pytest.mark.gpu(torch=False)
def test_gpu_cuda_buffers_round_trip():
    with cuda.Context(0) as ctx, cuda.Stream(ctx) as stream, cuda.PinnedBuffer(4096, ctx) as a, \
            cuda.DeviceBuffer(4096, ctx) as d, cuda.PinnedBuffer(4096, ctx) as b, cuda.Event(ctx) as e0, \
            cuda.Event(ctx) as e1:
        a.array(np.float32, (1024,))[:] = np.arange(1024, dtype=np.float32)
        e0.record(stream)
        cuda.copy_htod_async(d, a, 4096, stream)
        cuda.copy_dtoh_async(b, d, 4096, stream)
        e1.record(stream)
        stream.synchronize()
        np.testing.assert_array_equal(b.array(np.float32, (1024,)), np.arange(1024, dtype=np.float32))
        assert e0.elapsed_ms(e1) >= 0
        with pytest.raises(cuda.CudaError, match="expected at most 4096"):
            cuda.copy_htod_async(d, a, 8192, stream)
    with pytest.raises(cuda.CudaError, match="Received a closed PinnedBuffer"):
        a.ptr


# ======================================================= build_engine and TrtBackend with a stand-in TensorRT
# The build's and the runtime's own code paths, run on a CPU: a stand-in `tensorrt` and a stand-in
# `ferret_runtime.cuda` whose memory is host memory. What the real TensorRT does is the GPU tests' business;
# these check the calls, the files and the failures. The stand-in engine must not run what verify_engine
# compares against (the graph made portable, in an optimised ONNX Runtime session), or verification could
# not fail: standard operators run in an ONNX Runtime session with every graph optimisation off (so its
# fused and constant-folded paths are not shared with the reference), and a ferret::lpd node runs the
# plugin that was registered: the launch its aot_impl returns, through the host build of lpd.cu's
# kernels (standins.run_trt_entry), so a plugin that computes something else fails the build.
TIMING_CACHE_HEADER = b"stand-in timing cache for TensorRT 10.9.0.34 on %s\n" % GPU.name.encode()


class FakeTRT(types.ModuleType):
    def __init__(self, version="10.9.0.34", error=0.0, plugin_api=None):
        super().__init__("tensorrt")
        self.__version__, self.error, self.calls, self.builds = version, error, [], []
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0, PREFER_AOT_PYTHON_PLUGINS=1)
        self.BuilderFlag = types.SimpleNamespace(TF32="TF32")
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.HardwareCompatibilityLevel = types.SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS")
        self.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
        self.float16, self.float32 = "HALF", "FLOAT"
        fake = self

        class ILogger:
            Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

            def __init__(self):
                pass

        class Logger(ILogger):
            WARNING, VERBOSE = 2, 4

            def __init__(self, level=2):
                pass

        class Cache:
            """A timing cache: a header naming the GPU and TensorRT it was measured on, then one line per
            (network, shapes) the builder timed; a build adds its line unless the cache already has it."""

            def __init__(self, data):
                self.loaded = bytes(data)  # what create_timing_cache was given
                self.lines = self.loaded.splitlines(keepends=True)[1:] if self.loaded else []

            def matches(self):
                return not self.loaded or self.loaded.startswith(TIMING_CACHE_HEADER)

            def serialize(self):
                return TIMING_CACHE_HEADER + b"".join(self.lines)

        class Config:
            def __init__(self):
                self.flags_cleared, self.pool, self.level, self.cache, self.profiles = [], None, None, None, []

            def set_memory_pool_limit(self, kind, size):
                self.pool = (kind, size)

            def clear_flag(self, flag):
                self.flags_cleared.append(flag)

            def create_timing_cache(self, data):
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                if not (cache.matches() or ignore_mismatch):
                    return False  # as TensorRT: a cache from another GPU or version is refused
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

            def add_optimization_profile(self, p):
                self.profiles.append(p)

        class OptProfile(dict):
            def set_shape(self, name, lo, opt, hi):
                self[name] = (tuple(lo), tuple(opt), tuple(hi))

        class Network:
            def __init__(self, flags):
                self.flags, self.onnx = flags, None

        class OnnxParser:
            """Parses the file; a custom-domain node needs a plugin registered under namespace::op_type."""

            def __init__(self, network, logger):
                self.network, self.errors = network, []

            @property
            def num_errors(self):
                return len(self.errors)

            def get_error(self, i):
                return self.errors[i]

            def parse_from_file(self, path):
                registry = getattr(getattr(fake, "plugin", None), "registry", {})
                for node in onnx.load(path, load_external_data=False).graph.node:
                    if node.domain in ("", "ai.onnx"):
                        continue
                    ns = {a.name: a.s.decode() for a in node.attribute if a.name == "plugin_namespace"}
                    plugin_id = f"{ns.get('plugin_namespace', node.domain)}::{node.op_type}"
                    if plugin_id not in registry:
                        self.errors.append(f"node {node.name}: plugin {plugin_id} not found in the registry")
                self.network.onnx = path
                return not self.errors

        class Builder:
            def __init__(self, logger):
                self.logger = logger

            def create_network(self, flags):
                return Network(flags)

            def create_builder_config(self):
                fake.config = Config()
                return fake.config

            def create_optimization_profile(self):
                return OptProfile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build", network.flags))
                (name, shapes), = config.profiles[0].items()
                cache = config.cache
                fake.builds.append({"onnx": Path(network.onnx).name,
                                    "timing_cache_in": None if cache is None else cache.loaded})
                if cache is not None:  # the timings measured here go into the cache the config holds
                    line = f"{Path(network.onnx).name} {shapes}\n".encode()
                    if line not in cache.lines:
                        cache.lines.append(line)
                return json.dumps({"onnx": network.onnx, "input": name, "profile": shapes}).encode()

        self.ILogger, self.Logger, self.Builder, self.OnnxParser = ILogger, Logger, Builder, OnnxParser
        self.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda blob: FakeEngine(fake, blob))
        if plugin_api is not None:
            self.plugin = plugin_api

    @staticmethod
    def nptype(dtype):
        return {"FLOAT": np.float32, "HALF": np.float16, "UINT8": np.uint8}[dtype]

    def run_plugin(self, plugin_id, attrs, x):
        """The registered plugin on ``x``: its output description and its AOT launch (asked for each shape
        run; TensorRT asks once, symbolically, at build time: same values), run by the host kernels."""
        api = self.plugin
        fns = api.registry[plugin_id]
        desc = api.TensorDesc(tuple(Sym(v, d) for v, d in zip(x.shape, "NCHW")),
                              {np.dtype(np.float32): self.float32, np.dtype(np.float16): self.float16}[x.dtype])
        out = fns["register"](desc, *attrs)
        name, ptx, params, extra = fns["aot_impl"](desc, *attrs, (out,), 0)
        grid = tuple(_value(getattr(params, f"grid_{a}")) for a in "xyz")
        block = tuple(getattr(params, f"block_{a}") for a in "xyz")
        return run_trt_entry(name, ptx, x, [_value(e.v) for e in extra], grid, block, params.shared_mem)


def _unoptimized_session(proto):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _up_to(proto, name):
    """The graph that computes tensor ``name`` from the graph's inputs: the nodes it depends on, as outputs ``name``."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    producer = {o: n for n in proto.graph.node for o in n.output}
    keep, todo = set(), [name]
    while todo:
        n = producer.get(todo.pop())
        if n is not None and id(n) not in keep:
            keep.add(id(n))
            todo += list(n.input)
    del out.graph.node[:]
    out.graph.node.extend(n for n in proto.graph.node if id(n) in keep)
    used = {i for n in out.graph.node for i in n.input}
    del out.graph.input[:]
    out.graph.input.extend(v for v in proto.graph.input if v.name in used)
    del out.graph.output[:]
    out.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return out


class FakeEngine:
    """The graph as built: standard operators in ONNX Runtime (no graph optimisation), the ferret::lpd node
    by the registered plugin's kernel (FakeTRT.run_plugin), with the graph cut around that node."""

    def __init__(self, trt, blob):
        spec = json.loads(blob)
        self.trt, self.profile = trt, [tuple(s) for s in spec["profile"]]
        model = describe_onnx(spec["onnx"])
        self.names = (model.input_name, model.output_name)
        self.dtypes = {model.input_name: {"float32": "FLOAT", "uint8": "UINT8"}[model.input_dtype],
                       model.output_name: "FLOAT"}
        self.num_io_tensors = 2
        proto = onnx.load(spec["onnx"])
        custom = [n for n in proto.graph.node if n.domain not in ("", "ai.onnx")]
        self.plugin = None
        if not custom:
            self.session = _unoptimized_session(proto)
            return
        (node,) = custom  # the exports have one ferret::lpd node
        control = trt_plugin.PLUGIN_CONTROL_ATTRS  # the parser keeps these; the rest go to the plugin in node order
        attrs = [onnx.helper.get_attribute_value(a) for a in node.attribute if a.name not in control]
        attrs = [a.decode() if isinstance(a, bytes) else a for a in attrs]
        namespace = next((a.s.decode() for a in node.attribute if a.name == "plugin_namespace"), node.domain)
        cut, _ = _cut_at_plugin(Path(spec["onnx"]))
        self.plugin = (f"{namespace}::{node.op_type}", attrs, node.input[0], node.output[0])
        self.pre = None if node.input[0] == model.input_name else _unoptimized_session(_up_to(cut, node.input[0]))
        self.session = _unoptimized_session(cut)

    def run(self, x):
        if self.plugin is None:
            return self.session.run(None, {self.names[0]: x})[0]
        plugin_id, attrs, src, dst = self.plugin
        plugin_in = x if self.pre is None else self.pre.run(None, {self.names[0]: x})[0]
        plugin_out = self.trt.run_plugin(plugin_id, attrs, plugin_in)
        return self.session.run(None, {self.names[0]: x, dst: plugin_out})[0]

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "INPUT" if name == self.names[0] else "OUTPUT"

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def get_tensor_profile_shape(self, name, index):
        return self.profile

    def get_tensor_shape(self, name):
        return (-1, 3, -1, -1) if name == self.names[0] else (-1, 1)

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.addresses, self.shape = engine, {}, None

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def set_input_shape(self, name, shape):
        self.shape = tuple(shape)
        return True

    def execute_async_v3(self, stream):
        shape = self.shape
        LazyStream.by_handle[stream].enqueue(lambda: self._execute(shape))
        return True

    def _execute(self, shape):
        import ctypes

        self.shape = shape
        e = self.engine
        dtype = np.dtype(e.trt.nptype(e.dtypes[e.names[0]]))
        count = int(np.prod(self.shape))
        raw = (ctypes.c_uint8 * (count * dtype.itemsize)).from_address(self.addresses[e.names[0]])
        x = np.frombuffer(raw, dtype).reshape(self.shape)
        y = e.run(x).astype(np.float32) + e.trt.error
        ctypes.memmove(self.addresses[e.names[1]], y.ctypes.data, y.nbytes)
        return True


@pytest.fixture
def fake_trt(monkeypatch):
    trt = FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    trt.kernels = fake_cuda(monkeypatch)
    return trt


def test_int8_from_weights_goes_through_the_onnx_exports_int8_stage(fake_trt, ckpt, tmp_path, monkeypatch):
    """--weights --int8 calibrates on --calib-data and holds the agreement floor, as 'ferret export onnx --int8'."""
    from ferret_export import pipeline

    calls = []

    def stage(fp32, out, int8, verify_images, log):
        calls.append((fp32.name, int8, verify_images))
        raise ParityError(f"{out}: not written: int8 and fp32 labels agree on 50.00% of 2 images; expected >= 99.00%")

    from ferret_runtime.samples import write_samples

    monkeypatch.setattr(pipeline, "quantize_verified", stage)
    options = Int8Options(["calib"], calib_images=8)
    images = write_samples(tmp_path / "v", n=1, size=32)
    with pytest.raises(ParityError, match=r"agree on 50\.00% of 2 images; expected >= 99\.00%"):
        trt_export.export_and_build(ckpt, tmp_path / "m.engine", precision="int8", input_size=32, int8=options,
                                    verify_images=images, log=_quiet)
    assert calls == [("fp32.onnx", options, images)] and not fake_trt.calls  # nothing built
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_build_writes_a_verified_engine_and_sidecar(fake_trt, graphs, tmp_path):
    lines = []
    res = trt_export.build_engine(graphs["portable"], tmp_path / "m.engine", batch=(1, 2, 5), workspace_mb=256,
                                  log=lines.append)
    assert res.path.is_file() and res.sidecar == tmp_path / "m.engine.json" and res.sidecar.is_file()
    assert [c.case for c in res.comparisons] == ["real images (6)", "random, min batch 1", "random, opt batch 2",
                                                 "random, max batch 5"]
    assert all(c.passed and c.tol == trt_verify.TOLERANCE["fp32"] for c in res.comparisons)
    assert sum(line.startswith("[verify]") and "max abs err" in line for line in lines) == 4
    assert fake_trt.calls == [("build", 1 << 0)]  # strongly typed on 10.x, no plugin preference
    cfg = fake_trt.config
    assert cfg.pool == ("WORKSPACE", 256 << 20) and cfg.flags_cleared == ["TF32"] and cfg.level is None
    assert cfg.profiles == [{"input": ((1, 3, 32, 32), (2, 3, 32, 32), (5, 3, 32, 32))}]
    describe_model(res.path)
    side = sidecar.read(res.path)
    assert side.engine["engine_sha256"] == sha256(res.path) and side.engine["workspace_mb"] == 256
    trt_export.build_engine(graphs["portable"], tmp_path / "m2.engine", batch=(1, 2, 5), hardware_compat=True,
                            verify=False, log=_quiet)
    assert fake_trt.config.hardware_compatibility_level == "AMPERE_PLUS"
    assert sidecar.read(tmp_path / "m2.engine").engine["hardware_compat"] is True


def _timed(name, *batches):
    """The stand-in cache's line for a network built with batch profile (min, opt, max) at 32x32."""
    return f"{name} {tuple((b, 3, 32, 32) for b in batches)}\n".encode()


def test_timing_cache_is_given_to_the_builder_and_saved_back(fake_trt, graphs, tmp_path):
    cache, lines = tmp_path / "trt.cache", []
    trt_export.build_engine(graphs["portable"], tmp_path / "a.engine", batch=(1, 2, 5), timing_cache=cache,
                            verify=False, log=lines.append)
    first = cache.read_bytes()
    assert fake_trt.builds[0]["timing_cache_in"] == b""  # no file yet: the builder starts an empty cache ...
    assert first == TIMING_CACHE_HEADER + _timed("portable.onnx", 1, 2, 5)  # ... and its timings are saved
    assert not any("reused" in line for line in lines)
    lines.clear()
    trt_export.build_engine(graphs["dynamic_hw"], tmp_path / "b.engine", batch=(1, 2, 6), dynamic_hw=(32, 32, 32),
                            timing_cache=cache, verify=False, log=lines.append)
    assert fake_trt.builds[1]["timing_cache_in"] == first  # the second build's builder got the first one's bytes
    assert cache.read_bytes() == first + _timed("dynamic_hw.onnx", 1, 2, 6)  # and both builds' timings are kept
    assert [line for line in lines if "timing cache" in line] == [
        f"[build] timing cache {cache}: 0 kB reused", f"[build] timing cache saved to {cache} (0 kB)"]


def test_timing_cache_from_another_gpu_is_replaced(fake_trt, graphs, tmp_path):
    cache, lines = tmp_path / "trt.cache", []
    cache.write_bytes(b"a timing cache measured on another GPU\n")
    trt_export.build_engine(graphs["portable"], tmp_path / "a.engine", batch=(1, 2, 5), timing_cache=cache,
                            verify=False, log=lines.append)
    assert f"[build] timing cache {cache} does not match this GPU/TensorRT; starting a new one" in lines
    assert fake_trt.builds[0]["timing_cache_in"] == b""  # not the foreign bytes
    assert cache.read_bytes() == TIMING_CACHE_HEADER + _timed("portable.onnx", 1, 2, 5)


def test_build_writes_nothing_when_verification_fails(fake_trt, graphs, tmp_path):
    fake_trt.error = 0.01  # TensorRT "disagrees" with ONNX Runtime by 1e-2 everywhere
    out = tmp_path / "m.engine"
    out.write_bytes(b"the previous engine")
    with pytest.raises(ParityError, match=r"m\.engine: not written: 4 of 4 verification cases exceed "
                                                     r"atol 1e-03 \+ rtol 1e-03 \(worst max abs err 1\.000e-02\)"):
        trt_export.build_engine(graphs["portable"], out, batch=(1, 2, 5), log=_quiet)
    assert out.read_bytes() == b"the previous engine" and sorted(p.name for p in tmp_path.iterdir()) == ["m.engine"]


@pytest.fixture
def plugin_trt(monkeypatch, trt_ptx):
    """The stand-in TensorRT with the stand-in tensorrt.plugin, so register_plugin registers ferret::lpd there
    and the engine runs the launch that plugin's aot_impl returns."""
    _, api = _fake_plugin_api()
    trt = FakeTRT(plugin_api=api)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", api)
    trt.kernels = fake_cuda(monkeypatch)
    launches = []
    real = run_trt_entry
    monkeypatch.setattr(sys.modules[__name__], "run_trt_entry",
                        lambda name, ptx, x, extra, *a: launches.append((name, extra)) or real(name, ptx, x, extra, *a))
    trt.plugin_launches = launches
    return trt


@pytest.mark.parametrize("graph", ["plugin", "plugin_nhwc"])
def test_build_with_the_plugin(plugin_trt, graphs, tmp_path, graph):
    res = trt_export.build_engine(graphs[graph], tmp_path / "p.engine", batch=(1, 2, 3), log=_quiet)
    assert plugin_trt.calls == [("build", (1 << 0) | (1 << 1))]  # AOT plugins preferred
    assert set(plugin_trt.plugin.registry) == {"ferret::lpd", "ferret::lpd_residual"}
    # every verification batch went through the plugin's kernel: lpd_generic with (N, C, H, W, k 3, variant 0
    # (median in lpd.cu's enum), residual 0); real images (6 clipped to the max batch 3), then batches 1, 2, 3
    assert plugin_trt.plugin_launches == [("trt_lpd_generic_f32", [n, 3, 32, 32, 3, 0, 0]) for n in (3, 1, 2, 3)]
    assert all(c.passed for c in res.comparisons)  # checked against the graph made portable
    rec = sidecar.read(res.path).engine
    assert rec["lpd"] == "plugin" and rec["plugin"] == trt_plugin.plugin_record()


def _wrong_launch(real, mutation):
    """trt_plugin.aot_launch with one deliberate mistake."""
    def launch_(shape, dtype, func, k, residual, **kw):
        if mutation == "excmed for median":
            return real(shape, dtype, "excmed" if func == "median" else "median", k, residual, **kw)
        if mutation == "residual for the reconstruction":  # the lpd op's kernel returns x - lpd(x)
            return real(shape, dtype, func, k, not residual, **kw)
        if mutation == "H and W swapped":  # the kernel reads an N x C x H x W tensor as N x C x W x H
            n, c, h, w = shape
            return real((n, c, w, h), dtype, func, k, residual, **kw)
        got = real(shape, dtype, func, k, residual, **kw)
        if mutation == "grid x and y swapped":
            return replace(got, grid=(got.grid[1], got.grid[0], got.grid[2]))
        if mutation == "k and variant swapped":
            n, c, h, w, k_, variant, res = got.extra_args
            return replace(got, extra_args=(n, c, h, w, variant, k_, res))
        if mutation == "lpd.cu's kernel, not the TensorRT entry point":  # takes its output second, not last
            return replace(got, kernel=got.kernel.removeprefix(trt_plugin.TRT_PREFIX))
        raise AssertionError(mutation)
    return launch_


@pytest.mark.parametrize("mutation", ["excmed for median", "residual for the reconstruction", "grid x and y swapped"])
def test_build_fails_verification_with_a_wrong_plugin(plugin_trt, graphs, tmp_path, monkeypatch, mutation):
    """A plugin computing something other than the node's LPD builds, then fails verification: nothing written."""
    monkeypatch.setattr(trt_plugin, "aot_launch", _wrong_launch(trt_plugin.aot_launch, mutation))
    with pytest.raises(ParityError, match=r"p\.engine: not written: [1-4] of 4 verification cases exceed "
                                                     r"atol 1e-03 \+ rtol 1e-03"):
        trt_export.build_engine(graphs["plugin"], tmp_path / "p.engine", batch=(1, 2, 3), log=_quiet)
    assert plugin_trt.plugin_launches and list(tmp_path.iterdir()) == []


def test_build_catches_a_plugin_that_swaps_h_and_w(plugin_trt, graphs, tmp_path, monkeypatch):
    """Square inputs cannot tell H from W; a dynamic-H/W engine is also verified on a non-square size, which can."""
    ok = trt_export.build_engine(graphs["plugin_hw"], tmp_path / "ok" / "p.engine", batch=(1, 2, 3),
                                 dynamic_hw=(16, 24, 40), log=_quiet)
    assert all(c.passed for c in ok.comparisons) and "image, non-square 16x40" in [c.case for c in ok.comparisons]
    monkeypatch.setattr(trt_plugin, "aot_launch", _wrong_launch(trt_plugin.aot_launch, "H and W swapped"))
    lines: list[str] = []
    with pytest.raises(ParityError, match=r"p\.engine: not written: 1 of 7 verification cases exceed"):
        trt_export.build_engine(graphs["plugin_hw"], tmp_path / "bad" / "p.engine", batch=(1, 2, 3),
                                dynamic_hw=(16, 24, 40), log=lines.append)
    failed = [line for line in lines if line.startswith("[verify]") and "FAILED" in line]
    assert len(failed) == 1 and "image, non-square 16x40" in failed[0], failed
    assert not (tmp_path / "bad").exists() or list((tmp_path / "bad").iterdir()) == []


@pytest.mark.parametrize("mutation, message", [
    ("k and variant swapped", r"trt_lpd_generic_f32: the kernel refused its launch \(lpd_generic_emulate returned 1\)"),
    ("lpd.cu's kernel, not the TensorRT entry point", r"lpd_generic_f32 is not a TensorRT entry point"),
])
def test_build_faults_with_a_wrong_plugin_launch(plugin_trt, graphs, tmp_path, monkeypatch, mutation, message):
    monkeypatch.setattr(trt_plugin, "aot_launch", _wrong_launch(trt_plugin.aot_launch, mutation))
    with pytest.raises(KernelFault, match=message):
        trt_export.build_engine(graphs["plugin"], tmp_path / "p.engine", batch=(1, 2, 3), log=_quiet)
    assert list(tmp_path.iterdir()) == []


def test_plugin_graph_without_the_plugin_registered_does_not_parse(fake_trt, graphs, tmp_path, monkeypatch):
    monkeypatch.setattr(trt_plugin, "register_plugin", lambda: ["ferret::lpd"])  # registers nothing
    with pytest.raises(ConfigError, match=r"plugin\.onnx: TensorRT's ONNX parser refused the graph: node lpd_plugin_1: "
                                          r"plugin ferret::lpd not found in the registry"):
        trt_export.build_engine(graphs["plugin"], tmp_path / "p.engine", batch=(1, 2, 3), log=_quiet)


def test_build_refuses_hardware_compat_before_ampere(fake_trt, graphs, tmp_path, monkeypatch):
    monkeypatch.setattr(cuda, "device_info", lambda index=0: replace(GPU, name="Tesla T4", compute_capability=(7, 5)))
    with pytest.raises(ConfigError, match=r"Received --hardware-compat on Tesla T4 \(compute capability 7\.5\); "
                                          r"expected an Ampere or newer GPU"):
        trt_export.build_engine(graphs["portable"], tmp_path / "m.engine", hardware_compat=True, log=_quiet)


def test_backend_runs_in_chunks_and_pads_to_the_profile(fake_trt, graphs, tmp_path):
    engine = trt_export.build_engine(graphs["nhwc"], tmp_path / "m.plan", batch=(2, 3, 4), verify=False,
                                     log=_quiet).path
    u8 = np.random.default_rng(4).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    want = _session(graphs["nhwc"]).run(None, {"input": u8})[0][:, 0]
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
                                     log=_quiet).path
    rng = np.random.default_rng(5)
    a, b, c = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (4, 3, 2))
    want = {k: _session(graphs["nhwc"]).run(None, {"input": v})[0][:, 0] for k, v in dict(a=a, b=b, c=c).items()}
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
    engine = trt_export.build_engine(graphs[graph], tmp_path / "m.engine", batch=(2, 3, 4), log=_quiet).path
    assert fake_trt.kernels.launches  # the build's verification went through the kernel too
    u8 = np.random.default_rng(8).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    want = _session(graphs["portable"]).run(None, {"input": normalize(u8)})[0][:, 0]  # the whole model
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
                                     log=_quiet).path

    def no_nvrtc(device=0):
        raise cuda.CudaError("nvrtcVersion: received no NVRTC library (libnvrtc.so.13 not found)")

    monkeypatch.setattr(launch, "get_module", no_nvrtc)
    with pytest.raises(ConfigError, match=r"m\.engine: GPU preprocessing needs lpd\.cu compiled by NVRTC .*libnvrtc"
                                          r".*or gpu_preprocess=False"):
        trt_backend.TrtBackend(engine)
    with trt_backend.TrtBackend(engine, gpu_preprocess=False) as backend:
        assert backend.kernel is None


def test_build_checks_the_kernel_limits_first(fake_trt, graphs, tmp_path):
    with pytest.raises(ConfigError, match=r"Received height 2000000; expected at most 1048560"):
        trt_export.build_engine(graphs["plugin_hw"], tmp_path / "m.engine", dynamic_hw=(16, 64, 2_000_000), log=_quiet)
    assert fake_trt.calls == []


def test_cli_builds_with_the_stand_in(fake_trt, graphs, tmp_path, monkeypatch, capsys):
    rc = _cli(monkeypatch, ["export", "tensorrt", "--onnx", str(graphs["dynamic_hw"]), "-o", str(tmp_path / "m.plan"),
                            "--batch", "1,2,3", "--dynamic-hw", "16,32,40", "--workspace-mb", "64"])
    out = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "m.plan").is_file() and (tmp_path / "m.plan.json").is_file()
    assert "random, max size 40x40" in out and "PASSED" in out and "FAILED" not in out
    side = sidecar.read(tmp_path / "m.plan")
    assert side.engine["profiles"][0]["max"] == [3, 3, 40, 40] and side.engine["workspace_mb"] == 64


def test_detector_pipelines_batches_through_the_slots(fake_trt, graphs, tmp_path):
    """Detector over the (lazy) stand-in engine equals Detector over ONNX Runtime: same order, same logits, the
    unreadable input reported in place, batches larger than the profile split, four threads at once."""
    import threading

    from ferret_runtime import Detector
    from ferret_runtime.backends.onnxruntime import OrtBackend

    engine = trt_export.build_engine(graphs["portable"], tmp_path / "m.engine", batch=(1, 2, 4), verify=False,
                                     log=_quiet).path
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
        np.testing.assert_allclose([r.logit for r in got if r.error is None], [r.logit for r in want if r.error is None],
                                   rtol=1e-5, atol=1e-5)
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
    check_plugin_ptx({"implementation": "aot"}, (12, 0), "s.engine")  # older sidecars: nothing recorded, nothing checked
    with pytest.raises(ConfigError, match=r"received plugin ptx_nvrtc 'x\.y'"):
        check_plugin_ptx({"ptx_nvrtc": "x.y"}, (13, 0), "s.engine")
