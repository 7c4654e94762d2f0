"""DeepSeek-V4 attention, exactly as transformers 5.25's ``DeepseekV4Attention`` (eager, the only
path transformers has): one shared key/value head (K = V), sliding-window keys plus compressed
entries, per-head attention sinks, and a grouped low-rank output projection.

With ``h`` heads of width ``d``, ``dr = cfg.rotary_dim`` RoPE dims at the END of each head
(interleaved pairs, fp32), window ``n_win = cfg.sliding_window``::

    c_q  = RMSNorm(W_q_a x)                                q latent (weight fp32)
    q_h  = RMS(W_q_b c_q)_h                                per head, unweighted RMS        [h, d]
    kv   = RMSNorm(W_kv x)                                 ONE key = value per token        [d]
    RoPE (trailing dr dims) on q and kv at the token positions: the "main" table (rope_theta) on
         sliding-only layers, the "compress" table (compress_rope_theta, YaRN) on compressed layers
    keys = [kv of the positions q - n_win < k <= q]  ++  [compressed entries the query may see]
    z_h  = softmax([q_h . keys / sqrt(d) ; sink_h]) without the sink column, times keys
    z_h  = RoPE^-1(z_h) on the trailing dr dims at the query position (the values carried RoPE)
    out  = W_o_b concat_g(W_o_a,g z_group g)                grouped output projection

Compressed entries (``cfg.compress_kinds[layer]``):

* ``"hca"`` (heavily compressed, rate ``m = cfg.hca_rate``): every complete window ``w`` of ``m``
  tokens gives ``C_w = RMSNorm(sum_j softmax_j(G_j + B_j) * K_j)`` over the window (``K = W_ck x``,
  ``G = W_cg x``, ``B`` a learned ``[m, d]`` position bias, softmax per channel in fp32), rotated at
  position ``w * m``; query ``t`` sees entry ``w`` iff ``w < (t + 1) // m``.
* ``"csa"`` (compressed sparse, rate ``m = cfg.csa_rate``): ``K``, ``G`` have ``2d`` channels; entry
  ``w`` gates over ``2m`` slots: the second halves of window ``w``'s tokens and the first halves of
  window ``w - 1``'s (overlapping windows). A lightning indexer (its own compressor at
  ``index_head_dim``, queries ``W_iq c_q`` with the compress RoPE, score
  ``sum_h w_h relu(q_h . K^I_w) / sqrt(D)``) keeps the ``index_topk`` best visible entries per query;
  the query sees only those.

Only complete windows are compressed, from position 0: this module runs whole sequences (no
key/value prefix, no generation cache); ``generate(..., use_past_kv_cache=False)`` works.

Hooks (all position-aligned; ``comp_pos`` counts compressed entries: declared ``csa_pos`` / ``hca_pos``
by layer kind, and the attention key axis ``key_pos`` / ``csa_keys`` / ``hca_keys``, since their
sizes differ between the kinds):

=============================  ====================================  ==============================================
``hook_q``                     ``[batch, pos, head, d_head]``        queries after the per-head RMS, before RoPE
``hook_kv``                    ``[batch, pos, d_head]``              the shared key/value before RoPE
``hook_rot_q``                 ``[batch, pos, head, d_head]``        queries after RoPE
``hook_rot_kv``                ``[batch, pos, d_head]``              key/value after RoPE
``compressor.hook_kv``         ``[batch, comp_pos, d_head]``         compressed entries (after norm and RoPE)
``compressor.indexer.hook_k``  ``[batch, comp_pos, d_index]``        CSA: the indexer's compressed keys
``compressor.indexer.hook_scores``  ``[batch, pos, comp_pos]``       CSA: indexer scores (-inf: not yet visible)
``hook_index_topk``            ``[batch, pos, index_topk]`` int64    CSA: kept entries per query (-1: empty slot)
``hook_attn_scores``           ``[batch, head, query_pos, key_pos]`` scores over ``[window keys ++ entries]``
``hook_pattern``               ``[batch, head, query_pos, key_pos]`` probabilities (sink column dropped)
``hook_z``                     ``[batch, pos, head, d_head]``        per-head output after the inverse RoPE
=============================  ====================================  ==============================================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from moelens.components.attention import AttentionContext
from moelens.components.norm import unweighted_rms
from moelens.components.norm import rms_norm_weight_fp32
from moelens.components.rope import rope_cos_sin, rope_frequencies
from moelens.components.tl_views import CompressedViews
from moelens.config import MoEConfig
from moelens.hooks import ShapedHookPoint, has_hooks


def rope_trailing(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """V4's RoPE: interleaved pairs of the LAST ``2 * cos.shape[-1]`` dims of ``x [batch, pos, head, d]``
    rotated in fp32 (``x cos + rotate_half(x) sin``), cast back; the leading dims pass through."""
    c = cos.to(x.dtype).repeat_interleave(2, dim=-1)[:, :, None, :]  # transformers casts cos/sin to the
    s = sin.to(x.dtype).repeat_interleave(2, dim=-1)[:, :, None, :]  # model dtype before the fp32 rotation
    r = c.shape[-1]
    nope, rope = x[..., :-r], x[..., -r:]
    half = torch.stack((-rope[..., 1::2], rope[..., 0::2]), dim=-1).flatten(-2)
    return torch.cat([nope, ((rope.float() * c) + (half.float() * s)).to(x.dtype)], dim=-1)


def _tables(cfg: MoEConfig, positions: Tensor, compress: bool) -> tuple[Tensor, Tensor]:
    """cos/sin ``[batch or 1, pos, dr/2]`` of the main or the compress RoPE at ``positions``."""
    if compress:
        inv, factor = rope_frequencies(cfg.rope_dim, cfg.compress_rope_theta, cfg.compress_yarn)
    else:
        inv, factor = rope_frequencies(cfg.rope_dim, cfg.rope_theta, None)
    return rope_cos_sin(positions, inv.to(positions.device), factor)


def _gated_pool(kv: Tensor, gate: Tensor, norm_w: Tensor, eps: float) -> Tensor:
    """``RMSNorm(sum_slots softmax_slots(gate) * kv)`` over dim 2 (softmax in fp32, as transformers)."""
    pooled = (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)
    return rms_norm_weight_fp32(pooled, norm_w, eps)


class _WindowCompressor(nn.Module):
    """Gated pooling of token windows into compressed entries (hub ``compressor`` / ``indexer``
    ``kv_proj``, ``gate_proj``, ``position_bias``, ``kv_norm``). ``overlap``: CSA's two series."""

    def __init__(self, cfg: MoEConfig, rate: int, width: int, overlap: bool):
        super().__init__()
        self.cfg, self.rate, self.width, self.overlap = cfg, rate, width, overlap
        k = 2 if overlap else 1
        self.w_kv = nn.Parameter(torch.empty(k * width, cfg.d_model))
        self.w_gate = nn.Parameter(torch.empty(k * width, cfg.d_model))
        self.position_bias = nn.Parameter(torch.zeros(rate, k * width))
        self.kv_norm_w = nn.Parameter(torch.ones(width))

    def compress(self, x: Float[Tensor, "batch pos d_model"]) -> Tensor:
        """Entries ``[batch, n_windows, width]`` after norm and the compress RoPE at ``w * rate``."""
        b, m, d = x.shape[0], self.rate, self.width
        kv, gate = F.linear(x, self.w_kv), F.linear(x, self.w_gate)
        n_win = x.shape[1] // m
        if n_win == 0:
            return kv.new_zeros((b, 0, d))
        kv = kv[:, : n_win * m].view(b, n_win, m, -1)
        gate = gate[:, : n_win * m].view(b, n_win, m, -1) + self.position_bias
        if self.overlap:
            new_kv = kv.new_zeros((b, n_win, 2 * m, d))
            new_gate = gate.new_full((b, n_win, 2 * m, d), float("-inf"))
            new_kv[:, :, m:] = kv[..., d:]
            new_gate[:, :, m:] = gate[..., d:]
            if n_win > 1:
                new_kv[:, 1:, :m] = kv[:, :-1, :, :d]
                new_gate[:, 1:, :m] = gate[:, :-1, :, :d]
            kv, gate = new_kv, new_gate
        entries = _gated_pool(kv, gate, self.kv_norm_w, self.cfg.rms_norm_eps)
        positions = (torch.arange(n_win, device=x.device) * m)[None].expand(b, -1)
        cos, sin = _tables(self.cfg, positions, compress=True)
        return rope_trailing(entries[:, :, None], cos, sin)[:, :, 0]


