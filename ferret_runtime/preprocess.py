"""The original FerretNet test preprocessing in numpy and Pillow, defined once for every caller.

Open with Pillow, keep pixels as stored (no EXIF rotation, as the original), convert to RGB,
optionally centre-crop with torchvision's rounding (zero padding when the image is smaller),
scale to [0, 1] and normalise with the CLIP mean/std the original uses.

Decoding is hardened against hostile input: only the documented formats are opened, the size is
checked from the header before any pixel is decoded, and every decoder failure becomes that image's
ImageError, so one bad image never takes down a batch.
"""

from __future__ import annotations

import io
import math
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ConfigError, FerretError, ImageError
from .lpd_spec import LPD_SPECS, median3x3_centre, median9

MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# Pillow's decoders for the suffixes above; every other plugin (DDS, PSD, ICNS, ...) is attack surface we
# do not need. Camera MPO files still open: Pillow's JPEG factory returns them from the JPEG plugin.
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "WEBP", "TIFF", "GIF")
# 40 Mpx decodes to 120 MB of RGB (about 280 MB peak inside Pillow); a 50 MP camera needs a higher limit
DEFAULT_MAX_PIXELS: int = 40_000_000
LAYOUTS: tuple[str, ...] = ("NCHW", "NHWC")
DTYPES: tuple[str, ...] = ("float32", "float16", "uint8")

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _triple(key: str, value: object) -> tuple[float, float, float]:
    """Three finite numbers as floats, else ConfigError naming the key."""
    try:
        ok = len(value) == 3 and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool)  # type: ignore[arg-type]
                                     and math.isfinite(v) for v in value)  # type: ignore[union-attr]
    except TypeError:
        ok = False
    if not ok:
        raise ConfigError(f"Received preprocess {key} {value!r}; expected 3 finite numbers, one per RGB channel")
    return tuple(float(v) for v in value)  # type: ignore[return-value, union-attr]


@dataclass(frozen=True)
class Preprocess:
    """Preprocessing carried by checkpoints and exported models; ``crop=None`` keeps full size."""

    crop: int | None = 256
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD
    layout: str = "NCHW"
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # a model file's preprocessing is input like any other: a crop of -3 or a std of 0 would
        # otherwise surface as an odd numpy error or as NaN logits for every image
        if self.crop is not None and not (_is_int(self.crop) and self.crop > 0):
            raise ConfigError(f"Received preprocess crop {self.crop!r}; expected a positive integer or None")
        mean, std = _triple("mean", self.mean), _triple("std", self.std)
        if min(std) <= 0:
            raise ConfigError(f"Received preprocess std {std}; "
                              "expected 3 values > 0 (the normalisation divides by them)")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"Received preprocess layout {self.layout!r}; expected one of {', '.join(LAYOUTS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"Received preprocess dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"Received preprocess extra {self.extra!r}; expected a dict")
        # frozen: normalise through object.__setattr__ so equal settings compare equal (lists, numpy ints)
        object.__setattr__(self, "crop", None if self.crop is None else int(self.crop))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        if not isinstance(d, dict):
            raise ConfigError(f"Received preprocessing {type(d).__name__} {d!r:.80}; expected a dict")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"Received preprocessing keys {sorted(unknown, key=str)}; "
                              f"expected a subset of {sorted(known)}")
        return cls(**d)


def parse_crop(value: str | int | None) -> int | None:
    """``'256'`` -> 256, ``'none'`` -> None (full size)."""
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    try:
        crop = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"Received crop {value!r}; expected a positive integer or 'none'") from None
    if crop <= 0:
        raise ConfigError(f"Received crop {crop}; expected a positive integer or 'none'")
    return crop


def check_max_pixels(value: int | None, what: str = "max_pixels") -> int | None:
    """A positive pixel count, or None for no limit of ours (Pillow's 178.9 Mpx bomb error remains)."""
    if value is not None and not (_is_int(value) and value > 0):
        raise ConfigError(f"Received {what} {value!r}; expected a positive number of pixels or None")
    return None if value is None else int(value)


def _mpx(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} Mpx" if pixels >= 100_000 else f"{pixels} pixels"


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))


