"""The five real-model presets: built on the meta device (no memory), parameter totals equal to
transformers' own model of the same config and to the published sizes, sane active counts."""

from __future__ import annotations

import re

import pytest
import torch

import moelens.architectures as archs
from moelens import preset_models, presets
from moelens.model import HookedMoETransformer

ALL = presets.list_presets()

# active parameters per token quoted in MOE_ARCHITECTURES.md (incl. / excl. embeddings)
DOC_ACTIVE = {
    "mistralai/Mixtral-8x7B-v0.1": (12.88e9, 12.62e9),
    "Qwen/Qwen3-30B-A3B-Base": (3.35e9, 2.73e9),
    "allenai/OLMoE-1B-7B-0924": (1.28e9, 1.08e9),
    "Qwen/Qwen1.5-MoE-A2.7B": (2.69e9, 2.07e9),
    "deepseek-ai/DeepSeek-V2-Lite": (2.66e9, 2.24e9),
    # MOE_ARCHITECTURES_2026.md §9 gives the totals incl. embeddings; the second number is that minus
    # the two (untied) vocab x hidden matrices
    "deepseek-ai/DeepSeek-V3": (37.55e9, 37.55e9 - 2 * 129280 * 7168),
    "moonshotai/Kimi-K2-Instruct": (32.86e9, 32.86e9 - 2 * 163840 * 7168),
    "zai-org/GLM-4.5": (33.63e9, 33.63e9 - 2 * 151552 * 5120),
    "zai-org/GLM-4.5-Air": (13.42e9, 12.18e9),
    "zai-org/GLM-4.7-Flash": (3.90e9, 3.90e9 - 2 * 154880 * 2048),
    # MOE_ARCHITECTURES_2026.md §9 (expert biases count k/E); without both embedding matrices
    "openai/gpt-oss-20b": (4.19e9, 3.03e9),
    "openai/gpt-oss-120b": (5.71e9, 4.55e9),
    "MiniMaxAI/MiniMax-M2": (11.03e9, 11.03e9 - 2 * 200064 * 3072),  # §9
}


def _require_support(name: str) -> None:
    arch = presets.PRESETS[name]["architectures"][0]
    if arch not in archs.ARCHITECTURES:
        pytest.skip(f"{arch} is not registered in moelens.architectures yet (DeepSeek-V2 support is in progress)")


_HF: dict = {}
_ML: dict = {}


def hf_meta(name):
    if name not in _HF:
        _HF[name] = preset_models.transformers_meta_model(name)
    return _HF[name]


def moelens_meta(name):
    if name not in _ML:
        _ML[name] = HookedMoETransformer.from_config(name, device="meta")
    return _ML[name]


def hf_active(model, cfg: dict) -> int:
    """Active parameters per token of a transformers model: routed expert banks
    (``mlp.experts.gate_up_proj`` / ``down_proj`` and gpt-oss's ``*_bias``, shape ``[E, ...]``) count ``k/E``."""
    k = cfg.get("num_experts_per_tok", cfg.get("top_k_experts", cfg.get("moe_k")))  # Gemma 4, ERNIE
    total = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if re.search(r"\.experts\.(gate_up_proj|down_proj)(_bias)?$", name):
            n = n // p.shape[0] * k
        total += n
    return total


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------------------------------ the dicts
def test_names_and_aliases():
    assert ALL[:5] == [
        "mistralai/Mixtral-8x7B-v0.1", "Qwen/Qwen3-30B-A3B-Base", "allenai/OLMoE-1B-7B-0924",
        "Qwen/Qwen1.5-MoE-A2.7B", "deepseek-ai/DeepSeek-V2-Lite",
    ]
    assert presets.list_presets(aliases=True)[:5] == [
        "mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b", "qwen1.5-moe-a2.7b", "deepseek-v2-lite",
    ]
    for alias in ("deepseek-v3", "kimi-k2", "glm-4.5", "glm-4.5-air", "glm-4.7-flash", "qwen3.5-35b-a3b",
                  "deepseek-v3.2-exp", "glm-5", "deepseek-v4-flash",
                  "qwen3.6-35b-a3b", "qwen3-next-80b-a3b",
                  "gpt-oss-20b", "gpt-oss-120b"):
        assert alias in presets.list_presets(aliases=True)
    for alias, hub in presets.ALIASES.items():
        assert presets.get_preset(alias) == presets.get_preset(hub)
    assert presets.get_preset("QWEN3-30B-A3B")["model_type"] == "qwen3_moe"
    assert presets.get_preset("qwen/qwen3-30b-a3b-base")["model_type"] == "qwen3_moe"


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(KeyError) as err:
        presets.get_preset("mixtral-8x22b")
    msg = str(err.value)
    for hub in ALL:
        assert hub in msg
    assert "mixtral-8x7b" in msg


