"""DeepSeek-V3 / R1 / V3.1 (``DeepseekV3ForCausalLM``) and Kimi-K2 (hub ``model_type`` ``kimi_k2``,
read as DeepSeek-V3), as transformers 5.24 computes them.

* Multi-head latent attention as DeepSeek-V2 (:mod:`moelens.components.mla`), except RoPE: with
  ``rope_interleave`` (default) pairs ``(2i, 2i+1)`` are rotated in the model dtype with cos/sin cast
  to it and written de-interleaved (``rope_deinterleave``); YaRN and the ``mscale_all_dim`` softmax
  scale as V2. ``attention_bias`` must be false (true for no released checkpoint).
* Layers ``< first_k_dense_replace`` are dense SwiGLU; ``moe_layer_freq`` is ignored, as in transformers.
* Router ("noaux_tc", :mod:`moelens.components.router`): fp32 logits with the router weight kept in
  fp32, sigmoid scores, ``e_score_correction_bias`` (fp32) added for selection only, group top-k
  (sum of the top-2 per group, keep ``topk_group`` groups, others -inf), unsorted top-k; weights =
  unbiased scores, renormalised with ``+1e-20`` when ``norm_topk_prob``, times
  ``routed_scaling_factor``, fp32. transformers hard-codes sigmoid/noaux_tc, so a config that says
  otherwise is refused.
* One ungated shared SwiGLU of width ``n_shared_experts * moe_intermediate_size``.
* The multi-token-prediction layer(s) ``model.layers.{n_layers + i}`` are skipped on load.
* FP8 block checkpoints (``quantization_config.quant_method == "fp8"``) are dequantised while loading
  (:mod:`moelens.quant.fp8`).
"""

from moelens.architectures.base import (
    COMMON_RULES, DENSE_MLP_RULES, FUSED_EXPERT_RULES, Architecture, KeyRule, UnsupportedConfigError,
    expert_rules, rope_settings, shared_expert_rules,
)
from moelens.architectures.deepseek_v2 import MLA_RULES

NAME = "DeepseekV3ForCausalLM"

# class defaults of transformers 5.24 DeepseekV3Config (checked by instantiating it in the tests)
DEFAULTS = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True, "rms_norm_eps": 1e-6,
    "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None, "tie_word_embeddings": False,
    "rope_parameters": None, "rope_theta": None, "rope_scaling": None, "rope_interleave": True,
}

V3_REQUIRED = REQUIRED = {  # also GLM-4.7-Flash's (glm4_moe_lite)
    "hidden_act": ("silu",),
    "attention_bias": (False, None),
    "pretraining_tp": (1, None),
    # not read by transformers' V3 (sigmoid and noaux_tc are hard-coded); anything else is another model
    "scoring_func": ("sigmoid",),
    "topk_method": ("noaux_tc",),
    "ep_size": (1, None),
}

IGNORED = frozenset({
    "moe_layer_freq",  # ignored by transformers V3: every layer >= first_k_dense_replace is sparse
    "num_nextn_predict_layers", "num_mtp_layers",  # MTP layers: skipped on load (skip_keys)
    "head_dim",  # set to qk_rope_head_dim by DeepseekV3Config.__post_init__
    "qk_head_dim",  # derived: qk_nope_head_dim + qk_rope_head_dim
    "quantization_config",  # read by the loader (moelens.quant), not by the forward
    "aux_loss_alpha", "seq_aux", "max_position_embeddings", "attention_dropout",
})

# the multi-token-prediction layer(s) that checkpoints append after the decoder
MTP_SKIP_KEYS = (r"model\.layers\.{MTP_LAYER}\..*",)

ROUTER_BIAS_RULES = (
    KeyRule("model.layers.{L}.mlp.gate.e_score_correction_bias", "blocks.{L}.mlp.router.b_correction"),
)


