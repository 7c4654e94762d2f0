"""DeepSeek-V4 (``DeepseekV4ForCausalLM``, hub ``model_type`` ``deepseek_v4``), as transformers 5.25
computes it (eager attention, its only path):

* ``hc_mult`` residual streams mixed by manifold-constrained hyper-connections
  (:mod:`moelens.components.hyper`), collapsed by ``hc_head`` before the final norm;
* per-layer attention (:mod:`moelens.components.compressed_attention`) from ``layer_types``
  (or the legacy ``compress_ratios``: 0 / 4 / 128): a sliding window of ``sliding_window`` keys in
  every layer, plus heavily compressed entries (HCA) or indexer-selected compressed entries (CSA);
  one shared key/value head, attention sinks, grouped output projection; the "main" RoPE
  (``rope_theta``) on sliding-only layers, the "compress" RoPE (``compress_rope_theta`` with YaRN,
  attention factor 1) on compressed ones, on the trailing ``head_dim * partial_rotary_factor`` dims;
* every layer sparse: the ``sqrtsoftplus`` router (selection on scores + ``e_score_correction_bias``,
  always renormalised with +1e-20, times ``routed_scaling_factor``), except the ``hash_moe`` layers of
  ``mlp_layer_types`` (legacy ``num_hash_layers``), whose experts are ``tid2eid[token id]``; clamped
  SwiGLU (``silu(min(g, limit)) * clamp(u, +-limit)``) in the routed and the one shared expert.

Checkpoint layouts: DeepSeek's own names (``layers.{L}.attn.wq_a.weight``, ``embed.weight``,
``head.weight``, ``hc_head_fn``; with or without a ``model.`` prefix, as transformers'
``save_pretrained`` writes them) and transformers' in-memory names. MTP weights (``mtp.*``) are
skipped.
"""

from moelens.architectures.base import Architecture, KeyRule, UnsupportedConfigError, rope_dict

NAME = "DeepseekV4ForCausalLM"

# class defaults of transformers 5.25 DeepseekV4Config (checked by instantiating it in the tests)
DEFAULTS = {
    "vocab_size": 129280, "hidden_size": 4096, "moe_intermediate_size": 2048, "num_hidden_layers": 43,
    "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512, "q_lora_rank": 1024,
    "num_experts_per_tok": 6, "n_routed_experts": 256, "n_shared_experts": 1, "scoring_func": "sqrtsoftplus",
    "routed_scaling_factor": 1.5, "rope_theta": 10000.0, "layer_types": None, "compress_rates": None,
    "compress_rope_theta": 160000.0, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
    "mlp_layer_types": None, "swiglu_limit": 10.0, "sliding_window": 128, "o_groups": 8, "o_lora_rank": 1024,
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "rms_norm_eps": 1e-6, "pad_token_id": None,
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "rope_parameters": None,
    "partial_rotary_factor": None, "rope_scaling": None,
    # legacy fields folded in by DeepseekV4Config.__post_init__
    "compress_ratios": None, "compress_rate_csa": None, "compress_rate_hca": None, "num_hash_layers": None,
    "qk_rope_head_dim": None,
}

REQUIRED = {
    "hidden_act": ("silu",), "attention_bias": (False, None), "mlp_bias": (False, None),
    "scoring_func": ("sqrtsoftplus",), "num_key_value_heads": (1, None), "n_shared_experts": (1, None),
    "tie_word_embeddings": (False, None),
}

IGNORED = frozenset({
    "num_nextn_predict_layers",  # MTP layers: skipped on load
    "norm_topk_prob",  # transformers' V4 routers always renormalise
    "topk_method",  # hard-coded: top-k of scores + correction bias
    "quantization_config", "expert_dtype",  # read by the loader, not by the forward
    "router_aux_loss_coef", "router_jitter_noise", "max_position_embeddings", "attention_dropout",
    "original_seq_len", "rope_factor", "rope_beta_fast", "rope_beta_slow",
})

_KIND = {"sliding_attention": "none", "compressed_sparse_attention": "csa", "heavily_compressed_attention": "hca"}
_RATIO = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


def _layer_types(hf: dict, n: int) -> list[str]:
    types = hf["layer_types"]
    if types is None and hf["compress_ratios"] is not None:
        if set(hf["compress_ratios"][:n]) - set(_RATIO):
            raise UnsupportedConfigError(f"{NAME}: compress_ratios {hf['compress_ratios']} (supported: 0, 4, 128)")
        types = [_RATIO[r] for r in hf["compress_ratios"]]
    if types is None:  # transformers' default: 2 HCA, then CSA / HCA interleaved
        types = ["heavily_compressed_attention"] * min(n, 2) + [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(max(n - 2, 0))]
    types = list(types[:n])
    if len(types) != n or set(types) - set(_KIND):
        raise UnsupportedConfigError(f"{NAME}: layer_types={types!r} (one of {sorted(_KIND)} for each of {n} layers)")
    return types


