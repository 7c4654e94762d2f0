"""Grouped-query attention with optional QK-norm (per head or whole vector), biases and RoPE
(on all of each head's dims, or with ``cfg.rotary_dim`` on the leading ``rotary_dim`` only, GLM-4.x),
sliding windows (per layer, ``cfg.layer_types``) and attention sinks (gpt-oss, ``hook_sink_weight``).

Shapes follow TransformerLens: ``hook_q [batch, pos, head, d_head]``, ``hook_k``/``hook_v``
``[batch, pos, kv_head, d_head]``, ``hook_attn_scores``/``hook_pattern``
``[batch, head, query_pos, key_pos]``, ``hook_z [batch, pos, head, d_head_v]``.
``hook_rot_q``/``hook_rot_k`` are q and k after RoPE (what the dot product sees: on Llama 4 also
after its L2 QK-norm, and q after its temperature on the NoPE layers; on NoPE layers there is no
rotation). Chunked attention (``cfg.layer_types`` "chunked_attention", Llama 4) masks keys outside
the query's chunk.

When nothing is attached to ``hook_attn_scores`` or ``hook_pattern`` the scores are never
materialised (PyTorch SDPA); otherwise they are computed explicitly (softmax in fp32, as
transformers' eager path). Both paths are tested equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn

from moelens.components.norm import l2_norm, norm_fn, rms_norm, rms_norm_weight_fp32
from moelens.components.rope import apply_rope_partial, rope_fn
from moelens.components.tl_views import GQAViews
from moelens.config import MoEConfig
from moelens.hooks import ShapedHookPoint, has_hooks


class LayerCarry:
    """What one layer hands to later layers of the same forward, held by reference (a context copied
    to another device by :mod:`moelens.placement` shares it): DeepSeek Sparse Attention's last top-k
    selection ``index_topk`` ``[batch, pos, index_topk]``, reused by GLM-5's shared-indexer layers."""

    def __init__(self) -> None:
        self.index_topk: Optional[Tensor] = None


