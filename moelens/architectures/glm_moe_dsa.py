"""GLM-5 (``GlmMoeDsaForCausalLM``, hub ``model_type`` ``glm_moe_dsa``), as transformers 5.25 computes
it: DeepSeek-V3.2 (:mod:`moelens.architectures.deepseek_v32`) with two differences:

* the indexer's RoPE rotates interleaved pairs and writes them de-interleaved (as MLA's own RoPE),
  not half-split;
* cross-layer index sharing: ``indexer_types[l] == "shared"`` layers run no indexer and reuse the
  top-k of the nearest earlier ``"full"`` layer. Without ``indexer_types`` the pattern comes from
  ``index_topk_pattern`` (``"F"``/``"S"`` per layer) or ``index_topk_freq`` /
  ``index_skip_topk_offset`` (layer ``i`` full iff ``max(i - offset + 1, 0) % freq == 0``), as in
  ``GlmMoeDsaConfig``; the defaults make every layer full.
"""

from moelens.architectures.base import COMMON_RULES, Architecture, UnsupportedConfigError
from moelens.architectures.deepseek_v2 import MLA_RULES
from moelens.architectures.deepseek_v3 import MTP_SKIP_KEYS, V3_MOE_RULES
from moelens.architectures.deepseek_v32 import DEFAULTS as V32_DEFAULTS
from moelens.architectures.deepseek_v32 import DSA_IGNORED, DSA_REQUIRED, INDEXER_RULES, dsa_fields

NAME = "GlmMoeDsaForCausalLM"

# class defaults of transformers 5.25 GlmMoeDsaConfig (checked by instantiating it in the tests)
DEFAULTS = {
    **V32_DEFAULTS,
    "vocab_size": 154880, "hidden_size": 6144, "intermediate_size": 12288, "moe_intermediate_size": 2048,
    "num_hidden_layers": 78, "num_attention_heads": 64, "num_key_value_heads": 64, "n_shared_experts": 1,
    "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 2048,
    "qk_rope_head_dim": 64, "v_head_dim": 256, "qk_nope_head_dim": 192, "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 8, "rms_norm_eps": 1e-5, "index_topk": 2048, "index_head_dim": 128,
    "index_n_heads": 32, "indexer_types": None, "index_topk_pattern": None, "index_topk_freq": 1,
    "index_skip_topk_offset": 2,
}


def indexer_types(hf: dict) -> list[str]:
    """Per-layer ``"full"`` / ``"shared"``, derived as ``GlmMoeDsaConfig.__post_init__`` does."""
    n = hf["num_hidden_layers"]
    types = hf["indexer_types"]
    if types is None:
        pattern = hf["index_topk_pattern"]
        if pattern is not None:
            types = [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(pattern, str) else list(pattern)
        else:
            freq, offset = max(hf["index_topk_freq"] or 1, 1), hf["index_skip_topk_offset"]
            offset = 2 if offset is None else offset
            types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n)]
    if len(types) != n or set(types) - {"full", "shared"} or types[0] != "full":
        raise UnsupportedConfigError(
            f"{NAME}: indexer_types={types!r} must list 'full'/'shared' for each of {n} layers, layer 0 'full'"
        )
    return types


def translate(hf: dict) -> dict:
    shared = [l for l, t in enumerate(indexer_types(hf)) if t == "shared"]
    return dsa_fields(hf, NAME, index_rope="deinterleave", shared_layers=shared)


ARCH = Architecture(
    name=NAME,
    model_type="glm_moe_dsa",
    translate=translate,
    defaults=DEFAULTS,
    # GLM-5's indexer always rotates interleaved pairs in transformers (indexer_rope_interleave is not read)
    required={**DSA_REQUIRED, "indexer_rope_interleave": (True, None)},
    # sliding-window fields some GLM configs carry are not read by transformers' GlmMoeDsa (full attention)
    ignored=DSA_IGNORED | {"use_sliding_window", "sliding_window", "max_window_layers"},
    aliases={"num_local_experts": "n_routed_experts", "num_experts": "n_routed_experts"},
    key_rules=COMMON_RULES + MLA_RULES + INDEXER_RULES + V3_MOE_RULES,
    hf_config_class="GlmMoeDsaConfig",
    hf_model_class=NAME,
    skip_keys=MTP_SKIP_KEYS,
)
