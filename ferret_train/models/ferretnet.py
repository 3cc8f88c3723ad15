"""FerretNet (NeurIPS 2025): LPD residual -> a small dilated depthwise-separable CNN -> one logit.

Module and attribute names follow the original ``Ferret`` module exactly, so the authors' state
dicts load without a renaming table (``cbr1.0.weight``, ``feature.0.0.layers.0.conv1.weight``, ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ferret_runtime.metadata import ARCHS

from ..layers.lpd import LPD
from ..registry import register_model


@dataclass(frozen=True)
class FerretConfig:
    """Everything needed to rebuild a FerretNet; stored in our checkpoints."""

    dim: int = 32
    depths: tuple[int, ...] = (2, 2)
    lpd_func: str = "median"
    window_size: int = 3
    num_classes: int = 1
    in_channels: int = 3
    arch: str = field(default="ferretnet-s", compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["depths"] = list(self.depths)
        return d


class SeparableConv2d(nn.Sequential):
    """Depthwise k x k then pointwise 1 x 1, no bias."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, padding: int = 0):
        super().__init__()
        self.depth_wise = nn.Conv2d(cin, cin, kernel_size, stride, padding, groups=cin, bias=False)
        self.point_wise = nn.Conv2d(cin, cout, 1, bias=False)


class DilatedConv2d(nn.Module):
    """Two depthwise 3x3 convolutions (dilation 1 and 2) summed, then a 1x1 mix.

    The dilated pair widens the receptive field over the LPD residual at depthwise cost.
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, groups=cin, dilation=1, bias=False)
        self.conv2 = nn.Conv2d(cin, cout, 3, stride, padding=2, groups=cin, dilation=2, bias=False)
        self.conv3 = nn.Conv2d(cout, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv1(x) + self.conv2(x))


class DSBlock(nn.Module):
    """Dilated conv -> BN -> ReLU -> separable 3x3 -> BN, plus a (projected) shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.layers = nn.Sequential(
            DilatedConv2d(cin, cout, stride),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            SeparableConv2d(cout, cout, 3, 1, 1),
            nn.BatchNorm2d(cout),
        )
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(nn.Conv2d(cin, cout, 1, stride), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.layers(x) + self.shortcut(x))


class FerretNet(nn.Module):
    """The original ``Ferret`` network; ``lpd_impl`` picks the LPD implementation, not the math."""

    def __init__(self, cfg: FerretConfig, lpd_impl: str = "fast"):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.cbr1 = nn.Sequential(
            nn.Conv2d(cfg.in_channels, dim // 2, 3, 1, 1, bias=False), nn.BatchNorm2d(dim // 2), nn.ReLU(inplace=True)
        )
        self.cbr2 = nn.Sequential(
            nn.Conv2d(dim // 2, dim, 3, 2, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True)
        )
        self.feature = nn.Sequential()
        for depth in cfg.depths:
            self.feature.append(
                nn.Sequential(DSBlock(dim, dim * 2, stride=2),
                              *[DSBlock(dim * 2, dim * 2, 1) for _ in range(depth - 1)])
            )
            dim *= 2
        self.feature.append(nn.Conv2d(dim, dim, 1, 1, bias=False))
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.logit = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(dim, cfg.num_classes))
        self.lpd = LPD(cfg.lpd_func, cfg.window_size, impl=lpd_impl)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """What the CNN sees: ``x - lpd(x)`` (x itself for ``origin``)."""
        rec = self.lpd(x)
        return x if rec is None else x - rec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feature(self.cbr2(self.cbr1(self.residual(x))))
        return self.logit(torch.flatten(self.avg_pool(x), 1))


def _build(arch: str, dim: int, depths: tuple[int, ...], lpd_impl: str = "fast", **kw) -> FerretNet:
    return FerretNet(FerretConfig(dim=dim, depths=tuple(depths), arch=arch, **kw), lpd_impl=lpd_impl)


@register_model("ferretnet-s")
def ferretnet_s(**kw) -> FerretNet:
    """FerretNet-S: dim 32, depths [2, 2], 126,289 parameters."""
    return _build("ferretnet-s", ARCHS["ferretnet-s"].dim, ARCHS["ferretnet-s"].depths, **kw)


@register_model("ferretnet-b")
def ferretnet_b(**kw) -> FerretNet:
    """FerretNet-B: dim 96, depths [2, 2], 1,057,777 parameters (the paper's FerretNet)."""
    return _build("ferretnet-b", ARCHS["ferretnet-b"].dim, ARCHS["ferretnet-b"].depths, **kw)


def expected_shapes(cfg: FerretConfig) -> dict[str, tuple[int, ...]]:
    """The state dict's tensor shapes for ``cfg``, built on the meta device: nothing is allocated,
    so a config that asks for terabytes is measured, not built."""
    with torch.device("meta"):
        model = FerretNet(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def from_config(cfg: FerretConfig, lpd_impl: str = "fast") -> FerretNet:
    """Build any FerretNet shape (e.g. inferred from a checkpoint), named or not."""
    return FerretNet(cfg, lpd_impl=lpd_impl)
