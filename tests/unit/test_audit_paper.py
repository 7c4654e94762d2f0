"""The audit paper's protocol (moelens.audit.paper): every quantity against a direct computation
written from the protocol document's formulas with plain hooks, on tiny OLMoE, Qwen2-MoE and
DeepSeek-V2 checkpoints; removal semantics; pooling and corrections by hand."""

import numpy as np
import pandas as pd
import pytest
import torch

from moelens import HookedMoETransformer
from moelens.audit import ablation, paper, pooling
from moelens.audit.effects import remove_expert_hooks
from moelens.testing import toy_tokenizer
from moelens.tracing.stats import benjamini_hochberg, holm_bonferroni

ARCHS = {"olmoe": "olmoe", "qwen2_moe": "qwen", "deepseek_v2_lite": "deepseek"}


def _texts(n=10, seed=0):
    rng = np.random.default_rng(seed)
    out = [" w1 w2 short \n"]  # filtered out: stripped length <= 50
    for i in range(n):
        words = " ".join(f"w{int(w)}" for w in rng.integers(0, 250, size=int(rng.integers(14, 30))))
        out.append(f" {words} \n")
    return out


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request, tiny_dirs):
    directory, _ = tiny_dirs(request.param)
    model = HookedMoETransformer.from_pretrained(directory)
    model.tokenizer = toy_tokenizer(256)
    return model, ARCHS[request.param]


def _zero_out_hook(experts_by_row):
    """Independent removal: zero the expert's *output* (hook_expert_out) wherever it was routed."""
    state = {}

    def grab(idx, hook):
        state["idx"] = idx
        return idx

    def zero(out, hook):
        e = torch.as_tensor(experts_by_row)[:, None, None]
        return out.masked_fill((state["idx"] == e)[..., None], 0.0)

    return grab, zero


@torch.no_grad()
def _direct_ce(model, ids, mask, layer, expert, pos):
    pre = f"blocks.{layer}.mlp."
    grab, zero = _zero_out_hook([expert])
    kwargs = {} if mask is None else {"attention_mask": mask[None]}
    logits = model.run_with_hooks(ids[None], fwd_hooks=[(pre + "hook_expert_indices", grab), (pre + "hook_expert_out", zero)]
                                  if expert >= 0 else [], **kwargs)
    return float(torch.nn.functional.cross_entropy(logits[0, pos][None].float(), ids[pos + 1][None]))


# ---------------------------------------------------------------------------------------- removal semantics
def test_sequence_wide_zero_equals_zeroing_the_expert_output(tiny):
    model, _ = tiny
    layer = model.cfg.moe_layers[-1]
    ids = model.to_tokens(_texts()[1])[0]
    routed = model.run_with_cache(ids[None], names_filter=f"blocks.{layer}.mlp.hook_expert_indices")[1]
    experts = [int(routed[f"blocks.{layer}.mlp.hook_expert_indices"][0, 3, 0]), -1, 0]
    rows = ids[None].expand(3, -1)
    ours = model.run_with_hooks(rows, fwd_hooks=ablation.removal_hooks(model, layer, experts))
    grab, zero = _zero_out_hook(experts)
    pre = f"blocks.{layer}.mlp."
    direct = model.run_with_hooks(rows, fwd_hooks=[(pre + "hook_expert_indices", grab), (pre + "hook_expert_out", zero)])
    torch.testing.assert_close(ours, direct, atol=1e-5, rtol=0)
    clean = model(ids[None])[0]
    torch.testing.assert_close(ours[1], clean, atol=1e-5, rtol=0)  # -1 removes nothing
    assert (ours[0] - clean).abs().max() > 1e-3  # and the removal does something


