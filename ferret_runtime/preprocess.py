"""The original FerretNet test preprocessing in numpy and Pillow, defined once for every caller.

Open with Pillow, keep pixels as stored (no EXIF rotation, as the original), convert to RGB,
optionally centre-crop with torchvision's rounding (zero padding when the image is smaller),
scale to [0, 1] and normalise with the CLIP mean/std the original uses.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ConfigError, ImageError
from .lpd_spec import LPD_SPECS, median3x3_centre, median9

MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


@dataclass(frozen=True)
class Preprocess:
    """Preprocessing carried by checkpoints and exported models; ``crop=None`` keeps full size."""

    crop: int | None = 256
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD
    layout: str = "NCHW"
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"Received preprocessing keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
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


def load_image(source: ImageInput, name: str | None = None) -> np.ndarray:
    """Decode one image to uint8 HWC RGB; ImageError names the source and the problem."""
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__)
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise ImageError(
                f"{label}: received array of dtype {source.dtype} and shape {source.shape}; "
                "expected uint8 of shape (H, W, 3), RGB"
            )
        return np.ascontiguousarray(source)
    try:
        if isinstance(source, Image.Image):
            img = source
        elif isinstance(source, bytes):
            img = Image.open(io.BytesIO(source))
        else:
            img = Image.open(Path(source))
        with img:
            rgb = img.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{label}: is a directory, expected an image file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{label}: cannot decode image ({e})") from None


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``CenterCrop(size)`` on HWC uint8: zero padding when smaller, then crop.

    Padding splits as torchvision does (the extra pixel goes right/bottom); the crop offset is
    ``int(round((H - size) / 2))``, Python's round-half-to-even, as torchvision.
    """
    h, w = img.shape[:2]
    if h < size or w < size:
        top, left = max(size - h, 0) // 2, max(size - w, 0) // 2
        bottom, right = max(size - h, 0) - top, max(size - w, 0) - left
        img = np.pad(img, ((top, bottom), (left, right), (0, 0)), mode="constant", constant_values=0)
        h, w = img.shape[:2]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img[top : top + size, left : left + size]


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
    """Crop (if configured) one decoded uint8 HWC image; normalisation happens per batch."""
    return center_crop(img, pre.crop) if pre.crop is not None else img


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
