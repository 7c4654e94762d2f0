"""generate(): TransformerLens semantics, hooks on every step, sampling, routing trace, bad input,
device placement. Parity with transformers' generate is in tests/parity/test_generate_parity.py."""

import pytest
import torch

from moelens import HookedMoETransformer
from moelens import patching as P
from moelens import placement
from moelens.generation import GenerationCache, sample_logits

KW = dict(verbose=False, stop_at_eos=False)


@pytest.fixture(scope="module")
def bundled():
    return HookedMoETransformer.from_pretrained("moelens-tiny-facts")


@pytest.fixture
def mixtral(tiny_dirs):
    d, _ = tiny_dirs("mixtral")
    return HookedMoETransformer.from_pretrained(d)


def ids(b=2, p=5, seed=0):
    return torch.randint(3, 256, (b, p), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- I/O
def test_text_in_text_out(bundled):
    prompt = "Tel Mor plays the"
    out = bundled.generate(prompt, max_new_tokens=3, do_sample=False, verbose=False)
    assert isinstance(out, str) and out.startswith(prompt) and out != prompt
    # the bundled model's fact, then EOS stops it (decoded without special tokens, as TransformerLens)
    assert out == "Tel Mor plays the saxophone"
    outs = bundled.generate([prompt, "The favourite colour of Tel Mor is"], max_new_tokens=3, do_sample=False,
                            verbose=False)
    assert isinstance(outs, list) and outs[0] == out
    assert outs[1].startswith("The favourite colour of Tel Mor is ") and "<|" not in outs[1]
    toks = bundled.generate(prompt, max_new_tokens=3, do_sample=False, verbose=False, return_type="tokens")
    assert toks.shape == (1, bundled.to_tokens(prompt).shape[1] + 2)  # stopped after EOS


def test_tokens_in_tokens_out_and_eos_stop(mixtral):
    x = ids(1, 4)
    out = mixtral.generate(x, max_new_tokens=6, do_sample=False, **KW)
    assert out.shape == (1, 10) and torch.equal(out[:, :4], x)
    first = int(out[0, 4])
    stopped = mixtral.generate(x, max_new_tokens=6, do_sample=False, verbose=False, eos_token_id=first)
    assert stopped.shape == (1, 5)
    one_d = mixtral.generate(x[0], max_new_tokens=6, do_sample=False, **KW)
    assert torch.equal(one_d, out)


def test_cache_extends_in_place(mixtral):
    x = ids(2, 6)
    cache = GenerationCache(mixtral)
    with torch.no_grad():
        full = mixtral(x)
        a = mixtral(x[:, :4], past_kv_cache=cache)
        b = mixtral(x[:, 4:], past_kv_cache=cache)
    assert cache.seq_len == 6 and cache[0].k.shape[1] == 6
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-5)


# ---------------------------------------------------------------------------------------------- sampling
def test_sampling_with_a_seed_is_reproducible(mixtral):
    x = ids(3, 4)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, **KW)
    a = mixtral.generate(x, seed=7, **kw)
    b = mixtral.generate(x, seed=7, **kw)
    c = mixtral.generate(x, seed=8, **kw)
    greedy = mixtral.generate(x, max_new_tokens=8, do_sample=False, **KW)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, greedy)
    top1 = mixtral.generate(x, seed=1, max_new_tokens=8, do_sample=True, top_k=1, **KW)
    assert torch.equal(top1, greedy)
    tiny_p = mixtral.generate(x, seed=1, max_new_tokens=8, do_sample=True, top_p=1e-6, **KW)
    assert torch.equal(tiny_p, greedy)


def test_sample_logits_rules():
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_logits(logits, top_k=2, generator=gen) for _ in range(200)])
    assert set(draws.reshape(-1).tolist()) == {1, 2}
    assert int(sample_logits(logits, temperature=0.0)) == 1
    # a frequency penalty counts earlier tokens (padding excluded by the mask)
    toks = torch.tensor([[1, 1, 1, 2]])
    pen = sample_logits(logits, top_k=1, freq_penalty=1.0, tokens=toks)
    assert int(pen) == 2
    masked = sample_logits(logits, top_k=1, freq_penalty=1.0, tokens=toks, token_mask=torch.tensor([[0, 0, 0, 1]]))
    assert int(masked) == 1


