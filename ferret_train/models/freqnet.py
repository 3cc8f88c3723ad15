"""FreqNet (AAAI 2024) for ``ferret bench``: frequency-domain stages in front of the truncated
ResNet-50 of the other peers (see ``peers`` for the shared pieces and the FLOP convention)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.resnet import init_resnet, resnet_stage
from ..registry import register_model
from .peers import check_peer_options


def _low_frequencies(n: int, scale: int, device: torch.device) -> torch.Tensor:
    """Unshifted FFT indices k with -n//scale <= k < n//scale (mod n): exactly the centred block the
    original zeroes after ``fftshift``, found without the shift (whose rolls copy the whole spectrum)."""
    k = torch.arange(n, device=device)
    return (k < n // scale) | (k >= n - n // scale)


def _high_pass_spatial(x: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """Zero the (h/scale, w/scale half-width) low-frequency block of the 2-D spectrum, then ReLU."""
    h, w = x.shape[-2:]
    low = _low_frequencies(h, scale, x.device)[:, None] & _low_frequencies(w, scale, x.device)[None, :]
    f = torch.fft.fft2(x, norm="ortho").masked_fill(low, 0)
    return F.relu(torch.fft.ifft2(f, norm="ortho").real)


def _high_pass_channel(x: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """The same high-pass along the channel axis (a 1-D FFT over channels), then ReLU."""
    low = _low_frequencies(x.shape[1], scale, x.device)[:, None, None]
    f = torch.fft.fft(x, dim=1, norm="ortho").masked_fill(low, 0)
    return F.relu(torch.fft.ifft(f, dim=1, norm="ortho").real)


class FrequencyConv(nn.Module):
    """FreqNet's frequency convolutional layer (FCL): a 1x1 convolution on the 2-D spectrum, one for
    its real part and one for its imaginary part (amplitude and phase are learnt jointly), then back
    to the spatial domain and ReLU. The original shifts the spectrum before and after the 1x1
    convolutions; a per-frequency map commutes with the shift, so we skip both."""

    def __init__(self, channels: int):
        super().__init__()
        self.real = nn.Conv2d(channels, channels, 1, bias=False)
        self.imag = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.fft.fft2(x, norm="ortho")
        f = torch.complex(self.real(f.real), self.imag(f.imag))
        return F.relu(torch.fft.ifft2(f, norm="ortho").real)


class FreqStage(nn.Module):
    """One FreqNet stage: spatial high-pass -> 1x1 conv (+bias, stride) -> ReLU
    -> [channel high-pass] -> FCL."""

    def __init__(self, cin: int, cout: int, stride: int, channel_high_pass: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, stride, bias=True)
        self.channel_high_pass = channel_high_pass
        self.fcl = FrequencyConv(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(_high_pass_spatial(x)))
        if self.channel_high_pass:
            x = _high_pass_channel(x)
        return self.fcl(x)


class FreqNet(nn.Module):
    """FreqNet (Tan et al., AAAI 2024, "Frequency-Aware Deepfake Detection: Improving Generalizability
    through Frequency Space Domain Learning").

    Forces the detector onto high frequencies: every stage high-passes its input in the 2-D spectrum
    (and, in the first two, across channels), and learns in the frequency domain with FCLs. Layout:
    two frequency stages (3 -> 64, 64 -> 64 stride 2) replace the ResNet stem, then maxpool, ResNet-50
    ``layer1``, two more frequency stages (256 -> 256, 256 -> 256 stride 2), ``layer2``, pool, linear
    512 -> 1. 1.85M parameters. FFTs are not counted by FlopCounterMode (nor by the paper's thop);
    the four stage 1x1 convolutions are counted here but were not in the paper (module docstring).
    """

    def __init__(self) -> None:
        super().__init__()
        self.freq1 = FreqStage(3, 64, stride=1, channel_high_pass=True)
        self.freq2 = FreqStage(64, 64, stride=2, channel_high_pass=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.layer1 = resnet_stage(64, 64, 3, stride=1)
        self.freq3 = FreqStage(256, 256, stride=1, channel_high_pass=False)
        self.freq4 = FreqStage(256, 256, stride=2, channel_high_pass=False)
        self.layer2 = resnet_stage(256, 128, 4, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(512, 1)
        init_resnet(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.freq2(self.freq1(x)))
        x = self.freq4(self.freq3(self.layer1(x)))
        x = self.layer2(x)
        return self.fc1(torch.flatten(self.avgpool(x), 1))


@register_model("freqnet")
def freqnet(**kwargs: Any) -> FreqNet:
    """FreqNet (AAAI 2024), random weights."""
    check_peer_options("freqnet", kwargs)
    return FreqNet()
