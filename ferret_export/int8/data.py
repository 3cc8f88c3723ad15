"""The images INT8 is calibrated and judged on: a seeded draw from the calibration folders, read
through the runtime's preprocessing, and the fp32-vs-int8 comparison on them (ONNX Runtime, CPU)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ferret_runtime.errors import ConfigError
from ferret_runtime.fileio import sha256
from ferret_runtime.preprocess import Preprocess, find_images, load_image, normalize, prepare


@dataclass
class Int8Comparison:
    """FP32 vs INT8 logits on the same preprocessed images."""

    n: int
    max_abs: float
    mean_abs: float
    agreement: float  # fraction of images with the same label at the models' threshold
    fp32_logits: np.ndarray
    int8_logits: np.ndarray

    def __str__(self) -> str:
        return (f"{'int8 vs fp32':<28} images {self.n:<6} logit max abs err {self.max_abs:.3e}  "
                f"mean abs err {self.mean_abs:.3e}  label agreement {100 * self.agreement:.2f}%")


def select_images(calib_images: Sequence[str | Path], n_images: int, seed: int = 0) -> list[Path]:
    """Expand files and folders, then take ``n_images`` of them, spread over the whole list.

    The choice is seeded, not the first N: a ForenSynths folder lists every real image before the
    fakes, and calibrating on one class alone would miss the other's activation ranges.
    """
    if n_images < 1:
        raise ConfigError(f"Received n_images {n_images}; expected >= 1")
    if isinstance(calib_images, (str, Path)):
        calib_images = [calib_images]
    if not calib_images:
        raise ConfigError("Received no calibration paths; expected image files or folders of images")
    for p in map(Path, calib_images):
        if not p.exists():
            raise ConfigError(f"{p}: received a calibration path that does not exist; "
                              "expected an image or a folder of images")
    images = find_images(list(calib_images))
    if not images:
        raise ConfigError(f"Received calibration data {[str(p) for p in calib_images]} without images; expected "
                          "at least one image file (.png, .jpg, ...)")
    if len(images) <= n_images:
        return images
    pick = np.random.default_rng(seed).choice(len(images), n_images, replace=False)
    return [images[i] for i in sorted(pick)]


def images_digest(images: Sequence[Path]) -> str:
    """sha256 over (file name, content sha256) in order: names the calibration set wherever it lives."""
    h = hashlib.sha256()
    for p in images:
        h.update(f"{Path(p).name}\0{sha256(p)}\n".encode())
    return h.hexdigest()



def graph_input(proto: onnx.ModelProto) -> tuple[str, int | None]:
    """(input name, fixed batch size or None when dynamic)."""
    inp = proto.graph.input[0]
    dim = inp.type.tensor_type.shape.dim[0]
    return inp.name, dim.dim_value if dim.HasField("dim_value") else None


def image_batches(images: Sequence[Path], pre: Preprocess, batch_size: int) -> Iterator[tuple[list[Path], np.ndarray]]:
    """(paths, uint8 NHWC batch) prepared exactly as the runtime does (``ferret_runtime.preprocess``).

    Consecutive images of one size share a batch; with ``crop=None`` (full-size models) sizes differ
    and a batch closes early. :func:`model_input` turns a batch into what the graph takes.
    """
    paths: list[Path] = []
    arrays: list[np.ndarray] = []
    for p in images:
        img = prepare(load_image(p), pre)
        if arrays and (len(arrays) == batch_size or img.shape != arrays[0].shape):
            yield paths, np.stack(arrays)
            paths, arrays = [], []
        paths.append(Path(p))
        arrays.append(img)
    if arrays:
        yield paths, np.stack(arrays)


@dataclass(frozen=True)
class DecodedImages:
    """Images drawn and decoded once, for calibration and then for verification: ``batches`` are the
    uint8 NHWC batches :func:`image_batches` made of ``paths`` with ``pre`` and ``batch_size``."""

    paths: tuple[Path, ...]
    pre: Preprocess
    batch_size: int
    batches: tuple[np.ndarray, ...]

    def batches_for(self, pre: Preprocess, batch_size: int) -> Iterator[np.ndarray]:
        """These batches when prepared the same way, else the images decoded again for ``pre``/``batch_size``."""
        if pre == self.pre and batch_size == self.batch_size:
            return iter(self.batches)
        return (u8 for _, u8 in image_batches(self.paths, pre, batch_size))


def decode_images(paths: Sequence[Path], pre: Preprocess, batch_size: int) -> DecodedImages:
    """Decode and prepare ``paths`` once (uint8: 192 KB per 256x256 image)."""
    return DecodedImages(tuple(map(Path, paths)), pre, batch_size,
                         tuple(u8 for _, u8 in image_batches(paths, pre, batch_size)))


def model_input(u8: np.ndarray, pre: Preprocess) -> np.ndarray:
    """uint8 NHWC as is for graphs that contain the preprocessing, else normalised float32 NCHW."""
    return u8 if pre.dtype == "uint8" else normalize(u8, pre.mean, pre.std)



class Normalized(Sequence):
    """The model inputs of uint8 batches, computed when read (float32 would take 4x the memory)."""

    def __init__(self, raw: list[np.ndarray], pre: Preprocess) -> None:
        self.raw, self.pre = raw, pre

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [model_input(u8, self.pre) for u8 in self.raw[i]]
        return model_input(self.raw[i], self.pre)



def verify_int8(fp32_onnx: str | Path, int8_onnx: str | Path, images: Sequence[str | Path] | DecodedImages, *,
                batch_size: int = 16, log: Callable[[str], None] = print) -> Int8Comparison:
    """Run both models in ONNX Runtime (CPU) on the same preprocessed images; compare logits and labels.
    ``images``: paths, or the :class:`DecodedImages` calibration already decoded (not decoded again)."""
    from ferret_runtime.backends.onnxruntime import OrtBackend

    decoded = images if isinstance(images, DecodedImages) else None
    paths = list(decoded.paths) if decoded else find_images(list(images))
    if not paths:
        raise ConfigError(f"Received images {[str(p) for p in images]}; expected at least one image")
    with OrtBackend(fp32_onnx, device="cpu") as ref, OrtBackend(int8_onnx, device="cpu") as q:
        pre = ref.info.preprocess
        if q.info.preprocess != pre:
            raise ConfigError(f"{int8_onnx}: received preprocessing {q.info.preprocess}; "
                              f"expected the fp32 model's {pre}")
        fixed = ref.session.get_inputs()[0].shape[0]  # an int for graphs exported without --dynamic
        bs = fixed if isinstance(fixed, int) else 1 if pre.crop is None else batch_size
        got, want = [], []
        batches = decoded.batches_for(pre, bs) if decoded else (u8 for _, u8 in image_batches(paths, pre, bs))
        for u8 in batches:
            x = model_input(u8, pre)
            want.append(ref.run(x))
            got.append(q.run(x))
        threshold = ref.info.threshold
    a, b = np.concatenate(want), np.concatenate(got)
    diff = np.abs(a.astype(np.float64) - b)
    # labels as the Detector gives them: sigmoid(logit) > threshold
    la, lb = 1 / (1 + np.exp(-a.astype(np.float64))) > threshold, 1 / (1 + np.exp(-b.astype(np.float64))) > threshold
    c = Int8Comparison(len(a), float(diff.max()), float(diff.mean()), float(np.mean(la == lb)), a, b)
    log(f"[verify] {c}")
    return c
