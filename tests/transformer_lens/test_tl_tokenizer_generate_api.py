"""TransformerLens' tokenizer and generate API on moelens, beyond what TransformerLens' own tests
cover: embeddings in and out, the left-padding mask for token input, ``unembed.hook_in/out``,
``to_str_tokens`` of a ``[batch, pos]`` batch, loud errors. (Not a port.)"""

import pytest
import torch
from transformers import AutoTokenizer

from moelens import HookedMoETransformer, loading

PROMPTS = ["Tel Mor plays the", "The favourite colour of Jor Sar is"]


def test_embeddings_in_equal_tokens_in(model):
    tokens = model.to_tokens(PROMPTS[0])
    embeds = model.W_E[tokens]
    seen = []
    with torch.no_grad():
        logits = model(tokens)
        with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: seen.append(x.clone()))]):
            from_embeds = model(embeds)
    assert torch.equal(from_embeds, logits)
    assert torch.equal(seen[0], embeds)  # embeddings pass through hook_embed (so it can be patched)
    doubled = model(embeds * 2)  # negative control: other embeddings, other logits
    assert (doubled - logits).abs().max() > 1e-2


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_generate_from_embeddings(model, use_past_kv_cache):
    tokens = model.to_tokens(PROMPTS)[:1]
    kw = dict(max_new_tokens=4, do_sample=False, verbose=False, stop_at_eos=False, use_past_kv_cache=use_past_kv_cache)
    full = model.generate(tokens, **kw)
    embeds = model.W_E[tokens].detach()
    new = model.generate(embeds, return_type="tokens", **kw)
    assert torch.equal(new, full[:, tokens.shape[1]:])  # only the generated tokens, as TransformerLens
    out = model.generate(embeds, **kw)  # return_type="input": embeddings
    assert out.shape == (1, tokens.shape[1] + 4, model.cfg.d_model)
    assert torch.equal(out[:, : tokens.shape[1]], embeds) and torch.equal(out[:, tokens.shape[1]:], model.W_E[new])
    assert model.generate(embeds, return_type="str", **kw) == model.to_string(new[0])
    as_embeds = model.generate(tokens, return_type="embeds", **kw)
    assert torch.equal(as_embeds, model.W_E[full])


def test_generate_masks_left_padding_of_token_input_as_transformer_lens(model):
    kw = dict(max_new_tokens=3, do_sample=False, verbose=False, stop_at_eos=False)
    model.tokenizer.padding_side = "left"
    tokens = model.to_tokens(PROMPTS)
    assert tokens[0, 0] == model.tokenizer.pad_token_id  # the short prompt is left-padded
    batched = model.generate(tokens, **kw)  # no attention_mask: leading pads are masked (tokenizer pads left)
    alone = model.generate(model.to_tokens(PROMPTS[0]), **kw)
    assert torch.equal(batched[0, -(alone.shape[1]):], alone[0])
    with torch.no_grad():  # the forward too
        assert torch.allclose(model(tokens)[0, -1], model(model.to_tokens(PROMPTS[0]))[0, -1], atol=1e-4)
        unmasked = model(tokens, attention_mask=torch.ones_like(tokens))  # negative control: pads attended
        assert (unmasked[0, -1] - model(tokens)[0, -1]).abs().max() > 1e-3


def test_unembed_hooks(model):
    tokens = model.to_tokens(PROMPTS[0])
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("unembed."))
        assert torch.equal(cache["unembed.hook_out"], logits)
        final_resid = model(tokens, stop_at_layer=model.cfg.n_layers)  # after the last block
        assert torch.equal(cache["unembed.hook_in"], model.ln_final(final_resid))
        zeroed = model.run_with_hooks(tokens, fwd_hooks=[("unembed.hook_in", lambda x, hook: torch.zeros_like(x))])
    assert torch.equal(zeroed, torch.zeros_like(zeroed))


def test_to_str_tokens_of_a_batch(model):
    tokens = model.to_tokens(PROMPTS, padding_side="right")
    rows = model.to_str_tokens(tokens)  # TransformerLens raises for batch > 1; moelens: one list per row
    assert rows == [model.to_str_tokens(t) for t in tokens] and len(rows) == 2
    assert model.to_str_tokens(tokens[:1]) == model.to_str_tokens(tokens[0])  # [1, pos]: one list, as TL
    assert model.to_str_tokens(tokens[0].tolist()) == model.to_str_tokens(tokens[0])  # a list of ids: one sequence


def test_loud_errors(model):
    with pytest.raises(TypeError, match="unexpected keyword"):
        model.generate("Tel", max_new_tokens=1, verbose=False, max_new_token=3)  # a typo is not ignored
    with pytest.raises(ValueError, match="mode must be"):
        model.get_token_position(" Mor", "Tel Mor", mode="middle")
    with pytest.raises(TypeError, match="one int token id"):
        model.to_single_str_token("x")
    small = HookedMoETransformer.from_config(model.cfg.replace(d_vocab=100), device="meta")
    with pytest.raises(ValueError, match="index past the embedding"):
        small.set_tokenizer(AutoTokenizer.from_pretrained(str(loading.resolve("moelens-tiny-facts"))))


@pytest.mark.parametrize("side", ["left", "right"])
def test_input_to_embed_resumes_the_forward(model, side):
    model.tokenizer.padding_side = side
    with torch.no_grad():
        residual, tokens, shortformer, mask = model.input_to_embed(PROMPTS)
        assert shortformer is None and torch.equal(tokens, model.to_tokens(PROMPTS))
        assert (mask is not None) == (side == "left")  # TransformerLens masks left padding only
        assert torch.equal(residual, model.W_E[tokens])
        resumed = model(residual, attention_mask=mask, start_at_layer=0)
        real = model.tokenize(PROMPTS, padding_side=side)[1].bool()  # trailing right pads: not masked, not compared
        assert torch.allclose(resumed[real], model(PROMPTS)[real], atol=1e-5)  # masked vs unmasked kernels round apart


@pytest.mark.parametrize("arch", ["qwen3_next", "deepseek_v2_lite", "gpt_oss"])  # linear attention, MLA, sinks
def test_generate_from_embeddings_equals_tokens_on_other_layer_kinds(arch):
    from moelens.testing import tiny_hf_config

    m = HookedMoETransformer.from_config(tiny_hf_config(arch).to_dict(), seed=0)
    x = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(0))
    for cache in (True, False):
        kw = dict(max_new_tokens=3, do_sample=False, verbose=False, stop_at_eos=False, use_past_kv_cache=cache)
        from_tokens = m.generate(x, **kw)
        from_embeds = m.generate(m.W_E[x].detach(), return_type="tokens", **kw)
        assert torch.equal(from_embeds, from_tokens[:, x.shape[1]:]), (arch, cache)
