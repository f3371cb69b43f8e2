"""Small building blocks shared by the UNet: dimension-generic layers, GroupNorm32, the
sinusoidal timestep embedding and fp16 conversion helpers.

Everything here follows the guided-diffusion conventions described in docs/method.md so
that official checkpoints load with ``strict=True`` and compute the same function.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "GroupNorm32",
    "avg_pool_nd",
    "conv_nd",
    "convert_module_to_f16",
    "convert_module_to_f32",
    "linear",
    "normalization",
    "timestep_embedding",
    "zero_module",
]


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in float32 and casts the result back to the input dtype.

    Its affine parameters stay float32 under fp16 conversion.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The normalisation layer of every block: 32 groups over ``channels``."""
    return GroupNorm32(32, channels)


_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOLS = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D convolution."""
    try:
        return _CONVS[dims](*args, **kwargs)
    except KeyError:
        raise ValueError(f"unsupported dims: {dims} (expected 1, 2 or 3)") from None


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D average pooling layer."""
    try:
        return _POOLS[dims](*args, **kwargs)
    except KeyError:
        raise ValueError(f"unsupported dims: {dims} (expected 1, 2 or 3)") from None


def linear(*args, **kwargs) -> nn.Linear:
    return nn.Linear(*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero (in place) and return it."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosines first.

    ``freqs[i] = exp(-ln(max_period) * i / half)`` for ``i < half = dim // 2``; the result is
    ``[cos(t * freqs), sin(t * freqs)]`` (float32, shape ``(N, dim)``), zero-padded by one
    column when ``dim`` is odd. ``timesteps`` holds raw step values (no rescaling).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(exponent)
    args = timesteps.reshape(-1, 1).float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_module_to_f16(module: nn.Module) -> None:
    """Cast the weight and bias of a convolution to float16 (other modules are untouched)."""
    if isinstance(module, _CONV_TYPES):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to_f32(module: nn.Module) -> None:
    """Undo :func:`convert_module_to_f16`."""
    if isinstance(module, _CONV_TYPES):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()

