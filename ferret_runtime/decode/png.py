"""The crop of a PNG with the same pixels as Pillow's full decode: inflate and unfilter only what it needs.

A PNG is one deflate stream of filtered rows; a row's filter reads only the bytes above, to the left and
above-left, so the crop's pixels need the rows down to its bottom and, in each, the bytes up to its right
edge, nothing else. Two ways, the first falling back to the second:

- **fast** (8- and 16-bit, not interlaced): the stream is inflated only up to the crop's bottom row
  (ISA-L's igzip through ``isal`` when it is installed, about twice zlib's speed, else the standard ``zlib``
  module: the same bytes), ``pngcrop.c`` (built once by ``cbuild``) undoes filters 0-4 on the columns left
  of the crop's right edge and copies out the crop's bytes, and Pillow unpacks those with the very rawmode
  it chose for this file (its ``raw`` decoder runs the unpacker its ``zip`` decoder would) and converts them
  to RGB (per pixel, so it commutes with the crop), palette and ``info`` attached as its PNG plugin does;
- **IHDR** (everything else the fast way cannot prove: 1/2/4-bit samples, no C compiler, a stream that
  ends before the crop's bottom, a filter type out of range): the header's height is rewritten to the
  crop's bottom (with its CRC) and Pillow decodes that shorter image itself.

None (the caller then does the full decode, with its own errors): interlaced (Adam7) or animated (APNG)
files, a bad header checksum, a chunk stream that does not end in IEND inside the file (a truncated
download: the full decode reports it, a decode stopping at the crop would not notice it).

One difference remains, by design: deflate data damaged *below* the crop (a flipped bit in a complete file)
is never inflated here, so such a file gives the crop's pixels where the full decode says "broken data
stream". Checking it would mean inflating the whole stream, most of a full decode's cost.
"""

from __future__ import annotations

import ctypes
import io
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

from .cbuild import BuildError, build_shared

SIGNATURE = b"\x89PNG\r\n\x1a\n"
SOURCE_PATH: Path = Path(__file__).with_name("pngcrop.c")
_IHDR_END = 8 + 8 + 13 + 4  # signature, IHDR length and type, its 13 bytes, its CRC
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
# (bit depth, colour type) -> the rawmode Pillow's PNG plugin unpacks with (sample layout known here)
FAST_RAWMODES = {(8, 0): "L", (8, 2): "RGB", (8, 3): "P", (8, 4): "LA", (8, 6): "RGBA", (16, 0): "I;16B",
                 (16, 2): "RGB;16B", (16, 4): "LA;16B", (16, 6): "RGBA;16B"}
BATCH_BYTES = 1 << 20  # IDAT chunks are joined into about this much deflate data per inflate call

_lock = threading.Lock()
_lib: list[ctypes.CDLL | None] = []
_why_off = ""


def inflate_module() -> ModuleType:
    """``isal.isal_zlib`` (ISA-L) when installed, else ``zlib``: the same bytes from the same stream."""
    try:
        from isal import isal_zlib
    except ImportError:
        return zlib
    return isal_zlib


def load_library(path: Path) -> ctypes.CDLL:
    """A build of pngcrop.c, its function typed for ctypes (OSError/AttributeError when it is not one)."""
    lib = ctypes.CDLL(str(path))
    lib.fp_unfilter.argtypes = [ctypes.c_void_p, *[ctypes.c_size_t] * 8, ctypes.c_void_p]
    lib.fp_unfilter.restype = ctypes.c_int
    return lib


def _unfilter_lib() -> ctypes.CDLL | None:
    """pngcrop.c built and loaded once (None when it cannot be; ``status()`` says why)."""
    global _why_off
    if not _lib:
        with _lock:
            if not _lib:
                lib = None
                try:
                    lib = load_library(build_shared(SOURCE_PATH))
                except BuildError as e:
                    _why_off = str(e)
                except (OSError, AttributeError) as e:
                    _why_off = f"cannot load the build of {SOURCE_PATH.name}: {e}"
                    lib = None
                _lib.append(lib)
    return _lib[0]


def _walk(data: bytes) -> list[tuple[int, int]] | None:
    """The (start, end) of each IDAT chunk's data in the first run of them (Pillow reads no further), when the
    chunk stream is whole (every chunk inside the file, IEND at the end), with no acTL (APNG: Pillow's first
    frame is then not simply the rows of IDAT); else None."""
    pos, end, idat, run_over = 8, len(data), [], False
    while pos + 12 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if length > 0x7FFFFFFF or pos + 12 + length > end:
            return None
        if kind == b"IEND":
            return idat or None
        if kind == b"acTL":
            return None
        if kind == b"IDAT":
            if not run_over:
                idat.append((pos + 8, pos + 8 + length))
        elif idat:
            run_over = True
        pos += 12 + length
    return None


def _header(data: bytes, left: int, top: int, width: int, height: int) -> tuple[int, ...] | None:
    """(width, height, bit depth, colour type) of a PNG this module may decode the box of, else None."""
    if len(data) < _IHDR_END or not data.startswith(SIGNATURE) or data[12:16] != b"IHDR" or data[8:12] != b"\0\0\0\r":
        return None
    w, h, depth, colour, _compression, _filter, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    if interlace != 0 or zlib.crc32(data[12:29]) != struct.unpack_from(">I", data, 29)[0]:
        return None
    if not (0 <= left and 0 <= top and width > 0 and height > 0 and left + width <= w and top + height <= h):
        return None
    return w, h, depth, colour


