"""Manifold-constrained hyper-connections (DeepSeek-V4), exactly as transformers 5.25's
``DeepseekV4HyperConnection`` / ``DeepseekV4HyperHead`` / ``DeepseekV4DecoderLayer``.

The residual stream is ``hc = cfg.hc_mult`` parallel streams ``H [batch, pos, hc, d_model]``
(the embedding copied into each). Before the attention and before the MoE, one
:class:`HyperConnection` reads all streams and produces, per position (fp32)::

    a          = RMS(flatten(H)) W_fn^T                       (unweighted RMS over hc * d_model)
    pre        = sigmoid(a_pre  * s_pre  + b_pre) + eps        [hc]     collapse weights
    post       = 2 sigmoid(a_post * s_post + b_post)           [hc]     expand weights
    comb       = Sinkhorn(softmax(a_comb * s_comb + b_comb) + eps)   [hc, hc]  (rows and columns ~ 1)
    x          = sum_j pre_j H_j                               the block's input (then its RMSNorm)
    H'_k       = post_k * f(x) + sum_j comb[j, k] H_j          f = attention or MoE

so ``comb`` is read transposed (``H' = post f + comb^T H``). The final :class:`HyperHead` collapses
the streams with its own ``pre`` weights before the final norm.

Hooks of a :class:`HyperConnection` (``blocks.{l}.attn_hc`` / ``blocks.{l}.ffn_hc``, and
``hc_head``): ``hook_pre`` ``[batch, pos, hc]``, ``hook_post`` ``[batch, pos, hc]``, ``hook_comb``
``[batch, pos, hc, hc]`` (``comb[j, k]``: the share of input stream ``j`` in output stream ``k``),
``hook_collapsed`` ``[batch, pos, d_model]`` (the block input before its norm). Edits propagate.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from moelens.components.attention import AttentionContext
from moelens.components.norm import RMSNorm, unweighted_rms
from moelens.config import MoEConfig
from moelens.hooks import ShapedHookPoint


def _keep_fp32(module: nn.Module, result):
    for p in module.parameters(recurse=False):
        if p.dtype != torch.float32 and p.is_floating_point():
            p.data = p.data.float()
    return result


class HyperConnection(nn.Module):
    """One mHC mixing site (hub ``attn_hc`` / ``ffn_hc``: ``fn``, ``base``, ``scale``, all fp32)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        hc = cfg.hc_mult
        self.fn = nn.Parameter(torch.empty((2 + hc) * hc, hc * cfg.d_model))
        self.base = nn.Parameter(torch.zeros((2 + hc) * hc))
        self.scale = nn.Parameter(torch.ones(3))
        self.hook_pre = ShapedHookPoint("batch pos hc")
        self.hook_post = ShapedHookPoint("batch pos hc")
        self.hook_comb = ShapedHookPoint("batch pos hc hc")
        self.hook_collapsed = ShapedHookPoint("batch pos d_model")

    def _apply(self, fn, recurse=True):
        """The mixing parameters stay fp32 in a bf16 model (transformers' ``_keep_in_fp32_modules_strict``)."""
        return _keep_fp32(self, super()._apply(fn, recurse))

    def forward(self, streams: Float[Tensor, "batch pos hc d_model"]):
        """``(post [b, p, hc], comb [b, p, hc, hc], collapsed [b, p, d_model])``."""
        cfg = self.cfg
        hc, eps = cfg.hc_mult, cfg.hc_eps
        b, p = streams.shape[:2]
        flat = unweighted_rms(streams.view(b, p, -1).float(), cfg.rms_norm_eps)
        mixed = F.linear(flat, self.fn.float())
        pre_w, post_w, comb_w = mixed.split([hc, hc, hc * hc], dim=-1)
        pre_b, post_b, comb_b = self.base.split([hc, hc, hc * hc])
        pre_s, post_s, comb_s = self.scale.unbind(0)
        pre = self.hook_pre(torch.sigmoid(pre_w * pre_s + pre_b) + eps)
        post = self.hook_post(2 * torch.sigmoid(post_w * post_s + post_b))
        comb = torch.softmax(comb_w.view(b, p, hc, hc) * comb_s + comb_b.view(hc, hc), dim=-1) + eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        for _ in range(cfg.hc_sinkhorn_iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        comb = self.hook_comb(comb)
        collapsed = self.hook_collapsed((pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype))
        return post, comb, collapsed


def expand(post: Tensor, out: Tensor, comb: Tensor, streams: Tensor) -> Tensor:
    """``H'_k = post_k * out + sum_j comb[j, k] H_j`` in the streams' dtype, as transformers."""
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), streams)


