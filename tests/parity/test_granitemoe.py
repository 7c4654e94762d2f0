"""Granite MoE and GraniteMoeShared vs transformers on tiny sharpened checkpoints saved by transformers.

Every distinctive feature is active in the tiny configs (moelens/testing.py): all four scalar multipliers
away from 1 (attention 0.09, residual 0.6, embedding and logits 1.7 / 0.6 and 3.0 / 2.5), q/k/v/o biases, GQA, the
top-k-of-logits router, and (GraniteMoeShared) the ungated shared MLP with tied embeddings.
"""

import pytest
import torch

from moelens import HookedMoETransformer
from moelens.architectures import UnsupportedConfigError, translate_config
from moelens.testing import TINY_CONFIGS, assert_routing_matches, edit_config, left_padded_batch, save_tiny

ARCHS = ["granitemoe", "granitemoeshared"]
TOL = 1e-4


def batch(seed=1, pad=True):
    return left_padded_batch(seed, pad, pads=((0, 5), (1, 1)))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_router_experts_and_weights_match(arch, fused, tiny_dirs):
    d, hf = tiny_dirs(arch, fused=fused)
    model = HookedMoETransformer.from_pretrained(d)
    cfg = model.cfg
    kw = TINY_CONFIGS[arch][2]
    assert (cfg.embedding_multiplier, cfg.attn_softmax_scale, cfg.residual_multiplier, cfg.logits_scaling) == (
        kw["embedding_multiplier"], kw["attention_multiplier"], kw["residual_multiplier"], kw["logits_scaling"])
    assert all(v != 1.0 for v in (cfg.embedding_multiplier, cfg.attn_softmax_scale, cfg.residual_multiplier, cfg.logits_scaling))
    assert cfg.has_shared_experts == (arch == "granitemoeshared")
    ids, mask = batch()
    # moelens folds the residual multiplier into its combine weights (hook_expert_weights)
    worst = assert_routing_matches(model, hf, ids, mask, TOL, weight_scale=cfg.residual_multiplier)
    assert worst["logits"] < TOL
    with torch.no_grad():
        assert hf(ids).logits.abs().max() > 1.0  # O(1) logits: the comparison is sensitive


