"""A pre-norm decoder block: ``h += Attn(LN1(h)); h += FFN(LN2(h))`` with residual hooks."""

from __future__ import annotations

from typing import Optional

from jaxtyping import Float
from torch import Tensor, nn

from moelens.components.attention import Attention, AttentionContext
from moelens.components.mlp import GatedMLP
from moelens.components.moe import MoE
from moelens.components.norm import RMSNorm
from moelens.config import MoEConfig
from moelens.hooks import ShapedHookPoint


def make_attention(cfg: MoEConfig, layer: Optional[int] = None) -> nn.Module:
    if layer is not None and layer in cfg.linear_attn_layers:
        from moelens.components.gated_deltanet import GatedDeltaNet

        return GatedDeltaNet(cfg)
    if cfg.attention == "compressed":  # DeepSeek-V4: sliding window + compressed (sparse) attention
        from moelens.components.compressed_attention import CompressedAttention

        return CompressedAttention(cfg, 0 if layer is None else layer)
    if cfg.dsa:  # DeepSeek Sparse Attention: MLA plus the lightning indexer (DeepSeek-V3.2, GLM-5)
        from moelens.components.dsa import DSAttention

        return DSAttention(cfg, 0 if layer is None else layer)
    if cfg.attention == "mla":
        from moelens.components.mla import MLAttention

        return MLAttention(cfg)
    return Attention(cfg, layer)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: MoEConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.is_moe = layer in cfg.moe_layers
        # registration order = execution order, so `model.hook_dict` lists hooks as they fire
        self.hook_resid_pre = ShapedHookPoint("batch pos d_model")
        self.ln1 = RMSNorm(cfg.d_model, cfg.rms_norm_eps, zero_centered=cfg.norm_zero_centered,
                           weight_fp32=cfg.norm_weight_fp32)
        self.is_linear_attn = layer in cfg.linear_attn_layers  # mixer = Gated DeltaNet, not attention
        self.attn = make_attention(cfg, layer)
        self.hook_attn_out = ShapedHookPoint("batch pos d_model")
        self.hook_resid_mid = ShapedHookPoint("batch pos d_model")
        self.ln2 = RMSNorm(cfg.d_model, cfg.rms_norm_eps, zero_centered=cfg.norm_zero_centered,
                           weight_fp32=cfg.norm_weight_fp32)
        self.mlp = MoE(cfg, layer) if self.is_moe else GatedMLP(cfg.d_model, cfg.d_mlp)
        self.hook_mlp_out = ShapedHookPoint("batch pos d_model")
        self.hook_resid_post = ShapedHookPoint("batch pos d_model")

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        ctx: AttentionContext,
        kv_prefix: Optional[tuple[Tensor, Tensor]] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        resid = self.hook_resid_pre(resid)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(self.attn(self.ln1(resid), ctx, kv_prefix)))
        return self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(self.ln2(resid))))


def make_block(cfg: MoEConfig, layer: int) -> nn.Module:
    """The block of ``layer``: :class:`TransformerBlock`, or with ``cfg.hc_mult > 1`` (DeepSeek-V4)
    :class:`moelens.components.hyper.HyperBlock` over several residual streams."""
    if cfg.hc_mult > 1:
        from moelens.components.hyper import HyperBlock

        return HyperBlock(cfg, layer)
    return TransformerBlock(cfg, layer)
