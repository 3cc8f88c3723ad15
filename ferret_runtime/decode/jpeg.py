"""Crop-aware JPEG decoding, bit-identical to Pillow's full decode followed by the crop.

``decode_region(data, left, top, width, height)`` returns exactly
``np.asarray(Image.open(BytesIO(data)).convert("RGB"))[top:top + height, left:left + width]`` (no EXIF
rotation, as ``preprocess`` decodes), or None when it cannot prove that here; the caller then does the
full decode. A centre crop of a 12-Mpx camera JPEG skips the IDCT, upsampling and colour conversion of
everything outside the crop (and, for a baseline file, all work on the rows below it).

How: ``jpegcrop.c`` (built once with the system C compiler, see ``cbuild``) calls the very libjpeg
Pillow loaded (found in ``/proc/self/maps`` after PIL's C module is imported; dlopen'd RTLD_LOCAL)
with Pillow's settings, decodes the region plus a margin of two iMCUs each side with
``jpeg_crop_scanline`` / ``jpeg_skip_scanlines``, and copies out the asked part. A multi-scan file
(progressive, or one sequential scan per component) is entropy-decoded in full before any row comes
out, so libjpeg gets a copy whose SOF height ends three iMCU rows below the region: every scan then
stops after the blocks above that bottom (same bits, same order as in the whole file) and libjpeg skips
the rest of the scan to the next marker; that "extraneous data" warning is the only one tolerated there.
The one input answered that Pillow's full decode refuses: entropy data below the region whose DC
predictions overflow an int (libjpeg-turbo's JERR_BAD_DCT_COEF), which takes a crafted file. It refuses (None)
CMYK/YCCK, 12-bit, lossless and arithmetic-coded files, data whose first image has no EOI (a truncated
file keeps failing in Pillow as today), unknown or misplaced markers, and any libjpeg error or warning.

The ctypes call releases the GIL, so threads decode on every core. Off (every call None, ``status()``
says why): not Linux, no C compiler or a failed compile, no libjpeg-turbo found in Pillow, an ABI
mismatch.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cbuild import BuildError, build_shared, mapped_libraries

SOURCE_PATH: Path = Path(__file__).with_name("jpegcrop.c")
INCLUDE_DIR: Path = Path(__file__).with_name("include")

# jpegcrop.c's return codes
REASONS: dict[int, str] = {
    0: "decoded",
    1: "the region decoder is off",
    2: "refused by the marker walk (no EOI after the first image, an unknown or misplaced marker, junk)",
    3: "unsupported JPEG (not 8-bit Huffman-coded with 1 or 3 components)",
    4: "libjpeg raised an error",
    5: "libjpeg warned (corrupt or truncated data)",
    6: "the region is not inside the image",
}


@dataclass(frozen=True)
class _Loaded:
    lib: ctypes.CDLL | None
    line: str  # status(): what is used, or why the region path is off


_lock = threading.Lock()
_loaded: _Loaded | None = None


def pillow_libjpeg() -> tuple[str | None, str]:
    """The path of the libjpeg that Pillow's C module loaded (None and why when it cannot be told)."""
    if not sys.platform.startswith("linux"):
        return None, f"not Linux (platform {sys.platform})"
    try:
        from PIL import Image, features
    except ImportError:
        return None, "Pillow is not installed"
    if not features.check_codec("jpg"):
        return None, "Pillow was built without JPEG support"
    getattr(Image.core, "jpeg_decoder", None)  # PIL._imaging is loaded with its libjpeg once Image is imported
    try:
        found = mapped_libraries("libjpeg")
    except OSError as e:
        return None, f"cannot read /proc/self/maps ({e.strerror or e})"
    if not found:
        return None, "no libjpeg mapped in this process after importing Pillow"
    pil_root = Path(Image.__file__).resolve().parent.parent
    bundled = [p for p in found if Path(p).resolve().parent == pil_root / "pillow.libs"]
    if bundled:
        return bundled[0], ""
    if len({os.path.realpath(p) for p in found}) == 1:
        return found[0], ""
    return None, f"several libjpeg files mapped ({', '.join(found)}); cannot tell which one Pillow uses"


