"""MiniMax-M2 vs transformers on tiny sharpened checkpoints saved by transformers.

The tiny config (moelens/testing.py) has every distinctive feature active: the sigmoid router with a
non-zero selection bias (std 0.3, enough to change choices), unsorted top-k, full-width QK RMSNorm with
non-unit weights, and partial RoPE (rotary_dim 16 of head_dim 32).
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
    d, hf = tiny_dirs("minimax_m2", fused=fused)
    model = HookedMoETransformer.from_pretrained(d)
    cfg = model.cfg
    assert (cfg.qk_norm, cfg.rotary_dim, cfg.router_score_func, cfg.topk_sorted) == ("full", 16, "sigmoid", False)
    ids, mask = batch()
    assert_routing_matches(model, hf, ids, mask, TOL)
    with torch.no_grad():
        assert hf(ids).logits.abs().max() > 1.0


def test_weights_are_renormalised_unbiased_sigmoid_scores(tiny_dirs):
    d, _ = tiny_dirs("minimax_m2")
    model = HookedMoETransformer.from_pretrained(d)
    ids, _ = batch(pad=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    for l in model.cfg.moe_layers:
        s = cache[f"blocks.{l}.mlp.hook_router_scores"]
        torch.testing.assert_close(s, torch.sigmoid(cache["router_logits", l].float()), atol=0, rtol=0)
        sel = cache[f"blocks.{l}.mlp.hook_router_selection_scores"]
        torch.testing.assert_close(sel, s + model.blocks[l].mlp.router.b_correction, atol=0, rtol=0)
        w = s.gather(-1, cache["expert_indices", l])
        torch.testing.assert_close(cache["expert_weights", l], w / w.sum(-1, keepdim=True), atol=0, rtol=0)
        assert cache["expert_weights", l].dtype == torch.float32


def test_negative_control_selection_bias(tiny_dirs):
    """Without the correction bias the choices differ from transformers' (the bias, std 0.3, is of the
    order of the sigmoid score gaps by construction)."""
    d, hf = tiny_dirs("minimax_m2")
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


def test_negative_control_partial_rope(tiny_dirs, tiny_copy):
    """Rotating all 32 dims instead of the first 16 moves the logits away from transformers'."""
    _, hf = tiny_dirs("minimax_m2")
    d = tiny_copy("minimax_m2")
    edit_config(d, rotary_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 5e6})
    model = HookedMoETransformer.from_pretrained(d)
    assert model.cfg.rotary_dim is None
    ids, _ = batch(pad=False)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() > 0.05


def test_qk_norm_is_over_all_heads_not_per_head(tiny_dirs):
    """By construction of the full-width norm: q / w has unit RMS over all heads together, while single
    heads do not (a per-head norm would make every head unit-RMS)."""
    d, _ = tiny_dirs("minimax_m2")
    model = HookedMoETransformer.from_pretrained(d)
    ids, _ = batch(pad=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    attn = model.blocks[0].attn
    q = cache["blocks.0.attn.hook_q"].flatten(-2) / attn.q_norm_w  # [batch, pos, heads * d_head]
    rms_all = q.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms_all, torch.ones_like(rms_all), atol=1e-4, rtol=0)
    rms_heads = q.unflatten(-1, (model.cfg.n_heads, -1)).pow(2).mean(-1).sqrt()
    assert (rms_heads - 1).abs().max() > 0.1


def test_bf16_is_bit_identical_to_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    save_tiny("minimax_m2", tmp_path, dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model = HookedMoETransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    # the bias is a buffer in transformers, not kept in fp32: it follows the model dtype there and here
    assert model.blocks[0].mlp.router.b_correction.dtype == hf.model.layers[0].mlp.e_score_correction_bias.dtype
    ids, _ = batch(pad=False)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids))


def test_class_defaults_match_transformers():
    import transformers

    from moelens.architectures.minimax_m2 import DEFAULTS

    hf = transformers.MiniMaxM2Config().to_dict()
    for key, value in DEFAULTS.items():
        if key in ("rope_parameters", "rope_theta", "rope_scaling", "rotary_dim", "partial_rotary_factor",
                   "attn_type_list"):
            continue  # normalised into rope_parameters by __post_init__ / not a class field
        assert hf[key] == value, key


def test_hub_config_fields():
    """The hub file's own fields (attn_type_list, rotary_dim, the router flags) translate or are refused."""
    base = {"architectures": ["MiniMaxM2ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 32, "num_hidden_layers": 2, "num_local_experts": 8,
            "rotary_dim": 8, "attn_type_list": [1, 1], "scoring_func": "sigmoid", "use_routing_bias": True,
            "use_qk_norm": True, "qk_norm_type": "per_layer", "shared_intermediate_size": 0, "use_mtp": True,
            "num_mtp_modules": 3, "mtp_transformer_layers": 1, "rope_theta": 5e6}
    cfg = translate_config(base)
    assert (cfg.rotary_dim, cfg.rope_dim, cfg.rope_theta) == (8, 8, 5e6)
    for field, value in [("attn_type_list", [0, 1]), ("scoring_func", "softmax"), ("use_qk_norm", False),
                         ("qk_norm_type", "per_head"), ("shared_intermediate_size", 64), ("use_routing_bias", False)]:
        with pytest.raises(UnsupportedConfigError, match=field):
            translate_config({**base, field: value})


def test_fp8_block_checkpoint_loads_like_transformers(tmp_path):
    """MiniMax-M2 ships FP8 block-128 weights (experts ``w1/w2/w3`` and attention, each with a
    ``weight_scale_inv``); moelens dequantises them while loading, as transformers' dequantize=True path."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    from moelens.testing import save_fp8_copy

    plain, fp8 = tmp_path / "plain", tmp_path / "fp8"
    save_tiny("minimax_m2", plain)
    keys = save_fp8_copy(plain, fp8, block=(16, 16), pattern=r".*\.(q_proj|k_proj|v_proj|o_proj|w1|w2|w3)\.weight")
    assert any(k.endswith("experts.0.w1.weight") for k in keys) and any("o_proj" in k for k in keys)
    hf = AutoModelForCausalLM.from_pretrained(fp8, quantization_config=FineGrainedFP8Config(dequantize=True)).eval()
    model = HookedMoETransformer.from_pretrained(fp8)
    plain_model = HookedMoETransformer.from_pretrained(plain)
    ids, mask = batch()
    assert_routing_matches(model, hf, ids, mask, TOL)
    with torch.no_grad():  # the dequantised weights are not the unquantised ones
        assert not torch.equal(model.blocks[0].mlp.experts.w_gate, plain_model.blocks[0].mlp.experts.w_gate)