def test_position_scope_and_route_around_equal_the_single_expert_hooks(tiny):
    model, _ = tiny
    layer = model.cfg.moe_layers[0]
    ids = model.to_tokens(_texts()[2])[0]
    idx = model.run_with_cache(ids[None], names_filter=f"blocks.{layer}.mlp.hook_expert_indices")[1][
        f"blocks.{layer}.mlp.hook_expert_indices"][0]
    e, p = int(idx[5, 1]), 5
    for semantics, renorm in (("zero", False), ("route_around", True)):
        ours = model.run_with_hooks(ids[None], fwd_hooks=ablation.removal_hooks(
            model, layer, [e], [p], scope="position", semantics=semantics))
        ref = model.run_with_hooks(ids[None], fwd_hooks=remove_expert_hooks(model, layer, e, position=p, renormalize=renorm))
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_reroute_gives_the_slot_to_the_best_unchosen_expert(tiny):
    model, _ = tiny
    layer = model.cfg.moe_layers[0]
    ids = model.to_tokens(_texts()[3])[0]
    pre = f"blocks.{layer}.mlp."
    _, clean = model.run_with_cache(ids[None], names_filter=lambda n: n.startswith(pre))
    e = int(clean[pre + "hook_expert_indices"][0, 4, 0])
    _, cache = model.run_with_cache(ids[None], names_filter=lambda n: n.startswith(pre),
                                    fwd_hooks=ablation.removal_hooks(model, layer, [e], semantics="reroute"))
    idx, scores = clean[pre + "hook_expert_indices"][0], clean[pre + "hook_router_scores"][0]
    new = cache[pre + "hook_expert_indices"][0]
    for t in range(ids.numel()):
        if e in idx[t].tolist():
            masked = scores[t].clone()
            masked[idx[t]] = -1
            s = idx[t].tolist().index(e)
            assert int(new[t, s]) == int(masked.argmax()) and e not in new[t].tolist()
        else:
            assert new[t].tolist() == idx[t].tolist()
    # the weights follow the router's rule at the new indices
    router = model.blocks[layer].mlp.router
    want = router.weights(scores[None], new[None], torch.float32)[0]
    torch.testing.assert_close(cache[pre + "hook_expert_weights"][0].float(), want.float(), atol=1e-6, rtol=0)


def test_removal_rejects_bad_input(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="not a sparse layer"):
        ablation.removal_hooks(model, model.cfg.n_layers + 3, [0])
    with pytest.raises(ValueError, match="out of range"):
        ablation.removal_hooks(model, model.cfg.moe_layers[0], [model.cfg.n_experts])
    with pytest.raises(ValueError, match="semantics"):
        ablation.removal_hooks(model, model.cfg.moe_layers[0], [0], semantics="drop")
    with pytest.raises(ValueError, match="position"):
        ablation.removal_hooks(model, model.cfg.moe_layers[0], [0], scope="position")


