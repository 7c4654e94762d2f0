"""Grouped-query attention with optional QK-norm (per head or whole vector), biases and RoPE
(on all of each head's dims, or with ``cfg.rotary_dim`` on the leading ``rotary_dim`` only, GLM-4.x).

Shapes follow TransformerLens: ``hook_q [batch, pos, head, d_head]``, ``hook_k``/``hook_v``
``[batch, pos, kv_head, d_head]``, ``hook_attn_scores``/``hook_pattern``
``[batch, head, query_pos, key_pos]``, ``hook_z [batch, pos, head, d_head_v]``.
``hook_rot_q``/``hook_rot_k`` are q and k after RoPE (what the dot product sees).

When nothing is attached to ``hook_attn_scores`` or ``hook_pattern`` the scores are never
materialised (PyTorch SDPA); otherwise they are computed explicitly (softmax in fp32, as
transformers' eager path). Both paths are tested equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn

from moelens.components.norm import rms_norm
from moelens.components.rope import apply_rope_half, apply_rope_interleaved, apply_rope_partial
from moelens.config import MoEConfig
from moelens.hooks import ShapedHookPoint, has_hooks


@dataclass
class AttentionContext:
    """What every attention layer of one forward shares.

    ``cos``/``sin``: fp32 ``[batch, pos, rope_dim/2]`` for the query positions.
    ``key_mask``: ``[batch, key_pos]`` True for real tokens (None: no padding).
    ``q_offset``: absolute position of the first query (> 0 when earlier keys come from a prefix).
    """

    cos: Tensor
    sin: Tensor
    key_mask: Optional[Bool[Tensor, "batch key_pos"]]
    q_offset: int = 0

    def additive_mask(self, n_q: int, n_k: int, dtype: torch.dtype, device, always: bool = False) -> Optional[Tensor]:
        """``[batch or 1, 1, n_q, n_k]`` additive mask; None for plain causal from position 0
        unless ``always``."""
        if self.key_mask is None and (self.q_offset == 0 or n_q == 1) and not always:
            return None  # plain causal (or one query seeing every key): SDPA needs no mask
        q_pos = torch.arange(n_q, device=device)[:, None] + self.q_offset
        allowed = torch.arange(n_k, device=device)[None, :] <= q_pos
        allowed = allowed[None, None]
        if self.key_mask is not None:
            allowed = allowed & self.key_mask[:, None, None, :].to(device)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def attend(
    attn: nn.Module,
    q: Float[Tensor, "batch pos head d_qk"],
    k: Float[Tensor, "batch key_pos kv_head d_qk"],
    v: Float[Tensor, "batch key_pos kv_head d_v"],
    ctx: AttentionContext,
    scale: float,
) -> Float[Tensor, "batch pos head d_v"]:
    """softmax(q k^T * scale + mask) v, with the score/pattern hooks of ``attn`` when used."""
    n_q, n_k = q.shape[1], k.shape[1]
    groups = q.shape[2] // k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if not (has_hooks(attn.hook_attn_scores) or has_hooks(attn.hook_pattern)):
        mask = ctx.additive_mask(n_q, n_k, q.dtype, q.device)
        z = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, is_causal=mask is None and n_q > 1, scale=scale,
            enable_gqa=groups > 1,
        )
        return z.transpose(1, 2)
    if groups > 1:
        kh, vh = kh.repeat_interleave(groups, dim=1), vh.repeat_interleave(groups, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    scores = scores + ctx.additive_mask(n_q, n_k, q.dtype, q.device, always=True)
    scores = attn.hook_attn_scores(scores)
    pattern = attn.hook_pattern(torch.softmax(scores.float(), dim=-1).to(q.dtype))
    return torch.matmul(pattern, vh).transpose(1, 2)


class Attention(nn.Module):
    """GQA self-attention (Mixtral, Qwen2/3-MoE, OLMoE). Weights use the ``[out, in]`` layout."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        h, kv, d, dm = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model
        self.W_Q = nn.Parameter(torch.empty(h * d, dm))
        self.W_K = nn.Parameter(torch.empty(kv * d, dm))
        self.W_V = nn.Parameter(torch.empty(kv * d, dm))
        self.W_O = nn.Parameter(torch.empty(dm, h * d))
        if cfg.qkv_bias:
            self.b_Q = nn.Parameter(torch.zeros(h * d))
            self.b_K = nn.Parameter(torch.zeros(kv * d))
            self.b_V = nn.Parameter(torch.zeros(kv * d))
        else:
            self.b_Q = self.b_K = self.b_V = None
        if cfg.qk_norm == "per_head":
            self.q_norm_w = nn.Parameter(torch.ones(d))
            self.k_norm_w = nn.Parameter(torch.ones(d))
        elif cfg.qk_norm == "full":
            self.q_norm_w = nn.Parameter(torch.ones(h * d))
            self.k_norm_w = nn.Parameter(torch.ones(kv * d))
        self.scale = d**-0.5
        self.hook_q = ShapedHookPoint("batch pos head d_head")
        self.hook_k = ShapedHookPoint("batch pos kv_head d_head")
        self.hook_v = ShapedHookPoint("batch pos kv_head d_head")
        self.hook_rot_q = ShapedHookPoint("batch pos head d_head")
        self.hook_rot_k = ShapedHookPoint("batch pos kv_head d_head")
        self.hook_attn_scores = ShapedHookPoint("batch head query_pos key_pos")
        self.hook_pattern = ShapedHookPoint("batch head query_pos key_pos")
        self.hook_z = ShapedHookPoint("batch pos head d_head")

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        ctx: AttentionContext,
        kv_prefix: Optional[tuple[Tensor, Tensor]] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        cfg = self.cfg
        b, p, _ = x.shape
        q = F.linear(x, self.W_Q, self.b_Q)
        k = F.linear(x, self.W_K, self.b_K)
        v = F.linear(x, self.W_V, self.b_V)
        if cfg.qk_norm == "full":
            q, k = rms_norm(q, self.q_norm_w, cfg.rms_norm_eps), rms_norm(k, self.k_norm_w, cfg.rms_norm_eps)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.view(b, p, cfg.n_heads, cfg.d_head)
        k = k.view(b, p, cfg.n_kv_heads, cfg.d_head)
        v = v.view(b, p, cfg.n_kv_heads, cfg.d_head)
        if cfg.qk_norm == "per_head":
            q, k = rms_norm(q, self.q_norm_w, cfg.rms_norm_eps), rms_norm(k, self.k_norm_w, cfg.rms_norm_eps)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        rope = apply_rope_interleaved if cfg.rope_interleaved else apply_rope_half
        # partial RoPE (cfg.rotary_dim): only the leading rotary_dim dims of each head rotate
        q = self.hook_rot_q(apply_rope_partial(q, ctx.cos, ctx.sin, rope))
        k = self.hook_rot_k(apply_rope_partial(k, ctx.cos, ctx.sin, rope))
        if hasattr(kv_prefix, "update"):  # a generation cache layer (moelens.generation.KVCacheLayer)
            k, v = kv_prefix.update(k, v)
        elif kv_prefix is not None:
            k, v = torch.cat([kv_prefix[0], k], 1), torch.cat([kv_prefix[1], v], 1)
        z = self.hook_z(attend(self, q, k, v, ctx, self.scale))
        return F.linear(z.reshape(b, p, -1), self.W_O)
