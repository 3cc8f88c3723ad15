"""``ferret eval --perturb`` and ``--format-check``: each degradation against Pillow/NumPy directly,
the sweep's metrics against an independent run on files degraded on disk, and bad specs refused."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from ferret_runtime.samples import write_proxy_dataset
from ferret_train.perturb import apply, parse_spec

from .conftest import run_ferret


@pytest.fixture(scope="module")
def img():
    return np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)


def test_jpeg_equals_pillow(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=75)
    assert np.array_equal(apply(img, "jpeg", 75), np.asarray(Image.open(buf).convert("RGB")))
    assert apply(img, "jpeg", 0) is img  # strength 0: the plain protocol


def test_resize_blur_noise(img):
    assert np.array_equal(apply(img, "resize", 0.5),
                          np.asarray(Image.fromarray(img).resize((26, 18), Image.Resampling.BICUBIC)))
    flat = np.full((40, 40, 3), 100, np.uint8)
    assert np.array_equal(apply(flat, "blur", 2), flat)  # a blur leaves a constant image alone
    a, b = apply(img, "noise", 5, name="x.png", seed=1), apply(img, "noise", 5, name="x.png", seed=1)
    assert np.array_equal(a, b) and not np.array_equal(a, apply(img, "noise", 5, name="y.png", seed=1))
    d = apply(flat, "noise", 5, name="x.png").astype(float) - 100
    assert abs(d.std() - 5) < 0.3 and abs(d.mean()) < 0.3


@pytest.mark.parametrize("spec, msg", [
    ("gamma=1", "Received perturbation 'gamma' (in 'gamma=1'); expected one of jpeg"),
    ("jpeg=101", "Received jpeg strength 101; expected 0 (none) or an integer 1..100"),
    ("resize=9", "Received resize strength 9; expected 0 (none) or 0.05..8"),
    ("blur", "expected blur=S1,S2"),
])
def test_bad_specs(spec, msg):
    from ferret_runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(spec)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A subset whose real images are JPEG files and fake ones PNG: the format shortcut in its purest form."""
    root = tmp_path_factory.mktemp("fmt")
    write_proxy_dataset(root / "src", size=48, n_train=1, n_val=12, n_test=1, seed=2)
    for p in sorted((root / "src" / "val").rglob("*.png")):
        dst = root / "d" / "val" / p.parent.name
        dst.mkdir(parents=True, exist_ok=True)
        if p.parent.name == "0_real":
            Image.open(p).save(dst / (p.stem + ".jpg"), quality=90)
        else:
            Image.open(p).save(dst / p.name)
    return root / "d"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import torch

    from ferret_runtime.preprocess import Preprocess
    from ferret_train import create_model
    from ferret_train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("m") / "r.pt", create_model("ferretnet-s").eval(),
                           preprocess=Preprocess(crop=48))


def _metrics(model, paths, y):
    from sklearn.metrics import accuracy_score, average_precision_score

    from ferret_runtime import Detector

    with Detector.open(model, device="cpu") as det:
        p = np.array([r.prob_fake for r in det.predict(paths)])
    return {"acc": 100 * accuracy_score(y, p > 0.5), "ap": 100 * average_precision_score(y, p),
            "f_acc": 100 * accuracy_score(y[y], p[y] > 0.5)}, p


def test_sweep_equals_degrading_the_files_on_disk(data, model, tmp_path):
    out = tmp_path / "r.json"
    proc = run_ferret("eval", "-w", str(model), "--data", str(data / "val"), "--perturb", "jpeg=50", "resize=0.5",
                      "--format-check", "--json", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert set(doc["perturb"]) == {"jpeg", "resize"} and set(doc["perturb"]["jpeg"]) == {"0", "50"}
    assert doc["perturb"]["jpeg"]["0"]["subsets"]["val"] == doc["subsets"]["val"]  # strength 0 = the plain run
    for kind in ("jpeg", "resize"):
        assert (tmp_path / f"r-{kind}.png").stat().st_size > 10_000

    paths = sorted(p for p in (data / "val").rglob("*") if p.is_file())
    y = np.array([p.parent.name == "1_fake" for p in paths])
    # JPEG quality 50 and half size, written by Pillow to files and scored as files
    for kind, save in (("jpeg", lambda im, d: im.save(d.with_suffix(".jpg"), quality=50)),
                       ("resize", lambda im, d: im.resize((24, 24), Image.Resampling.BICUBIC)
                                                  .save(d.with_suffix(".png")))):
        files = []
        for p in paths:
            d = tmp_path / kind / p.relative_to(data)
            d.parent.mkdir(parents=True, exist_ok=True)
            save(Image.open(p).convert("RGB"), d)
            files.append(next(d.parent.glob(d.stem + ".*")))
        want, _ = _metrics(model, files, y)
        got = doc["perturb"][kind]["50" if kind == "jpeg" else "0.5"]["subsets"]["val"]
        assert got["acc"] == pytest.approx(want["acc"]) and got["ap"] == pytest.approx(want["ap"], abs=1e-4)

    # format check: real images are all JPEG, fake all PNG; re-encoded = JPEG quality 95 first
    fmt = doc["format_check"]["formats"]
    assert (fmt["JPEG"]["n_real"], fmt["JPEG"]["n_fake"], fmt["PNG"]["n_real"], fmt["PNG"]["n_fake"]) == (12, 0, 0, 12)
    _, plain = _metrics(model, paths, y)
    assert fmt["PNG"]["as_is"]["f_acc"] == pytest.approx(100 * (plain[y] > 0.5).mean())
    assert "PNG files are all fake" in proc.stdout


@pytest.mark.parametrize("args, msg", [(["--perturb", "noise=300"], "Received noise strength 300"),
                                       (["--perturb", "sharpen=1"], "Received perturbation 'sharpen'")])
def test_cli_refuses_bad_perturbations(data, model, args, msg):
    proc = run_ferret("eval", "-w", str(model), "--data", str(data / "val"), *args)
    assert proc.returncode == 2 and msg in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_empty_class_is_refused(data, model, tmp_path):
    (tmp_path / "v" / "0_real").mkdir(parents=True)
    for p in sorted((data / "val" / "0_real").iterdir())[:3]:
        (tmp_path / "v" / "0_real" / p.name).symlink_to(p)
    (tmp_path / "v" / "1_fake").mkdir()
    proc = run_ferret("eval", "-w", str(model), "--data", str(tmp_path / "v"))
    assert proc.returncode == 2 and "without images in 1_fake" in proc.stderr