def _batches(data: bytes, spans: list[tuple[int, int]]) -> Iterator[bytes | memoryview]:
    """The IDAT data in order, consecutive chunks joined into about BATCH_BYTES (fewer inflate calls), lazily:
    nothing past what the inflater asks for is copied."""
    view = memoryview(data)
    group: list[memoryview] = []
    size = 0
    for start, stop in spans:
        group.append(view[start:stop])
        size += stop - start
        if size >= BATCH_BYTES:
            yield group[0] if len(group) == 1 else b"".join(group)
            group, size = [], 0
    if group:
        yield group[0] if len(group) == 1 else b"".join(group)


def _inflate(data: bytes, spans: list[tuple[int, int]], needed: int) -> bytes | None:
    """The first ``needed`` bytes the IDAT data inflates to (None: the stream ends or breaks before)."""
    mod = inflate_module()
    d = mod.decompressobj()
    pieces, got = [], 0
    try:
        for batch in _batches(data, spans):
            buf: bytes | memoryview = batch
            while buf and got < needed and not d.eof:
                piece = d.decompress(buf, needed - got)
                pieces.append(piece)
                got += len(piece)
                tail = d.unconsumed_tail
                if not piece and len(tail) == len(buf):
                    return None
                buf = tail
            if got >= needed or d.eof:
                break
    except mod.error:
        return None
    return b"".join(pieces) if got >= needed else None


def decode_region_fast(data: bytes, left: int, top: int, width: int, height: int) -> np.ndarray | None:
    """The box the fast way (module notes), or None when it cannot promise Pillow's full-decode pixels."""
    head = _header(data, left, top, width, height)
    if head is None or (head[2], head[3]) not in FAST_RAWMODES:
        return None
    w, h, depth, colour = head
    spans = _walk(data)
    lib = _unfilter_lib()
    if spans is None or lib is None:
        return None
    with Image.open(io.BytesIO(data), formats=("PNG",)) as img:
        tile = img.tile
        if (img.size != (w, h) or getattr(img, "n_frames", 1) != 1 or len(tile) != 1 or tile[0][0] != "zip"
                or tuple(tile[0][1]) != (0, 0, w, h) or tile[0][3] != FAST_RAWMODES[depth, colour]):
            return None
        mode, rawmode, info = img.mode, tile[0][3], dict(img.info)
        palette = img.palette.copy() if img.palette is not None else None
    if mode == "P" and palette is None:
        return None
    bpp = CHANNELS[colour] * depth // 8
    stride, bottom = w * bpp, top + height
    raw = _inflate(data, spans, bottom * (stride + 1))
    if raw is None:
        return None
    out = np.empty((height, width * bpp), np.uint8)
    code = lib.fp_unfilter(raw, len(raw), stride, bpp, bottom, (left + width) * bpp, top, left * bpp, width * bpp,
                           out.ctypes.data)
    if code != 0:
        return None
    part = Image.frombytes(mode, (width, height), out, "raw", rawmode)
    if palette is not None:
        part.palette = palette
    part.info = info
    rgb = np.array(part if part.mode == "RGB" else part.convert("RGB"))
    return rgb if rgb.dtype == np.uint8 and rgb.shape == (height, width, 3) else None


def decode_region_ihdr(data: bytes, left: int, top: int, width: int, height: int) -> np.ndarray | None:
    """The box through Pillow decoding a copy whose IHDR height ends at the box's bottom (any bit depth)."""
    head = _header(data, left, top, width, height)
    if head is None or _walk(data) is None:
        return None
    w, h = head[:2]
    bottom = top + height
    if bottom < h:
        ihdr = data[12:20] + struct.pack(">I", bottom) + data[24:29]
        data = b"".join((data[:12], ihdr, struct.pack(">I", zlib.crc32(ihdr)), data[_IHDR_END:]))
    with Image.open(io.BytesIO(data), formats=("PNG",)) as img:
        if img.size != (w, bottom) or getattr(img, "n_frames", 1) != 1:
            return None
        img.load()
        part = img.crop((left, top, left + width, bottom))
    rgb = np.array(part if part.mode == "RGB" else part.convert("RGB"))
    if rgb.dtype != np.uint8 or rgb.shape != (height, width, 3):
        return None
    return rgb


def decode_region_explained(data: bytes, left: int, top: int, width: int,
                            height: int) -> tuple[np.ndarray | None, str]:
    """:func:`decode_region` and which way answered: "fast", "ihdr" or "none" (full decode)."""
    try:
        fast = decode_region_fast(data, left, top, width, height)
    except (OSError, ValueError, SyntaxError, struct.error):  # Pillow refusing the header: the IHDR way decides
        fast = None
    if fast is not None:
        return fast, "fast"
    slow = decode_region_ihdr(data, left, top, width, height)
    return slow, "ihdr" if slow is not None else "none"


def decode_region(data: bytes, left: int, top: int, width: int, height: int) -> np.ndarray | None:
    """uint8 (height, width, 3) RGB of the box, equal to Pillow's full decode converted to RGB and sliced;
    None when this file is better left to the full decode (see the module's notes)."""
    return decode_region_explained(data, left, top, width, height)[0]


def status() -> str:
    lib = _unfilter_lib()
    inflater = "ISA-L (isal)" if inflate_module() is not zlib else "zlib (install isal for ISA-L, about 2x faster)"
    if lib is None:
        return (f"region decode: rows down to the crop's bottom, by Pillow itself (the C unfilter is off: "
                f"{_why_off}; interlaced, animated or truncated files: full decode)")
    return (f"region decode: 8/16-bit files inflated by {inflater} down to the crop's bottom and unfiltered "
            "in C left of its right edge; 1/2/4-bit by Pillow down to the bottom "
            "(interlaced, animated or truncated files: full decode)")