@dataclass
class AttentionContext:
    """What every attention layer of one forward shares.

    ``cos``/``sin``: fp32 ``[batch, pos, rope_dim/2]`` for the query positions.
    ``key_mask``: ``[batch, key_pos]`` True for real tokens (None: no padding).
    ``q_offset``: absolute position of the first query (> 0 when earlier keys come from a prefix).
    ``carry``: state handed from layer to layer within the forward (:class:`LayerCarry`).
    ``positions``: ``[batch or 1, pos]`` RoPE positions of the queries (for layers with their own
    RoPE tables, DeepSeek-V4's compressed attention). ``tokens``: ``[batch, pos]`` token ids of the
    queries when the forward started from tokens (DeepSeek-V4's hash-routed layers), else None.
    """

    cos: Tensor
    sin: Tensor
    key_mask: Optional[Bool[Tensor, "batch key_pos"]]
    q_offset: int = 0
    # other RoPE tables by group (cfg.rope_group: Gemma 4's full-attention layers use "full")
    rope_tables: dict = field(default_factory=dict)
    carry: LayerCarry = field(default_factory=LayerCarry)
    positions: Optional[Tensor] = None
    tokens: Optional[Tensor] = None

    def allowed(self, n_q: int, n_k: int, device) -> Bool[Tensor, "batch query_pos key_pos"]:
        """``[batch or 1, n_q, n_k]`` True where query ``i`` (absolute position ``q_offset + i``) may
        see key ``k``: causal, and not a padding key."""
        q_pos = torch.arange(n_q, device=device)[:, None] + self.q_offset
        allowed = (torch.arange(n_k, device=device)[None, :] <= q_pos)[None]
        if self.key_mask is not None:
            allowed = allowed & self.key_mask[:, None, :].to(device)
        return allowed

    def additive_mask(
        self, n_q: int, n_k: int, dtype: torch.dtype, device, always: bool = False, window: Optional[int] = None,
        chunk: Optional[int] = None,
    ) -> Optional[Tensor]:
        """``[batch or 1, 1, n_q, n_k]`` additive mask; None for plain causal from position 0
        unless ``always``. ``window``: sliding-window attention, key ``k`` visible from query ``q``
        iff ``q - window < k <= q`` in absolute positions (keys ``0..n_k-1``, queries from ``q_offset``).
        ``chunk`` (Llama 4 chunked attention): key ``k`` visible iff ``k <= q`` and both lie in the same
        chunk of ``chunk`` positions, chunks counted from each row's first real token (its left padding
        removed, as transformers' ``create_chunked_causal_mask``)."""
        if (self.key_mask is None and (self.q_offset == 0 or n_q == 1) and not always and window is None
                and chunk is None):
            return None  # plain causal (or one query seeing every key): SDPA needs no mask
        q_pos = torch.arange(n_q, device=device)[:, None] + self.q_offset
        k_pos = torch.arange(n_k, device=device)[None, :]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed = allowed & (k_pos > q_pos - window)
        allowed = allowed[None, None]
        if chunk is not None:
            pad = torch.zeros(1, dtype=torch.long, device=device)
            if self.key_mask is not None:  # left padding of each row: chunks start at its first real token
                km = self.key_mask.to(device).long()
                pad = (km.cumsum(-1) == 0).sum(-1)
            pad = pad[:, None, None, None]
            allowed = allowed & (torch.div(k_pos - pad, chunk, rounding_mode="floor")
                                 == torch.div(q_pos - pad, chunk, rounding_mode="floor"))
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
    window: Optional[int] = None,
    sinks: Optional[Float[Tensor, "head"]] = None,
    chunk: Optional[int] = None,
    keep: Optional[Bool[Tensor, "batch pos key_pos"]] = None,
) -> Float[Tensor, "batch pos head d_v"]:
    """softmax(q k^T * scale + mask) v, with the score/pattern hooks of ``attn`` when used.

    ``keep`` (DeepSeek Sparse Attention): only these keys of each query, on top of the causal and
    padding mask (the others get the dtype's minimum, as transformers masks them).

    ``window``: sliding-window mask (absolute positions); ``chunk``: chunked-attention mask. ``sinks`` (gpt-oss): one logit per head
    appended as an extra softmax column and dropped afterwards, computed as transformers' gpt-oss
    eager attention does (row max subtracted, softmax in the scores' dtype); its probability is
    ``attn.hook_sink_weight``. Sinks always take the explicit path."""
    n_q, n_k = q.shape[1], k.shape[1]
    groups = q.shape[2] // k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if sinks is not None:
        if chunk is not None:
            raise NotImplementedError("attention sinks with chunked attention")
        return _attend_with_sinks(attn, qh, kh, vh, ctx, scale, window, sinks, groups)
    if not (has_hooks(attn.hook_attn_scores) or has_hooks(attn.hook_pattern)):
        mask = ctx.additive_mask(n_q, n_k, q.dtype, q.device, window=window, chunk=chunk, always=keep is not None)
        if keep is not None:
            mask = mask.masked_fill(~keep[:, None], torch.finfo(q.dtype).min)
        z = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, is_causal=mask is None and n_q > 1, scale=scale,
            enable_gqa=groups > 1,
        )
        return z.transpose(1, 2)
    if groups > 1:
        kh, vh = kh.repeat_interleave(groups, dim=1), vh.repeat_interleave(groups, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    mask = ctx.additive_mask(n_q, n_k, q.dtype, q.device, always=True, window=window, chunk=chunk)
    if keep is not None:
        mask = mask.masked_fill(~keep[:, None], torch.finfo(q.dtype).min)
    scores = attn.hook_attn_scores(scores + mask)
    pattern = attn.hook_pattern(torch.softmax(scores.float(), dim=-1).to(q.dtype))
    return torch.matmul(pattern, vh).transpose(1, 2)


def _attend_with_sinks(attn, qh, kh, vh, ctx, scale, window, sinks, groups):
    """transformers' gpt-oss ``eager_attention_forward``, plus the sink-share hook.

    ``hook_sink_weight [batch, head, query_pos]`` is the softmax probability of the sink column
    (the attention share that goes nowhere). Editing it rescales the row's token weights so that
    they sum to ``1 - new sink weight`` (setting it to 0 renormalises attention over the tokens;
    an in-place edit counts too);
    ``hook_pattern`` (the token weights, sink column dropped) fires after that."""
    b, n_q, n_k = qh.shape[0], qh.shape[2], kh.shape[2]
    if groups > 1:
        kh, vh = kh.repeat_interleave(groups, dim=1), vh.repeat_interleave(groups, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    scores = scores + ctx.additive_mask(n_q, n_k, qh.dtype, qh.device, always=True, window=window)
    scores = attn.hook_attn_scores(scores)
    sink_col = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(b, -1, n_q, 1)
    combined = torch.cat([scores, sink_col], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)
    pattern, sink = probs[..., :-1], probs[..., -1]
    # a copy to compare with: a hook may edit the sink weights in place (and return None)
    before = sink.clone() if has_hooks(attn.hook_sink_weight) else sink
    new_sink = attn.hook_sink_weight(sink)
    if new_sink is not before:
        if new_sink.shape != sink.shape:
            raise ValueError(f"{attn.hook_sink_weight.name}: expected shape {tuple(sink.shape)}, got {tuple(new_sink.shape)}")
        kept = pattern.sum(-1)
        factor = torch.where(kept > 0, (1 - new_sink.to(kept.dtype)) / kept.clamp_min(torch.finfo(kept.dtype).tiny), 0)
        # rescale only if the hook changed a value; decided on the device (no host sync)
        changed = (new_sink != before).any()
        pattern = torch.where(changed, pattern * factor[..., None], pattern)
    pattern = attn.hook_pattern(pattern.to(vh.dtype))
    return torch.matmul(pattern, vh).transpose(1, 2)


class Attention(GQAViews, nn.Module):
    """GQA self-attention (Mixtral, Qwen2/3-MoE, OLMoE). Weights use the ``[out, in]`` layout."""

    def __init__(self, cfg: MoEConfig, layer: int = 0):
        super().__init__()
        self.cfg = cfg
        self.window = cfg.attention_window(layer)  # None: full attention
        self.chunk = cfg.attention_chunk(layer)  # Llama 4 chunked attention (None: not chunked)
        self.use_rope = cfg.uses_rope(layer)  # False on Llama 4's NoPE layers
        # Llama 4: weightless L2 (RMS) norm of q and k after RoPE, on RoPE layers only
        self.l2_qk_norm = cfg.qk_norm == "l2" and self.use_rope
        # Llama 4: attention temperature tuning on the NoPE layers
        self.temperature_floor = cfg.attn_temperature_floor if not self.use_rope else 0
        # per-layer shapes (Gemma 4's full-attention layers have their own head width and kv heads)
        self.d_head, self.n_kv_heads = cfg.layer_d_head(layer), cfg.layer_n_kv_heads(layer)
        self.k_eq_v = cfg.layer_k_eq_v(layer)  # Gemma 4: the value is the (raw) key projection
        self.rope_group = cfg.rope_group(layer)
        h, kv, d, dm = cfg.n_heads, self.n_kv_heads, self.d_head, cfg.d_model
        self.w_q = nn.Parameter(torch.empty(h * d, dm))
        self.w_k = nn.Parameter(torch.empty(kv * d, dm))
        self.w_v = None if self.k_eq_v else nn.Parameter(torch.empty(kv * d, dm))
        self.w_o = nn.Parameter(torch.empty(dm, h * d))
        if cfg.qkv_bias:
            self.b_q = nn.Parameter(torch.zeros(h * d))
            self.b_k = nn.Parameter(torch.zeros(kv * d))
            self.b_v = nn.Parameter(torch.zeros(kv * d))
        else:
            self.b_q = self.b_k = self.b_v = None
        if cfg.qk_norm == "per_head":
            self.q_norm_w = nn.Parameter(torch.ones(d))
            self.k_norm_w = nn.Parameter(torch.ones(d))
        elif cfg.qk_norm == "full":
            self.q_norm_w = nn.Parameter(torch.ones(h * d))
            self.k_norm_w = nn.Parameter(torch.ones(kv * d))
        self.b_o = nn.Parameter(torch.zeros(dm)) if cfg.attn_o_bias else None
        self.sinks = nn.Parameter(torch.zeros(h)) if cfg.attn_sinks else None
        if cfg.attn_output_gate:  # Qwen3.5 / Qwen3-Next: o = w_o (z * sigmoid(W_G x)), per head
            self.W_G = nn.Parameter(torch.empty(h * d, dm))
        self.scale = d**-0.5 if cfg.attn_softmax_scale is None else cfg.attn_softmax_scale
        own = d != cfg.d_head or kv != cfg.n_kv_heads  # axis names of a layer with its own shapes
        dh, kvh = ("d_head_full", "kv_head_full") if own else ("d_head", "kv_head")
        self.hook_q = ShapedHookPoint(f"batch pos head {dh}")
        self.hook_k = ShapedHookPoint(f"batch pos {kvh} {dh}")
        self.hook_v = ShapedHookPoint(f"batch pos {kvh} {dh}")
        self.hook_rot_q = ShapedHookPoint(f"batch pos head {dh}")
        self.hook_rot_k = ShapedHookPoint(f"batch pos {kvh} {dh}")
        self.hook_attn_scores = ShapedHookPoint("batch head query_pos key_pos")
        if cfg.attn_sinks:
            self.hook_sink_weight = ShapedHookPoint("batch head query_pos")
        self.hook_pattern = ShapedHookPoint("batch head query_pos key_pos")
        self.hook_z = ShapedHookPoint(f"batch pos head {dh}")
        if cfg.attn_output_gate:
            self.hook_attn_gate = ShapedHookPoint("batch pos head d_head")  # sigmoid(W_G x), multiplies z

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        ctx: AttentionContext,
        kv_prefix: Optional[tuple[Tensor, Tensor]] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        cfg = self.cfg
        b, p, _ = x.shape
        q = F.linear(x, self.w_q, self.b_q)
        k = F.linear(x, self.w_k, self.b_k)
        v = k if self.k_eq_v else F.linear(x, self.w_v, self.b_v)
        if cfg.qk_norm == "full":
            full_norm = rms_norm_weight_fp32 if cfg.norm_weight_fp32 else rms_norm
            q, k = full_norm(q, self.q_norm_w, cfg.rms_norm_eps), full_norm(k, self.k_norm_w, cfg.rms_norm_eps)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.view(b, p, cfg.n_heads, self.d_head)
        k = k.view(b, p, self.n_kv_heads, self.d_head)
        v = v.view(b, p, self.n_kv_heads, self.d_head)
        if cfg.qk_norm == "per_head":
            qk_norm = rms_norm_weight_fp32 if cfg.norm_weight_fp32 else norm_fn(cfg.norm_zero_centered)
            q, k = qk_norm(q, self.q_norm_w, cfg.rms_norm_eps), qk_norm(k, self.k_norm_w, cfg.rms_norm_eps)
        if cfg.v_norm:  # Gemma 4: weightless RMSNorm of each value head
            v = l2_norm(v, cfg.rms_norm_eps)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.use_rope:
            rope = rope_fn(cfg)
            cos, sin = ctx.rope_tables.get(self.rope_group, (ctx.cos, ctx.sin))
            # partial RoPE (cfg.rotary_dim): only the leading rotary_dim dims of each head rotate
            q, k = apply_rope_partial(q, cos, sin, rope), apply_rope_partial(k, cos, sin, rope)
        if self.l2_qk_norm:
            q, k = l2_norm(q, cfg.rms_norm_eps), l2_norm(k, cfg.rms_norm_eps)
        if self.temperature_floor:
            q = (q * self.temperature(ctx, p, q.device)).to(q.dtype)
        q, k = self.hook_rot_q(q), self.hook_rot_k(k)
        if hasattr(kv_prefix, "update"):  # a generation cache layer (moelens.generation.KVCacheLayer)
            k, v = kv_prefix.update(k, v)
        elif kv_prefix is not None:
            k, v = torch.cat([kv_prefix[0], k], 1), torch.cat([kv_prefix[1], v], 1)
        z = self.hook_z(attend(self, q, k, v, ctx, self.scale, window=self.window, sinks=self.sinks, chunk=self.chunk))
        if cfg.attn_output_gate:
            z = z * self.hook_attn_gate(torch.sigmoid(F.linear(x, self.W_G).view(b, p, cfg.n_heads, self.d_head)))
        out = F.linear(z.reshape(b, p, -1), self.w_o, self.b_o)
        if cfg.residual_multiplier != 1.0:  # Granite: the update is scaled before the residual add
            out = out * cfg.residual_multiplier
        return out

    def temperature(self, ctx: AttentionContext, n_pos: int, device) -> Float[Tensor, "1 pos 1 1"]:
        """Llama 4's attention temperature of the queries at absolute positions ``q_offset ..``
        (transformers counts them from the cache length, not from ``position_ids``)."""
        positions = torch.arange(n_pos, device=device) + ctx.q_offset
        scale = torch.log1p(torch.floor((positions.float() + 1.0) / self.temperature_floor)) * self.cfg.attn_temperature_scale + 1.0
        return scale.view(1, n_pos, 1, 1)
