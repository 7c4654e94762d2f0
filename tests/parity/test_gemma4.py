"""Gemma 4 (text MoE) vs transformers on tiny sharpened checkpoints saved by transformers itself.

The tiny config (moelens.testing.TINY_CONFIGS["gemma4"]) alternates sliding (window 4, head 16, 2 kv
heads, θ 1e4) and full-attention layers (head 32, 1 kv head, K = V, proportional RoPE on half the
frequencies, θ 1e6); every layer runs a GELU-tanh dense MLP in parallel with a top-2-of-8 MoE, with
sandwich norms, a router on the residual stream with its own norm and per-expert scales, a layer
scalar, scaled embeddings and a logit soft-cap. Sequences are longer than the window. Negative
controls show each feature matters.
"""

import math

import pytest
import torch

from moelens import HookedMoETransformer, check_shapes
from moelens.components.moe import MoE
from moelens.testing import hf_forward, random_ids

TOL = 1e-4
WINDOW = 4

ids_of, hf_run = random_ids, hf_forward






def assert_parity(model, hf, ids, mask=None, tol=TOL):
    """transformers records Gemma 4's router *probabilities* as router_logits: compared with
    hook_router_scores, and our hook_router_logits with their log-softmax."""
    out = hf_run(hf, ids, mask)
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, attention_mask=mask)
    real = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
    assert (out.logits - logits)[real].abs().max() < tol
    b, p = ids.shape
    for layer in model.cfg.moe_layers:
        probs = out.router_logits[layer].view(b, p, -1)
        assert (cache[f"blocks.{layer}.mlp.hook_router_scores"] - probs)[real].abs().max() < tol
        ours = cache[f"blocks.{layer}.mlp.hook_router_logits"].log_softmax(-1)
        assert (ours - probs.log())[real].abs().max() < tol
        chosen = cache[f"blocks.{layer}.mlp.hook_expert_indices"]
        assert torch.equal(chosen[real], torch.topk(probs, model.cfg.top_k, dim=-1).indices[real])
    return out, logits, cache


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    d, hf = tiny_dirs("gemma4")
    return d, hf, HookedMoETransformer.from_pretrained(d)


def test_config_translation(tiny):
    _, _, model = tiny
    cfg = model.cfg
    assert cfg.architecture == "Gemma4ForCausalLM" and cfg.moe_layers == [0, 1, 2, 3] and cfg.d_mlp == 96
    assert cfg.layer_types == ("sliding_attention", "full_attention") * 2 and cfg.sliding_window == WINDOW
    assert [cfg.layer_d_head(l) for l in range(4)] == [16, 32, 16, 32]
    assert [cfg.layer_n_kv_heads(l) for l in range(4)] == [2, 1, 2, 1]
    assert cfg.full_attn_k_eq_v and model.blocks[1].attn.w_v is None and model.blocks[0].attn.w_v is not None
    assert cfg.rope_theta == 1e4 and cfg.rope_theta_full == 1e6 and cfg.rope_proportion_full == 0.5
    assert cfg.embed_scale == 8.0 and cfg.final_logit_softcap == 30.0 and cfg.attn_softmax_scale == 1.0
    assert cfg.parallel_dense_mlp and cfg.mlp_act == "gelu_tanh" and cfg.layer_scalar and cfg.tie_word_embeddings
    assert cfg.router_input_norm and cfg.router_per_expert_scale and cfg.norm_topk_prob


@pytest.mark.parametrize("p", [13, 24])
def test_logits_router_and_experts_match(tiny, p):
    _, _, model = tiny
    _, hf, model = tiny
    out, _, cache = assert_parity(model, hf, ids_of(p=p))
    assert out.logits.abs().max() > 1.0
    # the checkpoint exercises what it should: non-trivial scales, decisive routing
    assert (model.blocks[0].layer_scalar - 1).abs().item() > 0.05
    assert (model.blocks[0].mlp.router.per_expert_scale - 1).abs().max() > 0.1
    assert cache["blocks.0.mlp.hook_router_scores"].max(-1).values.mean() > 0.3