def _load() -> _Loaded:
    path, why = pillow_libjpeg()
    if path is None:
        return _Loaded(None, f"JPEG region decoding off: {why}")
    from PIL import features

    version = features.version("libjpeg_turbo") or features.version("jpg") or "unknown version"
    try:
        shim = build_shared(SOURCE_PATH, INCLUDE_DIR, ("-ldl",))
    except BuildError as e:
        return _Loaded(None, f"JPEG region decoding off: {e}")
    try:
        lib = ctypes.CDLL(str(shim))
    except OSError as e:
        return _Loaded(None, f"JPEG region decoding off: cannot load {shim} ({e})")
    lib.fj_init.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
    lib.fj_init.restype = ctypes.c_int
    msg = ctypes.create_string_buffer(512)
    if lib.fj_init(os.fsencode(path), msg, len(msg)) != 0:
        return _Loaded(None, f"JPEG region decoding off: {msg.value.decode(errors='replace')}")
    lib.fj_decode.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    lib.fj_decode.restype = ctypes.c_int
    return _Loaded(lib, f"JPEG region decoding on: libjpeg-turbo {version} at {path} (ABI 62), shim {shim}")


def _state() -> _Loaded:
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _load()
    return _loaded


def status() -> str:
    """One line: the libjpeg and compiled shim in use, or why the region path is off (builds on first use)."""
    return _state().line


def available() -> bool:
    """True when decode_region can decode here (else it always returns None)."""
    return _state().lib is not None


def _check_region(left: int, top: int, width: int, height: int) -> None:
    for name, v in (("left", left), ("top", top), ("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"decode_region: {name} must be an int, received {type(v).__name__}")
    if left < 0 or top < 0 or width < 1 or height < 1:
        raise ValueError(f"decode_region: received left={left}, top={top}, width={width}, height={height}; "
                         "expected left, top >= 0 and width, height >= 1")


def decode_region_explained(data: bytes | bytearray | memoryview, left: int, top: int, width: int,
                            height: int, *, shorten: bool = True) -> tuple[np.ndarray | None, str]:
    """:func:`decode_region` and the reason of its answer: one of :data:`REASONS`' texts, or for a decode
    "decoded columns X0..X1 of WxH (...)", the columns libjpeg decoded (the region, its margin, iMCU-aligned),
    followed for a multi-scan file decoded from a shortened copy by "; SOF height N (K scan tails skipped)".
    ``shorten=False`` decodes multi-scan files at their whole height (the comparison in the benchmarks)."""
    _check_region(left, top, width, height)
    lib = _state().lib
    if lib is None:
        return None, REASONS[1]
    try:
        buf = np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError):  # a non-contiguous memoryview, or not a buffer at all
        try:
            buf = np.frombuffer(bytes(data), dtype=np.uint8)
        except (TypeError, ValueError):
            return None, "data is not a bytes-like object"
    if buf.size < 4:
        return None, REASONS[2]
    if left + width > 65535 or top + height > 65535:  # JPEG's largest dimension
        return None, REASONS[6]
    out = np.empty((int(height), int(width), 3), dtype=np.uint8)
    info = (ctypes.c_int * 8)()
    code = lib.fj_decode(buf.ctypes.data, buf.size, int(left), int(top), int(width), int(height), int(bool(shorten)),
                         out.ctypes.data, info)
    if code != 0:
        return None, REASONS.get(code, f"unknown code {code}")
    kind = "progressive" if info[3] else "sequential"
    line = (f"{REASONS[0]} columns {info[4]}..{info[4] + info[5]} of {info[0]}x{info[1]} "
            f"({kind}, {info[2]} components)")
    if info[6] != info[1]:
        line += f"; SOF height {info[6]} ({info[7]} scan tails skipped)"
    return out, line


def decode_region(data: bytes | bytearray | memoryview, left: int, top: int, width: int,
                  height: int) -> np.ndarray | None:
    """The RGB pixels ``[top:top+height, left:left+width]`` of a JPEG's full decode by Pillow, as a new
    C-contiguous uint8 array (height, width, 3); None when that cannot be proved here (region path off,
    unsupported or damaged data, region outside the image): the caller then decodes in full.

    Never raises for bad data; TypeError/ValueError only for a negative origin or an empty size."""
    return decode_region_explained(data, left, top, width, height)[0]
