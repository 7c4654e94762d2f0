"""Gemma 4 text MoE (``Gemma4ForCausalLM``, model_type ``gemma4_text``; the text model of
google/gemma-4-26B-A4B), as transformers 5.25 computes it.

* Embeddings times ``sqrt(hidden_size)`` (``embed_scale``); tied unembedding; final logit soft-cap
  (``final_logit_softcap``).
* Sandwich norms: ``h += post_attn_norm(Attn(input_norm(h)))``; then, in parallel
  (``parallel_dense_mlp``), a GELU-tanh dense MLP ``post_ff_norm_1(MLP(pre_ff_norm(h)))`` and the MoE
  ``post_ff_norm_2(MoE(pre_ff_norm_2(h)))``, summed and normalised by ``post_ff_norm``, added; the
  block's output times a learned ``layer_scalar``. RMSNorms multiply the weight in fp32.
* Router on the residual stream: ``W (rms(h) * scale * d**-0.5)``, fp32 softmax, top-k, always
  renormalised, times ``per_expert_scale`` (``router_input_norm``, ``router_per_expert_scale``);
  GELU-tanh experts, fused ``gate_up_proj [E, 2I, d]``.
* Attention: per-head q/k RMSNorm (weighted), weightless v RMSNorm, softmax scale 1; sliding layers
  (``sliding_window``) with their head_dim / kv heads / RoPE θ; full-attention layers with their own
  head width and kv heads (``per_layer_config``), K = V (``attention_k_eq_v``: no ``v_proj``) and
  "proportional" RoPE (``partial_rotary_factor`` of the frequencies, θ of ``rope_parameters``).

The hub checkpoints are the multimodal ``Gemma4ForConditionalGeneration`` (:data:`MULTIMODAL_ARCH`):
fields in ``text_config``, weights under ``model.language_model.`` (stripped), the vision and audio
towers skipped.

Not supported (refused at load): per-layer input embeddings (``hidden_size_per_layer_input``, the
small dense Gemma 4 models), KV sharing across layers, bidirectional attention, dense Gemma 4
(``enable_moe_block`` false).
"""

from dataclasses import replace

from moelens.architectures.base import GQA_RULES, Architecture, KeyRule, UnsupportedConfigError

NAME = "Gemma4ForCausalLM"

# class defaults of transformers 5.25 Gemma4TextConfig that the translation reads
DEFAULTS = {
    "vocab_size": 262144, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 30,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "rms_norm_eps": 1e-6,
    "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True, "rope_parameters": None,
    "sliding_window": 512, "layer_types": None, "final_logit_softcapping": None, "attention_k_eq_v": False,
    "num_experts": None, "top_k_experts": None, "moe_intermediate_size": None, "per_layer_config": None,
    "global_head_dim": 512, "num_global_key_value_heads": None,
}
REQUIRED = {
    "hidden_activation": ("gelu_pytorch_tanh",), "enable_moe_block": (True,), "attention_bias": (False, None),
    "hidden_size_per_layer_input": (0, None), "num_kv_shared_layers": (0, None),
    # "vision": vision tokens attend bidirectionally; text-only inputs are causal (inert here)
    "use_bidirectional_attention": (None, "vision"), "use_double_wide_mlp": (False, None),
}
IGNORED = frozenset({"vocab_size_per_layer_input"})  # only read with per-layer input embeddings (refused)


def _layer_overrides(hf: dict, types: list) -> tuple:
    """(full-attention head_dim, kv heads) from ``per_layer_config`` (or global_head_dim /
    num_global_key_value_heads, as Gemma4TextConfig.__post_init__ derives it)."""
    plc = hf["per_layer_config"]
    full = [l for l, t in enumerate(types) if t == "full_attention"]
    if plc is None:
        kv = hf["num_global_key_value_heads"] if hf["attention_k_eq_v"] else None
        plc = {str(l): {"head_dim": hf["global_head_dim"], **({"num_key_value_heads": kv} if kv else {})} for l in full}
    over = {int(k): v for k, v in plc.items()}
    if sorted(over) != full or len({tuple(sorted(v.items())) for v in over.values()}) > 1:
        raise UnsupportedConfigError(
            f"{NAME}: per_layer_config must give the same overrides to exactly the full-attention layers {full}, "
            f"got {plc}"
        )
    one = next(iter(over.values()), {})
    bad = sorted(set(one) - {"head_dim", "num_key_value_heads"})
    if bad:
        raise UnsupportedConfigError(f"{NAME}: per_layer_config overrides {bad} are not supported")
    return one.get("head_dim"), one.get("num_key_value_heads")


