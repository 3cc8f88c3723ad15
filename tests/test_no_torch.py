"""The base package works with torch hidden: imports, preprocessing, the CLI's help."""

import subprocess
import sys
import textwrap

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
    from ferret_export.onnx_export import export_onnx
    from ferret_export.onnx_graph import GraphOptions
    from ferret_runtime.samples import write_samples
    from ferret_train import create_model
    from ferret_train.checkpoint import save_checkpoint

    import torch

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
