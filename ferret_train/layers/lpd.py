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

IMPLS = ("fast", "reference", "op")  # "op": torch.ops.ferret.lpd (below), the fused kernel on CUDA


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


# --------------------------------------------------------------------------- torch.ops.ferret.lpd
# ``torch.ops.ferret.lpd(x, func, k)``, registered here, with the layer that uses it: the
# reconstruction, not the residual, so it is a drop-in for ``lpd_fast`` (``LPD(..., impl="op")``)
# and the model's ``x - lpd(x)`` stays the same float32 subtraction on every implementation. CPU
# (and any non-CUDA device): ``lpd_fast``. CUDA: the fused kernel from ``ferret_runtime/kernels/lpd.cu``
# (float32 and float16) through NVRTC and the driver API, on PyTorch's current stream. A fake
# implementation gives torch.compile the output's metadata. Not differentiable: its input is an
# image, never a parameter.
CUDA_DTYPES = (torch.float32, torch.float16)


def _check_op(x: torch.Tensor, func: str, k: int) -> LPDSpec:
    if x.dim() != 4:
        raise ConfigError(f"Received x of shape {tuple(x.shape)}; expected (N, C, H, W)")
    spec = get_lpd_spec(func)
    if spec is None:
        raise ConfigError("Received LPD function 'origin'; expected a variant that reconstructs "
                          "(origin has no reconstruction: use the image itself)")
    check_window(k)
    return spec


@torch.library.custom_op("ferret::lpd", mutates_args=())
def lpd_op(x: torch.Tensor, func: str, k: int) -> torch.Tensor:
    """lpd(x) for one LPD variant and window size, NCHW."""
    return lpd_fast(x, _check_op(x, func, k), k).contiguous()


@lpd_op.register_kernel("cuda")
def _lpd_cuda(x: torch.Tensor, func: str, k: int) -> torch.Tensor:
    from ferret_runtime.kernels import launch  # deferred: cuda-python is the 'gpu' extra

    _check_op(x, func, k)
    if x.dtype not in CUDA_DTYPES:
        raise ConfigError(f"Received x of dtype {x.dtype} on CUDA; expected one of {CUDA_DTYPES}")
    x = x.contiguous()  # a non-contiguous view is copied, not rejected
    out = torch.empty_like(x)
    if out.numel():
        module = launch.get_module(x.device.index if x.device.index is not None else torch.cuda.current_device())
        stream = torch.cuda.current_stream(x.device).cuda_stream
        launch.lpd(module, x.data_ptr(), out.data_ptr(), tuple(x.shape), x.dtype, func, k, residual=False,
                   stream=stream)
    return out


@lpd_op.register_fake
def _lpd_fake(x: torch.Tensor, func: str, k: int) -> torch.Tensor:
    _check_op(x, func, k)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.spec is None:
            return None
        return self._fn(x, self.spec, self.window_size)

    def extra_repr(self) -> str:
        return f"func={self.func!r}, window_size={self.window_size}, impl={self.impl!r}"
