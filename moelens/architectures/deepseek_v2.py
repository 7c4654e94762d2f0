"""DeepSeek-V2 (``DeepseekV2ForCausalLM``, e.g. deepseek-ai/DeepSeek-V2-Lite), as transformers 5 computes it.

* Multi-head latent attention (:mod:`moelens.components.mla`), interleaved RoPE on the
  ``qk_rope_head_dim`` parts in transformers' complex arithmetic (``rope_arith="complex"``: polar
  cos/sin, fp32 complex multiply), YaRN, softmax scale times ``mscale(factor, mscale_all_dim)**2``.
* Layers ``< first_k_dense_replace`` are dense SwiGLU (``intermediate_size``); ``moe_layer_freq`` is
  ignored, as in transformers.
* Router: weight kept fp32 in a bf16 model (transformers' ``_keep_in_fp32_modules_strict``),
  fp32 logits, softmax, ``greedy`` or ``group_limited_greedy`` (group max, 0-masking), ``topk(sorted=False)``, weights ``* routed_scaling_factor`` in fp32, **never** renormalised
  (transformers ignores ``norm_topk_prob`` for V2).
* Shared experts: one ungated SwiGLU of width ``n_shared_experts * moe_intermediate_size``.
"""

from moelens.architectures.base import (
    COMMON_RULES, DENSE_MLP_RULES, FUSED_EXPERT_RULES, Architecture, KeyRule, UnsupportedConfigError,
    expert_rules, rope_settings, shared_expert_rules,
)

NAME = "DeepseekV2ForCausalLM"

# class defaults of transformers 5.23 DeepseekV2Config (checked by instantiating it)
DEFAULTS = {
    "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
    "rope_parameters": None, "rope_theta": None, "rope_scaling": None,
    "first_k_dense_replace": 0, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64, "num_experts_per_tok": None,
    "n_shared_experts": 2, "moe_intermediate_size": 1407, "routed_scaling_factor": 1.0,
    "topk_method": "greedy", "n_group": None, "topk_group": None,
}

REQUIRED = {
    "hidden_act": ("silu",),
    "attention_bias": (False, None),
    "mlp_bias": (False, None),
    "pretraining_tp": (1, None),
    "topk_method": ("greedy", "group_limited_greedy"),
    # not read by transformers' V2 (softmax is hard-coded); anything else would be a different model
    "scoring_func": ("softmax",),
    "ep_size": (1, None),
}

IGNORED = frozenset({
    "moe_layer_freq",  # ignored by transformers V2: every layer >= first_k_dense_replace is sparse
    "norm_topk_prob",  # ignored by transformers V2: the top-k weights are never renormalised
    "head_dim",  # overwritten with qk_rope_head_dim by DeepseekV2Config.__post_init__
    "qk_head_dim",  # derived: qk_nope_head_dim + qk_rope_head_dim
    "attention_dropout", "aux_loss_alpha", "seq_aux", "max_position_embeddings",
})


def translate(hf: dict) -> dict:
    rope = rope_settings(hf, NAME, allow_yarn=True)
    n, h = hf["num_hidden_layers"], hf["num_attention_heads"]
    if hf["num_key_value_heads"] not in (None, h):
        raise UnsupportedConfigError(
            f"{NAME}: num_key_value_heads={hf['num_key_value_heads']} != num_attention_heads={h}; "
            f"multi-head latent attention gives every head its own key (transformers would fail too)"
        )
    if hf["num_experts_per_tok"] is None:
        raise UnsupportedConfigError(f"{NAME}: num_experts_per_tok is missing (no class default)")
    method = hf["topk_method"]
    n_group, topk_group = hf["n_group"], hf["topk_group"]
    if method == "group_limited_greedy":
        if not n_group or not topk_group:
            raise UnsupportedConfigError(
                f"{NAME}: topk_method='group_limited_greedy' needs n_group and topk_group (got {n_group}, {topk_group})"
            )
        if hf["n_routed_experts"] % n_group or topk_group > n_group:
            raise UnsupportedConfigError(
                f"{NAME}: n_group={n_group}/topk_group={topk_group} do not fit "
                f"n_routed_experts={hf['n_routed_experts']}"
            )
    dn, dr = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"]
    first_dense = hf["first_k_dense_replace"] or 0
    return dict(
        n_layers=n, d_model=hf["hidden_size"], d_vocab=hf["vocab_size"], n_heads=h, n_kv_heads=h,
        d_head=dn + dr, n_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"],
        d_expert=hf["moe_intermediate_size"], d_mlp=hf["intermediate_size"],
        moe_layers=tuple(range(first_dense, n)), rms_norm_eps=hf["rms_norm_eps"],
        attention="mla", q_lora_rank=hf["q_lora_rank"] or None, kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=hf["v_head_dim"],
        rope_theta=rope["rope_theta"] or 1e4, rope_interleaved=True, rope_arith="complex",
        rope_scaling=rope["rope_scaling"],
        router_dtype="float32", router_weights_dtype="float32", norm_topk_prob=False,
        routed_scaling_factor=float(hf["routed_scaling_factor"]), topk_method=method, topk_sorted=False,
        n_group=n_group or 1, topk_group=topk_group or 1, router_fp32_params=True,
        d_shared=(hf["n_shared_experts"] or 0) * hf["moe_intermediate_size"], shared_gate=False,
    )


MLA_RULES = (
    KeyRule("model.layers.{L}.self_attn.q_proj.weight", "blocks.{L}.attn.w_q"),
    KeyRule("model.layers.{L}.self_attn.q_a_proj.weight", "blocks.{L}.attn.W_q_a"),
    KeyRule("model.layers.{L}.self_attn.q_a_layernorm.weight", "blocks.{L}.attn.q_a_norm_w"),
    KeyRule("model.layers.{L}.self_attn.q_b_proj.weight", "blocks.{L}.attn.W_q_b"),
    KeyRule("model.layers.{L}.self_attn.kv_a_proj_with_mqa.weight", "blocks.{L}.attn.W_kv_a"),
    KeyRule("model.layers.{L}.self_attn.kv_a_layernorm.weight", "blocks.{L}.attn.kv_a_norm_w"),
    KeyRule("model.layers.{L}.self_attn.kv_b_proj.weight", "blocks.{L}.attn.W_kv_b"),
    KeyRule("model.layers.{L}.self_attn.o_proj.weight", "blocks.{L}.attn.w_o"),
)

ARCH = Architecture(
    name=NAME,
    model_type="deepseek_v2",
    translate=translate,
    defaults=DEFAULTS,
    required=REQUIRED,
    ignored=IGNORED,
    aliases={"num_experts": "n_routed_experts"},
    key_rules=COMMON_RULES + MLA_RULES + DENSE_MLP_RULES
    + expert_rules("mlp", "gate_proj", "up_proj", "down_proj", "gate") + FUSED_EXPERT_RULES
    + shared_expert_rules("shared_experts"),
    hf_config_class="DeepseekV2Config",
    hf_model_class=NAME,
)
