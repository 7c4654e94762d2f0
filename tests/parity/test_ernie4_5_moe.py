"""ERNIE-4.5-MoE vs transformers on tiny sharpened checkpoints saved by transformers.

The tiny config (moelens/testing.py) has every distinctive feature active: sparse layers 1..2 only
(``moe_layer_start_index`` / ``moe_layer_end_index``; layers 0 and 3 dense), two shared experts, the fp32
softmax router with a non-zero selection bias (``moe_statics.e_score_correction_bias [1, E]``), and
interleaved RoPE rotated in fp32.
"""

import pytest
import torch

from moelens import HookedMoETransformer
from moelens.architectures import UnsupportedConfigError, translate_config
from moelens.testing import assert_routing_matches, edit_config, hf_routing, left_padded_batch, save_tiny

TOL = 1e-4


def batch(seed=1, pad=True):
    return left_padded_batch(seed, pad)


@pytest.mark.parametrize("fused", [False, True])
def test_logits_router_experts_and_weights_match(fused, tiny_dirs):
    d, hf = tiny_dirs("ernie4_5_moe", fused=fused)
    model = HookedMoETransformer.from_pretrained(d)
    cfg = model.cfg
    assert cfg.moe_layers == [1, 2] and cfg.dense_layers == [0, 3]
    assert cfg.has_shared_experts and cfg.d_shared == 64 and cfg.rope_interleaved
    ids, mask = batch()
    assert_routing_matches(model, hf, ids, mask, TOL)
    with torch.no_grad():
        assert hf(ids).logits.abs().max() > 1.0


def test_router_semantics(tiny_dirs):
    d, _ = tiny_dirs("ernie4_5_moe")
    model = HookedMoETransformer.from_pretrained(d)
    ids, _ = batch(pad=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    for l in model.cfg.moe_layers:
        s = cache[f"blocks.{l}.mlp.hook_router_scores"]
        torch.testing.assert_close(s, torch.softmax(cache["router_logits", l].float(), -1), atol=0, rtol=0)
        sel = cache[f"blocks.{l}.mlp.hook_router_selection_scores"]
        torch.testing.assert_close(sel, s + model.blocks[l].mlp.router.b_correction, atol=0, rtol=0)
        idx = cache["expert_indices", l]
        torch.testing.assert_close(idx, sel.topk(3, -1).indices, atol=0, rtol=0)  # sorted top-k of s + bias
        w = s.gather(-1, idx)
        torch.testing.assert_close(cache["expert_weights", l], w / w.sum(-1, keepdim=True), atol=0, rtol=0)


def test_renormalisation_clamps_the_sum_at_moe_norm_min(tiny_dirs):
    """transformers divides by clamp(sum, min=moe_norm_min): scores summing below it are not renormalised."""
    d, _ = tiny_dirs("ernie4_5_moe")
    router = HookedMoETransformer.from_pretrained(d).blocks[1].mlp.router
    scores = torch.full((1, 1, 8), 1e-14)
    idx = torch.tensor([[[0, 1, 2]]])
    torch.testing.assert_close(router.weights(scores, idx, torch.float32), torch.full((1, 1, 3), 1e-14 / 1e-12))
    scores = torch.full((1, 1, 8), 0.1)
    torch.testing.assert_close(router.weights(scores, idx, torch.float32), torch.full((1, 1, 3), 1 / 3))


def test_negative_control_selection_bias(tiny_dirs):
    d, hf = tiny_dirs("ernie4_5_moe")
    model = HookedMoETransformer.from_pretrained(d)
    ids, _ = batch(pad=False)
    _, layers = hf_routing(hf, ids)
    with torch.no_grad():
        for l in model.cfg.moe_layers:
            model.blocks[l].mlp.router.b_correction.zero_()
        _, cache = model.run_with_cache(ids)
    changed = sum(int((cache["expert_indices", l].sort(-1).values != r[2].sort(-1).values).any(-1).sum())
                  for r, l in zip(layers, model.cfg.moe_layers))
    assert changed > 5


def test_negative_control_half_split_rope(tiny_dirs):
    """The same weights with the half-split rotation instead of ERNIE's interleaved pairs differ."""
    d, hf = tiny_dirs("ernie4_5_moe")
    cfg = translate_config(__import__("json").loads((d / "config.json").read_text()))
    model = HookedMoETransformer.from_pretrained(d, rope_interleaved=False)
    assert cfg.rope_interleaved and not model.cfg.rope_interleaved
    ids, _ = batch(pad=False)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() > 0.05


def test_sparse_layer_range_is_read(tiny_copy):
    """moe_layer_end_index=-1 makes layer 3 sparse too: the checkpoint's dense layer 3 no longer fits."""
    import moelens

    d = tiny_copy("ernie4_5_moe")
    edit_config(d, moe_layer_end_index=-1)
    with pytest.raises(moelens.loading.CheckpointError, match="blocks.3.mlp"):
        HookedMoETransformer.from_pretrained(d)
    assert translate_config({"architectures": ["Ernie4_5_MoeForCausalLM"], "num_hidden_layers": 8,
                             "moe_layer_start_index": 2, "moe_layer_interval": 2}).moe_layers == [3, 5, 7]


def test_bf16_is_bit_identical_and_router_stays_fp32(tmp_path):
    from transformers import AutoModelForCausalLM

    save_tiny("ernie4_5_moe", tmp_path, dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model = HookedMoETransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for l in model.cfg.moe_layers:
        router, gate = model.blocks[l].mlp.router, hf.model.layers[l].mlp.gate
        assert router.W_router.dtype == router.b_correction.dtype == gate.weight.dtype == torch.float32
        assert torch.equal(router.b_correction, gate.moe_statics.e_score_correction_bias.reshape(-1))
    assert model.blocks[0].attn.w_o.dtype == torch.bfloat16
    ids, _ = batch(pad=False)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids))


