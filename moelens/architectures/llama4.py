"""Llama 4 (``Llama4ForCausalLM``, model_type ``llama4_text``; the text model of
meta-llama/Llama-4-Scout-17B-16E and Llama-4-Maverick-17B-128E), as transformers 5.25 computes it.

* MoE layers (``moe_layers``, default every ``interleave_moe_layer_step``-th layer; Maverick
  alternates dense and MoE, Scout is all MoE): router = top-k (k = 1) of the logits, weight =
  ``sigmoid(logit)`` (``router_order="topk_sigmoid"``), which scales the expert's **input**
  (``expert_input_scaled``: the slot's update is ``E_e(w x)``), plus one always-on shared expert
  (``intermediate_size`` wide, no gate). Dense layers: a SwiGLU ``intermediate_size_mlp`` wide.
* Attention: ``no_rope_layers[l] == 0`` marks NoPE layers (no rotation; attention temperature
  tuning ``1 + attn_scale * log1p(floor((pos + 1) / floor_scale))`` on q); the RoPE layers use
  chunked attention (``attention_chunk_size``) and, with ``use_qk_norm``, a weightless L2 (RMS)
  norm of q and k after RoPE. RoPE is interleaved (pairs ``2i, 2i+1``) as an fp32 complex product,
  with ``llama3`` frequency scaling where configured (Scout).
* The hub checkpoints are the multimodal ``Llama4ForConditionalGeneration``: fields in
  ``text_config``, weights under ``language_model.`` (stripped), the vision tower skipped
  (:data:`MULTIMODAL_ARCH`).
* Checkpoint: fused expert banks ``feed_forward.experts.gate_up_proj [E, d_model, 2I]`` (gate | up
  halves, transposed) and ``down_proj [E, I, d_model]``.
"""

from dataclasses import replace

from moelens.architectures.base import (
    COMMON_RULES, GQA_RULES, Architecture, KeyRule, UnsupportedConfigError, rope_settings,
)

NAME = "Llama4ForCausalLM"

# class defaults of transformers 5.25 Llama4TextConfig
DEFAULTS = {
    "vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
    "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
    "rms_norm_eps": 1e-5, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "num_experts_per_tok": 1, "num_local_experts": 16, "moe_layers": None, "interleave_moe_layer_step": 1,
    "use_qk_norm": True, "rope_parameters": None, "rope_theta": None, "rope_scaling": None, "no_rope_layers": None,
    "no_rope_layer_interval": 4, "attention_chunk_size": 8192, "layer_types": None, "attn_temperature_tuning": True,
    "floor_scale": 8192, "attn_scale": 0.1, "attention_bias": False,
}
DEFAULT_THETA = 500000.0

REQUIRED = {"hidden_act": ("silu",)}
IGNORED = frozenset({"router_jitter_noise", "for_llm_compressor", "cache_implementation", "attn_implementation"})


def translate(hf: dict) -> dict:
    n, d, h = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    rope = rope_settings(hf, NAME, allow_llama3=True)
    no_rope = hf["no_rope_layers"] or [int((l + 1) % hf["no_rope_layer_interval"] != 0) for l in range(n)]
    if len(no_rope) < n:
        raise UnsupportedConfigError(f"{NAME}: no_rope_layers has {len(no_rope)} entries for {n} layers")
    step = hf["interleave_moe_layer_step"]
    moe_layers = hf["moe_layers"] if hf["moe_layers"] is not None else list(range(step - 1, n, step))
    chunk = hf["attention_chunk_size"]
    types = hf["layer_types"] or [
        "chunked_attention" if r and chunk is not None else "full_attention" for r in no_rope[:n]
    ]
    bad = sorted(set(types) - {"chunked_attention", "full_attention"})
    if bad or len(types) != n:
        raise UnsupportedConfigError(
            f"{NAME}: layer_types must list 'chunked_attention' / 'full_attention' for each of the {n} layers "
            f"(got {len(types)} entries{', unsupported ' + ', '.join(map(repr, bad)) if bad else ''})"
        )
    bias = bool(hf["attention_bias"])
    return dict(
        n_layers=n, d_model=d, d_vocab=hf["vocab_size"], n_heads=h, n_kv_heads=hf["num_key_value_heads"] or h,
        d_head=hf["head_dim"] or d // h, n_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
        d_expert=hf["intermediate_size"], d_mlp=hf["intermediate_size_mlp"], d_shared=hf["intermediate_size"],
        moe_layers=tuple(moe_layers), rms_norm_eps=hf["rms_norm_eps"],
        rope_theta=rope["rope_theta"] or DEFAULT_THETA, rope_scaling=rope["rope_scaling"],
        rope_interleaved=True, rope_arith="complex",
        nope_layers=tuple(l for l in range(n) if not no_rope[l]),
        layer_types=tuple(types) if "chunked_attention" in types else None,
        attention_chunk_size=chunk if "chunked_attention" in types else None,
        qk_norm="l2" if hf["use_qk_norm"] else "none",
        attn_temperature_floor=int(hf["floor_scale"]) if hf["attn_temperature_tuning"] else 0,
        attn_temperature_scale=float(hf["attn_scale"]),
        qkv_bias=bias, attn_o_bias=bias,
        router_order="topk_sigmoid", router_score_func="sigmoid", router_weights_dtype="model",
        expert_input_scaled=True,
    )


FF = "model.layers.{L}.feed_forward"
LLAMA4_RULES = (
    KeyRule("model.layers.{L}.self_attn.o_proj.bias", "blocks.{L}.attn.b_o"),
    KeyRule(f"{FF}.gate_proj.weight", "blocks.{L}.mlp.w_gate"),
    KeyRule(f"{FF}.up_proj.weight", "blocks.{L}.mlp.w_up"),
    KeyRule(f"{FF}.down_proj.weight", "blocks.{L}.mlp.w_down"),
    KeyRule(f"{FF}.router.weight", "blocks.{L}.mlp.router.W_router"),
    KeyRule(f"{FF}.experts.gate_up_proj", ("blocks.{L}.mlp.experts.w_gate", "blocks.{L}.mlp.experts.w_up"), "split_t"),
    KeyRule(f"{FF}.experts.down_proj", "blocks.{L}.mlp.experts.w_down", "transpose"),
    KeyRule(f"{FF}.shared_expert.gate_proj.weight", "blocks.{L}.mlp.shared_experts.w_gate"),
    KeyRule(f"{FF}.shared_expert.up_proj.weight", "blocks.{L}.mlp.shared_experts.w_up"),
    KeyRule(f"{FF}.shared_expert.down_proj.weight", "blocks.{L}.mlp.shared_experts.w_down"),
)

ARCH = Architecture(
    name=NAME,
    model_type="llama4_text",
    translate=translate,
    defaults=DEFAULTS,
    required=REQUIRED,
    ignored=IGNORED,
    key_rules=COMMON_RULES + GQA_RULES + LLAMA4_RULES,
    hf_config_class="Llama4TextConfig",
    hf_model_class=NAME,
)

# the multimodal hub checkpoints (meta-llama/Llama-4-Scout-17B-16E, ...-Maverick-17B-128E), read as their
# text model: fields in text_config, weights under language_model.*, vision tower and projector skipped
MULTIMODAL_ARCH = replace(
    ARCH,
    name="Llama4ForConditionalGeneration",
    model_type="llama4",
    sub_config="text_config",
    key_prefixes=(("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
    skip_keys=(r"vision_model\..*", r"multi_modal_projector\..*"),
    skip_note="the vision tower and its projector",
    hf_config_class="Llama4Config",
    hf_model_class="Llama4ForConditionalGeneration",
)