# ---------------------------------------------------------------------------------------- statistics
def _direct_stats(model, corpus, layer, flavour):
    """The scripts' formulas, written out literally (loops as in the code)."""
    E, k = model.cfg.n_experts, model.cfg.top_k
    pre = f"blocks.{layer}.mlp."
    if flavour == "qwen":
        counts, probs, norms, elems = np.zeros(E), [[] for _ in range(E)], [[] for _ in range(E)], [[] for _ in range(E)]
        for t, ids in enumerate(corpus.texts):
            _, c = model.run_with_cache(ids[None], names_filter=lambda n: n.startswith(pre))
            w = torch.softmax(c[pre + "hook_router_logits"][0].float(), -1)
            tw, ti = torch.topk(w, k, dim=-1)
            for pos in range(ti.shape[0]):
                for s in range(k):
                    e = int(ti[pos, s])
                    counts[e] += 1
                    probs[e].append(float(tw[pos, s]))
                    if t < 30:
                        slot = c[pre + "hook_expert_indices"][0, pos].tolist().index(e)
                        out = c[pre + "hook_expert_out"][0, pos, slot]
                        norms[e].append(float(out.norm()))
                        elems[e].extend(out[:32].tolist())
        return pd.DataFrame({"expert_id": range(E), "utilization_rate": counts / counts.sum(),
                             "mean_routing_weight_when_active": [np.mean(p) if p else 0.0 for p in probs],
                             "activation_norm": [np.mean(n) if n else 0.0 for n in norms],
                             "activation_std": [np.std(x) if x else 0.0 for x in elems]})
    R, outs = [], [[] for _ in range(E)]
    for ids, mask in corpus.batches:
        _, c = model.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n.startswith(pre))
        if flavour == "olmoe":
            R.append(c[pre + "hook_router_logits"].reshape(-1, E).double().numpy())
        else:
            dense = torch.zeros(ids.numel(), E, dtype=torch.float64)
            dense.scatter_(1, c[pre + "hook_expert_indices"].reshape(-1, k), c[pre + "hook_expert_weights"].reshape(-1, k).double())
            R.append(dense.numpy())
        idx, out = c[pre + "hook_expert_indices"].reshape(-1, k), c[pre + "hook_expert_out"].reshape(-1, k, model.cfg.d_model)
        for t in range(idx.shape[0]):
            for s in range(k):
                outs[int(idx[t, s])].append(out[t, s])
    R = np.concatenate(R)
    rows = []
    for e in range(E):
        col = R[:, e]
        row = {"expert_id": e}
        if flavour == "olmoe":
            row["utilization_rate"] = col.mean()
            active = np.zeros(len(col), dtype=bool)
            for token_weights in R:  # the script's loop, literally
                active |= col >= np.sort(token_weights)[-k]
            row["mean_routing_weight_when_active"] = col[active].mean()
        else:
            row["utilization_rate"] = (col > 0).mean()
            row["mean_routing_weight_when_active"] = col[col > 0].mean() if (col > 0).any() else 0.0
        norms = torch.stack(outs[e]).norm(dim=-1) if outs[e] else torch.zeros(0)
        row["activation_norm"] = float(norms.mean()) if len(norms) else 0.0
        row["activation_std"] = float(norms.std()) if len(norms) else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def test_statistics_equal_the_scripts_formulas(tiny):
    model, flavour = tiny
    texts = paper.select_texts(_texts())
    corpus = paper.paper_tokenize(model, texts, flavour, batch_size=3)
    if flavour != "qwen":  # padded rows really are in the statistics (the quirk)
        assert any(bool((m == 0).any()) for _, m in corpus.batches)
    layer = model.cfg.moe_layers[-1]
    ours = paper.paper_statistics(model, corpus, layer)
    direct = _direct_stats(model, corpus, layer, flavour)
    for m in paper.PAPER_METRICS:
        np.testing.assert_allclose(ours[m].to_numpy(float), direct[m].to_numpy(float), rtol=1e-5, atol=1e-6, err_msg=m)


def test_corpus_selection_and_tokenisation(tiny):
    model, flavour = tiny
    raw = _texts()
    texts = paper.select_texts(raw)
    assert texts == [t for t in raw if len(t.strip()) > 50][:100] and texts[0].startswith(" ")  # unstripped
    corpus = paper.paper_tokenize(model, texts, flavour)
    bos = model.tokenizer.bos_token_id
    assert all(int(t[0]) == bos for t in corpus.texts)  # the tokenizer's defaults: its special tokens
    if flavour != "qwen":
        assert sum(ids.shape[0] for ids, _ in corpus.batches) == len(texts)
        assert all(ids.shape[0] <= paper.PAPER_BATCH[flavour] for ids, _ in corpus.batches)
    with pytest.raises(ValueError, match="empty"):
        paper.paper_tokenize(model, [], flavour)