class HyperHead(nn.Module):
    """The final collapse (hub ``model.hc_head``: ``hc_fn``, ``hc_base``, ``hc_scale``)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        hc = cfg.hc_mult
        self.hc_fn = nn.Parameter(torch.empty(hc, hc * cfg.d_model))
        self.hc_base = nn.Parameter(torch.zeros(hc))
        self.hc_scale = nn.Parameter(torch.ones(1))
        self.hook_pre = ShapedHookPoint("batch pos hc")
        self.hook_collapsed = ShapedHookPoint("batch pos d_model")

    def _apply(self, fn, recurse=True):
        return _keep_fp32(self, super()._apply(fn, recurse))

    def forward(self, streams: Float[Tensor, "batch pos hc d_model"]) -> Float[Tensor, "batch pos d_model"]:
        flat = unweighted_rms(streams.flatten(2).float(), self.cfg.rms_norm_eps)
        mixes = F.linear(flat, self.hc_fn.float())
        pre = self.hook_pre(torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.cfg.hc_eps)
        return self.hook_collapsed((pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype))


class HyperBlock(nn.Module):
    """A DeepSeek-V4 decoder block over ``hc`` residual streams.

    Hooks: ``hook_resid_pre`` / ``hook_resid_mid`` / ``hook_resid_post`` ``[batch, pos, hc, d_model]``
    (all streams), ``attn_hc.*``, ``ln1.*``, ``attn.*``, ``hook_attn_out`` ``[batch, pos, d_model]``
    (the attention output before ``post`` spreads it over the streams), ``ffn_hc.*``, ``ln2.*``,
    ``mlp.*``, ``hook_mlp_out`` ``[batch, pos, d_model]``."""

    # what analyses read off a TransformerBlock: no pre/post-norm pairs, parallel branches or scalar here
    ln1_post = ln2_post = layer_scalar = None
    parallel = False

    def __init__(self, cfg: MoEConfig, layer: int):
        super().__init__()
        from moelens.components.mixers import make_attention
        from moelens.components.moe import MoE

        self.layer = layer
        self.is_moe = layer in cfg.moe_layers
        if not self.is_moe:
            raise ValueError("hyper-connection blocks are MoE blocks (DeepSeek-V4 has no dense layers)")
        self.is_linear_attn = False
        self.hook_resid_pre = ShapedHookPoint("batch pos hc d_model")
        self.attn_hc = HyperConnection(cfg)
        self.ln1 = RMSNorm(cfg.d_model, cfg.rms_norm_eps, weight_fp32=True, keep_fp32=cfg.norm_keep_fp32)
        self.attn = make_attention(cfg, layer)
        self.hook_attn_out = ShapedHookPoint("batch pos d_model")
        self.hook_resid_mid = ShapedHookPoint("batch pos hc d_model")
        self.ffn_hc = HyperConnection(cfg)
        self.ln2 = RMSNorm(cfg.d_model, cfg.rms_norm_eps, weight_fp32=True, keep_fp32=cfg.norm_keep_fp32)
        self.mlp = MoE(cfg, layer)
        self.hook_mlp_out = ShapedHookPoint("batch pos d_model")
        self.hook_resid_post = ShapedHookPoint("batch pos hc d_model")

    @property
    def device(self) -> torch.device:
        return self.ln1.w.device

    def forward(
        self,
        streams: Float[Tensor, "batch pos hc d_model"],
        ctx: AttentionContext,
        kv_prefix: Optional[tuple[Tensor, Tensor]] = None,
        edit=None,
    ) -> Float[Tensor, "batch pos hc d_model"]:
        """``edit(kind, value)`` (the tracing engine's interventions) may change ``"attn_out"``,
        ``"mlp_out"`` or ``"resid_post"``."""
        edit = edit or (lambda kind, value: value)
        streams = self.hook_resid_pre(streams)
        post, comb, x = self.attn_hc(streams)
        attn_out = self.hook_attn_out(edit("attn_out", self.attn(self.ln1(x), ctx, kv_prefix)))
        streams = self.hook_resid_mid(expand(post, attn_out, comb, streams))
        post, comb, x = self.ffn_hc(streams)
        mlp_out = self.hook_mlp_out(edit("mlp_out", self.mlp(self.ln2(x), tokens=ctx.tokens)))
        return self.hook_resid_post(edit("resid_post", expand(post, mlp_out, comb, streams)))
