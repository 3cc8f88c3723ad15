"""``torch.ops.ferret.lpd(x, func, k)``: the LPD reconstruction ``lpd(x)`` as a custom op.

It returns the reconstruction, not the residual, so it is a drop-in for the ``LPD`` module
(``LPD(..., impl="op")``) and the model's ``x - lpd(x)`` stays the same float32 subtraction on
every implementation. CPU (and any non-CUDA device): ``lpd_fast``. CUDA: the fused kernel from
``ferret_runtime/kernels/lpd.cu`` (float32 and float16), launched through NVRTC and the driver API
on PyTorch's current stream. A fake implementation gives torch.compile the output's metadata.
Not differentiable: its input is an image, never a parameter.
"""

from __future__ import annotations

import torch

from ferret_runtime.errors import ConfigError
from ferret_runtime.lpd_spec import LPDSpec, check_window, get_lpd_spec

from .lpd import lpd_fast

CUDA_DTYPES = (torch.float32, torch.float16)


def _check(x: torch.Tensor, func: str, k: int) -> LPDSpec:
    if x.dim() != 4:
        raise ConfigError(f"Received x of shape {tuple(x.shape)}; expected (N, C, H, W)")
    spec = get_lpd_spec(func)
    if spec is None:
        raise ConfigError("Received LPD function 'origin'; expected a variant that reconstructs "
                          "(origin has no reconstruction: use the image itself)")
    check_window(k)
    return spec


@torch.library.custom_op("ferret::lpd", mutates_args=())
def lpd(x: torch.Tensor, func: str, k: int) -> torch.Tensor:
    """lpd(x) for one LPD variant and window size, NCHW."""
    return lpd_fast(x, _check(x, func, k), k).contiguous()


@lpd.register_kernel("cuda")
def _lpd_cuda(x: torch.Tensor, func: str, k: int) -> torch.Tensor:
    from ferret_runtime.kernels import launch  # deferred: cuda-python is the 'gpu' extra

    _check(x, func, k)
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


@lpd.register_fake
def _lpd_fake(x: torch.Tensor, func: str, k: int) -> torch.Tensor:
    _check(x, func, k)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)
