"""The ``config.json`` of the reference checkpoints, as Python dicts (no download needed): the five
first architectures plus DeepSeek-V3, Kimi-K2, GLM-4.5, GLM-4.5-Air, GLM-4.7-Flash, gpt-oss-20b and
gpt-oss-120b, the Qwen3.5/3.6 and Qwen3-Next hybrids, Granite-3.1 MoE (1B-A400M, 3B-A800M), MiniMax-M2,
Phi-3.5-MoE (structure only: its LongRoPE factors are left out), ERNIE-4.5 (21B-A3B, 300B-A47B), Llama-4
Scout and Maverick, Gemma-4-26B-A4B (text models), FlexOlmo-7x7B-1T, DeepSeek-V3.2-Exp, GLM-5 and
DeepSeek-V4-Flash.

Each preset is the checkpoint's hub ``config.json`` with the hub's own field names (legacy
top-level ``rope_theta`` / ``rope_scaling``, Qwen3's ``num_experts`` and explicit ``head_dim``,
DeepSeek's YaRN ``rope_scaling`` dict, ...), so it can be fed to
:meth:`moelens.HookedMoETransformer.from_config` and to ``transformers.AutoConfig.for_model``
alike (this module is data and lookups only: the model imports it; models built from a preset
live in :mod:`moelens.preset_models`). Use them to plan memory and devices without touching the weights::

    >>> from moelens import HookedMoETransformer
    >>> model = HookedMoETransformer.from_config("qwen3-30b-a3b", device="meta")
    >>> model.n_params()                       # 30,532,122,624 (no memory allocated)
    >>> from moelens.preset_models import preset_summary
    >>> preset_summary("mixtral-8x7b")["active_params"]

Sources. Every structural value (layers, widths, heads, experts, vocabulary, tied head) is
confirmed by the exact parameter count: a model built from the preset on the meta device has
exactly the published total (``PRESET_INFO[...]["published_params"]``, to 0.5 % or to the
``published_tolerance`` that the published rounding allows), in moelens and in transformers
(``tests/unit/test_presets.py``). Fields that a parameter count cannot confirm
(``num_experts_per_tok``, ``norm_topk_prob``, RoPE, eps, token ids, context length) are taken
from the public checkpoint ``config.json``: for the five first architectures as quoted in
the project's architecture notes (not part of this repository; §2.6, §3.6, §4.6, §5.6, §6.6) and cross-checked against
copies of the hub files found in public repositories; for Kimi-K2, GLM-4.5-Air and GLM-4.7-Flash
checked field by field against public copies of their hub files (repository, path and commit in
the notes); for GLM-4.5 the token ids and context length rest on the GLM-4.7 hub file and a
published comparison of the two files, no copy of GLM-4.5's own file having been found.
``PRESET_INFO[...]["notes"]`` says which is which per model. Fields that
are inert for inference (``initializer_range``, ``router_aux_loss_coef``, ...) are kept so the
dicts read like the real files.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["PRESETS", "ALIASES", "PRESET_INFO", "get_preset", "list_presets", "resolve_name"]

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
    # ------------------------------------------- DeepSeek-V3 router family (MOE_ARCHITECTURES_2026.md §4, §5)
    "deepseek-ai/DeepSeek-V3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "first_k_dense_replace": 3,
        "hidden_act": "silu",
        "hidden_size": 7168,
        "initializer_range": 0.02,
        "intermediate_size": 18432,
        "kv_lora_rank": 512,
        "max_position_embeddings": 163840,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": 2048,
        "moe_layer_freq": 1,
        "n_group": 8,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 61,
        "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1,
        "pretraining_tp": 1,
        "q_lora_rank": 1536,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 4,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "use_cache": True,
        "v_head_dim": 128,
        "vocab_size": 129280,
    },
    "moonshotai/Kimi-K2-Instruct": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": 163584,
        "eos_token_id": 163585,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 7168,
        "initializer_range": 0.02,
        "intermediate_size": 18432,
        "kv_lora_rank": 512,
        "max_position_embeddings": 131072,
        "model_type": "kimi_k2",
        "moe_intermediate_size": 2048,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": 384,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 64,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 61,
        "num_key_value_heads": 64,
        "num_nextn_predict_layers": 0,
        "pretraining_tp": 1,
        "q_lora_rank": 1536,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 50000.0,
        "routed_scaling_factor": 2.827,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.48.3",
        "use_cache": True,
        "v_head_dim": 128,
        "vocab_size": 163840,
    },
    "zai-org/GLM-4.5": {
        "architectures": ["Glm4MoeForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": [151329, 151336, 151338],
        "first_k_dense_replace": 3,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 5120,
        "initializer_range": 0.02,
        "intermediate_size": 12288,
        "max_position_embeddings": 131072,
        "model_type": "glm4_moe",
        "moe_intermediate_size": 1536,
        "n_group": 1,
        "n_routed_experts": 160,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 96,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 92,
        "num_key_value_heads": 8,
        "num_nextn_predict_layers": 1,
        "pad_token_id": 151329,
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "routed_scaling_factor": 2.5,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.54.0",
        "use_cache": True,
        "use_qk_norm": True,
        "vocab_size": 151552,
    },
    "zai-org/GLM-4.5-Air": {
        "architectures": ["Glm4MoeForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": [151329, 151336, 151338],
        "first_k_dense_replace": 1,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 10944,
        "max_position_embeddings": 131072,
        "model_type": "glm4_moe",
        "moe_intermediate_size": 1408,
        "n_group": 1,
        "n_routed_experts": 128,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 96,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 46,
        "num_key_value_heads": 8,
        "num_nextn_predict_layers": 1,
        "pad_token_id": 151329,
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "routed_scaling_factor": 1.0,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.54.0",
        "use_cache": True,
        "use_qk_norm": False,
        "vocab_size": 151552,
    },
    "zai-org/GLM-4.7-Flash": {
        "architectures": ["Glm4MoeLiteForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "dtype": "bfloat16",
        "eos_token_id": [154820, 154827, 154829],
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "intermediate_size": 10240,
        "kv_lora_rank": 512,
        "max_position_embeddings": 202752,
        "model_type": "glm4_moe_lite",
        "moe_intermediate_size": 1536,
        "n_group": 1,
        "n_routed_experts": 64,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 20,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 47,
        "num_key_value_heads": 20,
        "num_nextn_predict_layers": 1,
        "pad_token_id": 154820,
        "partial_rotary_factor": 1.0,
        "q_lora_rank": 768,
        "qk_nope_head_dim": 192,
        "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "routed_scaling_factor": 1.8,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "transformers_version": "5.0.0rc0",
        "v_head_dim": 256,
        "vocab_size": 154880,
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
    "deepseek-v3": "deepseek-ai/DeepSeek-V3",
    "kimi-k2": "moonshotai/Kimi-K2-Instruct",
    "glm-4.5": "zai-org/GLM-4.5",
    "glm-4.5-air": "zai-org/GLM-4.5-Air",
    "glm-4.7-flash": "zai-org/GLM-4.7-Flash",
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
    "deepseek-ai/DeepSeek-V3": {
        "alias": "deepseek-v3",
        "published_params": 671_000_000_000,  # "671B total, 37B activated" (model card; 685B with the MTP module)
        "exact_params": 671_026_404_352,  # MOE_ARCHITECTURES_2026.md §9 (class defaults = this config)
        "doc_active_params": 37_550_000_000,  # §9
        "notes": (
            f"{_STRUCTURAL} (61 layers, 3 dense, MLA 1536/512/128/64/128, 256 experts + 1 shared); "
            "num_experts_per_tok 8, n_group 8 / topk_group 4, routed_scaling_factor 2.5, norm_topk_prob true, "
            "sigmoid/noaux_tc, YaRN (factor 40, mscale = mscale_all_dim = 1.0, original 4096), rope_theta 1e4, "
            "FP8 quantization_config: MOE_ARCHITECTURES_2026.md §4 (copies of the hub file, DeepSeek's "
            "config_671B.json). R1 / V3-0324 / V3.1 share the shapes. The hub's auto_map (remote code) is omitted"
        ),
    },
    "moonshotai/Kimi-K2-Instruct": {
        "alias": "kimi-k2",
        "published_params": 1_000_000_000_000,  # "1 trillion total, 32 billion activated" (model card)
        "published_tolerance": 0.05,  # "1T" is given to one significant digit
        "exact_params": 1_026_408_209_408,  # MOE_ARCHITECTURES_2026.md §9 (1026.4 B)
        "doc_active_params": 32_860_000_000,  # §9 (32.86 B)
        "notes": (
            f"{_STRUCTURAL} (the count equals §9's 1026.4 B and its 32.86 B active); layers, widths, 64 heads, "
            "384 experts, top-8, n_group 1, routed_scaling_factor 2.827, first_k_dense_replace 1, rope base 5e4: "
            "§4 (Megatron-Bridge KimiK2Provider, kimi-k25-tiny router fields). The other fields are the hub "
            "config.json (transformers_version 4.48.3) as copied in public repositories: vocab 163840, bos/eos "
            "163584/163585, max_position 131072, rms_norm_eps 1e-6 and YaRN (factor 32, beta_fast = beta_slow = 1, "
            "mscale = mscale_all_dim = 1, original 4096) are in mfarisadip/Kimi-K2-Mini "
            "k2-mini-broken/config_backup.json (commit 0fd6b81d91089f15b0217642272142a89590d0ae; the Instruct file "
            "with only layers, experts, top-k and model_type edited) and in a verbatim copy of the file inside a "
            "public model-inspection report whose repository the code search does not name (its weight table also "
            "gives embed_tokens and lm_head [163840, 7168]); vocab and the YaRN values also equal "
            "NVIDIA-NeMo/Megatron-Bridge src/megatron/bridge/models/kimi/kimi_provider.py (commit "
            "1e59114075c83a04b94bed4f1f44e848e521024d: rotary_scaling_factor 32, beta_fast/beta_slow/mscale/"
            "mscale_all_dim 1.0, vocab_size 163840). Neither copy has ep_size, so the preset has none; the hub's "
            "auto_map (remote code) is omitted. Kimi-K2-Instruct-0905 is a different file (YaRN factor 64: "
            "ParagEkbote/hf-model-inspector model_inspection_report.md). model_type kimi_k2 (no transformers "
            "class) is read as DeepSeek-V3"
        ),
    },
    "zai-org/GLM-4.5": {
        "alias": "glm-4.5",
        "published_params": 355_000_000_000,  # "355B total, 32B active" (model card)
        "published_tolerance": 0.01,  # 352.80 B without the MTP layer (layer 92), which the published count includes
        "exact_params": 352_797_814_784,  # meta-device count, transformers 5.24
        "doc_active_params": 33_630_000_000,
        "notes": (
            f"{_STRUCTURAL} up to the MTP layer (published 355 B includes it; the decoder alone is 352.8 B); "
            "shapes of zai-org/GLM-4.7 (= GLM-4.6, MOE_ARCHITECTURES_2026.md §5), which GLM-4.5 shares: 92 layers, "
            "hidden 5120, 96/8 heads of 128, partial_rotary_factor 0.5, attention_bias and use_qk_norm true, "
            "160 experts + 1 shared, top-8, routed_scaling_factor 2.5, 3 dense layers, rope_theta 1e6. Token ids "
            "(pad 151329, eos [151329, 151336, 151338], no bos_token_id) and max_position 131072: no verbatim public "
            "copy of the GLM-4.5 file was found. The zai-org/GLM-4.7 hub file (revision 602d01ef, as stored in "
            "rengzhengcodes/SmolBench scripts/arch/arch_configs_raw.json, commit "
            "a4d1710a298ac091b074a8131b00f71354163b79) has these token ids and every other field of this preset "
            "except max_position 202752, the GLM-4.5-Air file has the same ids, and the same repository's "
            "scripts/arch/research/glm.md (commit dff6f8abaf1ffd2d96e1778b48e8361f0f6216b4) reports that "
            "GLM-4.5's config.json, re-fetched, equals GLM-4.7's field for field except max_position 131072; "
            "corroborated, not read from a copy of the file"
        ),
    },
    "zai-org/GLM-4.5-Air": {
        "alias": "glm-4.5-air",
        "published_params": 106_000_000_000,  # "106B total, 12B active" (model card)
        "published_tolerance": 0.01,  # 106.85 B: the card rounds down
        "exact_params": 106_852_245_504,  # MOE_ARCHITECTURES_2026.md §9
        "doc_active_params": 13_420_000_000,  # §9 (12.18 B without embeddings)
        "notes": (
            f"{_STRUCTURAL}; GQA 96/8 heads of 128, partial_rotary_factor 0.5, attention_bias true, use_qk_norm "
            "false, 128 experts + 1 shared, top-8, routed_scaling_factor 1.0, rope_theta 1e6, rms_norm_eps 1e-5: "
            "§5 (PrimeIntellect/INTELLECT-3, GLM-4.5-Air shaped). Token ids (pad 151329, eos [151329, 151336, "
            "151338], no bos_token_id), max_position 131072 and every other field equal the hub file at revision "
            "a24ceef6ce4f3536971efe9b778bdaa1bab18daa as stored in rengzhengcodes/SmolBench "
            "scripts/arch/arch_configs_raw.json (commit a4d1710a298ac091b074a8131b00f71354163b79)"
        ),
    },
    "zai-org/GLM-4.7-Flash": {
        "alias": "glm-4.7-flash",
        "published_params": 30_000_000_000,  # "30B-A3B" (model card; the hub widget says 31B with the MTP layer)
        "exact_params": 29_943_390_976,  # MOE_ARCHITECTURES_2026.md §9
        "doc_active_params": 3_900_000_000,  # §9
        "notes": (
            f"{_STRUCTURAL}; MLA q_lora 768 / kv_lora 512 / nope 192 / rope 64 / v 256, 20 heads, 64 experts + 1 "
            "shared, top-4, routed_scaling_factor 1.8, layer 0 dense, rope_theta 1e6 (no YaRN), rms_norm_eps 1e-5, "
            "max_position 202752: §5 (derivatives with identical shapes). The preset is the hub file at revision "
            "7dd20894a642a0aa287e9827cb1a1f7f91386b67 field for field, as stored in rengzhengcodes/SmolBench "
            "scripts/arch/arch_configs_raw.json (commit a4d1710a298ac091b074a8131b00f71354163b79) and in a "
            "verbatim copy inside a public model-inspection report: pad 154820, eos [154820, 154827, 154829], "
            "max_position 202752. The file has no bos_token_id (the transformers and moelens class default 0 "
            "applies), no rope_interleave (default true), initializer_range or use_cache, and writes dtype, "
            "not torch_dtype"
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

# ---------------------------------------------------------------- Qwen3.5 / 3.6-MoE, Qwen3-Next (MOE_ARCHITECTURES_2026.md §3)
_QWEN35_LAYER_TYPES = (["linear_attention"] * 3 + ["full_attention"]) * 10


def _qwen3_5_moe_text(**changes: Any) -> dict[str, Any]:
    """The ``text_config`` of the Qwen3.5/3.6-35B-A3B hub config.json (a multimodal
    ``Qwen3_5MoeForConditionalGeneration`` file), as the text model ``Qwen3_5MoeForCausalLM``."""
    cfg = {
        "architectures": ["Qwen3_5MoeForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_output_gate": True,
        "dtype": "bfloat16",
        "eos_token_id": 248044,
        "full_attention_interval": 4,
        "head_dim": 256,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "layer_types": list(_QWEN35_LAYER_TYPES),
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
        "linear_value_head_dim": 128,
        "max_position_embeddings": 262144,
        "model_type": "qwen3_5_moe_text",
        "moe_intermediate_size": 512,
        "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False,
        "num_attention_heads": 16,
        "num_experts": 256,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 40,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "mrope_interleaved": True,
            "mrope_section": [11, 11, 10],
            "partial_rotary_factor": 0.25,
            "rope_theta": 10000000,
            "rope_type": "default",
        },
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 512,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": 248320,
    }
    cfg.update(changes)
    return cfg


PRESETS.update({
    "Qwen/Qwen3.5-35B-A3B": _qwen3_5_moe_text(),
    "Qwen/Qwen3.6-35B-A3B": _qwen3_5_moe_text(),
    "Qwen/Qwen3-Next-80B-A3B-Instruct": {
        "architectures": ["Qwen3NextForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "decoder_sparse_step": 1,
        "eos_token_id": 151645,
        "full_attention_interval": 4,
        "head_dim": 256,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 5120,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
        "linear_value_head_dim": 128,
        "max_position_embeddings": 262144,
        "mlp_only_layers": [],
        "model_type": "qwen3_next",
        "moe_intermediate_size": 512,
        "norm_topk_prob": True,
        "num_attention_heads": 16,
        "num_experts": 512,
        "num_experts_per_tok": 10,
        "num_hidden_layers": 48,
        "num_key_value_heads": 2,
        "output_router_logits": False,
        "partial_rotary_factor": 0.25,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000000,
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 512,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
})
ALIASES.update({
    "qwen3.5-35b-a3b": "Qwen/Qwen3.5-35B-A3B",
    "qwen3.6-35b-a3b": "Qwen/Qwen3.6-35B-A3B",
    "qwen3-next-80b-a3b": "Qwen/Qwen3-Next-80B-A3B-Instruct",
})
_HYBRID_SOURCES = (
    "layers, widths, heads, experts and the linear-attention heads (16 key / 32 value heads of 128) are the "
    "transformers class defaults whose docstring names this checkpoint and match the public Megatron configs "
    "of the model (THUDM/slime scripts/models: 40 layers, 16/2 heads of 256, 256 experts top-8, moe and "
    "shared width 512, rotary 0.25, rope base 1e7, vocab 248320); meta-device total equals transformers'"
)
PRESET_INFO.update({
    "Qwen/Qwen3.5-35B-A3B": {
        "alias": "qwen3.5-35b-a3b",
        "published_params": 35_000_000_000,  # "35B total, 3B activated" (model card), vision encoder and MTP included
        "published_tolerance": 0.015,
        "exact_params": 34_660_610_688,  # text model (Qwen3_5MoeForCausalLM), meta-device count, = transformers
        "doc_active_params": 3_000_000_000,  # model card "3B activated" (moelens: 3.45 B incl. embeddings, 2.44 B without)
        "notes": (
            f"the hub config.json is the multimodal Qwen3_5MoeForConditionalGeneration; this preset is its "
            f"text_config as the text model Qwen3_5MoeForCausalLM. {_HYBRID_SOURCES}. The published 35B counts "
            "the vision encoder and the MTP layer, which moelens skips (34.66 B text model); eos 248044, "
            "mtp_* and the M-RoPE fields as in public copies of the text_config"
        ),
    },
    "Qwen/Qwen3.6-35B-A3B": {
        "alias": "qwen3.6-35b-a3b",
        "published_params": 35_000_000_000,
        "published_tolerance": 0.015,
        "exact_params": 34_660_610_688,
        "doc_active_params": 3_000_000_000,  # model card "3B activated"
        "notes": (
            "same language/MoE topology as Qwen3.5-35B-A3B (THUDM/slime reuses the 3.5 script for 3.6; "
            f"third-party Qwen3.6 loaders use the same keys); text_config of the multimodal hub file. {_HYBRID_SOURCES}"
        ),
    },
    "Qwen/Qwen3-Next-80B-A3B-Instruct": {
        "alias": "qwen3-next-80b-a3b",
        "published_params": 80_000_000_000,  # "80B total, 3B activated" (model card)
        "exact_params": 79_674_391_296,  # meta-device count, = transformers
        "doc_active_params": 3_000_000_000,  # model card "3B activated" (moelens: 3.87 B incl. embeddings, 3.25 B without)
        "notes": (
            "48 layers (3 linear : 1 full), 512 experts top-10, moe/shared width 512, 16/2 heads of 256, rotary "
            "0.25, rope base 1e7, vocab 151936, norm_topk_prob true: class defaults (docstring checkpoint "
            "Qwen/Qwen3-Next-80B-A3B-Instruct) and the public Megatron config (THUDM/slime); intermediate_size "
            "5120 (no dense layers, so inert), bos/eos 151643/151645 as in the Qwen3 family. MTP weights skipped"
        ),
    },
})


# ------------------------------------------------ Granite MoE, MiniMax-M2, ERNIE-4.5-MoE (MOE_ARCHITECTURES_2026.md §7)
def _granite_3_1_moe(**changes: Any) -> dict[str, Any]:
    """ibm-granite/granite-3.1-1b-a400m-instruct's hub config.json (a public copy: leok7v/nano-lamma
    models/granite-3.1-1b-a400m-instruct/config.json, commit c16de35338caf09b95babaf32b082f44aaad1883),
    with ``changes`` for the 3B-A800M."""
    cfg = {
        "architectures": ["GraniteMoeForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attention_multiplier": 0.015625,
        "bos_token_id": 0,
        "embedding_multiplier": 12.0,
        "eos_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "initializer_range": 0.02,
        "intermediate_size": 512,
        "logits_scaling": 6.0,
        "max_position_embeddings": 131072,
        "model_type": "granitemoe",
        "num_attention_heads": 16,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 24,
        "num_key_value_heads": 8,
        "num_local_experts": 32,
        "output_router_logits": False,
        "pad_token_id": 0,
        "residual_multiplier": 0.22,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1500000.0,
        "router_aux_loss_coef": 0.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.47.0",
        "use_cache": True,
        "vocab_size": 49155,
    }
    cfg.update(changes)
    return cfg


def _ernie_4_5_moe(**changes: Any) -> dict[str, Any]:
    """baidu/ERNIE-4.5-21B-A3B-PT's config.json fields as quoted in public copies (Ascend MindIE's ERNIE-MoE
    tests, atb_llm ``FAKE_CONFIG_DICT``; an ``llm_memory_calculator`` fixture), with ``changes`` for the 300B."""
    cfg = {
        "architectures": ["Ernie4_5_MoeForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 2560,
        "intermediate_size": 12288,
        "max_position_embeddings": 131072,
        "model_type": "ernie4_5_moe",
        "moe_intermediate_size": 1536,
        "moe_k": 6,
        "moe_layer_end_index": 27,
        "moe_layer_interval": 1,
        "moe_layer_start_index": 1,
        "moe_num_experts": 64,
        "moe_num_shared_experts": 2,
        "num_attention_heads": 20,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "use_bias": False,
        "use_cache": False,
        "vocab_size": 103424,
    }
    cfg.update(changes)
    return cfg


PRESETS.update({
    "ibm-granite/granite-3.1-1b-a400m-instruct": _granite_3_1_moe(),
    "ibm-granite/granite-3.1-3b-a800m-instruct": _granite_3_1_moe(
        hidden_size=1536, num_attention_heads=24, num_hidden_layers=32, num_local_experts=40, rope_theta=10000000.0,
    ),
    "MiniMaxAI/MiniMax-M2": {
        "architectures": ["MiniMaxM2ForCausalLM"],
        "attn_type_list": [1] * 62,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 3072,
        "intermediate_size": 1536,
        "max_position_embeddings": 196608,
        "model_type": "minimax_m2",
        "mtp_transformer_layers": 1,
        "num_attention_heads": 48,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 62,
        "num_key_value_heads": 8,
        "num_local_experts": 256,
        "num_mtp_modules": 3,
        "qk_norm_type": "per_layer",
        "rms_norm_eps": 1e-06,
        "rope_theta": 5000000,
        "rotary_dim": 64,
        "scoring_func": "sigmoid",
        "shared_intermediate_size": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.1",
        "use_cache": True,
        "use_mtp": True,
        "use_qk_norm": True,
        "use_routing_bias": True,
        "vocab_size": 200064,
        "quantization_config": {"quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic",
                                "weight_block_size": [128, 128],
                                "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]},
    },
    "microsoft/Phi-3.5-MoE-instruct": {
        "architectures": ["PhimoeForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 32000,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "input_jitter_noise": 0.01,
        "intermediate_size": 6400,
        "lm_head_bias": True,
        "max_position_embeddings": 131072,
        "model_type": "phimoe",
        "num_attention_heads": 32,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 16,
        "original_max_position_embeddings": 4096,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "router_aux_loss_coef": 0.0,
        "router_jitter_noise": 0.01,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 32064,
    },
    "baidu/ERNIE-4.5-21B-A3B-PT": _ernie_4_5_moe(),
    "baidu/ERNIE-4.5-300B-A47B-PT": _ernie_4_5_moe(
        hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, num_hidden_layers=54,
        moe_num_shared_experts=0, moe_layer_start_index=3, moe_layer_end_index=53, moe_intermediate_size=3584, moe_k=8,
    ),
})
ALIASES.update({
    "granite-3.1-1b-a400m": "ibm-granite/granite-3.1-1b-a400m-instruct",
    "granite-3.1-3b-a800m": "ibm-granite/granite-3.1-3b-a800m-instruct",
    "minimax-m2": "MiniMaxAI/MiniMax-M2",
    "phi-3.5-moe": "microsoft/Phi-3.5-MoE-instruct",
    "ernie-4.5-21b-a3b": "baidu/ERNIE-4.5-21B-A3B-PT",
    "ernie-4.5-300b-a47b": "baidu/ERNIE-4.5-300B-A47B-PT",
})
PRESET_INFO.update({
    "ibm-granite/granite-3.1-1b-a400m-instruct": {
        "alias": "granite-3.1-1b-a400m",
        "published_params": 1_300_000_000,  # "1.3B parameters, 400M active" (IBM Granite 3.x MoE model cards)
        "published_tolerance": 0.03,
        "exact_params": 1_334_628_352,  # meta-device count, = transformers (tied embeddings)
        "doc_active_params": 400_000_000,  # model card "400M active" (moelens: 0.429 B incl. the tied embedding)
        "notes": (
            "the hub config.json field for field, from a public copy (leok7v/nano-lamma "
            "models/granite-3.1-1b-a400m-instruct/config.json, commit c16de35338caf09b95babaf32b082f44aaad1883): "
            "24 layers, 1024 wide, 16 q / 8 kv heads, 32 experts of 512, top-8, tied embeddings, multipliers "
            "embedding 12, attention 1/64, residual 0.22, logits 6; the Granite-3.1-1B-A400M-Base file has the same "
            "structure"
        ),
    },
    "ibm-granite/granite-3.1-3b-a800m-instruct": {
        "alias": "granite-3.1-3b-a800m",
        "published_params": 3_300_000_000,  # "3.3B parameters, 800M active" (IBM Granite 3.x MoE model cards)
        "exact_params": 3_298_793_472,  # meta-device count, = transformers (tied embeddings)
        "doc_active_params": 800_000_000,  # model card "800M active" (moelens: 0.883 B incl. the tied embedding)
        "notes": (
            f"{_STRUCTURAL}: 32 layers, 1536 wide, 24 q / 8 kv heads, 40 experts of 512, top-8, vocab 49155, tied, "
            "rope_theta 1e7, max_position 131072 as quoted in a public planner fixture of the hub file "
            "(GRANITE_31_3B_A800M); the four multipliers, token ids and rms_norm_eps are NOT confirmed by a public "
            "copy of this file: they are taken equal to the 1B-A400M's (same head_dim 64, so attention 1/64)"
        ),
    },
    "MiniMaxAI/MiniMax-M2": {
        "alias": "minimax-m2",
        "published_params": 229_000_000_000,  # "229B total, 10B active" (MOE_ARCHITECTURES_2026.md §9)
        "exact_params": 228_689_748_992,  # §9 (228.690 B), meta-device count
        "doc_active_params": 11_030_000_000,  # §9: 11.03 B incl. embeddings (published "10B")
        "notes": (
            f"{_STRUCTURAL} (62 layers, 3072 wide, 48 q / 8 kv heads of 128, 256 experts of 1536, vocab 200064); "
            "rotary_dim 64, rope_theta 5e6, top-8, sigmoid router with routing bias, per-layer QK norm, 3 MTP "
            "modules, FP8 block-128 quantization_config: the hub file as quoted in a public MiniMax-M2.5 quantisation "
            "guide (identical fields to M2) and in MOE_ARCHITECTURES_2026.md §7.2 (QuixiAI/MiniMax-M2.1-bf16, "
            "amd/MiniMax-M2.7-BF16); the file has no bos/eos ids (class defaults 200034 / 200020 apply)"
        ),
    },
    "microsoft/Phi-3.5-MoE-instruct": {
        "alias": "phi-3.5-moe",
        "published_params": 41_900_000_000,  # "41.9B total, 6.6B active" (model card)
        "exact_params": 41_873_153_344,  # meta-device count, = transformers (incl. LayerNorm, attention, lm_head biases)
        "doc_active_params": 6_600_000_000,  # model card "6.6B active" (moelens: 6.64 B incl. embeddings)
        "notes": (
            f"{_STRUCTURAL}: 32 layers, 4096 wide, 32 q / 8 kv heads, 16 experts of 6400, top-2, vocab 32064, "
            "q/k/v/o, LayerNorm and lm_head biases; router_jitter_noise 0.01 (the sparsemixer threshold), "
            "sliding_window 131072, eos 32000. NOT the hub file in two respects: the hub's architectures[0] is the "
            "remote-code name PhiMoEForCausalLM (moelens reads it as PhimoeForCausalLM, as here), and its "
            "LongRoPE rope_scaling (64 short and 64 long factors, short/long mscale 1.243, original 4096) is left "
            "out because no public copy of the full factor lists was found: the preset counts parameters and "
            "plans memory exactly, but computes with plain RoPE; load the checkpoint's own config.json to run it"
        ),
    },
    "baidu/ERNIE-4.5-21B-A3B-PT": {
        "alias": "ernie-4.5-21b-a3b",
        "published_params": 21_000_000_000,  # "21B total, 3B activated" (model card; the hub widget says 21.8B)
        "published_tolerance": 0.04,
        "exact_params": 21_825_437_888,  # meta-device count, = transformers (incl. the [1, 64] correction biases)
        "doc_active_params": 3_000_000_000,  # model card "3B activated" (moelens: 3.35 B incl. the tied embedding)
        "notes": (
            f"{_STRUCTURAL}: 28 layers (layer 0 dense, 1..27 sparse), 2560 wide, 20 q / 4 kv heads of 128, 64 experts "
            "of 1536 + 2 shared, top-6, dense width 12288, vocab 103424, tied embeddings, rope_theta 5e5, "
            "rms_norm_eps 1e-5: the fields quoted by public copies of the hub file (Ascend MindIE atb_llm ERNIE-MoE "
            "tests; llm_memory_calculator's ERNIE_45_21B_A3B fixture). Fields the hub file carries for Baidu's own "
            "stack (moe_capacity, moe_gate, moe_use_aux_free, use_rmsnorm, num_nextn_predict_layers, ...) are "
            "left out; moelens accepts them (ignored or required, see moelens.architectures.ernie4_5_moe)"
        ),
    },
    "baidu/ERNIE-4.5-300B-A47B-PT": {
        "alias": "ernie-4.5-300b-a47b",
        "published_params": 300_000_000_000,  # "300B total, 47B activated" (model card)
        "exact_params": 298_636_913_856,  # meta-device count, = transformers (tied embeddings)
        "doc_active_params": 47_000_000_000,  # model card "47B activated" (moelens: 47.08 B incl. the tied embedding)
        "notes": (
            f"{_STRUCTURAL}: 54 layers (0..2 dense, 3..53 sparse), 8192 wide, 64 q / 8 kv heads of 128, 64 experts of "
            "3584, no shared expert, top-8, dense width 28672, vocab 103424: the 300B config as quoted in Ascend "
            "MindIE's ERNIE-MoE router tests (moe_gate topk_fused, tie_word_embeddings true). A FastDeploy test "
            "fixture of a 300B-shaped config says tie_word_embeddings false (299.48 B); both are within 0.5 % of "
            "the published 300B, so the count does not settle it"
        ),
    },
})


# ---------------------------------------------------------------- Llama 4, FlexOlmo (MOE_ARCHITECTURES_2026.md §7.1)
def _llama4_text(**changes: Any) -> dict[str, Any]:
    """The ``text_config`` of a Llama 4 hub config.json (a multimodal ``Llama4ForConditionalGeneration``
    file), as the text model ``Llama4ForCausalLM``. Scout and Maverick share every field below but the
    expert count, the MoE interleave, the QK-norm, RoPE scaling and context length."""
    cfg = {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "attention_bias": False,
        "attention_chunk_size": 8192,
        "attention_dropout": 0.0,
        "attn_scale": 0.1,
        "attn_temperature_tuning": True,  # the hub files write 4 (truthy); transformers 5's strict config wants a bool
        "bos_token_id": 200000,
        "eos_token_id": [200001, 200007, 200008],
        "floor_scale": 8192,
        "for_llm_compressor": False,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 5120,
        "initializer_range": 0.02,
        "interleave_moe_layer_step": 1,
        "intermediate_size": 8192,
        "intermediate_size_mlp": 16384,
        "max_position_embeddings": 10485760,
        "num_attention_heads": 40,
        "num_experts_per_tok": 1,
        "num_hidden_layers": 48,
        "num_key_value_heads": 8,
        "num_local_experts": 16,
        "output_router_logits": False,
        "pad_token_id": 200018,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_qk_norm": True,
        "vocab_size": 202048,
    }
    cfg.update(changes)
    return cfg


PRESETS.update({
    "meta-llama/Llama-4-Scout-17B-16E": _llama4_text(),
    "meta-llama/Llama-4-Maverick-17B-128E": _llama4_text(
        num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None,
        max_position_embeddings=1048576,
    ),
    "allenai/FlexOlmo-7x7B-1T": {
        "architectures": ["FlexOlmoForCausalLM"],
        "model_type": "flex_olmo",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "eos_token_id": 100257,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 11008,
        "max_position_embeddings": 4096,
        "norm_topk_prob": False,
        "num_attention_heads": 32,
        "num_experts": 7,
        "num_experts_per_tok": 5,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "pad_token_id": 100277,
        "rms_norm_eps": 1e-06,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": 100352,
    },
})
ALIASES.update({
    "llama-4-scout": "meta-llama/Llama-4-Scout-17B-16E",
    "llama-4-maverick": "meta-llama/Llama-4-Maverick-17B-128E",
    "flexolmo-7x7b": "allenai/FlexOlmo-7x7B-1T",
})
PRESET_INFO.update({
    "meta-llama/Llama-4-Scout-17B-16E": {
        "alias": "llama-4-scout",
        "published_params": 109_000_000_000,  # "109B total, 17B active" (model card), vision encoder included
        "published_tolerance": 0.015,
        "exact_params": 107_769_861_120,  # text model (Llama4ForCausalLM), meta-device count, = transformers
        "doc_active_params": 17_000_000_000,  # model card "17B active" (moelens: 17.17 B incl. embeddings)
        "notes": (
            "the hub config.json is the multimodal Llama4ForConditionalGeneration; this preset is its text_config "
            "as the text model Llama4ForCausalLM. 48 layers, 5120 wide, 40/8 heads of 128, 16 experts top-1 in "
            "every layer (interleave 1), expert 8192 / dense 16384 wide, vocab 202048: the transformers class "
            "defaults whose docstring names this checkpoint, confirmed by the meta-device count (the published "
            "109B includes the vision tower). max_position 10485760, rope_theta 5e5 with llama3 scaling (factor 16, "
            "low/high 1/1, original 8192), use_qk_norm true, bos/eos/pad 200000/[200001, 200007, 200008]/200018 as "
            "quoted in public copies of the text_config (a vLLM issue report quoted in a public repository, "
            "aws-neuron neuronx-distributed-inference's Scout mock config, a Rust loader's Scout rope fixture); "
            "attn_temperature_tuning is 4 in the hub file (truthy), written True here"
        ),
    },
    "meta-llama/Llama-4-Maverick-17B-128E": {
        "alias": "llama-4-maverick",
        "published_params": 400_000_000_000,  # "400B total, 17B active" (model card)
        "exact_params": 400_711_848_960,  # text model, meta-device count, = transformers
        "doc_active_params": 17_000_000_000,  # model card "17B active" (moelens: 17.18 B incl. embeddings)
        "notes": (
            "text_config of the multimodal hub file, as Llama4ForCausalLM: 128 experts top-1 on every other layer "
            "(interleave_moe_layer_step 2: layers 1, 3, ...), use_qk_norm false, rope_scaling null, max_position "
            "1048576, otherwise as Scout. Source: NVIDIA TensorRT-LLM's Llama 4 modeling test "
            "(LLAMA_4_MAVERICK_TWO_LAYER_CONFIG, the Maverick file with num_hidden_layers 48 -> 2 and an added "
            "no_rope_layer_interval, both marked there); 48 layers per that comment, confirmed by the count"
        ),
    },
    "allenai/FlexOlmo-7x7B-1T": {
        "alias": "flexolmo-7x7b",
        "published_params": 33_270_665_216,  # no published total found: the meta-device count (see notes)
        "exact_params": 33_270_665_216,  # meta-device count, = transformers
        "doc_active_params": 24_613_621_760,  # top-5 of 7 (moelens' count incl. embeddings; no published figure)
        "notes": (
            "transformers' FlexOlmoConfig class defaults (its docstring names allenai/FlexOlmo-7x7B-1T): OLMo-2 7B "
            "blocks (32 layers, 4096 wide, 32 heads, vocab 100352, rope_theta 5e5, eps 1e-6) with 7 experts of "
            "11008, top-5, no renormalisation. No public copy of the hub config.json was found, so top-k, eps and "
            "token ids are unconfirmed and published_params is the count itself (7 x OLMo-2-7B FFNs + one shared "
            "attention stack: 33.27 B)"
        ),
    },
})

# ---------------------------------------------------------------- Gemma 4 (MOE_ARCHITECTURES_2026.md §6)
PRESETS["google/gemma-4-26B-A4B"] = {
    "architectures": ["Gemma4ForCausalLM"],
    "model_type": "gemma4_text",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attention_k_eq_v": True,
    "bos_token_id": 2,
    "dtype": "bfloat16",
    "enable_moe_block": True,
    "eos_token_id": 1,
    "final_logit_softcapping": 30.0,
    "global_head_dim": 512,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2816,
    "hidden_size_per_layer_input": 0,
    "initializer_range": 0.02,
    "intermediate_size": 2112,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 5,
    "max_position_embeddings": 262144,
    "moe_intermediate_size": 704,
    "num_attention_heads": 16,
    "num_experts": 128,
    "num_global_key_value_heads": 2,
    "num_hidden_layers": 30,
    "num_key_value_heads": 8,
    "num_kv_shared_layers": 0,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-06,
    "rope_parameters": {
        "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
    },
    "sliding_window": 1024,
    "tie_word_embeddings": True,
    "top_k_experts": 8,
    "use_bidirectional_attention": "vision",
    "vocab_size": 262144,
}
ALIASES["gemma-4-26b-a4b"] = "google/gemma-4-26B-A4B"
PRESET_INFO["google/gemma-4-26B-A4B"] = {
    "alias": "gemma-4-26b-a4b",
    "published_params": 26_000_000_000,  # the name's "26B" (vision tower included)
    "published_tolerance": 0.035,
    "exact_params": 25_233_141_760,  # text model (Gemma4ForCausalLM), meta-device count, = transformers
    "doc_active_params": 4_000_000_000,  # the name's "A4B" (moelens: 3.82 B incl. the tied embedding)
    "notes": (
        "the hub config.json is the multimodal Gemma4ForConditionalGeneration; this preset is its text_config as "
        "Gemma4ForCausalLM. Shapes (30 layers, 2816 wide, 16 heads, 8 kv heads of 256 on sliding layers, 2 kv "
        "heads of 512 with K = V on the 5 full-attention layers, dense MLP 2112, 128 experts of 704 top-8, vocab "
        "262144, window 1024, soft-cap 30, proportional RoPE 0.25 / θ 1e6, sliding θ 1e4, max_position 262144, "
        "tokens bos 2 / eos 1 / pad 0): the text_config of a public copy of the DiffusionGemma-26B-A4B config "
        "(built on this model: a Rust MLX port's REAL_CONFIG_SNIPPET test fixture), agreeing with a public "
        "Python port's GEMMA4_26B_A4B table (mlp_dim 2112, 2 global kv heads) and the Ollama GGUF metadata "
        "quoted in MOE_ARCHITECTURES_2026.md §6 (dense FF 2112, window 1024); one Rust loader test gives "
        "intermediate 9216 / 4 global kv heads instead. attention_k_eq_v and enable_moe_block are written "
        "explicitly (that copy omits them; the weights require both). Not confirmed by a published exact count"
    ),
}

# ---------------------------------------------------------------- DeepSeek Sparse Attention: DeepSeek-V3.2, GLM-5
_V32_EXP = {
    **{k: v for k, v in PRESETS["deepseek-ai/DeepSeek-V3"].items() if k != "quantization_config"},
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "index_head_dim": 128,
    "index_n_heads": 64,
    "index_topk": 2048,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
}
_V32_EXP.pop("transformers_version")
PRESETS.update({
    "deepseek-ai/DeepSeek-V3.2-Exp": _V32_EXP,
    "zai-org/GLM-5": {
        "architectures": ["GlmMoeDsaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": [154820, 154827, 154829],
        "first_k_dense_replace": 3,
        "hidden_act": "silu",
        "hidden_size": 6144,
        "index_head_dim": 128,
        "index_n_heads": 32,
        "index_topk": 2048,
        "intermediate_size": 12288,
        "kv_lora_rank": 512,
        "max_position_embeddings": 202752,
        "model_type": "glm_moe_dsa",
        "moe_intermediate_size": 2048,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 64,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 78,
        "num_key_value_heads": 64,
        "num_nextn_predict_layers": 1,
        "q_lora_rank": 2048,
        "qk_nope_head_dim": 192,
        "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"},
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "v_head_dim": 256,
        "vocab_size": 154880,
    },
})
ALIASES.update({"deepseek-v3.2-exp": "deepseek-ai/DeepSeek-V3.2-Exp", "glm-5": "zai-org/GLM-5"})
PRESETS["deepseek-ai/DeepSeek-V4-Flash"] = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "bos_token_id": 0,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0, 0, 0],  # 46 entries for 43 layers: the tail is MTP's
    "compress_rope_theta": 160000,
    "eos_token_id": 1,
    "hc_eps": 1e-06,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "head_dim": 512,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "index_head_dim": 128,
    "index_n_heads": 64,
    "index_topk": 512,
    "max_position_embeddings": 1048576,
    "model_type": "deepseek_v4",
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 64,
    "num_experts_per_tok": 6,
    "num_hash_layers": 3,
    "num_hidden_layers": 43,
    "num_key_value_heads": 1,
    "num_nextn_predict_layers": 1,
    "o_groups": 8,
    "o_lora_rank": 1024,
    "q_lora_rank": 1024,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 65536,
                     "type": "yarn"},
    "rope_theta": 10000,
    "routed_scaling_factor": 1.5,
    "scoring_func": "sqrtsoftplus",
    "sliding_window": 128,
    "swiglu_limit": 10.0,
    "tie_word_embeddings": False,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "vocab_size": 129280,
}
ALIASES["deepseek-v4-flash"] = "deepseek-ai/DeepSeek-V4-Flash"
PRESET_INFO.update({
    "deepseek-ai/DeepSeek-V3.2-Exp": {
        "alias": "deepseek-v3.2-exp",
        "published_params": 671_000_000_000,  # "671B" (DeepSeek's V3.2-Exp release; the hub widget's 685B adds the MTP layer)
        "exact_params": 671_877_929_216,  # meta-device count, = transformers (V3's 671.03 B + 61 indexers of 13.96 M)
        "doc_active_params": 37_000_000_000,  # "37B activated" as V3 (moelens: 38.40 B incl. embeddings, 36.55 B without)
        "notes": (
            "DeepSeek-V3's hub config.json (this module's deepseek-ai/DeepSeek-V3 preset) with architectures "
            "DeepseekV32ForCausalLM, model_type deepseek_v32, the DSA indexer fields index_n_heads 64, "
            "index_head_dim 128, index_topk 2048 (the transformers 5.25 DeepseekV32Config defaults, whose docstring "
            "names this checkpoint, and DeepSeek's inference config_671B_v3.2.json) and the UE8M0 FP8 scales "
            "(scale_fmt ue8m0). The total equals transformers' DeepseekV32ForCausalLM of this config; V3.2 (final) "
            "shares the shapes"
        ),
    },
    "deepseek-ai/DeepSeek-V4-Flash": {
        "alias": "deepseek-v4-flash",
        "published_params": 284_000_000_000,  # "284B total, 13B activated" (DeepSeek-V4-Flash release)
        "exact_params": 284_332_230_231,  # meta-device count, = transformers (MTP module skipped)
        "doc_active_params": 13_000_000_000,  # "13B activated" (moelens: 13.80 B incl. embeddings, 12.74 B without)
        "notes": (
            "43 layers (2 sliding-window only, then CSA rate 4 / HCA rate 128 alternating, compress_ratios as "
            "published, 46 entries of which the last 3 are the MTP module's), hidden 4096, 64 heads of 512 with one "
            "shared key/value head, q_lora 1024, grouped output 8 x 1024, 4 hyper-connection streams (20 Sinkhorn "
            "iterations), 256 experts + 1 shared of 2048, top-6, sqrtsoftplus router, 3 hash-routed layers, "
            "swiglu_limit 10, indexer 64 x 128 keeping 512 entries, window 128, rope_theta 1e4 / compress 1.6e5 with "
            "YaRN (factor 16, original 65536): the published config.json as quoted verbatim (a subset of its fields) "
            "in a public MLX port's config test (read from deepseek-ai/DeepSeek-V4-Flash-0731/config.json), which "
            "also equal the transformers 5.25 DeepseekV4Config defaults (docstring checkpoint "
            "deepseek-ai/DeepSeek-V4-Flash-Base) except the layer schedule. bos/eos 0/1 and hidden_act are the "
            "class defaults. The checkpoint's FP8/FP4 quantization_config is left out: moelens reads FP8 blocks "
            "and MXFP4, not V4's FP4 expert format"
        ),
    },
    "zai-org/GLM-5": {
        "alias": "glm-5",
        "published_params": 744_000_000_000,  # "744B total, 40B active" (GLM-5 release; slime's run_glm5_744b_a40b)
        "exact_params": 743_911_199_232,  # meta-device count, = transformers
        "doc_active_params": 40_000_000_000,  # "40B active" (moelens: 41.78 B incl. embeddings, 39.88 B without)
        "notes": (
            "78 layers (3 dense), hidden 6144, MLA q_lora 2048 / kv_lora 512 / nope 192 / rope 64 / v 256, 64 heads, "
            "256 experts + 1 shared of 2048, top-8, n_group 1, routed_scaling_factor 2.5, indexer 32 heads of 128 "
            "keeping 2048 keys, rope_theta 1e6 (no YaRN), rms_norm_eps 1e-5, vocab 154880, max_position 202752, "
            "eos [154820, 154827, 154829]: the transformers 5.25 GlmMoeDsaConfig defaults (docstring checkpoint "
            "zai-org/GLM-5) and the field-by-field defaults that jd-opensource/xllm xllm/models/llm/glm5.h quotes "
            "from the hub config.json (commit a5ffadf5dc65959fce0646d4383d5078c9a8840e). No indexer_types: every "
            "layer runs its own indexer (transformers' default pattern)"
        ),
    },
})


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