# ---------------------------------------------------------------------------------------- per-token ablation
def test_per_token_ablation_equals_direct_computation(tiny):
    model, flavour = tiny
    texts = paper.select_texts(_texts(8))
    corpus = paper.paper_tokenize(model, texts, flavour)
    layer = model.cfg.moe_layers[-1]
    stats = paper.paper_statistics(model, corpus, layer)
    summary, pairs = paper.paper_per_token(model, corpus, layer, stats, n_tests=12, seed=42,
                                           rng=np.random.default_rng(42))
    assert set(summary["metric"]) == set(paper.PAPER_METRICS)
    assert (summary["n"] == 12).all()
    if flavour != "qwen":
        # the draw: np.random.seed(42), then np.random.choice(valid global indices, n, replace=False) per metric
        valid, active = paper._valid_positions(corpus, model, layer)
        np.random.seed(42)
        for metric in paper.PAPER_METRICS:
            want = np.random.choice([v[0] for v in valid], size=12, replace=False)
            assert pairs[pairs.metric == metric]["global_idx"].tolist() == want.tolist()
    for _, p in pairs.head(6).iterrows():
        if flavour == "qwen":
            ids, mask = corpus.samples[int(p["sample"])], None
        else:
            ids, mask = corpus.batches[int(p["batch"])][0][int(p["row"])], corpus.batches[int(p["batch"])][1][int(p["row"])]
        base = _direct_ce(model, ids, mask, layer, -1, int(p["position"]))
        hi = _direct_ce(model, ids, mask, layer, int(p["high_expert"]), int(p["position"]))
        lo = _direct_ce(model, ids, mask, layer, int(p["low_expert"]), int(p["position"]))
        assert p["baseline_loss"] == pytest.approx(base, abs=1e-4)
        assert p["high_delta"] == pytest.approx(hi - base, abs=1e-4)
        assert p["low_delta"] == pytest.approx(lo - base, abs=1e-4)
        # the top expert has the highest metric value among the active ones
        score = dict(zip(stats.expert_id, stats[p["metric"]]))
        assert score[int(p["high_expert"])] >= score[int(p["low_expert"])]
    row = summary.iloc[0]
    sub = pairs[pairs.metric == row["metric"]]
    d = (sub.high_delta - sub.low_delta).to_numpy()
    want_d = d.mean() / d.std() if flavour != "qwen" else d.mean() / (d.std(ddof=1) + 1e-9)
    assert row["d"] == pytest.approx(want_d, rel=1e-9)


def test_cohens_d_as_each_script_computes_it():
    x = np.array([0.1, -0.2, 0.4, 0.3])
    assert paper.cohens_d(x, "olmoe") == pytest.approx(x.mean() / x.std(ddof=0))
    assert paper.cohens_d(x, "qwen") == pytest.approx(x.mean() / (x.std(ddof=1) + 1e-9))
    assert paper.cohens_d(np.zeros(4), "deepseek") == 0.0


def test_weight_control_ranks_by_token_weight(tiny):
    model, flavour = tiny
    corpus = paper.paper_tokenize(model, paper.select_texts(_texts(6)), flavour)
    layer = model.cfg.moe_layers[0]
    s, pairs = paper.paper_weight_control(model, corpus, layer, np.random.default_rng(42), n_tests=10)
    assert len(pairs) == s["n"] > 2
    assert (pairs.high_weight >= pairs.low_weight).all()
    from scipy.stats import spearmanr

    assert s["spearman_rho"] == pytest.approx(spearmanr(pairs.weight_ratio, pairs.high_delta - pairs.low_delta)[0])


def test_run_paper_protocol_rejects_dense_or_unknown_layers(tiny):
    model, flavour = tiny
    with pytest.raises(ValueError, match="not sparse"):
        paper.run_paper_protocol(model, _texts(), layers=[model.cfg.n_layers + 1], progress=False)
    res = paper.run_paper_protocol(model, _texts(4), layers=model.cfg.moe_layers[:1], n_tests=4, progress=False)
    assert list(res["summary"].columns[:3]) == ["model", "n", "mean_high"] or "model" in res["summary"]
    assert len(res["control"]) == 1


def test_paper_flavour_needs_a_paper_architecture(tiny_dirs):
    model = HookedMoETransformer.from_pretrained(tiny_dirs("mixtral")[0])
    with pytest.raises(ValueError, match="paper protocol exists for"):
        paper.paper_flavour(model)
    assert paper.paper_flavour(model, "olmoe") == "olmoe"