def _rope(hf: dict, rotary_factor: float) -> tuple[float, float, tuple]:
    """(main theta, compress theta, compress YaRN items) as DeepseekV4Config nests rope_parameters."""
    rp = rope_dict(hf)
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main, compress = dict(rp["main"]), dict(rp["compress"])
    else:
        yarn = {k: v for k, v in rp.items() if k not in ("main", "compress")}
        main = {"rope_type": "default", "rope_theta": hf["rope_theta"]}
        compress = {**yarn, "rope_theta": hf["compress_rope_theta"]}
        compress.setdefault("rope_type", compress.pop("type", "default"))
        if compress["rope_type"] == "yarn":
            compress.setdefault("attention_factor", 1.0)
    for label, params in (("main", main), ("compress", compress)):
        f = params.pop("partial_rotary_factor", None)
        if f is not None and abs(float(f) - rotary_factor) > 1e-12:
            raise UnsupportedConfigError(f"{NAME}: rope_parameters[{label!r}] partial_rotary_factor {f} != {rotary_factor}")
    if main.get("rope_type", "default") != "default":
        raise UnsupportedConfigError(f"{NAME}: main rope type {main.get('rope_type')!r} (supported: default)")
    ctype = compress.pop("rope_type", compress.pop("type", "default"))
    theta_c = float(compress.pop("rope_theta"))
    if ctype not in ("default", "yarn"):
        raise UnsupportedConfigError(f"{NAME}: compress rope type {ctype!r} (supported: default, yarn)")
    yarn = tuple(sorted((k, v) for k, v in compress.items() if v is not None)) if ctype == "yarn" else None
    return float(main["rope_theta"]), theta_c, yarn


def translate(hf: dict) -> dict:
    n, d = hf["num_hidden_layers"], hf["head_dim"]
    factor = hf["partial_rotary_factor"]
    if factor is None:
        factor = hf["qk_rope_head_dim"] / d if hf["qk_rope_head_dim"] is not None else 64 / 512
    rotary_dim = int(d * factor)
    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128, **(hf["compress_rates"] or {})}
    if hf["compress_rate_csa"] is not None:
        rates["compressed_sparse_attention"] = hf["compress_rate_csa"]
    if hf["compress_rate_hca"] is not None:
        rates["heavily_compressed_attention"] = hf["compress_rate_hca"]
    mlp_types = hf["mlp_layer_types"]
    if mlp_types is None:
        n_hash = hf["num_hash_layers"] if hf["num_hash_layers"] is not None else 3
        mlp_types = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash)
    mlp_types = list(mlp_types[:n])
    if len(mlp_types) != n or set(mlp_types) - {"hash_moe", "moe"}:
        raise UnsupportedConfigError(f"{NAME}: mlp_layer_types={mlp_types!r} ('hash_moe' / 'moe' for each of {n} layers)")
    main_theta, compress_theta, yarn = _rope(hf, factor)
    return dict(
        n_layers=n, d_model=hf["hidden_size"], d_vocab=hf["vocab_size"], n_heads=hf["num_attention_heads"],
        n_kv_heads=1, d_head=d, n_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"],
        d_expert=hf["moe_intermediate_size"], moe_layers=tuple(range(n)), rms_norm_eps=hf["rms_norm_eps"],
        attention="compressed", q_lora_rank=hf["q_lora_rank"], rope_theta=main_theta, rotary_dim=rotary_dim,
        sliding_window=hf["sliding_window"], attn_sinks=True, o_groups=hf["o_groups"], o_lora_rank=hf["o_lora_rank"],
        compress_kinds=tuple(_KIND[t] for t in _layer_types(hf, n)),
        csa_rate=int(rates["compressed_sparse_attention"]), hca_rate=int(rates["heavily_compressed_attention"]),
        compress_rope_theta=compress_theta, compress_rope_scaling=yarn,
        index_n_heads=hf["index_n_heads"], index_head_dim=hf["index_head_dim"], index_topk=hf["index_topk"],
        hc_mult=hf["hc_mult"], hc_sinkhorn_iters=hf["hc_sinkhorn_iters"], hc_eps=float(hf["hc_eps"]),
        hash_moe_layers=[l for l, t in enumerate(mlp_types) if t == "hash_moe"],
        router_score_func="sqrtsoftplus", router_correction_bias=True, correction_bias_fp32=True, topk_method="greedy", topk_sorted=False,
        norm_topk_prob=True, router_renorm_eps=1e-20, routed_scaling_factor=float(hf["routed_scaling_factor"]),
        norm_weight_fp32=True, norm_keep_fp32=True, expert_act="clamped_silu", swiglu_limit=float(hf["swiglu_limit"]), d_shared=hf["moe_intermediate_size"],
    )


