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


LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


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
    rms_norm_eps: float = 1e-6  # also the LayerNorm eps where norm_type == "layer"
    norm_type: Literal["rms", "layer"] = "rms"  # "layer": LayerNorm with weight and bias (PhiMoE)
    unembed_bias: bool = False  # PhiMoE: lm_head has a bias (unembed.b_u)
    tie_word_embeddings: bool = False
    # attention
    attention: Literal["gqa", "mla", "compressed"] = "gqa"  # compressed: DeepSeek-V4 (components/compressed_attention.py)
    # "per_head"/"full": RMSNorm with a weight before RoPE, per head or over the whole projection;
    # "l2" (Llama 4): weightless RMSNorm of each head *after* RoPE, on the RoPE layers only
    qk_norm: Literal["none", "per_head", "full", "l2"] = "none"
    qkv_bias: bool = False
    clip_qkv: Optional[float] = None
    rope_theta: float = 10000.0
    rope_interleaved: bool = False
    rope_scaling: Optional[tuple[tuple[str, float], ...]] = None  # YaRN parameters (sorted items)
    attn_o_bias: bool = False  # gpt-oss: bias on the output projection w_o
    attn_sinks: bool = False  # gpt-oss: one learned sink logit per head (extra softmax column, dropped)
    sliding_window: Optional[int] = None  # window of the layers whose layer_types entry is "sliding_attention"
    # per layer "full_attention" / "sliding_attention" / "chunked_attention" (None: all full)
    layer_types: Optional[tuple[str, ...]] = None
    # Llama 4: the "chunked_attention" layers see the keys of their own chunk only (chunks of this many
    # positions counted from each sequence's first real token)
    attention_chunk_size: Optional[int] = None
    # Llama 4: layers without RoPE ("NoPE"; q and k pass through unrotated)
    nope_layers: tuple[int, ...] = ()
    # Llama 4 attention temperature tuning on the NoPE layers: q *= 1 + attn_temperature_scale *
    # log1p(floor((pos + 1) / attn_temperature_floor)), pos the absolute position (0: off)
    attn_temperature_floor: int = 0
    attn_temperature_scale: float = 0.1
    # Gemma 4: the full-attention layers have their own head width and kv-head count, share the key
    # projection as the value (K = V: no w_v), and their own RoPE base with "proportional" RoPE (the
    # leading rope_proportion_full of the frequencies rotate, computed over the whole head; the rest 0)
    full_attn_d_head: Optional[int] = None
    full_attn_n_kv_heads: Optional[int] = None
    full_attn_k_eq_v: bool = False
    rope_theta_full: Optional[float] = None
    rope_proportion_full: float = 1.0
    attn_softmax_scale: Optional[float] = None  # None: d_head ** -0.5 (Gemma 4: 1.0; Granite: attention_multiplier)
    v_norm: bool = False  # Gemma 4: weightless RMSNorm of each value head
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
    # OLMo-2 / FlexOlmo: the half-split rotation computed in fp32 (fp32 cos/sin) and cast after
    rope_fp32: bool = False
    # MLA (DeepSeek-V2)
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # router
    # "model": logits in the model dtype; "float32": input and weight upcast, logits fp32;
    # "model_upcast" (Granite): logits computed in the model dtype, then upcast to fp32
    router_dtype: Literal["model", "float32", "model_upcast"] = "model"
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
    # "sparsemixer" (PhiMoE, eval path): top-k of the logits; slot j's weight is a softmax over the logits
    # within relative distance 2 * router_jitter_eps of the chosen logit (earlier slots' experts excluded)
    # "topk_sigmoid": top-k of the logits, sigmoid of the k chosen logits (fp32, cast to the logits' dtype;
    # Llama 4)
    router_order: Literal["softmax_topk", "topk_softmax", "sparsemixer", "topk_sigmoid"] = "softmax_topk"
    router_jitter_eps: float = 0.0
    # experts
    expert_bias: bool = False  # gpt-oss: biases on the gate, up and down projections of every expert
    # clamped_swiglu (gpt-oss): (clamp(u)+1) * g' * sigmoid(alpha g'); clamped_silu (DeepSeek-V4):
    # silu(min(g, limit)) * clamp(u, -limit, limit), also in the shared expert
    expert_act: Literal["silu", "clamped_swiglu", "clamped_silu"] = "silu"
    # Llama 4: each slot's combine weight multiplies the expert's *input* (E_e(w x)), not its output;
    # the combine is then the plain sum of the slots' outputs (see moelens/components/moe.py)
    expert_input_scaled: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    norm_weight_fp32: bool = False  # gpt-oss: RMSNorm multiplies the weight in fp32 before the cast
    norm_keep_fp32: bool = False  # DeepSeek-V4: the block and final RMSNorm weights stay fp32 in a bf16 model
    router_score_func: Literal["softmax", "sigmoid", "sqrtsoftplus"] = "softmax"  # sqrtsoftplus: sqrt(softplus(x)), V4
    # DeepSeek-V3 family: a per-expert fp32 bias added to the scores for selection only
    router_correction_bias: bool = False
    router_renorm_eps: float = 0.0  # added to the top-k sum before renormalising (V3 / GLM: 1e-20)
    router_renorm_min: float = 0.0  # ERNIE-4.5: the top-k sum is clamped to at least this before renormalising
    # ERNIE-4.5: transformers holds the correction bias as a (frozen) parameter, so parameter counts include it
    correction_bias_counted: bool = False
    # the correction bias stays fp32 in a bf16 model even where the router weight does not (DeepSeek-V4's
    # _keep_in_fp32_modules_strict lists e_score_correction_bias but not gate.weight)
    correction_bias_fp32: bool = False
    router_fp32_params: bool = False  # router weight (and bias) stay fp32 in a bf16 model (V3 / GLM)
    # block layout: which RMSNorms surround each branch. "pre" norms read the residual stream
    # (ln1 / ln2); "post" norms normalise the branch's output before it is added (OLMo-2 / FlexOlmo:
    # post only; Gemma: both, "sandwich")
    attn_pre_norm: bool = True
    attn_post_norm: bool = False
    mlp_pre_norm: bool = True
    mlp_post_norm: bool = False
    # Gemma 4: in MoE layers a dense MLP (d_mlp wide) runs in parallel with the MoE, each branch with
    # its own pre- and post-norm, their sum post-normed (see moelens/components/block.py)
    parallel_dense_mlp: bool = False
    mlp_act: Literal["silu", "gelu_tanh"] = "silu"  # gate activation of the dense MLPs and experts
    # Gemma 4 router: logits = W (rms(x) * w_in * d_model**-0.5) on the residual stream (not the MoE input);
    # the renormalised top-k weights are multiplied by a learned per-expert scale
    router_input_norm: bool = False
    router_per_expert_scale: bool = False
    layer_scalar: bool = False  # Gemma 4: a learned scalar multiplies the residual stream leaving each block
    embed_scale: Optional[float] = None  # Gemma: embeddings multiplied by this (cast to the model dtype)
    final_logit_softcap: Optional[float] = None  # Gemma: logits = cap * tanh(logits / cap)
    # shared experts
    d_shared: int = 0  # width of the shared-expert SwiGLU (0: none)
    shared_gate: bool = False  # Qwen2-MoE: sigmoid(x . w) scales the shared expert
    # Granite scalar multipliers (1.0 / None: absent). The residual multiplier scales every block's update
    # before the residual add: the attention output, and the MoE output through its combine weights
    # (hook_expert_weights) and its shared-expert output (hook_shared_out), so that hook_attn_out and
    # hook_mlp_out stay what is added to the residual stream and the experts' contributions still sum to it
    embedding_multiplier: float = 1.0  # hook_embed = W_E[tokens] * embedding_multiplier
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0  # logits = unembed(ln_final(resid)) / logits_scaling
    # tokens
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    default_prepend_bos: bool = True
    n_ctx: Optional[int] = None  # max_position_embeddings (what to_tokens(truncate=True) cuts to); None: no limit
    # numerics / implementation
    dtype: torch.dtype = torch.float32
    # "auto": grouped_mm on CUDA (bf16, no host sync), sorted elsewhere (moelens/components/experts.py)
    expert_impl: Literal["auto", "sorted", "loop", "grouped_mm"] = "auto"
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
            bad_types = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad_types:
                raise ValueError(f"layer_types {bad_types} not supported ({', '.join(LAYER_TYPES)})")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
            if "chunked_attention" in self.layer_types and not self.attention_chunk_size:
                raise ValueError("layer_types has chunked_attention layers but attention_chunk_size is not set")
        object.__setattr__(self, "nope_layers", tuple(sorted(set(int(l) for l in self.nope_layers))))
        bad = [l for l in self.nope_layers if not 0 <= l < self.n_layers]
        if bad:
            raise ValueError(f"nope_layers {bad} out of range for n_layers={self.n_layers}")
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
        if self.residual_multiplier != 1.0 and (self.attention != "gqa" or self.linear_attn_layers or self.dense_layers):
            raise ValueError(
                "residual_multiplier != 1 is implemented for GQA attention and sparse MoE layers only "
                "(every layer sparse, no MLA / linear attention)"
            )
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

    def attention_chunk(self, layer: int) -> Optional[int]:
        """The chunk size of a ``chunked_attention`` layer (keys of the query's own chunk), or None."""
        if self.layer_types is None or self.layer_types[layer] != "chunked_attention":
            return None
        return self.attention_chunk_size

    def uses_rope(self, layer: int) -> bool:
        return layer not in self.nope_layers

    def _is_full(self, layer: int) -> bool:
        return self.layer_types is None or self.layer_types[layer] == "full_attention"

    def layer_d_head(self, layer: int) -> int:
        """Head width of ``layer`` (Gemma 4's full-attention layers differ)."""
        return self.full_attn_d_head if self.full_attn_d_head and self._is_full(layer) else self.d_head

    def layer_n_kv_heads(self, layer: int) -> int:
        return self.full_attn_n_kv_heads if self.full_attn_n_kv_heads and self._is_full(layer) else self.n_kv_heads

    def layer_k_eq_v(self, layer: int) -> bool:
        return self.full_attn_k_eq_v and self._is_full(layer)

    def rope_group(self, layer: int) -> str:
        """``"full"`` where the full-attention layers have their own RoPE (Gemma 4), else ``"default"``."""
        return "full" if self.rope_theta_full is not None and self._is_full(layer) else "default"

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
        """TransformerLens' name of the pre-norms: "RMS" (RMSNorm with a weight), or "LN" (LayerNorm with
        weight and bias, PhiMoE)."""
        return "LN" if self.norm_type == "layer" else "RMS"

    @property
    def final_rms(self) -> bool:
        return self.norm_type == "rms"

    @property
    def attn_only(self) -> bool:
        return False

    @property
    def positional_embedding_type(self) -> str:
        return "rotary"

    # -- fields TransformerLens' own code reads (patching, head_detector, utilities.test_prompt) ---
    @property
    def device(self) -> Optional[torch.device]:
        """The device of the model's embedding (where inputs go), kept current by the model
        (``model.to(...)``, ``from_pretrained(device=..., device_map=...)``); None for a config
        no model was built from."""
        return self.__dict__.get("_device")

    @property
    def n_devices(self) -> int:
        return int(self.__dict__.get("_n_devices", 1))

    @property
    def model_name(self) -> str:
        """What the model was loaded from (``from_pretrained``'s name or directory), else the architecture."""
        return self.__dict__.get("_model_name") or self.architecture

    @property
    def original_architecture(self) -> str:
        """The transformers class name (``config.json``'s ``architectures[0]``)."""
        return self.architecture

    @property
    def n_key_value_heads(self) -> int:
        """Key/value heads of the attention layers (``hook_k``/``hook_v`` head axis): ``n_kv_heads``
        for grouped-query attention, ``n_heads`` for MLA (every head has its own key)."""
        return self.n_kv_heads if self.attention == "gqa" else self.n_heads

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab

    @property
    def act_fn(self) -> str:
        """The MLP activation in TransformerLens' naming: ``"silu"`` (SwiGLU), gpt-oss's ``"clamped_swiglu"``,
        or ``"gelu_pytorch_tanh"`` (Gemma 4's GELU-tanh gate)."""
        if self.expert_act == "silu" and self.mlp_act == "gelu_tanh":
            return "gelu_pytorch_tanh"
        return self.expert_act

    @property
    def output_logits_soft_cap(self) -> float:
        """TransformerLens' final logit soft-cap: ``final_logit_softcap`` (Gemma 4), ``-1.0`` (none) where
        the architecture has none. As in TransformerLens, ``unembed.hook_out`` is ``x @ W_U + b_U`` and
        the logits are ``c * tanh(hook_out / c)``."""
        return -1.0 if self.final_logit_softcap is None else float(self.final_logit_softcap)

    @property
    def gated_mlp(self) -> bool:
        return True

    @property
    def rmsnorm_uses_offset(self) -> bool:
        """TransformerLens' name for norms that scale by ``(1 + w)`` (``norm_zero_centered``)."""
        return self.norm_zero_centered

    @property
    def num_experts(self) -> int:
        """TransformerLens' MoE name for ``n_experts``."""
        return self.n_experts

    @property
    def experts_per_token(self) -> int:
        """TransformerLens' MoE name for ``top_k``."""
        return self.top_k

    # TransformerLens' optional hooks and layouts that moelens does not have (always off here)
    use_attn_result = False
    use_split_qkv_input = False
    use_attn_in = False
    use_hook_mlp_in = False
    ungroup_grouped_query_attention = False

    def _set_runtime(self, **values) -> None:
        """Set the run-time fields (``device``, ``n_devices``, ``model_name``): not part of the
        configuration proper (not in ``to_dict``, equality or the hash)."""
        for k, v in values.items():
            object.__setattr__(self, f"_{k}", v)

    def replace(self, **changes) -> "MoEConfig":
        """A copy with some fields changed (the config itself is immutable); the run-time fields
        (``device``, ``n_devices``, ``model_name``) carry over."""
        new = dataclasses.replace(self, **changes)
        new._set_runtime(**{k[1:]: v for k, v in self.__dict__.items() if k.startswith("_")})
        return new

    def __hash__(self) -> int:
        return hash(tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()
                          if not k.startswith("_")))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        return d
