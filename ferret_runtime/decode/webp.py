"""A WebP's crop decoded by libwebp itself (its cropping option), the libwebp Pillow decodes with.

Pillow decodes every WebP with ``WebPAnimDecoderNew(data, NULL)``: default options, RGBA output without
premultiplication (its RGB mode reads that buffer as RGBX), fancy chroma upsampling, no dithering; for a
still image (one key frame) the canvas is exactly one ``WebPDecode``. Here ``WebPDecode`` runs with the same
options plus ``use_cropping``, through ctypes on the very library Pillow loaded (its wheel's copy, checked by
version). libwebp crops exactly (it decodes and filters every macroblock the box depends on), but its chroma
upsampler treats the box's edges as the picture's edges, so a margin of 16 pixels (even offsets, as lossy
cropping needs) is decoded around the crop and sliced off. Animated files: None (the full decode).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import sys

import numpy as np

from .cbuild import mapped_libraries

ABI = 0x0209  # WEBP_DECODER_ABI_VERSION of libwebp 1.x: the structures below
MODE_RGBA = 1
VP8_STATUS_OK = 0
MARGIN = 16


class _Features(ctypes.Structure):
    _fields_ = [("width", ctypes.c_int), ("height", ctypes.c_int), ("has_alpha", ctypes.c_int),
                ("has_animation", ctypes.c_int), ("format", ctypes.c_int), ("pad", ctypes.c_uint32 * 5)]


class _RGBA(ctypes.Structure):
    _fields_ = [("rgba", ctypes.c_void_p), ("stride", ctypes.c_int), ("size", ctypes.c_size_t)]


class _YUVA(ctypes.Structure):
    _fields_ = [("y", ctypes.c_void_p), ("u", ctypes.c_void_p), ("v", ctypes.c_void_p), ("a", ctypes.c_void_p),
                ("y_stride", ctypes.c_int), ("u_stride", ctypes.c_int), ("v_stride", ctypes.c_int),
                ("a_stride", ctypes.c_int), ("y_size", ctypes.c_size_t), ("u_size", ctypes.c_size_t),
                ("v_size", ctypes.c_size_t), ("a_size", ctypes.c_size_t)]


class _Buffers(ctypes.Union):
    _fields_ = [("RGBA", _RGBA), ("YUVA", _YUVA)]


class _DecBuffer(ctypes.Structure):
    _fields_ = [("colorspace", ctypes.c_int), ("width", ctypes.c_int), ("height", ctypes.c_int),
                ("is_external_memory", ctypes.c_int), ("u", _Buffers), ("pad", ctypes.c_uint32 * 4),
                ("private_memory", ctypes.c_void_p)]


class _Options(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in (
        "bypass_filtering", "no_fancy_upsampling", "use_cropping", "crop_left", "crop_top", "crop_width",
        "crop_height", "use_scaling", "scaled_width", "scaled_height", "use_threads", "dithering_strength",
        "flip", "alpha_dithering_strength")] + [("pad", ctypes.c_uint32 * 5)]


class _Config(ctypes.Structure):
    _fields_ = [("input", _Features), ("output", _DecBuffer), ("options", _Options)]


def _candidates() -> list[str]:
    """Where Pillow's own libwebp is: its wheel's copy (Linux, macOS), else the one its _webp loaded."""
    import PIL

    root = os.path.dirname(PIL.__file__)
    found = glob.glob(os.path.join(root, "..", "pillow.libs", "libwebp-*.so*"))
    found += glob.glob(os.path.join(root, ".dylibs", "libwebp.*dylib"))
    if not found and sys.platform.startswith("linux"):
        try:
            found = sorted(mapped_libraries("libwebp.so"))
        except OSError:
            pass
    return found


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(libwebp, "") or (None, why not); the library must be the version Pillow decodes with."""
    try:
        from PIL import _webp, features  # noqa: F401  (_webp loads libwebp; ImportError: Pillow without WebP)
    except ImportError:
        return None, "full decode (Pillow has no WebP support here)"
    want = features.version("webp")
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
            v = lib.WebPGetDecoderVersion()
        except (OSError, AttributeError):
            continue
        if f"{v >> 16}.{(v >> 8) & 0xFF}.{v & 0xFF}" != want:
            continue
        lib.WebPInitDecoderConfigInternal.argtypes = [ctypes.POINTER(_Config), ctypes.c_int]
        lib.WebPGetFeaturesInternal.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_Features),
                                                ctypes.c_int]
        lib.WebPDecode.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_Config)]
        lib.WebPFreeDecBuffer.argtypes = [ctypes.POINTER(_DecBuffer)]
        lib.WebPFreeDecBuffer.restype = None
        return lib, ""
    return None, f"full decode (Pillow's libwebp {want} was not found to load through ctypes)"


def decode_region(data: bytes, left: int, top: int, width: int, height: int) -> np.ndarray | None:
    """uint8 (height, width, 3) RGB of the box, equal to Pillow's full decode sliced; None for the full decode."""
    lib, _ = _library()
    if lib is None:
        return None
    config = _Config()
    if not lib.WebPInitDecoderConfigInternal(ctypes.byref(config), ABI):
        return None
    if lib.WebPGetFeaturesInternal(data, len(data), ctypes.byref(config.input), ABI) != VP8_STATUS_OK:
        return None
    w, h = config.input.width, config.input.height
    if config.input.has_animation or not (0 <= left and 0 <= top and left + width <= w and top + height <= h):
        return None
    # the box plus a margin, its offsets even: the upsampler's edge rows and columns fall in the margin
    x0, y0 = max(left - MARGIN, 0) & ~1, max(top - MARGIN, 0) & ~1
    x1, y1 = min(left + width + MARGIN, w), min(top + height + MARGIN, h)
    out = np.empty((y1 - y0, x1 - x0, 4), np.uint8)
    opts = config.options
    opts.use_cropping, opts.crop_left, opts.crop_top, opts.crop_width, opts.crop_height = 1, x0, y0, x1 - x0, y1 - y0
    buf = config.output
    buf.colorspace, buf.is_external_memory = MODE_RGBA, 1
    buf.u.RGBA.rgba, buf.u.RGBA.stride, buf.u.RGBA.size = out.ctypes.data, out.strides[0], out.nbytes
    status = lib.WebPDecode(data, len(data), ctypes.byref(config))
    lib.WebPFreeDecBuffer(ctypes.byref(config.output))  # external memory: frees nothing of ours
    if status != VP8_STATUS_OK or (buf.width, buf.height) != (x1 - x0, y1 - y0):
        return None
    return np.ascontiguousarray(out[top - y0 : top - y0 + height, left - x0 : left - x0 + width, :3])


def status() -> str:
    lib, why = _library()
    if lib is None:
        return why
    return "region decode: libwebp's own cropping, with a 16-pixel margin (animated files: full decode)"