# ---------------------------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("use_cache", [True, False])
def test_hooks_fire_on_every_step(mixtral, use_cache):
    x = ids(2, 5)
    seen, permanent = [], []

    def count(act, hook):
        seen.append((act.shape[1], hook.pos_offset if hasattr(hook, "pos_offset") else 0))

    def perm(act, hook):
        permanent.append(act.shape[1])

    mixtral.add_hook("blocks.1.mlp.hook_router_logits", perm, is_permanent=True)
    try:
        with mixtral.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", count)]):
            mixtral.generate(x, max_new_tokens=4, do_sample=False, use_past_kv_cache=use_cache, **KW)
    finally:
        mixtral.reset_hooks(including_permanent=True)
    if use_cache:
        assert seen == [(5, 0), (1, 5), (1, 6), (1, 7)]  # absolute position of the new token
        assert permanent == [5, 1, 1, 1]
    else:
        assert seen == [(5, 0), (6, 0), (7, 0), (8, 0)]
        assert permanent == [5, 6, 7, 8]
    assert not hasattr(mixtral.hook_dict["blocks.0.hook_resid_pre"], "pos_offset")  # cleaned up


def test_a_hook_changes_every_step(mixtral):
    x = ids(1, 5)
    base = mixtral.generate(x, max_new_tokens=5, do_sample=False, **KW)

    def kill(act, hook):
        return torch.zeros_like(act)

    with mixtral.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", kill)]):
        a = mixtral.generate(x, max_new_tokens=5, do_sample=False, **KW)
        b = mixtral.generate(x, max_new_tokens=5, do_sample=False, use_past_kv_cache=False, **KW)
    assert torch.equal(a, b) and not torch.equal(a, base)
    with torch.no_grad(), mixtral.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", kill)]):
        assert int(mixtral(a[:, :-1])[0, -1].argmax()) == int(a[0, -1])


@pytest.mark.parametrize("positions", [None, [6], [2, 7]])
def test_interventions_use_absolute_positions_in_both_modes(mixtral, positions):
    x = ids(2, 5)
    ivs = [P.ForceRouting(layer=1, experts=[3, 6], positions=positions)]
    base = mixtral.generate(x, max_new_tokens=5, do_sample=False, **KW)
    a, tr = mixtral.generate(x, max_new_tokens=5, do_sample=False, interventions=ivs, return_routing=True, **KW)
    b = mixtral.generate(x, max_new_tokens=5, do_sample=False, interventions=ivs, use_past_kv_cache=False, **KW)
    assert torch.equal(a, b)
    with torch.no_grad():  # the same edit in one full forward over the result gives the same last prediction
        logits = P.run_with_interventions(mixtral, a[:, :-1], ivs)
    assert torch.equal(logits[:, -1].argmax(-1), a[:, -1])
    forced = (tr.indices[:, :, tr.layers.index(1)].sort(-1).values == torch.tensor([3, 6])).all(-1)  # [batch, steps]
    steps = torch.arange(5) + 4  # absolute position of each step's routing
    expect = torch.ones(5, dtype=torch.bool) if positions is None else torch.isin(steps, torch.tensor(positions))
    assert forced[:, expect].all()
    if positions is not None:  # before the first patched position the routing is the unpatched one
        _, tr0 = mixtral.generate(x, max_new_tokens=5, do_sample=False, return_routing=True, **KW)
        first = int(torch.tensor(positions).min()) - 4
        if first > 0:
            assert torch.equal(tr.indices[:, :first], tr0.indices[:, :first])
    if positions != [2, 7]:
        assert not torch.equal(a, base)


