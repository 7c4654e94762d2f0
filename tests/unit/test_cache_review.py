"""Regressions from a review of the cache and the analyses against independent computations:
caches without a batch dimension, names_filters that leave out what a method needs, and SAE
splicing in bf16."""

import pytest
import torch

from moelens import HookedMoETransformer
from moelens import analysis as A


@pytest.fixture(scope="module")
def qwen2(tiny_dirs):
    d, _ = tiny_dirs("qwen2_moe")
    model = HookedMoETransformer.from_pretrained(d)
    tokens = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        _, single = model.run_with_cache(tokens, remove_batch_dim=True)
    return model, tokens, logits, cache, single


def test_expert_views_without_a_batch_dim(qwen2):
    model, tokens, _logits, cache, single = qwen2
    assert not single.has_batch_dim
    l = model.cfg.moe_layers[-1]
    # usage: one count per expert, as the batched cache's (was a scalar: summed over pos and experts)
    usage = single.expert_usage(l)
    assert usage.shape == (model.cfg.n_experts,)
    assert torch.equal(usage, cache.expert_usage(l))
    assert int(usage.sum()) == tokens.shape[1] * model.cfg.top_k
    assert torch.equal(single.expert_usage(l, attention_mask=torch.ones(tokens.shape[1])), usage)
    # dense contributions and the routing table (raised before)
    torch.testing.assert_close(single.expert_contributions(l), cache.expert_contributions(l)[0], atol=0, rtol=0)
    table = single.routing(l)
    assert table.equals(cache.routing(l))


def test_expert_logit_lens_without_a_batch_dim(qwen2):
    model, _tokens, _logits, cache, single = qwen2
    l = model.cfg.moe_layers[-1]
    for p in (4, -1):  # -1 (the default) read garbage silently; 4 raised
        _check_lens(model, cache, single, l, p)
    with pytest.raises(IndexError, match="no batch dimension"):
        A.expert_logit_lens(model, single, l, 0, batch=1)


def _check_lens(model, cache, single, l, p):
    e = int(cache["expert_indices", l][0, p, 0])
    want = (cache.expert_contribution(l, e)[0, p] / cache["ln_final.hook_scale"][0, p]) @ (
        model.ln_final.scale_weight[:, None] * model.W_U)
    for c in (cache, single):  # the single-sequence cache read [pos, d] as [batch, pos] before
        lens = A.expert_logit_lens(model, c, l, e, position=p, k=4)
        top = want.topk(4)
        assert lens.attrs["routed"]
        assert lens[lens.direction == "promoted"]["token_id"].tolist() == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(lens[lens.direction == "promoted"]["logit"].values),
                                   top.values.double(), atol=1e-5, rtol=1e-5)
        shared = A.expert_logit_lens(model, c, l, "shared", position=p, k=1)
        s = (cache["shared_out", l][0, p] / cache["ln_final.hook_scale"][0, p]) @ (
            model.ln_final.scale_weight[:, None] * model.W_U)
        assert shared["logit"].iloc[0] == pytest.approx(float(s.max().detach()), abs=1e-5)


def test_names_filter_leaving_out_what_a_method_needs_raises_naming_the_hook(qwen2):
    model, tokens, _logits, cache, _ = qwen2
    with torch.no_grad():
        _, no_embed = model.run_with_cache(tokens, names_filter=lambda n: n != "hook_embed")
        _, no_scale = model.run_with_cache(tokens, names_filter=lambda n: not n.endswith("hook_scale"))
    # the embedding was silently left out (components no longer summed to the residual stream)
    for kw in ({}, {"expert_level": True}):
        with pytest.raises(KeyError, match="hook_embed"):
            no_embed.decompose_resid(**kw)
        stack = no_embed.decompose_resid(incl_embeds=False, **kw)
        torch.testing.assert_close(stack.sum(0) + cache["hook_embed"], cache["resid_post", -1], atol=1e-5, rtol=1e-5)
    # the final norm's scale: TransformerLens' error path raised an IndexError (blocks[n_layers])
    stack = no_scale.decompose_resid(pos_slice=-1)
    with pytest.raises(KeyError, match="ln_final.hook_scale"):
        no_scale.logit_attrs(stack, tokens=5, pos_slice=-1)
    with pytest.raises(KeyError, match="blocks.1.ln2.hook_scale"):
        no_scale.apply_ln_to_stack(no_scale.decompose_resid(1, mlp_input=True), 1, mlp_input=True)


