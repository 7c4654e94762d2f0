"""Llama 4 vs transformers on tiny sharpened checkpoints saved by transformers itself.

The tiny config (moelens.testing.TINY_CONFIGS["llama4"]) interleaves dense (0, 2) and MoE (1, 3)
layers, has NoPE layers (1, 3) with attention temperature tuning active from position 1, chunked
attention with chunk 4 on the RoPE layers (0, 2), the L2 QK-norm, llama3 RoPE scaling, attention
biases, a top-1 sigmoid router whose weight scales the expert's input, and a shared expert.
Sequences are longer than the chunk. Negative controls show each of these matters.
"""

import pytest
import torch

from moelens import HookedMoETransformer, check_shapes
from moelens.testing import assert_topk_parity, hf_forward, random_ids

TOL = 1e-4
CHUNK = 4

ids_of, hf_run = random_ids, hf_forward


def assert_parity(model, hf, ids, mask=None, tol=TOL):
    return assert_topk_parity(model, hf, ids, mask, tol)








@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    d, hf = tiny_dirs("llama4")
    return d, hf, HookedMoETransformer.from_pretrained(d)


def test_config_translation(tiny):
    _, _, model = tiny
    cfg = model.cfg
    assert cfg.architecture == "Llama4ForCausalLM"
    assert cfg.moe_layers == [1, 3] and cfg.dense_layers == [0, 2] and cfg.d_mlp == 96 and cfg.d_shared == 32
    assert cfg.nope_layers == (1, 3) and cfg.layer_types == ("chunked_attention", "full_attention") * 2
    assert [cfg.attention_chunk(l) for l in range(4)] == [CHUNK, None, CHUNK, None]
    assert cfg.qk_norm == "l2" and cfg.attn_temperature_floor == 2 and cfg.attn_temperature_scale == 0.5
    assert cfg.router_order == "topk_sigmoid" and cfg.expert_input_scaled and cfg.top_k == 1
    assert dict(cfg.rope_scaling)["rope_type"] == "llama3" and cfg.rope_interleaved
    assert cfg.qkv_bias and cfg.attn_o_bias


@pytest.mark.parametrize("p", [13, 24])
def test_logits_router_and_experts_match(tiny, p):
    _, hf, model = tiny
    ids = ids_of(p=p)
    assert p > 2 * CHUNK
    out, _, cache = assert_parity(model, hf, ids)
    assert out.logits.abs().max() > 1.0  # O(1) logits: the comparison is sensitive
    assert model.blocks[0].attn.b_q.abs().max() > 0
    # several experts in use, so that routing decides something
    assert cache["blocks.1.mlp.hook_expert_indices"].unique().numel() >= 3


def test_left_padding_with_attention_mask(tiny):
    """Chunks start at each row's first real token (transformers' chunked mask with left padding)."""
    _, hf, model = tiny
    ids = ids_of(3, 14, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :2] = 0
    assert_parity(model, hf, ids, mask)


def test_bf16_checkpoint_follows_transformers(tmp_path):
    """bf16, bit for bit: logits, router logits and chosen experts."""
    from transformers import AutoModelForCausalLM

    from moelens.testing import save_tiny

    save_tiny("llama4", tmp_path, dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model = HookedMoETransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids = ids_of(2, 14, seed=3)
    out = hf_run(hf, ids)
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids)
    assert logits.dtype == torch.bfloat16
    for i, layer in enumerate(model.cfg.moe_layers):
        ours = cache[f"blocks.{layer}.mlp.hook_router_logits"]
        theirs = out.router_logits[i].view(2, 14, -1)
        assert (ours.float() - theirs.float()).abs().max() <= 0.05 * theirs.float().abs().max()  # a few bf16 ulps
        same = cache[f"blocks.{layer}.mlp.hook_expert_indices"][..., 0] == theirs.argmax(-1)
        assert same.float().mean() >= 0.9
        assert cache[f"blocks.{layer}.mlp.hook_expert_weights"].dtype == torch.bfloat16
    # bit for bit, both on their default (SDPA) path: moelens' run_with_cache above caches the attention
    # pattern, so it takes the explicit softmax (fp32) path, a few bf16 ulps away
    with torch.no_grad():
        assert torch.equal(model(ids), hf(ids).logits)


def test_expert_paths_equal_the_loop(tiny):
    d, _, _ = tiny
    ids = ids_of(4, 16)
    ref = HookedMoETransformer.from_pretrained(d, expert_impl="loop")
    with torch.no_grad():
        want = ref(ids)
        for impl in ("sorted", "grouped_mm"):
            got = HookedMoETransformer.from_pretrained(d, expert_impl=impl)(ids)
            assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("drop", ["chunk", "nope", "qk_norm", "temperature", "input_scaling", "rope_scaling"])
def test_negative_controls(tiny, drop):
    """Dropping one Llama 4 ingredient must break parity by a wide margin (the parity test can fail)."""
    d, hf, _ = tiny
    overrides = {
        "chunk": dict(layer_types=None, attention_chunk_size=None),
        "nope": dict(nope_layers=()),
        "qk_norm": dict(qk_norm="none"),
        "temperature": dict(attn_temperature_floor=0),
        "input_scaling": dict(expert_input_scaled=False),
        "rope_scaling": dict(rope_scaling=None),
    }[drop]
    wrong = HookedMoETransformer.from_pretrained(d, **overrides)
    ids = ids_of(p=16)
    with torch.no_grad():
        assert (wrong(ids) - hf_run(hf, ids).logits).abs().max() > 1e-2