@pytest.mark.parametrize("arch", ARCHS)
def test_hooks_are_what_is_added_to_the_residual(arch, tiny_dirs):
    """hook_attn_out / hook_mlp_out include the residual multiplier; the experts still sum to the MoE output."""
    d, _ = tiny_dirs(arch)
    model = HookedMoETransformer.from_pretrained(d)
    ids, _ = batch(pad=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    torch.testing.assert_close(cache["hook_embed"], model.W_E[ids] * model.cfg.embedding_multiplier, atol=0, rtol=0)
    for l in range(model.cfg.n_layers):
        torch.testing.assert_close(cache["resid_mid", l], cache["resid_pre", l] + cache["attn_out", l], atol=0, rtol=0)
        torch.testing.assert_close(cache["resid_post", l], cache["resid_mid", l] + cache["mlp_out", l], atol=0, rtol=0)
        total = sum(cache.expert_contribution(l, e) for e in range(model.cfg.n_experts))
        torch.testing.assert_close(total, cache["routed_out", l], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(cache.routed_plus_shared(l), cache["mlp_out", l], atol=1e-6, rtol=1e-5)
        # the weights are the top-k softmax over the logits, times the residual multiplier (sum = 0.6)
        w = cache["expert_weights", l].sum(-1)
        torch.testing.assert_close(w, torch.full_like(w, 0.6), atol=1e-6, rtol=0)


@pytest.mark.parametrize("field, value", [("embedding_multiplier", 1.0), ("attention_multiplier", 1.0),
                                          ("residual_multiplier", 1.0), ("logits_scaling", 1.0)])
def test_each_multiplier_matters(field, value, tiny_dirs, tiny_copy):
    """Negative control: loading the same weights with one multiplier at its class default (1.0) moves the
    logits far from transformers' (each multiplier is a factor >= 1.6 away from 1)."""
    _, hf = tiny_dirs("granitemoe")
    d = tiny_copy("granitemoe")
    edit_config(d, **{field: value})
    model = HookedMoETransformer.from_pretrained(d)
    ids, _ = batch(pad=False)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() > 0.05


def test_shared_expert_matters(tiny_dirs):
    d, hf = tiny_dirs("granitemoeshared")
    model = HookedMoETransformer.from_pretrained(d)
    ids, _ = batch(pad=False)
    with torch.no_grad():
        for l in model.cfg.moe_layers:
            model.blocks[l].mlp.shared_experts.w_down.zero_()
        assert (hf(ids).logits - model(ids)).abs().max() > 0.05


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_follows_transformers(arch, tmp_path):
    """bf16 agrees closely but not bit for bit: moelens multiplies the combine weights by the residual
    multiplier (so that the experts' contributions sum to hook_mlp_out), transformers multiplies the
    rounded MoE output."""
    from transformers import AutoModelForCausalLM

    save_tiny(arch, tmp_path, dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model = HookedMoETransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids, _ = batch(pad=False)
    with torch.no_grad():
        theirs, ours = hf(ids).logits.float(), model(ids).float()
    assert (theirs - ours).abs().max() < 0.3
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9


def test_class_defaults_match_transformers():
    import transformers

    from moelens.architectures.granitemoe import DEFAULTS, SHARED_DEFAULTS

    for cls, defaults in (("GraniteMoeConfig", DEFAULTS), ("GraniteMoeSharedConfig", SHARED_DEFAULTS)):
        hf = getattr(transformers, cls)().to_dict()
        for key, value in defaults.items():
            if key in ("rope_parameters", "rope_theta", "rope_scaling", "num_key_value_heads"):
                continue  # normalised by __post_init__
            assert hf[key] == value, (cls, key)


@pytest.mark.parametrize("field, value", [("hidden_act", "gelu"), ("head_dim", 32), ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0})])
def test_unsupported_fields_raise_naming_them(field, value):
    cfg = {"architectures": ["GraniteMoeForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, field: value}
    with pytest.raises(UnsupportedConfigError, match="rope|" + field):
        translate_config(cfg)


def test_residual_multiplier_refused_where_not_implemented():
    cfg = translate_config({"architectures": ["GraniteMoeForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
                            "num_hidden_layers": 2, "residual_multiplier": 0.5})
    with pytest.raises(ValueError, match="residual_multiplier"):
        cfg.replace(moe_layers=[1])


def test_hook_names(tiny_dirs):
    for arch, shared in (("granitemoe", False), ("granitemoeshared", True)):
        d, _ = tiny_dirs(arch)
        names = set(HookedMoETransformer.from_pretrained(d, device="meta").hook_dict)
        assert ("blocks.0.mlp.hook_shared_out" in names) == shared
        assert "blocks.0.mlp.hook_router_selection_scores" not in names  # no correction bias
        assert {"blocks.2.mlp.hook_expert_weights", "blocks.2.hook_attn_out", "hook_embed"} <= names


def test_noise_reference_is_the_multiplied_embedding(tiny_dirs):
    """The tracing noise is added at hook_embed, after Granite's embedding_multiplier (1.7 in the tiny
    config): its reference std is taken there too, so the noise keeps its size relative to the embeddings."""
    from moelens.tracing.trace import embedding_std

    d, _ = tiny_dirs("granitemoe")
    model = HookedMoETransformer.from_pretrained(d)
    raw = float(model.W_E.detach().float().std())
    assert model.cfg.embedding_multiplier == pytest.approx(1.7)
    assert embedding_std(model) == pytest.approx(1.7 * raw, rel=1e-6)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.arange(3, 40)[None], names_filter="hook_embed")
    assert float(cache["hook_embed"].std()) == pytest.approx(embedding_std(model), rel=0.3)