def test_get_preset_returns_a_copy():
    cfg = presets.get_preset("deepseek-v2-lite")
    cfg["rope_scaling"]["factor"] = 1
    cfg["num_hidden_layers"] = 1
    fresh = presets.get_preset("deepseek-v2-lite")
    assert fresh["rope_scaling"]["factor"] == 40 and fresh["num_hidden_layers"] == 27


@pytest.mark.parametrize("name", ALL)
def test_preset_looks_like_a_hub_config(name):
    cfg = presets.get_preset(name)
    info = presets.PRESET_INFO[name]
    assert isinstance(cfg["architectures"], list) and len(cfg["architectures"]) == 1
    assert cfg["model_type"] and isinstance(cfg["tie_word_embeddings"], bool)
    if "rope_parameters" in cfg:  # transformers-5-era hub files (Qwen3.5) nest it (Gemma 4: per layer type)
        rope = cfg["rope_parameters"]
        per_type = rope.values() if "sliding_attention" in rope else [rope]
        assert all("rope_theta" in r for r in per_type) and "rope_theta" not in cfg
    else:  # older hub files use the legacy top-level rope_theta
        assert "rope_theta" in cfg
    assert info["alias"] in presets.ALIASES and presets.ALIASES[info["alias"]] == name
    assert info["notes"] and info["published_params"] > 0
    assert abs(info["exact_params"] - info["published_params"]) / info["published_params"] < _tol(name)


def _tol(name):
    return presets.PRESET_INFO[name].get("published_tolerance", 0.005)


def test_field_names_that_matter():
    q3 = presets.get_preset("qwen3-30b-a3b")
    assert q3["num_experts"] == 128 and "num_local_experts" not in q3
    assert q3["head_dim"] == 128 and q3["norm_topk_prob"] is True and q3["rope_theta"] == 1e6
    mx = presets.get_preset("mixtral-8x7b")
    assert mx["num_local_experts"] == 8 and mx["sliding_window"] is None and mx["rope_theta"] == 1e6
    ol = presets.get_preset("olmoe-1b-7b")
    assert ol["norm_topk_prob"] is False and ol["clip_qkv"] is None and ol["intermediate_size"] == 1024
    q2 = presets.get_preset("qwen1.5-moe-a2.7b")
    assert q2["shared_expert_intermediate_size"] == 5632 and q2["use_sliding_window"] is False
    ds = presets.get_preset("deepseek-v2-lite")
    assert ds["rope_scaling"]["type"] == "yarn" and ds["rope_scaling"]["factor"] == 40
    assert ds["q_lora_rank"] is None and ds["first_k_dense_replace"] == 1 and ds["topk_method"] == "greedy"
    assert "auto_map" not in ds


