"""GLM-4.7-Flash (``Glm4MoeLiteForCausalLM``), as transformers 5.24 computes it: DeepSeek-V3's MLA
(``rope_interleave``, de-interleaved output, YaRN if configured) and router, dense layers from
``mlp_layer_types`` (default: layer 0 dense, the rest sparse), one ungated shared expert, MTP layer
skipped on load. ``partial_rotary_factor`` must be 1 (transformers' MLA cannot rotate part of the
rope dims either)."""

from moelens.architectures.base import (
    COMMON_RULES, Architecture, UnsupportedConfigError, rope_settings,
)
from moelens.architectures.deepseek_v2 import MLA_RULES
from moelens.architectures.deepseek_v3 import MTP_SKIP_KEYS, V3_MOE_RULES, V3_REQUIRED, mla_fields, v3_moe_fields
from moelens.architectures.glm4_moe import partial_rotary

NAME = "Glm4MoeLiteForCausalLM"

# class defaults of transformers 5.24 Glm4MoeLiteConfig
DEFAULTS = {
    "vocab_size": 154880, "hidden_size": 2048, "intermediate_size": 10240, "moe_intermediate_size": 1536,
    "num_hidden_layers": 47, "num_attention_heads": 20, "num_key_value_heads": 20, "n_shared_experts": 1,
    "n_routed_experts": 64, "routed_scaling_factor": 1.8, "kv_lora_rank": 512, "q_lora_rank": 768,
    "qk_rope_head_dim": 64, "v_head_dim": 256, "qk_nope_head_dim": 192, "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 4, "norm_topk_prob": True, "rms_norm_eps": 1e-5, "pad_token_id": None,
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "rope_parameters": None,
    "rope_theta": None, "rope_scaling": None, "rope_interleave": True, "mlp_layer_types": None,
    "partial_rotary_factor": None, "first_k_dense_replace": None,
}

REQUIRED = V3_REQUIRED  # the same MLA attention and sigmoid/noaux_tc router as DeepSeek-V3

IGNORED = frozenset({
    "num_nextn_predict_layers", "num_mtp_layers", "quantization_config", "moe_layer_freq", "head_dim",
    "qk_head_dim", "max_position_embeddings", "attention_dropout", "aux_loss_alpha", "seq_aux",
})


def translate(hf: dict) -> dict:
    n = hf["num_hidden_layers"]
    hf, factor = partial_rotary(hf, hf["qk_rope_head_dim"], 1.0, NAME)
    if factor != 1.0:
        raise UnsupportedConfigError(
            f"{NAME}: partial_rotary_factor={factor}; MLA rotates all qk_rope_head_dim dims (transformers fails "
            f"on anything else)"
        )
    types = hf["mlp_layer_types"] or ["dense"] + ["sparse"] * (n - 1)
    if len(types) != n or set(types) - {"dense", "sparse"}:
        raise UnsupportedConfigError(f"{NAME}: mlp_layer_types must list 'dense'/'sparse' for each of {n} layers")
    moe_layers = tuple(l for l, t in enumerate(types) if t == "sparse")
    first_dense = hf["first_k_dense_replace"]
    if hf["mlp_layer_types"] is None and first_dense not in (None, 1):
        raise UnsupportedConfigError(
            f"{NAME}: first_k_dense_replace={first_dense} but transformers reads only mlp_layer_types "
            f"(default: layer 0 dense, the rest sparse); set mlp_layer_types explicitly"
        )
    rope = rope_settings(hf, NAME, allow_yarn=True)
    return dict(**v3_moe_fields(hf, NAME, moe_layers), **mla_fields(hf, NAME, rope))


ARCH = Architecture(
    name=NAME,
    model_type="glm4_moe_lite",
    translate=translate,
    defaults=DEFAULTS,
    required=REQUIRED,
    ignored=IGNORED,
    aliases={"num_local_experts": "n_routed_experts"},
    key_rules=COMMON_RULES + MLA_RULES + V3_MOE_RULES,
    hf_config_class="Glm4MoeLiteConfig",
    hf_model_class=NAME,
    skip_keys=MTP_SKIP_KEYS,
)
