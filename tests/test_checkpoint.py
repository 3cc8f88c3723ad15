"""Checkpoint loading is strict, infers what it can, and saving is atomic."""

import argparse
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ferret_runtime.errors import CheckpointError
from ferret_runtime.fileio import remove_stale_temps, stale_temps
from ferret_runtime.preprocess import Preprocess
from ferret_train import create_model
from ferret_train.checkpoint import infer_config, load_checkpoint, save_checkpoint


def _original(tmp_path, model, name="ferretnet-s-median-3.pth", prefix=""):
    path = tmp_path / name
    torch.save({"model": {prefix + k: v for k, v in model.state_dict().items()}}, path)
    return path


def test_authors_checkpoint_loads_with_lpd_from_file_name(authors_ckpt):
    loaded = load_checkpoint(authors_ckpt)
    assert loaded.source_format == "original"
    assert loaded.config.arch == "ferretnet-s"
    assert (loaded.config.lpd_func, loaded.config.window_size, loaded.lpd_source) == ("median", 3, "file name")


@pytest.mark.parametrize("name", ["ferretnet-s", "ferretnet-b"])
def test_infer_variant_from_shapes_with_module_prefix(tmp_path, name):
    m = create_model(name)
    loaded = load_checkpoint(_original(tmp_path, m, "weights.pth", prefix="module."))
    assert loaded.config.arch == name
    assert loaded.lpd_source == "default"
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)


def test_file_name_sets_lpd_and_argument_overrides(tmp_path):
    path = _original(tmp_path, create_model("ferretnet-s"), "ferretnet-s-excmed-5.pth")
    assert (load_checkpoint(path).config.lpd_func, load_checkpoint(path).config.window_size) == ("excmed", 5)
    over = load_checkpoint(path, lpd_func="max", window_size=7)
    assert (over.config.lpd_func, over.config.window_size, over.lpd_source) == ("max", 7, "argument")


def test_our_format_round_trip(tmp_path):
    m = create_model("ferretnet-b", lpd_func="avg", window_size=5).eval()
    pre = Preprocess(crop=None)
    path = save_checkpoint(tmp_path / "sub" / "ours.pt", m, preprocess=pre, train_config={"lr": 2e-4})
    loaded = load_checkpoint(path)
    assert loaded.config == m.cfg and loaded.preprocess == pre and loaded.train_config == {"lr": 2e-4}
    assert loaded.meta["toolkit_version"] == "0.1.0"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), m(x), rtol=0, atol=0)
    assert [p.name for p in path.parent.iterdir()] == ["ours.pt"]  # no temp file left behind


def test_missing_key_is_named(tmp_path):
    sd = create_model("ferretnet-s").state_dict()
    del sd["feature.1.1.layers.3.point_wise.weight"]
    torch.save({"model": sd}, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): feature\.1\.1\.layers\.3\.point_wise\.weight"):
        load_checkpoint(tmp_path / "m.pth")


def test_unexpected_and_misshaped_keys_are_named(tmp_path):
    sd = create_model("ferretnet-s").state_dict()
    sd["head.extra"] = torch.zeros(1)
    sd["feature.2.weight"] = torch.zeros(128, 128, 3, 3)
    torch.save({"model": sd}, tmp_path / "m.pth")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "m.pth")
    assert "unexpected keys (1): head.extra" in str(e.value)
    assert "feature.2.weight: checkpoint (128, 128, 3, 3) vs model (128, 128, 1, 1)" in str(e.value)


def test_garbage_and_wrong_content_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"junk\.pth: not a loadable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "junk.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list\.pth: received list; expected a dict with a 'model'"):
        load_checkpoint(tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"nope\.pth: no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="missing key 'cbr1.0.weight'"):
        infer_config({"x": torch.zeros(1)})


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file existing proves the pickle ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_unsafe_pickle_is_refused(tmp_path):
    torch.save({"model": {"cbr1.0.weight": torch.zeros(1)}, "evil": argparse.Namespace(a=1)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(tmp_path / "evil.pth")


def test_malicious_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "executed"
    torch.save({"model": create_model("ferretnet-s").state_dict(), "evil": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil\.pth: not a loadable PyTorch checkpoint with weights_only=True"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists(), "loading the checkpoint executed its pickled payload"
    # the payload is live: a plain unpickling runs it, so the assertion above can fail
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


def test_killed_mid_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, create_model("ferretnet-s"), meta={"epoch": 1})
    # a child process starts overwriting it with a large payload and is SIGKILLed while writing
    code = textwrap.dedent(f"""
        import os, signal, torch
        from ferret_train import create_model
        from ferret_train.checkpoint import save_checkpoint
        import ferret_train.checkpoint as c
        real_save = torch.save
        def slow_save(obj, f):
            f.write(b"x" * 1_000_000); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
        c.torch.save = slow_save
        save_checkpoint({str(path)!r}, create_model("ferretnet-b"), meta={{"epoch": 2}})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    loaded = load_checkpoint(path)
    assert loaded.meta["epoch"] == 1 and loaded.config.arch == "ferretnet-s"
    leftovers = [p for p in os.listdir(tmp_path) if p != "last.pt"]
    assert all(p.startswith(".last.pt.") for p in leftovers)  # at most an orphan temp, never a torn file
    # the orphan is what a training run's start recognises as stale, by atomic_write's own naming
    assert [p.name for p in stale_temps(tmp_path, ["last.pt", "best.pt"])] == leftovers
    assert remove_stale_temps(tmp_path, ["last.pt"]) and os.listdir(tmp_path) == ["last.pt"]


def test_atomic_write_gives_normal_permissions(tmp_path):
    from ferret_runtime import fileio

    out = fileio.atomic_write(tmp_path / "x.bin", lambda f: f.write(b"1"))
    plain = tmp_path / "y.bin"
    plain.write_bytes(b"1")
    # mkstemp alone leaves 0o600: the file must get what open() gives under the process umask
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~fileio._UMASK
