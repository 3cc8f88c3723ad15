"""Tiling: the grid against explicit crops, the Detector's aggregated logit against the model run on
those crops one by one, and the options on the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ferret_runtime import Detector
from ferret_runtime.errors import ConfigError
from ferret_runtime.preprocess import center_crop, load_image
from ferret_runtime.tiling import aggregate, check_tiling, make_tiles, tile_origins

from .conftest import run_ferret


@pytest.mark.parametrize("length, tile, stride, want", [
    (600, 256, 256, [0, 256, 344]),  # the last tile aligned to the border
    (512, 256, 128, [0, 128, 256]),
    (256, 256, 256, [0]),
    (100, 256, 256, [0]),  # smaller than a tile: one, padded
    (257, 256, 200, [0, 1]),
])
def test_tile_origins(length, tile, stride, want):
    assert tile_origins(length, tile, stride) == want


def test_tiles_are_the_explicit_crops_and_small_images_are_padded_as_the_centre_crop():
    img = np.random.default_rng(0).integers(0, 256, (300, 520, 3), dtype=np.uint8)
    tiles = make_tiles(img, 256, 256)
    boxes = [(0, 0), (0, 256), (0, 264), (44, 0), (44, 256), (44, 264)]
    assert len(tiles) == len(boxes)
    for t, (top, left) in zip(tiles, boxes):
        assert np.array_equal(t, img[top : top + 256, left : left + 256])
    small = img[:100, :180]
    (only,) = make_tiles(small, 256, 256)
    assert np.array_equal(only, center_crop(small, 256))
    wide = img[:100]  # short in one axis only: padded in that axis, tiled along the other
    assert [t.shape for t in make_tiles(wide, 256, 256)] == [(256, 256, 3)] * 3
    assert np.array_equal(make_tiles(wide, 256, 256)[2], center_crop(wide[:, 264:], 256))


def test_aggregates():
    x = [0.5, -2.0, 3.0, 1.0]
    assert (aggregate(x, "max"), aggregate(x, "mean"), aggregate(x, "topk", 2)) == (3.0, 0.625, 2.0)
    assert np.isnan(aggregate([1.0, float("nan")], "max"))
    with pytest.raises(ConfigError, match="Received tile stride 300; expected an int in 1..256"):
        check_tiling(256, 300, "max", 3)
    with pytest.raises(ConfigError, match="Received aggregate 'median'; expected one of max, mean, topk"):
        check_tiling(256, None, "median", 3)


@pytest.mark.parametrize("how", ["max", "mean", "topk"])
def test_detector_tiles_equal_the_model_on_each_crop(authors_ckpt, reference, how):
    path = reference / "images" / "real_imageNet_butterfly.png"  # 500x500: 4 tiles, the last ones aligned
    img = load_image(path)
    crops = [img[top : top + 256, left : left + 256] for top in (0, 244) for left in (0, 244)]
    with Detector.open(authors_ckpt, device="cpu", crop=None) as det:
        each = np.array([r.logit for r in det.predict(crops)])
    with Detector.open(authors_ckpt, device="cpu", tile="model", aggregate=how, topk=2, batch_size=3) as det:
        (r,) = det.predict([path])
    want = {"max": each.max(), "mean": each.mean(), "topk": np.sort(each)[-2:].mean()}[how]
    assert r.logit == pytest.approx(want, abs=1e-4)
    assert r.label == ("fake" if r.prob_fake > 0.5 else "real")


def test_detect_cli_tile(authors_ckpt, reference):
    imgs = sorted((reference / "images").iterdir())[:3]
    proc = run_ferret("detect", "-w", str(authors_ckpt), *map(str, imgs), "--tile", "model", "--aggregate", "mean",
                      "--json", "-q", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(ln) for ln in proc.stdout.splitlines()]
    with Detector.open(authors_ckpt, device="cpu", tile=256, aggregate="mean") as det:
        want = det.predict(imgs)
    assert [g["logit"] for g in got] == pytest.approx([w.logit for w in want], abs=1e-5)
    bad = run_ferret("detect", "-w", str(authors_ckpt), str(imgs[0]), "--tile", "256", "--tile-stride", "300")
    assert bad.returncode == 2 and "Received tile stride 300; expected an int in 1..256" in bad.stderr