def translate(hf: dict) -> dict:
    n, d, h = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    types = hf["layer_types"] or ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
    types = list(types)
    types[-1] = "full_attention"  # Gemma4TextConfig forces the last layer to full attention
    if set(types) - {"sliding_attention", "full_attention"}:
        raise UnsupportedConfigError(f"{NAME}: layer_types {sorted(set(types))} (sliding_attention, full_attention)")
    rope = hf["rope_parameters"] or {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }
    local, glob = rope.get("sliding_attention") or {}, rope.get("full_attention") or {}
    if local.get("rope_type", "default") != "default" or glob.get("rope_type") not in ("default", "proportional"):
        raise UnsupportedConfigError(f"{NAME}: rope_parameters {rope} (supported: default sliding, default or "
                                     f"proportional full)")
    if glob.get("factor", 1.0) != 1.0:
        raise UnsupportedConfigError(f"{NAME}: proportional RoPE with factor {glob['factor']}")
    d_full, kv_full = _layer_overrides(hf, types)
    if hf["num_experts"] is None or hf["top_k_experts"] is None or hf["moe_intermediate_size"] is None:
        raise UnsupportedConfigError(f"{NAME}: enable_moe_block needs num_experts, top_k_experts, moe_intermediate_size")
    proportion = glob.get("partial_rotary_factor", 1.0) if glob.get("rope_type") == "proportional" else 1.0
    return dict(
        n_layers=n, d_model=d, d_vocab=hf["vocab_size"], n_heads=h, n_kv_heads=hf["num_key_value_heads"] or h,
        d_head=hf["head_dim"], n_experts=hf["num_experts"], top_k=hf["top_k_experts"],
        d_expert=hf["moe_intermediate_size"], d_mlp=hf["intermediate_size"], moe_layers=tuple(range(n)),
        rms_norm_eps=hf["rms_norm_eps"], rope_theta=float(local.get("rope_theta", 10_000.0)),
        rope_theta_full=float(glob.get("rope_theta", 1_000_000.0)), rope_proportion_full=float(proportion),
        full_attn_d_head=d_full, full_attn_n_kv_heads=kv_full, full_attn_k_eq_v=bool(hf["attention_k_eq_v"]),
        layer_types=tuple(types) if "sliding_attention" in types else None,
        sliding_window=hf["sliding_window"] if "sliding_attention" in types else None,
        qk_norm="per_head", v_norm=True, attn_softmax_scale=1.0, norm_weight_fp32=True,
        attn_pre_norm=True, attn_post_norm=True, mlp_pre_norm=True, mlp_post_norm=True,
        parallel_dense_mlp=True, mlp_act="gelu_tanh", layer_scalar=True,
        router_input_norm=True, router_per_expert_scale=True, norm_topk_prob=True, router_weights_dtype="float32",
        embed_scale=float(d) ** 0.5, final_logit_softcap=hf["final_logit_softcapping"],
    )


L = "model.layers.{L}"
GEMMA4_RULES = (
    KeyRule("model.embed_tokens.weight", "embed.W_E"),
    KeyRule("model.norm.weight", "ln_final.w"),
    KeyRule("lm_head.weight", "unembed.w_u"),
    KeyRule(f"{L}.input_layernorm.weight", "blocks.{L}.ln1.w"),
    KeyRule(f"{L}.post_attention_layernorm.weight", "blocks.{L}.ln1_post.w"),
    KeyRule(f"{L}.pre_feedforward_layernorm.weight", "blocks.{L}.ln2.w"),
    KeyRule(f"{L}.post_feedforward_layernorm_1.weight", "blocks.{L}.ln2_post_dense.w"),
    KeyRule(f"{L}.pre_feedforward_layernorm_2.weight", "blocks.{L}.ln2_moe.w"),
    KeyRule(f"{L}.post_feedforward_layernorm_2.weight", "blocks.{L}.ln2_post_moe.w"),
    KeyRule(f"{L}.post_feedforward_layernorm.weight", "blocks.{L}.ln2_post.w"),
    KeyRule(f"{L}.layer_scalar", "blocks.{L}.layer_scalar"),
    KeyRule(f"{L}.mlp.gate_proj.weight", "blocks.{L}.dense_mlp.w_gate"),
    KeyRule(f"{L}.mlp.up_proj.weight", "blocks.{L}.dense_mlp.w_up"),
    KeyRule(f"{L}.mlp.down_proj.weight", "blocks.{L}.dense_mlp.w_down"),
    KeyRule(f"{L}.router.proj.weight", "blocks.{L}.mlp.router.W_router"),
    KeyRule(f"{L}.router.scale", "blocks.{L}.mlp.router.in_norm_w"),
    KeyRule(f"{L}.router.per_expert_scale", "blocks.{L}.mlp.router.per_expert_scale"),
    KeyRule(f"{L}.experts.gate_up_proj", ("blocks.{L}.mlp.experts.w_gate", "blocks.{L}.mlp.experts.w_up"), "split"),
    KeyRule(f"{L}.experts.down_proj", "blocks.{L}.mlp.experts.w_down"),
)

ARCH = Architecture(
    name=NAME,
    model_type="gemma4_text",
    translate=translate,
    defaults=DEFAULTS,
    required=REQUIRED,
    ignored=IGNORED,
    key_rules=GEMMA4_RULES + GQA_RULES,
    hf_config_class="Gemma4TextConfig",
    hf_model_class=NAME,
)

# the multimodal hub checkpoint (google/gemma-4-26B-A4B, -it), read as its text model: fields in text_config,
# weights under model.language_model.*, the vision (and audio) towers and their embedders skipped
MULTIMODAL_ARCH = replace(
    ARCH,
    name="Gemma4ForConditionalGeneration",
    model_type="gemma4",
    sub_config="text_config",
    key_prefixes=(("model.language_model.", "model."),),
    skip_keys=(r"model\.(vision_tower|embed_vision|audio_tower|embed_audio)\..*",),
    skip_note="the vision and audio towers and their embedders",
    hf_config_class="Gemma4Config",
    hf_model_class="Gemma4ForConditionalGeneration",
)
