"""Peer detectors for ``ferret bench``: the rows of FerretNet's efficiency table (NeurIPS 2025).

Architecture re-implementations with random weights, written from the papers and the authors'
public code, so that parameter counts, FLOPs and speed can be measured on one machine. They are not
the authors' trained detectors and their state-dict keys are not meant to load the authors' weights.
Every model takes a normalised NCHW float batch and returns one logit per image, shape (N, 1).

NPR, FreqNet and SAFE share one backbone: ResNet-50 cut after ``layer2`` (3 + 4 bottlenecks, 512
channels, a 512 -> 1 head). NPR and SAFE keep a 3x3 stem (1.44M parameters) and differ only in the
image transform they feed it; FreqNet swaps the stem for frequency-domain stages (1.85M).

FLOP convention (``FLOP_CONVENTION``)
-------------------------------------
``count_flops`` is ``torch.utils.flop_counter.FlopCounterMode``'s total for one 1x3xHxW forward. It
counts a multiply-add as 2 FLOPs and counts only matrix products: convolutions (``aten.convolution``,
functional ``F.conv2d`` included) and linear layers (``aten.addmm``). It does not count BatchNorm,
ReLU, max/average pooling, residual additions, nearest/bilinear interpolation (NPR's and SAFE's
resampling), FFTs (FreqNet's ``torch.fft`` calls) or element-wise masks.

The paper's "FLOPs (G)" are multiply-accumulates (MACs) as reported by ``thop.profile`` (the FerretNet
repository lists ``thop`` in its requirements). Checked on FerretNet-B, whose conv stack we know
exactly: FlopCounterMode gives 4.676 G at 256x256, i.e. 2.338 G MACs, against the paper's 2.38 G;
4.68 G cannot be the paper's unit. So paper G ~= count_flops / ``FLOPS_PER_MAC`` / 1e9, and what is
left is what thop counts on top of conv/linear MACs: 4 ops per BatchNorm element (an affine BatchNorm
is 2 x 2 x numel in thop 0.1.1) and the global average pool. thop 0.1.1 run on our models reproduces
every paper value to the precision shown: 2.381 (FerretNet-B), 2.287 (NPR), 2.287 (SAFE), 2.577
(FreqNet, with the stage convolutions left out as described below).

Measured at 256x256, count_flops / 2 in G, against the paper (G):
  ferretnet-b  2.338 vs 2.38  (-1.8%)  BatchNorm not counted, see above
  npr          2.243 vs 2.29  (-2.1%)  likewise
  safe         2.244 vs 2.29  (-2.0%)  likewise; includes 0.9 M MACs of bior1.3 DWT filtering
  freqnet      2.965 vs 2.58 (+14.9%)  2.550 (-1.1%) without the 415.2 M MACs below
FreqNet's gap is exact and comes from the counting tool, not from the architecture: in the authors'
code its four 1x1 stage convolutions are functional ``F.conv2d`` calls on bare ``nn.Parameter``
weights, and thop only sees ``nn.Module`` layers, so the paper's 2.58 G leaves them out. They cost
3*64*256^2 + 64*64*128^2 + 256*256*64^2 + 256*256*32^2 = 415,236,096 MACs at 256x256
(``PAPER_SKIPPED_MACS``), which FlopCounterMode counts. We keep the convolutions (they are the
architecture) and report the difference rather than hide it.
"""

from __future__ import annotations

import math
from itertools import chain
from typing import Any, Final

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ferret_runtime.errors import ConfigError

from ..layers.resnet import init_resnet, resnet_stage
from ..registry import register_model

FLOPS_PER_MAC: Final[int] = 2
FLOP_CONVENTION: Final[str] = (
    "The paper's FLOPs are MACs counted by thop: paper_G ~= count_flops(model, 256) / FLOPS_PER_MAC / 1e9. "
    "FlopCounterMode counts only convolutions and linear layers (2 FLOPs per multiply-add); thop also adds "
    "4 ops per BatchNorm element, which leaves our counts 1-2% under the paper (FerretNet-B 2.338 vs 2.38). "
    "For FreqNet subtract PAPER_SKIPPED_MACS first: thop missed its functional 1x1 convolutions."
)

