"""Preprocessing follows the original (torchvision) pipeline; expected values derived by hand."""

import numpy as np
import pytest
from PIL import Image

from ferret_runtime.errors import ConfigError, ImageError
from ferret_runtime.preprocess import (
    MEAN,
    STD,
    Preprocess,
    center_crop,
    find_images,
    load_image,
    normalize,
    parse_crop,
    prepare,
)


def _ramp(h, w):
    return (np.arange(h * w * 3) % 251).astype(np.uint8).reshape(h, w, 3)


def test_crop_offsets_use_round_half_even():
    img = _ramp(9, 12)
    # torchvision: top = int(round((9 - 4) / 2)) = round(2.5) = 2, left = round(4.0) = 4
    np.testing.assert_array_equal(center_crop(img, 4), img[2:6, 4:8])
    img = _ramp(11, 8)  # top = round(3.5) = 4, left = round(2.0) = 2
    np.testing.assert_array_equal(center_crop(img, 4), img[4:8, 2:6])


def test_crop_pads_smaller_images_with_zeros_extra_pixel_right_bottom():
    img = np.full((3, 6, 3), 200, np.uint8)
    out = center_crop(img, 6)  # pad top (6-3)//2 = 1, bottom 2; width already 6
    assert out.shape == (6, 6, 3)
    assert (out[0] == 0).all() and (out[1:4] == 200).all() and (out[4:] == 0).all()
    img = np.full((2, 2, 3), 7, np.uint8)
    out = center_crop(img, 5)  # left 1, right 2; top 1, bottom 2
    assert (out[1:3, 1:3] == 7).all() and out.sum() == 7 * 4 * 3


def test_normalize_matches_to_tensor_normalize():
    img = np.array([[[0, 128, 255]]], np.uint8)
    got = normalize(img)
    want = [(np.float32(v) / np.float32(255) - np.float32(m)) / np.float32(s)
            for v, m, s in zip((0, 128, 255), MEAN, STD)]
    assert got.shape == (3, 1, 1) and got.dtype == np.float32
    np.testing.assert_array_equal(got[:, 0, 0], np.array(want, np.float32))


def test_load_converts_modes_without_exif_rotation(tmp_path):
    rgba = Image.new("RGBA", (4, 3), (10, 20, 30, 40))
    rgba.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.shape == (3, 4, 3) and (out == [10, 20, 30]).all()
    gray = Image.new("L", (2, 2), 99)
    assert (load_image(gray) == 99).all()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": the original ignores it, so must we
    Image.new("RGB", (8, 2), (1, 2, 3)).save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").shape == (2, 8, 3)