def test_left_padding_with_attention_mask(tiny):
    _, hf, model = tiny
    ids = ids_of(3, 12, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :1] = 0
    assert_parity(model, hf, ids, mask)


def test_bf16_checkpoint_follows_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from moelens.testing import save_tiny

    save_tiny("gemma4", tmp_path, dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model = HookedMoETransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids = ids_of(2, 14, seed=3)
    out = hf_run(hf, ids)
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids)
    assert logits.dtype == torch.bfloat16
    for layer in model.cfg.moe_layers:
        same = (cache[f"blocks.{layer}.mlp.hook_expert_indices"].sort(-1).values
                == out.router_logits[layer].view(2, 14, -1).topk(2).indices.sort(-1).values).all(-1)
        assert same.float().mean() >= 0.9
    # bit for bit, both on their default (SDPA) path: moelens' run_with_cache above caches the attention
    # pattern, so it takes the explicit softmax (fp32) path, a few bf16 ulps away
    with torch.no_grad():
        assert torch.equal(model(ids), hf(ids).logits)  # bit for bit


def test_expert_paths_equal_the_loop(tiny):
    d, _, _ = tiny
    ids = ids_of(4, 16)
    ref = HookedMoETransformer.from_pretrained(d, expert_impl="loop")
    with torch.no_grad():
        want = ref(ids)
        for impl in ("sorted", "grouped_mm"):
            got = HookedMoETransformer.from_pretrained(d, expert_impl=impl)(ids)
            assert (got - want).abs().max() < 1e-5


def _drop(model, what):
    """Remove one Gemma 4 ingredient from a loaded model (module surgery or a config override)."""
    for l, block in enumerate(model.blocks):
        attn = block.attn
        if what == "sliding_window":
            attn.window = None
        elif what == "attn_post_norm":
            block.ln1_post = None
        elif what == "dense_branch":
            block.dense_mlp.w_down.data.zero_()
        elif what == "router_reads_moe_input":
            block.mlp.forward = (lambda mlp: lambda x, router_input=None: MoE.forward(mlp, x))(block.mlp)
        elif what == "per_expert_scale":
            block.mlp.router.per_expert_scale.data.fill_(1.0)
        elif what == "layer_scalar":
            block.layer_scalar.data.fill_(1.0)
        elif what == "v_norm":
            attn.cfg = attn.cfg.replace(v_norm=False)
        elif what == "softmax_scale":
            attn.scale = attn.d_head ** -0.5


@pytest.mark.parametrize("drop", ["embed_scale", "softcap", "proportional_rope", "sliding_window", "attn_post_norm",
                                  "dense_branch", "router_reads_moe_input", "per_expert_scale", "layer_scalar",
                                  "v_norm", "softmax_scale"])
def test_negative_controls(tiny, drop):
    d, hf, _ = tiny
    overrides = {"embed_scale": dict(embed_scale=None), "softcap": dict(final_logit_softcap=None),
                 "proportional_rope": dict(rope_proportion_full=1.0)}.get(drop, {})
    wrong = HookedMoETransformer.from_pretrained(d, **overrides)
    _drop(wrong, drop)
    ids = ids_of(p=16)
    with torch.no_grad():
        assert (wrong(ids) - hf_run(hf, ids).logits).abs().max() > 1e-2


