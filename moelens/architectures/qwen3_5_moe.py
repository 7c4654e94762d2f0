"""Qwen3.5 / Qwen3.6-MoE (``Qwen3_5MoeForCausalLM``, text model; e.g. Qwen/Qwen3.5-35B-A3B,
Qwen/Qwen3.6-35B-A3B): Qwen3-Next's hybrid (Gated DeltaNet + gated full attention, ``(1 + w)``
norms, partial RoPE, sigmoid-gated shared expert) with separate ``in_proj_qkv / z / b / a``
projections, every layer sparse and top-k always renormalised. Text-only inputs make the
interleaved MRoPE (``mrope_section``) equal to plain 1-D RoPE: all three position rows are equal.

The hub checkpoints are the multimodal ``Qwen3_5MoeForConditionalGeneration``: fields in
``text_config``, weights under ``model.language_model.`` (stripped), vision (``model.visual.*``)
and multi-token-prediction (``mtp.*``) weights skipped with a one-line note."""

from dataclasses import replace

from moelens.architectures.base import COMMON_RULES, Architecture, KeyRule
from moelens.architectures.qwen3_next import (
    DELTANET_COMMON_RULES, GATED_ATTN_RULES, HYBRID_IGNORED, HYBRID_REQUIRED, MOE_RULES, hybrid_settings,
)
from moelens.architectures.qwen3_next import DEFAULTS as NEXT_DEFAULTS

DEFAULTS = {
    **{k: v for k, v in NEXT_DEFAULTS.items()
       if k not in ("intermediate_size", "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob")},
    "vocab_size": 248320, "num_hidden_layers": 40, "num_experts_per_tok": 8, "num_experts": 256,
}


def translate(hf: dict) -> dict:
    return dict(hybrid_settings(hf, "Qwen3_5MoeForCausalLM"), moe_layers=list(range(hf["num_hidden_layers"])),
                norm_topk_prob=True)


ARCH = Architecture(
    name="Qwen3_5MoeForCausalLM",
    model_type="qwen3_5_moe_text",
    translate=translate,
    defaults=DEFAULTS,
    required=HYBRID_REQUIRED,
    ignored=HYBRID_IGNORED,
    key_rules=COMMON_RULES + GATED_ATTN_RULES + DELTANET_COMMON_RULES + (
        KeyRule("model.layers.{L}.linear_attn.in_proj_qkv.weight", "blocks.{L}.attn.W_qkv"),
        KeyRule("model.layers.{L}.linear_attn.in_proj_z.weight", "blocks.{L}.attn.W_z"),
        KeyRule("model.layers.{L}.linear_attn.in_proj_b.weight", "blocks.{L}.attn.W_b"),
        KeyRule("model.layers.{L}.linear_attn.in_proj_a.weight", "blocks.{L}.attn.W_a"),
    ) + MOE_RULES,
    skip_keys=(r"mtp\..*",),
    hf_config_class="Qwen3_5MoeTextConfig",
    hf_model_class="Qwen3_5MoeForCausalLM",
)

# the multimodal hub checkpoint, read as its text model
MULTIMODAL_ARCH = replace(
    ARCH,
    name="Qwen3_5MoeForConditionalGeneration",
    model_type="qwen3_5_moe",
    sub_config="text_config",
    key_prefixes=(("model.language_model.", "model."),),
    skip_keys=(r"mtp\..*", r"model\.visual\..*"),
    skip_note="multi-token prediction layers and the vision tower",
    hf_config_class="Qwen3_5MoeConfig",
    hf_model_class="Qwen3_5MoeForConditionalGeneration",
)
