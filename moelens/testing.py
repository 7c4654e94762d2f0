"""Tiny random transformers models for parity checks (no downloads).

``tiny_hf_model("mixtral")`` builds a small model from the transformers config class with
"sharpened" weights (std ``1/sqrt(fan_in)``, router x3) so that outputs are O(1) and routing is
decisive; ``save_tiny(...)`` writes it with ``save_pretrained`` (the hub's own key layout).
The same builders back moelens' parity tests; use them to check a new architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

TINY_CONFIGS: dict[str, tuple[str, str, dict]] = {
    # name: (config class, model class, kwargs)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5,
    )),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, moe_intermediate_size=32, intermediate_size=192, num_experts=8, num_experts_per_tok=4,
        norm_topk_prob=True, mlp_only_layers=[0], rope_theta=1e6,
    )),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=32, num_experts=8, num_experts_per_tok=4, norm_topk_prob=False, rope_theta=1e4,
        rms_norm_eps=1e-5,
    )),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        qkv_bias=True, moe_intermediate_size=32, shared_expert_intermediate_size=96, intermediate_size=160,
        num_experts=8, num_experts_per_tok=4, norm_topk_prob=False, mlp_only_layers=[0], rope_theta=1e6,
    )),
    "deepseek_v2_lite": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=160,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
        moe_intermediate_size=24, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 16, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    )),
    "deepseek_v2_full": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=160,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
        moe_intermediate_size=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=16.0,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 16, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    )),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=4, sliding_window=4,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 4096, "rope_theta": 150000.0},
    )),
    # hybrids: Gated DeltaNet + gated full attention (layer_types), partial RoPE, (1 + w) norms
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, intermediate_size=96, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False, mlp_only_layers=[2],
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
    )),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25,
                         "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    )),
    # DeepSeek-V3 router family: several groups with topk_group < n_group, YaRN, q low-rank path
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=160,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
        moe_intermediate_size=24, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        rope_interleave=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
    )),
    # GLM-4.5/4.6/4.7: GQA with q/k/v biases, per-head QK-norm, partial RoPE (half of head_dim 24)
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=160,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, attention_bias=True, use_qk_norm=True,
        moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, n_group=2,
        topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
    )),
    # GLM-4.7-Flash: MLA (q low-rank) with the V3 router, layer 0 dense
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, intermediate_size=160, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=24,
        n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.8,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )),
    # Granite: all four multipliers away from 1, attention biases (q, k, v and o), GQA
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=3, attention_bias=True,
        embedding_multiplier=1.7, attention_multiplier=0.09, residual_multiplier=0.6, logits_scaling=0.6,
        rope_theta=1e5, rms_norm_eps=1e-6,
    )),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, shared_intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
        attention_bias=True, embedding_multiplier=3.0, attention_multiplier=0.09, residual_multiplier=0.6,
        logits_scaling=2.5, rope_theta=1e5, rms_norm_eps=1e-6, tie_word_embeddings=True,
    )),
    # MiniMax-M2: sigmoid router with a selection bias, full-width QK norm, partial RoPE (16 of head_dim 32)
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, rotary_dim=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=3,
        rope_theta=5e6, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
    )),
    # ERNIE-4.5: MoE in layers 1..2 only (0 and 3 dense), two shared experts, softmax router with a
    # selection bias, interleaved fp32 RoPE
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, moe_intermediate_size=32, moe_num_experts=8, moe_k=3, moe_num_shared_experts=2,
        moe_layer_start_index=1, moe_layer_end_index=2, moe_layer_interval=1, rope_theta=5e5, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )),
    # PhiMoE: sparsemixer top-2 (threshold 2 x 0.25, wide enough to keep several experts in each softmax),
    # LayerNorm with biases, q/k/v/o and lm_head biases, LongRoPE switching to the long mscale past 8 positions
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.25,
        attention_bias=True, lm_head_bias=True, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 8,
                         "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + 0.5 * i for i in range(8)],
                         "short_mscale": 1.1, "long_mscale": 1.3},
    )),
    # Llama 4: dense/MoE interleave, top-1 sigmoid router scaling the expert input, shared expert, chunked
    # attention (chunk 4) on the RoPE layers, NoPE layers with temperature tuning (floor 2: active from
    # position 1), L2 QK-norm, llama3 RoPE scaling, attention biases
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=32, intermediate_size_mlp=96, num_local_experts=8, num_experts_per_tok=1,
        interleave_moe_layer_step=2, no_rope_layer_interval=2, attention_chunk_size=4, floor_scale=2,
        attn_scale=0.5, attention_bias=True, eos_token_id=None,  # (Llama4TextConfig's default eos 2 is a tiny-vocab token)
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    )),
    # FlexOlmo: OLMo-2 post-norm blocks, QK-norm over the whole projections, softmax top-k (renormalised)
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, num_experts=7, num_experts_per_tok=3, norm_topk_prob=True, eos_token_id=None,
        pad_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )),
    # Gemma 4 text MoE: sliding (window 4, head 16, 2 kv heads) / full (head 32, 1 kv head, K = V,
    # proportional RoPE) layers, parallel dense MLP + MoE with sandwich norms, logit soft-cap
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
        sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        final_logit_softcapping=30.0, hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=8,
        top_k_experts=2, moe_intermediate_size=32, eos_token_id=None, bos_token_id=None, pad_token_id=None,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                            "rope_theta": 1000000.0}},
    )),
    # DeepSeek-V3.2: V3 + DeepSeek Sparse Attention; index_topk=5 of 16 positions so the indexer drops keys
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=160,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
        moe_intermediate_size=24, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        index_topk=5, index_head_dim=16, index_n_heads=8,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
    )),
    # GLM-5: interleaved indexer RoPE and cross-layer index sharing (layer 2 reuses layer 1's top-k)
    "glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=4, first_k_dense_replace=1, intermediate_size=160,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=24, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
        moe_intermediate_size=24, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        index_topk=5, index_head_dim=16, index_n_heads=8, indexer_types=["full", "full", "shared", "full"],
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )),
    # DeepSeek-V4: 3 residual streams, sliding window 8, CSA (rate 4, 2 of the entries kept) and HCA
    # (rate 8) layers, one hash-routed layer; 32-token sequences make the window, the compression and
    # the indexer all select
    "deepseek_v4": ("DeepseekV4Config", "DeepseekV4ForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=32, q_lora_rank=32,
        partial_rotary_factor=0.25, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8}, hc_mult=3,
        sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=4, index_head_dim=16, index_topk=2,
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"], swiglu_limit=1.0,
        rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16,
                         "beta_fast": 32, "beta_slow": 1},
    )),
}


ZERO_CENTERED_NORMS = ("Qwen3NextRMSNorm", "Qwen3_5MoeRMSNorm")


def tiny_hf_config(name: str, **overrides: Any):
    import transformers

    cfg_cls, _, kwargs = TINY_CONFIGS[name]
    return getattr(transformers, cfg_cls)(**{**kwargs, **overrides})


@torch.no_grad()
def sharpen(model: torch.nn.Module, seed: int = 0, router_scale: float = 3.0) -> torch.nn.Module:
    """Redraw every matrix with std ``1/sqrt(fan_in)`` (router rows x ``router_scale``), norms at
    1 + small noise and biases small, so outputs are O(1) and the router is decisive. DeepSeek-V3
    correction biases (buffers) get std 0.3, enough to change which experts are selected."""
    gen = torch.Generator().manual_seed(seed)
    # norms that scale by (1 + w) (Qwen3.5 / Qwen3-Next) are drawn around 0, not 1
    zero_centered = {f"{m}.weight" for m, mod in model.named_modules() if type(mod).__name__ in ZERO_CENTERED_NORMS}
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            std = 1.0 if "embed_tokens" in name else p.shape[-1] ** -0.5
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "mlp.router.weight",
                              "block_sparse_moe.router.weight", "feed_forward.router.weight", "router.proj.weight")):
                std *= router_scale
            if name.endswith("mlp.experts.gate_up_proj") and p.ndim == 3 and "gpt_oss" in type(model).__module__:
                # gpt-oss: transposed [E, d_model, 2I] bank; x3 so that |gate|, |up| > swiglu_limit=7 happens
                std = 3.0 * p.shape[-2] ** -0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        elif name.endswith("self_attn.sinks"):
            p.copy_(1.0 + torch.randn(p.shape, generator=gen))  # sinks that take a real share of attention
        elif name.endswith("router.per_expert_scale"):  # Gemma 4: per-expert combine scales
            p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=gen))
        elif name.endswith("router.scale"):  # Gemma 4: the router's input-norm weight (x4: decisive routing)
            p.copy_(torch.empty(p.shape).uniform_(3.0, 5.0, generator=gen))
        elif name.endswith("A_log"):  # Gated DeltaNet: slow decays (0.8..0.98 per token) so the state matters
            p.copy_(torch.empty(p.shape).uniform_(0.02, 0.2, generator=gen).log())
        elif name in zero_centered:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        elif "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # DeepSeek-V3 family: a selection-only bias (buffer)
            b.copy_(0.3 * torch.randn(b.shape, generator=gen))
        elif name.endswith("layer_scalar"):  # Gemma 4: a per-layer output scale (a saved buffer)
            b.copy_(torch.empty(b.shape).uniform_(0.5, 1.5, generator=gen))
        elif name.endswith("tid2eid"):  # DeepSeek-V4 hash routing: distinct random experts per token
            n_experts = model.config.n_routed_experts
            b.copy_(torch.stack([torch.randperm(n_experts, generator=gen)[: b.shape[1]] for _ in range(b.shape[0])]))
    return model


def tiny_hf_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A sharpened tiny transformers model of architecture ``name`` (see :data:`TINY_CONFIGS`)."""
    import transformers

    _, model_cls, _ = TINY_CONFIGS[name]
    torch.manual_seed(seed)
    cfg = tiny_hf_config(name, **overrides)
    model = getattr(transformers, model_cls)(cfg)
    sharpen(model, seed=seed)
    return model.to(dtype).eval()