# ---------------------------------------------------------------------------------------- other experiments
def test_progressive_ablation_is_cumulative_top_k_removal(tiny):
    model, flavour = tiny
    layer = model.cfg.moe_layers[0]
    positions = paper.progressive_positions(model, _texts(6), n_positions=3, min_chars=50, min_context=4)
    assert len(positions) == 3
    summary, steps = paper.progressive_ablation(model, positions, [layer])
    k_max = model.cfg.top_k - 1
    assert sorted(summary.k) == list(range(1, k_max + 1))
    ids, target = positions[0]
    pre = f"blocks.{layer}.mlp."
    _, c = model.run_with_cache(ids[None], names_filter=lambda n: n.startswith(pre))
    w = c[pre + "hook_router_scores"][0, target - 1].gather(-1, c[pre + "hook_expert_indices"][0, target - 1])
    order = c[pre + "hook_expert_indices"][0, target - 1][torch.argsort(w, descending=True)].tolist()
    base = _direct_ce(model, ids, None, layer, -1, target - 1)
    # k = 1 removes the top-weighted expert everywhere it was routed
    assert steps[(steps.position_index == 0) & (steps.k == 1)]["delta"].item() == pytest.approx(
        _direct_ce(model, ids, None, layer, order[0], target - 1) - base, abs=1e-4)
    means = steps.groupby("k")["delta"].mean()
    assert summary["mean"].tolist() == pytest.approx(means.tolist())
    cliff = summary["cliff"].iloc[0]
    over = [k for k, m in means.items() if m > 0.1]
    assert (cliff == min(over)) if over else pd.isna(cliff)


def test_redistribution_gap_equals_a_second_forward(tiny):
    model, flavour = tiny
    layer = model.cfg.moe_layers[0]
    texts = [t for t in _texts(3) if len(t.strip()) > 100][:2] or _texts(3)[1:3]
    frame, corr = paper.redistribution(model, texts, layer, min_chars=50)
    assert set(corr) == {"rw_gap", "gap_relcomp", "rw_relcomp", "cos_gap"}
    # independent: remove expert e everywhere, run again, compare the MoE block outputs where e was routed
    e = int(frame.dropna().iloc[0]["expert"])
    ids = torch.tensor(model.tokenizer(texts[0], truncation=True, max_length=256)["input_ids"])
    name = f"blocks.{layer}.hook_mlp_out"
    _, base = model.run_with_cache(ids[None], names_filter=lambda n: n == name or n.endswith("expert_indices"))
    _, abl = model.run_with_cache(ids[None], names_filter=name, fwd_hooks=ablation.removal_hooks(model, layer, [e]))
    routed = (base[f"blocks.{layer}.mlp.hook_expert_indices"][0] == e).any(-1)
    gap = (base[name][0] - abl[name][0])[routed].norm(dim=-1)
    assert gap.numel() > 0 and (gap > 0).all()
    # the per-text mean gap of text 0 is bounded by the corpus mean's components: recompute text 0 alone
    f0, _ = paper.redistribution(model, texts[:1], layer, min_chars=50)
    assert f0.loc[f0.expert == e, "mean_gap_norm"].item() == pytest.approx(float(gap.mean()), rel=1e-4)


# ---------------------------------------------------------------------------------------- pooling
def test_pooling_corrects_over_the_whole_family_by_hand():
    a = pd.DataFrame({"model": "A", "layer": [0, 1], "metric": "utilization_rate", "d": [0.1, 0.2],
                      "p_t": [0.01, 0.04], "p_w": [0.02, 0.5]})
    b = pd.DataFrame({"model": "B", "layer": [0], "metric": "utilization_rate", "d": [0.3], "p_t": [0.03], "p_w": [0.9]})
    pooled = pooling.pool([a, b])
    assert pooled["p_bonf"].tolist() == pytest.approx([0.03, 0.12, 0.09])
    # Holm by hand: sorted 0.01, 0.03, 0.04 -> 3*0.01, 2*0.03, 1*0.04 (monotone) = 0.03, 0.06, 0.06
    assert pooled["p_holm"].tolist() == pytest.approx([0.03, 0.06, 0.06])
    # BH by hand: 3*0.01/1=0.03, 3*0.03/2=0.045, 3*0.04/3=0.04 -> step-up minima 0.03, 0.04, 0.04
    assert pooled["p_bh"].tolist() == pytest.approx([0.03, 0.04, 0.04])
    assert pooled.attrs["family_size"] == 3


