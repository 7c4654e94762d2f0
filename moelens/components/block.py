"""A decoder block: ``h += Post1(Attn(Pre1(h))); h += Post2(FFN(Pre2(h)))`` with residual hooks.

Which norms exist is config data (``cfg.attn_pre_norm``, ``attn_post_norm``, ``mlp_pre_norm``,
``mlp_post_norm``): the usual pre-norm block has ``ln1`` and ``ln2`` only; OLMo-2 / FlexOlmo
normalise each branch's output instead (``ln1_post``, ``ln2_post``, no pre-norms); both at once is
Gemma's "sandwich". A missing norm is ``None``.

``hook_attn_out`` and ``hook_mlp_out`` are what is added to the residual stream, i.e. *after* a
post-norm (TransformerLens' convention for Gemma 2). Inside the FFN the MoE hooks
(``mlp.hook_routed_out``, ``cache.expert_contribution``) come before that norm; the post-norm is a
linear map once its scale is fixed (``ln2_post.hook_scale``), which is how expert-level
decompositions carry an expert's update through it (:meth:`TransformerBlock.post_mlp_linear`).
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor, nn

from moelens.components.attention import Attention, AttentionContext
from moelens.components.mlp import GatedMLP
from moelens.components.moe import MoE
from moelens.components.mixers import make_attention
from moelens.components.norm import make_norm
from moelens.config import MoEConfig
from moelens.hooks import ShapedHookPoint


def _norm(cfg: MoEConfig, present: bool = True) -> Optional[nn.Module]:
    """The norm the config selects (RMSNorm or LayerNorm, :func:`make_norm`) over ``d_model``, or
    None where the block has none at that place."""
    return make_norm(cfg, cfg.d_model) if present else None


def _apply(norm: Optional[nn.Module], x: Tensor) -> Tensor:
    return x if norm is None else norm(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: MoEConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.is_moe = layer in cfg.moe_layers
        # registration order = execution order, so `model.hook_dict` lists hooks as they fire
        self.hook_resid_pre = ShapedHookPoint("batch pos d_model")
        self.ln1 = _norm(cfg, cfg.attn_pre_norm)
        self.is_linear_attn = layer in cfg.linear_attn_layers  # mixer = Gated DeltaNet, not attention
        self.attn = make_attention(cfg, layer)
        self.ln1_post = _norm(cfg, cfg.attn_post_norm)
        self.hook_attn_out = ShapedHookPoint("batch pos d_model")
        self.hook_resid_mid = ShapedHookPoint("batch pos d_model")
        self.ln2 = _norm(cfg, cfg.mlp_pre_norm)
        self.parallel = self.is_moe and cfg.parallel_dense_mlp
        if self.parallel:  # Gemma 4: dense MLP and MoE side by side, each with its own norms
            self.dense_mlp = GatedMLP(cfg.d_model, cfg.d_mlp, act=cfg.mlp_act)
            self.ln2_post_dense = _norm(cfg)
            self.hook_dense_out = ShapedHookPoint("batch pos d_model")
            self.ln2_moe = _norm(cfg)
            self.mlp = MoE(cfg, layer)
            self.ln2_post_moe = _norm(cfg)
            self.hook_moe_out = ShapedHookPoint("batch pos d_model")
        else:
            self.mlp = MoE(cfg, layer) if self.is_moe else GatedMLP(cfg.d_model, cfg.d_mlp, act=cfg.mlp_act)
        self.ln2_post = _norm(cfg, cfg.mlp_post_norm)
        self.hook_mlp_out = ShapedHookPoint("batch pos d_model")
        # Gemma 4: a learned scalar multiplies the residual stream leaving the block
        # Gemma 4: a (persistent) buffer, as in transformers: loaded with the weights, not a parameter
        self.register_buffer("layer_scalar", torch.ones(1) if cfg.layer_scalar else None)
        self.hook_resid_post = ShapedHookPoint("batch pos d_model")

    @property
    def device(self) -> torch.device:
        return self.attn.w_o.device if hasattr(self.attn, "w_o") else next(self.parameters()).device

    def attn_branch(self, resid: Float[Tensor, "batch pos d_model"], ctx: AttentionContext,
                    kv_prefix=None) -> Float[Tensor, "batch pos d_model"]:
        """What the attention adds to the residual stream (before ``hook_attn_out``)."""
        return _apply(self.ln1_post, self.attn(_apply(self.ln1, resid), ctx, kv_prefix))

    def mlp_branch(self, resid_mid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        """What the FFN (MoE or dense) adds to the residual stream (before ``hook_mlp_out``).

        Parallel (Gemma 4): ``ln2_post(hook_dense_out + hook_moe_out)`` with
        ``hook_dense_out = ln2_post_dense(dense_mlp(ln2(h)))`` and
        ``hook_moe_out = ln2_post_moe(mlp(ln2_moe(h)))``, the router reading ``h`` itself."""
        if not self.parallel:
            return _apply(self.ln2_post, self.mlp(_apply(self.ln2, resid_mid)))
        dense = self.hook_dense_out(self.ln2_post_dense(self.dense_mlp(_apply(self.ln2, resid_mid))))
        moe = self.hook_moe_out(self.ln2_post_moe(self.mlp(self.ln2_moe(resid_mid), router_input=resid_mid)))
        return _apply(self.ln2_post, dense + moe)

    def add_mlp(self, resid_mid: Tensor, mlp_out: Tensor) -> Tensor:
        """The residual stream leaving the block: ``resid_mid + mlp_out``, times the layer scalar
        where the architecture has one (Gemma 4)."""
        out = resid_mid + mlp_out
        return out if self.layer_scalar is None else out * self.layer_scalar

    def post_mlp_linear(self, x: Tensor, scale: Optional[Tensor]) -> Tensor:
        """The FFN post-norm as the linear map it is once its scale is fixed: ``w * x / scale``
        (``scale``: ``ln2_post.hook_scale`` of the run, ``[..., 1]``); the identity without a post-norm.
        Carries a part of the FFN output (an expert's update) to what it adds to the residual stream."""
        if self.ln2_post is None:
            return x
        if scale is None:
            raise ValueError(f"block {self.layer} normalises its FFN output: pass the run's ln2_post.hook_scale")
        w = self.ln2_post.scale_weight.float().to(x.device)
        return (x.float() / scale.float().to(x.device) * w).to(x.dtype)

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        ctx: AttentionContext,
        kv_prefix: Optional[tuple[Tensor, Tensor]] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        resid = self.hook_resid_pre(resid)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(self.attn_branch(resid, ctx, kv_prefix)))
        return self.hook_resid_post(self.add_mlp(resid, self.hook_mlp_out(self.mlp_branch(resid))))


def make_block(cfg: MoEConfig, layer: int) -> nn.Module:
    """The block of ``layer``: :class:`TransformerBlock`, or with ``cfg.hc_mult > 1`` (DeepSeek-V4)
    :class:`moelens.components.hyper.HyperBlock` over several residual streams."""
    if cfg.hc_mult > 1:
        from moelens.components.hyper import HyperBlock

        return HyperBlock(cfg, layer)
    return TransformerBlock(cfg, layer)
