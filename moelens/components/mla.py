"""Multi-head latent attention (DeepSeek-V2), exactly as transformers 5 ``DeepseekV2Attention``.

Notation: ``dn = qk_nope_head_dim``, ``dr = qk_rope_head_dim`` (axis ``d_rope``), ``dv = v_head_dim``
(``d_head_v``), ``d_head = dn + dr``; ``kv_head`` equals ``head`` (every head has its own key).
::

    q      = W_q x                        or  W_q_b RMSNorm_1e-6(W_q_a x)       [.., head, dn+dr]
    c, k_pe = split(W_kv_a x, [kv_lora_rank, dr])     # one latent + ONE shared rope key per token
    c_kv   = RMSNorm_1e-6(c)
    k_nope, v = split(W_kv_b c_kv, [dn, dv])          per head
    k      = [k_nope || broadcast(k_pe)]
    rot    = interleaved RoPE (pairs 2i, 2i+1, fp32) on the last dr dims of q and k only
             (``rope_arith="complex"``: as transformers' fp32 complex multiply, see moelens.components.rope)
    z      = softmax(rot_q rot_k^T * (dn+dr)^-1/2 * mscale(factor, mscale_all_dim)^2 + mask) v
    out    = w_o concat_heads(z)

The inner norms use eps 1e-6 whatever ``rms_norm_eps`` says (transformers builds them without eps).

DeepSeek-V3 / GLM-4.7-Flash (``cfg.rope_deinterleave``): the interleaved pairs are rotated in the model
dtype with cos/sin cast to it, and the rotated dims are written de-interleaved (``[rotated evens ||
rotated odds]``), exactly as transformers' ``apply_rotary_pos_emb_interleave``. So in
``hook_rot_q``/``hook_rot_k`` the last ``dr`` dims are in that permuted order (``hook_q``/``hook_k``
keep the checkpoint's interleaved order); the dot products are those of the interleaved rotation.

Hooks, in execution order (all position-aligned):

==================  ===================================  =============================================
``hook_q_latent``   ``[batch, pos, q_lora_rank]``        normalised q latent (only with ``q_lora_rank``)
``hook_q``          ``[batch, pos, head, d_head]``       per-head query before RoPE
``hook_kv_latent``  ``[batch, pos, kv_lora_rank]``       normalised compressed latent ``c_kv``
``hook_k_pe``       ``[batch, pos, d_rope]``             the shared rope key before RoPE
``hook_k``          ``[batch, pos, kv_head, d_head]``    per-head key before RoPE (k_nope || k_pe)
``hook_v``          ``[batch, pos, kv_head, d_head_v]``  per-head values
``hook_rot_q``      ``[batch, pos, head, d_head]``       query after RoPE (what the dot product sees)
``hook_rot_k``      ``[batch, pos, kv_head, d_head]``    key after RoPE
``hook_attn_scores``/``hook_pattern``  ``[batch, head, query_pos, key_pos]`` (only materialised when hooked)
``hook_z``          ``[batch, pos, head, d_head_v]``     per-head attention output before ``w_o``
==================  ===================================  =============================================

Edits propagate: an edited ``hook_k_pe`` or ``hook_kv_latent`` flows into ``hook_k``/``hook_v``; an
edited ``hook_k``/``hook_q`` is rotated as given (RoPE acts on each head's last ``dr`` dims).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from moelens.components.attention import AttentionContext, attend
from moelens.components.norm import rms_norm
from moelens.components.rope import rope_fn, yarn_softmax_scale
from moelens.components.tl_views import MLAViews
from moelens.config import MoEConfig
from moelens.hooks import ShapedHookPoint

LATENT_NORM_EPS = 1e-6  # transformers' q_a_layernorm / kv_a_layernorm are built without an eps argument


class MLAttention(MLAViews, nn.Module):
    """DeepSeek-V2 multi-head latent attention. Weights use the ``[out, in]`` layout."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        h, dm = cfg.n_heads, cfg.d_model
        dn, dr, dv, r_kv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        if dr % 2:
            raise ValueError(f"qk_rope_head_dim={dr} must be even for rotary embeddings")
        d_qk = dn + dr
        if cfg.q_lora_rank:
            self.W_q_a = nn.Parameter(torch.empty(cfg.q_lora_rank, dm))
            self.q_a_norm_w = nn.Parameter(torch.ones(cfg.q_lora_rank))
            self.W_q_b = nn.Parameter(torch.empty(h * d_qk, cfg.q_lora_rank))
        else:
            self.w_q = nn.Parameter(torch.empty(h * d_qk, dm))
        self.W_kv_a = nn.Parameter(torch.empty(r_kv + dr, dm))
        self.kv_a_norm_w = nn.Parameter(torch.ones(r_kv))
        self.W_kv_b = nn.Parameter(torch.empty(h * (dn + dv), r_kv))
        self.w_o = nn.Parameter(torch.empty(dm, h * dv))
        self.scale = d_qk**-0.5 * yarn_softmax_scale(cfg.yarn)
        # registration order = execution order
        if cfg.q_lora_rank:
            self.hook_q_latent = ShapedHookPoint("batch pos q_lora_rank")
        self.hook_q = ShapedHookPoint("batch pos head d_head")
        self.hook_kv_latent = ShapedHookPoint("batch pos kv_lora_rank")
        self.hook_k_pe = ShapedHookPoint("batch pos d_rope")
        self.hook_k = ShapedHookPoint("batch pos kv_head d_head")
        self.hook_v = ShapedHookPoint("batch pos kv_head d_head_v")
        self.hook_rot_q = ShapedHookPoint("batch pos head d_head")
        self.hook_rot_k = ShapedHookPoint("batch pos kv_head d_head")
        self.hook_attn_scores = ShapedHookPoint("batch head query_pos key_pos")
        self.hook_pattern = ShapedHookPoint("batch head query_pos key_pos")
        self.hook_z = ShapedHookPoint("batch pos head d_head_v")

    def _rope(self, t: Tensor, ctx: AttentionContext) -> Tensor:
        """Rotate the last ``qk_rope_head_dim`` dims of ``t [batch, pos, head, d_head]``."""
        dn = self.cfg.qk_nope_head_dim
        return torch.cat([t[..., :dn], rope_fn(self.cfg)(t[..., dn:], ctx.cos, ctx.sin)], dim=-1)

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        ctx: AttentionContext,
        kv_prefix: Optional[tuple[Tensor, Tensor]] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        b, p, _ = x.shape
        q, k, v, _ = self.qkv(x, ctx)
        if hasattr(kv_prefix, "update"):  # a generation cache layer (moelens.generation.KVCacheLayer)
            k, v = kv_prefix.update(k, v)
        elif kv_prefix is not None:
            k, v = torch.cat([kv_prefix[0], k], 1), torch.cat([kv_prefix[1], v], 1)
        z = self.hook_z(attend(self, q, k, v, ctx, self.scale))
        return F.linear(z.reshape(b, p, -1), self.w_o)

    def qkv(self, x: Float[Tensor, "batch pos d_model"], ctx: AttentionContext):
        """Rotated queries and keys, values, and the normalised q latent (None without ``q_lora_rank``)."""
        cfg = self.cfg
        b, p, _ = x.shape
        h, dn, dv, r_kv = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        q_latent = None
        if cfg.q_lora_rank:
            q_latent = self.hook_q_latent(rms_norm(F.linear(x, self.W_q_a), self.q_a_norm_w, LATENT_NORM_EPS))
            q = F.linear(q_latent, self.W_q_b)
        else:
            q = F.linear(x, self.w_q)
        q = self.hook_q(q.view(b, p, h, -1))

        c, k_pe = F.linear(x, self.W_kv_a).split([r_kv, cfg.qk_rope_head_dim], dim=-1)
        c_kv = self.hook_kv_latent(rms_norm(c, self.kv_a_norm_w, LATENT_NORM_EPS))
        k_pe = self.hook_k_pe(k_pe)
        k_nope, v = F.linear(c_kv, self.W_kv_b).view(b, p, h, dn + dv).split([dn, dv], dim=-1)
        k = self.hook_k(torch.cat([k_nope, k_pe[:, :, None, :].expand(b, p, h, -1)], dim=-1))
        v = self.hook_v(v)

        q = self.hook_rot_q(self._rope(q, ctx))
        k = self.hook_rot_k(self._rope(k, ctx))
        return q, k, v, q_latent
