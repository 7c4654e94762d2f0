"""RMSNorm exactly as transformers computes it (fp32 statistics, cast back before the weight)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from moelens.hooks import ShapedHookPoint


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * (x / rms(x))`` with the statistics in fp32, cast back to ``x.dtype`` first."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def rms_norm_weight_fp32(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """gpt-oss's RMSNorm: the weight multiplies the fp32 statistics, then one cast to ``x.dtype``."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * y).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis. ``hooked`` adds ``hook_normalized`` (the output)."""

    def __init__(self, d: int, eps: float, hooked: bool = True, dims: str = "batch pos d_model",
                 weight_fp32: bool = False):
        super().__init__()
        self.eps = eps
        self.weight_fp32 = weight_fp32  # gpt-oss: multiply the weight before the cast
        self.w = nn.Parameter(torch.ones(d))
        self.hook_normalized = ShapedHookPoint(dims) if hooked else None

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        y = (rms_norm_weight_fp32 if self.weight_fp32 else rms_norm)(x, self.w, self.eps)
        return self.hook_normalized(y) if self.hook_normalized is not None else y
