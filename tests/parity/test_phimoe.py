"""PhiMoE vs transformers (eval mode) on tiny sharpened checkpoints saved by transformers.

The tiny config (moelens/testing.py) has every distinctive feature active: the sparsemixer top-2 router
with a threshold wide enough (2 x 0.25) that each slot's softmax keeps several experts, LayerNorms with
non-zero biases, q/k/v/o and lm_head biases, and LongRoPE (short factors, short / long mscale switching
past 8 positions; the test sequences are longer).
"""

import pytest
import torch

from moelens import HookedMoETransformer
from moelens.architectures import UnsupportedConfigError, translate_config
from moelens.components.router import sparsemixer_weights
from moelens.testing import assert_routing_matches, edit_config, left_padded_batch, save_tiny

TOL = 1e-4


def batch(seed=1, pad=True, n=12):
    return left_padded_batch(seed, pad, n)


@pytest.mark.parametrize("fused", [False, True])
def test_logits_router_experts_and_weights_match(fused, tiny_dirs):
    d, hf = tiny_dirs("phimoe", fused=fused)
    model = HookedMoETransformer.from_pretrained(d)
    cfg = model.cfg
    assert (cfg.norm_type, cfg.router_order, cfg.router_jitter_eps, cfg.unembed_bias) == ("layer", "sparsemixer", 0.25, True)
    assert cfg.yarn["rope_type"] == "longrope"
    for n in (6, 12):  # within and past original_max_position_embeddings (8): short and long mscale
        ids, mask = batch(n=n)
        assert_routing_matches(model, hf, ids, mask, TOL)
    with torch.no_grad():
        assert hf(ids).logits.abs().max() > 1.0


def test_sparsemixer_keeps_several_experts_in_each_softmax(tiny_dirs):
    """The weights are not a plain softmax over the two chosen logits, nor 1: the threshold matters."""
    d, _ = tiny_dirs("phimoe")
    model = HookedMoETransformer.from_pretrained(d)
    ids, _ = batch(pad=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    l = model.cfg.moe_layers[0]
    logits, idx, w = cache["router_logits", l], cache["expert_indices", l], cache["expert_weights", l]
    torch.testing.assert_close(w, sparsemixer_weights(logits, idx, 0.25), atol=0, rtol=0)
    assert (w < 0.99).any() and (w.sum(-1) - 1).abs().max() > 0.01  # not renormalised, not one-hot
    narrow = sparsemixer_weights(logits, idx, 1e-6)  # a threshold that keeps only the chosen expert
    torch.testing.assert_close(narrow, torch.ones_like(narrow))
    assert (w - narrow).abs().max() > 0.05


@pytest.mark.parametrize("change", [{"router_jitter_noise": 1e-6}, {"lm_head_bias": False}])
def test_negative_controls_config(change, tiny_dirs, tiny_copy):
    """The same weights with the sparsemixer threshold ~0 (one-hot slot softmaxes) or without the
    lm_head bias (its tensor then has no parameter to go to: refused) differ from transformers."""
    _, hf = tiny_dirs("phimoe")
    d = tiny_copy("phimoe")
    edit_config(d, **change)
    if "lm_head_bias" in change:
        with pytest.raises(Exception, match="lm_head.bias"):
            HookedMoETransformer.from_pretrained(d)
        return
    model = HookedMoETransformer.from_pretrained(d)
    ids, _ = batch(pad=False)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() > 0.05


def test_negative_control_norm_bias_and_mscale(tiny_dirs):
    d, hf = tiny_dirs("phimoe")
    ids, _ = batch(pad=False)
    model = HookedMoETransformer.from_pretrained(d)
    with torch.no_grad():
        for block in model.blocks:
            block.ln1.b.zero_()
        assert (hf(ids).logits - model(ids)).abs().max() > 0.05
    # the long mscale (1.3) past position 8, the short one (1.1) within: using one for all differs
    rope = dict(model.cfg.rope_scaling)
    rope["long_mscale"] = rope["short_mscale"]
    model = HookedMoETransformer.from_pretrained(d, rope_scaling=tuple(sorted(rope.items())))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() > 0.05
        short = batch(pad=False, n=6)[0]
        assert (hf(short).logits - model(short)).abs().max() < TOL


def test_layernorm_hook_scale_edits(tiny_dirs):
    """LayerNorm's hook_scale is TransformerLens' (sqrt of the centred variance + eps); freezing it to
    its own value changes nothing, doubling it halves the centred part."""
    d, _ = tiny_dirs("phimoe")
    model = HookedMoETransformer.from_pretrained(d)
    ids, _ = batch(pad=False)
    with torch.no_grad():
        base, cache = model.run_with_cache(ids)
        x = cache["resid_pre", 1]
        c = x - x.mean(-1, keepdim=True)
        torch.testing.assert_close(cache["blocks.1.ln1.hook_scale"], (c.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt())
        same = model.run_with_hooks(ids, fwd_hooks=[("blocks.1.ln1.hook_scale", lambda t, hook: t.clone())])
        torch.testing.assert_close(same, base, atol=1e-5, rtol=0)
        out = {}
        model.run_with_hooks(ids, fwd_hooks=[("blocks.1.ln1.hook_scale", lambda t, hook: t * 2),
                                             ("blocks.1.ln1.hook_normalized", lambda t, hook: out.setdefault("n", t))])
        ln = model.blocks[1].ln1
        torch.testing.assert_close(out["n"], c / (2 * cache["blocks.1.ln1.hook_scale"]) * ln.w + ln.b, atol=1e-5, rtol=0)


def test_bf16_is_bit_identical_to_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    save_tiny("phimoe", tmp_path, dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model = HookedMoETransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    # 8 x 64 tokens: bf16 router logits tie often; the slots must break ties as transformers does
    ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids))


def test_class_defaults_match_transformers():
    import transformers

    from moelens.architectures.phimoe import DEFAULTS

    hf = transformers.PhimoeConfig().to_dict()
    for key, value in DEFAULTS.items():
        if key in ("rope_parameters", "rope_theta", "rope_scaling", "original_max_position_embeddings"):
            continue  # normalised into rope_parameters by __post_init__
        assert hf[key] == value, key


@pytest.mark.parametrize("field, value", [("hidden_act", "gelu"), ("num_experts_per_tok", 4),
                                          ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0})])
def test_unsupported_values_raise(field, value):
    with pytest.raises(UnsupportedConfigError, match="rope|" + field):
        translate_config({"architectures": ["PhimoeForCausalLM"], field: value})


def test_sparsemixer_forced_routing_follows_the_rule(tiny_dirs):
    """Forcing experts through hook_expert_indices re-weights them with the same sparsemixer rule."""
    d, _ = tiny_dirs("phimoe")
    model = HookedMoETransformer.from_pretrained(d)
    ids, _ = batch(pad=False)
    forced = torch.tensor([5, 2]).expand(3, 12, 2)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, fwd_hooks=[("blocks.0.mlp.hook_expert_indices", lambda t, hook: forced)])
    w = cache["expert_weights", 0]
    torch.testing.assert_close(w, sparsemixer_weights(cache["router_logits", 0], forced, 0.25), atol=0, rtol=0)


def test_hub_architecture_name_is_read_as_phimoe(tiny_copy):
    """microsoft/Phi-3.5-MoE-instruct's config.json names the remote-code class PhiMoEForCausalLM."""
    d = tiny_copy("phimoe")
    edit_config(d, architectures=["PhiMoEForCausalLM"])
    assert HookedMoETransformer.from_pretrained(d, device="meta").cfg.architecture == "PhimoeForCausalLM"