def test_chunked_pattern_and_hooks(tiny):
    _, _, model = tiny
    ids = ids_of(2, 10)
    with check_shapes(model), torch.no_grad():
        _, cache = model.run_with_cache(ids)
    assert set(cache.keys()) == set(model.hook_dict)
    q, k = torch.arange(10)[:, None], torch.arange(10)[None, :]
    for layer in range(4):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        outside = (k > q) | ((k // CHUNK != q // CHUNK) if layer % 2 == 0 else torch.zeros(10, 10, dtype=torch.bool))
        assert pattern[..., outside].abs().max() == 0
        if layer % 2:
            assert pattern[..., k // CHUNK != q // CHUNK].max() > 0  # NoPE layers attend across chunks
    # the L2 QK-norm: every RoPE-layer query and key head has unit RMS (NoPE layers: not normalised)
    rms = cache["blocks.0.attn.hook_rot_k"].pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)


def test_expert_contribution_is_what_the_expert_adds(tiny):
    """Input-scaled experts: hook_expert_out is E_e(w x), the combine is the plain sum, and
    expert_contribution(l, e) is exactly what expert e adds to the MoE output (removing it by its
    weight -> 0 changes hook_mlp_out of that layer by exactly that)."""
    _, _, model = tiny
    ids = ids_of(2, 12)
    layer = 1
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    idx = cache[f"blocks.{layer}.mlp.hook_expert_indices"]
    w = cache[f"blocks.{layer}.mlp.hook_expert_weights"]
    x = cache[f"blocks.{layer}.ln2.hook_normalized"]
    out = cache[f"blocks.{layer}.mlp.hook_expert_out"]
    experts = model.blocks[layer].mlp.experts
    # the slot's output is the expert applied to its weighted input
    b, p, s = 0, 3, 0
    e = int(idx[b, p, s])
    with torch.no_grad():
        want = experts.ffn(e, (x[b, p] * w[b, p, s])[None])[0]
        not_this = experts.ffn(e, x[b, p][None])[0] * w[b, p, s]
    torch.testing.assert_close(out[b, p, s], want, atol=1e-6, rtol=0)
    assert (want - not_this).abs().max() > 1e-3  # E(w x) != w E(x): the distinction is real here
    total = sum(cache.expert_contribution(layer, e) for e in range(model.cfg.n_experts))
    torch.testing.assert_close(total, cache[f"blocks.{layer}.mlp.hook_routed_out"], atol=1e-6, rtol=0)
    assert torch.equal(cache.expert_contribution(layer, e)[b, p], out[b, p, s])
    # ablate e (weight 0 wherever chosen): hook_mlp_out drops by exactly its contribution
    def zero_e(weights, hook):
        return torch.where(idx == e, torch.zeros_like(weights), weights)

    with torch.no_grad():
        _, ablated = model.run_with_cache(ids, fwd_hooks=[(f"blocks.{layer}.mlp.hook_expert_weights", zero_e)],
                                          names_filter=f"blocks.{layer}.hook_mlp_out")
    diff = cache[f"blocks.{layer}.hook_mlp_out"] - ablated[f"blocks.{layer}.hook_mlp_out"]
    torch.testing.assert_close(diff, cache.expert_contribution(layer, e), atol=1e-5, rtol=0)
    assert cache.expert_contribution(layer, e).abs().max() > 0.1


def test_decompose_resid_expert_level_sums_to_the_residual(tiny):
    _, _, model = tiny
    ids = ids_of(1, 9)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    comps, labels = cache.decompose_resid(expert_level=True, return_labels=True)
    assert "L1E0" in labels and "L1_shared" in labels and "0_mlp_out" in labels
    torch.testing.assert_close(comps.sum(0), cache["blocks.3.hook_resid_post"], atol=1e-4, rtol=0)


def test_multimodal_hub_checkpoint_loads_as_its_text_model(tmp_path):
    """The hub's Llama4ForConditionalGeneration layout (language_model.* keys, text_config, a vision
    tower that is skipped) gives the same logits as transformers' multimodal model on text."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    from moelens.testing import TINY_CONFIGS, sharpen

    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14, "vision_output_dim": 32, "projector_input_dim": 32,
              "projector_output_dim": 32}
    torch.manual_seed(0)
    hf = sharpen(Llama4ForConditionalGeneration(Llama4Config(text_config=dict(TINY_CONFIGS["llama4"][2]),
                                                             vision_config=vision))).eval()
    hf.save_pretrained(tmp_path)
    model = HookedMoETransformer.from_pretrained(tmp_path)
    assert model.cfg.architecture == "Llama4ForConditionalGeneration" and model.cfg.moe_layers == [1, 3]
    ids = ids_of(2, 13)
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = model(ids)
    assert (got - want).abs().max() < TOL and want.abs().max() > 1.0


def test_unsupported_rope_scaling_is_refused(tiny_copy):
    from moelens.architectures import UnsupportedConfigError
    from moelens.testing import edit_config

    d = tiny_copy("llama4")
    edit_config(d, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e5})
    with pytest.raises(UnsupportedConfigError, match="dynamic"):
        HookedMoETransformer.from_pretrained(d, device="meta")
