"""Input guards: bad input is an error that says what to do, never a silently wrong number."""


import pytest
import torch

import moelens
from moelens import FactCase, HookedMoETransformer
from moelens import patching as P
from moelens.cli import main
from moelens.loading import CheckpointError, bundled_models
from moelens.tracing import load_facts

CASE = FactCase("Tel Mor plays the", "Tel Mor", "saxophone", "trombone")


@pytest.fixture(scope="module")
def model():
    return HookedMoETransformer.from_pretrained("moelens-tiny-facts")


def test_zero_noise_samples(model):
    with pytest.raises(ValueError, match="n_samples=0"):
        moelens.trace_layers(model, CASE, n_samples=0)
    with pytest.raises(ValueError, match="noise must be"):
        moelens.trace_layers(model, CASE, noise=torch.zeros(0, 2, model.cfg.d_model))


@pytest.mark.parametrize("argv,match", [
    (["--samples", "0"], "n_samples=0"),
    (["--n-facts", "0"], "n_facts=0"),
    (["--n-facts", "-2"], "n_facts=-2"),
    (["--n-facts", "7"], "n_facts=7: .* has 6"),
])
def test_demo_counts(tmp_path, capsys, argv, match):
    assert main(["demo", "--out", str(tmp_path / "d"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    import re

    assert re.search(match, err[0])


def test_demo_applies_the_protocols_filter(model):
    from moelens.demo import choose_facts
    from moelens.tracing.protocol import ProtocolConfig

    facts = load_facts(bundled_models()["moelens-tiny-facts"] / "facts.jsonl")
    # with seed 2 the fifth relation's first fact ('Mal Hev competes ...') has a negative noise drop
    chosen, setups, skipped = choose_facts(model, facts, 5, 5, seed=2)
    cfg = ProtocolConfig()
    assert skipped >= 1 and len({c.relation for c in chosen}) == 5
    for i, (case, s) in enumerate(zip(chosen, setups)):
        assert s.clean >= cfg.min_clean and s.clean - s.corrupted >= cfg.min_drop
        assert s.settings["seed"] == 2 + i


def test_target_true_equal_to_foil_is_an_error(model):
    with pytest.raises(ValueError, match="is the true target"):
        FactCase("Tel Mor plays the", "Tel Mor", "saxophone", "saxophone")
    with pytest.raises(ValueError, match="is the true target"):
        FactCase("Tel Mor plays the", "Tel Mor", "saxophone", " saxophone ")
    # different strings with the same first token: the contrast is 0 in every run, so tracing refuses
    from moelens.testing import toy_tokenizer

    model.tokenizer, real = toy_tokenizer(model.cfg.d_vocab), model.tokenizer
    try:
        with pytest.raises(ValueError, match="same first token"):
            moelens.trace_layers(model, FactCase("w1 w2 w3", "w2", "w9", "w9 w10"))
    finally:
        model.tokenizer = real


def test_truncated_safetensors_names_the_file(tmp_path):
    import shutil

    src = bundled_models()["moelens-tiny-facts"]
    d = tmp_path / "m"
    shutil.copytree(src, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{d / 'model.safetensors'}.*truncated"):
        HookedMoETransformer.from_pretrained(d)


def test_force_routing_same_expert_twice(model):
    tokens = model.to_tokens("Tel Mor plays the")
    with pytest.raises(ValueError, match="same expert twice"):
        P.run_with_interventions(model, tokens, [P.ForceRouting(3, [1, 1])])
    P.run_with_interventions(model, tokens, [P.ForceRouting(3, [1, 2])])


def test_hook_name_suggestions(model):
    with pytest.raises(KeyError, match="Did you mean 'blocks.2.hook_mlp_out'"):
        P.Replace("mlp_outt", source={}, layer=2).hooks(model)
    with pytest.raises(KeyError) as err:
        P.hook_name(model, "expert_indice", layer=2)
    msg = str(err.value)
    assert "Did you mean 'blocks.2.mlp.hook_expert_indices'" in msg
    assert "blocks.3." not in msg and "blocks.1." not in msg  # the layer asked for, not others
    _, cache = model.run_with_cache("Tel Mor plays the")
    with pytest.raises(KeyError, match="Did you mean 'blocks.2.mlp.hook_router_logits'"):
        cache["blocks.2.mlp.hook_router_logit"]


def test_one_indexing_rule_negative_counts_from_the_end(model):
    """Layers, experts, slots and positions all follow Python's rule, in every API."""
    L, E = model.cfg.n_layers, model.cfg.n_experts
    tokens = model.to_tokens("Tel Mor plays the")
    _, cache = model.run_with_cache(tokens)

    def run(iv):
        return P.run_with_interventions(model, tokens, iv)

    same = [
        ([P.Replace("mlp_out", layer=-1, positions=[-1], source=torch.zeros_like(cache["blocks.3.hook_mlp_out"]))],
         [P.Replace("mlp_out", layer=L - 1, positions=[tokens.shape[1] - 1],
                    source=torch.zeros_like(cache["blocks.3.hook_mlp_out"]))]),
        ([P.AblateExpert(-1, [-1, -3])], [P.AblateExpert(L - 1, [E - 1, E - 3])]),
        ([P.ForceRouting(-2, [-1, 0])], [P.ForceRouting(L - 2, [E - 1, 0])]),
        ([P.Replace("router_logits", layer=-1, experts=[-1], source=torch.zeros(1, tokens.shape[1], E))],
         [P.Replace("router_logits", layer=L - 1, experts=[E - 1], source=torch.zeros(1, tokens.shape[1], E))]),
        ([P.Replace("expert_weights", layer=-1, slots=[-1], source=torch.zeros(1, tokens.shape[1], model.cfg.top_k))],
         [P.Replace("expert_weights", layer=L - 1, slots=[model.cfg.top_k - 1],
                    source=torch.zeros(1, tokens.shape[1], model.cfg.top_k))]),
    ]
    base = model(tokens)
    for neg, pos in same:
        a, b = run(neg), run(pos)
        assert torch.equal(a, b) and not torch.equal(a, base)
    assert P.hook_name(model, "expert_indices", layer=-1) == f"blocks.{L - 1}.mlp.hook_expert_indices"
    assert torch.equal(cache.expert_contribution(-1, -1), cache.expert_contribution(L - 1, E - 1))
    assert cache.routing(-1)["score"].notna().all()
    setup = moelens.prepare(model, CASE, seed=0, n_samples=2)
    a = moelens.trace_experts(model, setup, -1, experts=[-1], progress=False)
    b = moelens.trace_experts(model, setup, L - 1, experts=[E - 1], progress=False)
    assert a.layer == L - 1 and torch.equal(a.scores.nan_to_num(), b.scores.nan_to_num())
    assert moelens.trace_layers(model, setup, layers=[-1], positions=[-1], progress=False).layers == [L - 1]
    for bad in (L, -L - 1):
        with pytest.raises(IndexError, match=f"layer={bad} out of range"):
            run([P.AblateExpert(bad, [0])])
        with pytest.raises(IndexError, match=f"layer={bad} out of range"):
            moelens.trace_experts(model, setup, bad)
    with pytest.raises(IndexError, match="expert"):
        run([P.AblateExpert(-1, [-E - 1])])
    with pytest.raises(IndexError, match="integer"):
        run([P.AblateExpert(1.0, [0])])