def test_published_table_and_its_corrections():
    pub = pooling.published_table()
    assert len(pub) == 60 and set(pub.model) == {"OLMoE", "DeepSeek", "Qwen"}
    np.testing.assert_allclose(holm_bonferroni(pub.p_t), pub.p_holm60, atol=1e-9)
    np.testing.assert_allclose(benjamini_hochberg(pub.p_t), pub.p_bh60, atol=1e-9)
    # reprinting the published cells in the paper's layout gives the document's numbers
    text = pooling.paper_layout(pooling.compare_with_published(pub[["model", "layer", "metric", "d", "p_t", "p_w"]]), "_paper")
    assert "+0.222 (0.002; 0.036)" in text  # Qwen L23 act_std
    assert "-0.071 (0.319; 0.259)" in text  # OLMoE L0 util


# ---------------------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def olmoe_dir(tiny_dirs):
    directory, _ = tiny_dirs("olmoe")
    toy_tokenizer(256).save_pretrained(directory)
    return directory


def test_cli_paper_protocol_runs_resumes_refuses_and_pools(olmoe_dir, tmp_path, capsys):
    import json

    from moelens.audit import audit_main

    corpus = tmp_path / "rows.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in _texts(8)) + "\n")
    out = tmp_path / "run"
    args = ["--protocol", "paper", "--model", str(olmoe_dir), "--corpus", str(corpus), "--layers", "1",
            "--out", str(out), "--n-tests", "5", "--no-progress", "--first-n", "6"]
    assert audit_main(args) == 0
    first = capsys.readouterr().out
    assert "**OLMoE**" in first and "routing-weight control" in first
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 4 and (summary["n"] == 5).all() and (out / "layer_1.json").is_file()
    # resume: nothing recomputed, the same table
    (out / "summary.csv").unlink()
    assert audit_main(args) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv"), summary)
    capsys.readouterr()
    # other settings into the same directory: one line, exit 2, naming what differs
    assert audit_main(args[:-5] + ["--n-tests", "6", "--no-progress", "--first-n", "6"]) == 2
    err = capsys.readouterr().err
    assert "n_tests" in err and "5" in err and "6" in err and err.count("\n") == 1
    # pooling a run: corrections over the family, the paper's layout
    assert audit_main(["--pool", str(out), "--out", str(tmp_path / "pooled")]) == 0
    pooled = pd.read_csv(tmp_path / "pooled" / "pooled.csv")
    assert len(pooled) == 4 and np.allclose(pooled.p_holm, holm_bonferroni(pooled.p_t))


def test_cli_paper_verify_against_transformers(olmoe_dir, tmp_path, capsys):
    from moelens.audit import audit_main

    corpus = tmp_path / "rows.txt"
    corpus.write_text("".join(_texts(4)))
    rc = audit_main(["--protocol", "paper", "--model", str(olmoe_dir), "--corpus", str(corpus), "--layers", "0",
                     "--out", str(tmp_path / "v"), "--n-tests", "3", "--no-progress", "--no-control", "--verify"])
    assert rc == 0
    assert capsys.readouterr().out.count("verify: moelens") == 2


@pytest.mark.parametrize("extra, message", [
    (["--layers", "9"], "not sparse"),
    (["--corpus", "/nonexistent/rows.txt"], "--corpus /nonexistent/rows.txt: no such file"),
    (["--min-chars", "10000"], "no row longer"),
])
def test_cli_paper_bad_input(olmoe_dir, tmp_path, capsys, extra, message):
    from moelens.audit import audit_main

    corpus = tmp_path / "rows.txt"
    corpus.write_text("".join(_texts(3)))
    args = ["--protocol", "paper", "--model", str(olmoe_dir), "--corpus", str(corpus), "--out", str(tmp_path / "o"),
            "--n-tests", "2", "--no-progress", "--layers", "0"]
    args = args + extra if "--layers" not in extra else args[:-2] + extra
    if "--corpus" in extra:
        args = [a for i, a in enumerate(args) if not (a == "--corpus" or (i and args[i - 1] == "--corpus"))][:] + extra
    assert audit_main(args) == 2
    assert message in capsys.readouterr().err


