"""Expert steering (SteerMoE's router-logit rule, forced routing) and the paired detector."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from moelens import HookedMoETransformer
from moelens import patching as P
from moelens.steering import SteerExperts, detect_experts, routing_frequencies, steering_from_ranking

KW = dict(verbose=False, stop_at_eos=False, do_sample=False)


@pytest.fixture(scope="module")
def bundled():
    return HookedMoETransformer.from_pretrained("moelens-tiny-facts")


@pytest.fixture
def qwen3(tiny_dirs):
    d, _ = tiny_dirs("qwen3_moe")
    return HookedMoETransformer.from_pretrained(d)


def ids(b=2, p=5, seed=0):
    return torch.randint(3, 256, (b, p), generator=torch.Generator().manual_seed(seed))


def steermoe_reference(router_logits, manual):
    """The edit of SteerMoE's reference code (src/modeling_vllm/qwen3_moe.py), on [tokens, experts]."""
    routing_weights = torch.nn.functional.log_softmax(router_logits, dim=-1)
    max_per_tok = routing_weights.max(dim=-1).values.unsqueeze(-1)
    min_per_tok = routing_weights.min(dim=-1).values.unsqueeze(-1)
    pos_mask = (manual > 0).unsqueeze(0)
    neg_mask = (manual < 0).unsqueeze(0)
    routing_weights[:, pos_mask.squeeze(0)] = max_per_tok + 0.01
    routing_weights[:, neg_mask.squeeze(0)] = min_per_tok - 0.01
    return routing_weights


def test_logit_rule_is_steermoes(qwen3):
    x = ids()
    layer = qwen3.cfg.moe_layers[0]
    iv = SteerExperts(layer=layer, activate=[2, 5], deactivate=[0, 7])
    with torch.no_grad():
        _, clean = qwen3.run_with_cache(x, names_filter=f"blocks.{layer}.mlp.hook_router_logits")
        _, steered = qwen3.run_with_cache(x, fwd_hooks=P.to_hooks(qwen3, [iv]),
                                          names_filter=lambda n: n.startswith(f"blocks.{layer}.mlp."))
    logits = clean[f"blocks.{layer}.mlp.hook_router_logits"]
    manual = torch.zeros(qwen3.cfg.n_experts)
    manual[[2, 5]], manual[[0, 7]] = 1, -1
    want = steermoe_reference(logits.reshape(-1, logits.shape[-1]).clone(), manual).reshape(logits.shape)
    assert torch.allclose(steered[f"blocks.{layer}.mlp.hook_router_logits"], want, atol=1e-6)
    chosen = steered[f"blocks.{layer}.mlp.hook_expert_indices"]
    assert torch.isin(torch.tensor([2, 5]), chosen[0, 0]).all()
    assert not torch.isin(chosen, torch.tensor([0, 7])).any()


@pytest.mark.parametrize("method", ["logits", "route"])
def test_steering_holds_at_every_generated_step(qwen3, method):
    x = ids(2, 4)
    layer = qwen3.cfg.moe_layers[-1]
    base_out, base = qwen3.generate(x, max_new_tokens=6, return_routing=True, **KW)
    # steer toward experts the unsteered run rarely uses at this layer, away from its favourite
    li = base.layers.index(layer)
    counts = torch.bincount(base.indices[:, :, li].reshape(-1), minlength=qwen3.cfg.n_experts)
    rare, fav = counts.argsort()[:1].tolist(), counts.argsort()[-1:].tolist()
    iv = SteerExperts(layer=layer, activate=rare, deactivate=fav, method=method)
    out, tr = qwen3.generate(x, max_new_tokens=6, return_routing=True, interventions=[iv], **KW)
    uncached = qwen3.generate(x, max_new_tokens=6, interventions=[iv], use_past_kv_cache=False, **KW)
    assert torch.equal(out, uncached)
    chosen = tr.indices[:, :, li]
    assert (chosen == rare[0]).any(-1).all() and not (chosen == fav[0]).any()
    assert not torch.equal(tr.indices, base.indices)
    if method == "route":  # weights follow the architecture's rule from the unedited scores
        with torch.no_grad():
            _, c = qwen3.run_with_cache(out[:, :-1], fwd_hooks=P.to_hooks(qwen3, [iv]))
        s = c[f"blocks.{layer}.mlp.hook_router_scores"]
        idx = c[f"blocks.{layer}.mlp.hook_expert_indices"]
        w = s.gather(-1, idx)
        w = w / w.sum(-1, keepdim=True)  # norm_topk_prob=True in the tiny Qwen3 config
        assert torch.allclose(c[f"blocks.{layer}.mlp.hook_expert_weights"], w, atol=1e-6)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(layer=1, activate=[8]), IndexError, r"expert \[8\] out of range"),
    (dict(layer=1, deactivate=[-9]), IndexError, "out of range"),
    (dict(layer=1, activate=[1], deactivate=[1]), ValueError, "both activated and deactivated"),
    (dict(layer=1, activate=[0, 1, 2, 3, 4]), ValueError, "only top_k=4"),
    (dict(layer=1), ValueError, "needs experts"),
    (dict(layer=0, activate=[1]), ValueError, "dense"),
    (dict(layer=9, activate=[1]), IndexError, "out of range"),
    (dict(activate=[1]), ValueError, "layer= or layers="),
    (dict(layer=1, activate=[1], method="bias"), ValueError, "method="),
])
def test_bad_steering(qwen3, kwargs, err, match):
    with pytest.raises(err, match=match):
        qwen3.generate(ids(1, 3), max_new_tokens=2, interventions=[SteerExperts(**kwargs)], **KW)


