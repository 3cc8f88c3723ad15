"""``ferret detect`` end to end: outputs, errors, exit codes, explanation panels."""

import json

import pytest
import torch
from PIL import Image

from ferret_runtime.samples import write_samples
from ferret_train import create_model
from ferret_train.checkpoint import save_checkpoint

from .conftest import run_ferret


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "s.pth", create_model("ferretnet-s").eval())


@pytest.fixture()
def images(tmp_path):
    write_samples(tmp_path / "imgs", n=1, size=64)
    return tmp_path / "imgs"


def test_bad_image_reported_others_processed_exit_1(tiny_ckpt, images, tmp_path):
    (images / "sub").mkdir()
    (images / "sub" / "broken.png").write_bytes(b"definitely not a png")
    proc = run_ferret("detect", str(images), str(tmp_path / "missing.jpg"), "--weights", str(tiny_ckpt), "--json")
    assert proc.returncode == 1
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    errors = {r["path"].rsplit("/", 1)[-1]: r["error"] for r in rows if "error" in r}
    assert set(errors) == {"broken.png", "missing.jpg"}
    assert "not an image Pillow can identify" in errors["broken.png"]
    assert "no such file" in errors["missing.jpg"]
    assert sum("label" in r for r in rows) == 3
    assert "2 of 5 inputs could not be read" in proc.stderr


def test_table_output_and_batching_of_mixed_sizes(tiny_ckpt, images):
    Image.new("RGB", (40, 30), (9, 9, 9)).save(images / "odd.png")
    table = run_ferret("detect", str(images), "--weights", str(tiny_ckpt), "--crop", "none", "-b", "2")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["label", "prob_fake", "logit", "path"] and len(lines) == 5
    js = run_ferret("detect", str(images), "--weights", str(tiny_ckpt), "--crop", "none", "--json", "-b", "1")
    rows = [json.loads(line) for line in js.stdout.splitlines()]
    # the same logits whether images share a batch or not
    for line, row in zip(lines[1:], rows):
        assert abs(float(line.split()[2]) - row["logit"]) < 1e-3


def test_explain_writes_one_panel_per_image(tiny_ckpt, images, tmp_path):
    out = tmp_path / "explain"
    proc = run_ferret("detect", str(images), "--weights", str(tiny_ckpt), "--explain", str(out))
    assert proc.returncode == 0, proc.stderr
    panels = sorted(p.name for p in out.iterdir())
    assert panels == ["fake_0_bilinear.png", "fake_0_nearest.png", "real_0.png"]
    with Image.open(out / "real_0.png") as im:
        assert im.size[0] > 3 * im.size[1]  # four panels side by side


def test_grad_cam_of_the_authors_model(authors_ckpt, reference):
    from ferret_runtime.preprocess import center_crop, load_image, normalize
    from ferret_train.checkpoint import load_checkpoint
    from ferret_train.explain import grad_cam

    m = load_checkpoint(authors_ckpt).model
    img = center_crop(load_image(reference / "images" / "fake_biggan_butterfly.png"), 128)
    x = torch.from_numpy(normalize(img[None]))
    cam, logit = grad_cam(m, x)
    with torch.no_grad():
        assert abs(logit - m(x).item()) < 1e-5  # the explained logit is the model's
    assert cam.shape == (128, 128) and cam.min() == 0 and abs(cam.max() - 1) < 1e-6
    assert 0.01 < (cam > 0.5).mean() < 0.9  # a heat map, not a constant
    assert len(m.feature[-2]._forward_hooks) == 0  # hooks removed


@pytest.mark.parametrize("args, match", [
    (["--weights", "nope.pth"], "nope.pth: no such checkpoint file"),
    (["--model", "model.xyz"], "Received model file 'model.xyz' with suffix '.xyz'; expected one of"),
    (["--weights", "W", "--crop", "huge"], "Received crop 'huge'"),
])
def test_usage_errors_exit_2_without_traceback(images, args, match):
    proc = run_ferret("detect", str(images), *args)
    assert proc.returncode == 2
    assert match in proc.stderr and "Traceback" not in proc.stderr


def test_bad_checkpoint_is_a_clear_error(images, tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"\x00" * 100)
    proc = run_ferret("detect", str(images), "--weights", str(tmp_path / "bad.pth"))
    assert proc.returncode == 2 and "bad.pth: not a loadable PyTorch checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_explains_every_option():
    out = run_ferret("detect", "--help").stdout
    for opt in ["--weights", "--model", "--crop", "--batch-size", "--threshold", "--json", "--explain", "--device"]:
        assert opt in out
    assert "Exit status" in out
