"""DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5), exactly as transformers 5.25's
``DeepseekV32Attention`` / ``GlmMoeDsaAttention``: multi-head latent attention
(:mod:`moelens.components.mla`, ``q_lora_rank`` required) in which every query attends only to the
``index_topk`` earlier keys that a lightning indexer scores highest.

The indexer (:class:`LightningIndexer`; hub ``self_attn.indexer.*``), with ``H = index_n_heads``
heads of width ``D = index_head_dim`` and ``dr = qk_rope_head_dim``::

    q_h    = W_iq c_q                     per head h, from MLA's normalised q latent c_q  [.., H, D]
    k      = LayerNorm_1e-6(W_ik x)       ONE key per token, shared by the heads           [.., D]
    RoPE on the FIRST dr dims of q_h and k: half-split (DeepSeek-V3.2) or interleaved pairs written
         de-interleaved (GLM-5, ``index_rope="deinterleave"``); the other D - dr dims pass through
    w_h    = (W_iw x)_h * H^-1/2          per-head weights (fp32)
    score[q, t] = sum_h w_h * relu(q_h . k_t * D^-1/2)        (fp32; -inf where t is not visible)
    kept[q] = top-index_topk keys of score[q, :]                (torch.topk, as transformers)

then MLA's softmax runs over the kept keys only (the others are masked like future keys).

GLM-5 cross-layer sharing (``cfg.index_shared_layers``): such a layer has no indexer and reuses the
selection of the nearest earlier layer that has one (handed on through ``ctx.carry``); what a layer
used is what it hands on, so an edit of ``hook_index_topk`` on a shared layer reaches the shared
layers after it, as in transformers.

Hooks (besides MLA's), in execution order (all position-aligned):

=============================  ============================================  ====================================
``indexer.hook_q``             ``[batch, pos, index_head, d_index]``         indexer queries after RoPE
``indexer.hook_k``             ``[batch, pos, d_index]``                     indexer keys after RoPE (one per token)
``indexer.hook_weights``       ``[batch, pos, index_head]``                  per-head weights ``w_h`` (fp32)
``indexer.hook_scores``        ``[batch, pos, key_pos]``                     ``score[q, t]`` (fp32, -inf at invisible keys)
``hook_index_topk``            ``[batch, pos, index_topk]`` int64            kept key positions per query (-1: empty slot)
=============================  ============================================  ====================================

``hook_index_topk`` holds absolute key positions in descending score order (``torch.topk``); slots
beyond the visible keys hold -1 (a query at position ``q`` has ``q + 1`` visible keys, so it keeps
all of them while ``q + 1 <= index_topk``). Editing it changes which keys the query attends to
(-1 = no key; indices must lie in ``[-1, key_pos)``); editing ``indexer.hook_scores`` changes the
selection. The indexer runs under no gradient in transformers; here gradients do not flow through
the (discrete) selection either, and the scores themselves are differentiable.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from moelens.components.attention import AttentionContext, attend
from moelens.components.mla import MLAttention
from moelens.components.rope import apply_rope_deinterleave, apply_rope_half
from moelens.config import MoEConfig
from moelens.generation import KVCacheLayer
from moelens.hooks import ShapedHookPoint, has_hooks

INDEX_K_NORM_EPS = 1e-6  # transformers builds the indexer's k_norm as nn.LayerNorm(eps=1e-6)


class LightningIndexer(nn.Module):
    """Scores every visible key for every query (see the module docstring). Weights ``[out, in]``:
    ``w_q`` (hub ``wq_b``), ``w_k`` (``wk``), ``k_norm_w``/``b_k_norm`` (``k_norm``), ``w_weights``
    (``weights_proj``)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.index_n_heads, cfg.index_head_dim
        self.w_q = nn.Parameter(torch.empty(h * d, cfg.q_lora_rank))
        self.w_k = nn.Parameter(torch.empty(d, cfg.d_model))
        self.k_norm_w = nn.Parameter(torch.ones(d))
        self.b_k_norm = nn.Parameter(torch.zeros(d))
        self.w_weights = nn.Parameter(torch.empty(h, cfg.d_model))
        self.rope = apply_rope_half if cfg.index_rope == "half" else apply_rope_deinterleave
        self.hook_q = ShapedHookPoint("batch pos index_head d_index")
        self.hook_k = ShapedHookPoint("batch pos d_index")
        self.hook_weights = ShapedHookPoint("batch pos index_head")
        self.hook_scores = ShapedHookPoint("batch pos key_pos")

    def keys(self, x: Float[Tensor, "batch pos d_model"], ctx: AttentionContext) -> Float[Tensor, "batch pos d_index"]:
        """The indexer keys of ``x``'s positions, after RoPE (``hook_k``)."""
        dr = self.cfg.qk_rope_head_dim
        k = F.layer_norm(F.linear(x, self.w_k), (self.cfg.index_head_dim,), self.k_norm_w, self.b_k_norm,
                         INDEX_K_NORM_EPS)[:, :, None]
        k = torch.cat([self.rope(k[..., :dr], ctx.cos, ctx.sin), k[..., dr:]], dim=-1)[:, :, 0]
        return self.hook_k(k)

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        q_latent: Float[Tensor, "batch pos q_lora_rank"],
        ctx: AttentionContext,
        allowed: Bool[Tensor, "batch pos key_pos"],
        k_prefix: Optional[Float[Tensor, "batch prefix d_index"]] = None,
        cache_layer=None,
    ) -> Float[Tensor, "batch pos key_pos"]:
        """Scores ``[batch, pos, key_pos]`` of the keys (``k_prefix``'s or the generation cache's
        earlier positions, then ``x``'s) for ``x``'s queries; -inf where ``allowed`` is False."""
        cfg = self.cfg
        b, p, _ = x.shape
        h, d, dr = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        q = F.linear(q_latent, self.w_q).view(b, p, h, d)
        q = self.hook_q(torch.cat([self.rope(q[..., :dr], ctx.cos, ctx.sin), q[..., dr:]], dim=-1))
        k = self.keys(x, ctx)
        if cache_layer is not None:
            k = cache_layer.update_index(k)
        elif k_prefix is not None:
            k = torch.cat([k_prefix.to(k.dtype), k], dim=1)
        # as transformers: [b, p, h, d] @ [b, 1, d, t] in fp32, relu, then the weighted head sum
        scores = F.relu(torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * d**-0.5)
        weights = self.hook_weights(F.linear(x.to(self.w_weights.dtype), self.w_weights).float() * h**-0.5)
        index_scores = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)
        return self.hook_scores(index_scores.masked_fill(~allowed, float("-inf")))