def _check_regular(mode: int, label: str) -> None:
    """ImageError for anything but a regular file: reading a FIFO, socket or device can block forever."""
    if stat.S_ISDIR(mode):
        raise ImageError(f"{label}: is a directory, expected an image file")
    for test, kind in _FILE_KINDS:
        if test(mode):
            raise ImageError(f"{label}: is {kind}, not a regular file")
    if not stat.S_ISREG(mode):
        raise ImageError(f"{label}: not a regular file")


def check_regular_file(path: str | os.PathLike, label: str) -> None:
    """ImageError unless ``path`` is a regular file (missing, a folder, a FIFO, a socket, a device)."""
    try:
        _check_regular(os.stat(path).st_mode, label)
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file") from None
    except OSError as e:
        raise ImageError(f"{label}: cannot read file ({e.strerror or e})") from None


def open_image_file(path: str | os.PathLike, label: str) -> IO[bytes]:
    """Open a regular file for reading; anything else (FIFO, socket, device, folder) is an ImageError."""
    try:
        _check_regular(os.stat(path).st_mode, label)  # before open(): opening a FIFO waits for a writer
        # O_NONBLOCK: should the path turn into a FIFO after the stat, open() still returns at once and
        # the fstat below refuses it; it has no effect on reading a regular file
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file") from None
    except OSError as e:
        raise ImageError(f"{label}: cannot read file ({e.strerror or e})") from None
    try:
        _check_regular(os.fstat(fd).st_mode, label)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def identify_image(fp: IO[bytes], label: str) -> Image.Image:
    """Pillow's lazy open (header only), restricted to IMAGE_FORMATS; call inside ``image_errors(label)``."""
    try:
        return Image.open(fp, formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        fp.seek(0)
        other = _other_format(fp.read(16))
    expected = f"{', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]}"
    if other is not None:
        raise ImageError(f"{label}: not an image of a supported format (received {other}; expected {expected})")
    raise ImageError(f"{label}: not an image Pillow can identify (expected {expected})")


def _other_format(prefix: bytes) -> str | None:
    """The unsupported format a file's first bytes announce, by Pillow's cheap prefix tests only
    (no other plugin parses the file), for a clearer error; None when none claims it."""
    Image.init()
    for fmt, (_, accept) in Image.OPEN.items():
        if fmt in IMAGE_FORMATS or accept is None:
            continue  # formats without a prefix test would claim anything
        try:
            if accept(prefix) is True:  # a str is Pillow's "maybe, but its library is missing"
                return fmt
        except Exception:
            continue
    return None


def check_image_size(img: Image.Image, label: str, max_pixels: int | None) -> None:
    """ImageError when the header's size is over ``max_pixels`` or empty, before any pixel is decoded."""
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        # before load(): a 20 KB PNG can declare 13000x13000 and decode to 676 MB inside Pillow
        raise ImageError(f"{label}: received an image of {w}x{h} = {_mpx(w * h)}; "
                         f"expected at most {_mpx(max_pixels)} (--max-pixels)")
    if w == 0 or h == 0:
        raise ImageError(f"{label}: received an empty image of {w}x{h}; expected at least 1x1")


def to_rgb(img: Image.Image, label: str, max_pixels: int | None) -> np.ndarray:
    """Check the size from the header, then decode the first frame to a read-only uint8 HWC RGB array."""
    check_image_size(img, label, max_pixels)
    w, h = img.size
    # convert() of an RGB image would copy it for nothing; np.asarray copies once, out of Pillow's memory
    # (the result is read-only: a second copy to make it writable would double the peak)
    arr = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    if arr.dtype != np.uint8 or arr.shape != (h, w, 3):  # a decoder that changed the size while loading
        raise ImageError(f"{label}: decoded to {arr.dtype} {arr.shape}; expected uint8 ({h}, {w}, 3) from the header")
    return arr


def image_label(source: ImageInput, name: str | None = None) -> str:
    """How errors name a source: ``name``, else the path, else the input's type."""
    return name or (str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__)


@contextmanager
def image_errors(label: str) -> Iterator[None]:
    """Turn whatever a decoder raises into one ImageError naming ``label`` (FerretErrors pass as they are)."""
    try:
        yield
    except FerretError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning when warnings are errors
        raise ImageError(f"{label}: refused as a possible decompression bomb ({e})") from None
    except MemoryError:
        raise ImageError(f"{label}: out of memory while decoding (lower --max-pixels to refuse such images)") from None
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's usual ways to say "corrupt"
        raise ImageError(f"{label}: cannot decode image ({e})") from None
    except Exception as e:
        # any other decoder failure (NotImplementedError, struct.error, ...) is still this image's
        # problem alone: one poisoned image must not fail a batch or end the process
        raise ImageError(f"{label}: cannot decode image ({type(e).__name__}: {e})") from e


def load_image(source: ImageInput, name: str | None = None, *,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one image to uint8 HWC RGB (the first frame; read-only unless given as an array).

    ImageError names the source and the problem, whatever the decoder raised. ``max_pixels`` refuses
    larger images from their header, before decoding; None leaves only Pillow's own bomb limit.
    """
    label = image_label(source, name)
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise ImageError(
                f"{label}: received array of dtype {source.dtype} and shape {source.shape}; "
                "expected uint8 of shape (H, W, 3), RGB"
            )
        return np.ascontiguousarray(source)
    with image_errors(label):
        if isinstance(source, Image.Image):
            return to_rgb(source, label, max_pixels)  # the caller's image: theirs to close
        fp = io.BytesIO(source) if isinstance(source, bytes) else open_image_file(source, label)
        with fp, identify_image(fp, label) as img:
            return to_rgb(img, label, max_pixels)
    raise AssertionError("unreachable")  # image_errors re-raises; mypy cannot see it


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``CenterCrop(size)`` on HWC uint8: zero padding when smaller, then crop.

    Padding splits as torchvision does (the extra pixel goes right/bottom); the crop offset is
    ``int(round((H - size) / 2))``, Python's round-half-to-even, as torchvision. Returns a new array.
    """
    h, w = img.shape[:2]
    if h < size or w < size:
        top, left = max(size - h, 0) // 2, max(size - w, 0) // 2
        bottom, right = max(size - h, 0) - top, max(size - w, 0) - left
        img = np.pad(img, ((top, bottom), (left, right), (0, 0)), mode="constant", constant_values=0)
        h, w = img.shape[:2]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    # a compact copy: a view would keep the whole decoded image (100+ MB) alive while the batch waits
    return img[top : top + size, left : left + size].copy()


def normalize(batch: np.ndarray, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD,
              out: np.ndarray | None = None) -> np.ndarray:
    """uint8 NHWC (or HWC) -> float32 NCHW (or CHW), as ToTensor + Normalize, in float32 throughout.

    ``out`` (float32, the output's shape) is filled in place: a pipeline reuses one buffer per batch
    shape instead of allocating. The arithmetic is the same either way: /255, -mean, /std.
    """
    axes = (0, 3, 1, 2) if batch.ndim == 4 else (2, 0, 1)
    src = batch.transpose(axes)
    if out is None:
        out = np.empty(src.shape, np.float32)
    elif out.shape != src.shape or out.dtype != np.float32:
        raise ValueError(f"Received out {out.dtype} {out.shape}; expected float32 {src.shape}")
    cshape = (3, 1, 1)
    np.divide(src, np.float32(255.0), out=out, dtype=np.float32)
    out -= np.asarray(mean, dtype=np.float32).reshape(cshape)
    out /= np.asarray(std, dtype=np.float32).reshape(cshape)
    return out


def median_residual(x: np.ndarray) -> np.ndarray:
    """``x - lpd(x)`` for the paper's LPD (masked median, 3x3, zero padding) on float32 NCHW, in numpy.

    What a graph exported with ``--lpd external`` expects as input, computed on the CPU. It runs
    lpd_spec's median-of-9 network with numpy's min/max, which are exact: the result equals the
    CUDA kernel, the PyTorch LPD and the exported graph's LPD bit for bit.
    """
    if x.ndim != 4 or x.dtype != np.float32:
        raise ValueError(f"Received x {x.dtype} {x.shape}; expected float32 (N, C, H, W)")
    h, w = x.shape[2:]
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    views = [padded[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)]
    views[4] = median3x3_centre(LPD_SPECS["median"], views[4])
    return x - median9(views, np.minimum, np.maximum)


def prepare(img: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Crop (if configured) one decoded uint8 HWC image into a compact array; normalisation happens per batch."""
    return center_crop(img, pre.crop) if pre.crop is not None else np.ascontiguousarray(img)


def find_images(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively, sorted) into image paths; a folder's non-images are skipped.

    A path given explicitly is always returned, even when missing or with an unknown suffix, so that
    it is reported as an error for that path rather than silently dropped.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out