def save_tiny(
    name: str, directory: str | Path, *, seed: int = 0, fused: bool = False, max_shard_size: Optional[str] = None,
    dtype: torch.dtype = torch.float32, **overrides: Any,
):
    """Build :func:`tiny_hf_model` and ``save_pretrained`` it (hub per-expert keys unless ``fused``)."""
    model = tiny_hf_model(name, seed=seed, dtype=dtype, **overrides)
    kwargs: dict[str, Any] = {}
    if fused:
        kwargs["save_original_format"] = False
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(directory), **kwargs)
    return model


def edit_config(directory: str | Path, **changes: Any) -> None:
    """Update fields of a saved checkpoint's ``config.json`` in place (tests of config handling)."""
    import json

    path = Path(directory) / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def toy_tokenizer(vocab_size: int = 256):
    """A word-level fast tokenizer over ``w0 .. w{n}`` plus ``<bos>``/``<pad>``, for tracing tests of
    tiny models (every word one token; ``w17`` is token 17)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 2)}
    vocab.update({"<bos>": vocab_size - 2, "<pad>": vocab_size - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab_size - 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>")


FP8_PROJECTIONS = r".*\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight"


def fp8_quantize_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-style FP8 block quantisation of a 2-D weight: ``(q float8_e4m3fn, scale_inv fp32
    [ceil(out/bm), ceil(in/bn)])`` with ``w ~= q * scale_inv`` per block (amax / 448 scaling)."""
    import math

    rows, cols = w.shape
    bm, bn = block
    if rows % bm == 0 and cols % bn == 0:  # whole blocks: vectorised, the same arithmetic as the loop below
        blk = w.float().reshape(rows // bm, bm, cols // bn, bn)
        s = blk.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
        return (blk / s[:, None, :, None]).to(torch.float8_e4m3fn).reshape(rows, cols), s
    grid = torch.empty(math.ceil(rows / bm), math.ceil(cols / bn), dtype=torch.float32)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            blk = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].float()
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            grid[i, j] = s
            q[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = (blk / s).to(torch.float8_e4m3fn)
    return q, grid


def save_fp8_copy(src: str | Path, dst: str | Path, block: tuple[int, int] = (128, 128),
                  pattern: str = FP8_PROJECTIONS, write_block_size: bool = True, device: Any = None) -> list[str]:
    """Copy the checkpoint in ``src`` to ``dst`` with every 2-D tensor whose key fully matches
    ``pattern`` stored as FP8 blocks (``<key>`` float8_e4m3fn + ``<key>_scale_inv`` fp32) and
    ``quantization_config`` added to config.json, as DeepSeek-V3's FP8 checkpoints are laid out.
    Returns the quantised keys."""
    import json
    import re
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json":
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  **({"weight_block_size": list(block)} if write_block_size else {})}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    rx, done = re.compile(pattern), []
    for shard in sorted(src.glob("*.safetensors")):
        out = {}
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.ndim == 2 and rx.fullmatch(key):
                    q, scale = fp8_quantize_block(t.to(device) if device is not None else t, block)
                    out[key], out[key + "_scale_inv"] = q.cpu(), scale.cpu()
                    done.append(key)
                else:
                    out[key] = t
        save_file(out, dst / shard.name, metadata={"format": "pt"})
    if (src / "model.safetensors.index.json").is_file():
        index = json.loads((src / "model.safetensors.index.json").read_text())
        for key in done:
            index["weight_map"][key + "_scale_inv"] = index["weight_map"][key]
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return done


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 quantisation of ``w [..., out, in]`` (``in`` a multiple of 32) along ``in``: returns
    ``(blocks uint8 [..., out, in/32, 16], scales uint8 [..., out, in/32])`` as gpt-oss's checkpoints
    store them: per group of 32, the power-of-two scale ``2**ceil(log2(amax / 6))`` and each value
    rounded to the nearest E2M1 value (low nibble = even position)."""
    from moelens.quant.mxfp4 import FP4_VALUES

    *lead, out, cols = w.shape
    if cols % 32:
        raise ValueError(f"in-features {cols} is not a multiple of 32")
    if lead:  # one leading entry (expert) at a time: bounded memory
        pairs = [mxfp4_quantize(m) for m in w.reshape(-1, out, cols)]
        return (torch.stack([p[0] for p in pairs]).reshape(*lead, out, cols // 32, 16),
                torch.stack([p[1] for p in pairs]).reshape(*lead, out, cols // 32))
    g = w.float().reshape(out, cols // 32, 32)
    amax = g.abs().amax(-1).clamp(min=2.0**-120)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = g / torch.exp2(exp)[..., None]
    positive = torch.tensor(FP4_VALUES[:8], device=w.device)
    nib = torch.bucketize(scaled.abs().contiguous(), (positive[1:] + positive[:-1]) / 2) + 8 * (scaled < 0)  # nearest value
    nib = nib.to(torch.uint8)
    blocks = nib[..., 0::2] | (nib[..., 1::2] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8)


def save_mxfp4_copy(src: str | Path, dst: str | Path, device: Any = None) -> list[str]:
    """Copy a gpt-oss checkpoint saved by transformers (expert banks ``experts.gate_up_proj`` /
    ``experts.down_proj`` in its ``[E, in, out]`` layout) to ``dst`` with the banks stored as MXFP4
    ``*_blocks`` / ``*_scales`` (:func:`mxfp4_quantize` of the ``[E, out, in]`` matrices) and
    ``quantization_config`` set to gpt-oss's. Returns the quantised keys."""
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json",):
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    done, index_map = [], {}
    for shard in sorted(src.glob("*.safetensors")):
        out = {}
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if key.endswith(("experts.gate_up_proj", "experts.down_proj")) and t.ndim == 3:
                    blocks, scales = mxfp4_quantize((t.to(device) if device is not None else t).transpose(1, 2))
                    out[key + "_blocks"], out[key + "_scales"] = blocks.cpu(), scales.cpu()
                    done.append(key)
                else:
                    out[key] = t
        save_file(out, dst / shard.name, metadata={"format": "pt"})
        index_map.update({k: shard.name for k in out})
    if (src / "model.safetensors.index.json").is_file():
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index_map}))
    return done