def test_mtp_tensors_are_skipped(tmp_path):
    """ERNIE checkpoints carry multi-token-prediction tensors (``mtp*``), which transformers ignores."""
    from safetensors.torch import load_file, save_file

    hf = save_tiny("ernie4_5_moe", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.mtp_linear_proj.0.weight"] = torch.zeros(64, 128)
    tensors["model.mtp_emb_norm.0.weight"] = torch.ones(64)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = HookedMoETransformer.from_pretrained(tmp_path)
    ids, _ = batch(pad=False)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() < TOL


def test_class_defaults_match_transformers():
    import transformers

    from moelens.architectures.ernie4_5_moe import DEFAULTS

    hf = transformers.Ernie4_5_MoeConfig().to_dict()
    for key, value in DEFAULTS.items():
        if key in ("rope_parameters", "rope_theta", "rope_scaling", "head_dim", "moe_layer_end_index"):
            continue  # normalised by __post_init__ (end index -1 -> the last layer)
        assert hf[key] == value, key
    assert translate_config(hf).moe_layers == list(range(1, 28))


@pytest.mark.parametrize("field, value", [("hidden_act", "gelu"), ("use_rmsnorm", False), ("use_bias", True)])
def test_unsupported_values_raise_naming_the_field(field, value):
    with pytest.raises(UnsupportedConfigError, match=field):
        translate_config({"architectures": ["Ernie4_5_MoeForCausalLM"], field: value})


def test_hook_names_of_dense_and_sparse_layers(tiny_dirs):
    d, _ = tiny_dirs("ernie4_5_moe")
    names = list(HookedMoETransformer.from_pretrained(d, device="meta").hook_dict)
    layer = [n.split(".", 2)[2] for n in names if n.startswith("blocks.1.")]
    assert layer[layer.index("mlp.hook_router_logits"):layer.index("hook_mlp_out")] == [
        "mlp.hook_router_logits", "mlp.hook_router_scores", "mlp.hook_router_selection_scores",
        "mlp.hook_expert_indices", "mlp.hook_expert_weights", "mlp.hook_expert_out", "mlp.hook_routed_out",
        "mlp.shared_experts.hook_pre", "mlp.shared_experts.hook_post", "mlp.hook_shared_out"]
    dense = [n.split(".", 2)[2] for n in names if n.startswith("blocks.3.")]
    assert "mlp.hook_pre" in dense and not any("router" in n for n in dense)
