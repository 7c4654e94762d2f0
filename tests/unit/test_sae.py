"""SAE splicing: a small SAE trained here on the bundled model's residual stream."""

import json
from pathlib import Path

import pytest
import torch

from moelens import HookedMoETransformer
from moelens.sae import TinySAE, add_sae, remove_saes, splice_saes, train_sae

BUNDLED = Path(__file__).resolve().parents[2] / "moelens" / "bundled" / "moelens-tiny-facts"
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def trained():
    model = HookedMoETransformer.from_pretrained("moelens-tiny-facts")
    lines = (BUNDLED / "facts.jsonl").read_text().splitlines()[:400:4]
    prompts = []
    for line in lines:
        rw = json.loads(line)["requested_rewrite"]
        prompts.append(rw["prompt"].format(rw["subject"]))
    tokens, mask = model.tokenize(prompts)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=[HOOK])
    acts = cache[HOOK][mask.bool()]
    torch.manual_seed(0)
    sae = TinySAE(model.cfg.d_model, 4 * model.cfg.d_model, seed=0)
    before = (sae(acts) - acts).pow(2).sum(-1).mean().item()
    losses = train_sae(sae, acts, steps=150, lr=5e-3, l1=3e-3, batch_size=128)
    return model, sae, acts, before, losses, prompts


def test_sae_trains_on_the_residual_stream(trained):
    model, sae, acts, before, losses, _ = trained
    with torch.no_grad():
        mse = (sae(acts) - acts).pow(2).sum(-1).mean().item()
        explained = 1 - mse / (acts - acts.mean(0)).pow(2).sum(-1).mean().item()
        l0 = (sae.encode(acts) > 0).float().sum(-1).mean().item()
    assert mse < 0.2 * before and explained > 0.8, (mse, before, explained)
    assert l0 < sae.W_enc.shape[1] / 2  # sparse


def test_splice_with_error_term_is_exact_and_without_is_not(trained):
    model, sae, _, _, _, prompts = trained
    tokens = model.to_tokens(prompts[:4])
    names_before = list(model.hook_dict)
    with torch.no_grad():
        plain = model(tokens)
        with splice_saes(model, {HOOK: sae}) as spliced:
            assert f"{HOOK}.sae.hook_sae_acts" in model.hook_dict
            torch.testing.assert_close(model(tokens), plain, atol=1e-5, rtol=1e-5)
            _, cache = model.run_with_cache(tokens)
            feats = cache[f"{HOOK}.sae.hook_sae_acts"]
            assert feats.shape == (4, tokens.shape[1], 4 * model.cfg.d_model)
            torch.testing.assert_close(cache[f"{HOOK}.sae.hook_sae_recon"] + cache[f"{HOOK}.sae.hook_sae_error"],
                                       cache[f"{HOOK}.sae.hook_sae_input"], atol=1e-5, rtol=1e-5)
            assert spliced[HOOK].use_error_term
        assert list(model.hook_dict) == names_before
        assert torch.equal(model(tokens), plain)
        with splice_saes(model, {HOOK: sae}, use_error_term=False):
            recon_only = model(tokens)
        assert (recon_only - plain).abs().max() > 1e-3


def test_patching_a_feature_changes_the_output_by_its_decoded_difference(trained):
    model, sae, _, _, _, prompts = trained
    tokens = model.to_tokens(prompts[:2])
    with torch.no_grad():
        add_sae(model, HOOK, sae)
        try:
            _, clean = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(HOOK))
            feats = clean[f"{HOOK}.sae.hook_sae_acts"]
            f = int(feats[0, -1].argmax())

            def ablate(acts, hook):
                acts[:, -1, f] = 0
                return acts

            _, patched = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(HOOK),
                                              fwd_hooks=[(f"{HOOK}.sae.hook_sae_acts", ablate)])
            delta = patched[f"{HOOK}.sae.hook_sae_output"] - clean[f"{HOOK}.sae.hook_sae_output"]
            want = torch.zeros_like(delta)
            want[:, -1] = -feats[:, -1, f, None] * sae.W_dec[f]
            torch.testing.assert_close(delta, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(patched[f"{HOOK}.sae.hook_sae_error"], clean[f"{HOOK}.sae.hook_sae_error"])
            # the host hook sees the spliced output
            assert torch.equal(patched[HOOK], patched[f"{HOOK}.sae.hook_sae_output"])
            with pytest.raises(ValueError, match="already spliced"):
                add_sae(model, HOOK, sae)
        finally:
            remove_saes(model)
        assert not any(".sae." in n for n in model.hook_dict)
        assert not model.hook_dict[HOOK].fwd_hooks


def test_bad_sae_and_bad_hook_name(trained):
    model = trained[0]
    with pytest.raises(TypeError, match="encode"):
        add_sae(model, HOOK, torch.nn.Linear(4, 4))
    with pytest.raises(KeyError, match="Did you mean"):
        add_sae(model, "blocks.1.hook_resid_pots", trained[1])
