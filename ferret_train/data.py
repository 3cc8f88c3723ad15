"""ForenSynths-layout datasets: ``root/<subset>/[<class>/]0_real|1_fake/*.png|jpg|...``.

Labels come from the nearest ancestor folder named in ``class_to_idx``; images are found
recursively. Training transforms are the original's (RandomCrop with pad_if_needed, horizontal
flip, normalise) in numpy, with a per-sample generator seeded by (seed, epoch, index), so a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from ferret_runtime.errors import ConfigError
from ferret_runtime.preprocess import IMAGE_SUFFIXES, center_crop, load_image, normalize

from .config import AugmentCfg, DataCfg


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


def find_samples(root: str | Path, class_to_idx: dict[str, int]) -> list[Sample]:
    """Every image under root whose path has a class folder; errors name the root and the problem."""
    root = Path(root)
    if not root.exists():
        raise ConfigError(f"{root}: data root does not exist")
    if not root.is_dir():
        raise ConfigError(f"{root}: data root is not a directory")
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ConfigError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    samples = []
    for p in images:
        label = next((class_to_idx[part] for part in reversed(p.relative_to(root).parts[:-1])
                      if part in class_to_idx), None)
        if label is not None:
            samples.append(Sample(p, label))
    if not samples:
        raise ConfigError(f"{root}: found {len(images)} images but none inside a folder named "
                          f"{' or '.join(class_to_idx)} (the ForenSynths layout)")
    return samples


def find_subsets(root: str | Path, class_to_idx: dict[str, int]) -> dict[str, list[Sample]]:
    """Subsets evaluated separately: each child folder of root that holds labelled images, or root itself."""
    root = Path(root)
    samples = find_samples(root, class_to_idx)
    if any(child.name in class_to_idx for child in root.iterdir() if child.is_dir()):
        return {root.name: samples}
    subsets: dict[str, list[Sample]] = {}
    for s in samples:
        subsets.setdefault(s.path.relative_to(root).parts[0], []).append(s)
    return dict(sorted(subsets.items()))


def random_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """torchvision RandomCrop(size, pad_if_needed=True): pads (size - w) on both sides when smaller."""
    h, w = img.shape[:2]
    if w < size:
        img = np.pad(img, ((0, 0), (size - w, size - w), (0, 0)))
    if h < size:
        img = np.pad(img, ((size - h, size - h), (0, 0), (0, 0)))
    h, w = img.shape[:2]
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return img[top : top + size, left : left + size]


def augment(img: np.ndarray, cfg: AugmentCfg, rng: np.random.Generator) -> np.ndarray:
    """Optional robustness augmentations: resize, Gaussian blur, JPEG re-compression."""
    pil = None
    if cfg.resize_prob and rng.random() < cfg.resize_prob:
        pil = Image.fromarray(img)
        s = rng.uniform(*cfg.resize_scale)
        pil = pil.resize((max(8, round(pil.width * s)), max(8, round(pil.height * s))), Image.BILINEAR)
    if cfg.blur_prob and rng.random() < cfg.blur_prob:
        pil = (pil or Image.fromarray(img)).filter(ImageFilter.GaussianBlur(rng.uniform(*cfg.blur_sigma)))
    if cfg.jpeg_prob and rng.random() < cfg.jpeg_prob:
        buf = io.BytesIO()
        (pil or Image.fromarray(img)).save(buf, format="JPEG",
                                           quality=int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)))
        pil = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return np.asarray(pil) if pil is not None else img


class ForenSynthsDataset(torch.utils.data.Dataset):
    """(normalised CHW float32 tensor, float label) pairs; ``train=True`` applies the random transforms."""

    def __init__(self, samples: list[Sample], cfg: DataCfg, train: bool, seed: int = 0):
        self.samples, self.cfg, self.train, self.seed = samples, cfg, train, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        s = self.samples[i]
        img = load_image(s.path)
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            img = augment(img, self.cfg.augment, rng)
            img = random_crop(img, self.cfg.train_crop, rng)
            if self.cfg.hflip and rng.random() < 0.5:
                img = img[:, ::-1]
        elif self.cfg.test_crop is not None:
            img = center_crop(img, self.cfg.test_crop)
        x = normalize(np.ascontiguousarray(img), self.cfg.mean, self.cfg.std)
        return torch.from_numpy(x), torch.tensor(float(s.label)), i
