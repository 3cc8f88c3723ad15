"""The ferret::lpd TensorRT plugin, checked on a CPU, down to the builds that use it.

ferret_export/tensorrt/plugin.py gives TensorRT an ahead-of-time launch of lpd.cu's kernels (grid,
block, shared memory, extra arguments, as symbolic size expressions) and the PTX that holds them. These
check the launch against ``launch_config`` on odd shapes with symbolic sizes (``standins.Sym``), the
PTX's entry points, the registration against the stand-in ``tensorrt.plugin``, what the plugin node
means (the host build of the kernel against the portable graph), and builds through the stand-in
TensorRT, whose engine runs the registered plugin's launch: a plugin that computes or launches
something else fails the build.
"""

from __future__ import annotations

import inspect
import re
import sys
import typing
from dataclasses import replace

import numpy as np
import onnx
import pytest

from ferret_export.onnx.graph import PLUGIN_DOMAIN, PLUGIN_OP, lpd_graph
from ferret_export.tensorrt import build as trt_export
from ferret_export.tensorrt import plugin as trt_plugin
from ferret_export.verify import ParityError
from ferret_runtime import sidecar
from ferret_runtime.errors import ConfigError
from ferret_runtime.kernels import VARIANT_IDS, host, launch
from ferret_runtime.lpd_spec import LPD_SPECS
from ferret_runtime.preprocess import normalize

from . import trt_fixtures
from .standins import KernelFault, Sym, cdiv, cut_at_plugin, fake_plugin_api, sym_min, value_of
from .trt_fixtures import ort_session, quiet

ckpt, graphs, trt_ptx = trt_fixtures.ckpt, trt_fixtures.graphs, trt_fixtures.trt_ptx  # shared fixtures
fake_trt, plugin_trt = trt_fixtures.fake_trt, trt_fixtures.plugin_trt

FUNCS = sorted(LPD_SPECS)


# ------------------------------------------------------------------------------ plugin: the launch
SHAPES = [(1, 1, 1, 1), (2, 3, 17, 33), (1, 3, 256, 256), (3, 3, 1823, 781), (5, 3, 7, 1), (8000, 9, 16, 32)]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("func", FUNCS)
def test_aot_launch_matches_launch_config(func, k, residual, dtype):
    for shape in SHAPES:
        sym = tuple(Sym(v, "NCHW"[i]) for i, v in enumerate(shape))
        got = trt_plugin.aot_launch(sym, dtype, func, k, residual, cdiv=cdiv, minimum=sym_min)
        kernel = "lpd_residual" if residual and func == "median" and k == 3 else "lpd_generic"
        want = launch.launch_config(kernel, shape, dtype, trt_plugin.PTX_ARCH, k)
        assert got.kernel == "trt_" + want.name
        assert tuple(value_of(g) for g in got.grid) == want.grid, (shape, [g.text for g in got.grid])
        assert (got.block, got.shared_mem) == (want.block, want.shared_mem_bytes)
        extra = tuple(value_of(v) for v in got.extra_args)
        assert extra == (shape if kernel == "lpd_residual" else (*shape, k, launch.variant_id(func), int(residual)))


def test_aot_launch_refuses_what_the_kernels_cannot_do():
    with pytest.raises(ConfigError, match="Received LPD function 'origin'"):
        trt_plugin.aot_launch((1, 3, 8, 8), "float32", "origin", 3, False, cdiv=cdiv, minimum=sym_min)
    with pytest.raises(ConfigError, match="window"):
        trt_plugin.aot_launch((1, 3, 8, 8), "float32", "median", 4, False, cdiv=cdiv, minimum=sym_min)


# --------------------------------------------------------------------------------- plugin: the PTX
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
def test_register_plugin_against_the_plugin_api(monkeypatch, trt_ptx):
    trt, api = fake_plugin_api()
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
        assert tuple(value_of(getattr(params, f"grid_{a}")) for a in "xyz") == want.grid
        assert tuple(getattr(params, f"block_{a}") for a in "xyz") == want.block
        assert params.shared_mem == want.shared_mem_bytes
        assert all(isinstance(e, api.SymInt32) for e in extra)
        assert [value_of(e.v) for e in extra] == ([2, 3, 40, 70] if residual else [2, 3, 40, 70, 3, 0, 0])
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
    got = trt_plugin.aot_launch(x.shape, "float32", func, k, trt_plugin.OPS[op], cdiv=cdiv, minimum=sym_min)
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
    rec = ort_session(lpd_graph(func, k, x.shape)).run(None, {"input": x})[0]
    want = x - rec if trt_plugin.OPS[op] else rec
    np.testing.assert_allclose(_host_plugin(x, op, func, k), want, rtol=0, atol=1e-6)


def test_plugin_graph_with_the_kernel_equals_the_portable_graph(graphs):
    """The whole model: x -> (host build of the plugin's kernel) -> rest of the plugin graph gives the
    portable graph's logits, so ``lpd`` must return the reconstruction the graph subtracts from x."""
    x = normalize(np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    want = ort_session(graphs["portable"]).run(None, {"input": x})[0]
    cut, rec_name = cut_at_plugin(graphs["plugin"])
    rec = _host_plugin(x, PLUGIN_OP, "median", 3)
    got = ort_session(cut).run(None, {"input": x, rec_name: rec})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # feeding the residual instead (the other reading of the node) gives something else
    wrong = ort_session(cut).run(None, {"input": x, rec_name: _host_plugin(x, "lpd_residual", "median", 3)})[0]
    assert np.abs(wrong - want).max() > 1e-3


# ------------------------------------------------------------------- plugin: builds with the stand-in
@pytest.mark.parametrize("graph", ["plugin", "plugin_nhwc"])
def test_build_with_the_plugin(plugin_trt, graphs, tmp_path, graph):
    res = trt_export.build_engine(graphs[graph], tmp_path / "p.engine", batch=(1, 2, 3), log=quiet)
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
        trt_export.build_engine(graphs["plugin"], tmp_path / "p.engine", batch=(1, 2, 3), log=quiet)
    assert plugin_trt.plugin_launches and list(tmp_path.iterdir()) == []


def test_build_catches_a_plugin_that_swaps_h_and_w(plugin_trt, graphs, tmp_path, monkeypatch):
    """Square inputs cannot tell H from W; a dynamic-H/W engine is also verified on a non-square size, which can."""
    ok = trt_export.build_engine(graphs["plugin_hw"], tmp_path / "ok" / "p.engine", batch=(1, 2, 3),
                                 dynamic_hw=(16, 24, 40), log=quiet)
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
        trt_export.build_engine(graphs["plugin"], tmp_path / "p.engine", batch=(1, 2, 3), log=quiet)
    assert list(tmp_path.iterdir()) == []


def test_plugin_graph_without_the_plugin_registered_does_not_parse(fake_trt, graphs, tmp_path, monkeypatch):
    monkeypatch.setattr(trt_plugin, "register_plugin", lambda: ["ferret::lpd"])  # registers nothing
    with pytest.raises(ConfigError, match=r"plugin\.onnx: TensorRT's ONNX parser refused the graph: node lpd_plugin_1: "
                                          r"plugin ferret::lpd not found in the registry"):
        trt_export.build_engine(graphs["plugin"], tmp_path / "p.engine", batch=(1, 2, 3), log=quiet)