class CompressedIndexer(_WindowCompressor):
    """CSA's lightning indexer over compressed entries (hub ``compressor.indexer``)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg, cfg.csa_rate, cfg.index_head_dim, overlap=True)
        self.w_q = nn.Parameter(torch.empty(cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank))
        self.w_weights = nn.Parameter(torch.empty(cfg.index_n_heads, cfg.d_model))
        self.hook_k = ShapedHookPoint("batch csa_pos d_index")
        self.hook_scores = ShapedHookPoint("batch pos csa_pos")

    def forward(self, x: Tensor, q_latent: Tensor, positions: Tensor) -> Tensor:
        cfg = self.cfg
        b, p, _ = x.shape
        h, d = cfg.index_n_heads, cfg.index_head_dim
        keys = self.hook_k(self.compress(x))
        cos, sin = _tables(cfg, positions, compress=True)
        q = rope_trailing(F.linear(q_latent, self.w_q).view(b, p, h, d), cos, sin)
        scores = torch.matmul(q.float(), keys.transpose(-1, -2).float().unsqueeze(1))  # [b, p, h, T]
        scores = F.relu(scores) * d**-0.5
        weights = F.linear(x, self.w_weights).float() * h**-0.5
        scores = (scores * weights.unsqueeze(-1)).sum(dim=2)
        visible = torch.arange(keys.shape[1], device=x.device) < ((positions + 1) // self.rate)[..., None]
        return self.hook_scores(scores.masked_fill(~visible, float("-inf"))), visible


class Compressor(_WindowCompressor):
    """The compressed branch of a CSA or HCA layer (hub ``self_attn.compressor``)."""

    def __init__(self, cfg: MoEConfig, kind: str):
        rate = cfg.csa_rate if kind == "csa" else cfg.hca_rate
        super().__init__(cfg, rate, cfg.d_head, overlap=kind == "csa")
        self.hook_kv = ShapedHookPoint(f"batch {kind}_pos d_head")  # csa_pos / hca_pos: entries of that kind
        if kind == "csa":
            self.indexer = CompressedIndexer(cfg)


class CompressedAttention(CompressedViews, nn.Module):
    """DeepSeek-V4 attention (see the module docstring). Weights ``[out, in]``."""

    def __init__(self, cfg: MoEConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.compress_kinds[layer]
        h, d, dm = cfg.n_heads, cfg.d_head, cfg.d_model
        self.w_q_a = nn.Parameter(torch.empty(cfg.q_lora_rank, dm))
        self.q_a_norm_w = nn.Parameter(torch.ones(cfg.q_lora_rank))
        self.w_q_b = nn.Parameter(torch.empty(h * d, cfg.q_lora_rank))
        self.w_kv = nn.Parameter(torch.empty(d, dm))
        self.kv_norm_w = nn.Parameter(torch.ones(d))
        self.w_o_a = nn.Parameter(torch.empty(cfg.o_groups * cfg.o_lora_rank, h * d // cfg.o_groups))
        self.w_o_b = nn.Parameter(torch.empty(dm, cfg.o_groups * cfg.o_lora_rank))
        self.sinks = nn.Parameter(torch.zeros(h))
        self.hook_q = ShapedHookPoint("batch pos head d_head")
        self.hook_kv = ShapedHookPoint("batch pos d_head")
        self.hook_rot_q = ShapedHookPoint("batch pos head d_head")
        self.hook_rot_kv = ShapedHookPoint("batch pos d_head")
        if self.kind != "none":
            self.compressor = Compressor(cfg, self.kind)
        if self.kind == "csa":
            self.hook_index_topk = ShapedHookPoint("batch pos index_topk", kind="int")
        # the key axis holds the window keys, then this layer kind's compressed entries
        keys = {"none": "key_pos", "csa": "csa_keys", "hca": "hca_keys"}[self.kind]
        self.hook_attn_scores = ShapedHookPoint(f"batch head query_pos {keys}")
        self.hook_pattern = ShapedHookPoint(f"batch head query_pos {keys}")
        self.hook_z = ShapedHookPoint("batch pos head d_head")

    def _apply(self, fn, recurse=True):
        """Norm weights, sinks and position biases stay fp32 in a bf16 model, as transformers keeps them."""
        super()._apply(fn, recurse)
        for name, p in self.named_parameters():
            if name.endswith(("norm_w", "sinks", "position_bias")) and p.dtype != torch.float32:
                p.data = p.data.float()
        return self

    def forward(self, x: Float[Tensor, "batch pos d_model"], ctx: AttentionContext, kv_prefix=None) -> Tensor:
        cfg = self.cfg
        if kv_prefix is not None or ctx.q_offset:
            raise NotImplementedError(
                "DeepSeek-V4's compressed attention runs whole sequences only (its compressed entries pool complete "
                "windows from position 0): no key/value prefix or generation cache. Use "
                "generate(..., use_past_kv_cache=False) and tracing with engine='full'"
            )
        b, p, _ = x.shape
        h, d = cfg.n_heads, cfg.d_head
        positions = ctx.positions if ctx.positions is not None else torch.arange(p, device=x.device)[None]
        positions = positions.to(x.device)
        cos, sin = _tables(cfg, positions, compress=self.kind != "none")
        eps = cfg.rms_norm_eps
        q_latent = rms_norm_weight_fp32(F.linear(x, self.w_q_a), self.q_a_norm_w, eps)
        q = self.hook_q(unweighted_rms(F.linear(q_latent, self.w_q_b).view(b, p, h, d), eps))
        kv = self.hook_kv(rms_norm_weight_fp32(F.linear(x, self.w_kv), self.kv_norm_w, eps))
        q = self.hook_rot_q(rope_trailing(q, cos, sin))
        kv = self.hook_rot_kv(rope_trailing(kv[:, :, None], cos, sin)[:, :, 0])

        mask = ctx.additive_mask(p, p, q.dtype, x.device, always=True, window=cfg.sliding_window)  # [b|1, 1, p, p]
        keys = kv
        if self.kind != "none":
            comp = self.compressor
            entries = comp.hook_kv(comp.compress(x))
            n_c = entries.shape[1]
            if self.kind == "hca":
                visible = torch.arange(n_c, device=x.device) < ((positions + 1) // comp.rate)[..., None]
            else:
                scores, visible = comp.indexer(x, q_latent, positions)
                top = scores.topk(min(cfg.index_topk, n_c), dim=-1).indices
                top = torch.where(visible.expand_as(scores).gather(-1, top), top, -1)
                if top.shape[-1] < cfg.index_topk:
                    top = F.pad(top, (0, cfg.index_topk - top.shape[-1]), value=-1)
                top = self.hook_index_topk(top)
                if has_hooks(self.hook_index_topk) and top.numel() and (int(top.min()) < -1 or int(top.max()) >= n_c):
                    raise IndexError(f"{self.hook_index_topk.name}: kept entries must lie in [-1, {n_c})")
                slots = torch.where(top < 0, n_c, top)
                visible = torch.zeros(*top.shape[:-1], n_c + 1, dtype=torch.bool, device=x.device)
                visible = visible.scatter_(-1, slots, True)[..., :n_c]
            block = torch.zeros(visible.shape, dtype=q.dtype, device=x.device).masked_fill(~visible, float("-inf"))
            if p > 1 or self.kind == "csa":  # transformers' HCA appends no block mask for a single query
                mask = torch.cat([mask.expand(b, -1, -1, -1), block.expand(b, p, n_c)[:, None]], dim=-1)
            else:
                mask = F.pad(mask, (0, n_c), value=0.0)
            keys = torch.cat([kv, entries], dim=1)

        qh = q.transpose(1, 2)  # [b, h, p, d]
        kh = keys[:, None].expand(b, h, -1, d)
        scores = self.hook_attn_scores(torch.matmul(qh, kh.transpose(2, 3)) * d**-0.5 + mask)
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, p, -1)
        combined = torch.cat([scores, sinks], dim=-1)  # fp32 sinks promote the row, as in transformers
        combined = combined - combined.max(dim=-1, keepdim=True).values
        pattern = self.hook_pattern(F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1].to(keys.dtype))
        z = torch.matmul(pattern, kh).transpose(1, 2)  # [b, p, h, d]
        z = self.hook_z(rope_trailing(z, cos, -sin))
        grouped = z.reshape(b, p, cfg.o_groups, -1)
        w = self.w_o_a.view(cfg.o_groups, -1, grouped.shape[-1]).transpose(1, 2)
        y = torch.bmm(grouped.reshape(-1, cfg.o_groups, grouped.shape[-1]).transpose(0, 1), w).transpose(0, 1)
        return F.linear(y.reshape(b, p, -1), self.w_o_b)