# aten ops that make a CUDA device wait for the host (or the host for the device): a scalar read,
# data-dependent output sizes, equality reduced to a Python bool
SYNC_OPS = ("_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "nonzero_static", "masked_select",
            "bincount", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim", "repeat_interleave")


class count_host_syncs:
    """Context manager counting the operations that would synchronise a GPU with the host, while
    the code runs on any device (so a CPU test can check the GPU code path): every aten op of
    :data:`SYNC_OPS` (``repeat_interleave`` only without ``output_size``), indexing with a boolean
    mask (its output size depends on the data), and ``Tensor.tolist`` / ``.cpu()`` / ``.numpy()``
    calls. ``.calls`` lists them in order (op names)."""

    def __init__(self):
        self.calls: list[str] = []

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        calls = self.calls

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func.overloadpacket.__name__
                if name in SYNC_OPS and not (name == "repeat_interleave" and kwargs.get("output_size") is not None):
                    calls.append(name)
                elif name in ("index", "index_put", "index_put_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
                ):
                    calls.append(f"{name}[bool mask]")
                return func(*args, **kwargs)

        self._mode = _Mode()
        self._mode.__enter__()
        self._saved = {}
        for meth in ("tolist", "cpu", "numpy"):
            original = getattr(torch.Tensor, meth)
            self._saved[meth] = original

            def wrapper(t, *a, _m=meth, _o=original, **k):
                calls.append(f"Tensor.{_m}")
                return _o(t, *a, **k)

            setattr(torch.Tensor, meth, wrapper)
        return self

    def __exit__(self, *exc):
        for meth, original in self._saved.items():
            setattr(torch.Tensor, meth, original)
        self._mode.__exit__(*exc)
        return False


class gpu_code_path:
    """Context manager: run the code path moelens takes on a CUDA device on whatever device the
    tensors are on (``expert_impl="auto"`` picks ``grouped_mm``, hook checks that would read values
    back to the host are skipped as on a GPU), so that CPU tests can count its host syncs."""

    def __enter__(self):
        from moelens.components.experts import GPU_CODE_PATH

        self._prev = GPU_CODE_PATH["on"]
        GPU_CODE_PATH["on"] = True
        return self

    def __exit__(self, *exc):
        from moelens.components.experts import GPU_CODE_PATH

        GPU_CODE_PATH["on"] = self._prev
        return False


@torch.no_grad()
def hf_routing(hf_model, ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
    """Run a transformers MoE model and capture what each sparse layer's router returned.

    Returns ``(logits, layers)``: ``layers[i] = (router_logits [batch, pos, n_experts], weights
    [batch, pos, top_k], indices [batch, pos, top_k])`` of the ``i``-th module whose class name ends in
    ``TopKRouter`` (transformers 5's routers return ``(router_logits, top_k_weights, top_k_index)``),
    in layer order. The chosen experts and combine weights are transformers' own, not recomputed.
    """
    captured = []

    def grab(module, args, out):
        captured.append(tuple(t.detach() for t in out[:3]))

    handles = [m.register_forward_hook(grab) for m in hf_model.modules() if type(m).__name__.endswith("TopKRouter")]
    if not handles:
        raise ValueError(f"{type(hf_model).__name__} has no *TopKRouter module to capture")
    try:
        logits = hf_model(ids, attention_mask=attention_mask).logits
    finally:
        for h in handles:
            h.remove()
    b, p = ids.shape
    return logits, [tuple(t.reshape(b, p, -1) for t in layer) for layer in captured]


@torch.no_grad()
def assert_routing_matches(model, hf_model, ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                           tol: float = 1e-4, weight_scale: float = 1.0) -> dict:
    """moelens ``model`` against transformers ``hf_model`` on ``ids``: logits, raw router logits, chosen
    experts (as sets per position) and combine weights (paired with their experts) agree to ``tol`` at
    every real (unpadded) position. ``weight_scale``: what moelens folds into its combine weights beyond
    transformers' (Granite's residual multiplier). Returns the largest differences seen."""
    theirs, layers = hf_routing(hf_model, ids, attention_mask)
    ours, cache = model.run_with_cache(ids, attention_mask=attention_mask)
    real = attention_mask.bool() if attention_mask is not None else torch.ones(ids.shape, dtype=torch.bool)
    worst = {"logits": float((theirs.float() - ours.float())[real].abs().max())}
    assert worst["logits"] < tol, f"logits differ by {worst['logits']}"
    assert len(layers) == len(model.cfg.moe_layers), (len(layers), model.cfg.moe_layers)
    worst["router_logits"] = worst["weights"] = 0.0
    for (r_logits, r_w, r_idx), l in zip(layers, model.cfg.moe_layers):
        d = float((cache[f"blocks.{l}.mlp.hook_router_logits"].float() - r_logits.float())[real].abs().max())
        worst["router_logits"] = max(worst["router_logits"], d)
        assert d < tol, f"layer {l}: router logits differ by {d}"
        idx = cache[f"blocks.{l}.mlp.hook_expert_indices"]
        mine_idx, order = idx.sort(-1)
        mine_w = cache[f"blocks.{l}.mlp.hook_expert_weights"].gather(-1, order)
        their_idx, t_order = r_idx.sort(-1)
        their_w = r_w.gather(-1, t_order) * weight_scale
        assert torch.equal(mine_idx[real], their_idx[real]), f"layer {l}: chosen experts differ"
        d = float((mine_w.float() - their_w.float())[real].abs().max())
        worst["weights"] = max(worst["weights"], d)
        assert d < tol, f"layer {l}: combine weights differ by {d}"
    return worst


def random_ids(b: int = 2, p: int = 13, seed: int = 1, vocab: int = 256) -> torch.Tensor:
    """``[b, p]`` random token ids below ``vocab`` (the tiny configs' vocabulary), seeded."""
    return torch.randint(0, vocab, (b, p), generator=torch.Generator().manual_seed(seed))


def hf_forward(hf, ids: torch.Tensor, mask: Optional[torch.Tensor] = None):
    """transformers' forward with router logits (no gradients)."""
    with torch.no_grad():
        return hf(ids, attention_mask=mask, output_router_logits=True)


def assert_topk_parity(model, hf, ids: torch.Tensor, mask: Optional[torch.Tensor] = None, tol: float = 1e-4,
                       select: Callable[[torch.Tensor], torch.Tensor] = lambda logits: logits):
    """moelens and transformers on the same tokens: logits and each sparse layer's router logits
    within ``tol`` at real (unmasked) positions, and the same experts in the same slots as
    transformers' top-k of ``select(router logits)`` (sorted). Returns ``(hf output, logits, cache)``."""
    out = hf_forward(hf, ids, mask)
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, attention_mask=mask)
    real = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
    assert (out.logits - logits)[real].abs().max() < tol
    b, p = ids.shape
    assert len(out.router_logits) == len(model.cfg.moe_layers)
    for i, layer in enumerate(model.cfg.moe_layers):
        ours = cache[f"blocks.{layer}.mlp.hook_router_logits"]
        theirs = out.router_logits[i].view(b, p, -1)
        assert (ours - theirs)[real].abs().max() < tol
        chosen = cache[f"blocks.{layer}.mlp.hook_expert_indices"]
        assert torch.equal(chosen[real], torch.topk(select(theirs), model.cfg.top_k, dim=-1).indices[real])
    return out, logits, cache


def left_padded_batch(seed: int = 1, pad: bool = True, n: int = 12, pads: tuple = ((0, 5),)):
    """``(ids [3, n], mask)``: random token ids, row ``r`` left-padded with ``k`` pad tokens (id 0,
    mask 0) for each ``(r, k)`` in ``pads`` when ``pad``."""
    ids = random_ids(3, n, seed)
    mask = torch.ones_like(ids)
    if pad:
        for row, k in pads:
            mask[row, :k] = 0
        ids[mask == 0] = 0
    return ids, mask