def noaux_tc_router(hf: dict, arch: str) -> dict:
    """MoEConfig router fields of the DeepSeek-V3 router (shared by GLM-4.x and GLM-4.7-Flash)."""
    n_group, topk_group, experts, k = hf["n_group"], hf["topk_group"], hf["n_routed_experts"], hf["num_experts_per_tok"]
    if not n_group or not topk_group or k is None:
        raise UnsupportedConfigError(
            f"{arch}: the noaux_tc router needs n_group, topk_group and num_experts_per_tok "
            f"(got {n_group}, {topk_group}, {k})"
        )
    if experts % n_group or experts // n_group < 2 or topk_group > n_group or k > topk_group * (experts // n_group):
        raise UnsupportedConfigError(
            f"{arch}: n_group={n_group}, topk_group={topk_group}, num_experts_per_tok={k} do not fit "
            f"n_routed_experts={experts} (groups must divide the experts, hold >= 2 experts each, and the "
            f"kept groups must hold >= top_k experts)"
        )
    return dict(
        router_dtype="float32", router_weights_dtype="float32", router_score_func="sigmoid",
        router_correction_bias=True, router_renorm_eps=1e-20, router_fp32_params=True,
        norm_topk_prob=bool(hf["norm_topk_prob"]), routed_scaling_factor=float(hf["routed_scaling_factor"]),
        topk_method="noaux_tc", topk_sorted=False, n_group=n_group, topk_group=topk_group,
    )


def mla_fields(hf: dict, arch: str, rope: dict) -> dict:
    """MoEConfig attention fields of DeepSeek-V3-style MLA."""
    h = hf["num_attention_heads"]
    if hf["num_key_value_heads"] not in (None, h):
        raise UnsupportedConfigError(
            f"{arch}: num_key_value_heads={hf['num_key_value_heads']} != num_attention_heads={h}; "
            f"multi-head latent attention gives every head its own key"
        )
    dn, dr = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"]
    interleave = bool(hf["rope_interleave"])
    return dict(
        n_heads=h, n_kv_heads=h, d_head=dn + dr, attention="mla", q_lora_rank=hf["q_lora_rank"] or None,
        kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=hf["v_head_dim"],
        rope_theta=rope["rope_theta"] or 1e4, rope_interleaved=interleave, rope_deinterleave=interleave,
        rope_scaling=rope["rope_scaling"],
    )


# expert-side key map shared by the whole family (DeepSeek-V3, GLM-4.5/4.6/4.7, GLM-4.7-Flash)
V3_MOE_RULES = (DENSE_MLP_RULES + expert_rules("mlp", "gate_proj", "up_proj", "down_proj", "gate")
                + FUSED_EXPERT_RULES + ROUTER_BIAS_RULES + shared_expert_rules("shared_experts"))


def v3_moe_fields(hf: dict, arch: str, moe_layers) -> dict:
    """The family's sizes, layer split, shared experts and noaux_tc router (attention fields apart)."""
    return dict(
        n_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"], d_vocab=hf["vocab_size"],
        n_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"], d_expert=hf["moe_intermediate_size"],
        d_mlp=hf["intermediate_size"], moe_layers=tuple(moe_layers), rms_norm_eps=hf["rms_norm_eps"],
        d_shared=(hf["n_shared_experts"] or 0) * hf["moe_intermediate_size"], shared_gate=False,
        **noaux_tc_router(hf, arch),
    )


def translate(hf: dict) -> dict:
    rope = rope_settings(hf, NAME, allow_yarn=True)
    first_dense = hf["first_k_dense_replace"] or 0
    return dict(**v3_moe_fields(hf, NAME, range(first_dense, hf["num_hidden_layers"])), **mla_fields(hf, NAME, rope))


ARCH = Architecture(
    name=NAME,
    model_type="deepseek_v3",
    translate=translate,
    defaults=DEFAULTS,
    required=REQUIRED,
    ignored=IGNORED,
    aliases={"num_experts": "n_routed_experts", "num_local_experts": "n_routed_experts"},
    key_rules=COMMON_RULES + MLA_RULES + V3_MOE_RULES,
    hf_config_class="DeepseekV3Config",
    hf_model_class=NAME,
    skip_keys=MTP_SKIP_KEYS,
)
