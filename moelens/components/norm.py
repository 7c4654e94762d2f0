"""RMSNorm exactly as transformers computes it (fp32 statistics, cast back before the weight)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from moelens.hooks import ShapedHookPoint, has_hooks


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * (x / rms(x))`` with the statistics in fp32, cast back to ``x.dtype`` first."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis. ``hooked`` adds ``hook_scale`` (the divisor
    ``sqrt(mean(x^2) + eps)``, fp32, ``[batch, pos, 1]``, as TransformerLens' RMSNorm) and
    ``hook_normalized`` (the output, after the weight).

    Unedited, the output is bitwise transformers' ``w * (x * rsqrt(mean(x^2) + eps))``. When a hook
    edits ``hook_scale`` (returns a new tensor or changes it in place, e.g. to freeze it to a clean
    run's value) the output is ``w * (x / scale)`` with the edited scale.
    """

    def __init__(self, d: int, eps: float, hooked: bool = True, dims: str = "batch pos d_model"):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d))
        if hooked:
            self.hook_scale = ShapedHookPoint(" ".join(dims.split()[:-1] + ["1"]))
            self.hook_normalized = ShapedHookPoint(dims)
        else:
            self.hook_scale = self.hook_normalized = None

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        if self.hook_normalized is None:
            return rms_norm(x, self.w, self.eps)
        x32 = x.float()
        var = x32.pow(2).mean(-1, keepdim=True) + self.eps
        y = None
        if has_hooks(self.hook_scale):
            scale = var.sqrt()
            version = None if scale.is_inference() else scale._version
            seen = self.hook_scale(scale)
            if seen is not scale:
                y = x32 / seen
            elif version is not None:
                if seen._version != version:  # edited in place
                    y = x32 / seen
            elif not torch.equal(seen, var.sqrt()):  # inference tensors keep no version counter
                y = x32 / seen
        if y is None:
            y = x32 * torch.rsqrt(var)
        return self.hook_normalized(self.w * y.to(x.dtype))