def test_sigmoid_router_steers_by_route_only(tiny_dirs):
    d, _ = tiny_dirs("deepseek_v3")
    model = HookedMoETransformer.from_pretrained(d)
    assert model.cfg.router_score_func == "sigmoid"
    layer = model.cfg.moe_layers[0]
    with pytest.raises(ValueError, match="use method='route'"):
        model.generate(ids(1, 3), max_new_tokens=2, interventions=[SteerExperts(layer=layer, activate=[1])], **KW)
    iv = SteerExperts(layer=layer, activate=[1], deactivate=[2], method="route")
    _, tr = model.generate(ids(2, 4), max_new_tokens=4, interventions=[iv], return_routing=True, **KW)
    chosen = tr.indices[:, :, tr.layers.index(layer)]
    assert (chosen == 1).any(-1).all() and not (chosen == 2).any()


def test_detector_paired_statistic(bundled):
    subjects = ["Tel Mor", "Jor Sar", "Mal Quil", "Vel Zar", "Kor Jor", "Bra Mor"]
    a = [f"{s} plays the" for s in subjects]
    b = [f"{s} works as a" for s in subjects]
    df = detect_experts(bundled, a, b, positions="last")
    assert len(df) == 4 * 8 and list(df["risk_diff"].abs()) == sorted(df["risk_diff"].abs(), reverse=True)
    fa = routing_frequencies(bundled, a, positions="last")
    fb = routing_frequencies(bundled, b, positions="last")
    assert fa.shape == (6, 4, 8) and torch.allclose(fa.sum(-1), torch.full((6, 4), 2.0))  # top_k per token
    for row in df.head(5).itertuples():
        da, db = fa[:, row.layer, row.expert].numpy(), fb[:, row.layer, row.expert].numpy()
        assert row.freq_a == pytest.approx(da.mean()) and row.risk_diff == pytest.approx(da.mean() - db.mean())
        if np.std(da - db) > 0:
            ref = stats.ttest_rel(da, db)
            assert row.t == pytest.approx(ref.statistic) and row.p == pytest.approx(ref.pvalue)
    assert df["risk_diff"].abs().iloc[0] > 0.5  # the two relations route differently at the last token
    # all-token frequencies weight prompts by their real tokens (padding excluded)
    fall = routing_frequencies(bundled, a + b)
    assert torch.allclose(fall.sum(-1), torch.full((12, 4), 2.0))
    with pytest.raises(ValueError, match="equal sizes"):
        detect_experts(bundled, a, b[:-1])


def test_steering_from_ranking_caps_activations_per_layer():
    df = pd.DataFrame({"layer": [1, 1, 1, 2, 2], "expert": [0, 1, 2, 3, 4],
                       "risk_diff": [0.9, 0.8, 0.7, -0.6, -0.5]})
    ivs = steering_from_ranking(df, n_activate=3, n_deactivate=2, top_k=2)
    assert [(i.layer, list(i.activate), list(i.deactivate)) for i in ivs] == [(1, [0, 1], []), (2, [], [3, 4])]
    rev = steering_from_ranking(df, n_activate=1, n_deactivate=1, reverse=True)
    assert [(i.layer, list(i.activate), list(i.deactivate)) for i in rev] == [(1, [], [0]), (2, [3], [])]
    with pytest.raises(ValueError, match="asked for 4 activated"):
        steering_from_ranking(df, n_activate=4)


