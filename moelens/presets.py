"""The ``config.json`` of the reference checkpoints, as Python dicts (no download needed).

Each preset is the checkpoint's hub ``config.json`` with the hub's own field names (legacy
top-level ``rope_theta`` / ``rope_scaling``, Qwen3's ``num_experts`` and explicit ``head_dim``,
DeepSeek's YaRN ``rope_scaling`` dict, ...), so it can be fed to
:meth:`moelens.HookedMoETransformer.from_config` and to ``transformers.AutoConfig.for_model``
alike. Use them to plan memory and devices without touching the weights::

    >>> from moelens import HookedMoETransformer
    >>> model = HookedMoETransformer.from_config("qwen3-30b-a3b", device="meta")
    >>> model.n_params()                       # 30,532,122,624 (no memory allocated)
    >>> from moelens.presets import preset_summary
    >>> preset_summary("mixtral-8x7b")["active_params"]

Sources. Every structural value (layers, widths, heads, experts, vocabulary, tied head) is
confirmed by the exact parameter count: a model built from the preset on the meta device has
exactly the published total (``PRESET_INFO[...]["published_params"]``), in moelens and in
transformers 5.23 (``tests/unit/test_presets.py``). Fields that a parameter count cannot confirm
(``num_experts_per_tok``, ``norm_topk_prob``, RoPE, eps, token ids, context length) are taken
from the public checkpoint ``config.json`` as quoted in /work/shared/MOE_ARCHITECTURES.md
(§2.6, §3.6, §4.6, §5.6, §6.6) and cross-checked against copies of the hub files found in
public repositories; ``PRESET_INFO[...]["notes"]`` says which is which per model. Fields that
are inert for inference (``initializer_range``, ``router_aux_loss_coef``, ...) are kept so the
dicts read like the real files.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["PRESETS", "ALIASES", "PRESET_INFO", "get_preset", "list_presets", "resolve_name", "preset_summary",
           "transformers_meta_model"]

def _gpt_oss_config(n_layers: int, n_experts: int) -> dict:
    """openai/gpt-oss-20b and -120b share every field but the layer and expert counts."""
    return {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": 200002,
        "experts_per_token": 4,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2880,
        "initial_context_length": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 2880,
        "layer_types": ["sliding_attention", "full_attention"] * (n_layers // 2),
        "max_position_embeddings": 131072,
        "model_type": "gpt_oss",
        "num_attention_heads": 64,
        "num_experts_per_tok": 4,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": 8,
        "num_local_experts": n_experts,
        "output_router_logits": False,
        "pad_token_id": 199999,
        "quantization_config": {
            "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head",
            ],
            "quant_method": "mxfp4",
        },
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "transformers_version": "4.55.0.dev0",
        "use_cache": True,
        "vocab_size": 201088,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # ---------------------------------------------------------------- Mixtral (MOE_ARCHITECTURES.md §2.6)
    "mistralai/Mixtral-8x7B-v0.1": {
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "model_type": "mixtral",
        "num_attention_heads": 32,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.0.dev0",
        "use_cache": True,
        "vocab_size": 32000,
    },
    # ---------------------------------------------------------------- Qwen3-MoE (§3.6)
    "Qwen/Qwen3-30B-A3B-Base": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "decoder_sparse_step": 1,
        "eos_token_id": 151643,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 6144,
        "max_position_embeddings": 32768,
        "max_window_layers": 48,
        "mlp_only_layers": [],
        "model_type": "qwen3_moe",
        "moe_intermediate_size": 768,
        "norm_topk_prob": True,
        "num_attention_heads": 32,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 48,
        "num_key_value_heads": 4,
        "output_router_logits": False,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    # ---------------------------------------------------------------- OLMoE (§4.6)
    "allenai/OLMoE-1B-7B-0924": {
        "architectures": ["OlmoeForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "clip_qkv": None,
        "eos_token_id": 50279,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 1024,
        "max_position_embeddings": 4096,
        "model_type": "olmoe",
        "norm_topk_prob": False,
        "num_attention_heads": 16,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 16,
        "num_key_value_heads": 16,
        "output_router_logits": False,
        "pad_token_id": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "router_aux_loss_coef": 0.01,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0",
        "use_cache": True,
        "vocab_size": 50304,
    },
    # ---------------------------------------------------------------- Qwen2-MoE (§5.6)
    "Qwen/Qwen1.5-MoE-A2.7B": {
        "architectures": ["Qwen2MoeForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "decoder_sparse_step": 1,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 5632,
        "max_position_embeddings": 8192,
        "max_window_layers": 21,
        "model_type": "qwen2_moe",
        "moe_intermediate_size": 1408,
        "norm_topk_prob": False,
        "num_attention_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 24,
        "num_key_value_heads": 16,
        "output_router_logits": False,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 5632,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.0.dev0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    # ---------------------------------------------------------------- DeepSeek-V2-Lite (§6.6)
    # The hub file also carries an ``auto_map`` to the original remote code; it is left out
    # because transformers 5 implements ``deepseek_v2`` natively (no trust_remote_code).
    "deepseek-ai/DeepSeek-V2-Lite": {
        "architectures": ["DeepseekV2ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 10944,
        "kv_lora_rank": 512,
        "max_position_embeddings": 163840,
        "model_type": "deepseek_v2",
        "moe_intermediate_size": 1408,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "norm_topk_prob": False,
        "num_attention_heads": 16,
        "num_experts_per_tok": 6,
        "num_hidden_layers": 27,
        "num_key_value_heads": 16,
        "pretraining_tp": 1,
        "q_lora_rank": None,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 1.0,
        "scoring_func": "softmax",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "greedy",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1",
        "use_cache": True,
        "v_head_dim": 128,
        "vocab_size": 102400,
    },
    # ---------------------------------------------------------------- gpt-oss (MOE_ARCHITECTURES_2026.md §2)
    "openai/gpt-oss-20b": _gpt_oss_config(24, 32),
    "openai/gpt-oss-120b": _gpt_oss_config(36, 128),
}

ALIASES: dict[str, str] = {
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B-Base",
    "olmoe-1b-7b": "allenai/OLMoE-1B-7B-0924",
    "qwen1.5-moe-a2.7b": "Qwen/Qwen1.5-MoE-A2.7B",
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite",
    "gpt-oss-20b": "openai/gpt-oss-20b",
    "gpt-oss-120b": "openai/gpt-oss-120b",
}

_STRUCTURAL = "structural fields confirmed by the exact meta-device parameter count"

PRESET_INFO: dict[str, dict[str, Any]] = {
    "mistralai/Mixtral-8x7B-v0.1": {
        "alias": "mixtral-8x7b",
        "published_params": 46_700_000_000,  # "46.7B" (Mistral AI release notes / model card)
        "exact_params": 46_702_792_704,  # MOE_ARCHITECTURES.md §2.6, meta-device count
        "doc_active_params": 12_880_000_000,  # §2.6: 12.88 B incl. embeddings, 12.62 B without
        "notes": (
            f"{_STRUCTURAL}; num_experts_per_tok=2 (the '2 of 8 experts' of the release), rope_theta 1e6, "
            "rms_norm_eps 1e-5, sliding_window null, bos/eos 1/2, max_position 32768: hub config.json as quoted "
            "in MOE_ARCHITECTURES.md §2.6 (recalled there) and identical in public copies of the file"
        ),
    },
    "Qwen/Qwen3-30B-A3B-Base": {
        "alias": "qwen3-30b-a3b",
        "published_params": 30_500_000_000,  # "30.5B in total, 3.3B activated" (model card)
        "exact_params": 30_532_122_624,  # §3.6 (= transformer_lens registry total_params)
        "doc_active_params": 3_350_000_000,  # §3.6: 3.35 B incl. embeddings, 2.73 B without
        "notes": (
            f"{_STRUCTURAL} (head_dim 128 != hidden/heads, mlp_only_layers [], decoder_sparse_step 1); "
            "num_experts_per_tok 8 and norm_topk_prob true (class default is false!), rope_theta 1e6, "
            "rms_norm_eps 1e-6, bos/eos 151643: §3.6 (recalled) and public copies of the Qwen3-30B-A3B "
            "config.json (the instruct release differs only in eos 151645 and max_position 40960)"
        ),
    },
    "allenai/OLMoE-1B-7B-0924": {
        "alias": "olmoe-1b-7b",
        "published_params": 6_900_000_000,  # "1B active / 7B total", 6.92 B (paper, model card)
        "exact_params": 6_919_161_856,  # §4.6
        "doc_active_params": 1_280_000_000,  # §4.6: 1.28 B incl. embeddings, 1.08 B without
        "notes": (
            f"{_STRUCTURAL}; num_experts_per_tok 8, norm_topk_prob false, clip_qkv null, rope_theta 1e4, "
            "rms_norm_eps 1e-5, pad/eos 1/50279, max_position 4096: §4.6 (recalled, equal to the class defaults)"
        ),
    },
    "Qwen/Qwen1.5-MoE-A2.7B": {
        "alias": "qwen1.5-moe-a2.7b",
        "published_params": 14_300_000_000,  # "14.3B total, 2.7B activated" (Qwen1.5-MoE blog)
        "exact_params": 14_315_784_192,  # §5.6
        "doc_active_params": 2_690_000_000,  # §5.6: 2.69 B incl. embeddings, 2.07 B without
        "notes": (
            f"{_STRUCTURAL} (incl. the shared expert 5632 and q/k/v biases, which the hub file leaves to the "
            "class default qkv_bias=True); num_experts_per_tok 4, norm_topk_prob false, rope_theta 1e6, "
            "rms_norm_eps 1e-6, sliding window off (use_sliding_window false; sliding_window 32768 and "
            "max_window_layers 21 inert), max_position 8192: §5.6 (recalled) and public copies of the file"
        ),
    },
    "deepseek-ai/DeepSeek-V2-Lite": {
        "alias": "deepseek-v2-lite",
        "published_params": 15_700_000_000,  # "15.7B total, 2.4B activated" (model card)
        "exact_params": 15_706_484_224,  # §6.6
        "doc_active_params": 2_660_000_000,  # §6.6: 2.66 B incl. embeddings, 2.24 B without
        "notes": (
            f"{_STRUCTURAL} (MLA ranks and head dims, 1 dense layer of 10944, 2 shared experts); "
            "num_experts_per_tok 6, topk_method greedy, routed_scaling_factor 1.0, rope_theta 1e4 and the YaRN "
            "rope_scaling dict (factor 40, original 4096, beta 32/1, mscale = mscale_all_dim = 0.707), bos/eos "
            "100000/100001, max_position 163840: §6.6 (recalled) and public copies of the hub file (a v5 re-save "
            "moves rope_theta/rope_scaling into rope_parameters). The hub's auto_map (remote code) is omitted. "
            "The model card's '2.4B activated' excludes embeddings differently from moelens' count (2.66 B / 2.24 B)"
        ),
    },
    "openai/gpt-oss-20b": {
        "alias": "gpt-oss-20b",
        "published_params": 21_000_000_000,  # "21B parameters, 3.6B active" (OpenAI model card: 20.91 B)
        "exact_params": 20_914_757_184,  # MOE_ARCHITECTURES_2026.md §9 (20.915 B), meta-device count
        "doc_active_params": 4_190_000_000,  # §9: 4.19 B incl. embeddings (OpenAI's 3.6 B excludes the input embedding only)
        "notes": (
            f"{_STRUCTURAL} (24 layers, 32 experts, 2880 wide, 64 q / 8 kv heads of 64, biases, sinks); "
            "num_experts_per_tok 4, sliding_window 128 on the even layers (layer_types), rope_theta 150000 with YaRN "
            "(factor 32, original 4096, beta 32/1, truncate false), swiglu_limit 7, rms_norm_eps 1e-5, eos/pad "
            "200002/199999, quantization_config mxfp4: the hub config.json as quoted in MOE_ARCHITECTURES_2026.md §2 and "
            "identical in public copies of the file (the 120b file differs only in layers and experts)"
        ),
    },
    "openai/gpt-oss-120b": {
        "alias": "gpt-oss-120b",
        "published_params": 116_800_000_000,  # "117B parameters, 5.1B active" (OpenAI model card: 116.83 B)
        "exact_params": 116_829_156_672,  # §9 (116.829 B)
        "doc_active_params": 5_710_000_000,  # §9: 5.71 B incl. embeddings (OpenAI's 5.1 B excludes the input embedding)
        "notes": (
            f"{_STRUCTURAL} (36 layers, 128 experts, otherwise as gpt-oss-20b); the other fields as gpt-oss-20b: "
            "hub config.json (https://huggingface.co/openai/gpt-oss-120b/raw/main/config.json) as quoted in public "
            "copies and MOE_ARCHITECTURES_2026.md §2"
        ),
    },
}


def resolve_name(name: str) -> str:
    """The hub id of a preset given its hub id or alias (case-insensitive); KeyError otherwise."""
    if name in PRESETS:
        return name
    lowered = str(name).lower()
    for hub_id in PRESETS:
        if hub_id.lower() == lowered:
            return hub_id
    if lowered in ALIASES:
        return ALIASES[lowered]
    raise KeyError(
        f"Unknown preset {name!r}. Available presets: "
        + ", ".join(f"{hub} (alias {PRESET_INFO[hub]['alias']!r})" for hub in PRESETS)
    )


def get_preset(name: str) -> dict:
    """A deep copy of the ``config.json`` dict of preset ``name`` (hub id or alias)."""
    return copy.deepcopy(PRESETS[resolve_name(name)])


def list_presets(aliases: bool = False) -> list[str]:
    """Hub ids of the presets (with ``aliases=True``: the short aliases instead)."""
    return [PRESET_INFO[h]["alias"] for h in PRESETS] if aliases else list(PRESETS)


def preset_summary(name: str) -> dict:
    """Parameter counts of a preset, computed on the meta device (no memory, ~a second).

    Returns ``{"name", "alias", "architecture", "total_params", "active_params",
    "active_params_no_embeddings", "total_params_no_embeddings", "published_params",
    "bytes_bf16", "n_layers", "n_experts", "top_k"}``. "Active" counts only ``top_k`` of the
    routed experts of every sparse layer (shared experts, dense layers, attention and norms
    always count); the embedding and unembedding matrices are excluded from the ``*_no_embeddings``
    numbers.
    """
    from moelens.model import HookedMoETransformer

    hub_id = resolve_name(name)
    model = HookedMoETransformer.from_config(get_preset(hub_id), device="meta")
    total = model.n_params()
    return {
        "name": hub_id,
        "alias": PRESET_INFO[hub_id]["alias"],
        "architecture": model.cfg.architecture,
        "total_params": total,
        "total_params_no_embeddings": model.n_params(include_embeddings=False),
        "active_params": model.n_params(active=True),
        "active_params_no_embeddings": model.n_params(active=True, include_embeddings=False),
        "published_params": PRESET_INFO[hub_id]["published_params"],
        "bytes_bf16": 2 * total,
        "n_layers": model.cfg.n_layers,
        "n_experts": model.cfg.n_experts,
        "top_k": model.cfg.top_k,
    }


def transformers_meta_model(name: str):
    """The transformers 5 model of a preset, instantiated on the meta device (for cross-checks).

    Built as ``AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))`` under
    ``torch.device("meta")``: no memory is allocated and no file is read.
    """
    import torch
    import transformers

    cfg = get_preset(name)
    hf_config = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(hf_config)
