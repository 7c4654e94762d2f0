"""DeepSeek-V3.2 (``DeepseekV32ForCausalLM``, hub ``model_type`` ``deepseek_v32``), as transformers 5.25
computes it: DeepSeek-V3 (MLA with interleaved RoPE written de-interleaved, YaRN, the sigmoid /
noaux_tc router, one ungated shared expert) plus DeepSeek Sparse Attention in every layer
(:mod:`moelens.components.dsa`): a lightning indexer of ``index_n_heads`` heads of width
``index_head_dim`` (half-split RoPE on its first ``qk_rope_head_dim`` dims) keeps the top
``index_topk`` keys of every query. Dense layers come from ``mlp_layer_types`` (default: the first
``first_k_dense_replace`` dense). ``q_lora_rank`` is required (the indexer reads MLA's q latent);
``rope_interleave`` does not exist (always interleaved). The multi-token-prediction layer is skipped.
"""

from moelens.architectures.base import COMMON_RULES, Architecture, KeyRule, UnsupportedConfigError, rope_settings
from moelens.architectures.deepseek_v2 import MLA_RULES
from moelens.architectures.deepseek_v3 import MTP_SKIP_KEYS, V3_MOE_RULES, V3_REQUIRED, mla_fields, v3_moe_fields

NAME = "DeepseekV32ForCausalLM"

# class defaults of transformers 5.25 DeepseekV32Config (checked by instantiating it in the tests)
DEFAULTS = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "pad_token_id": None,
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "rope_parameters": None,
    "rope_theta": None, "rope_scaling": None, "mlp_layer_types": None, "first_k_dense_replace": 3,
    "index_topk": 2048, "index_head_dim": 128, "index_n_heads": 64, "layer_types": None,
}

# transformers' DSA attention always rotates MLA's RoPE pairs interleaved (the config class has no
# rope_interleave), so a checkpoint that says otherwise is another model
DSA_REQUIRED = REQUIRED = {**V3_REQUIRED, "mlp_bias": (False, None), "rope_interleave": (True, None)}

DSA_IGNORED = IGNORED = frozenset({
    "num_nextn_predict_layers", "num_mtp_layers",  # MTP layers: skipped on load (skip_keys)
    "head_dim",  # set to qk_rope_head_dim by the config's __post_init__
    "qk_head_dim",  # derived: qk_nope_head_dim + qk_rope_head_dim
    "quantization_config",  # read by the loader (moelens.quant), not by the forward
    "moe_layer_freq", "aux_loss_alpha", "seq_aux", "max_position_embeddings", "attention_dropout",
})

# the indexer's weights (hub names) -> moelens parameters
INDEXER_RULES = (
    KeyRule("model.layers.{L}.self_attn.indexer.wq_b.weight", "blocks.{L}.attn.indexer.w_q"),
    KeyRule("model.layers.{L}.self_attn.indexer.wk.weight", "blocks.{L}.attn.indexer.w_k"),
    KeyRule("model.layers.{L}.self_attn.indexer.k_norm.weight", "blocks.{L}.attn.indexer.k_norm_w"),
    KeyRule("model.layers.{L}.self_attn.indexer.k_norm.bias", "blocks.{L}.attn.indexer.b_k_norm"),
    KeyRule("model.layers.{L}.self_attn.indexer.weights_proj.weight", "blocks.{L}.attn.indexer.w_weights"),
)


def dsa_fields(hf: dict, arch: str, index_rope: str, shared_layers=()) -> dict:
    """MoEConfig fields of a DeepSeek-V3.2-style model (V3 MoE + MLA + the indexer)."""
    n = hf["num_hidden_layers"]
    types = hf["mlp_layer_types"]
    if types is None:
        n_dense = min(hf["first_k_dense_replace"] or 0, n)
        types = ["dense"] * n_dense + ["sparse"] * (n - n_dense)
    if len(types) != n or set(types) - {"dense", "sparse"}:
        raise UnsupportedConfigError(f"{arch}: mlp_layer_types must list 'dense'/'sparse' for each of {n} layers")
    layer_types = hf["layer_types"]
    if layer_types is not None and (len(layer_types) != n or set(layer_types) != {"indexed_attention"}):
        raise UnsupportedConfigError(
            f"{arch}: layer_types={layer_types!r}; moelens implements 'indexed_attention' (DSA) in all {n} layers"
        )
    if not hf["q_lora_rank"]:
        raise UnsupportedConfigError(f"{arch}: q_lora_rank is required (the indexer reads MLA's query latent)")
    if hf["index_head_dim"] < hf["qk_rope_head_dim"]:
        raise UnsupportedConfigError(
            f"{arch}: index_head_dim={hf['index_head_dim']} < qk_rope_head_dim={hf['qk_rope_head_dim']}"
        )
    rope = rope_settings(hf, arch, allow_yarn=True)
    return dict(
        **v3_moe_fields(hf, arch, [l for l, t in enumerate(types) if t == "sparse"]),
        **mla_fields({**hf, "rope_interleave": True}, arch, rope),
        dsa=True, index_n_heads=hf["index_n_heads"], index_head_dim=hf["index_head_dim"],
        index_topk=hf["index_topk"], index_rope=index_rope, index_shared_layers=list(shared_layers),
    )


def translate(hf: dict) -> dict:
    return dsa_fields(hf, NAME, index_rope="half")


ARCH = Architecture(
    name=NAME,
    model_type="deepseek_v32",
    translate=translate,
    defaults=DEFAULTS,
    required=REQUIRED,
    ignored=IGNORED,
    aliases={"num_local_experts": "n_routed_experts", "num_experts": "n_routed_experts"},
    key_rules=COMMON_RULES + MLA_RULES + INDEXER_RULES + V3_MOE_RULES,
    hf_config_class="DeepseekV32Config",
    hf_model_class=NAME,
    skip_keys=MTP_SKIP_KEYS,
)
