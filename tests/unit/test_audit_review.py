"""Regression tests from a review of the corrected audit protocol: each checks a result against an
independent hand computation on a tiny random checkpoint (or plain numbers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelens import HookedMoETransformer
from moelens.audit import ablation


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _ids(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 200, (n,), generator=torch.Generator().manual_seed(seed))


def _hand_kept_groups(cfg, sel: torch.Tensor) -> torch.Tensor:
    """``[pos, n_experts]`` True for the experts of the groups the router keeps (written from the
    router table in moelens.components.router, not from its code)."""
    size = cfg.n_experts // cfg.n_group
    out = torch.zeros(sel.shape, dtype=torch.bool)
    for t in range(sel.shape[0]):
        g = sel[t].reshape(cfg.n_group, size)
        if cfg.topk_method == "noaux_tc":
            gs = g.sort(-1, descending=True).values[:, :2].sum(-1)
        else:
            gs = g.max(-1).values
        for grp in gs.argsort(descending=True)[: cfg.topk_group].tolist():
            out[t, grp * size:(grp + 1) * size] = True
    return out


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2_full"])
def test_reroute_follows_the_router_rule_with_bias_and_groups(tiny_dirs, arch):
    """DeepSeek-V3 selects on sigmoid + correction bias within kept groups; DeepSeek-V2 (group-limited
    greedy) within kept groups: the rerouted slot must go to the best such unchosen expert, and the
    weights follow the router's rule (unbiased scores) at the new indices."""
    directory, _ = tiny_dirs(arch)
    model = HookedMoETransformer.from_pretrained(directory)
    cfg = model.cfg
    layer = cfg.moe_layers[0]
    pre = f"blocks.{layer}.mlp."
    ids = _ids(20, 1)
    _, clean = model.run_with_cache(ids[None], names_filter=lambda n: n.startswith(pre))
    idx = clean[pre + "hook_expert_indices"][0]
    scores = clean[pre + "hook_router_scores"][0]
    sel = scores + model.blocks[layer].mlp.router.b_correction.detach() if cfg.router_correction_bias else scores
    kept = _hand_kept_groups(cfg, sel)
    checked = 0
    for e in range(cfg.n_experts):
        _, cache = model.run_with_cache(ids[None], names_filter=lambda n: n.startswith(pre),
                                        fwd_hooks=ablation.removal_hooks(model, layer, [e], semantics="reroute"))
        new = cache[pre + "hook_expert_indices"][0]
        for t in range(ids.numel()):
            chosen = idx[t].tolist()
            if e not in chosen:
                assert new[t].tolist() == chosen
                continue
            cand = [x for x in range(cfg.n_experts) if x not in chosen and kept[t, x]]
            want = max(cand, key=lambda x: float(sel[t, x]))
            s = chosen.index(e)
            assert int(new[t, s]) == want, (e, t)
            assert [x for i, x in enumerate(new[t].tolist()) if i != s] == [x for i, x in enumerate(chosen) if i != s]
            checked += 1
        want_w = model.blocks[layer].mlp.router.weights(scores[None], new[None], torch.float32)[0]
        torch.testing.assert_close(cache[pre + "hook_expert_weights"][0].float(), want_w.float(), atol=1e-6, rtol=0)
    assert checked > 10


