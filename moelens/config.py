"""One flat, frozen configuration for every supported MoE decoder.

Architecture differences are data: the knobs below select attention flavour, QK-norm granularity,
router semantics and shared experts. The per-architecture modules in :mod:`moelens.architectures`
translate a Hugging Face ``config.json`` into this object.

Axis names used throughout the package (and in every hook's jaxtyping shape):

==============  ==============================================================
``batch``       sequences in the batch
``pos``         token positions (``query_pos`` / ``key_pos`` inside attention)
``d_model``     residual stream width (HF ``hidden_size``)
``head``        query heads; ``kv_head`` key/value heads (GQA)
``d_head``      per-head q/k width; ``d_head_v`` per-head value width
``n_experts``   routed experts of a sparse layer
``top_k``       routing slots per token (experts chosen per token)
``d_vocab``     vocabulary size
``kv_lora_rank`` MLA compressed kv latent width; ``q_lora_rank`` MLA query latent width
``d_rope``      MLA decoupled rope-key width (``qk_rope_head_dim``)
``k_head``      Gated DeltaNet key heads; ``v_head`` its value heads
``d_k`` / ``d_v`` Gated DeltaNet per-head key / value widths; ``d_conv`` its conv channels
``index_head``  DeepSeek Sparse Attention indexer heads; ``d_index`` its head width
``index_topk``  keys kept per query by the indexer (``cfg.index_topk``; unused slots hold -1)
``hc``          DeepSeek-V4 residual streams (``cfg.hc_mult``)
``csa_pos`` / ``hca_pos``  DeepSeek-V4 compressed entries of a CSA / HCA layer; ``csa_keys`` /
                ``hca_keys`` its attention key axis (the positions, then the entries)
==============  ==============================================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch


@dataclass(frozen=True)
class MoEConfig:
    """Everything that determines the computation of a :class:`HookedMoETransformer`.

    Routing semantics (``router_*`` fields) follow transformers 5 exactly; see
    ``docs/concepts.md`` for the table per architecture.
    """

    architecture: str
    n_layers: int
    d_model: int
    d_vocab: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    # experts
    n_experts: int
    top_k: int
    d_expert: int
    moe_layers: list[int]  # sorted indices of the sparse (MoE) layers
    d_mlp: int = 0  # width of the dense SwiGLU in non-sparse layers (0 if there are none)
    # norms / embeddings
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # attention
    attention: Literal["gqa", "mla", "compressed"] = "gqa"  # compressed: DeepSeek-V4 (components/compressed_attention.py)
    qk_norm: Literal["none", "per_head", "full"] = "none"
    qkv_bias: bool = False
    clip_qkv: Optional[float] = None
    rope_theta: float = 10000.0
    rope_interleaved: bool = False
    rope_scaling: Optional[tuple[tuple[str, float], ...]] = None  # YaRN parameters (sorted items)
    attn_o_bias: bool = False  # gpt-oss: bias on the output projection w_o
    attn_sinks: bool = False  # gpt-oss: one learned sink logit per head (extra softmax column, dropped)
    sliding_window: Optional[int] = None  # window of the layers whose layer_types entry is "sliding_attention"
    layer_types: Optional[tuple[str, ...]] = None  # per layer "full_attention" / "sliding_attention" (None: all full)
    # partial RoPE: the number of leading dims of each q/k head that get RoPE (None = all of them;
    # MLA: all qk_rope_head_dim dims); the other dims pass through unchanged (GLM-4.x, Qwen3-Next)
    rotary_dim: Optional[int] = None
    # DeepSeek-V3 interleaved RoPE: pairs (2i, 2i+1) rotated in the model dtype with cos/sin cast to
    # it, written de-interleaved ([rotated evens || rotated odds]) as transformers' V3 does
    rope_deinterleave: bool = False
    # RoPE arithmetic. "real": cos/sin from torch.cos/torch.sin, rotations written with real products.
    # "complex" (DeepSeek-V2): transformers' V2 arithmetic, cos + i sin from torch.polar (the C
    # library's cosf/sinf, which differ from torch.cos/sin in the last fp32 bit) and the interleaved
    # rotation (rope_interleaved) as an fp32 complex multiply in [batch, head, pos] layout
    rope_arith: Literal["real", "complex"] = "real"
    # MLA (DeepSeek-V2)
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # router
    router_dtype: Literal["model", "float32"] = "model"
    router_weights_dtype: Literal["model", "float32"] = "model"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    topk_method: Literal["greedy", "group_limited_greedy", "noaux_tc"] = "greedy"
    topk_sorted: bool = True
    n_group: int = 1
    topk_group: int = 1
    router_bias: bool = False  # gpt-oss: the router linear has a bias
    # "softmax_topk": fp32 softmax over all experts, top-k of it (Mixtral, Qwen, DeepSeek-V2);
    # "topk_softmax": top-k of the logits, softmax over the k in the logits' dtype (gpt-oss)
    router_order: Literal["softmax_topk", "topk_softmax"] = "softmax_topk"
    # experts
    expert_bias: bool = False  # gpt-oss: biases on the gate, up and down projections of every expert
    # clamped_swiglu (gpt-oss): (clamp(u)+1) * g' * sigmoid(alpha g'); clamped_silu (DeepSeek-V4):
    # silu(min(g, limit)) * clamp(u, -limit, limit), also in the shared expert
    expert_act: Literal["silu", "clamped_swiglu", "clamped_silu"] = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    norm_weight_fp32: bool = False  # gpt-oss: RMSNorm multiplies the weight in fp32 before the cast
    norm_keep_fp32: bool = False  # DeepSeek-V4: the block and final RMSNorm weights stay fp32 in a bf16 model
    router_score_func: Literal["softmax", "sigmoid", "sqrtsoftplus"] = "softmax"  # sqrtsoftplus: sqrt(softplus(x)), V4
    # DeepSeek-V3 family: a per-expert fp32 bias added to the scores for selection only
    router_correction_bias: bool = False
    router_renorm_eps: float = 0.0  # added to the top-k sum before renormalising (V3 / GLM: 1e-20)
    router_fp32_params: bool = False  # router weight (and bias) stay fp32 in a bf16 model (V3 / GLM)
    # shared experts
    d_shared: int = 0  # width of the shared-expert SwiGLU (0: none)
    shared_gate: bool = False  # Qwen2-MoE: sigmoid(x . w) scales the shared expert
    # tokens
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    default_prepend_bos: bool = True
    n_ctx: Optional[int] = None  # max_position_embeddings (what to_tokens(truncate=True) cuts to); None: no limit
    # numerics / implementation
    dtype: torch.dtype = torch.float32
    expert_impl: Literal["sorted", "loop", "grouped_mm"] = "sorted"
    # Qwen3.5 / Qwen3-Next hybrids (see moelens/components/gated_deltanet.py)
    norm_zero_centered: bool = False  # RMSNorms scale by (1 + w), multiplied in fp32 before the cast
    attn_output_gate: bool = False  # full attention: o = w_o (z * sigmoid(W_G x)), W_G from a doubled q_proj
    linear_attn_layers: list[int] = field(default_factory=list)  # layers whose mixer is Gated DeltaNet
    linear_n_k_heads: int = 0
    linear_n_v_heads: int = 0
    linear_d_k: int = 0
    linear_d_v: int = 0
    linear_conv_kernel: int = 4
    delta_rule_impl: Literal["chunked", "recurrent"] = "chunked"  # recurrent = token by token (the definition)
    delta_rule_chunk: int = 64
    # DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5; see moelens/components/dsa.py): a lightning
    # indexer over MLA keeps the top ``index_topk`` earlier keys of every query
    dsa: bool = False
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    # RoPE of the indexer's leading qk_rope_head_dim dims: "half" (half-split, DeepSeek-V3.2) or
    # "deinterleave" (interleaved pairs written de-interleaved, GLM-5)
    index_rope: Literal["half", "deinterleave"] = "half"
    # GLM-5 cross-layer sharing: these layers run no indexer and reuse the top-k of the nearest
    # earlier layer that has one
    index_shared_layers: list[int] = field(default_factory=list)
    # DeepSeek-V4 (see moelens/components/hyper.py and compressed_attention.py)
    hc_mult: int = 1  # residual streams (manifold-constrained hyper-connections); 1 = one ordinary residual
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    compress_kinds: Optional[tuple[str, ...]] = None  # per layer "none" (sliding window only), "csa", "hca"
    csa_rate: int = 4
    hca_rate: int = 128
    compress_rope_theta: float = 160000.0
    compress_rope_scaling: Optional[tuple[tuple[str, float], ...]] = None  # YaRN of the compressed layers
    o_groups: int = 1
    o_lora_rank: int = 0
    hash_moe_layers: list[int] = field(default_factory=list)  # experts chosen by tid2eid[token id]
    extra: tuple[tuple[str, object], ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if self.n_heads % max(self.n_kv_heads, 1):
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        bad = [l for l in self.moe_layers if not 0 <= l < self.n_layers]
        if bad:
            raise ValueError(f"moe_layers {bad} out of range for n_layers={self.n_layers}")
        object.__setattr__(self, "moe_layers", sorted(set(int(l) for l in self.moe_layers)))
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.n_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for n_layers={self.n_layers}")
            bad_types = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
            if bad_types:
                raise ValueError(f"layer_types {bad_types} not supported (full_attention, sliding_attention)")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        bad = [l for l in self.linear_attn_layers if not 0 <= l < self.n_layers]
        if bad:
            raise ValueError(f"linear_attn_layers {bad} out of range for n_layers={self.n_layers}")
        object.__setattr__(self, "linear_attn_layers", sorted(set(int(l) for l in self.linear_attn_layers)))
        if self.linear_attn_layers and (self.linear_n_k_heads <= 0 or self.linear_n_v_heads % self.linear_n_k_heads):
            raise ValueError(
                f"linear_n_v_heads={self.linear_n_v_heads} must be a positive multiple of "
                f"linear_n_k_heads={self.linear_n_k_heads}"
            )
        if self.rotary_dim is not None and (self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.d_head_qk):
            raise ValueError(f"rotary_dim={self.rotary_dim} must be even and in (0, {self.d_head_qk}]")
        object.__setattr__(self, "index_shared_layers", sorted(set(int(l) for l in self.index_shared_layers)))
        object.__setattr__(self, "hash_moe_layers", sorted(set(int(l) for l in self.hash_moe_layers)))
        if set(self.hash_moe_layers) - set(self.moe_layers):
            raise ValueError(f"hash_moe_layers {self.hash_moe_layers} must be sparse layers ({self.moe_layers})")
        if self.attention == "compressed":
            kinds = tuple(self.compress_kinds or ("none",) * self.n_layers)
            object.__setattr__(self, "compress_kinds", kinds)
            if len(kinds) != self.n_layers or set(kinds) - {"none", "csa", "hca"}:
                raise ValueError(f"compress_kinds must list 'none'/'csa'/'hca' for each of {self.n_layers} layers")
            if not self.sliding_window or self.o_groups < 1 or (self.n_heads * self.d_head) % self.o_groups:
                raise ValueError("compressed attention needs sliding_window and o_groups dividing n_heads * d_head")
        if self.dsa:
            if self.attention != "mla" or not self.q_lora_rank:
                raise ValueError("dsa (DeepSeek Sparse Attention) needs attention='mla' with a q_lora_rank")
            if self.index_n_heads <= 0 or self.index_topk <= 0 or not 0 < self.qk_rope_head_dim <= self.index_head_dim:
                raise ValueError(
                    f"dsa needs index_n_heads > 0, index_topk > 0 and qk_rope_head_dim <= index_head_dim "
                    f"(got {self.index_n_heads}, {self.index_topk}, {self.qk_rope_head_dim} > {self.index_head_dim})"
                )
            bad = [l for l in self.index_shared_layers if not 0 < l < self.n_layers]
            if bad:
                raise ValueError(f"index_shared_layers {bad}: layer 0 must run its indexer; layers < n_layers")
        elif self.index_shared_layers:
            raise ValueError("index_shared_layers is set but dsa is False")
        if self.topk_method in ("group_limited_greedy", "noaux_tc") and self.n_experts % self.n_group:
            raise ValueError(f"n_experts={self.n_experts} is not divisible by n_group={self.n_group}")

    # -- derived -------------------------------------------------------------------------------
    @property
    def dense_layers(self) -> list[int]:
        return [l for l in range(self.n_layers) if l not in self.moe_layers]

    @property
    def has_shared_experts(self) -> bool:
        return self.d_shared > 0

    @property
    def compress_yarn(self) -> Optional[dict]:
        return dict(self.compress_rope_scaling) if self.compress_rope_scaling else None

    @property
    def d_head_qk(self) -> int:
        """Per-head width of queries and keys (``qk_nope + qk_rope`` for MLA)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.d_head

    @property
    def d_head_v(self) -> int:
        return self.v_head_dim if self.attention == "mla" else self.d_head

    @property
    def rope_dim(self) -> int:
        if self.rotary_dim is not None:
            return self.rotary_dim
        return self.qk_rope_head_dim if self.attention == "mla" else self.d_head

    def attention_window(self, layer: int) -> Optional[int]:
        """The sliding window of ``layer`` (keys ``q - window < k <= q``), or None for full attention."""
        if self.layer_types is None or self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def linear_d_conv(self) -> int:
        """Channels of the Gated DeltaNet convolution: ``[q; k; v]``."""
        return 2 * self.linear_n_k_heads * self.linear_d_k + self.linear_n_v_heads * self.linear_d_v

    @property
    def yarn(self) -> Optional[dict]:
        return dict(self.rope_scaling) if self.rope_scaling else None

    # -- TransformerLens ActivationCache compatibility (read by its analysis methods) -------------
    @property
    def normalization_type(self) -> str:
        """Every supported architecture uses pre-norm RMSNorm with a weight (TransformerLens' "RMS")."""
        return "RMS"

    @property
    def final_rms(self) -> bool:
        return True

    @property
    def attn_only(self) -> bool:
        return False

    @property
    def positional_embedding_type(self) -> str:
        return "rotary"

    def replace(self, **changes) -> "MoEConfig":
        """A copy with some fields changed (the config itself is immutable)."""
        return dataclasses.replace(self, **changes)

    def __hash__(self) -> int:
        return hash(tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        return d