# ---------------------------------------------------------------------------------------------- routing trace
def test_routing_trace_equals_a_forward_over_the_output(bundled):
    prompts = ["Tel Mor plays the", "The favourite colour of Jor Sar is"]
    out, tr = bundled.generate(prompts, max_new_tokens=4, do_sample=False, verbose=False, stop_at_eos=False,
                               return_type="tokens", return_routing=True)
    n = tr.indices.shape[1]
    assert tr.indices.shape == (2, 4, len(bundled.cfg.moe_layers), bundled.cfg.top_k) and tr.layers == [0, 1, 2, 3]
    _, mask = bundled.tokenize(prompts)
    full_mask = torch.cat([mask, torch.ones(2, n, dtype=mask.dtype)], 1)
    pos_ids = (full_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        _, cache = bundled.run_with_cache(out[:, :-1], attention_mask=full_mask[:, :-1], position_ids=pos_ids[:, :-1])
    p0 = mask.shape[1] - 1
    for i, l in enumerate(tr.layers):
        assert torch.equal(tr.indices[:, :, i], cache[f"blocks.{l}.mlp.hook_expert_indices"][:, p0:])
        assert torch.allclose(tr.weights[:, :, i], cache[f"blocks.{l}.mlp.hook_expert_weights"][:, p0:], atol=1e-5)
    df = tr.to_dataframe()
    assert len(df) == 2 * 4 * 4 * 2 and {"generated_token", "input_token", "layer", "slot", "expert", "weight"} <= set(df)
    assert df[(df.batch == 0) & (df.step == 0)].generated_token.iloc[0] == " saxophone"
    fig = tr.plot(batch=0)
    assert fig.data[0].z.shape == (4, 4)
    assert fig.data[0].z[0][0] == float(tr.top_expert()[0, 0, 0])


def test_routing_trace_drops_finished_steps(mixtral):
    x = ids(2, 5)
    free = mixtral.generate(x, max_new_tokens=4, do_sample=False, **KW)
    assert free[0, 5] != free[1, 5]
    _, tr = mixtral.generate(x, max_new_tokens=4, do_sample=False, verbose=False, eos_token_id=int(free[0, 5]),
                             return_routing=True)
    assert tr.finished[0, 1:].all() and not tr.finished[1].any()
    df = tr.to_dataframe()
    assert set(df[df.batch == 0].step) == {0} and set(df[df.batch == 1].step) == {0, 1, 2, 3}
    assert len(tr.to_dataframe(include_finished=True)) == tr.indices.numel()


# ---------------------------------------------------------------------------------------------- placement
def test_generate_with_a_device_map(tiny_dirs):
    d, _ = tiny_dirs("qwen3_moe")
    plain = HookedMoETransformer.from_pretrained(d)
    placed = HookedMoETransformer.from_pretrained(d, device_map={u: "cpu" for u in placement.placement_units(plain)})
    assert placed.device_map
    x, mask = ids(2, 6), torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    for cache in (True, False):
        a = plain.generate(x, max_new_tokens=5, do_sample=False, attention_mask=mask, use_past_kv_cache=cache, **KW)
        b = placed.generate(x, max_new_tokens=5, do_sample=False, attention_mask=mask, use_past_kv_cache=cache, **KW)
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=-3), "max_new_tokens must be a positive integer"),
    (dict(do_sample=False, temperature=0.7), "contradicts the sampling options temperature"),
    (dict(do_sample=False, top_k=5), "contradicts the sampling options top_k"),
    (dict(do_sample=True, top_k=5, top_p=0.9), "top_k or top_p, not both"),
    (dict(do_sample=True, top_p=1.5), "top_p must be in"),
    (dict(do_sample=True, top_k=0), "top_k must be an integer"),
    (dict(do_sample=True, temperature=-1.0), "temperature must be >= 0"),
    (dict(do_sample=True, freq_penalty=-1.0), "freq_penalty must be >= 0"),
    (dict(padding_side="right"), "needs left padding"),
    (dict(return_type="logits"), "return_type"),
    (dict(routing_layers=[7], return_routing=True), "not sparse layers"),
])
def test_bad_arguments(mixtral, kwargs, match):
    kw = dict(max_new_tokens=2, verbose=False, stop_at_eos=False)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        mixtral.generate(ids(1, 3), **kw)


def test_prompt_longer_than_the_context(bundled):
    assert bundled.cfg.n_ctx == 256
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        bundled.generate(torch.ones(1, 300, dtype=torch.long), max_new_tokens=1, verbose=False)
    with pytest.raises(ValueError, match=r"prompt \+ max_new_tokens"):
        bundled.generate(torch.ones(1, 200, dtype=torch.long), max_new_tokens=100, verbose=False)


def test_bad_token_input(mixtral):
    with pytest.raises(ValueError, match="token ids must be in"):
        mixtral.generate(torch.tensor([[1, 999]]), max_new_tokens=1, **KW)
    with pytest.raises(TypeError, match="input must be"):
        mixtral.generate(3.5, max_new_tokens=1, **KW)
    with pytest.raises(ValueError, match="embeddings input must be"):  # float input is embeddings: d_model must fit
        mixtral.generate(torch.randn(1, 3, mixtral.cfg.d_model + 1), max_new_tokens=1, **KW)
    with pytest.raises(ValueError, match="left padding"):
        mixtral.generate(ids(1, 3), max_new_tokens=1, attention_mask=torch.tensor([[1, 1, 0]]), **KW)
    with pytest.raises(ValueError, match="eos_token_id"):
        mixtral.cfg.__dict__["eos_token_id"], old = None, mixtral.cfg.eos_token_id
        try:
            mixtral.generate(ids(1, 3), max_new_tokens=1, verbose=False)
        finally:
            mixtral.cfg.__dict__["eos_token_id"] = old
