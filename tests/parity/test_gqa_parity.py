"""moelens vs transformers on tiny sharpened models of the four GQA architectures (fp32, 1e-4)."""

import pytest
import torch

from moelens import HookedMoETransformer, check_shapes
from moelens.testing import save_tiny, hf_forward

ARCHS = ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe"]
TOL = 1e-4

hf_run = hf_forward




def hf_chosen(router_logits, k):
    return torch.topk(torch.softmax(router_logits.float(), -1), k, dim=-1).indices.sort(-1).values


def assert_parity(model, hf, ids, mask=None):
    out = hf_run(hf, ids, mask)
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, attention_mask=mask)
    real = (mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool))
    assert (out.logits - logits)[real].abs().max() < TOL
    b, p = ids.shape
    assert len(out.router_logits) == len(model.cfg.moe_layers)
    for i, layer in enumerate(model.cfg.moe_layers):
        ours = cache[f"blocks.{layer}.mlp.hook_router_logits"]
        theirs = out.router_logits[i].view(b, p, -1)
        assert (ours - theirs)[real].abs().max() < TOL
        chosen = cache[f"blocks.{layer}.mlp.hook_expert_indices"].sort(-1).values
        assert torch.equal(chosen[real], hf_chosen(theirs, model.cfg.top_k)[real])


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_router_and_experts_match(arch, tiny_dirs):
    d, hf = tiny_dirs(arch)
    model = HookedMoETransformer.from_pretrained(d)
    ids = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(1))
    assert_parity(model, hf, ids)
    # the comparison is sensitive: the routers are decisive and logits O(1)
    assert hf_run(hf, ids).logits.abs().max() > 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_layout_loads_identically(arch, tmp_path, tiny_dirs):
    d, hf = tiny_dirs(arch)
    save_tiny(arch, tmp_path, fused=True)
    keys = __import__("safetensors").safe_open(tmp_path / "model.safetensors", "pt").keys()
    assert any(k.endswith("experts.gate_up_proj") for k in keys)
    a = HookedMoETransformer.from_pretrained(d)
    b = HookedMoETransformer.from_pretrained(tmp_path)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_with_attention_mask(arch, tiny_dirs):
    d, hf = tiny_dirs(arch)
    model = HookedMoETransformer.from_pretrained(d)
    ids = torch.randint(3, 256, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    ids[mask == 0] = 0
    assert_parity(model, hf, ids, mask)
    # a padded row's real tokens equal the same sequence run alone
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        alone = model(ids[:1, 4:])
    assert (full[0, 4:] - alone[0]).abs().max() < TOL


def test_sharded_checkpoint(tmp_path):
    hf = save_tiny("mixtral", tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = HookedMoETransformer.from_pretrained(tmp_path)
    assert_parity(model, hf, torch.randint(0, 256, (2, 8)))


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe"])
def test_norm_topk_prob_both_ways(arch, norm_topk_prob, tmp_path):
    hf = save_tiny(arch, tmp_path, norm_topk_prob=norm_topk_prob)
    model = HookedMoETransformer.from_pretrained(tmp_path)
    assert model.cfg.norm_topk_prob is norm_topk_prob
    ids = torch.randint(0, 256, (2, 8))
    assert_parity(model, hf, ids)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    sums = cache[f"blocks.{model.cfg.moe_layers[0]}.mlp.hook_expert_weights"].sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5) == norm_topk_prob


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_dense_layers_via_sparse_step(arch, tmp_path):
    hf = save_tiny(arch, tmp_path, num_hidden_layers=4, mlp_only_layers=[], decoder_sparse_step=2)
    model = HookedMoETransformer.from_pretrained(tmp_path)
    assert model.cfg.moe_layers == [1, 3]
    assert "blocks.0.mlp.hook_router_logits" not in model.hook_dict
    assert_parity(model, hf, torch.randint(0, 256, (2, 8)))


def test_qwen3_head_dim_differs_from_d_model_over_heads(tiny_dirs):
    d, _ = tiny_dirs("qwen3_moe")
    model = HookedMoETransformer.from_pretrained(d)
    assert model.cfg.d_head == 32 != model.cfg.d_model // model.cfg.n_heads
    assert model.blocks[1].attn.w_q.shape == (4 * 32, 64)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_tied_embeddings(arch, tmp_path):
    hf = save_tiny(arch, tmp_path, tie_word_embeddings=True)
    model = HookedMoETransformer.from_pretrained(tmp_path)
    assert model.unembed.w_u is model.embed.W_E and torch.equal(model.W_U, model.W_E.T)
    assert_parity(model, hf, torch.randint(0, 256, (2, 8)))


def test_olmoe_clip_qkv(tmp_path):
    hf = save_tiny("olmoe", tmp_path, clip_qkv=0.5)
    model = HookedMoETransformer.from_pretrained(tmp_path)
    assert model.cfg.clip_qkv == 0.5
    assert_parity(model, hf, torch.randint(0, 256, (2, 8)))


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_bf16_loading_follows_router_dtype_rules(arch, tmp_path):
    save_tiny(arch, tmp_path, dtype=torch.bfloat16)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()  # fp32 RoPE tables, as users load it
    model = HookedMoETransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.rope_inv_freq.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    out = hf_run(hf, ids)
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids)
    layer = model.cfg.moe_layers[0]
    ours = cache[f"blocks.{layer}.mlp.hook_router_logits"]
    assert ours.dtype == torch.bfloat16  # router matmul in the model dtype, as transformers
    theirs = out.router_logits[0].view(2, 12, -1)
    # bf16 attention kernels round differently, so allow ~2 bf16 ulps at |logit| ~ 4
    assert (ours.float() - theirs.float()).abs().max() <= 0.07
    agree = (cache[f"blocks.{layer}.mlp.hook_expert_indices"].sort(-1).values == hf_chosen(theirs, model.cfg.top_k)).all(-1)
    assert agree.float().mean() >= 0.9
    want = torch.float32 if arch == "mixtral" else torch.bfloat16  # Mixtral keeps fp32 combine weights
    assert cache[f"blocks.{layer}.mlp.hook_expert_weights"].dtype == want
    assert cache[f"blocks.{layer}.mlp.hook_router_scores"].dtype == torch.float32
    assert (logits.float() - out.logits.float()).abs().max() < 0.15  # a few bf16 ulps at |logit| ~ 4


