"""Optimisation profiles, the LPD mode and the engine's sidecar, read from real exported graphs.

ferret_export/tensorrt/profile.py turns an ONNX graph and --batch/--dynamic-hw into the MIN/OPT/MAX
shapes TensorRT builds for, decides the LPD mode from the graph, and writes the sidecar that the runtime
and 'ferret export triton' read next to an engine. These check all three on the exports of one seeded
checkpoint, with the errors a user gets for a profile the graph cannot have.
"""

from __future__ import annotations

import json

import pytest

from ferret_export.onnx.graph import PLUGIN_OP
from ferret_export.onnx.model import describe_onnx
from ferret_export.tensorrt import profile as trt_profile
from ferret_export.triton.repository import describe_model
from ferret_runtime import sidecar
from ferret_runtime.errors import ConfigError
from ferret_runtime.fileio import sha256

from . import trt_fixtures
from .standins import GPU
from .trt_fixtures import write_pair

ckpt, graphs = trt_fixtures.ckpt, trt_fixtures.graphs  # shared fixtures


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


# ----------------------------------------------------------------------------------- profiles
def test_profile_of_a_dynamic_batch_graph(graphs):
    m = describe_onnx(graphs["portable"])
    assert (m.input_name, m.input_dtype, m.input_shape, m.output_shape) == \
        ("input", "float32", (None, 3, 32, 32), (None, 1))
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
    with pytest.raises(ConfigError,
                       match=r"dynamic_hw\.onnx has a dynamic height/width; expected --dynamic-hw MIN,OPT,MAX"):
        trt_profile.profile_shapes(dyn)
    with pytest.raises(ConfigError, match=r"Received --dynamic-hw 4,64,128; expected sizes >= 8"):
        trt_profile.profile_shapes(dyn, None, (4, 64, 128))
    with pytest.raises(ConfigError, match=r"Received --dynamic-hw for portable\.onnx, whose input is fixed at 32x32"):
        trt_profile.profile_shapes(describe_onnx(graphs["portable"]), None, (32, 64, 128))


def test_lpd_mode_comes_from_the_graph(graphs):
    portable, plugin = (describe_onnx(graphs[k]) for k in ("portable", "plugin"))
    assert trt_profile.resolve_lpd(portable, None) == "portable" and trt_profile.resolve_lpd(plugin, None) == "plugin"
    assert trt_profile.resolve_lpd(portable, "native") == "portable"  # the old name of portable is still accepted
    assert plugin.plugin_nodes == \
        ((PLUGIN_OP, {"func": b"median", "window_size": 3, "plugin_namespace": b"ferret", "aot": 1}),)
    with pytest.raises(ConfigError, match=r"Received --lpd plugin for portable\.onnx, a graph with the LPD as "
                                          r"standard operators; expected --lpd portable, or a graph exported with "
                                          r"'ferret export onnx --lpd plugin'"):
        trt_profile.resolve_lpd(portable, "plugin")
    with pytest.raises(ConfigError, match=r"Received --lpd portable for plugin\.onnx, a graph with the ferret::lpd "
                                          r"plugin node; expected --lpd plugin"):
        trt_profile.resolve_lpd(plugin, "portable")
    with pytest.raises(ConfigError, match=r"Received --lpd 'cuda'; expected one of portable, plugin, external"):
        trt_profile.resolve_lpd(portable, "cuda")
    external = describe_onnx(graphs["external"])
    assert trt_profile.resolve_lpd(external, None) == trt_profile.resolve_lpd(external, "external") == "external"
    with pytest.raises(ConfigError, match=r"Received --lpd portable for external\.onnx, a graph with no LPD \(its "
                                          r"input is the LPD residual\); expected --lpd external"):
        trt_profile.resolve_lpd(external, "portable")
    with pytest.raises(ConfigError, match=r"Received --lpd external for portable\.onnx, .*onnx --lpd external'"):
        trt_profile.resolve_lpd(portable, "external")


# ------------------------------------------------------------------------------------- sidecar
def test_sidecar_from_a_real_export(graphs, tmp_path):
    engine = write_pair(tmp_path, graphs["fp16"], lpd="portable")
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
