"""Training, resuming, fine-tuning, DDP and evaluation on tiny generated datasets, through the real CLI."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ferret_runtime.samples import write_proxy_dataset
from ferret_train.checkpoint import load_checkpoint
from ferret_train.config import TrainConfig, load_config
from ferret_train.evaluate import compute_metrics

from .conftest import ROOT, run_ferret


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """32x32 proxy images: train 24+24, val 8+8, test 4 decoders x (6+6)."""
    out = tmp_path_factory.mktemp("proxy")
    write_proxy_dataset(out, size=32, n_train=24, n_val=8, n_test=6, seed=3)
    return out


def _train_args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(ROOT / "configs" / "demo.yaml"), f"data.train_root={data / 'train'}",
            f"data.val_root={data / 'val'}", f"logger.dir={run}", "data.train_crop=32", "data.test_crop=32",
            "trainer.batch_size=16", "trainer.batch_size_test=16", "data.workers=1", "logger.tensorboard=false",
            *extra]


def _records(run: Path, kind: str = "epoch") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# --------------------------------------------------------------------------------------- config
def test_defaults_are_the_original_recipe():
    cfg = TrainConfig()
    assert (cfg.model.name, cfg.optim.name, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay) == \
        ("ferretnet-b", "adam", 2e-4, (0.937, 0.999), 5e-4)
    assert (cfg.loss.name, cfg.trainer.batch_size, cfg.total_epochs) == ("bce_with_logits", 32, 100)
    assert (cfg.data.train_crop, cfg.data.test_crop) == (224, 256)
    shipped = load_config(ROOT / "configs" / "train.yaml")
    assert (shipped.model, shipped.optim, shipped.loss, shipped.total_epochs) == \
        (cfg.model, cfg.optim, cfg.loss, cfg.total_epochs)


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["optim.lr=1e-3", "optim.betas=[0.9,0.99]", "data.test_crop=none",
                             "data.augment.jpeg_prob=0.25", "trainer.amp=false", "total_epochs=7"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.9, 0.99) and cfg.data.test_crop is None
    assert cfg.data.augment.jpeg_prob == 0.25 and cfg.trainer.amp is False and cfg.total_epochs == 7


@pytest.mark.parametrize("override, match", [
    ("optim.lrr=1", r"unknown config key 'optim.lrr'; did you mean 'optim.lr'\?"),
    ("trainer.batch_size=abc", r"trainer.batch_size: received 'abc'; expected int"),
    ("optim.betas=[0.9]", r"optim.betas: received \[0.9\]; expected 2 values"),
    ("modell.name=x", r"did you mean 'model'"),
    ("total_epochs", r"expected key=value"),
])
def test_bad_override_names_the_key(override, match):
    from ferret_runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_bad_config_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: 1e-3\n")
    proc = run_ferret("train", "--config", str(bad))
    assert proc.returncode == 2 and f"{bad}: invalid YAML" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_ferret("train", "--config", str(tmp_path / "absent.yaml"))
    assert proc.returncode == 2 and "absent.yaml: no such config file" in proc.stderr


# -------------------------------------------------------------------------------------- training
def test_two_epochs_lower_the_loss_and_write_the_run(tiny_data, tmp_path):
    run = tmp_path / "run"
    proc = _ok(run_ferret(*_train_args(tiny_data, run, "total_epochs=2", "logger.tensorboard=true",
                                       "logger.log_freq=1")))
    epochs = _records(run)
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert epochs[1]["loss"] < epochs[0]["loss"], epochs
    assert len(_records(run, "step")) == 2 * 3  # 48 images / batch 16, every step logged
    for name in ("config.yaml", "last.pt", "best.pt", "curves.png"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert f"done: {run}" in proc.stdout
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and set(last) >= {"optimizer", "scaler", "model_config", "preprocess", "train_config"}
    assert load_checkpoint(run / "best.pt").preprocess.crop == 32
    # a second run never overwrites the first
    _ok(run_ferret(*_train_args(tiny_data, run, "total_epochs=1")))
    assert (tmp_path / "run2" / "last.pt").is_file() and len(_records(run)) == 2


def test_resume_after_sigkill_equals_an_uninterrupted_run(tiny_data, tmp_path):
    """SIGKILL a 3-epoch run in its second epoch; resuming ends on identical weights, logs every step once,
    and removes the temporary files a kill mid-save leaves (and nothing else)."""
    args = ("total_epochs=3", "optim.scheduler=cosine", "seed=5", "logger.log_freq=1")
    full = tmp_path / "full"
    _ok(run_ferret(*_train_args(tiny_data, full, *args)))

    cut = tmp_path / "cut"
    # the run kills itself right after logging epoch 2's second step, one checkpoint (epoch 1) behind,
    # half-way through another line: steps the resumed run must log again, and a torn record
    killer = textwrap.dedent(f"""
        import os, signal, sys
        import ferret_train.engine as engine
        log = engine.Trainer._jsonl
        def jsonl(self, record):
            log(self, record)
            if record["type"] == "step" and (record["epoch"], record["step"]) == (2, 2):
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write('{{"type": "st')
                os.kill(os.getpid(), signal.SIGKILL)
        engine.Trainer._jsonl = jsonl
        from ferret_runtime.cli import main
        sys.exit(main({_train_args(tiny_data, cut, *args)!r}))
    """)
    with open(tmp_path / "killed.err", "w") as err:  # a file, not a pipe: orphaned workers may hold it open
        proc = subprocess.Popen([sys.executable, "-c", killer], stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        rc = proc.wait(timeout=300)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # its DataLoader workers
    assert rc == -signal.SIGKILL, (tmp_path / "killed.err").read_text()[-3000:]
    resumed_from = torch.load(cut / "last.pt", map_location="cpu", weights_only=True)["epoch"]
    assert resumed_from == 0
    # what a SIGKILL during atomic_write leaves beside last.pt, and files that only look alike
    (cut / ".last.pt.abc123.tmp").write_bytes(b"")
    (cut / ".best.pt.x_9z.tmp").write_bytes(b"partial")
    others = [cut / "notes.txt", cut / ".mine.pt.abc123.tmp", cut / "last.pt.abc123.tmp", cut / ".last.pt.tmp"]
    for p in others:
        p.write_text("keep me")
    resumed = _ok(run_ferret("train", "--resume", str(cut / "last.pt")))
    assert "removed 2 temporary file(s) left by an interrupted save: .best.pt.x_9z.tmp, .last.pt.abc123.tmp" \
        in resumed.stdout
    assert not (cut / ".last.pt.abc123.tmp").exists() and not (cut / ".best.pt.x_9z.tmp").exists()
    assert all(p.read_text() == "keep me" for p in others)

    a = torch.load(full / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(cut / "last.pt", map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), f"{k} differs after resume (from epoch {resumed_from + 1})"
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    # every (epoch, step) once, in order, with the uninterrupted run's losses; every epoch record once
    steps = [(r["epoch"], r["step"], r["loss"]) for r in _records(cut, "step")]
    assert steps == [(r["epoch"], r["step"], r["loss"]) for r in _records(full, "step")]
    assert [(e, s) for e, s, _ in steps] == [(e, s) for e in (1, 2, 3) for s in (1, 2, 3)]
    assert [(r["epoch"], r["loss"]) for r in _records(cut)] == [(r["epoch"], r["loss"]) for r in _records(full)]


def test_resume_restores_an_epoch_record_lost_between_checkpoint_and_log(tiny_data, tmp_path):
    """A kill after last.pt is saved but before its epoch is logged: the record comes from the checkpoint."""
    run = tmp_path / "run"
    _ok(run_ferret(*_train_args(tiny_data, run, "total_epochs=1", "logger.log_freq=1")))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["type"] == "epoch"
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:-1]))  # as if killed before logging it
    resumed = _ok(run_ferret("train", "--resume", str(run / "last.pt"), "total_epochs=2"))
    assert "the epoch record restored" in resumed.stdout
    assert [r["epoch"] for r in _records(run)] == [1, 2]
    assert [(r["epoch"], r["step"]) for r in _records(run, "step")] == [(e, s) for e in (1, 2) for s in (1, 2, 3)]
    assert (run / "metrics.jsonl").read_text().splitlines()[3] == lines[-1]  # the same record, where it was


def test_resume_rejects_a_weights_only_checkpoint(authors_ckpt):
    proc = run_ferret("train", "--resume", str(authors_ckpt))
    assert proc.returncode == 2 and str(authors_ckpt) in proc.stderr and "--init" in proc.stderr


def test_init_fine_tunes_from_the_authors_checkpoint(tiny_data, tmp_path, authors_ckpt):
    run = tmp_path / "ft"
    # lr 0: Adam leaves every weight where --init put it (batch-norm statistics still move)
    _ok(run_ferret(*_train_args(tiny_data, run, "total_epochs=1", "model.name=ferretnet-s", "optim.lr=0",
                                "optim.weight_decay=0"), "--init", str(authors_ckpt)))
    authors = torch.load(authors_ckpt, map_location="cpu", weights_only=True)["model"]
    ours = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert torch.equal(ours["cbr1.0.weight"], authors["cbr1.0.weight"])
    assert torch.equal(ours["logit.1.weight"], authors["logit.1.weight"])
    proc = run_ferret(*_train_args(tiny_data, tmp_path / "bad", "model.name=ferretnet-b"), "--init", str(authors_ckpt))
    assert proc.returncode == 2 and "does not match model.name='ferretnet-b'" in proc.stderr


def test_ddp_two_cpu_processes_run_one_epoch(tiny_data, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ferret_runtime.cli",
                           *_train_args(tiny_data, run, "total_epochs=1", "data.workers=0")],
                          capture_output=True, text=True, env=env, timeout=600)
    _ok(proc)
    assert "x 2 processes" in proc.stdout
    (record,) = _records(run)
    assert record["val"]["mean"]["n"] == 16  # every val image scored once, gathered from both ranks
    assert load_checkpoint(run / "last.pt").model is not None
    assert not (tmp_path / "ddp2").exists(), "a second rank created its own run directory"


# --------------------------------------------------------------------------------------- metrics
def test_metrics_by_hand():
    # ranked: 0.9 fake, 0.6 real, 0.4 fake, 0.1 real -> precision 1 at recall 1/2, 2/3 at recall 1
    m = compute_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9]))
    assert m["acc"] == 50 and m["r_acc"] == 50 and m["f_acc"] == 50 and m["n"] == 4
    assert m["ap"] == pytest.approx(100 * (0.5 * 1 + 0.5 * 2 / 3))
    only_real = compute_metrics(np.array([0, 0]), np.array([0.2, 0.7]))
    assert only_real["acc"] == 50 and math.isnan(only_real["ap"]) and math.isnan(only_real["f_acc"])


def test_eval_equals_sklearn_and_the_end_of_epoch_validation(tiny_data, tmp_path):
    from sklearn.metrics import accuracy_score, average_precision_score

    from ferret_runtime import Detector

    run = tmp_path / "run"
    _ok(run_ferret(*_train_args(tiny_data, run, "total_epochs=1")))
    out = tmp_path / "eval.json"
    proc = _ok(run_ferret("eval", "-w", str(run / "last.pt"), "--data", str(tiny_data / "test"), "--json", str(out)))
    report = json.loads(out.read_text())
    assert set(report["subsets"]) == {"bilinear", "nearest", "pixelshuffle", "tconv"}
    assert (tmp_path / "eval.png").stat().st_size > 10_000 and "mean" in proc.stdout
    with Detector.open(run / "last.pt", device="cpu") as det:
        for name, got in report["subsets"].items():
            paths = sorted((tiny_data / "test" / name).rglob("*.png"))
            y = np.array([p.parent.name == "1_fake" for p in paths])
            prob = np.array([r.prob_fake for r in det.predict(paths)])
            assert got["acc"] == pytest.approx(100 * accuracy_score(y, prob > 0.5))
            assert got["r_acc"] == pytest.approx(100 * accuracy_score(y[~y], prob[~y] > 0.5))
            assert got["f_acc"] == pytest.approx(100 * accuracy_score(y[y], prob[y] > 0.5))
            assert got["ap"] == pytest.approx(100 * average_precision_score(y, prob), abs=1e-4)
    # the validation the trainer logged at the end of the epoch scores the same images the same way
    val = json.loads(next(r for r in (run / "metrics.jsonl").read_text().splitlines()
                          if '"epoch"' in r and '"val"' in r))
    val_out = tmp_path / "val.json"
    _ok(run_ferret("eval", "-w", str(run / "last.pt"), "--data", str(tiny_data / "val"), "--json", str(val_out)))
    again = json.loads(val_out.read_text())["subsets"]["val"]
    for m in ("acc", "r_acc", "f_acc"):
        assert again[m] == val["val"]["subsets"]["val"][m]
    assert again["ap"] == pytest.approx(val["val"]["subsets"]["val"]["ap"], abs=1e-4)


def test_authors_checkpoint_is_perfect_on_the_reference_images(reference, authors_ckpt, tmp_path):
    data = tmp_path / "reference"
    for img in sorted((reference / "images").iterdir()):
        cls = {"real": "0_real", "fake": "1_fake"}[img.name.split("_", 1)[0]]
        (data / "images" / cls).mkdir(parents=True, exist_ok=True)
        (data / "images" / cls / img.name).symlink_to(img)
    out = tmp_path / "ref.json"
    _ok(run_ferret("eval", "-w", str(authors_ckpt), "--data", str(data), "--crop", "none", "--json", str(out)))
    r = json.loads(out.read_text())["subsets"]["images"]
    assert (r["acc"], r["ap"], r["r_acc"], r["f_acc"], r["n"]) == (100, 100, 100, 100, 10)


# ------------------------------------------------------------------------------------ bad data
def _bad_roots(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    empty = tmp / "empty"
    empty.mkdir()
    flat = tmp / "flat"
    flat.mkdir()
    shutil.copy(next((good / "train" / "0_real").iterdir()), flat / "a.png")
    broken = tmp / "broken"
    shutil.copytree(good / "val", broken / "val")
    (broken / "val" / "1_fake" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return {
        "missing": (tmp / "absent", f"{tmp / 'absent'}: data root does not exist"),
        "empty": (empty, f"{empty}: no image files"),
        "no classes": (flat, f"{flat}: found 1 images but none inside a folder named 0_real or 1_fake"),
        "unreadable": (broken, "zz_broken.png"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "no classes", "unreadable"])
def test_bad_data_roots_are_clear_errors(tiny_data, tmp_path, case):
    root, message = _bad_roots(tmp_path, tiny_data)[case]
    ckpt = tmp_path / "w.pt"
    from ferret_train import create_model
    from ferret_train.checkpoint import save_checkpoint

    save_checkpoint(ckpt, create_model("ferretnet-s").eval())
    train = ["train", f"data.train_root={root}", "data.val_root=none", f"logger.dir={tmp_path / 'run'}",
             "model.name=ferretnet-s", "data.train_crop=32", "trainer.batch_size=4", "data.workers=1", "total_epochs=1"]
    for args in (["eval", "-w", str(ckpt), "--data", str(root)], train):
        proc = run_ferret(*args)
        assert proc.returncode != 0, args
        assert message in proc.stderr, (args[0], proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.gpu
def test_one_epoch_on_cuda_with_amp(tiny_data, tmp_path):
    for module in ("tqdm", "sklearn"):  # the 'train' extra: absent on a bare GPU image (make gpu-check runs this)
        pytest.importorskip(module, reason=f"ferret train needs {module} (the 'train' extra), not installed")
    run = tmp_path / "cuda"
    _ok(run_ferret(*_train_args(tiny_data, run, "total_epochs=1", "trainer.device=cuda", "trainer.amp=true")))
    (record,) = _records(run)
    assert math.isfinite(record["loss"]) and record["val"]["mean"]["n"] == 16
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=True)["scaler"]["scale"] > 0