def test_corrected_protocol_sequence_scope_equals_removal_everywhere(tiny_dirs):
    from moelens.audit import expert_effects
    from moelens.audit.effects import _sequence_effects

    model = HookedMoETransformer.from_pretrained(tiny_dirs("olmoe")[0])
    x = torch.arange(3, 19)
    cols = pd.DataFrame(_sequence_effects(model, x, [1], [4, 9], False, 64, "sequence", "zero"))
    for _, r in cols.iterrows():
        base = _direct_ce(model, x, None, 1, -1, int(r.position))
        want = _direct_ce(model, x, None, 1, int(r.expert), int(r.position)) - base
        assert r.delta_next == pytest.approx(want, abs=1e-4)
    # the default (position scope, zero) is unchanged by the new path
    default = expert_effects(model, x, layers=[1], positions=[4, 9])
    generic = pd.DataFrame(_sequence_effects(model, x, [1], [4, 9], False, 64, "position", "reroute"))
    assert len(default) == len(generic) and not np.allclose(default.delta_next, generic.delta_next)


def test_paper_run_resumes_mid_run_with_the_rng_state(tiny_dirs, tmp_path):
    """Qwen's script runs one RNG through all layers: a run killed after layer 1 and resumed must
    draw exactly what an uninterrupted run draws at layer 2."""
    model = HookedMoETransformer.from_pretrained(tiny_dirs("qwen2_moe")[0])
    model.tokenizer = toy_tokenizer(256)
    with pytest.raises(ValueError, match="not sparse"):  # layer 0 is dense in this checkpoint
        paper.run_paper_protocol(model, _texts(4), layers=[0], progress=False)
    kw = dict(layers=[1, 2], n_tests=4, progress=False)
    whole = paper.run_paper_protocol(model, _texts(5), out_dir=tmp_path / "a", **kw)
    paper.run_paper_protocol(model, _texts(5), out_dir=tmp_path / "b", **kw)
    for f in ("layer_2.json", "control_2.json", "summary.csv"):  # as if killed after layer 1
        (tmp_path / "b" / f).unlink()
    resumed = paper.run_paper_protocol(model, _texts(5), out_dir=tmp_path / "b", **kw)
    pd.testing.assert_frame_equal(resumed["pairs"], whole["pairs"])
    pd.testing.assert_frame_equal(resumed["summary"], whole["summary"])
    from moelens.audit import AuditSettingsError

    with pytest.raises(AuditSettingsError, match="corpus_sha256"):
        paper.run_paper_protocol(model, _texts(6), out_dir=tmp_path / "b", **kw)


@pytest.mark.parametrize("flavour", ["qwen", "olmoe"])
def test_unpadded_draws_follow_the_scripts_loops(tiny_dirs, flavour):
    """The (text, position) draws of validation_qwen.py (rng.integers) and of the OLMoE/DeepSeek
    control scripts (rng.choice over range(1, len-1)), written out as their while-loops."""
    model = HookedMoETransformer.from_pretrained(tiny_dirs("olmoe")[0])
    model.tokenizer = toy_tokenizer(256)
    corpus = paper.paper_tokenize(model, paper.select_texts(_texts(6)), flavour)
    layer = model.cfg.moe_layers[0]
    _, pairs = paper.paper_weight_control(model, corpus, layer, np.random.default_rng(7), n_tests=8)
    rng, want = np.random.default_rng(7), []
    while len(want) < 8:
        si = rng.integers(0, len(corpus.samples))
        n = corpus.samples[si].numel()
        if n < 3:
            continue
        pos = int(rng.integers(1, n - 1)) if flavour == "qwen" else int(rng.choice(list(range(1, n - 1))))
        want.append((int(si), pos))
    assert list(zip(pairs["sample"], pairs["position"])) == want
