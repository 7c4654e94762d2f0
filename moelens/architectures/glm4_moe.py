"""GLM-4.5 / 4.6 / 4.7 and GLM-4.5-Air (``Glm4MoeForCausalLM``), as transformers 5.24 computes them.

* GQA with q/k/v biases (``attention_bias``; ``o_proj`` never has one), optional per-head QK RMSNorm
  (``use_qk_norm``), explicit ``head_dim``.
* Partial RoPE: half-split rotation of the first ``int(head_dim * partial_rotary_factor)`` dims of
  each head (default factor 0.5), the rest passed through (``MoEConfig.rotary_dim``); cos/sin cast to
  the model dtype.
* Layers ``< first_k_dense_replace`` dense; the DeepSeek-V3 router (sigmoid, selection-only
  ``e_score_correction_bias``, noaux_tc groups, ``+1e-20`` renormalisation, ``routed_scaling_factor``);
  one ungated shared expert; MTP layer(s) skipped on load; FP8 checkpoints dequantised on load.
"""

from moelens.architectures.base import (
    COMMON_RULES, GQA_RULES, Architecture, UnsupportedConfigError,
    rope_dict, rope_settings,
)
from moelens.architectures.deepseek_v3 import MTP_SKIP_KEYS, V3_MOE_RULES, v3_moe_fields

NAME = "Glm4MoeForCausalLM"

# class defaults of transformers 5.24 Glm4MoeConfig (partial_rotary_factor: its __post_init__ default)
DEFAULTS = {
    "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 10944, "num_hidden_layers": 46,
    "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": None, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "rope_parameters": None, "rope_theta": None, "rope_scaling": None,
    "partial_rotary_factor": None, "attention_bias": False, "moe_intermediate_size": 1408,
    "num_experts_per_tok": 8, "n_shared_experts": 1, "n_routed_experts": 128, "routed_scaling_factor": 1.0,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "norm_topk_prob": True, "use_qk_norm": False,
    "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
}
DEFAULT_PARTIAL_ROTARY_FACTOR = 0.5

REQUIRED = {
    "hidden_act": ("silu",),
    "scoring_func": ("sigmoid",),
    "topk_method": ("noaux_tc",),
}

IGNORED = frozenset({
    "num_nextn_predict_layers", "num_mtp_layers", "quantization_config", "moe_layer_freq",
    "max_position_embeddings", "attention_dropout", "pretraining_tp",
})


def partial_rotary(hf: dict, head_dim: int, default: float, arch: str) -> tuple[dict, float]:
    """(``hf`` without partial_rotary_factor in its rope dict, the factor) from v5 ``rope_parameters``
    or the legacy top-level field."""
    params = rope_dict(hf)  # rope_scaling, when present, replaces rope_parameters (as in transformers)
    factor = params.pop("partial_rotary_factor", None)
    if factor is None:
        factor = hf.get("partial_rotary_factor")
    factor = default if factor is None else float(factor)
    dim = int(head_dim * factor)
    if dim < 2 or dim % 2 or dim > head_dim:
        raise UnsupportedConfigError(f"{arch}: partial_rotary_factor={factor} gives rotary dim {dim} of {head_dim}")
    return {**hf, "rope_parameters": params or None, "rope_scaling": None}, factor


def translate(hf: dict) -> dict:
    n, d, h = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    d_head = hf["head_dim"] or d // h
    hf, factor = partial_rotary(hf, d_head, DEFAULT_PARTIAL_ROTARY_FACTOR, NAME)
    rope = rope_settings(hf, NAME)
    rotary_dim = int(d_head * factor)
    first_dense = hf["first_k_dense_replace"] or 0
    return dict(
        **v3_moe_fields(hf, NAME, range(first_dense, n)),
        n_heads=h, n_kv_heads=hf["num_key_value_heads"], d_head=d_head,
        qkv_bias=bool(hf["attention_bias"]), qk_norm="per_head" if hf["use_qk_norm"] else "none",
        rope_theta=rope["rope_theta"] or 1e4, rotary_dim=None if rotary_dim == d_head else rotary_dim,
    )


ARCH = Architecture(
    name=NAME,
    model_type="glm4_moe",
    translate=translate,
    defaults=DEFAULTS,
    required=REQUIRED,
    ignored=IGNORED,
    aliases={"num_local_experts": "n_routed_experts"},
    key_rules=COMMON_RULES + GQA_RULES + V3_MOE_RULES,
    hf_config_class="Glm4MoeConfig",
    hf_model_class=NAME,
    skip_keys=MTP_SKIP_KEYS,
)