@pytest.mark.parametrize("arch", ARCHS)
def test_every_hook_has_its_declared_shape(arch, tiny_dirs):
    d, _ = tiny_dirs(arch)
    model = HookedMoETransformer.from_pretrained(d)
    ids = torch.randint(0, 256, (2, 7))
    with check_shapes(model), torch.no_grad():
        _, cache = model.run_with_cache(ids)
    assert set(cache.keys()) == set(model.hook_dict)
    assert cache["blocks.0.attn.hook_pattern"].shape == (2, model.cfg.n_heads, 7, 7)


@pytest.mark.parametrize("arch", ARCHS)
def test_sdpa_and_explicit_attention_agree(arch, tiny_dirs):
    d, _ = tiny_dirs(arch)
    model = HookedMoETransformer.from_pretrained(d)
    ids = torch.randint(0, 256, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        fast = model(ids, attention_mask=mask)
        slow = model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda x, hook: x)])
    assert (fast - slow)[mask.bool()].abs().max() < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", [None, "sorted", "grouped_mm"])
def test_sorted_expert_path_equals_reference_loop(arch, impl, tiny_dirs):
    d, _ = tiny_dirs(arch)
    fast = HookedMoETransformer.from_pretrained(d, expert_impl=impl)
    ref = HookedMoETransformer.from_pretrained(d, expert_impl="loop")
    assert fast.cfg.expert_impl == (impl or "auto") and ref.cfg.expert_impl == "loop"
    experts = fast.blocks[fast.cfg.moe_layers[0]].mlp.experts
    assert experts.resolved_impl(torch.zeros(1, dtype=fast.cfg.dtype)) == (impl or "sorted")  # auto on CPU: sorted
    ids = torch.randint(0, 256, (4, 16))
    with torch.no_grad():
        a, ca = fast.run_with_cache(ids)
        b, cb = ref.run_with_cache(ids)
    assert (a - b).abs().max() < 1e-5
    for l in fast.cfg.moe_layers:
        key = f"blocks.{l}.mlp.hook_expert_out"
        assert (ca[key] - cb[key]).abs().max() < 1e-5


def test_negative_control_wrong_renormalisation(tiny_dirs):
    """Flipping a routing rule must break parity by a wide margin (the test can fail)."""
    d, hf = tiny_dirs("mixtral")
    wrong = HookedMoETransformer.from_pretrained(d, norm_topk_prob=False)
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        assert (wrong(ids) - hf_run(hf, ids).logits).abs().max() > 1e-2
