"""``ferret detect`` end to end: outputs, errors, exit codes, explanation panels."""

import json
import os
import socket
import subprocess
import sys

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
    # the table names each failed input once, not "x: x: no such file"
    table = run_ferret("detect", str(tmp_path / "missing.jpg"), "--weights", str(tiny_ckpt)).stdout.splitlines()
    assert table[1].split() == ["ERROR", f"{tmp_path / 'missing.jpg'}:", "no", "such", "file"], table


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
    (["--weights", "W", "--max-pixels", "0"],
     "Received --max-pixels '0'; expected a positive number of pixels or 'none'"),
    (["--weights", "W", "--max-pixels", "lots"], "Received --max-pixels 'lots'; expected a positive number of pixels"),
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
    for opt in ["--weights", "--model", "--crop", "--batch-size", "--threshold", "--json", "--explain", "--device",
                "--max-pixels"]:
        assert opt in out
    assert "Exit status" in out and "40 Mpx by default" in out


# --------------------------------------------------------------------------- hostile inputs
def ferret(*args: str | bytes, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """run_ferret with a short timeout: a test that hangs fails in two minutes, not ten."""
    return subprocess.run([sys.executable, "-m", "ferret_runtime.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def strict_json(line: str) -> dict:
    """json.loads without Python's NaN/Infinity extension: what any other JSON reader accepts."""
    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_poisoned_and_special_inputs_are_error_rows_never_a_crash_or_hang(tiny_ckpt, images, tmp_path):
    from .test_input_hardening import dds

    (images / "texture.png").write_bytes(dds())  # a DDS named .png: Pillow's DDS plugin would raise NotImplementedError
    Image.new("RGB", (64, 64), (1, 2, 3)).save(os.fsencode(images) + b"/\xff\xfe.png")  # a non-UTF-8 name
    os.mkfifo(tmp_path / "x.fifo")  # opening it would wait for a writer forever
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "x.sock"))
        proc = ferret("detect", str(images), str(tmp_path / "x.fifo"), str(tmp_path / "x.sock"),
                      "--weights", str(tiny_ckpt), "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    rows = [strict_json(line) for line in proc.stdout.splitlines()]
    errors = {os.path.basename(r["path"]): r["error"] for r in rows if "error" in r}
    assert errors == {
        "texture.png": f"{images / 'texture.png'}: not an image of a supported format (received DDS; "
                       "expected PNG, JPEG, BMP, WEBP, TIFF or GIF)",
        "x.fifo": f"{tmp_path / 'x.fifo'}: is a FIFO, not a regular file",
        "x.sock": f"{tmp_path / 'x.sock'}: is a socket, not a regular file",
    }
    labelled = [r for r in rows if "label" in r]
    assert len(labelled) == 4 and all(isinstance(r["logit"], float) for r in labelled)
    # the undecodable name survives JSON: the OS's bytes come back with os.fsencode
    assert b"\xff\xfe.png" in {os.path.basename(os.fsencode(r["path"])) for r in labelled}
    assert "3 of 7 inputs could not be read" in proc.stderr


def test_non_utf8_file_name_on_a_strict_utf8_terminal(tiny_ckpt, tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(os.fsencode(tmp_path / "imgs") + b"/\xff\xfe.png")
    (tmp_path / "imgs" / "caf\u00e9.png").write_bytes(b"not an image")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    proc = ferret("detect", str(tmp_path / "imgs"), "--weights", str(tiny_ckpt), env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split() == ["label", "prob_fake", "logit", "path"] and len(rows) == 2
    assert any(r.endswith(f"{tmp_path / 'imgs'}/\\xff\\xfe.png") for r in rows), rows  # the bytes, escaped
    cafe = tmp_path / "imgs" / "caf\u00e9.png"
    assert any(f"{cafe}: not an image Pillow can identify" in r for r in rows), rows  # valid UTF-8 stays as it is


@pytest.fixture(scope="module")
def raw_ckpt(tiny_ckpt, tmp_path_factory):
    """Write a checkpoint with a hand-edited preprocess dict, bypassing save_checkpoint's validation."""
    def write(name: str, **preprocess) -> str:
        ckpt = torch.load(tiny_ckpt, weights_only=False)
        ckpt["preprocess"].update(preprocess)
        path = tmp_path_factory.mktemp("raw") / name
        torch.save(ckpt, path)
        return str(path)

    return write


@pytest.mark.parametrize("edit, message", [
    ({"crop": -3}, "Received preprocess crop -3; expected a positive integer or None"),
    ({"std": [0.2, 0.0, 0.2]}, "Received preprocess std (0.2, 0.0, 0.2); expected 3 values > 0 "
                               "(the normalisation divides by them)"),
])
def test_checkpoint_with_invalid_preprocessing_exits_2_naming_the_file(raw_ckpt, images, edit, message):
    ckpt = raw_ckpt("lying.pth", **edit)
    proc = ferret("detect", str(images), "--weights", ckpt, "--json")
    assert proc.returncode == 2 and proc.stdout == ""
    # one line naming the file, no traceback ("Received ..." or "received ...": the file name may lead)
    assert proc.stderr.startswith(f"ferret detect: error: {ckpt}: ") and proc.stderr.count("\n") == 1
    assert proc.stderr.endswith(message[1:] + "\n")


def test_non_finite_logits_are_error_rows_and_json_stays_strict(images, tmp_path):
    torch.manual_seed(0)
    model = create_model("ferretnet-s").eval()
    with torch.no_grad():
        model.logit[1].bias.fill_(float("nan"))  # what a diverged training run saves
    ckpt = save_checkpoint(tmp_path / "diverged.pth", model)
    proc = ferret("detect", str(images), "--weights", str(ckpt), "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    rows = [strict_json(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 3
    assert all(r["error"] == "model diverged.pth produced a non-finite logit (nan) for this image" for r in rows)


def test_max_pixels_option_refuses_larger_images(tiny_ckpt, images):
    proc = ferret("detect", str(images), "--weights", str(tiny_ckpt), "--json", "--max-pixels", "4000")
    assert proc.returncode == 1, proc.stderr
    rows = [strict_json(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 3
    assert all(r["error"].endswith(": received an image of 64x64 = 4096 pixels; expected at most 4000 pixels "
                                   "(--max-pixels)") for r in rows)
    proc = ferret("detect", str(images), "--weights", str(tiny_ckpt), "--json", "--max-pixels", "4096")
    assert proc.returncode == 0 and all("label" in strict_json(line) for line in proc.stdout.splitlines())
