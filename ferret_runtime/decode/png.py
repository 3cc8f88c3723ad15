"""The rows of a PNG down to a crop's bottom, through Pillow itself: the same pixels as its full decode.

A PNG is one deflate stream of filtered rows, so the rows above the crop must be inflated and unfiltered
anyway, but none below it. The header's height is rewritten to the crop's bottom (with its CRC), and Pillow
decodes that shorter image: its zip decoder stops once it has the rows it was told about. Pillow does the
inflating, the unfiltering, the unpacking and the mode conversion, so every pixel comes from the same code
as in the full decode; the conversion to RGB is per pixel, so it commutes with the crop.

Anything unusual returns None (the caller then does the full decode, with its own errors): interlaced
(Adam7) or animated (APNG) files, a bad header checksum, a chunk stream that does not end in IEND inside the
file (a truncated download: the full decode reports it, the shorter image would not notice it).

One difference remains, by design: deflate data damaged *below* the crop (a flipped bit in a complete file)
is never inflated here, so such a file gives the crop's pixels where the full decode says "broken data
stream". Checking it would mean inflating the whole stream, most of a full decode's cost.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR_END = 8 + 8 + 13 + 4  # signature, IHDR length and type, its 13 bytes, its CRC


def _chunks_ok(data: bytes) -> bool:
    """True when the chunk stream is whole (every chunk inside the file, IEND at the end), with no
    acTL (APNG: Pillow's first frame is then not simply the rows of IDAT)."""
    pos, end, seen_idat = 8, len(data), False
    while pos + 12 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if length > 0x7FFFFFFF or pos + 12 + length > end:
            return False
        if kind == b"IEND":
            return seen_idat
        if kind == b"acTL":
            return False
        seen_idat = seen_idat or kind == b"IDAT"
        pos += 12 + length
    return False


def decode_region(data: bytes, left: int, top: int, width: int, height: int) -> np.ndarray | None:
    """uint8 (height, width, 3) RGB of the box, equal to Pillow's full decode converted to RGB and sliced;
    None when this file is better left to the full decode (see the module's notes)."""
    if len(data) < _IHDR_END or not data.startswith(SIGNATURE) or data[12:16] != b"IHDR" or data[8:12] != b"\0\0\0\r":
        return None
    w, h, _depth, _colour, _compression, _filter, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    if interlace != 0 or zlib.crc32(data[12:29]) != struct.unpack_from(">I", data, 29)[0]:
        return None
    bottom = top + height
    if not (0 <= left and 0 <= top and width > 0 and height > 0 and left + width <= w and bottom <= h):
        return None
    if not _chunks_ok(data):
        return None
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


def status() -> str:
    return ("region decode: rows down to the crop's bottom, by Pillow itself "
            "(interlaced, animated or truncated files: full decode)")
