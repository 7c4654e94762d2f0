"""moelens.audit: observational expert statistics, batched expert ablations, the paired audit,
resumable output directories and the ``moelens audit`` command line.

Everything runs on the tiny random Qwen3-MoE of ``moelens.testing`` (layers 1 and 2 sparse,
8 experts, top-4) with random token sequences; one end-to-end test uses the bundled model when
it is present.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import moelens
from moelens import HookedMoETransformer, expert_names_filter
from moelens import audit
from moelens.audit import (
    CONTROL,
    METRICS,
    AuditSettingsError,
    audit_main,
    expert_effects,
    expert_statistics,
    load_corpus,
    remove_expert_hooks,
    run_audit,
    sample_positions,
)

BUNDLED = Path(moelens.__file__).parent / "bundled" / "moelens-tiny-facts"
SUMMARY_COLUMNS = ["metric", "layer", "n", "mean_diff", "cohens_d", "p_t", "p_wilcoxon", "p_holm", "p_bh"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are tiny: one thread avoids oversubscription when the CPUs are shared.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model(tiny_dirs):
    directory, _ = tiny_dirs("qwen3_moe")
    return HookedMoETransformer.from_pretrained(directory)


def _random_corpus(n: int = 6, lo: int = 5, hi: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g)
    return [torch.randint(0, 256, (int(k),), generator=g) for k in lengths]


def _nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[0, :-1].float(), tokens[1:], reduction="none")


@torch.no_grad()
def _direct_effect(model, tokens, layer, pos, slot, renormalize):
    """One forward for one ablation, with a plain hook zeroing one slot weight at one position."""

    def hook(w, hook):
        w = w.clone()
        if renormalize:
            total = w[0, pos].sum()
            rest = total - w[0, pos, slot]
            w[0, pos] = w[0, pos] * (total / rest)
        w[0, pos, slot] = 0
        return w

    clean = _nll(model(tokens[None]), tokens)
    ablated = _nll(model.run_with_hooks(tokens[None], fwd_hooks=[(f"blocks.{layer}.mlp.hook_expert_weights", hook)]), tokens)
    delta = ablated - clean
    return float(delta[pos]), float(delta[pos:].sum()), delta


# ------------------------------------------------------------------ interventional effects


@pytest.mark.parametrize("renormalize", [False, True])
def test_effects_equal_direct_hooks(model, renormalize, tol=1e-5):
    tokens = _random_corpus(1, 12, 13, seed=3)[0]
    positions = [0, 4, 10]
    eff = expert_effects(model, tokens, positions=positions, renormalize=renormalize, max_batch=7)
    k = model.cfg.top_k
    assert len(eff) == len(model.cfg.moe_layers) * len(positions) * k
    _, cache = model.run_with_cache(tokens[None], names_filter=expert_names_filter())
    for row in eff.itertuples():
        assert row.expert == int(cache[f"blocks.{row.layer}.mlp.hook_expert_indices"][0, row.position, row.slot])
        nxt, suffix, delta = _direct_effect(model, tokens, row.layer, row.position, row.slot, renormalize)
        assert row.delta_next == pytest.approx(nxt, abs=tol)
        assert row.delta_suffix == pytest.approx(suffix, abs=tol)
        # causality: removal at p cannot change predictions before p
        if row.position:
            assert delta[: row.position].abs().max().item() < 1e-5
    assert eff["delta_next"].abs().max() > 1e-3  # the ablations do something


@pytest.mark.parametrize("name", ["llama4", "gemma4", "flex_olmo"])
def test_effects_equal_direct_hooks_on_new_families(tiny_dirs, name):
    """Llama 4: a slot's weight scales the expert's input, and weight 0 still removes the expert
    (E(0) = 0); Gemma 4 (parallel branches, layer scalars) and FlexOlmo (post-norms) as well."""
    directory, _ = tiny_dirs(name)
    model = HookedMoETransformer.from_pretrained(directory)
    # Gemma's logits are ~10x larger (scaled embeddings): batched rows differ from single ones by more float noise
    test_effects_equal_direct_hooks(model, renormalize=False, tol=1e-4 if name == "gemma4" else 1e-5)


def test_renormalize_changes_effects(model):
    tokens = _random_corpus(1, 10, 11, seed=4)[0]
    a = expert_effects(model, tokens, layers=[1], positions=[2, 5])
    b = expert_effects(model, tokens, layers=[1], positions=[2, 5], renormalize=True)
    assert not np.allclose(a["delta_next"], b["delta_next"])


def test_batched_rows_equal_one_at_a_time(model):
    tokens = _random_corpus(1, 14, 15, seed=5)[0]
    one = expert_effects(model, tokens, max_batch=1)
    many = expert_effects(model, tokens, max_batch=1000)
    odd = expert_effects(model, tokens, max_batch=5)
    assert len(one) == (len(tokens) - 1) * model.cfg.top_k * len(model.cfg.moe_layers)
    for other in (many, odd):
        pd.testing.assert_frame_equal(one[["layer", "position", "slot", "expert"]], other[["layer", "position", "slot", "expert"]])
        np.testing.assert_allclose(one["delta_next"], other["delta_next"], atol=1e-5)
        np.testing.assert_allclose(one["delta_suffix"], other["delta_suffix"], atol=1e-5)


@torch.no_grad()
def test_removing_unrouted_expert_changes_nothing(model):
    tokens = _random_corpus(1, 10, 11, seed=6)[0]
    layer, pos = 2, 6
    logits, cache = model.run_with_cache(tokens[None], names_filter=expert_names_filter())
    routed = cache[f"blocks.{layer}.mlp.hook_expert_indices"][0, pos].tolist()
    unrouted = [e for e in range(model.cfg.n_experts) if e not in routed]
    assert unrouted
    for renorm in (False, True):
        for e in unrouted:
            out = model.run_with_hooks(tokens[None], fwd_hooks=remove_expert_hooks(model, layer, e, pos, renorm))
            assert torch.equal(out, logits)
    # a routed expert removed through remove_expert_hooks matches the batched effect
    eff = expert_effects(model, tokens, layers=[layer], positions=[pos])
    for row in eff.itertuples():
        out = model.run_with_hooks(tokens[None], fwd_hooks=remove_expert_hooks(model, layer, row.expert, pos))
        assert float(_nll(out, tokens)[pos] - _nll(logits, tokens)[pos]) == pytest.approx(row.delta_next, abs=1e-5)


def test_effect_positions_validated(model):
    tokens = _random_corpus(1, 8, 9)[0]
    with pytest.raises(ValueError, match="positions must lie"):
        expert_effects(model, tokens, positions=[7])  # the last token has no next token
    with pytest.raises(ValueError, match="not sparse"):
        expert_effects(model, tokens, layers=[0])  # layer 0 is dense in the tiny Qwen3-MoE


def test_sample_positions():
    assert sample_positions(5, None, 0) == [0, 1, 2, 3]
    assert sample_positions(5, 10, 0) == [0, 1, 2, 3]
    assert sample_positions(1, 3, 0) == []
    a = sample_positions(50, 6, seed=1, seq_index=3)
    assert a == sample_positions(50, 6, seed=1, seq_index=3) and len(set(a)) == 6 and a == sorted(a)
    assert max(a) <= 48 and a != sample_positions(50, 6, seed=2, seq_index=3)


# ------------------------------------------------------------------ observational statistics


def _hand_stats(model, corpus) -> pd.DataFrame:
    rows = []
    per = {l: dict(count=np.zeros(8), w=np.zeros(8), norm=np.zeros(8), s=np.zeros(8), sq=np.zeros(8), tok=0, ent=0.0)
           for l in model.cfg.moe_layers}
    for seq in corpus:  # one sequence at a time, no padding
        _, cache = model.run_with_cache(seq[None], names_filter=expert_names_filter())
        for l, acc in per.items():
            mask = cache.expert_mask(l)[0]  # [pos, n_experts]
            acc["count"] += mask.sum(0).numpy()
            acc["w"] += cache.expert_weight_map(l)[0].double().sum(0).numpy()
            idx = cache[f"blocks.{l}.mlp.hook_expert_indices"][0]
            out = cache[f"blocks.{l}.mlp.hook_expert_out"][0].double()
            for p in range(idx.shape[0]):
                for s in range(idx.shape[1]):
                    e = int(idx[p, s])
                    acc["norm"][e] += float(out[p, s].norm())
                    acc["s"][e] += float(out[p, s].sum())
                    acc["sq"][e] += float((out[p, s] ** 2).sum())
            acc["tok"] += seq.numel()
            acc["ent"] += float(cache.routing_entropy(l).sum())
    d = model.cfg.d_model
    for l, acc in per.items():
        for e in range(8):
            c = acc["count"][e]
            mean = acc["s"][e] / (c * d)
            rows.append({"layer": l, "expert": e, "utilization": c / acc["tok"], "mean_weight": acc["w"][e] / c,
                         "output_norm": acc["norm"][e] / c, "output_std": np.sqrt(acc["sq"][e] / (c * d) - mean**2),
                         "routing_entropy": acc["ent"] / acc["tok"], "n_active": c, "n_tokens": acc["tok"]})
    return pd.DataFrame(rows)


def test_statistics_equal_hand_computation_and_streaming(model):
    corpus = _random_corpus(7, 3, 14, seed=7)
    hand = _hand_stats(model, corpus)
    one = expert_statistics(model, corpus, batch_size=1, progress=False)
    all_at_once = expert_statistics(model, corpus, batch_size=len(corpus), progress=False)  # left padded
    three = expert_statistics(model, corpus, batch_size=3, progress=False)
    assert list(one.columns) == ["layer", "expert", "n_tokens", "n_active", *audit.STAT_COLUMNS]
    assert (hand["n_active"] > 0).all()
    for got in (one, all_at_once, three):
        assert got[["layer", "expert"]].values.tolist() == hand[["layer", "expert"]].values.tolist()
        assert got["n_active"].tolist() == hand["n_active"].astype(int).tolist()
        assert got["n_tokens"].tolist() == hand["n_tokens"].tolist()
        for c in audit.STAT_COLUMNS:
            np.testing.assert_allclose(got[c], hand[c], rtol=1e-5, atol=1e-6, err_msg=c)
    # each token fills top_k slots with distinct experts
    for l in model.cfg.moe_layers:
        assert one[one.layer == l]["utilization"].sum() == pytest.approx(model.cfg.top_k)


def test_statistics_layer_subset(model):
    stats = expert_statistics(model, _random_corpus(3), layers=[2], progress=False)
    assert set(stats["layer"]) == {2} and len(stats) == model.cfg.n_experts


# ------------------------------------------------------------------ the audit


def _check_summary(summary: pd.DataFrame, layers, metrics=METRICS):
    for c in SUMMARY_COLUMNS:
        assert c in summary.columns, c
    assert set(summary["metric"]) == set(metrics) | {CONTROL}
    assert set(summary["layer"]) == set(layers)
    assert len(summary) == (len(metrics) + 1) * len(layers)
    for c in ("p_t", "p_wilcoxon", "p_holm", "p_bh", "p_holm_wilcoxon", "p_bh_wilcoxon"):
        p = summary[c].to_numpy(float)
        assert np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all(), c
    assert (summary["p_holm"] >= summary["p_t"] - 1e-12).all()
    assert (summary["p_bh"] >= summary["p_t"] - 1e-12).all()
    assert (summary["p_holm"] >= summary["p_bh"] - 1e-12).all()
    assert (summary["p_holm_wilcoxon"] >= summary["p_wilcoxon"] - 1e-12).all()
    assert (summary["n"] > 0).all()


def test_audit_summary(model, tmp_path):
    corpus = _random_corpus(6, 6, 14, seed=8)
    result = run_audit(model, corpus, n_positions=5, progress=False, out_dir=tmp_path / "a")
    _check_summary(result.summary, model.cfg.moe_layers)
    # n = positions with a strict ranking difference; at most the number of sampled positions
    n_pos = sum(len(sample_positions(len(s), 5, 0, i)) for i, s in enumerate(corpus))
    assert (result.summary["n"] <= n_pos).all()
    # the pairs behind each row reproduce its mean difference
    row = result.summary.iloc[0]
    pairs = result.pairs[(result.pairs.metric == row.metric) & (result.pairs.layer == row.layer)]
    assert len(pairs) == row.n
    assert (pairs.effect_top - pairs.effect_bottom).mean() == pytest.approx(row.mean_diff)
    ctrl = result.pairs[result.pairs.metric == CONTROL]
    eff = result.effects.set_index(["seq", "layer", "position", "expert"])["weight"]
    top_w = eff.loc[list(zip(ctrl.seq, ctrl.layer, ctrl.position, ctrl.expert_top))].to_numpy()
    bot_w = eff.loc[list(zip(ctrl.seq, ctrl.layer, ctrl.position, ctrl.expert_bottom))].to_numpy()
    assert (top_w > bot_w).all()
    # figure and files
    fig = result.plot()
    assert fig.data[0].type == "heatmap" and np.asarray(fig.data[0].z).shape == (len(METRICS) + 1, 2)
    for name in ("settings.json", "stats.json", "effects.jsonl", "summary.csv", "report.html"):
        assert (tmp_path / "a" / name).is_file(), name
    assert len(result.expert_table()) == 2 * model.cfg.n_experts
    assert set(result.correlations()["metric"]) == set(METRICS)
    # scope="suffix" and a metric subset through summarize
    summary, _ = audit.summarize(result.effects, result.stats, metrics=("utilization",), scope="suffix")
    _check_summary(summary, model.cfg.moe_layers, metrics=("utilization",))
    # a single sequence's expert_effects frame (no `seq` column) is accepted too
    one = expert_effects(model, corpus[0], positions=sample_positions(len(corpus[0]), 5, 0, 0))
    single, _ = audit.summarize(one, result.stats)
    first = result.effects[result.effects.seq == 0].drop(columns="seq").reset_index(drop=True)
    np.testing.assert_allclose(one["delta_next"], first["delta_next"], atol=1e-6)
    assert (single["n"] <= len(first) // model.cfg.top_k).all()


def test_audit_in_memory_equals_saved(model, tmp_path):
    corpus = _random_corpus(3, 6, 10, seed=9)
    a = run_audit(model, corpus, layers=[1], n_positions=3, progress=False)
    b = run_audit(model, corpus, layers=[1], n_positions=3, progress=False, out_dir=tmp_path)
    pd.testing.assert_frame_equal(a.effects, b.effects)
    pd.testing.assert_frame_equal(a.summary, b.summary)
    # reloaded from stats.json and effects.jsonl: identical numbers
    c = run_audit(model, corpus, layers=[1], n_positions=3, progress=False, out_dir=tmp_path)
    pd.testing.assert_frame_equal(b.effects, c.effects)
    pd.testing.assert_frame_equal(b.stats, c.stats)
    pd.testing.assert_frame_equal(b.summary, c.summary)


class _Stop(Exception):
    pass


def test_resume_equals_uninterrupted(model, tmp_path):
    corpus = _random_corpus(6, 5, 12, seed=10)
    kw = dict(n_positions=4, seed=3, progress=False, max_batch=16)
    full = run_audit(model, corpus, out_dir=tmp_path / "full", **kw)

    def stop_after_two(i, rec):
        if i == 1:
            raise _Stop

    with pytest.raises(_Stop):
        run_audit(model, corpus, out_dir=tmp_path / "resumed", callback=stop_after_two, **kw)
    path = tmp_path / "resumed" / "effects.jsonl"
    assert [json.loads(line)["seq"] for line in path.read_text().splitlines()] == [0, 1]
    with open(path, "a") as fh:  # killed while writing the third line
        fh.write('{"seq": 2, "n_tok')
    seen = []
    resumed = run_audit(model, corpus, out_dir=tmp_path / "resumed", callback=lambda i, r: seen.append(i), **kw)
    assert seen == [2, 3, 4, 5]  # finished sequences are not recomputed
    assert path.read_bytes() == (tmp_path / "full" / "effects.jsonl").read_bytes()
    pd.testing.assert_frame_equal(resumed.summary, full.summary)
    assert (tmp_path / "resumed" / "stats.json").read_text() == (tmp_path / "full" / "stats.json").read_text()


def test_resume_refuses_different_settings(model, tmp_path):
    corpus = _random_corpus(2, 5, 8, seed=11)
    run_audit(model, corpus, layers=[1], n_positions=2, progress=False, out_dir=tmp_path)
    for change, key in ((dict(seed=1), "seed"), (dict(layers=[1, 2]), "layers"), (dict(renormalize=True), "renormalize"),
                        (dict(n_positions=3), "n_positions")):
        kw = dict(layers=[1], n_positions=2, progress=False, out_dir=tmp_path) | change
        with pytest.raises(AuditSettingsError, match=key):
            run_audit(model, corpus, **kw)
    with pytest.raises(AuditSettingsError, match="corpus"):
        run_audit(model, _random_corpus(2, 5, 8, seed=12), layers=[1], n_positions=2, progress=False, out_dir=tmp_path)
    # analysis-only options (metrics, scope, batch sizes) may change on resume
    r = run_audit(model, corpus, layers=[1], n_positions=2, progress=False, out_dir=tmp_path, scope="suffix",
                  metrics=("utilization",), max_batch=3)
    assert set(r.summary["metric"]) == {"utilization", CONTROL}


# ------------------------------------------------------------------ corpus


def test_load_corpus_sources(tmp_path):
    sample = load_corpus()
    assert 8 <= len(sample) <= 20 and all(len(p.split()) > 10 for p in sample)
    assert load_corpus("sample") == sample
    f = tmp_path / "c.txt"
    f.write_text("First line\nof one.\n\n\n  Second paragraph.  \n\nThird\n")
    assert load_corpus(f) == ["First line of one.", "Second paragraph.", "Third"]
    assert load_corpus(str(f), max_tokens=5) == ["First line of one.", "Second"]
    assert load_corpus(["a b", "", "c d e"], max_tokens=3) == ["a b", "c"]
    with pytest.raises(TypeError):
        load_corpus([1, 2])


def test_load_corpus_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"body": ["one two", "", "three four five"]})
    assert load_corpus(ds, text_field="body") == ["one two", "three four five"]
    assert load_corpus(datasets.DatasetDict(train=ds), text_field="body", max_tokens=3) == ["one two", "three"]
    with pytest.raises(KeyError, match="text_field|column"):
        load_corpus(ds)
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_corpus(tmp_path / "saved", text_field="body") == ["one two", "three four five"]
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(FileNotFoundError, match="pip install datasets"):
        load_corpus("no_such_dataset_name")


def test_bundled_corpus_from_facts_file(tmp_path):
    # a checkpoint-like directory with a CounterFact-layout facts.jsonl
    (tmp_path / "config.json").write_text("{}")
    src = Path(__file__).resolve().parents[1] / "data" / "counterfact_sample.jsonl"
    (tmp_path / "facts.jsonl").write_text(src.read_text())
    recs = [json.loads(line)["requested_rewrite"] for line in src.read_text().splitlines() if line.strip()]
    want = {r["prompt"].format(r["subject"]) + " " + r["target_true"]["str"] for r in recs}
    got = audit.bundled_corpus(tmp_path)
    assert set(got) == want and len(got) == len(want)
    assert audit.bundled_corpus(tmp_path, n=5) == got[:5] and audit.bundled_corpus(tmp_path, seed=1) != got
    assert load_corpus(tmp_path) == got == load_corpus(f"facts:{tmp_path}")


# ------------------------------------------------------------------ command line


def _byte_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab["<s>"] = len(vocab)
    tk = Tokenizer(BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", pad_token="<s>").save_pretrained(str(directory))


def test_cli(tmp_path, capsys):
    from moelens.testing import save_tiny

    mdir = tmp_path / "model"
    save_tiny("qwen3_moe", mdir, vocab_size=260)
    _byte_tokenizer(mdir)
    out = tmp_path / "out"
    argv = ["--model", str(mdir), "--corpus", "sample", "--layers", "2", "--out", str(out), "--n-positions", "3",
            "--max-tokens", "60", "--max-seq-len", "24", "--no-progress"]
    assert audit_main(argv) == 0
    printed = capsys.readouterr().out
    assert "utilization" in printed and "p_holm" in printed
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["layer"]) == {2}
    settings = json.loads((out / "settings.json").read_text())["fingerprint"]
    assert settings["layers"] == [2] and settings["n_positions"] == 3 and settings["max_seq_len"] == 24
    assert audit_main(argv) == 0  # resume: nothing left to do
    assert audit_main(argv[:-1] + ["--seed", "1", "--no-progress"]) == 2
    assert "different settings" in capsys.readouterr().err
    assert audit_main(["--model", str(mdir), "--layers", "0", "--out", str(tmp_path / "o2"), "--no-progress"]) == 2


# ------------------------------------------------------------------ bundled model


@pytest.mark.skipif(not (BUNDLED / "config.json").is_file(), reason="bundled model moelens-tiny-facts not present yet")
def test_bundled_model_end_to_end(tmp_path):
    model = HookedMoETransformer.from_pretrained("moelens-tiny-facts")
    corpus = audit.bundled_corpus("moelens-tiny-facts", n=48)
    assert len(corpus) == 48 and all(isinstance(s, str) for s in corpus)
    result = run_audit(model, corpus, n_positions=4, progress=False, out_dir=tmp_path)
    _check_summary(result.summary, model.cfg.moe_layers)
    assert result.stats.groupby("layer")["utilization"].sum().round(6).eq(model.cfg.top_k).all()


def test_effects_equal_direct_hooks_on_deepseek_v3(tiny_dirs):
    """The audit runs unchanged on the DeepSeek-V3 router (sigmoid, correction bias, scaled weights)."""
    directory, _ = tiny_dirs("deepseek_v3")
    v3 = HookedMoETransformer.from_pretrained(directory)
    tokens = _random_corpus(1, 10, 11, seed=5)[0]
    eff = expert_effects(v3, tokens, positions=[3, 7], renormalize=True, max_batch=5)
    assert len(eff) == len(v3.cfg.moe_layers) * 2 * v3.cfg.top_k
    for row in list(eff.itertuples())[:: v3.cfg.top_k]:
        nxt, suffix, _ = _direct_effect(v3, tokens, row.layer, row.position, row.slot, True)
        assert row.delta_next == pytest.approx(nxt, abs=1e-5)
        assert row.delta_suffix == pytest.approx(suffix, abs=1e-5)
    assert eff["delta_next"].abs().max() > 1e-3
