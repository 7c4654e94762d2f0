"""Golden, ordered hook-name lists per architecture (hook names are API: keep them stable)."""

import pytest

from moelens import HookedMoETransformer
from moelens.testing import tiny_hf_config

ATTN = ["attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
        "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z"]
ROUTED = ["mlp.hook_router_logits", "mlp.hook_router_scores", "mlp.hook_expert_indices",
          "mlp.hook_expert_weights", "mlp.hook_expert_out", "mlp.hook_routed_out"]
SPARSE = ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", *ATTN, "hook_attn_out", "hook_resid_mid",
          "ln2.hook_scale", "ln2.hook_normalized", *ROUTED, "hook_mlp_out", "hook_resid_post"]
DENSE = ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", *ATTN, "hook_attn_out", "hook_resid_mid",
         "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post"]
SHARED_GATED = ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", *ATTN, "hook_attn_out", "hook_resid_mid",
                "ln2.hook_scale", "ln2.hook_normalized", *ROUTED, "mlp.shared_experts.hook_pre", "mlp.shared_experts.hook_post",
                "mlp.hook_shared_gate", "mlp.hook_shared_out", "hook_mlp_out", "hook_resid_post"]
GATED_ATTN = [*ATTN, "attn.hook_attn_gate"]
DELTANET = ["attn.hook_conv_in", "attn.hook_conv_out", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_beta",
            "attn.hook_decay", "attn.hook_state", "attn.hook_delta_out", "attn.hook_gate", "attn.hook_gated_out"]
SHARED = ["mlp.shared_experts.hook_pre", "mlp.shared_experts.hook_post", "mlp.hook_shared_gate", "mlp.hook_shared_out"]


def hybrid(mixer, mlp):
    return ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", *mixer, "hook_attn_out", "hook_resid_mid",
            "ln2.hook_scale", "ln2.hook_normalized", *mlp, "hook_mlp_out", "hook_resid_post"]

ATTN_SINKS = ["attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
              "attn.hook_attn_scores", "attn.hook_sink_weight", "attn.hook_pattern", "attn.hook_z"]
SPARSE_SINKS = ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", *ATTN_SINKS, "hook_attn_out",
                "hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized", *ROUTED, "hook_mlp_out", "hook_resid_post"]


def expand(layers):
    names = ["hook_embed"]
    for l, layer_names in enumerate(layers):
        names += [f"blocks.{l}.{n}" for n in layer_names]
    return names + ["ln_final.hook_scale", "ln_final.hook_normalized", "unembed.hook_in", "unembed.hook_out"]


GOLDEN = {
    "mixtral": expand([SPARSE, SPARSE]),
    "olmoe": expand([SPARSE, SPARSE]),
    "qwen3_moe": expand([DENSE, SPARSE, SPARSE]),
    "qwen2_moe": expand([DENSE, SHARED_GATED, SHARED_GATED]),
    "gpt_oss": expand([SPARSE_SINKS] * 4),
    # layer types [linear, full, linear, linear], layer 2 dense (mlp_only_layers)
    "qwen3_next": expand([hybrid(DELTANET, ROUTED + SHARED), hybrid(GATED_ATTN, ROUTED + SHARED),
                          hybrid(DELTANET, ["mlp.hook_pre", "mlp.hook_post"]), hybrid(DELTANET, ROUTED + SHARED)]),
    "qwen3_5_moe": expand([hybrid(DELTANET, ROUTED + SHARED)] * 3 + [hybrid(GATED_ATTN, ROUTED + SHARED)]),
}
ARCH_NAMES = {"mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
              "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_next": "Qwen3NextForCausalLM",
              "qwen3_5_moe": "Qwen3_5MoeForCausalLM", "gpt_oss": "GptOssForCausalLM"}


@pytest.mark.parametrize("arch", sorted(GOLDEN))
def test_ordered_hook_names(arch):
    cfg = tiny_hf_config(arch).to_dict()
    cfg["architectures"] = [ARCH_NAMES[arch]]
    model = HookedMoETransformer.from_config(cfg, device="meta")
    assert list(model.hook_dict) == GOLDEN[arch]


def test_hook_shapes_are_declared():
    cfg = tiny_hf_config("mixtral").to_dict()
    cfg["architectures"] = ["MixtralForCausalLM"]
    model = HookedMoETransformer.from_config(cfg, device="meta")
    dims = {name: hp.dims for name, hp in model.hook_dict.items()}
    assert dims["blocks.0.mlp.hook_expert_out"] == "batch pos top_k d_model"
    assert dims["blocks.0.mlp.hook_expert_indices"] == "batch pos top_k"
    assert model.hook_dict["blocks.0.mlp.hook_expert_indices"].kind == "int"
    assert dims["blocks.0.attn.hook_pattern"] == "batch head query_pos key_pos"
    assert all(d.split()[0] == "batch" for d in dims.values())