def test_parallel_branch_hooks_and_window(tiny):
    _, _, model = tiny
    ids = ids_of(2, 10)
    with check_shapes(model), torch.no_grad():
        _, cache = model.run_with_cache(ids)
    assert set(cache.keys()) == set(model.hook_dict)
    q, k = torch.arange(10)[:, None], torch.arange(10)[None, :]
    for layer in range(4):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        outside = (k > q) | ((q - k >= WINDOW) if layer % 2 == 0 else torch.zeros(10, 10, dtype=torch.bool))
        assert pattern[..., outside].abs().max() == 0
        block = model.blocks[layer]
        # hook_mlp_out = ln2_post(hook_dense_out + hook_moe_out); hook_moe_out = ln2_post_moe(MoE output)
        torch.testing.assert_close(block.ln2_post(cache[f"blocks.{layer}.hook_dense_out"] + cache[f"blocks.{layer}.hook_moe_out"]),
                                   cache[f"blocks.{layer}.hook_mlp_out"], atol=1e-5, rtol=0)
        moe = cache.routed_plus_shared(layer)
        torch.testing.assert_close(block.ln2_post_moe(moe), cache[f"blocks.{layer}.hook_moe_out"], atol=1e-5, rtol=0)
        # the layer scalar multiplies the whole residual stream leaving the block
        torch.testing.assert_close(
            (cache[f"blocks.{layer}.hook_resid_mid"] + cache[f"blocks.{layer}.hook_mlp_out"]) * block.layer_scalar,
            cache[f"blocks.{layer}.hook_resid_post"], atol=1e-5, rtol=0)
    # the value heads are RMS-normalised (weightless): unit RMS
    rms = cache["blocks.1.attn.hook_v"].pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)
    assert cache["blocks.1.attn.hook_q"].shape[-1] == 32 and cache["blocks.0.attn.hook_q"].shape[-1] == 16
    assert math.isclose(model.cfg.embed_scale, 8.0)


def test_multimodal_hub_checkpoint_loads_as_its_text_model(tmp_path):
    """The hub's Gemma4ForConditionalGeneration layout (model.language_model.* keys, text_config, a
    vision tower that is skipped) gives the same logits as transformers' multimodal model on text."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    from moelens.testing import TINY_CONFIGS, sharpen

    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "head_dim": 16}
    torch.manual_seed(0)
    text = {**TINY_CONFIGS["gemma4"][2], "pad_token_id": 0}  # the wrapper replaces media tokens by the pad id
    cfg = Gemma4Config(text_config=text, vision_config=vision, audio_config=None)
    hf = sharpen(Gemma4ForConditionalGeneration(cfg)).eval()
    for name, b in hf.named_buffers():
        if name.endswith("layer_scalar"):
            b.fill_(0.8)
    hf.save_pretrained(tmp_path)
    model = HookedMoETransformer.from_pretrained(tmp_path)
    assert model.cfg.architecture == "Gemma4ForConditionalGeneration" and model.cfg.tie_word_embeddings
    ids = ids_of(2, 13)
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = model(ids)
    assert (got - want).abs().max() < TOL and want.abs().max() > 1.0


def test_noise_reference_is_the_scaled_embedding(tiny):
    """The tracing noise is added at hook_embed, after Gemma's sqrt(d_model): its reference std too."""
    from moelens.tracing.trace import embedding_std

    _, _, model = tiny
    raw = float(model.W_E.detach().float().std())
    assert embedding_std(model) == pytest.approx(8.0 * raw, rel=1e-6)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids_of(1, 5), names_filter="hook_embed")
    assert float(cache["hook_embed"].std()) == pytest.approx(embedding_std(model), rel=0.3)


@pytest.mark.parametrize("field,value", [("hidden_size_per_layer_input", 256), ("num_kv_shared_layers", 2),
                                         ("use_bidirectional_attention", "all"), ("enable_moe_block", False)])
def test_unsupported_variants_are_refused(tiny_copy, field, value):
    """The small dense Gemma 4 models' features (per-layer inputs, KV sharing, ...) fail loudly."""
    from moelens.architectures import UnsupportedConfigError
    from moelens.testing import edit_config

    d = tiny_copy("gemma4")
    edit_config(d, **{field: value})
    with pytest.raises(UnsupportedConfigError, match=field):
        HookedMoETransformer.from_pretrained(d, device="meta")