# FerretNet's efficiency table at 256x256: parameters in millions, FLOPs in G (MACs, see above).
PAPER_TABLE: Final[dict[str, dict[str, float]]] = {
    "npr": {"params_m": 1.44, "gflops": 2.29},
    "freqnet": {"params_m": 1.85, "gflops": 2.58},
    "safe": {"params_m": 1.44, "gflops": 2.29},
    "ferretnet-b": {"params_m": 1.06, "gflops": 2.38},
}

# Multiply-adds at 256x256 that count_flops includes and the paper's thop count did not see: FreqNet's
# four stage 1x1 convolutions, functional F.conv2d calls in the authors' code (module docstring).
PAPER_SKIPPED_MACS: Final[dict[str, int]] = {
    "freqnet": 3 * 64 * 256**2 + 64 * 64 * 128**2 + 256 * 256 * 64**2 + 256 * 256 * 32**2,
}

# Options the trainer passes to every model (they configure FerretNet's LPD); peers ignore them.
_FERRET_ONLY_OPTIONS: Final[frozenset[str]] = frozenset({"lpd_func", "window_size", "lpd_impl"})


def check_peer_options(name: str, kwargs: dict[str, Any]) -> None:
    """Peers take no options; FerretNet's own (LPD, window) are ignored, anything else is refused."""
    unknown = sorted(set(kwargs) - _FERRET_ONLY_OPTIONS)
    if unknown:
        raise ConfigError(
            f"Received option(s) {', '.join(map(repr, unknown))} for model {name!r}; expected none "
            f"(peer detectors take no options; {', '.join(sorted(_FERRET_ONLY_OPTIONS))} are ignored)"
        )


def count_flops(model: nn.Module, size: int = 256) -> int:
    """FlopCounterMode's total (2 per multiply-add) for one 1x3x``size``x``size`` forward in eval mode.

    The forward runs on the meta device (shapes only: no arithmetic, no memory), which FlopCounterMode
    counts exactly as a real forward; a model with value-dependent control flow falls back to one.
    """
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        try:
            tensors = chain(model.named_parameters(), model.named_buffers())
            state = {k: torch.empty_like(v, device="meta") for k, v in tensors}
            x = torch.empty(1, 3, size, size, device="meta", dtype=p.dtype)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                torch.func.functional_call(model, state, (x,))
        except (NotImplementedError, RuntimeError):  # an op without a meta kernel, or .item() on meta
            x = torch.randn(1, 3, size, size, device=p.device, dtype=p.dtype)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