def _rules() -> tuple[KeyRule, ...]:
    """Both layouts, after the ``model.`` prefix is stripped: DeepSeek's names (``attn``, ``ffn``,
    ``wq_a``, ``w1``...) and transformers' in-memory names (``self_attn``, ``mlp``, ``q_a_proj``...)."""
    rules = [
        KeyRule("embed.weight", "embed.W_E"), KeyRule("embed_tokens.weight", "embed.W_E"),
        KeyRule("head.weight", "unembed.w_u"), KeyRule("lm_head.weight", "unembed.w_u"),
        KeyRule("norm.weight", "ln_final.w"),
    ]
    for src, dst in (("hc_fn", "hc_fn"), ("hc_base", "hc_base"), ("hc_scale", "hc_scale")):
        rules += [KeyRule(f"hc_head_{src[3:]}", f"hc_head.{dst}"), KeyRule(f"hc_head.{src}", f"hc_head.{dst}")]
    L = "layers.{L}"
    pairs = [  # (DeepSeek name, transformers name, moelens name) under layers.{L}
        ("attn_norm.weight", "input_layernorm.weight", "ln1.w"),
        ("ffn_norm.weight", "post_attention_layernorm.weight", "ln2.w"),
        ("attn.wq_a.weight", "self_attn.q_a_proj.weight", "attn.w_q_a"),
        ("attn.q_norm.weight", "self_attn.q_a_norm.weight", "attn.q_a_norm_w"),
        ("attn.wq_b.weight", "self_attn.q_b_proj.weight", "attn.w_q_b"),
        ("attn.wkv.weight", "self_attn.kv_proj.weight", "attn.w_kv"),
        ("attn.norm.weight", "self_attn.kv_norm.weight", "attn.kv_norm_w"),
        ("attn.wo_a.weight", "self_attn.o_a_proj.weight", "attn.w_o_a"),
        ("attn.wo_b.weight", "self_attn.o_b_proj.weight", "attn.w_o_b"),
        ("attn.attn_sink", "self_attn.sinks", "attn.sinks"),
        ("attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight", "attn.compressor.w_kv"),
        ("attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight", "attn.compressor.w_gate"),
        ("attn.compressor.ape", "self_attn.compressor.position_bias", "attn.compressor.position_bias"),
        ("attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight", "attn.compressor.kv_norm_w"),
        ("attn.indexer.compressor.wkv.weight", "self_attn.compressor.indexer.kv_proj.weight",
         "attn.compressor.indexer.w_kv"),
        ("attn.indexer.compressor.wgate.weight", "self_attn.compressor.indexer.gate_proj.weight",
         "attn.compressor.indexer.w_gate"),
        ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias",
         "attn.compressor.indexer.position_bias"),
        ("attn.indexer.compressor.norm.weight", "self_attn.compressor.indexer.kv_norm.weight",
         "attn.compressor.indexer.kv_norm_w"),
        ("attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight", "attn.compressor.indexer.w_q"),
        ("attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight",
         "attn.compressor.indexer.w_weights"),
        ("hc_attn_fn", "attn_hc.fn", "attn_hc.fn"), ("hc_attn_base", "attn_hc.base", "attn_hc.base"),
        ("hc_attn_scale", "attn_hc.scale", "attn_hc.scale"), ("hc_ffn_fn", "ffn_hc.fn", "ffn_hc.fn"),
        ("hc_ffn_base", "ffn_hc.base", "ffn_hc.base"), ("hc_ffn_scale", "ffn_hc.scale", "ffn_hc.scale"),
        ("ffn.gate.weight", "mlp.gate.weight", "mlp.router.W_router"),
        ("ffn.gate.bias", "mlp.gate.e_score_correction_bias", "mlp.router.b_correction"),
        ("ffn.gate.tid2eid", "mlp.gate.tid2eid", "mlp.router.tid2eid"),
        ("ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.w_gate"),
        ("ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight", "mlp.shared_experts.w_up"),
        ("ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight", "mlp.shared_experts.w_down"),
    ]
    for ds, tf, ours in pairs:
        rules += [KeyRule(f"{L}.{ds}", f"blocks.{{L}}.{ours}"), KeyRule(f"{L}.{tf}", f"blocks.{{L}}.{ours}")]
    rules += [
        KeyRule(f"{L}.ffn.experts.{{E}}.w1.weight", "blocks.{L}.mlp.experts.w_gate", "expert"),
        KeyRule(f"{L}.ffn.experts.{{E}}.w3.weight", "blocks.{L}.mlp.experts.w_up", "expert"),
        KeyRule(f"{L}.ffn.experts.{{E}}.w2.weight", "blocks.{L}.mlp.experts.w_down", "expert"),
        KeyRule(f"{L}.mlp.experts.gate_up_proj", ("blocks.{L}.mlp.experts.w_gate", "blocks.{L}.mlp.experts.w_up"),
                "split"),
        KeyRule(f"{L}.mlp.experts.down_proj", "blocks.{L}.mlp.experts.w_down"),
    ]
    return tuple(rules)


ARCH = Architecture(
    name=NAME,
    model_type="deepseek_v4",
    translate=translate,
    defaults=DEFAULTS,
    required=REQUIRED,
    ignored=IGNORED,
    aliases={"num_local_experts": "n_routed_experts"},
    key_rules=_rules(),
    hf_config_class="DeepseekV4Config",
    hf_model_class=NAME,
    key_prefixes=(("model.", ""),),
    skip_keys=(r"(model\.)?mtp\..*",),
    skip_note="DeepSeek-V4's multi-token prediction module",
)
