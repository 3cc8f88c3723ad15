"""Backends picked by file suffix from the ``ferret.backends`` entry points (pyproject.toml), with the
registry's two errors: two backends claiming one suffix, and a suffix no backend claims."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from importlib.metadata import EntryPoint

import numpy as np
import pytest

from ferret_runtime.backends import Backend, backend_for, base
from ferret_runtime.backends.onnxruntime import OrtBackend
from ferret_runtime.backends.tensorrt import TrtBackend
from ferret_runtime.errors import ConfigError

# pyproject.toml's [project.entry-points."ferret.backends"] and the suffixes the README documents
# (".pth/.pt torch, .onnx ONNX Runtime", ".engine"/".plan" for TensorRT).
DECLARED = {".pth": "TorchBackend", ".pt": "TorchBackend", ".onnx": "OrtBackend", ".engine": "TrtBackend",
            ".plan": "TrtBackend"}


@pytest.mark.parametrize("path, expected", [
    ("m.onnx", OrtBackend), ("dir/M.ONNX", OrtBackend), ("m.engine", TrtBackend), ("m.plan", TrtBackend),
    ("a.b/m.Engine", TrtBackend),
])
def test_backend_for_picks_by_suffix(path, expected, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # importing it would fail: picking must not need it
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert backend_for(path) is expected


@pytest.mark.parametrize("path", ["m.pth", "m.pt"])
def test_checkpoints_go_to_the_torch_backend(path):
    from ferret_train.backend import TorchBackend

    assert backend_for(path) is TorchBackend


def test_the_installed_table_is_the_declared_one():
    assert {k: v.__name__ for k, v in base.available_backends().items()} == DECLARED


HIDE = textwrap.dedent("""
    import sys
    HIDDEN = ("torch", "tensorrt", "onnxruntime", "onnx", "cuda")
    asked = []
    class _Hide:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                asked.append(name)
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
    sys.meta_path.insert(0, _Hide())
""")


def test_engine_and_onnx_backends_are_found_without_their_runtimes():
    """In a fresh interpreter where torch, TensorRT, ONNX Runtime and cuda-python cannot be imported, .engine,
    .plan and .onnx still find their classes, and none of those was even asked for: only .pth says torch is missing."""
    code = HIDE + textwrap.dedent("""
        from ferret_runtime.backends import backend_for
        from ferret_runtime.errors import ConfigError
        print(backend_for("x.engine").__name__, backend_for("x.plan").__name__, backend_for("x.onnx").__name__)
        print(sorted({a.split(".")[0] for a in asked if a.split(".")[0] != "torch"}))
        try:
            backend_for("x.pth")
        except ConfigError as e:
            print(e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    found, others, error = proc.stdout.strip().splitlines()
    assert found == "TrtBackend TrtBackend OrtBackend"
    assert others == "[]"  # no entry point's import reached tensorrt, onnxruntime, onnx or cuda-python
    assert error.startswith("Received model file 'x.pth' with suffix '.pth'; expected one of .engine, .onnx, .plan; "
                            "backend 'torch' is not installed (No module named 'torch'")


def test_unknown_suffix_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"^Received model file 'weights/m\.h5' with suffix '\.h5'; expected one of "
                                          r"\.engine, \.onnx, \.plan, \.pt, \.pth$"):
        backend_for("weights/m.h5")
    with pytest.raises(ConfigError, match=r"Received model file 'model' with suffix ''; expected one of \.engine, "):
        backend_for("model")


# ----------------------------------------------------------------------------- fake entry points
class _Small(Backend):
    def __init__(self, path, device="cpu"):
        pass

    def run_impl(self, batch: np.ndarray) -> np.ndarray:
        return np.zeros((len(batch), 1), np.float32)


class OnnxA(_Small):
    name, suffixes = "a", (".onnx",)


class OnnxB(_Small):
    name, suffixes = "b", (".onnx", ".ob")


class Keras(_Small):
    name, suffixes = "keras", (".h5", ".keras")


@pytest.fixture
def entry_points(monkeypatch):
    """Replace what ``_load_backends`` sees with real EntryPoint objects for a module of small backends."""
    module = types.ModuleType("fake_backends")
    module.OnnxA, module.OnnxB, module.Keras = OnnxA, OnnxB, Keras
    monkeypatch.setitem(sys.modules, "fake_backends", module)
    table: list[EntryPoint] = []

    def fake_entry_points(*, group: str) -> list[EntryPoint]:
        return [ep for ep in table if ep.group == group]

    monkeypatch.setattr(base, "entry_points", fake_entry_points)

    def use(*specs: tuple[str, str]) -> None:
        table[:] = [EntryPoint(name, value, base.ENTRY_POINT_GROUP) for name, value in specs]

    return use


def test_two_backends_claiming_one_suffix_is_an_error(entry_points):
    entry_points(("a", "fake_backends:OnnxA"), ("keras", "fake_backends:Keras"), ("b", "fake_backends:OnnxB"))
    with pytest.raises(ConfigError, match=r"^Backends OnnxA and OnnxB both claim '\.onnx'$"):
        base.available_backends()
    with pytest.raises(ConfigError, match=r"^Backends OnnxA and OnnxB both claim '\.onnx'$"):
        backend_for("m.h5")  # even for a suffix only one claims: the table is refused as a whole


def test_one_class_under_two_names_is_not_a_conflict(entry_points):
    entry_points(("a", "fake_backends:OnnxA"), ("a-alias", "fake_backends:OnnxA"), ("keras", "fake_backends:Keras"))
    assert base.available_backends() == {".onnx": OnnxA, ".h5": Keras, ".keras": Keras}
    assert backend_for("x.keras") is Keras


def test_unknown_suffix_lists_the_fake_backends_and_the_missing_one(entry_points):
    entry_points(("keras", "fake_backends:Keras"), ("a", "fake_backends:OnnxA"), ("gone", "not_installed_pkg:Gone"))
    with pytest.raises(ConfigError, match=r"^Received model file 'm\.pth' with suffix '\.pth'; expected one of \.h5, "
                                          r"\.keras, \.onnx; backend 'gone' is not installed \(No module named "
                                          r"'not_installed_pkg'\)$"):
        backend_for("m.pth")


def test_no_backend_at_all(entry_points):
    entry_points()
    with pytest.raises(ConfigError, match=r"expected one of \(no backend installed\)$"):
        backend_for("m.onnx")