def test_bad_images_name_file_and_problem(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ImageError, match=r"bad\.png: not an image Pillow can identify"):
        load_image(tmp_path / "bad.png")
    good = tmp_path / "t.png"
    Image.new("RGB", (64, 64), (5, 5, 5)).save(good)
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageError, match=r"trunc\.png: cannot decode image"):
        load_image(tmp_path / "trunc.png")
    with pytest.raises(ImageError, match=r"missing\.jpg: no such file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match=r"expected uint8 of shape \(H, W, 3\)"):
        load_image(np.zeros((4, 4), np.float32))


def test_find_images_recurses_sorted_and_keeps_explicit_files(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    for p in ["b/2.png", "b/c/1.JPG", "a.webp", "notes.txt"]:
        (tmp_path / p).write_bytes(b"")
    found = find_images([tmp_path, tmp_path / "notes.txt"])
    rel = [str(p.relative_to(tmp_path)) for p in found]
    assert rel == ["a.webp", "b/2.png", "b/c/1.JPG", "notes.txt"]


def test_parse_crop_and_preprocess_dict():
    assert parse_crop("none") is None and parse_crop("224") == 224
    with pytest.raises(ConfigError, match="Received crop 'big'"):
        parse_crop("big")
    assert Preprocess.from_dict(Preprocess(crop=None).to_dict()) == Preprocess(crop=None)
    with pytest.raises(ConfigError, match=r"Received preprocessing keys \['crops'\]"):
        Preprocess.from_dict({"crops": 1})


def test_crop_returns_a_compact_copy_not_a_view_of_the_decoded_image():
    big = _ramp(600, 256)  # full width: rows alone would give a contiguous view of the whole image
    for out in (center_crop(big, 256), prepare(big, Preprocess(crop=256)),
                prepare(_ramp(300, 400), Preprocess(crop=64))):
        assert out.flags.c_contiguous and out.base is None  # owns its memory: the big image can be freed
    np.testing.assert_array_equal(center_crop(big, 256), big[172:428])
    full = _ramp(9, 12)
    assert prepare(full, Preprocess(crop=None)) is full  # no crop: the decoded image itself, no copy


@pytest.mark.parametrize("kwargs, match", [
    ({"crop": -3}, r"Received preprocess crop -3; expected a positive integer or None"),
    ({"crop": 0}, r"Received preprocess crop 0; expected a positive integer or None"),
    ({"crop": True}, r"Received preprocess crop True; expected a positive integer or None"),
    ({"crop": 25.5}, r"Received preprocess crop 25.5; expected a positive integer or None"),
    ({"mean": (0.5, 0.5)}, r"Received preprocess mean \(0.5, 0.5\); expected 3 finite numbers, one per RGB channel"),
    ({"mean": (0.5, float("nan"), 0.5)}, r"Received preprocess mean \(0.5, nan, 0.5\); expected 3 finite numbers"),
    ({"std": ("a", "b", "c")}, r"Received preprocess std \('a', 'b', 'c'\); expected 3 finite numbers"),
    ({"std": (0.2, 0.0, 0.2)}, r"Received preprocess std \(0.2, 0.0, 0.2\); expected 3 values > 0"),
    ({"std": (0.2, -1, 0.2)}, r"Received preprocess std \(0.2, -1.0, 0.2\); expected 3 values > 0"),
    ({"layout": "CHW"}, r"Received preprocess layout 'CHW'; expected one of NCHW, NHWC"),
    ({"dtype": "float64"}, r"Received preprocess dtype 'float64'; expected one of float32, float16, uint8"),
    ({"extra": []}, r"Received preprocess extra \[\]; expected a dict"),
])
def test_preprocess_validates_itself(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Preprocess(**kwargs)
    with pytest.raises(ConfigError, match=match):  # what a model file's metadata goes through
        Preprocess.from_dict({**Preprocess().to_dict(), **kwargs})


def test_preprocess_normalises_equal_settings_to_equal_values():
    pre = Preprocess(crop=np.int64(224), mean=[0.5, 0.5, 0.5], std=np.array([1, 2, 3]))
    assert pre == Preprocess(crop=224, mean=(0.5, 0.5, 0.5), std=(1.0, 2.0, 3.0))
    assert type(pre.crop) is int and all(type(v) is float for v in pre.std)
    with pytest.raises(ConfigError, match=r"Received preprocessing list \[1, 2\]; expected a dict"):
        Preprocess.from_dict([1, 2])


def _within(seconds: float, fn, *args):
    """``fn(*args)``, run on a daemon thread: a call that blocks fails the test instead of stalling the suite."""
    import queue
    import threading

    out: queue.Queue = queue.Queue()

    def call() -> None:
        try:
            out.put((True, fn(*args)))
        except BaseException as e:
            out.put((False, e))

    threading.Thread(target=call, daemon=True).start()
    try:
        ok, value = out.get(timeout=seconds)
    except queue.Empty:
        pytest.fail(f"{fn.__name__}{args} still blocked after {seconds} s")
    if not ok:
        raise value
    return value


def test_special_files_are_errors_not_hangs(tmp_path):
    import os
    import socket

    os.mkfifo(tmp_path / "x.fifo")  # open() on it would wait forever for a writer
    with pytest.raises(ImageError, match=r"x\.fifo: is a FIFO, not a regular file"):
        _within(20, load_image, tmp_path / "x.fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "x.sock"))
        with pytest.raises(ImageError, match=r"x\.sock: is a socket, not a regular file"):
            load_image(tmp_path / "x.sock")
    with pytest.raises(ImageError, match=r"/dev/zero: is a character device, not a regular file"):
        _within(20, load_image, "/dev/zero")  # endless bytes: reading it might never end either
    with pytest.raises(ImageError, match=r": is a directory, expected an image file"):
        load_image(tmp_path)
