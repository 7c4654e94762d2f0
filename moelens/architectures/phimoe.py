"""PhiMoE (``PhimoeForCausalLM``: microsoft/Phi-3.5-MoE-instruct), as transformers 5.25 computes it in
eval mode.

* Router ``block_sparse_moe.gate`` (hub) / ``mlp.router`` (transformers 5): model-dtype logits, top-2 of
  the logits (sorted); each slot's weight is PhiMoE's "sparsemixer" rule (``router_order="sparsemixer"``,
  :func:`moelens.components.router.sparsemixer_weights`): a softmax over the logits within relative
  distance ``2 * router_jitter_noise`` of the chosen logit, earlier slots' experts excluded, in the model
  dtype, not renormalised. (``router_jitter_noise`` is this threshold at inference, not noise.)
  ``hook_router_scores`` is the fp32 softmax over all experts, for the hook.
* LayerNorm with weight **and bias** (eps ``rms_norm_eps``) before attention, MoE and the unembedding
  (``norm_type="layer"``); attention q/k/v/o biases (``attention_bias``); ``lm_head`` bias
  (``lm_head_bias``, ``unembed.b_u``).
* Experts: Mixtral-style ``w1`` (gate) / ``w3`` (up) / ``w2`` (down); every layer sparse.
* RoPE: default, or LongRoPE (Phi-3.5-MoE): ``inv_freq / short_factor`` (transformers always uses the
  short factors) and cos/sin scaled by ``short_mscale``, or ``long_mscale`` in a forward whose largest
  position exceeds ``original_max_position_embeddings``.
* ``sliding_window``: every layer attends to the last ``sliding_window`` keys (131072 on the real model).
"""

from moelens.architectures.base import (
    COMMON_RULES, GQA_RULES, Architecture, KeyRule, UnsupportedConfigError, expert_rules, rope_settings,
)

NAME = "PhimoeForCausalLM"

# class defaults of transformers 5.25 PhimoeConfig (checked in the tests)
DEFAULTS = {
    "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 6400, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "rope_parameters": None, "rope_theta": None, "rope_scaling": None, "sliding_window": None,
    "num_experts_per_tok": 2, "num_local_experts": 16, "router_jitter_noise": 0.01, "attention_bias": False,
    "lm_head_bias": False, "original_max_position_embeddings": None, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": None,
}

REQUIRED = {"hidden_act": ("silu",)}
IGNORED = frozenset({
    "input_jitter_noise",  # training only
    "attention_dropout", "max_position_embeddings", "router_aux_loss_coef", "output_router_logits",
})


def translate(hf: dict) -> dict:
    rope = rope_settings(hf, NAME, allow_longrope=True)
    n, d, h = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    if hf["num_experts_per_tok"] != 2:
        raise UnsupportedConfigError(
            f"{NAME}: num_experts_per_tok={hf['num_experts_per_tok']}; transformers' sparsemixer routes exactly 2 "
            f"experts per token whatever the config says"
        )
    bias = bool(hf["attention_bias"])
    window = hf["sliding_window"]
    return dict(
        n_layers=n, d_model=d, d_vocab=hf["vocab_size"], n_heads=h, n_kv_heads=hf["num_key_value_heads"] or h,
        d_head=d // h, n_experts=hf["num_local_experts"], top_k=2, d_expert=hf["intermediate_size"],
        moe_layers=tuple(range(n)), rms_norm_eps=hf["rms_norm_eps"], norm_type="layer",
        rope_theta=rope["rope_theta"] or 1e4, rope_scaling=rope["rope_scaling"],
        qkv_bias=bias, attn_o_bias=bias, unembed_bias=bool(hf["lm_head_bias"]),
        sliding_window=window, layer_types=("sliding_attention",) * n if window else None,
        router_order="sparsemixer", router_jitter_eps=float(hf["router_jitter_noise"]), router_dtype="model",
    )


NORM_RULES = (
    KeyRule("model.norm.bias", "ln_final.b"),
    KeyRule("model.layers.{L}.input_layernorm.bias", "blocks.{L}.ln1.b"),
    KeyRule("model.layers.{L}.post_attention_layernorm.bias", "blocks.{L}.ln2.b"),
    KeyRule("lm_head.bias", "unembed.b_u"),
    KeyRule("model.layers.{L}.self_attn.o_proj.bias", "blocks.{L}.attn.b_o"),
)

FUSED_RULES = (  # transformers 5's in-memory layout (the router is renamed mlp.router)
    KeyRule("model.layers.{L}.mlp.router.weight", "blocks.{L}.mlp.router.W_router"),
    KeyRule("model.layers.{L}.mlp.experts.gate_up_proj",
            ("blocks.{L}.mlp.experts.w_gate", "blocks.{L}.mlp.experts.w_up"), "split"),
    KeyRule("model.layers.{L}.mlp.experts.down_proj", "blocks.{L}.mlp.experts.w_down"),
)

ARCH = Architecture(
    name=NAME,
    model_type="phimoe",
    translate=translate,
    defaults=DEFAULTS,
    required=REQUIRED,
    ignored=IGNORED,
    key_rules=COMMON_RULES + GQA_RULES + NORM_RULES + expert_rules("block_sparse_moe", "w1", "w3", "w2", "gate")
    + FUSED_RULES,
    hf_config_class="PhimoeConfig",
    hf_model_class=NAME,
)