def select_topk(
    scores: Float[Tensor, "batch pos key_pos"], allowed: Bool[Tensor, "batch pos key_pos"], index_topk: int
) -> Int[Tensor, "batch pos index_topk"]:
    """The ``index_topk`` best visible keys per query (``torch.topk`` order); -1 in slots that
    ``torch.topk`` would fill with invisible keys and in slots beyond the number of keys."""
    n_k = scores.shape[-1]
    idx = scores.topk(min(index_topk, n_k), dim=-1).indices
    idx = torch.where(allowed.expand_as(scores).gather(-1, idx), idx, -1)
    if idx.shape[-1] < index_topk:
        idx = F.pad(idx, (0, index_topk - idx.shape[-1]), value=-1)
    return idx


def keep_mask(topk: Int[Tensor, "batch pos index_topk"], n_k: int) -> Bool[Tensor, "batch pos key_pos"]:
    """True at the key positions listed in ``topk`` (-1 entries list none)."""
    slots = torch.where(topk < 0, n_k, topk).long()
    keep = torch.zeros(*topk.shape[:-1], n_k + 1, dtype=torch.bool, device=topk.device)
    return keep.scatter_(-1, slots, True)[..., :n_k]


class DSAttention(MLAttention):
    """MLA whose queries attend only to the keys their layer's indexer keeps (or, on a GLM-5
    shared layer, the keys the nearest earlier indexer kept)."""

    def __init__(self, cfg: MoEConfig, layer: int):
        super().__init__(cfg)
        self.shares_index = layer in cfg.index_shared_layers
        if not self.shares_index:
            self.indexer = LightningIndexer(cfg)
        self.hook_index_topk = ShapedHookPoint("batch pos index_topk", kind="int")
        for name in ("hook_attn_scores", "hook_pattern", "hook_z"):  # registration order = execution order
            hp = getattr(self, name)
            delattr(self, name)
            setattr(self, name, hp)

    @property
    def prefix_hooks(self) -> tuple[str, ...]:
        """What a suffix run (:mod:`moelens.tracing.engine`) passes as ``kv_prefix`` for the positions
        before the suffix: post-RoPE keys, values and (with an indexer) the indexer keys."""
        return ("hook_rot_k", "hook_v") + (() if self.shares_index else ("indexer.hook_k",))

    def new_cache_layer(self) -> "DSACacheLayer":
        return DSACacheLayer()

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        ctx: AttentionContext,
        kv_prefix=None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``kv_prefix``: a generation cache layer, or a tuple ``(rot_k, v[, index_k])`` of the earlier
        positions (``index_k`` needed where the layer has an indexer)."""
        cfg = self.cfg
        b, p, _ = x.shape
        q, k, v, q_latent = self.qkv(x, ctx)
        cache_layer = index_prefix = None
        if hasattr(kv_prefix, "update"):  # a generation cache layer (DSACacheLayer)
            k, v = kv_prefix.update(k, v)
            cache_layer = kv_prefix
        elif kv_prefix is not None:
            k, v = torch.cat([kv_prefix[0], k], 1), torch.cat([kv_prefix[1], v], 1)
            index_prefix = kv_prefix[2] if len(kv_prefix) > 2 else None
            if index_prefix is None and not self.shares_index:
                raise ValueError("a DSA layer with an indexer needs its earlier indexer keys: kv_prefix=(k, v, index_k)")
        n_k = k.shape[1]
        allowed = ctx.allowed(p, n_k, x.device).expand(b, p, n_k)
        if self.shares_index:
            topk = ctx.carry.index_topk
            if topk is None:
                raise ValueError(
                    "this DSA layer reuses the top-k of an earlier indexer layer (GLM-5 index sharing), but none "
                    "ran in this forward: start the forward at a layer with an indexer (or set ctx.carry.index_topk)"
                )
            topk = topk.to(x.device)
        else:
            scores = self.indexer(x, q_latent, ctx, allowed, k_prefix=index_prefix, cache_layer=cache_layer)
            topk = select_topk(scores, allowed, cfg.index_topk)
        topk = self.hook_index_topk(topk)
        if has_hooks(self.hook_index_topk) and topk.numel() and (int(topk.min()) < -1 or int(topk.max()) >= n_k):
            raise IndexError(
                f"{self.hook_index_topk.name}: kept key positions must lie in [-1, {n_k}) "
                f"(got min {int(topk.min())}, max {int(topk.max())})"
            )
        ctx.carry.index_topk = topk
        z = self.hook_z(attend(self, q, k, v, ctx, self.scale, keep=keep_mask(topk, n_k)))
        return F.linear(z.reshape(b, p, -1), self.w_o)


class DSACacheLayer(KVCacheLayer):
    """Generation cache of a DSA layer: MLA's post-RoPE keys and values plus the indexer keys."""

    def __init__(self) -> None:
        super().__init__()
        self.index_k: Optional[Tensor] = None

    def update_index(self, k: Tensor) -> Tensor:
        if self.index_k is not None:
            k = torch.cat([self.index_k.to(k.device), k], dim=1)
        self.index_k = k
        return k

    def select(self, rows: Tensor) -> None:
        super().select(rows)
        if self.index_k is not None:
            self.index_k = self.index_k[rows.to(self.index_k.device)]
