"""Local pixel dependency (LPD) reconstruction, every variant of the original, in PyTorch.

Two implementations of the same specs (``ferret_runtime.lpd_spec``):
- ``reference``: the original's method (pad, ``F.unfold``, reduce over the k*k axis); faithful and
  slow, since it materialises k*k copies of the image and sorts them.
- ``fast``: the k*k shifted views of one padded tensor (no copies); for 3x3 the medians come from the
  median-of-9 selection network on those views (30 element-wise min/max), min/max/mean from chained
  element-wise ops. Larger windows stack the views and reduce, which still skips unfold's copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ferret_runtime.errors import ConfigError
from ferret_runtime.lpd_spec import LPDSpec, check_window, get_lpd_spec, median3x3_centre, median9

IMPLS = ("fast", "reference", "op")  # "op": torch.ops.ferret.lpd (lpd_op.py), the fused kernel on CUDA


def _windows(x: torch.Tensor, k: int, pad_value: float) -> list[torch.Tensor]:
    """The k*k shifted views of x (row-major window order, centre at index k*k // 2)."""
    p = k // 2
    xp = F.pad(x, (p, p, p, p), mode="constant", value=pad_value)
    h, w = x.shape[-2:]
    return [xp[..., i : i + h, j : j + w] for i in range(k) for j in range(k)]


def _select_window(values: torch.Tensor, spec: LPDSpec) -> torch.Tensor:
    """Apply the spec's centre rule and reduction along dim 2 of (N, C, k*k, ...)."""
    c = values.shape[2] // 2
    if spec.center == "mask":
        values[:, :, c] = spec.pad_value
    elif spec.center == "drop":
        values = torch.cat([values[:, :, :c], values[:, :, c + 1 :]], dim=2)
    if spec.reduce == "median":
        return values.median(dim=2).values  # lower middle for an even count, as the original
    if spec.reduce == "min":
        return values.amin(dim=2)
    if spec.reduce == "max":
        return values.amax(dim=2)
    return values.mean(dim=2)


def lpd_reference(x: torch.Tensor, spec: LPDSpec, k: int) -> torch.Tensor:
    """The original unfold-based LPD (kept as the oracle and the benchmark baseline)."""
    n, c, h, w = x.shape
    p = k // 2
    unfolded = F.unfold(F.pad(x, (p, p, p, p), value=spec.pad_value), kernel_size=k)
    return _select_window(unfolded.view(n, c, k * k, -1), spec).view(n, c, h, w)


def _min(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    return a.clamp(max=b) if isinstance(b, float) else torch.minimum(a, b)


def _max(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    return a.clamp(min=b) if isinstance(b, float) else torch.maximum(a, b)


def _fast3(x: torch.Tensor, spec: LPDSpec) -> torch.Tensor:
    views: list = list(_windows(x, 3, spec.pad_value))
    neighbours = views[:4] + views[5:]
    if spec.reduce == "median":
        views[4] = median3x3_centre(spec, views[4])
        return median9(views, _min, _max)
    op = {"min": torch.minimum, "max": torch.maximum, "mean": torch.add}[spec.reduce]
    acc = neighbours[0]
    for v in neighbours[1:]:
        acc = op(acc, v)
    return acc / 9.0 if spec.reduce == "mean" else acc.contiguous()  # mean over 9 (masked centre = 0)


def lpd_fast(x: torch.Tensor, spec: LPDSpec, k: int) -> torch.Tensor:
    """Same values as ``lpd_reference`` without unfold's k*k copy."""
    if k == 3:
        return _fast3(x, spec)
    return _select_window(torch.stack(_windows(x, k, spec.pad_value), dim=2), spec)


def _lpd_op(x: torch.Tensor, spec: LPDSpec, k: int) -> torch.Tensor:
    """The ``ferret::lpd`` custom op: lpd_fast on CPU, the fused CUDA kernel on GPU."""
    return torch.ops.ferret.lpd(x, spec.name, k)


class LPD(nn.Module):
    """The reconstruction ``lpd(x)`` for one variant and window; ``origin`` returns None (no residual)."""

    def __init__(self, func: str = "median", window_size: int = 3, impl: str = "fast"):
        super().__init__()
        if impl not in IMPLS:
            raise ConfigError(f"Received LPD impl {impl!r}; expected one of {IMPLS}")
        self.func, self.window_size, self.impl = func, check_window(window_size), impl
        self.spec = get_lpd_spec(func)
        self._fn = {"fast": lpd_fast, "reference": lpd_reference, "op": _lpd_op}[impl]
        if impl == "op":
            from . import lpd_op  # noqa: F401  registers torch.ops.ferret.lpd

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.spec is None:
            return None
        return self._fn(x, self.spec, self.window_size)

    def extra_repr(self) -> str:
        return f"func={self.func!r}, window_size={self.window_size}, impl={self.impl!r}"
