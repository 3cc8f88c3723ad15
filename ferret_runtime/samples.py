"""Deterministic images for demos, export verification and tests, made offline from numpy alone.

*Real*: procedural scenes with natural-image statistics (1/f^a amplitude spectrum, correlated
colour channels) plus sensor-like noise. *Fake*: a scene squeezed to a latent grid 2 or 4 times
smaller and decoded back the way generator decoders up-sample: nearest, bilinear, a transposed
convolution (checkerboard-prone), or pixel shuffle (an ESPCN-style sub-pixel convolution).

This is a proxy for demos and tests, not a benchmark of real-world accuracy: real photographs and
real generators differ in far more ways than noise and up-sampling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DECODERS = ("nearest", "bilinear", "tconv", "pixelshuffle")
HELD_OUT = "pixelshuffle"  # never seen in training: the test of generalisation
PIXELSHUFFLE_DEVIATION = 0.02  # std of the sub-pixel decoder's deviation from bilinear weights


def natural_image(rng: np.random.Generator, size: int = 256, noise: float | None = None) -> np.ndarray:
    """An RGB uint8 scene with a 1/f^a amplitude spectrum and per-pixel sensor noise."""
    a = rng.uniform(0.9, 1.5)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / size) ** a
    chans = [np.fft.irfft2(amp * np.exp(1j * rng.uniform(0, 2 * np.pi, amp.shape)), s=(size, size)) for _ in range(3)]
    img = np.stack(chans, -1) @ (rng.normal(0.6, 0.2, (3, 3)) + np.eye(3))  # correlated channels
    img = (img - img.mean()) / (img.std() + 1e-8) * rng.uniform(30, 60) + rng.uniform(90, 160)
    img += rng.normal(0, rng.uniform(1.5, 4.0) if noise is None else noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _tconv(latent: np.ndarray, f: int) -> np.ndarray:
    """Stride-f transposed convolution: zero insertion, then a fixed 2f x 2f kernel (per channel)."""
    h, w, c = latent.shape
    up = np.zeros((h * f, w * f, c), np.float64)
    up[::f, ::f] = latent
    k1 = np.concatenate([np.arange(1, f + 1), np.arange(f, 0, -1)]).astype(np.float64)  # tent: bilinear-like
    k1 += np.linspace(-0.35, 0.35, 2 * f)  # an asymmetric "learned" perturbation: uneven overlap
    kernel = np.outer(k1, k1)
    kernel *= f * f / kernel.sum()
    out = np.zeros_like(up)
    pad = np.pad(up, ((f, f), (f, f), (0, 0)))
    for i in range(2 * f):
        for j in range(2 * f):
            out += kernel[i, j] * pad[i : i + h * f, j : j + w * f]
    return out


def _bilinear_taps(f: int) -> np.ndarray:
    """(f, 3): the weights of latent pixels -1, 0, +1 for each of the f sub-pixel output positions."""
    taps = np.zeros((f, 3))
    for s in range(f):
        pos = (s + 0.5) / f - 0.5  # output sub-pixel centre in latent coordinates, in [-0.5, 0.5)
        if pos < 0:
            taps[s, 0], taps[s, 1] = -pos, 1 + pos
        else:
            taps[s, 1], taps[s, 2] = 1 - pos, pos
    return taps


def _pixelshuffle(latent: np.ndarray, f: int, deviation: float = PIXELSHUFFLE_DEVIATION) -> np.ndarray:
    """ESPCN-style sub-pixel convolution: a 3x3 conv from c to f*f*c channels, then depth-to-space.

    The weights are those that reproduce bilinear up-sampling plus fixed "learned" deviations of
    standard deviation ``deviation`` that sum to zero per output (a trained decoder keeps flat
    regions flat), so the artefact grows with local contrast, not with brightness.
    """
    h, w, c = latent.shape
    rng = np.random.default_rng(1234)  # the decoder's fixed weights
    t = _bilinear_taps(f)
    # kernel[a, b, cout, ky, kx, cin] for output sub-pixel (a, b)
    kernel = np.einsum("ai,bj,oc->aboijc", t, t, np.eye(c))
    dev = rng.normal(0, deviation, kernel.shape)
    kernel += dev - dev.mean(axis=(3, 4, 5), keepdims=True)
    pad = np.pad(latent, ((1, 1), (1, 1), (0, 0)), mode="edge")
    out = np.zeros((h, w, f, f, c))
    for ky in range(3):
        for kx in range(3):
            out += np.einsum("hwi,aboi->hwabo", pad[ky : ky + h, kx : kx + w], kernel[:, :, :, ky, kx, :])
    return out.transpose(0, 2, 1, 3, 4).reshape(h * f, w * f, c)


def synthesize(img: np.ndarray, method: str, factor: int = 4) -> np.ndarray:
    """Re-synthesise a scene through a latent grid ``factor`` times smaller and one decoder."""
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((w // factor, h // factor), Image.BOX)
    if method in ("nearest", "bilinear", "bicubic"):
        resample = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[method]
        return np.asarray(small.resize((w, h), resample))
    latent = np.asarray(small, np.float64)
    if method == "tconv":
        out = _tconv(latent, factor)
    elif method == "pixelshuffle":
        out = _pixelshuffle(latent, factor)
    else:
        raise ValueError(f"Received decoder {method!r}; expected one of {DECODERS}")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


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


def _write_split(root: Path, rng: np.random.Generator, n_real: int, decoders: tuple[str, ...], n_fake: int,
                 size: int, progress=None) -> None:
    (root / "0_real").mkdir(parents=True, exist_ok=True)
    (root / "1_fake").mkdir(parents=True, exist_ok=True)
    for i in range(n_real):
        Image.fromarray(natural_image(rng, size)).save(root / "0_real" / f"{i:05d}.png")
        progress and progress()
    for i in range(n_fake):
        dec = decoders[i % len(decoders)]
        fake = synthesize(natural_image(rng, size), dec, factor=int(rng.choice([2, 4])))
        Image.fromarray(fake).save(root / "1_fake" / f"{i:05d}_{dec}.png")
        progress and progress()


def write_proxy_dataset(out_dir: str | Path, *, size: int = 96, n_train: int = 300, n_val: int = 60,
                        n_test: int = 40, seed: int = 0, progress=None) -> dict[str, Path]:
    """The proxy dataset in the ForenSynths layout.

    ``train`` and ``val``: ``0_real`` + ``1_fake`` from the seen decoders (nearest, bilinear,
    tconv); ``test/<decoder>/0_real|1_fake`` for every decoder, ``pixelshuffle`` held out.
    n_* count the images per class. Each split has its own seed, so splits never share a scene.
    """
    out = Path(out_dir)
    seen = tuple(d for d in DECODERS if d != HELD_OUT)
    ss = np.random.SeedSequence(seed).spawn(2 + len(DECODERS))
    _write_split(out / "train", np.random.default_rng(ss[0]), n_train, seen, n_train, size, progress)
    _write_split(out / "val", np.random.default_rng(ss[1]), n_val, seen, n_val, size, progress)
    for dec, s in zip(DECODERS, ss[2:]):
        _write_split(out / "test" / dec, np.random.default_rng(s), n_test, (dec,), n_test, size, progress)
    (out / "README.txt").write_text(
        "FerretNet proxy dataset (generated by 'ferret data proxy'; a demo/test proxy, not a benchmark).\n"
        f"size {size}, seed {seed}. train/val: real vs {', '.join(seen)}; test/<decoder>: each decoder, "
        f"'{HELD_OUT}' never seen in training.\n")
    return {"train": out / "train", "val": out / "val", "test": out / "test"}