class TruncatedResNet50(nn.Module):
    """ResNet-50 through ``layer2`` with a 3x3 stride-2 stem: the backbone NPR and SAFE share.

    stem conv 3x3/2 (3 -> 64) -> BN -> ReLU -> maxpool 3x3/2 -> layer1 (3 bottlenecks, 256 ch)
    -> layer2 (4 bottlenecks, stride 2, 512 ch) -> global average pool -> linear 512 -> 1.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.layer1 = resnet_stage(64, 64, 3, stride=1)
        self.layer2 = resnet_stage(256, 128, 4, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(512, 1)
        init_resnet(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc1(torch.flatten(self.avgpool(x), 1))


# ----------------------------------------------------------------------------------------------
# NPR


class NPR(TruncatedResNet50):
    """NPR: Neighboring Pixel Relationships (Tan et al., CVPR 2024, "Rethinking the Up-Sampling
    Operations in CNN-based Generative Network for Generalizable Deepfake Detection").

    Generators up-sample, which ties each pixel to its 2x2 neighbours. NPR exposes that by
    subtracting a nearest-neighbour down- then up-sampled copy (``x - up2(down2(x))``: each pixel
    minus the top-left pixel of its 2x2 cell), scales it by 2/3 and classifies it with the truncated
    ResNet-50. 1.44M parameters. The resampling is free of multiply-adds and is not counted.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The 2x2 cells need even sides; crop a trailing odd row/column as the authors' code does.
        h, w = x.shape[-2:]
        x = x[..., : h - h % 2, : w - w % 2]
        down = F.interpolate(x, scale_factor=0.5, mode="nearest", recompute_scale_factor=True)
        npr = x - F.interpolate(down, scale_factor=2.0, mode="nearest", recompute_scale_factor=True)
        return super().forward(npr * (2.0 / 3.0))


# ----------------------------------------------------------------------------------------------
# SAFE

# bior1.3 analysis high-pass filter (PyWavelets' ``Wavelet("bior1.3").dec_hi``): a Haar difference
# padded to the length (6) of its low-pass partner, which sets the padding and output size.
_BIOR13_DEC_HI: Final[tuple[float, ...]] = (0.0, 0.0, -1 / math.sqrt(2), 1 / math.sqrt(2), 0.0, 0.0)


def _pad_symmetric(x: torch.Tensor, left: int, right: int, dim: int) -> torch.Tensor:
    """Half-sample symmetric extension (edge sample repeated), PyWavelets' ``symmetric`` mode."""
    n = x.shape[dim]
    parts = [x.narrow(dim, 0, left).flip(dim), x, x.narrow(dim, n - right, right).flip(dim)]
    return torch.cat(parts, dim)


def dwt_hh(x: torch.Tensor) -> torch.Tensor:
    """The diagonal (HH) detail band of a one-level bior1.3 DWT, ``symmetric`` mode, per channel.

    Matches ``pywt.dwt2(x, "bior1.3", mode="symmetric")[1][2]``: output sides ``(n + 5) // 2``.
    """
    n, c = x.shape[:2]
    x = x.flatten(0, 1).unsqueeze(1)  # every channel alike: filter (N*C, 1, H, W) with one kernel
    taps = len(_BIOR13_DEC_HI)
    # Convolution (not correlation), so the filter is reversed.
    filt = torch.tensor(_BIOR13_DEC_HI[::-1], dtype=x.dtype, device=x.device)
    for dim in (3, 2):  # along W, then along H
        size = x.shape[dim]
        out = (size + taps - 1) // 2
        pad = 2 * (out - 1) - size + taps
        x = _pad_symmetric(x, pad // 2, (pad + 1) // 2, dim)
        kernel, stride = (filt.view(1, 1, 1, taps), (1, 2)) if dim == 3 else (filt.view(1, 1, taps, 1), (2, 1))
        x = F.conv2d(x, kernel, stride=stride)
    return x.squeeze(1).unflatten(0, (n, c))


class SAFE(TruncatedResNet50):
    """SAFE: Simple preserved and Augmented FEatures (Li et al., KDD 2025, "Improving Synthetic Image
    Detection Towards Generalization: An Image Transformation Perspective").

    The detector sees only high-frequency artefacts: the HH band of a one-level bior1.3 wavelet
    transform, bilinearly resized back to the input size, fed to the same truncated ResNet-50 as NPR
    (SAFE's other contributions are training-time crops and augmentations, not layers). 1.44M
    parameters. The DWT's filters are counted (0.9M MACs at 256); the resize is not.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hh = F.interpolate(dwt_hh(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return super().forward(hh)


# ----------------------------------------------------------------------------------------------
# CNNDetection


class CNNDetection(nn.Module):
    """CNNDetection (Wang et al., CVPR 2020, "CNN-generated images are surprisingly easy to spot...
    for now"): a plain ResNet-50 (7x7 stem, stages of 3/4/6/3 bottlenecks) with a 2048 -> 1 head.

    Same shapes as torchvision's ``resnet50(num_classes=1)``: 23,510,081 parameters. Not in the
    FerretNet table; an extra row for scale.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.layer1 = resnet_stage(64, 64, 3, stride=1)
        self.layer2 = resnet_stage(256, 128, 4, stride=2)
        self.layer3 = resnet_stage(512, 256, 6, stride=2)
        self.layer4 = resnet_stage(1024, 512, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, 1)
        init_resnet(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ----------------------------------------------------------------------------------------------
# Registry


@register_model("npr")
def npr(**kwargs: Any) -> NPR:
    """NPR (CVPR 2024), random weights."""
    check_peer_options("npr", kwargs)
    return NPR()


@register_model("safe")
def safe(**kwargs: Any) -> SAFE:
    """SAFE (KDD 2025), random weights."""
    check_peer_options("safe", kwargs)
    return SAFE()


@register_model("cnndetection")
def cnndetection(**kwargs: Any) -> CNNDetection:
    """CNNDetection's ResNet-50 (CVPR 2020), random weights."""
    check_peer_options("cnndetection", kwargs)
    return CNNDetection()
