"""FlexOlmo vs transformers on tiny sharpened checkpoints saved by transformers itself.

OLMo-2 post-norm blocks (each branch's output normalised before it is added; no pre-norms), QK-norm
over the whole projections, a softmax top-3-of-7 router renormalised. Negative controls: the same
weights as pre-norms, no post-norm on the FFN, no QK-norm.
"""

import pytest
import torch

from moelens import HookedMoETransformer
from moelens.testing import assert_topk_parity, hf_forward, random_ids

TOL = 1e-4

ids_of, hf_run = random_ids, hf_forward


def assert_parity(model, hf, ids, mask=None, tol=TOL):
    return assert_topk_parity(model, hf, ids, mask, tol, select=lambda logits: logits.softmax(-1))








@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    d, hf = tiny_dirs("flex_olmo")
    return d, hf, HookedMoETransformer.from_pretrained(d)


def test_config_translation_and_layout(tiny):
    _, _, model = tiny
    cfg = model.cfg
    assert cfg.architecture == "FlexOlmoForCausalLM" and cfg.moe_layers == [0, 1, 2]
    assert (cfg.attn_pre_norm, cfg.attn_post_norm, cfg.mlp_pre_norm, cfg.mlp_post_norm) == (False, True, False, True)
    assert cfg.qk_norm == "full" and cfg.norm_topk_prob and cfg.norm_weight_fp32
    block = model.blocks[0]
    assert block.ln1 is None and block.ln2 is None and block.ln1_post is not None and block.ln2_post is not None


@pytest.mark.parametrize("p", [13, 24])
def test_logits_router_and_experts_match(tiny, p):
    _, hf, model = tiny
    out, _, _ = assert_parity(model, hf, ids_of(p=p))
    assert out.logits.abs().max() > 1.0


def test_left_padding_with_attention_mask(tiny):
    _, hf, model = tiny
    ids = ids_of(3, 12, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :1] = 0
    assert_parity(model, hf, ids, mask)


def test_hook_mlp_out_is_the_normalised_branch(tiny):
    """hook_attn_out / hook_mlp_out are what is added (after the post-norm); hook_routed_out is before it."""
    _, _, model = tiny
    with torch.no_grad():
        _, cache = model.run_with_cache(ids_of(1, 9))
    for l in range(model.cfg.n_layers):
        torch.testing.assert_close(cache[f"blocks.{l}.hook_resid_post"] - cache[f"blocks.{l}.hook_resid_mid"],
                                   cache[f"blocks.{l}.hook_mlp_out"], atol=1e-5, rtol=0)
        torch.testing.assert_close(cache[f"blocks.{l}.hook_mlp_out"], cache[f"blocks.{l}.ln2_post.hook_normalized"],
                                   atol=0, rtol=0)
        routed = cache[f"blocks.{l}.mlp.hook_routed_out"]
        assert (routed - cache[f"blocks.{l}.hook_mlp_out"]).abs().max() > 1e-2
        # the post-norm at the run's scale carries the routed output to what is added
        through = model.blocks[l].post_mlp_linear(routed, cache[f"blocks.{l}.ln2_post.hook_scale"])
        torch.testing.assert_close(through, cache[f"blocks.{l}.hook_mlp_out"], atol=1e-5, rtol=0)


def test_bf16_checkpoint_follows_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from moelens.testing import save_tiny

    save_tiny("flex_olmo", tmp_path, dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model = HookedMoETransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids = ids_of(2, 14, seed=3)
    with torch.no_grad():
        want = hf(ids).logits
        got = model(ids)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)  # bit for bit (RoPE in fp32 as transformers' FlexOlmo: rope_fp32)


@pytest.mark.parametrize("drop", ["as_pre_norms", "no_ffn_post_norm", "no_qk_norm"])
def test_negative_controls(tiny, drop):
    d, hf, _ = tiny
    wrong = HookedMoETransformer.from_pretrained(d)
    for block in wrong.blocks:
        if drop == "as_pre_norms":  # the same weights, applied to the branch inputs instead
            block.ln1, block.ln1_post = block.ln1_post, None
            block.ln2, block.ln2_post = block.ln2_post, None
        elif drop == "no_ffn_post_norm":
            block.ln2_post = None
        else:
            block.attn.cfg = block.attn.cfg.replace(qk_norm="none")
    ids = ids_of(p=16)
    with torch.no_grad():
        assert (wrong(ids) - hf_run(hf, ids).logits).abs().max() > 1e-2


def test_fused_transformers5_layout_loads(tiny_dirs):
    """transformers 5's in-memory layout (save_original_format=False: fused gate_up_proj / down_proj)."""
    d, hf = tiny_dirs("flex_olmo", fused=True)
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    assert_parity(HookedMoETransformer.from_pretrained(d), hf, ids_of(p=13))
