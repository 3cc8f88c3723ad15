"""'ferret export tensorrt' and build_engine: the command's options and one-line errors, then builds
through the stand-in TensorRT.

On a CPU: --batch/--dynamic-hw/--int8 parsing and help, the refusals before anything is exported or
built (no TensorRT, no GPU, flags that do not go together), the network flags per TensorRT version, and
build_engine against ``standins.FakeTRT``: the verified engine and its sidecar, the timing cache given
to the builder and saved back, --hardware-compat, the kernel limits checked before building, the CLI
end to end. Real builds on a GPU are test_trt_gpu.py's; the plugin's builds are test_trt_plugin.py's.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from ferret_export.commands.export_tensorrt import add_parser
from ferret_export.pipeline import Int8Options
from ferret_export.tensorrt import build as trt_export
from ferret_export.tensorrt import verify as trt_verify
from ferret_export.triton.repository import describe_model
from ferret_export.verify import ParityError
from ferret_runtime import cli, cuda, sidecar
from ferret_runtime.errors import ConfigError
from ferret_runtime.fileio import sha256

from . import trt_fixtures
from .standins import GPU, TIMING_CACHE_HEADER
from .trt_fixtures import has_driver, quiet

ckpt, graphs, fake_trt = trt_fixtures.ckpt, trt_fixtures.graphs, trt_fixtures.fake_trt  # shared fixtures


# ------------------------------------------------------------------------------------ options
def _parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="ferret")
    sub = top.add_subparsers(dest="command")
    export = sub.add_parser("export")
    add_parser(export.add_subparsers(dest="format", required=True))
    return top


def test_cli_options_parse_and_help():
    p = _parser()
    args = p.parse_args(["export", "tensorrt", "--onnx", "m.onnx", "-o", "m.engine", "--batch", "1,8,16",
                         "--dynamic-hw", "64,128,256", "--timing-cache", "t.cache", "--hardware-compat",
                         "--lpd", "plugin"])
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
        trt_export.export_and_build(ckpt, tmp_path / "m.engine", precision="fp16", log=quiet)
    assert list(tmp_path.iterdir()) == []


def test_int8_follows_the_onnx_exports_rules(ckpt, tmp_path):
    """The INT8 rules of 'ferret export onnx --int8': calibration data, the portable LPD, no fp16."""
    with pytest.raises(ConfigError, match=r"Received --int8 without --calib-data; expected image files or folders to "
                                          r"calibrate on"):
        trt_export.export_and_build(ckpt, tmp_path / "m.engine", precision="int8", verify_images=["x"], log=quiet)
    with pytest.raises(ConfigError, match=r"Received --int8 with --lpd plugin; expected --lpd portable"):
        trt_export.export_and_build(ckpt, tmp_path / "m.engine", precision="int8", lpd="plugin",
                                    int8=Int8Options(["x"]), log=quiet)
    with pytest.raises(ConfigError, match=r"Received --int8 with --lpd external; expected --lpd portable"):
        trt_export.export_and_build(ckpt, tmp_path / "m.engine", precision="int8", lpd="external",
                                    int8=Int8Options(["x"]), log=quiet)
    with pytest.raises(ConfigError, match=r"Received --int8-min-agreement 1\.5; expected 0\.\.1"):
        trt_export.export_and_build(ckpt, tmp_path / "m.engine", precision="int8",
                                    int8=Int8Options(["x"], min_agreement=1.5), log=quiet)
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


@pytest.mark.skipif(has_driver(), reason="checks the message where no CUDA driver is installed")
def test_without_gpu_the_message_is_about_the_gpu(graphs, tmp_path, monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.9.0.34"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(ConfigError,
                       match=r"TensorRT needs a CUDA GPU and driver; found none \(cuInit: received no CUDA"):
        trt_export.build_engine(graphs["portable"], tmp_path / "m.engine", log=quiet)


def test_network_flags_strongly_typed_on_10_only():
    kinds = types.SimpleNamespace(STRONGLY_TYPED=1, PREFER_AOT_PYTHON_PLUGINS=2)
    trt10 = types.SimpleNamespace(__version__="10.9.0.34", NetworkDefinitionCreationFlag=kinds)
    trt11 = types.SimpleNamespace(__version__="11.3.0.5", NetworkDefinitionCreationFlag=kinds)
    assert trt_export.network_flags(trt10, plugin=False) == 1 << 1
    assert trt_export.network_flags(trt10, plugin=True) == (1 << 1) | (1 << 2)
    assert trt_export.network_flags(trt11, plugin=False) == 0  # deprecated there: always strongly typed
    assert trt_export.network_flags(trt11, plugin=True) == 1 << 2


# ------------------------------------------------------------------------- with the stand-in TensorRT
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
                                    verify_images=images, log=quiet)
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
                            verify=False, log=quiet)
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


def test_build_refuses_hardware_compat_before_ampere(fake_trt, graphs, tmp_path, monkeypatch):
    monkeypatch.setattr(cuda, "device_info", lambda index=0: replace(GPU, name="Tesla T4", compute_capability=(7, 5)))
    with pytest.raises(ConfigError, match=r"Received --hardware-compat on Tesla T4 \(compute capability 7\.5\); "
                                          r"expected an Ampere or newer GPU"):
        trt_export.build_engine(graphs["portable"], tmp_path / "m.engine", hardware_compat=True, log=quiet)


def test_build_checks_the_kernel_limits_first(fake_trt, graphs, tmp_path):
    with pytest.raises(ConfigError, match=r"Received height 2000000; expected at most 1048560"):
        trt_export.build_engine(graphs["plugin_hw"], tmp_path / "m.engine", dynamic_hw=(16, 64, 2_000_000), log=quiet)
    assert fake_trt.calls == []


def test_cli_builds_with_the_stand_in(fake_trt, graphs, tmp_path, monkeypatch, capsys):
    rc = _cli(monkeypatch, ["export", "tensorrt", "--onnx", str(graphs["dynamic_hw"]), "-o", str(tmp_path / "m.plan"),
                            "--batch", "1,2,3", "--dynamic-hw", "16,32,40", "--workspace-mb", "64"])
    out = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "m.plan").is_file() and (tmp_path / "m.plan.json").is_file()
    assert "random, max size 40x40" in out and "PASSED" in out and "FAILED" not in out
    side = sidecar.read(tmp_path / "m.plan")
    assert side.engine["profiles"][0]["max"] == [3, 3, 40, 40] and side.engine["workspace_mb"] == 64
