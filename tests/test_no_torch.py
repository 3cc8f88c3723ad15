"""The base package works with torch hidden: every module imports, preprocessing, the CLI's help.

README: "The base package ferret_runtime never imports torch (tested)"; pyproject.toml: the base install is
numpy, Pillow, PyYAML and tqdm, and backends "defer their heavy imports (torch, onnxruntime, tensorrt) to
load time". So every module of ferret_runtime, found by walking the package (a module added later is
covered without editing this file), is imported in a fresh interpreter where torch and every optional
extra cannot be imported, and must not even ask for one.
"""

import json
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ferret_runtime

HIDE_TORCH = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
    sys.meta_path.insert(0, _Block())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE_TORCH + textwrap.dedent(code)], capture_output=True, text=True)


def test_runtime_imports_and_preprocesses_without_torch():
    proc = _run("""
        import numpy as np
        import ferret_runtime
        from ferret_runtime.preprocess import center_crop, normalize
        from ferret_runtime.samples import natural_image
        x = normalize(center_crop(natural_image(np.random.default_rng(0), 64), 32)[None])
        assert x.shape == (1, 3, 32, 32)
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_cli_without_torch_says_which_extra_is_missing(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "x.pth").write_bytes(b"")
    proc = _run(f"""
        from ferret_runtime.cli import main
        sys.exit(main(["detect", "{tmp_path}", "--weights", "{tmp_path / 'x.pth'}"]))
    """)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "suffix '.pth'" in proc.stderr and "backend 'torch' is not installed" in proc.stderr
    proc = _run("""
        from ferret_runtime.cli import main
        sys.exit(main(["--help"]))
    """)
    assert proc.returncode == 0 and "detect" in proc.stdout and "unavailable" in proc.stdout


def test_onnx_runtime_detects_without_torch(tmp_path):
    import torch

    from ferret_export.onnx.export import export_onnx
    from ferret_export.onnx.graph import GraphOptions
    from ferret_runtime.samples import write_samples
    from ferret_train import create_model
    from ferret_train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m.pth", create_model("ferretnet-s").eval())
    export_onnx(ckpt, tmp_path / "m.onnx", GraphOptions(input_size=64), log=lambda *_: None)
    img = write_samples(tmp_path / "imgs", n=1, size=64)[0]
    proc = _run(f"""
        from ferret_runtime import Detector
        with Detector.open({str(tmp_path / 'm.onnx')!r}) as det:
            r = det.predict({str(img)!r})[0]
        assert r.error is None and r.label in ("real", "fake"), r
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
        print(r.logit)
    """)
    assert proc.returncode == 0, proc.stderr
    float(proc.stdout.strip())


# ----------------------------------------------------------------------------------- every module
# Top-level names of pyproject.toml's optional extras (train, export, trt, gpu, serve, video, triton, dev).
EXTRAS = ("torch", "torchvision", "matplotlib", "sklearn", "tensorboard", "onnx", "onnxruntime", "tensorrt", "cuda",
          "nvidia", "starlette", "uvicorn", "multipart", "python_multipart", "prometheus_client", "av", "tritonclient",
          "httpx", "hypothesis", "cryptography", "pytest", "ray", "pyarrow")

IMPORT_ONE = textwrap.dedent("""
    import importlib, json, sys
    HIDDEN = set(sys.argv[2].split(","))
    asked = []
    class _Hide:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                asked.append(name)  # recorded even where the module catches the ImportError
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
    sys.meta_path.insert(0, _Hide())
    try:
        importlib.import_module(sys.argv[1])
        error = None
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
    loaded = sorted({m.split(".")[0] for m in sys.modules} & HIDDEN)
    print(json.dumps({"error": error, "asked": asked, "loaded": loaded}))
""")


def _import_alone(module: str, path: Path | None = None) -> dict:
    """Import ``module`` in a fresh interpreter with the extras hidden; what failed and what was asked for."""
    env = None if path is None else {**__import__("os").environ, "PYTHONPATH": str(path)}
    proc = subprocess.run([sys.executable, "-c", IMPORT_ONE, module, ",".join(EXTRAS)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _walk() -> list[str]:
    return ["ferret_runtime"] + sorted(m.name for m in
                                       pkgutil.walk_packages(ferret_runtime.__path__, "ferret_runtime."))


RUNTIME_MODULES = _walk()


def test_the_walk_finds_every_module_on_disk():
    """A folder without __init__.py would be skipped by walk_packages, and its modules by the test below."""
    root = Path(ferret_runtime.__file__).parent
    on_disk = {".".join(("ferret_runtime", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
               for p in root.rglob("*.py")}
    assert set(RUNTIME_MODULES) == on_disk
    assert {"ferret_runtime.cli", "ferret_runtime.serve", "ferret_runtime.serve.core",
            "ferret_runtime.backends.tensorrt", "ferret_runtime.kernels.launch"} <= set(RUNTIME_MODULES)


@pytest.mark.parametrize("module", RUNTIME_MODULES)
def test_every_runtime_module_imports_without_torch_or_any_extra(module):
    got = _import_alone(module)
    assert got["error"] is None, f"{module} needs more than the base install: {got['error']}"
    torch_asks = [a for a in got["asked"] if a.split(".")[0] in ("torch", "torchvision")]
    assert torch_asks == [], f"importing {module} asked for {torch_asks}"
    assert got["asked"] == [], f"importing {module} asked for optional extras {got['asked']}; expected them deferred"
    assert got["loaded"] == []


@pytest.mark.parametrize("source, asked", [
    ("import torch\n", ["torch"]),
    ("try:\n    import torch\nexcept ImportError:\n    torch = None\n", ["torch"]),  # caught: still an import
    ("def f():\n    import torch\n", []),  # deferred to a call: fine
    ("import onnxruntime as ort\n", ["onnxruntime"]),
])
def test_the_check_sees_a_module_that_imports_torch(tmp_path, source, asked):
    """The harness itself: a module written here is caught when it imports an extra at import time."""
    (tmp_path / "probe_module.py").write_text(source)
    got = _import_alone("probe_module", tmp_path)
    assert got["asked"] == asked and got["loaded"] == []
    assert (got["error"] is None) == (source.startswith(("try", "def")))
