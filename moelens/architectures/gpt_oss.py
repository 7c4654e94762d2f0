"""gpt-oss (``GptOssForCausalLM``: openai/gpt-oss-20b, gpt-oss-120b), as transformers 5.24 computes it.

* Router ``mlp.router``: biased logits (model dtype), ``topk`` of the **logits** (sorted), softmax
  over the k selected logits in the logits' dtype (``router_order="topk_softmax"``). No scaling.
  ``hook_router_scores`` is the fp32 softmax over all experts (its renormalised top-k equals the
  weights mathematically; the weights themselves are computed from the logits as transformers does).
* Experts: biased, fused **transposed** ``gate_up_proj [E, d_model, 2I]`` with gate = even columns,
  up = odd columns (split at load into moelens' ``w_gate``/``w_up [E, I, d_model]``),
  ``down_proj [E, I, d_model]``; clamped SwiGLU ``(clamp(u, -7, 7) + 1) * g * sigmoid(1.702 g)``,
  ``g = min(g, 7)`` (``swiglu_alpha``, ``swiglu_limit``). Every layer is sparse; no shared expert.
* Attention: GQA with q/k/v/o biases (``attention_bias``), learned per-head **sinks**
  (``attn.hook_sink_weight``), sliding-window layers per ``layer_types`` (window ``sliding_window``,
  128 on the real models, even layers sliding), half-split RoPE with YaRN (``truncate: false``).
* RMSNorm multiplies the weight in fp32 before the cast (``norm_weight_fp32``).
* MXFP4 checkpoints (``quantization_config.quant_method == "mxfp4"``, ``*_blocks``/``*_scales``
  expert tensors) are dequantised while loading (:mod:`moelens.quant.mxfp4`); dequantised bf16
  copies load as they are.
"""

from moelens.architectures.base import (
    COMMON_RULES, GQA_RULES, Architecture, KeyRule, UnsupportedConfigError, rope_settings,
)

NAME = "GptOssForCausalLM"

# class defaults of transformers 5.24 GptOssConfig (checked by instantiating it)
DEFAULTS = {
    "num_hidden_layers": 36, "num_local_experts": 128, "vocab_size": 201088, "hidden_size": 2880,
    "intermediate_size": 2880, "head_dim": 64, "num_attention_heads": 64, "num_key_value_heads": 8,
    "sliding_window": 128, "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "rope_parameters": None,
    "rope_theta": None, "rope_scaling": None, "num_experts_per_tok": 4, "swiglu_alpha": 1.702,
    "swiglu_limit": 7.0, "layer_types": None, "pad_token_id": None, "bos_token_id": None,
    "eos_token_id": None, "attention_bias": True, "quantization_config": None,
}

# GptOssConfig.__post_init__ fills these when the config has no rope parameters
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}
DEFAULT_THETA = 150000.0

IGNORED = frozenset({
    "hidden_act",  # not read by transformers' gpt-oss experts (the clamped SwiGLU is hard-coded)
    "experts_per_token",  # OpenAI's duplicate of num_experts_per_tok in the hub file (not read by transformers)
    "initial_context_length",  # OpenAI's field in the hub file (not read by transformers)
    "router_aux_loss_coef", "output_router_logits", "max_position_embeddings", "attention_dropout",
})


def translate(hf: dict) -> dict:
    from moelens.quant.mxfp4 import QuantizationError, quant_method

    try:
        quant_method(hf)
    except QuantizationError as exc:
        raise UnsupportedConfigError(f"{NAME}: {exc}") from None
    if not (hf.get("rope_parameters") or hf.get("rope_scaling") or hf.get("rope_theta")):
        hf = {**hf, "rope_parameters": {**DEFAULT_ROPE, "rope_theta": DEFAULT_THETA}}
    rope = rope_settings(hf, NAME, allow_yarn=True)
    n, h = hf["num_hidden_layers"], hf["num_attention_heads"]
    types = hf["layer_types"]
    if types is None:  # GptOssConfig.__post_init__: even layers sliding, odd layers full
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    bad = sorted(set(types) - {"sliding_attention", "full_attention"})
    if bad or len(types) != n:
        raise UnsupportedConfigError(
            f"{NAME}: layer_types must list 'sliding_attention' / 'full_attention' for each of the {n} layers "
            f"(got {len(types)} entries{', unsupported ' + ', '.join(map(repr, bad)) if bad else ''})"
        )
    window = hf["sliding_window"]
    if "sliding_attention" in types and not window:
        raise UnsupportedConfigError(f"{NAME}: layer_types has sliding layers but sliding_window={window!r}")
    bias = bool(hf["attention_bias"])
    return dict(
        n_layers=n, d_model=hf["hidden_size"], d_vocab=hf["vocab_size"], n_heads=h,
        n_kv_heads=hf["num_key_value_heads"] or h, d_head=hf["head_dim"] or hf["hidden_size"] // h,
        n_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"], d_expert=hf["intermediate_size"],
        moe_layers=tuple(range(n)), rms_norm_eps=hf["rms_norm_eps"],
        rope_theta=rope["rope_theta"] or DEFAULT_THETA, rope_scaling=rope["rope_scaling"],
        qkv_bias=bias, attn_o_bias=bias, attn_sinks=True,
        sliding_window=window if "sliding_attention" in types else None,
        layer_types=tuple(types) if "sliding_attention" in types else None,
        router_bias=True, router_order="topk_softmax", norm_topk_prob=True, router_weights_dtype="model",
        expert_bias=True, expert_act="clamped_swiglu", swiglu_alpha=float(hf["swiglu_alpha"]),
        swiglu_limit=float(hf["swiglu_limit"]), norm_weight_fp32=True,
    )


GPT_OSS_RULES = (
    KeyRule("model.layers.{L}.self_attn.o_proj.bias", "blocks.{L}.attn.b_o"),
    KeyRule("model.layers.{L}.self_attn.sinks", "blocks.{L}.attn.sinks"),
    KeyRule("model.layers.{L}.mlp.router.weight", "blocks.{L}.mlp.router.W_router"),
    KeyRule("model.layers.{L}.mlp.router.bias", "blocks.{L}.mlp.router.b_router"),
    KeyRule(
        "model.layers.{L}.mlp.experts.gate_up_proj",
        ("blocks.{L}.mlp.experts.w_gate", "blocks.{L}.mlp.experts.w_up"),
        "interleaved_t",
    ),
    KeyRule(
        "model.layers.{L}.mlp.experts.gate_up_proj_bias",
        ("blocks.{L}.mlp.experts.b_gate", "blocks.{L}.mlp.experts.b_up"),
        "interleaved",
    ),
    KeyRule("model.layers.{L}.mlp.experts.down_proj", "blocks.{L}.mlp.experts.w_down", "transpose"),
    KeyRule("model.layers.{L}.mlp.experts.down_proj_bias", "blocks.{L}.mlp.experts.b_down"),
)

ARCH = Architecture(
    name=NAME,
    model_type="gpt_oss",
    translate=translate,
    defaults=DEFAULTS,
    ignored=IGNORED,
    aliases={"num_experts": "num_local_experts"},
    key_rules=COMMON_RULES + GQA_RULES + GPT_OSS_RULES,
    hf_config_class="GptOssConfig",
    hf_model_class=NAME,
)
