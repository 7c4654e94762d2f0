"""Qwen3-Next (``Qwen3NextForCausalLM``, e.g. Qwen/Qwen3-Next-80B-A3B-Instruct): a hybrid of Gated
DeltaNet linear-attention layers and gated full-attention layers (``layer_types``; 3 linear then 1
full), zero-centred ``(1 + w)`` RMSNorms, per-head QK-norm, partial RoPE (``partial_rotary_factor``
0.25), an attention output gate from a doubled ``q_proj``, and the Qwen2-MoE block with its
sigmoid-gated shared expert. The Gated DeltaNet projections are fused per key head
(``in_proj_qkvz``, ``in_proj_ba``) and de-interleaved on load."""

import torch

from moelens.architectures.base import (
    COMMON_RULES, DENSE_MLP_RULES, FUSED_EXPERT_RULES, Architecture, KeyRule, UnsupportedConfigError,
    expert_rules, moe_layers_qwen, rope_dict, rope_settings, shared_expert_rules,
)

DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 48,
    "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256, "rms_norm_eps": 1e-6,
    "num_experts_per_tok": 10, "num_experts": 512, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "layer_types": None, "full_attention_interval": 4, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
    "rope_parameters": None, "rope_theta": None, "rope_scaling": None, "partial_rotary_factor": None,
    "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
}
LAYER_TYPES = ("linear_attention", "full_attention")
# hub text configs carry these; the values moelens (and transformers) implement
HYBRID_REQUIRED = {
    "hidden_act": ("silu",), "attention_bias": (False, None), "attn_output_gate": (True, None),
    "output_gate_type": ("swish", None), "mamba_ssm_dtype": ("float32", None),
}
# multi-token-prediction heads (their weights are skipped) and M-RoPE fields (text positions: plain RoPE)
HYBRID_IGNORED = frozenset({"mtp_num_hidden_layers", "mtp_use_dedicated_embeddings", "mrope_section",
                            "mrope_interleaved"})


def layer_types(hf: dict, arch: str) -> list[str]:
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:
        every = hf.get("full_attention_interval") or 4
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)]
    bad = sorted(set(types) - set(LAYER_TYPES))
    if bad or len(types) != n:
        raise UnsupportedConfigError(
            f"{arch}: layer_types must list {n} entries of {', '.join(LAYER_TYPES)} (got {len(types)}, unknown {bad})"
        )
    return list(types)


def hybrid_settings(hf: dict, arch: str) -> dict:
    """What Qwen3-Next and Qwen3.5-MoE share: hybrid layers, gated attention, partial RoPE, norms."""
    rope = rope_settings(hf, arch)
    n, d, h = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf["head_dim"] or d // h
    params = rope_dict(hf)  # rope_scaling, when present, replaces rope_parameters (as in transformers)
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    factor = 0.25 if factor is None else float(factor)  # the transformers class default
    rotary = int(head_dim * factor)
    types = layer_types(hf, arch)
    return dict(
        n_layers=n, d_model=d, d_vocab=hf["vocab_size"], n_heads=h, n_kv_heads=hf["num_key_value_heads"],
        d_head=head_dim, n_experts=hf["num_experts"], top_k=hf["num_experts_per_tok"],
        d_expert=hf["moe_intermediate_size"], rms_norm_eps=hf["rms_norm_eps"],
        rope_theta=rope["rope_theta"] or 1e4, rotary_dim=None if rotary == head_dim else rotary,
        qk_norm="per_head", norm_zero_centered=True, attn_output_gate=True, router_weights_dtype="model",
        d_shared=hf["shared_expert_intermediate_size"], shared_gate=True,
        linear_attn_layers=[i for i, t in enumerate(types) if t == "linear_attention"],
        linear_n_k_heads=hf["linear_num_key_heads"], linear_n_v_heads=hf["linear_num_value_heads"],
        linear_d_k=hf["linear_key_head_dim"], linear_d_v=hf["linear_value_head_dim"],
        linear_conv_kernel=hf["linear_conv_kernel_dim"],
    )


def translate(hf: dict) -> dict:
    n = hf["num_hidden_layers"]
    return dict(
        hybrid_settings(hf, "Qwen3NextForCausalLM"), d_mlp=hf["intermediate_size"],
        moe_layers=moe_layers_qwen(n, hf["mlp_only_layers"], hf["decoder_sparse_step"], hf["num_experts"]),
        norm_topk_prob=bool(hf["norm_topk_prob"]),
    )


