"""Tracing windows follow ROME's rule exactly (contract, "Causal tracing"), in both engines.

ROME (``experiments/causal_trace.py``, ``trace_important_window``) restores layers
``range(max(0, l - w // 2), min(n_layers, l - (-w // 2)))``: window 10 restores ``l-5 .. l+4``.
Each grid cell is checked against a direct computation with plain TransformerLens hooks.
"""

import math

import pytest
import torch

import moelens
from moelens import FactCase, HookedMoETransformer
from moelens.testing import toy_tokenizer
from moelens.tracing.trace import prepare, window_layers

CASE = FactCase("w5 w9 w14 w3 w77 w21 w8", "w14 w3", "w40", "w41")
N_LAYERS = 7


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from moelens.testing import save_tiny

    d = tmp_path_factory.mktemp("rome_windows")
    save_tiny("qwen3_moe", d, num_hidden_layers=N_LAYERS, mlp_only_layers=[0])
    m = HookedMoETransformer.from_pretrained(d)
    m.tokenizer = toy_tokenizer(256)
    return m


def rome_layers(l, w, n):
    # written out independently of the library: w // 2 layers before l, ceil(w / 2) - 1 after it
    return list(range(max(0, l - w // 2), min(n, l + math.ceil(w / 2))))


def test_window_layers_is_romes_rule():
    assert window_layers(5, 10, 48) == (0, 10)  # l-5 .. l+4
    assert window_layers(20, 10, 48) == (15, 25)
    assert window_layers(20, 4, 48) == (18, 22)  # l-2 .. l+1
    assert window_layers(20, 3, 48) == (19, 22)  # l-1 .. l+1
    assert window_layers(47, 10, 48) == (42, 48)  # clipped, not shifted
    for w in range(1, 13):
        for l in range(12):
            lo, hi = window_layers(l, w, 12)
            assert list(range(lo, hi)) == rome_layers(l, w, 12)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="window"):
            window_layers(3, bad, 12)


def direct_grid(model, setup, w, positions):
    """Restore the clean hook_mlp_out at each (layer window, position) with plain hooks."""
    clean = setup.clean_cache
    batch = setup.tokens.expand(setup.n_samples, -1)
    out = torch.empty(N_LAYERS, len(positions))
    corrupt = setup.corrupt()
    from moelens import patching as P

    (embed_name, embed_fn), = P.to_hooks(model, [corrupt])
    for l in range(N_LAYERS):
        for j, p in enumerate(positions):
            hooks = [(embed_name, embed_fn)]
            for layer in rome_layers(l, w, N_LAYERS):
                name = f"blocks.{layer}.hook_mlp_out"

                def restore(act, hook, name=name, p=p):
                    act = act.clone()
                    act[:, p] = clean[name][0, p]
                    return act

                hooks.append((name, restore))
            with torch.no_grad():
                logits = model.run_with_hooks(batch, fwd_hooks=hooks)
            out[l, j] = setup.metric(logits).mean()
    return out


@pytest.mark.parametrize("w", range(1, 13))
def test_every_window_matches_a_direct_computation(model, w):
    setup = prepare(model, CASE, seed=0, n_samples=2)
    positions = [2, 6]
    ref = direct_grid(model, setup, w, positions)
    for engine in ("suffix", "full"):
        r = moelens.trace_layers(model, setup, window=w, positions=positions, engine=engine, progress=False)
        assert (r.scores - ref).abs().max() < 1e-4, (engine, w)
    # the windows matter: for an even window the old centring (l-4 .. l+5 for w=10) differs
    if w in (2, 4):
        assert (ref - ref.roll(1, 0)).abs().max() > 1e-3


def test_subject_std_both_tokenizations(model):
    """'moelens': the noised subject tokens only; 'rome': ROME's collect_embedding_std, which embeds
    ``tokenizer.encode(subject)`` and so includes the special tokens the tokenizer adds (here <bos>)."""
    from moelens.tracing.trace import subject_embedding_std

    cases = [CASE, FactCase("w7 w8 w9", "w8 w9", "w1", "w2")]
    W = model.W_E.detach()
    ours = subject_embedding_std(model, cases)
    assert ours == pytest.approx(float(W[[14, 3, 8, 9]].std()), rel=1e-6)
    bos = model.tokenizer.bos_token_id
    rome = subject_embedding_std(model, cases, tokenization="rome")
    assert rome == pytest.approx(float(W[[bos, 14, 3, bos, 8, 9]].std()), rel=1e-6)
    assert rome != pytest.approx(ours, rel=1e-3)
    with pytest.raises(ValueError, match="tokenization"):
        subject_embedding_std(model, cases, tokenization="gpt")
