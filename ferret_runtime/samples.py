"""Deterministic sample images for demos, export verification and tests (no download).

"real": smooth random textures with 1/f-like spectra plus sensor-like noise; "fake": the same
scenes squeezed to a latent-sized grid and upsampled (nearest, bilinear or pixel-repeat), the
periodic up-sampling trace that generator decoders leave and that the LPD residual exposes.
These are a proxy for demos and tests, not a measure of real-world accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def natural_image(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """An RGB uint8 image with a 1/f amplitude spectrum and mild per-pixel noise."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / size) ** 1.1
    chans = []
    for _ in range(3):
        phase = rng.uniform(0, 2 * np.pi, amp.shape)
        chans.append(np.fft.irfft2(amp * np.exp(1j * phase), s=(size, size)))
    img = np.stack(chans, -1)
    mix = rng.normal(0.6, 0.2, (3, 3)) + np.eye(3)  # correlated channels, as in photographs
    img = img @ mix
    img = (img - img.mean()) / (img.std() + 1e-8) * 50 + 120
    img += rng.normal(0, 2.5, img.shape)  # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


def synthesize(img: np.ndarray, method: str, factor: int = 4) -> np.ndarray:
    """Re-synthesise an image through a latent grid 'factor' times smaller and an upsampler."""
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((w // factor, h // factor), Image.BILINEAR)
    resample = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[method]
    return np.asarray(small.resize((w, h), resample))


def write_samples(out_dir: str | Path, n: int = 3, size: int = 256, seed: int = 0) -> list[Path]:
    """Write n real and 2n fake PNGs named ``real_*``/``fake_*``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img = natural_image(rng, size)
        items = [(f"real_{i}.png", img), (f"fake_{i}_nearest.png", synthesize(img, "nearest")),
                 (f"fake_{i}_bilinear.png", synthesize(img, "bilinear"))]
        for name, arr in items:
            Image.fromarray(arr).save(out / name)
            paths.append(out / name)
    return paths