def test_hybrid_hook_shapes_are_declared():
    cfg = tiny_hf_config("qwen3_5_moe").to_dict()
    model = HookedMoETransformer.from_config(cfg, device="meta")
    dims = {name: hp.dims for name, hp in model.hook_dict.items()}
    assert dims["blocks.0.attn.hook_state"] == "batch pos v_head d_k d_v"
    assert dims["blocks.0.attn.hook_q"] == "batch pos k_head d_k"
    assert dims["blocks.0.attn.hook_decay"] == "batch pos v_head"
    assert dims["blocks.3.attn.hook_attn_gate"] == "batch pos head d_head"


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v2_lite", "deepseek_v2_full",
                                  "deepseek_v3", "glm4_moe", "glm4_moe_lite", "qwen3_next", "qwen3_5_moe", "gpt_oss", "granitemoe", "granitemoeshared", "minimax_m2", "ernie4_5_moe", "phimoe", "deepseek_v32", "glm_moe_dsa", "deepseek_v4"])
def test_from_config_accepts_transformers_config_objects(name):
    import torch
    import transformers

    hf_cfg = tiny_hf_config(name)
    model = HookedMoETransformer.from_config(hf_cfg, seed=0)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    assert model.n_params() == sum(p.numel() for p in hf.parameters())
    assert model(torch.randint(0, 256, (1, 5))).shape == (1, 5, 256)


# DeepSeek-V3 router family: the biased selection scores sit between the scores and the indices
MLA_ATTN = ["attn.hook_q_latent", "attn.hook_q", "attn.hook_kv_latent", "attn.hook_k_pe", "attn.hook_k",
            "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern",
            "attn.hook_z"]
V3_ROUTED = ["mlp.hook_router_logits", "mlp.hook_router_scores", "mlp.hook_router_selection_scores",
             "mlp.hook_expert_indices", "mlp.hook_expert_weights", "mlp.hook_expert_out", "mlp.hook_routed_out",
             "mlp.shared_experts.hook_pre", "mlp.shared_experts.hook_post", "mlp.hook_shared_out"]

# DeepSeek Sparse Attention: the indexer's hooks and the kept keys sit between RoPE and the scores;
# a GLM-5 shared-indexer layer has no indexer, only the kept keys it reuses
DSA_ATTN = MLA_ATTN[:8] + ["attn.indexer.hook_q", "attn.indexer.hook_k", "attn.indexer.hook_weights",
                           "attn.indexer.hook_scores", "attn.hook_index_topk"] + MLA_ATTN[8:]
DSA_SHARED_ATTN = MLA_ATTN[:8] + ["attn.hook_index_topk"] + MLA_ATTN[8:]


def _layer(attn, mlp):
    return ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", *attn, "hook_attn_out", "hook_resid_mid",
            "ln2.hook_scale", "ln2.hook_normalized", *mlp, "hook_mlp_out", "hook_resid_post"]


V3_GOLDEN = {
    "deepseek_v3": expand([_layer(MLA_ATTN, ["mlp.hook_pre", "mlp.hook_post"])] + [_layer(MLA_ATTN, V3_ROUTED)] * 2),
    "glm4_moe_lite": expand([_layer(MLA_ATTN, ["mlp.hook_pre", "mlp.hook_post"])] + [_layer(MLA_ATTN, V3_ROUTED)] * 2),
    "glm4_moe": expand([_layer(ATTN, ["mlp.hook_pre", "mlp.hook_post"])] + [_layer(ATTN, V3_ROUTED)] * 2),
    "deepseek_v32": expand([_layer(DSA_ATTN, ["mlp.hook_pre", "mlp.hook_post"])] + [_layer(DSA_ATTN, V3_ROUTED)] * 2),
    "glm_moe_dsa": expand([_layer(DSA_ATTN, ["mlp.hook_pre", "mlp.hook_post"]), _layer(DSA_ATTN, V3_ROUTED),
                           _layer(DSA_SHARED_ATTN, V3_ROUTED), _layer(DSA_ATTN, V3_ROUTED)]),
}


@pytest.mark.parametrize("name", sorted(V3_GOLDEN))
def test_ordered_hook_names_v3_family(name):
    from moelens.testing import TINY_CONFIGS

    cfg = tiny_hf_config(name).to_dict()
    cfg["architectures"] = [TINY_CONFIGS[name][1]]
    model = HookedMoETransformer.from_config(cfg, device="meta")
    assert list(model.hook_dict) == V3_GOLDEN[name]
    assert model.hook_dict["blocks.1.mlp.hook_router_selection_scores"].dims == "batch pos n_experts"


def test_selection_scores_hook_only_where_there_is_a_correction_bias():
    cfg = tiny_hf_config("deepseek_v2_full").to_dict()
    cfg["architectures"] = ["DeepseekV2ForCausalLM"]
    model = HookedMoETransformer.from_config(cfg, device="meta")
    assert not [n for n in model.hook_dict if "selection" in n]
