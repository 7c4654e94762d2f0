"""ERNIE-4.5 MoE (``Ernie4_5_MoeForCausalLM``: baidu/ERNIE-4.5-21B-A3B-PT, ERNIE-4.5-300B-A47B-PT), as
transformers 5.25 computes it.

* Sparse layers: layer ``l`` is sparse iff ``(l + 1) % moe_layer_interval == 0`` and
  ``moe_layer_start_index <= l <= moe_layer_end_index`` (``-1``: the last layer); the others are dense
  SwiGLU of width ``intermediate_size``.
* Router ``mlp.gate``, entirely fp32 (the weight kept fp32 in a bf16 model): ``s = softmax(fp32 logits)``
  (``hook_router_scores``), selection on ``s + e_score_correction_bias`` (``hook_router_selection_scores``;
  hub ``mlp.moe_statics.e_score_correction_bias [1, E]``, fp32), top-k sorted; weights = the unbiased
  ``s[idx] / clamp(sum, min=moe_norm_min)``, cast to the model dtype.
* ``moe_num_shared_experts`` ungated shared experts, one SwiGLU of width
  ``moe_num_shared_experts * moe_intermediate_size``.
* RoPE: interleaved pairs ``(2i, 2i + 1)`` rotated in fp32 (``rope_interleaved``), cast back.
* ``use_bias`` puts biases on q, k, v, o **and** on every dense / shared MLP projection in transformers;
  moelens implements the attention biases and refuses ``use_bias`` with an MLP (no released checkpoint
  sets it).
* The multi-token-prediction tensors (``mtp*``) are skipped on load, as transformers does.
"""

from moelens.architectures.base import (
    COMMON_RULES, DENSE_MLP_RULES, FUSED_EXPERT_RULES, GQA_RULES, Architecture, KeyRule, UnsupportedConfigError,
    expert_rules, rope_settings, shared_expert_rules,
)

NAME = "Ernie4_5_MoeForCausalLM"

# class defaults of transformers 5.25 Ernie4_5_MoeConfig (checked in the tests)
DEFAULTS = {
    "vocab_size": 103424, "hidden_size": 2560, "intermediate_size": 12288, "num_hidden_layers": 28,
    "num_attention_heads": 20, "num_key_value_heads": 4, "head_dim": None, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True, "rope_parameters": None, "rope_theta": None, "rope_scaling": None,
    "use_bias": False, "moe_intermediate_size": 1536, "moe_k": 6, "moe_num_experts": 64,
    "moe_num_shared_experts": 2, "moe_layer_start_index": 1, "moe_layer_end_index": -1, "moe_layer_interval": 1,
    "moe_norm_min": 1e-12, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}

REQUIRED = {
    "hidden_act": ("silu",),
    "use_rmsnorm": (True,),  # the hub file's flag; transformers always uses RMSNorm
}

# fields of the hub config.json that transformers does not read (it computes the softmax router with the
# correction bias, RMSNorm and standard attention whatever they say), and training-only fields
IGNORED = frozenset({
    "moe_capacity", "moe_gate", "moe_use_aux_free", "moe_gate_act",  # routing as described above in transformers
    "use_flash_attention", "fuse_attn", "fuse_rope", "fuse_linear", "fuse_swiglu", "use_fast_ln",  # kernels
    "num_nextn_predict_layers", "num_mtp_layers", "multi_token_pred_lambda",  # MTP tensors: skipped on load
    "compression_ratio", "weight_share_add_bias", "is_quantized", "hidden_dropout_prob",
    "attention_probs_dropout_prob", "max_sequence_length", "use_recompute",
    "attention_dropout", "max_position_embeddings", "router_aux_loss_coef", "output_router_logits",
})


def moe_layers(hf: dict) -> tuple[int, ...]:
    n, interval = hf["num_hidden_layers"], hf["moe_layer_interval"] or 1
    start = hf["moe_layer_start_index"] or 0
    end = hf["moe_layer_end_index"]
    end = n - 1 if end is None or end == -1 else end
    return tuple(l for l in range(n) if (l + 1) % interval == 0 and start <= l <= end)


def translate(hf: dict) -> dict:
    rope = rope_settings(hf, NAME)
    n, d, h = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    bias = bool(hf["use_bias"])
    layers = moe_layers(hf)
    shared = hf["moe_num_shared_experts"] or 0
    if bias and (shared or len(layers) < n):
        raise UnsupportedConfigError(
            f"{NAME}: use_bias=true adds biases to the dense and shared-expert MLPs, which moelens does not "
            f"implement (only the attention biases); no released ERNIE-4.5 checkpoint sets it"
        )
    return dict(
        n_layers=n, d_model=d, d_vocab=hf["vocab_size"], n_heads=h, n_kv_heads=hf["num_key_value_heads"] or h,
        d_head=hf["head_dim"] or d // h, n_experts=hf["moe_num_experts"], top_k=hf["moe_k"],
        d_expert=hf["moe_intermediate_size"], d_mlp=hf["intermediate_size"], moe_layers=layers,
        rms_norm_eps=hf["rms_norm_eps"], rope_theta=rope["rope_theta"] or 1e4, rope_interleaved=True,
        qkv_bias=bias, attn_o_bias=bias,
        router_dtype="float32", router_fp32_params=True, router_score_func="softmax", router_correction_bias=True,
        correction_bias_counted=True, topk_method="greedy", topk_sorted=True, norm_topk_prob=True,
        router_renorm_min=float(hf["moe_norm_min"]), router_weights_dtype="model",
        d_shared=shared * hf["moe_intermediate_size"],
    )


def correction_bias(t, cfg):
    """``e_score_correction_bias [1, n_experts]`` -> moelens' ``b_correction [n_experts]``."""
    return (t.reshape(-1),)


ERNIE_RULES = (
    KeyRule("model.layers.{L}.self_attn.o_proj.bias", "blocks.{L}.attn.b_o"),
    # hub key, and transformers 5's in-memory name
    KeyRule("model.layers.{L}.mlp.moe_statics.e_score_correction_bias", ("blocks.{L}.mlp.router.b_correction",),
            "convert", convert=correction_bias),
    KeyRule("model.layers.{L}.mlp.gate.moe_statics.e_score_correction_bias",
            ("blocks.{L}.mlp.router.b_correction",), "convert", convert=correction_bias),
)

ARCH = Architecture(
    name=NAME,
    model_type="ernie4_5_moe",
    translate=translate,
    defaults=DEFAULTS,
    required=REQUIRED,
    ignored=IGNORED,
    aliases={"num_experts": "moe_num_experts", "num_experts_per_tok": "moe_k"},
    key_rules=COMMON_RULES + GQA_RULES + DENSE_MLP_RULES
    + expert_rules("mlp", "gate_proj", "up_proj", "down_proj", "gate") + FUSED_EXPERT_RULES
    + shared_expert_rules("shared_experts") + ERNIE_RULES,
    hf_config_class="Ernie4_5_MoeConfig",
    hf_model_class=NAME,
    skip_keys=(r"model\.mtp.*", r"mtp.*"),
    skip_note="multi-token-prediction tensors (not part of transformers' model)",
)