def test_logit_rule_keeps_its_margins_in_bf16(tiny_dirs):
    """In bf16, max(lp) + 0.01 / min(lp) - 0.01 round back to ties once |lp| >= 4 (spacing 1/32):
    deactivated experts were then still chosen at some tokens."""
    d, _ = tiny_dirs("mixtral")
    model = HookedMoETransformer.from_pretrained(d, dtype=torch.bfloat16)
    layer, k, n = model.cfg.moe_layers[-1], model.cfg.top_k, model.cfg.n_experts
    x = torch.randint(3, 250, (4, 9), generator=torch.Generator().manual_seed(1))
    off = list(range(n - k))  # leaves exactly top_k experts
    name = f"blocks.{layer}.mlp.hook_expert_indices"
    with torch.no_grad():
        _, c = model.run_with_cache(x, fwd_hooks=P.to_hooks(model, [SteerExperts(layer=layer, deactivate=off)]),
                                    names_filter=[name, f"blocks.{layer}.mlp.hook_router_logits"])
    assert c[f"blocks.{layer}.mlp.hook_router_logits"].dtype == torch.bfloat16
    assert not torch.isin(c[name], torch.tensor(off)).any()
    on = list(range(n - k, n))
    with torch.no_grad():
        _, c = model.run_with_cache(x, fwd_hooks=P.to_hooks(model, [SteerExperts(layer=layer, activate=on)]),
                                    names_filter=[name])
    assert (c[name].sort(-1).values == torch.tensor(on)).all()


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2_full", "glm4_moe", "mixtral", "granitemoe", "minimax_m2",
                                  "ernie4_5_moe", "phimoe", "llama4", "gemma4", "flex_olmo"])
def test_route_changes_only_the_steered_experts(tiny_dirs, arch):
    """method='route' on group-limited routers: deactivating an expert a token did not choose must leave
    that token's routing alone (it used to re-rank every token without the group limits)."""
    d, _ = tiny_dirs(arch)
    model = HookedMoETransformer.from_pretrained(d)
    layer, n = model.cfg.moe_layers[0], model.cfg.n_experts
    x = torch.randint(3, 250, (4, 9), generator=torch.Generator().manual_seed(1))
    name = f"blocks.{layer}.mlp.hook_expert_indices"
    with torch.no_grad():
        _, c0 = model.run_with_cache(x, names_filter=[name])
    clean = c0[name]
    e = int(torch.bincount(clean.reshape(-1), minlength=n).argmin())
    with torch.no_grad():
        _, c = model.run_with_cache(
            x, fwd_hooks=P.to_hooks(model, [SteerExperts(layer=layer, deactivate=[e], method="route")]), names_filter=[name])
    steered = c[name]
    untouched = ~(clean == e).any(-1)
    assert untouched.any() and torch.equal(steered[untouched], clean[untouched])
    hit = ~untouched  # the deactivated expert is replaced; the other chosen experts stay
    assert not (steered == e).any()
    for row, col in hit.nonzero().tolist():
        kept = set(clean[row, col].tolist()) - {e}
        assert kept <= set(steered[row, col].tolist())
    # activation replaces the lowest-scored chosen expert and keeps the rest
    a = int(torch.bincount(clean.reshape(-1), minlength=n).argmin())
    with torch.no_grad():
        _, c = model.run_with_cache(
            x, fwd_hooks=P.to_hooks(model, [SteerExperts(layer=layer, activate=[a], method="route")]), names_filter=[name])
    overlap = torch.stack([torch.isin(c[name][i, j], clean[i, j]) for i in range(4) for j in range(9)])
    assert (c[name] == a).any(-1).all() and (overlap.sum(-1) >= model.cfg.top_k - 1).all()


def test_last_position_frequencies_need_left_padding(bundled):
    tokens, mask = bundled.tokenize(["Tel Mor plays the", "Jor Sar is"], padding_side="right")
    with pytest.raises(ValueError, match="needs left padding"):
        routing_frequencies(bundled, tokens, attention_mask=mask, positions="last")
