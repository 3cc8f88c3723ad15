"""Tiling: cover a whole image with crops of the model's input size and aggregate their logits.

A centre crop sees a 256x256 window of a 1024x1024 image: 6% of it. Tiles see all of it; the
image's verdict is then one number made from the tiles' logits (max: any tile looks generated;
mean: on the whole; topk: the mean of the k most "fake" tiles).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from .errors import ConfigError

AGGREGATES: tuple[str, ...] = ("max", "mean", "topk")


def check_tiling(tile: int, stride: int | None, aggregate: str, topk: int) -> int:
    """Validate the options; returns the stride (default: the tile, i.e. no overlap)."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 8:
        raise ConfigError(f"Received tile {tile!r}; expected an int >= 8 (the model's input side, e.g. 256)")
    stride = tile if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= tile:
        raise ConfigError(f"Received tile stride {stride!r}; expected an int in 1..{tile} (a larger stride leaves "
                          "parts of the image unseen)")
    if aggregate not in AGGREGATES:
        raise ConfigError(f"Received aggregate {aggregate!r}; expected one of {', '.join(AGGREGATES)}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ConfigError(f"Received topk {topk!r}; expected an int >= 1")
    return stride


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets along one axis: 0, stride, 2*stride, ... and a last tile aligned to the far border
    (it may overlap its neighbour more than the stride says). One tile when the axis is no longer than it."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def pad_to(img: np.ndarray, tile: int) -> np.ndarray:
    """Zero-pad an axis shorter than ``tile`` as the centre crop does (the extra pixel right/bottom)."""
    h, w = img.shape[:2]
    if h >= tile and w >= tile:
        return img
    top, left = max(tile - h, 0) // 2, max(tile - w, 0) // 2
    return np.pad(img, ((top, max(tile - h, 0) - top), (left, max(tile - w, 0) - left), (0, 0)))


def tile_boxes(h: int, w: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """(top, left) of every tile of an image already padded to at least ``tile`` per side, row-major."""
    return [(top, left) for top in tile_origins(h, tile, stride) for left in tile_origins(w, tile, stride)]


def make_tiles(img: np.ndarray, tile: int, stride: int) -> list[np.ndarray]:
    """The tiles of one HWC image (views of it, padded first when an axis is shorter than a tile)."""
    img = pad_to(img, tile)
    return [img[top : top + tile, left : left + tile]
            for top, left in tile_boxes(img.shape[0], img.shape[1], tile, stride)]


def aggregate(logits: np.ndarray | list[float], how: str, topk: int = 3) -> float:
    """One logit from the tiles' logits; a non-finite tile logit is returned as is (a model failure)."""
    x = np.asarray(logits, dtype=np.float64)
    bad = x[~np.isfinite(x)]
    if bad.size:
        return float(bad[0])
    if how == "max":
        return float(x.max())
    if how == "mean":
        return float(x.mean())
    if how == "topk":
        return float(np.sort(x)[-min(topk, x.size):].mean())
    raise ConfigError(f"Received aggregate {how!r}; expected one of {', '.join(AGGREGATES)}")



def tile_arg(text: str) -> int | str:
    """``--tile``: a side in pixels, or 'model' (the model's own input size)."""
    if text.strip().lower() == "model":
        return "model"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"received {text!r}; expected a tile side in pixels or 'model'") from None


def add_tile_arguments(p: argparse.ArgumentParser) -> None:
    """The same tiling options on every command that opens a model (detect, eval, serve, compare)."""
    p.add_argument("--tile", type=tile_arg, default=None, metavar="N|model",
                   help="classify the whole image as tiles of N x N (or the model's input size), their logits "
                        "aggregated, instead of one centre crop")
    p.add_argument("--tile-stride", type=int, default=None, metavar="N",
                   help="pixels between tiles (default: the tile, no overlap); the last tile of a row or column "
                        "is aligned to the image border")
    p.add_argument("--aggregate", choices=AGGREGATES, default="max",
                   help="how the tiles' logits make the image's: max, mean, or topk (mean of the --topk largest)")
    p.add_argument("--topk", type=int, default=3, metavar="K", help="tiles averaged by --aggregate topk")


def tile_options(args: argparse.Namespace) -> dict[str, Any]:
    """``Detector.open`` keyword arguments from the options ``add_tile_arguments`` added."""
    return {"tile": args.tile, "tile_stride": args.tile_stride, "aggregate": args.aggregate, "topk": args.topk}
