"""``run_with_cache(..., pos_slice=...)`` slices every hook on its own position axis.

Part one ports TransformerLens' ``tests/integration/test_cache_pos_slice.py`` (4.x) to the bundled
model: same assertions, with the hooks a sparse MoE layer has instead of GPT-2's ``pos_embed`` and
``mlp.hook_pre/post`` (no learned positional embedding, no single MLP in a sparse layer).
Part two checks every hook of every architecture against slicing the full cache on the axis its
annotation names (``pos``; ``query_pos`` for attention scores, patterns and gpt-oss sink weights),
and the expert views of a pos-sliced cache.
"""

import pytest
import torch

from moelens import HookedMoETransformer
from moelens.hooks import pos_dim
from moelens.testing import TINY_CONFIGS

PROMPT = "Tel Mor plays the saxophone in Lisbon"


@pytest.fixture(scope="module")
def model():
    return HookedMoETransformer.from_pretrained("moelens-tiny-facts")


# ---------------------------------------------------------------- TransformerLens' test, ported
def test_run_with_cache_pos_slice_keep_batch(model):
    _, cache_no_slice = model.run_with_cache(PROMPT, return_type=None)
    num_tokens = model.to_tokens(PROMPT).shape[-1]
    cfg = model.cfg
    for i in [0, num_tokens // 2, num_tokens - 1, -1]:
        _, cache_with_slice = model.run_with_cache(PROMPT, return_type=None, pos_slice=i)
        assert cache_with_slice["embed"].shape == torch.Size([1, 1, cfg.d_model])
        assert cache_with_slice["q", 0].shape == torch.Size([1, 1, cfg.n_heads, cfg.d_head])
        assert torch.equal(cache_no_slice["embed"][0, i, :], cache_with_slice["embed"][0, 0, :])
        for layer in range(cfg.n_layers):
            for key in ("resid_pre", "resid_post", "resid_mid", "attn_out", "mlp_out", "expert_indices",
                        "expert_weights", "router_logits", "routed_out"):
                assert torch.equal(cache_no_slice[key, layer][0, i], cache_with_slice[key, layer][0, 0]), key
            for ln in ("ln1", "ln2"):
                assert torch.equal(cache_no_slice["scale", layer, ln][0, i, :], cache_with_slice["scale", layer, ln][0, 0, :])
                assert torch.equal(cache_no_slice["normalized", layer, ln][0, i, :],
                                   cache_with_slice["normalized", layer, ln][0, 0, :])
            for key in ("q", "k", "v", "z"):
                assert torch.equal(cache_no_slice[key, layer][0, i, :, :], cache_with_slice[key, layer][0, 0, :, :])
            for key in ("attn_scores", "pattern"):
                assert torch.equal(cache_no_slice[key, layer][0, :, i, :], cache_with_slice[key, layer][0, :, 0, :])
            # the hooks TransformerLens' name rule sliced on the wrong axis
            assert torch.equal(cache_no_slice["expert_out", layer][0, i], cache_with_slice["expert_out", layer][0, 0])
            rot = f"blocks.{layer}.attn.hook_rot_q"
            assert torch.equal(cache_no_slice[rot][0, i], cache_with_slice[rot][0, 0])


def test_run_with_cache_pos_slice_remove_batch(model):
    _, cache_no_slice = model.run_with_cache(PROMPT, remove_batch_dim=True, return_type=None)
    num_tokens = model.to_tokens(PROMPT).shape[-1]
    cfg = model.cfg
    for i in [0, num_tokens // 2, num_tokens - 1, -1]:
        _, cache_with_slice = model.run_with_cache(PROMPT, remove_batch_dim=True, pos_slice=i)
        assert cache_with_slice["embed"].shape == torch.Size([1, cfg.d_model])
        assert cache_with_slice["q", 0].shape == torch.Size([1, cfg.n_heads, cfg.d_head])
        assert torch.equal(cache_no_slice["embed"][i, :], cache_with_slice["embed"][0, :])
        for layer in range(cfg.n_layers):
            for key in ("resid_pre", "resid_post", "q", "k", "z", "expert_out", "expert_indices"):
                assert torch.equal(cache_no_slice[key, layer][i], cache_with_slice[key, layer][0]), key
            assert torch.equal(cache_no_slice["pattern", layer][:, i, :], cache_with_slice["pattern", layer][:, 0, :])


# ---------------------------------------------------------------- every hook, every architecture
SLICES = [0, -1, slice(1, 4), [0, 2, 5]]


def _index(t, dim, s):
    idx = [slice(None)] * t.ndim
    idx[dim] = [s] if isinstance(s, int) else s
    return t[tuple(idx)]


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
@torch.no_grad()
def test_every_hook_is_sliced_on_its_position_axis(tiny_dirs, arch):
    d, _ = tiny_dirs(arch)
    m = HookedMoETransformer.from_pretrained(d)
    tokens = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(5))
    _, full = m.run_with_cache(tokens)
    assert len(full.cache_dict) == len(m.hook_dict)
    for s in SLICES:
        _, part = m.run_with_cache(tokens, pos_slice=s)
        assert part.cache_dict.keys() == full.cache_dict.keys()
        for name, act in full.cache_dict.items():
            dim = pos_dim(m.hook_dict[name], act.ndim)
            if dim is None:  # no position axis in the annotation (DeepSeek-V4's compressed entries): kept whole
                assert not {"pos", "query_pos"} & set(m.hook_dict[name].dims.split()), name
                assert torch.equal(part[name], act), (name, s)
                continue
            assert act.shape[dim] == 6, f"{name} {m.hook_dict[name].dims}: axis {dim} is not the 6 positions"
            assert torch.equal(part[name], _index(act, dim, s)), (name, s)
        # the expert views of a pos-sliced cache are those of the full cache, sliced
        for l in m.cfg.moe_layers:
            for e in (0, m.cfg.n_experts - 1):
                torch.testing.assert_close(part.expert_contribution(l, e), _index(full.expert_contribution(l, e), 1, s),
                                           atol=0, rtol=0)
            total = sum(part.expert_contribution(l, e) for e in range(m.cfg.n_experts))
            torch.testing.assert_close(total, part["routed_out", l], atol=1e-5, rtol=1e-5)
        stack = part.decompose_resid(expert_level=True)
        # the final residual stream: with several streams (DeepSeek-V4) the one hc_head collapses them into
        final = "hc_head.hook_collapsed" if m.cfg.hc_mult > 1 else f"blocks.{m.cfg.n_layers - 1}.hook_resid_post"
        torch.testing.assert_close(stack.sum(0), part[final], atol=1e-5, rtol=1e-5)


def test_pos_sliced_cache_expert_views_and_metadata(model):
    tokens = model.to_tokens(["Tel Mor plays the", "Ana Lim sings in"])
    logits, full = model.run_with_cache(tokens)
    _, part = model.run_with_cache(tokens, pos_slice=-1)
    n = tokens.shape[-1]
    assert part.positions.tolist() == [n - 1] and part.tokens.shape == (2, 1) and torch.equal(part.tokens[:, 0], tokens[:, -1])
    table = part.routing(layer=1)
    assert set(table.position) == {n - 1}
    want = full.routing(layer=1)
    want = want[want.position == n - 1].reset_index(drop=True)
    assert table[["batch", "position", "slot", "expert"]].equals(want[["batch", "position", "slot", "expert"]])
    assert torch.equal(part.expert_usage(1), full.expert_mask(1)[:, -1].sum(0))
    # DLA on the pos-sliced cache: components sum to the last position's logits
    t = 11
    stack = part.decompose_resid(expert_level=True)
    torch.testing.assert_close(part.logit_attrs(stack, tokens=t).sum(0)[:, 0], logits[:, -1, t], atol=1e-5, rtol=1e-5)


def test_pos_slice_gradients(model):
    tokens = model.to_tokens(PROMPT)
    _, full = model.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    _, part = model.run_with_cache(tokens, return_type="loss", incl_bwd=True, pos_slice=slice(2, 5))
    for name in ("blocks.1.mlp.hook_expert_out_grad", "blocks.2.attn.hook_rot_k_grad", "blocks.0.hook_resid_post_grad"):
        torch.testing.assert_close(part[name], full[name][:, 2:5], atol=0, rtol=0)
