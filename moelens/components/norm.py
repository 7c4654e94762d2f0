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


def l2_norm(x: Tensor, eps: float) -> Tensor:
    """Llama 4's weightless RMSNorm (its "L2" QK-norm): ``x / rms(x)`` in fp32, cast to ``x.dtype``."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm_weight_fp32(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """gpt-oss's RMSNorm: the weight multiplies the fp32 statistics, then one cast to ``x.dtype``."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * y).to(x.dtype)


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
    """RMSNorm over the last axis. ``hooked`` adds ``hook_scale`` (the divisor
    ``sqrt(mean(x^2) + eps)``, fp32, ``[batch, pos, 1]``, as TransformerLens' RMSNorm) and
    ``hook_normalized`` (the output, after the weight).

    Unedited, the output is bitwise transformers' ``w * (x * rsqrt(mean(x^2) + eps))``. When a hook
    edits ``hook_scale`` (returns a new tensor or changes it in place, e.g. to freeze it to a clean
    run's value) the output is ``w * (x / scale)`` with the edited scale.
    """

    def __init__(self, d: int, eps: float, hooked: bool = True, dims: str = "batch pos d_model",
                 zero_centered: bool = False, weight_fp32: bool = False, keep_fp32: bool = False):
        super().__init__()
        self.eps = eps
        self.keep_fp32 = keep_fp32  # the weight stays fp32 in a low-precision model (DeepSeek-V4)
        self.zero_centered = zero_centered  # scale by (1 + w) in fp32 (Qwen3.5 / Qwen3-Next)
        self.weight_fp32 = weight_fp32  # gpt-oss: multiply the weight before the cast
        self.w = nn.Parameter(torch.zeros(d) if zero_centered else torch.ones(d))
        if hooked:
            self.hook_scale = ShapedHookPoint(" ".join(dims.split()[:-1] + ["1"]))
            self.hook_normalized = ShapedHookPoint(dims)
        else:
            self.hook_scale = self.hook_normalized = None

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.keep_fp32 and self.w.dtype != torch.float32:
            self.w.data = self.w.data.float()
        return out

    @property
    def scale_weight(self) -> Tensor:
        """The weight the normalised vector is multiplied by: ``w``, or ``1 + w`` (fp32) when zero-centred.
        Analysis that folds the norm's weight (DLA, logit lens, router attribution) uses this."""
        return 1.0 + self.w.float() if self.zero_centered else self.w

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        if self.hook_normalized is None:
            if self.weight_fp32:
                return rms_norm_weight_fp32(x, self.w, self.eps)
            return norm_fn(self.zero_centered)(x, self.w, self.eps)
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
        if self.weight_fp32:  # gpt-oss: (w * y) in fp32, one cast
            return self.hook_normalized((self.w.float() * y).to(x.dtype))
        if self.zero_centered:  # (1 + w) multiplied in fp32, cast after (Qwen3.5 / Qwen3-Next)
            return self.hook_normalized((y * (1.0 + self.w.float())).to(x.dtype))
        return self.hook_normalized(self.w * y.to(x.dtype))


class LayerNorm(nn.Module):
    """LayerNorm with a weight and a bias over the last axis (PhiMoE), as ``torch.nn.LayerNorm``.

    ``hook_scale`` (TransformerLens' LayerNorm convention) is ``sqrt(var(x) + eps)`` of the centred input,
    fp32, ``[batch, pos, 1]``; ``hook_normalized`` the output. Unedited, the output is
    ``F.layer_norm(x, w, b, eps)`` bit for bit (what transformers runs); an edited ``hook_scale`` gives
    ``w * (x - mean) / scale + b``.
    """

    def __init__(self, d: int, eps: float, hooked: bool = True, dims: str = "batch pos d_model"):
        super().__init__()
        self.eps = eps
        self.zero_centered = False
        self.w = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d))
        if hooked:
            self.hook_scale = ShapedHookPoint(" ".join(dims.split()[:-1] + ["1"]))
            self.hook_normalized = ShapedHookPoint(dims)
        else:
            self.hook_scale = self.hook_normalized = None

    @property
    def scale_weight(self) -> Tensor:
        return self.w

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        out = torch.nn.functional.layer_norm(x, (x.shape[-1],), self.w, self.b, self.eps)
        if self.hook_normalized is None:
            return out
        if has_hooks(self.hook_scale):
            x32 = x.float()
            centred = x32 - x32.mean(-1, keepdim=True)
            scale = (centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
            before = scale.clone()
            seen = self.hook_scale(scale)
            if not torch.equal(seen, before):  # edited (returned or in place)
                out = (centred / seen * self.w.float() + self.b.float()).to(x.dtype)
        return self.hook_normalized(out)


def make_norm(cfg, d: int) -> nn.Module:
    """The pre-norm a config selects (``cfg.norm_type``): RMSNorm (with its zero-centred / fp32-weight
    variants) or LayerNorm with bias."""
    if cfg.norm_type == "layer":
        return LayerNorm(d, cfg.rms_norm_eps)
    return RMSNorm(d, cfg.rms_norm_eps, zero_centered=cfg.norm_zero_centered, weight_fp32=cfg.norm_weight_fp32,
                   keep_fp32=cfg.norm_keep_fp32)


def unweighted_rms(x: Tensor, eps: float) -> Tensor:
    """transformers' ``DeepseekV4UnweightedRMSNorm``: ``x * rsqrt(mean(x^2) + eps)`` (fp32 statistic)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)