# ---------------------------------------------------------------------------------- key conversions
def split_q_gate(w: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """``q_proj [heads * 2 * d_head, d]`` holds, per head, the query rows then the gate rows."""
    per_head = w.reshape(cfg.n_heads, 2, cfg.d_head, w.shape[-1])
    return per_head[:, 0].reshape(-1, w.shape[-1]), per_head[:, 1].reshape(-1, w.shape[-1])


def squeeze_conv(w: torch.Tensor, cfg) -> tuple[torch.Tensor]:
    """``conv1d.weight [d_conv, 1, kernel]`` -> ``[d_conv, kernel]``."""
    return (w.reshape(w.shape[0], w.shape[-1]),)


def split_qkvz(w: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-Next's fused ``in_proj_qkvz``: per key head ``[q (d_k); k (d_k); v (r*d_v); z (r*d_v)]``
    with ``r = v_heads / k_heads`` -> ``W_qkv = [all q; all k; all v]`` and ``W_z``."""
    nk, dk, dv, r = cfg.linear_n_k_heads, cfg.linear_d_k, cfg.linear_d_v, cfg.linear_n_v_heads // cfg.linear_n_k_heads
    per = w.reshape(nk, 2 * dk + 2 * r * dv, w.shape[-1])
    q, k, v, z = per.split([dk, dk, r * dv, r * dv], dim=1)
    flat = lambda t: t.reshape(-1, w.shape[-1])  # noqa: E731
    return torch.cat([flat(q), flat(k), flat(v)]), flat(z)


def split_ba(w: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-Next's fused ``in_proj_ba``: per key head ``[b (r); a (r)]`` -> ``W_b``, ``W_a``."""
    nk, r = cfg.linear_n_k_heads, cfg.linear_n_v_heads // cfg.linear_n_k_heads
    b, a = w.reshape(nk, 2 * r, w.shape[-1]).split([r, r], dim=1)
    return b.reshape(-1, w.shape[-1]), a.reshape(-1, w.shape[-1])


GATED_ATTN_RULES = (
    KeyRule("model.layers.{L}.self_attn.q_proj.weight", ("blocks.{L}.attn.w_q", "blocks.{L}.attn.W_G"), "convert",
            split_q_gate),
    KeyRule("model.layers.{L}.self_attn.k_proj.weight", "blocks.{L}.attn.w_k"),
    KeyRule("model.layers.{L}.self_attn.v_proj.weight", "blocks.{L}.attn.w_v"),
    KeyRule("model.layers.{L}.self_attn.o_proj.weight", "blocks.{L}.attn.w_o"),
    KeyRule("model.layers.{L}.self_attn.q_norm.weight", "blocks.{L}.attn.q_norm_w"),
    KeyRule("model.layers.{L}.self_attn.k_norm.weight", "blocks.{L}.attn.k_norm_w"),
)

DELTANET_COMMON_RULES = (
    KeyRule("model.layers.{L}.linear_attn.conv1d.weight", ("blocks.{L}.attn.W_conv",), "convert", squeeze_conv),
    KeyRule("model.layers.{L}.linear_attn.dt_bias", "blocks.{L}.attn.dt_bias"),
    KeyRule("model.layers.{L}.linear_attn.A_log", "blocks.{L}.attn.A_log"),
    KeyRule("model.layers.{L}.linear_attn.norm.weight", "blocks.{L}.attn.norm_w"),
    KeyRule("model.layers.{L}.linear_attn.out_proj.weight", "blocks.{L}.attn.w_o"),
)

MOE_RULES = (
    expert_rules("mlp", "gate_proj", "up_proj", "down_proj", "gate") + FUSED_EXPERT_RULES
    + shared_expert_rules("shared_expert")
    + (KeyRule("model.layers.{L}.mlp.shared_expert_gate.weight", "blocks.{L}.mlp.W_shared_gate"),)
)

ARCH = Architecture(
    name="Qwen3NextForCausalLM",
    model_type="qwen3_next",
    translate=translate,
    defaults=DEFAULTS,
    required=HYBRID_REQUIRED,
    ignored=HYBRID_IGNORED,
    key_rules=COMMON_RULES + GATED_ATTN_RULES + DELTANET_COMMON_RULES + (
        KeyRule("model.layers.{L}.linear_attn.in_proj_qkvz.weight", ("blocks.{L}.attn.W_qkv", "blocks.{L}.attn.W_z"),
                "convert", split_qkvz),
        KeyRule("model.layers.{L}.linear_attn.in_proj_ba.weight", ("blocks.{L}.attn.W_b", "blocks.{L}.attn.W_a"),
                "convert", split_ba),
    ) + DENSE_MLP_RULES + MOE_RULES,
    skip_keys=(r"mtp\..*",),
    hf_config_class="Qwen3NextConfig",
    hf_model_class="Qwen3NextForCausalLM",
)