def test_sae_error_term_leaves_a_bf16_model_bitwise_unchanged(tiny_dirs):
    from moelens.sae import TinySAE, splice_saes

    d, _ = tiny_dirs("qwen2_moe")
    model = HookedMoETransformer.from_pretrained(d, dtype=torch.bfloat16)
    tokens = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    hook = "blocks.1.hook_resid_post"
    sae = TinySAE(model.cfg.d_model, 4 * model.cfg.d_model, seed=0).to(torch.bfloat16)
    with torch.no_grad():
        plain = model(tokens)
        with splice_saes(model, {hook: sae}):
            assert torch.equal(model(tokens), plain)  # recon + (x - recon) rounded by a bf16 ulp before
            _, c = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(hook))

            def zero_error(err, hook):
                return torch.zeros_like(err)

            recon_run = model.run_with_hooks(tokens, fwd_hooks=[(f"{hook}.sae.hook_sae_error", zero_error)])
        with splice_saes(model, {hook: sae}, use_error_term=False):
            recon_only = model(tokens)
        # without the error term: the SAE's reconstruction, by hand
        hand = model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda a, hook: sae.decode(sae.encode(a)).to(a.dtype))])
    assert torch.equal(recon_only, hand)
    assert (recon_only - plain).abs().max() > 1e-2
    # zeroing the error term runs on the reconstruction (up to bf16 rounding of the rewritten sum)
    torch.testing.assert_close(recon_run.float(), recon_only.float(), atol=0.1, rtol=0.05)
    torch.testing.assert_close(c[f"{hook}.sae.hook_sae_recon"] + c[f"{hook}.sae.hook_sae_error"],
                               c[f"{hook}.sae.hook_sae_input"], atol=0.05, rtol=0.02)
    assert torch.equal(c[f"{hook}.sae.hook_sae_output"], c[f"{hook}.sae.hook_sae_input"])


def test_expert_usage_excludes_the_runs_padding(qwen2):
    from moelens.testing import toy_tokenizer

    model = qwen2[0]
    l = model.cfg.moe_layers[-1]
    texts = ["w5 w6", "w7 w8 w9 w10 w11"]
    old = model.tokenizer
    model.tokenizer = toy_tokenizer(256)
    model.tokenizer.padding_side = "left"  # a list of texts is padded on the tokenizer's side (as TransformerLens)
    try:
        tokens, mask = model.tokenize(texts)
        assert not bool(mask.all())
        with torch.no_grad():
            runs = [model.run_with_cache(texts)[1], model.run_with_cache(tokens, attention_mask=mask)[1],
                    model.run_with_cache(tokens, mask)[1]]
    finally:
        model.tokenizer = old
    # independent count: real positions only, each routed to top_k experts
    idx = runs[1]["expert_indices", l][mask.bool()]
    want = torch.bincount(idx.reshape(-1), minlength=model.cfg.n_experts)
    assert int(want.sum()) == int(mask.sum()) * model.cfg.top_k
    for c in runs:
        assert torch.equal(c.attention_mask, mask)
        assert torch.equal(c.expert_usage(l), want)  # counted the pad positions before
        assert torch.equal(c.expert_usage(l, attention_mask=torch.ones_like(mask)),
                           torch.bincount(c["expert_indices", l].reshape(-1), minlength=model.cfg.n_experts))
    one = runs[0].apply_slice_to_batch_dim(0)
    assert torch.equal(one.attention_mask, mask[:1])
    assert int(one.expert_usage(l).sum()) == int(mask[0].sum()) * model.cfg.top_k
    assert torch.equal(runs[0].tokens, tokens)
