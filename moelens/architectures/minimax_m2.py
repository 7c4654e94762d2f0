"""MiniMax-M2 / M2.1 / M2.5 (``MiniMaxM2ForCausalLM``, e.g. MiniMaxAI/MiniMax-M2), as transformers 5.25
computes it.

* Router ``block_sparse_moe.gate`` (hub) / ``mlp.gate`` (transformers 5): logits in the model dtype,
  ``s = sigmoid(fp32 logits)`` (``hook_router_scores``), selection on ``s + e_score_correction_bias``
  (``hook_router_selection_scores``; the bias, a buffer in transformers, follows the model dtype), top-k
  **unsorted**, no groups; weights ``s[idx] / sum`` (always renormalised, no epsilon, no scale), fp32.
* Experts: Mixtral-style ``w1`` (gate) / ``w3`` (up) / ``w2`` (down); every layer sparse; no shared expert.
* Attention: GQA with **full-width** QK RMSNorm (one weight over all heads' q, another over all kv
  heads' k, before the head split: ``qk_norm="full"``), partial RoPE on the first ``rotary_dim`` dims
  of each head (half-split), the rest passed through.
* FP8 block checkpoints (``quantization_config.quant_method == "fp8"``) are dequantised while loading
  (:mod:`moelens.quant.fp8`); the multi-token-prediction modules are not part of transformers' model.
"""

from moelens.architectures.base import (
    COMMON_RULES, FUSED_EXPERT_RULES, GQA_RULES, Architecture, KeyRule, UnsupportedConfigError, expert_rules,
    rope_settings,
)
from moelens.architectures.glm4_moe import partial_rotary

NAME = "MiniMaxM2ForCausalLM"

# class defaults of transformers 5.25 MiniMaxM2Config (checked in the tests)
DEFAULTS = {
    "vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 1536, "num_hidden_layers": 62,
    "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "num_experts_per_tok": 8, "num_local_experts": 256, "rope_parameters": None,
    "rope_theta": None, "rope_scaling": None, "rotary_dim": None, "partial_rotary_factor": None,
    "bos_token_id": 200034, "eos_token_id": 200020, "pad_token_id": None, "attn_type_list": None,
}

# fields of the hub config.json that transformers does not read; each must say what transformers computes
REQUIRED = {
    "hidden_act": ("silu",),
    "scoring_func": ("sigmoid",),  # transformers hard-codes the sigmoid router
    "use_routing_bias": (True,),  # ... with the correction bias
    "use_qk_norm": (True,),  # ... and full-width QK norm
    "qk_norm_type": ("per_layer",),
    "shared_intermediate_size": (0,),  # no shared expert in transformers' MiniMax-M2
    "attention_bias": (False,),
}

IGNORED = frozenset({
    "use_mtp", "num_mtp_modules", "mtp_transformer_layers",  # multi-token prediction modules (not in the model)
    "quantization_config",  # read by the loader (moelens.quant), not by the forward
    "router_jitter_noise",  # training only
    "attention_dropout", "max_position_embeddings", "router_aux_loss_coef", "output_router_logits",
})


def translate(hf: dict) -> dict:
    n, d, h = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    d_head = hf["head_dim"] or d // h
    types = hf["attn_type_list"]
    if types is not None and any(t != 1 for t in types):
        # 1 = softmax attention; MiniMax-01's 0 (lightning attention) is not what transformers' M2 computes
        raise UnsupportedConfigError(
            f"{NAME}: attn_type_list has entries other than 1 (softmax attention): {sorted(set(types))}; "
            f"transformers' MiniMax-M2 implements softmax attention in every layer"
        )
    default_factor = hf["rotary_dim"] / d_head if hf["rotary_dim"] else 1.0
    hf, factor = partial_rotary(hf, d_head, default_factor, NAME)
    rope = rope_settings(hf, NAME)
    rotary_dim = int(d_head * factor)
    return dict(
        n_layers=n, d_model=d, d_vocab=hf["vocab_size"], n_heads=h, n_kv_heads=hf["num_key_value_heads"] or h,
        d_head=d_head, n_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
        d_expert=hf["intermediate_size"], moe_layers=tuple(range(n)), rms_norm_eps=hf["rms_norm_eps"],
        rope_theta=rope["rope_theta"] or 1e4, rotary_dim=None if rotary_dim == d_head else rotary_dim,
        qk_norm="full", router_dtype="model", router_score_func="sigmoid", router_correction_bias=True,
        topk_method="greedy", topk_sorted=False, norm_topk_prob=True, router_weights_dtype="float32",
    )


BIAS_RULES = (
    KeyRule("model.layers.{L}.block_sparse_moe.e_score_correction_bias", "blocks.{L}.mlp.router.b_correction"),
    KeyRule("model.layers.{L}.mlp.e_score_correction_bias", "blocks.{L}.mlp.router.b_correction"),
)

ARCH = Architecture(
    name=NAME,
    model_type="minimax_m2",
    translate=translate,
    defaults=DEFAULTS,
    required=REQUIRED,
    ignored=IGNORED,
    key_rules=COMMON_RULES + GQA_RULES + expert_rules("block_sparse_moe", "w1", "w3", "w2", "gate")
    + FUSED_EXPERT_RULES + BIAS_RULES,
    hf_config_class="MiniMaxM2Config",
    hf_model_class=NAME,
)