# ------------------------------------------------------------------------------------------ transformers
@pytest.mark.parametrize("name", ALL)
def test_transformers_meta_model_has_the_published_size(name):
    model = hf_meta(name)
    assert all(p.is_meta for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    info = presets.PRESET_INFO[name]
    assert n == info["exact_params"]
    assert abs(n - info["published_params"]) / info["published_params"] < _tol(name)
    assert type(model).__name__ == presets.PRESETS[name]["architectures"][0]
    assert info["doc_active_params"] > 0


def test_transformers_reads_the_fields_as_intended():
    q3 = hf_meta("Qwen/Qwen3-30B-A3B-Base")
    assert q3.config.head_dim == 128 and q3.config.norm_topk_prob is True
    assert q3.config.rope_parameters["rope_theta"] == 1e6
    assert q3.model.layers[0].self_attn.q_proj.weight.shape == (4096, 2048)
    ds = hf_meta("deepseek-ai/DeepSeek-V2-Lite")
    assert ds.config.rope_parameters["rope_type"] == "yarn"
    assert ds.config.rope_parameters["factor"] == 40


# ------------------------------------------------------------------------------------------ moelens
@pytest.mark.parametrize("name", ALL)
def test_moelens_builds_on_meta_without_memory(name):
    _require_support(name)
    before = _rss_bytes()
    model = moelens_meta(name)
    grown = _rss_bytes() - before
    params = list(model.parameters())
    assert params and all(p.is_meta for p in params)
    assert all(b.is_meta for b in model.buffers())
    assert grown < 300 * 2**20, f"building {name} on meta grew RSS by {grown / 2**20:.0f} MiB"


@pytest.mark.parametrize("name", ALL)
def test_moelens_total_equals_transformers_and_published(name):
    _require_support(name)
    model = moelens_meta(name)
    total = model.n_params()
    info = presets.PRESET_INFO[name]
    assert total == sum(p.numel() for p in hf_meta(name).parameters())
    assert sum(p.numel() for p in model.parameters()) == total  # buffers (a correction bias) are not parameters
    assert total == info["exact_params"]
    assert abs(total - info["published_params"]) / info["published_params"] < _tol(name)


@pytest.mark.parametrize("name", ALL)
def test_active_params(name):
    _require_support(name)
    model = moelens_meta(name)
    cfg = presets.get_preset(name)
    active = model.n_params(active=True)
    active_no_emb = model.n_params(active=True, include_embeddings=False)
    # exactly what the transformers model gives when only k of E routed experts count
    assert active == hf_active(hf_meta(name), cfg)
    # embeddings + unembedding (one matrix when tied) are what separates the two numbers
    n_emb = 1 if cfg["tie_word_embeddings"] else 2
    assert active - active_no_emb == n_emb * cfg["vocab_size"] * cfg["hidden_size"]
    if name in DOC_ACTIVE:
        doc_with, doc_without = DOC_ACTIVE[name]
        assert abs(active - doc_with) / doc_with < 0.005
        assert abs(active_no_emb - doc_without) / doc_without < 0.005
    # sparse models activate a small share; FlexOlmo routes to 5 of its 7 experts
    assert active < model.n_params() * (1 / 3 if model.cfg.top_k / model.cfg.n_experts <= 0.25 else 1)


def test_headline_active_counts():
    for name, lo, hi in [
        ("mixtral-8x7b", 12.8e9, 13.0e9),  # "12.9B active"
        ("qwen3-30b-a3b", 3.3e9, 3.4e9),  # "3.3B activated"
        ("qwen1.5-moe-a2.7b", 2.6e9, 2.8e9),  # "2.7B activated"
        ("olmoe-1b-7b", 1.0e9, 1.3e9),  # "1B active"
        ("qwen3.5-35b-a3b", 3.0e9, 3.5e9),  # "3B activated" (3.45 B with embeddings, 2.44 B without)
        ("qwen3-next-80b-a3b", 3.0e9, 4.0e9),  # "3B activated" (3.87 B with embeddings, 3.25 B without)
    ]:
        hub = presets.resolve_name(name)
        _require_support(hub)
        assert lo < moelens_meta(hub).n_params(active=True) < hi, name


@pytest.mark.parametrize("name", ALL)
def test_preset_summary(name):
    _require_support(name)
    s = preset_models.preset_summary(presets.PRESET_INFO[name]["alias"])
    model = moelens_meta(name)
    assert s["name"] == name and s["architecture"] == presets.PRESETS[name]["architectures"][0]
    assert s["total_params"] == presets.PRESET_INFO[name]["exact_params"]
    assert s["active_params"] == model.n_params(active=True)
    assert s["active_params_no_embeddings"] == model.n_params(active=True, include_embeddings=False)
    assert s["total_params_no_embeddings"] == model.n_params(include_embeddings=False)
    assert s["bytes_bf16"] == 2 * s["total_params"]
    assert s["top_k"] == model.cfg.top_k and s["n_experts"] == model.cfg.n_experts


def test_from_config_accepts_preset_names_and_dicts():
    a = HookedMoETransformer.from_config("olmoe-1b-7b", device="meta")
    b = HookedMoETransformer.from_config(presets.get_preset("allenai/OLMoE-1B-7B-0924"), device="meta")
    assert a.cfg == b.cfg
    assert a.cfg.architecture == "OlmoeForCausalLM" and a.cfg.top_k == 8 and a.cfg.qk_norm == "full"
    bf16 = HookedMoETransformer.from_config("olmoe-1b-7b", device="meta", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_translated_semantics_of_the_presets():
    q3 = moelens_meta("Qwen/Qwen3-30B-A3B-Base").cfg
    assert (q3.d_head, q3.norm_topk_prob, q3.rope_theta, q3.qk_norm) == (128, True, 1e6, "per_head")
    assert q3.moe_layers == list(range(48))
    mx = moelens_meta("mistralai/Mixtral-8x7B-v0.1").cfg
    assert (mx.norm_topk_prob, mx.router_weights_dtype, mx.rope_theta, mx.rms_norm_eps) == (True, "float32", 1e6, 1e-5)
    q2 = moelens_meta("Qwen/Qwen1.5-MoE-A2.7B").cfg
    assert q2.qkv_bias and q2.shared_gate and q2.d_shared == 5632 and not q2.norm_topk_prob
    q35 = moelens_meta("Qwen/Qwen3.5-35B-A3B").cfg
    assert q35.linear_attn_layers == [l for l in range(40) if l % 4 != 3] and q35.rotary_dim == 64
    assert (q35.rope_theta, q35.norm_topk_prob, q35.moe_layers) == (1e7, True, list(range(40)))
    assert (q35.linear_n_k_heads, q35.linear_n_v_heads, q35.linear_d_k, q35.linear_d_v) == (16, 32, 128, 128)
    nx = moelens_meta("Qwen/Qwen3-Next-80B-A3B-Instruct").cfg
    assert nx.linear_attn_layers == [l for l in range(48) if l % 4 != 3] and nx.rotary_dim == 64
    assert (nx.top_k, nx.n_experts, nx.rope_theta, nx.norm_topk_prob) == (10, 512, 1e7, True)
    if "DeepseekV2ForCausalLM" in archs.ARCHITECTURES:
        ds = moelens_meta("deepseek-ai/DeepSeek-V2-Lite").cfg
        assert ds.attention == "mla" and ds.moe_layers == list(range(1, 27)) and ds.yarn["factor"] == 40
    go = moelens_meta("openai/gpt-oss-120b").cfg
    assert go.moe_layers == list(range(36)) and go.n_experts == 128 and go.top_k == 4
    assert go.attention_window(0) == 128 and go.attention_window(1) is None and go.yarn["truncate"] is False
    assert go.router_order == "topk_softmax" and go.expert_act == "clamped_swiglu" and go.attn_sinks


def test_translated_semantics_of_the_v3_family_presets():
    v3 = moelens_meta("deepseek-ai/DeepSeek-V3").cfg
    assert (v3.router_score_func, v3.topk_method, v3.n_group, v3.topk_group) == ("sigmoid", "noaux_tc", 8, 4)
    assert v3.router_correction_bias and v3.rope_deinterleave and v3.moe_layers == list(range(3, 61))
    assert v3.routed_scaling_factor == 2.5 and v3.norm_topk_prob and v3.router_renorm_eps == 1e-20
    kimi = moelens_meta("moonshotai/Kimi-K2-Instruct").cfg
    assert kimi.architecture == "DeepseekV3ForCausalLM" and kimi.n_experts == 384 and kimi.n_group == 1
    air = moelens_meta("zai-org/GLM-4.5-Air").cfg
    assert (air.d_head, air.rotary_dim, air.rope_dim, air.qkv_bias, air.qk_norm) == (128, 64, 64, True, "none")
    glm = moelens_meta("zai-org/GLM-4.5").cfg
    assert glm.qk_norm == "per_head" and glm.moe_layers == list(range(3, 92))
    flash = moelens_meta("zai-org/GLM-4.7-Flash").cfg
    assert flash.attention == "mla" and flash.rotary_dim is None and flash.moe_layers == list(range(1, 47))
    assert moelens_meta("zai-org/GLM-4.7-Flash").blocks[1].attn.scale == pytest.approx(256**-0.5)


def test_translated_semantics_of_the_dsa_presets():
    v32 = moelens_meta("deepseek-ai/DeepSeek-V3.2-Exp").cfg
    assert v32.dsa and (v32.index_n_heads, v32.index_head_dim, v32.index_topk, v32.index_rope) == (64, 128, 2048, "half")
    assert v32.moe_layers == list(range(3, 61)) and v32.yarn["factor"] == 40 and v32.index_shared_layers == []
    glm5 = moelens_meta("zai-org/GLM-5").cfg
    assert glm5.dsa and (glm5.index_n_heads, glm5.index_topk, glm5.index_rope) == (32, 2048, "deinterleave")
    assert glm5.moe_layers == list(range(3, 78)) and glm5.yarn is None and glm5.rope_theta == 1e6
    assert (glm5.qk_nope_head_dim, glm5.v_head_dim, glm5.q_lora_rank) == (192, 256, 2048)
    v4 = moelens_meta("deepseek-ai/DeepSeek-V4-Flash").cfg
    assert v4.compress_kinds == ("none", "none") + ("csa", "hca") * 20 + ("csa",) and v4.hash_moe_layers == [0, 1, 2]
    assert (v4.hc_mult, v4.rotary_dim, v4.top_k, v4.index_topk, v4.sliding_window) == (4, 64, 6, 512, 128)
    assert v4.compress_yarn["factor"] == 16 and v4.compress_yarn["attention_factor"] == 1.0
