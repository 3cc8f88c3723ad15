"""Decode only the pixels the model reads: the centre crop of a JPEG, PNG or WebP, same pixels as a full decode.

``load_prepared(source, pre)`` returns exactly ``prepare(load_image(source), pre)``: the same array, the same
ImageError messages for the same bad inputs. With a centre crop set and a path or bytes given, the file is read
once, identified from its header (the same format, size and ``max_pixels`` checks as ``load_image``), and a
format's region decoder returns the crop's pixels; it answers None (or fails) where it cannot promise the
full decode's pixels, and then the full decode runs from the bytes already read, errors included. (One
input differs: a complete PNG whose deflate data is damaged below the crop decodes here where the full decode
refuses it; see decode/png.py.)
``region=False`` forces the full decode (the bench compares both); ``decoders()`` says which formats decode
a region, and why not.
"""

from __future__ import annotations

import importlib
import io
import os
import threading
from collections.abc import Callable

import numpy as np

from ..preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageInput,
    Preprocess,
    check_image_size,
    identify_image,
    image_errors,
    image_label,
    load_image,
    open_image_file,
    prepare,
    to_rgb,
)

# Pillow's format name -> the module decoding a region of it, imported on first use (JPEG's and PNG's build a C shim)
_MODULES = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp"}
_FORMATS = ("JPEG", "PNG", "WEBP")
_lock = threading.Lock()
_loaded: dict[str, tuple[object | None, str]] = {}  # module name -> (module or None, why not)

Region = Callable[[bytes, int, int, int, int], "np.ndarray | None"]


def _module(name: str) -> tuple[object | None, str]:
    """The region module ``name`` (imported once) or None, with the reason it is missing."""
    with _lock:
        if name not in _loaded:
            try:
                _loaded[name] = (importlib.import_module(f"{__name__}.{name}"), "")
            except Exception as e:  # a missing or broken decoder only turns region decoding off
                _loaded[name] = (None, f"full decode (the region decoder did not load: {type(e).__name__}: {e})")
        return _loaded[name]


def _region(fmt: str | None, data: bytes, left: int, top: int, size: int) -> np.ndarray | None:
    """The crop from the format's region decoder, or None for the full decode (never raises)."""
    mod, _ = _module(_MODULES[fmt]) if fmt in _MODULES else (None, "")
    decode: Region | None = getattr(mod, "decode_region", None)
    if decode is None:
        return None
    try:
        out = decode(data, left, top, size, size)
    except Exception:  # the full decode runs next and reports the file's problem in its own words
        return None
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != (size, size, 3):
        return None
    # as center_crop's: a compact, writable array of its own
    return out if out.flags.c_contiguous and out.flags.writeable and out.base is None else out.copy()


# Region decoding reads the whole file into memory first (the full decode reads what it needs as it goes). A file
# larger than its own pixels would be as RGB (3 bytes per pixel of max_pixels), or than this without a pixel limit,
# takes the full decode, so a multi-GB file with a small image in front never lands in memory whole.
UNLIMITED_READ_BYTES = 512 * 2**20


def _read(source: str | os.PathLike, label: str, max_pixels: int | None) -> bytes | None:
    """The file's bytes, or None when it is too large to read whole (see UNLIMITED_READ_BYTES)."""
    cap = UNLIMITED_READ_BYTES if max_pixels is None else 3 * max_pixels
    with open_image_file(source, label) as fp:
        if os.fstat(fp.fileno()).st_size > cap:
            return None
        return fp.read(cap + 1)


def load_prepared(source: ImageInput, pre: Preprocess, name: str | None = None, *,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS, region: bool = True) -> np.ndarray:
    """``prepare(load_image(source, name, max_pixels=max_pixels), pre)``, decoding only the crop where it can.

    Arrays and PIL images, ``pre.crop=None``, images smaller than the crop (padded) and formats without a
    region decoder take the full decode; so does everything with ``region=False``.
    """
    crop = pre.crop
    if not region or crop is None or not isinstance(source, (bytes, str, os.PathLike)):
        return prepare(load_image(source, name, max_pixels=max_pixels), pre)
    label = image_label(source, name)
    with image_errors(label):
        data = source if isinstance(source, bytes) else _read(source, label, max_pixels)
        if data is None or len(data) > (UNLIMITED_READ_BYTES if max_pixels is None else 3 * max_pixels):
            return prepare(load_image(source, name, max_pixels=max_pixels), pre)
        with io.BytesIO(data) as fp, identify_image(fp, label) as img:
            check_image_size(img, label, max_pixels)
            w, h = img.size
            if w >= crop and h >= crop:
                # center_crop's offsets: torchvision's rounding, half to even
                left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
                out = _region(img.format, data, left, top, crop)
                if out is not None:
                    return out
            arr = to_rgb(img, label, max_pixels)
    return prepare(arr, pre)


def decoders() -> dict[str, str]:
    """Per format, one line: whether the centre crop is decoded alone, and why not."""
    out = {}
    for fmt in _FORMATS:
        mod, why = _module(_MODULES[fmt])
        status = getattr(mod, "status", None)
        if mod is None:
            out[fmt] = why
        elif status is None:
            out[fmt] = "full decode (the region decoder has no status())"
        else:
            try:
                out[fmt] = str(status())
            except Exception as e:
                out[fmt] = f"full decode (its status failed: {type(e).__name__}: {e})"
    return out
