"""The token mixer of a layer, chosen by config data: GQA attention, MLA, MLA with DeepSeek Sparse
Attention, DeepSeek-V4's compressed attention, or a Gated DeltaNet linear-attention layer. Shared by
:class:`moelens.components.block.TransformerBlock` and :class:`moelens.components.hyper.HyperBlock`."""

from __future__ import annotations

from typing import Optional

from torch import nn

from moelens.components.attention import Attention
from moelens.config import MoEConfig


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