def test_reroute_never_picks_a_removed_expert_with_padded_lists(tiny_dirs):
    """Several experts removed per row, the list padded with -1 (progressive ablation): expert 0
    must stay banned. A scatter with the duplicate index 0 (from the clamped -1) dropped the ban."""
    directory, _ = tiny_dirs("mixtral")
    model = HookedMoETransformer.from_pretrained(directory)
    layer = model.cfg.moe_layers[0]
    pre = f"blocks.{layer}.mlp."
    ids = _ids(24, 2)
    _, clean = model.run_with_cache(ids[None], names_filter=lambda n: n.startswith(pre))
    idx, scores = clean[pre + "hook_expert_indices"][0], clean[pre + "hook_router_scores"][0]
    # a token where expert 0 is not chosen but is the best unchosen one
    cases = []
    for t in range(ids.numel()):
        masked = scores[t].clone()
        masked[idx[t]] = -1
        if 0 not in idx[t].tolist() and int(masked.argmax()) == 0:
            cases.append(t)
    assert cases, "no token with expert 0 as best unchosen expert; change the seed"
    t = cases[0]
    x = int(idx[t, 0])
    hooks = ablation.removal_hooks(model, layer, [[0, x, -1]], [t], scope="position", semantics="reroute")
    _, cache = model.run_with_cache(ids[None], names_filter=lambda n: n.startswith(pre), fwd_hooks=hooks)
    new = cache[pre + "hook_expert_indices"][0, t].tolist()
    masked = scores[t].clone()
    masked[idx[t]] = -1
    masked[0] = -1
    assert 0 not in new and x not in new
    assert new[0] == int(masked.argmax())


def _hand_holm(p):
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def _hand_bh(p):
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 1.0
    for rank in range(m - 1, -1, -1):
        i = order[rank]
        running = min(running, min(1.0, m * p[i] / (rank + 1)))
        out[i] = running
    return out


def test_pool_corrects_over_cells_with_a_p_value(tmp_path):
    """A paper run has NaN p-values in untestable cells (n < 2): pooling used to raise
    'pvalues contains NaN'. The finite cells are corrected among themselves, NaN stays NaN."""
    import pandas as pd

    from moelens.audit import pooling

    p_t = [0.01, np.nan, 0.04, 0.03, 0.2]
    p_w = [0.02, 0.5, np.nan, 0.01, 0.002]
    t = pd.DataFrame({"model": ["a"] * 5, "layer": range(5), "metric": ["util"] * 5, "n": [9, 1, 9, 9, 9],
                      "mean_diff": 0.1, "d": 0.1, "p_t": p_t, "p_w": p_w})
    out = pooling.pool([t.iloc[:2], t.iloc[2:]])
    for col, tag in (("p_t", ""), ("p_w", "_w")):
        p = np.asarray(out[col], float)
        fin = np.isfinite(p)
        pf = p[fin].tolist()
        assert np.isnan(out[f"p_bonf{tag}"][~fin]).all() and np.isnan(out[f"p_holm{tag}"][~fin]).all()
        np.testing.assert_allclose(out[f"p_bonf{tag}"][fin], np.minimum(np.array(pf) * len(pf), 1), rtol=1e-12)
        np.testing.assert_allclose(out[f"p_holm{tag}"][fin], _hand_holm(pf), rtol=1e-12)
        np.testing.assert_allclose(out[f"p_bh{tag}"][fin], _hand_bh(pf), rtol=1e-12)


def test_routing_entropy_of_a_sigmoid_router_is_a_distribution_entropy(tiny_dirs):
    """DeepSeek-V3 scores are sigmoids (not summing to 1): -sum s log s is not an entropy (it can
    exceed log n_experts). The statistic is the entropy of the scores normalised to sum 1."""
    from moelens.audit.statistics import expert_statistics

    directory, _ = tiny_dirs("deepseek_v3")
    model = HookedMoETransformer.from_pretrained(directory)
    seqs = [_ids(7, 3), _ids(4, 4)]
    stats = expert_statistics(model, seqs, batch_size=2, progress=False)
    for layer in model.cfg.moe_layers:
        name = f"blocks.{layer}.mlp.hook_router_scores"
        ent = []
        for s in seqs:
            _, cache = model.run_with_cache(s[None], names_filter=lambda n: n == name)
            p = cache[name][0].double()
            p = p / p.sum(-1, keepdim=True)
            ent.append(-(p * p.log()).sum(-1))
        want = float(torch.cat(ent).mean())
        got = stats.loc[stats["layer"] == layer, "routing_entropy"].iloc[0]
        assert got == pytest.approx(want, rel=1e-6)
        assert got <= np.log(model.cfg.n_experts) + 1e-9
