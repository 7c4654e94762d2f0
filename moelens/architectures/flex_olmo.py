"""FlexOlmo (``FlexOlmoForCausalLM``, e.g. allenai/FlexOlmo-7x7B-1T), as transformers 5.25 computes it.

OLMo-2 blocks: **post-norm only** (``h += RMSNorm(Attn(h)); h += RMSNorm(MoE(h))``, no pre-norms:
``attn_post_norm``/``mlp_post_norm``), RMSNorms that multiply the weight in fp32 before the cast
(``norm_weight_fp32``), QK-norm over the whole q and k projections (before the head split), RoPE on
all head dims in fp32 (``rope_fp32``: transformers keeps FlexOlmo's cos/sin fp32 and casts after the
rotation). Every layer is a MoE of separately trained experts: fp32 softmax router, top-k,
``norm_topk_prob`` (False in the released checkpoints), weights cast to the model dtype.
"""

from moelens.architectures.base import (
    FUSED_EXPERT_RULES, GQA_RULES, Architecture, KeyRule, expert_rules, rope_settings,
)

NAME = "FlexOlmoForCausalLM"

# class defaults of transformers 5.25 FlexOlmoConfig
DEFAULTS = {
    "vocab_size": 100352, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "rms_norm_eps": 1e-6, "pad_token_id": 100277,
    "bos_token_id": None, "eos_token_id": 100257, "tie_word_embeddings": False, "rope_parameters": None,
    "rope_theta": None, "rope_scaling": None, "num_experts_per_tok": 5, "num_experts": 7,
    "norm_topk_prob": False,
}
DEFAULT_THETA = 500000.0


def translate(hf: dict) -> dict:
    rope = rope_settings(hf, NAME)
    n, d, h = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    return dict(
        n_layers=n, d_model=d, d_vocab=hf["vocab_size"], n_heads=h, n_kv_heads=hf["num_key_value_heads"] or h,
        d_head=d // h, n_experts=hf["num_experts"], top_k=hf["num_experts_per_tok"], d_expert=hf["intermediate_size"],
        moe_layers=tuple(range(n)), rms_norm_eps=hf["rms_norm_eps"], rope_theta=rope["rope_theta"] or DEFAULT_THETA,
        qk_norm="full", rope_fp32=True,
        norm_topk_prob=bool(hf["norm_topk_prob"]), router_weights_dtype="model", norm_weight_fp32=True,
        attn_pre_norm=False, attn_post_norm=True, mlp_pre_norm=False, mlp_post_norm=True,
    )


RULES = (
    KeyRule("model.embed_tokens.weight", "embed.W_E"),
    KeyRule("model.norm.weight", "ln_final.w"),
    KeyRule("lm_head.weight", "unembed.w_u"),
    KeyRule("model.layers.{L}.post_attention_layernorm.weight", "blocks.{L}.ln1_post.w"),
    KeyRule("model.layers.{L}.post_feedforward_layernorm.weight", "blocks.{L}.ln2_post.w"),
)

ARCH = Architecture(
    name=NAME,
    model_type="flex_olmo",
    translate=translate,
    defaults=DEFAULTS,
    # attention biases would sit inside the post-norm (not in the residual stream): not supported
    required={"hidden_act": ("silu",), "attention_bias": (False, None)},
    aliases={"num_local_experts": "num_experts"},
    key_rules=RULES + GQA_RULES + expert_rules("mlp", "gate_proj", "up_proj", "down_proj", "gate") + FUSED_EXPERT_RULES,
    hf_config_class="FlexOlmoConfig",
    hf_model_class=NAME,
)
