"""Backends picked by file suffix: the three built-ins (registered in base.py, so a checkout that is not
pip-installed has them) plus the ``ferret.backends`` entry points (pyproject.toml's repeat the built-ins),
with the registry's errors: two backends claiming one suffix, one name for two classes, and a suffix no
backend claims."""

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


# A fresh interpreter whose importlib.metadata lists no ferret.backends entry point: a checkout run
# with a Python where it is not pip-installed.
NO_ENTRY_POINTS = textwrap.dedent("""
    import importlib.metadata
    _real = importlib.metadata.entry_points
    importlib.metadata.entry_points = lambda **kw: [] if kw.get("group") == "ferret.backends" else _real(**kw)
""")


@pytest.mark.parametrize("installed", [True, False], ids=["entry-points", "plain-checkout"])
def test_engine_and_onnx_backends_are_found_without_their_runtimes(installed):
    """In a fresh interpreter where torch, TensorRT, ONNX Runtime and cuda-python cannot be imported, .engine,
    .plan and .onnx still find their classes, and none of those was even asked for: only .pth says torch is missing.
    The same with no entry point at all (the built-ins alone)."""
    code = HIDE + ("" if installed else NO_ENTRY_POINTS) + textwrap.dedent("""
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
    assert others == "[]"  # no backend's import reached tensorrt, onnxruntime, onnx or cuda-python
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
    """Replace what the registry sees with real EntryPoint objects for a module of small backends; the
    built-ins are left out unless ``builtins=True``."""
    module = types.ModuleType("fake_backends")
    module.OnnxA, module.OnnxB, module.Keras = OnnxA, OnnxB, Keras
    module.OrtReexport = OrtBackend  # another import path to the built-in class
    monkeypatch.setitem(sys.modules, "fake_backends", module)
    table: list[EntryPoint] = []

    def fake_entry_points(*, group: str) -> list[EntryPoint]:
        return [ep for ep in table if ep.group == group]

    monkeypatch.setattr(base, "entry_points", fake_entry_points)
    builtins = dict(base.BUILTIN_BACKENDS)

    def use(*specs: tuple[str, str], builtins_too: bool = False) -> None:
        table[:] = [EntryPoint(name, value, base.ENTRY_POINT_GROUP) for name, value in specs]
        monkeypatch.setattr(base, "BUILTIN_BACKENDS", builtins if builtins_too else {})

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


# ------------------------------------------------------------------------ built-ins + entry points
def test_the_builtins_alone_are_the_declared_table(entry_points):
    """No entry point at all (a checkout that is not pip-installed): the three built-ins, all five suffixes."""
    entry_points(builtins_too=True)
    assert {k: v.__name__ for k, v in base.available_backends().items()} == DECLARED
    assert backend_for("m.onnx") is OrtBackend and backend_for("m.plan") is TrtBackend


def test_the_builtins_are_pyprojects_entry_points():
    """The installed package's entry points repeat the built-ins (so they never conflict), name for name."""
    tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with tomllib (Python 3.11+)")

    from tests.conftest import ROOT

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["ferret.backends"]
    assert base.BUILTIN_BACKENDS == declared == {
        "torch": "ferret_train.backend:TorchBackend",
        "onnxruntime": "ferret_runtime.backends.onnxruntime:OrtBackend",
        "tensorrt": "ferret_runtime.backends.tensorrt:TrtBackend"}


def test_an_entry_point_adds_a_third_party_backend(entry_points):
    entry_points(("keras", "fake_backends:Keras"), builtins_too=True)
    table = {k: v.__name__ for k, v in base.available_backends().items()}
    assert table == {**DECLARED, ".h5": "Keras", ".keras": "Keras"}
    assert backend_for("m.keras") is Keras and backend_for("m.onnx") is OrtBackend


@pytest.mark.parametrize("value", ["ferret_runtime.backends.onnxruntime:OrtBackend", "fake_backends:OrtReexport"])
def test_an_entry_point_repeating_a_builtin_is_fine(entry_points, value):
    """The installed package's own entry point (same path), or another path to the same class."""
    entry_points(("onnxruntime", value), builtins_too=True)
    assert {k: v.__name__ for k, v in base.available_backends().items()} == DECLARED


def test_a_builtin_name_for_another_class_is_an_error(entry_points):
    entry_points(("keras", "fake_backends:Keras"), ("onnxruntime", "fake_backends:OnnxA"), builtins_too=True)
    message = (r"^Received backend 'onnxruntime' twice: as ferret_runtime\.backends\.onnxruntime:OrtBackend and as "
               r"fake_backends:OnnxA \(an installed ferret\.backends entry point\); expected one class per name$")
    with pytest.raises(ConfigError, match=message):
        base.available_backends()
    with pytest.raises(ConfigError, match=message):
        backend_for("m.keras")


def test_a_builtin_name_for_a_module_that_does_not_import_is_an_error(entry_points):
    """Not the same class when it cannot even be loaded: refused, not silently shadowed by the built-in."""
    entry_points(("tensorrt", "not_installed_pkg:Trt"), builtins_too=True)
    with pytest.raises(ConfigError, match=r"^Received backend 'tensorrt' twice: as ferret_runtime\.backends\.tensorrt:"
                                          r"TrtBackend and as not_installed_pkg:Trt "):
        backend_for("m.onnx")


def test_two_entry_points_one_name_two_classes_is_an_error(entry_points):
    entry_points(("a", "fake_backends:OnnxA"), ("a", "fake_backends:Keras"))
    with pytest.raises(ConfigError, match=r"^Received backend 'a' twice: as fake_backends:OnnxA and as "
                                          r"fake_backends:Keras "):
        base.available_backends()


def test_a_third_party_claiming_a_builtin_suffix_is_an_error(entry_points):
    entry_points(("a", "fake_backends:OnnxA"), builtins_too=True)
    with pytest.raises(ConfigError, match=r"^Backends OrtBackend and OnnxA both claim '\.onnx'$"):
        backend_for("m.onnx")
