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


def rms_norm_zero_centered(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Qwen3.5 / Qwen3-Next: ``(x / rms(x)) * (1 + weight)`` all in fp32, cast to ``x.dtype`` after the
    multiply (weights are stored zero-centred, so 0 is the identity scale)."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + weight.float())).to(x.dtype)


def norm_fn(zero_centered: bool):
    """The RMSNorm function for a config's ``norm_zero_centered`` knob."""
    return rms_norm_zero_centered if zero_centered else rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last axis. ``hooked`` adds ``hook_normalized`` (the output)."""

    def __init__(self, d: int, eps: float, hooked: bool = True, dims: str = "batch pos d_model",
                 zero_centered: bool = False):
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered  # scale by (1 + w) in fp32 (Qwen3.5 / Qwen3-Next)
        self.w = nn.Parameter(torch.zeros(d) if zero_centered else torch.ones(d))
        self.hook_normalized = ShapedHookPoint(dims) if hooked else None

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        y = norm_fn(self.zero_centered)(x, self.w, self.eps)
        return self.hook_normalized(y) if self.hook_normalized is not None else y
