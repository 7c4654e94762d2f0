"""Exact sweeps at the floor: metrics declare the logits they read (the engine unembeds only those
rows of W_U) and expert deltas are built at the traced positions only; results equal the plain
computation (whole-vocabulary unembedding, whole-sequence contributions)."""

import pytest
import torch

import moelens
from moelens import FactCase, HookedMoETransformer
from moelens import patching as P
from moelens.architectures import ARCHITECTURES
from moelens.testing import toy_tokenizer
from moelens.tracing.engine import SuffixEngine
from moelens.tracing.trace import prepare

CASE = FactCase("w5 w9 w14 w3 w77 w21 w8", "w14 w3", "w40", "w41")


@pytest.fixture(params=["mixtral", "qwen2_moe", "deepseek_v2_full"])
def model(request, tiny_dirs):
    if request.param.startswith("deepseek") and "DeepseekV2ForCausalLM" not in ARCHITECTURES:
        pytest.skip("DeepSeek-V2 not registered")
    d, _ = tiny_dirs(request.param)
    m = HookedMoETransformer.from_pretrained(d)
    m.tokenizer = toy_tokenizer(256)
    return m


def plain_delta(setup, layer, experts, positions):
    """The whole-sequence construction: sum of expert_contribution(clean) - (corrupted), zero off positions."""
    T = setup.tokens.shape[1]
    delta = torch.zeros(setup.n_samples, T, setup.clean_cache.model.cfg.d_model)
    for e in experts:
        d = setup.clean_cache.expert_contribution(layer, e) - setup.corrupted_cache.expert_contribution(layer, e)
        delta[:, positions] += d[:, positions].float().expand(setup.n_samples, -1, -1)
    return delta[:, min(positions):]


def test_metric_declares_its_logits():
    m = P.logit_diff(3, 7)
    logits = torch.randn(4, 5, 11)
    assert m.token_ids == [3, 7]
    torch.testing.assert_close(m(logits), logits[:, -1, 3] - logits[:, -1, 7])
    torch.testing.assert_close(m.from_token_logits(logits[:, -1, [3, 7]]), m(logits))


def test_expert_sweep_equals_the_plain_computation(model, monkeypatch):
    setup = prepare(model, CASE, seed=0, n_samples=3)
    tc = setup.tokenized
    plain_metric = lambda logits: (logits[:, -1, tc.target_true_id] - logits[:, -1, tc.target_foil_id]).float()  # noqa: E731
    T = setup.tokens.shape[1]
    for positions in ([T - 1], list(tc.subject_positions) + [T - 1]):
        for layer in model.cfg.moe_layers:
            experts = list(range(model.cfg.n_experts))
            sets = [[e] for e in experts] + [experts[:3]]  # single experts and a coalition
            fast = [setup.expert_delta(layer, s, positions) for s in sets]
            slow = [plain_delta(setup, layer, s, positions) for s in sets]
            for f, s in zip(fast, slow):
                assert torch.equal(f, s)
            eng = SuffixEngine(model, setup.engine(model).base, plain_metric)
            samples = torch.arange(setup.n_samples).repeat(len(slow))
            with torch.no_grad():
                ref = eng.run_from_resid_post(layer, min(positions), torch.cat(slow), samples)
            ref = ref.reshape(len(sets), -1).mean(-1)
            got = setup.restore_scores(model, layer, fast, positions)
            assert (got - ref).abs().max() < 1e-5
            r = moelens.trace_experts(model, setup, layer, positions=positions, progress=False)
            assert (r.scores - ref[: len(experts)]).abs().max() < 1e-5
    # the engine reads only the two declared rows of W_U: the whole-vocabulary unembedding is never called
    monkeypatch.setattr(model.unembed, "forward", lambda x: (_ for _ in ()).throw(AssertionError("full unembed")))
    moelens.trace_experts(model, setup, model.cfg.moe_layers[-1], progress=False)


def test_rows_with_a_zero_patch_are_not_run(model, monkeypatch):
    """An expert routed neither in the clean run nor in noise sample s has a zero delta in row s: the
    sweep takes that row's value from the corrupted run instead of running it. The scores equal
    running every row, and only the rows with a non-zero delta reach the engine."""
    from dataclasses import replace

    setup = prepare(model, CASE, seed=1, n_samples=4)
    assert setup.corrupted_samples.shape == (4,)
    assert float(setup.corrupted_samples.mean()) == pytest.approx(setup.corrupted, abs=1e-6)
    every_row = replace(setup, corrupted_samples=None)
    seen = []
    real = SuffixEngine.run_from_resid_posts

    def counting(self, layers, p, deltas, samples):
        seen.append(len(samples))
        return real(self, layers, p, deltas, samples)

    monkeypatch.setattr(SuffixEngine, "run_from_resid_posts", counting)
    T = setup.tokens.shape[1]
    for layer in model.cfg.moe_layers:
        for positions in ("last", [T - 3, T - 1]):
            seen.clear()
            fast = moelens.trace_experts(model, setup, layer, positions=positions, progress=False)
            n_fast = sum(seen)
            seen.clear()
            slow = moelens.trace_experts(model, every_row, layer, positions=positions, progress=False)
            assert sum(seen) == setup.n_samples * (model.cfg.n_experts + 1)  # every (expert, sample) and the layer
            assert (fast.scores - slow.scores).abs().max() < 1e-5
            assert fast.layer_score == pytest.approx(slow.layer_score, abs=1e-5)
            pos = fast.positions
            clean = setup.clean_cache.expert_mask(layer)[0, pos].any(0)  # [E]
            noisy = setup.corrupted_cache.expert_mask(layer)[:, pos].any(1)  # [S, E]
            nonzero = int((clean | noisy).sum())  # the rows whose delta is non-zero (an expert routed somewhere)
            assert n_fast == setup.n_samples + nonzero < sum(seen)
    full = moelens.trace_experts(model, setup, model.cfg.moe_layers[-1], progress=False, engine="full")
    fast = moelens.trace_experts(model, setup, model.cfg.moe_layers[-1], progress=False)
    assert (fast.scores - full.scores).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen3_next", "gpt_oss"])
def test_rows_of_different_layers_share_one_pass(tiny_dirs, name):
    """Verification batches the rows of every layer into one engine pass (rows join at the first
    block they change); each row's value equals its own single-layer run, in any chunking."""
    d, _ = tiny_dirs(name)
    model = HookedMoETransformer.from_pretrained(d)
    model.tokenizer = toy_tokenizer(256)
    setup = prepare(model, CASE, seed=3, n_samples=2)
    T = setup.tokens.shape[1]
    for positions in ([T - 1], [T - 4, T - 1]):
        items = []
        for l in reversed(model.cfg.moe_layers):  # given out of layer order
            items += [(l, setup.layer_delta(l, positions))] + [(l, setup.expert_delta(l, [e], positions)) for e in (0, 1)]
        separate = torch.cat([setup.restore_scores(model, l, [dl], positions) for l, dl in items])
        for max_rows in (512, 3):
            joint = setup.restore_scores_at(model, items, positions, max_rows=max_rows)
            assert (joint - separate).abs().max() < 1e-5, max_rows
    assert (separate - setup.corrupted).abs().max() > 1e-3  # the patches do something


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen3_next", "gpt_oss", "deepseek_v2_lite"])
def test_expert_grid_equals_trace_experts_layer_by_layer(tiny_dirs, name, tmp_path):
    from moelens.tracing.trace import ExpertGridResult, TraceResult

    if name.startswith("deepseek") and "DeepseekV2ForCausalLM" not in ARCHITECTURES:
        pytest.skip("DeepSeek-V2 not registered")
    d, _ = tiny_dirs(name)
    model = HookedMoETransformer.from_pretrained(d)
    model.tokenizer = toy_tokenizer(256)
    setup = prepare(model, CASE, seed=5, n_samples=3)
    T = setup.tokens.shape[1]
    sparse = list(model.cfg.moe_layers)
    for positions, max_rows in (("last", 512), ([T - 3, T - 1], 7)):
        g = moelens.trace_expert_grid(model, setup, positions=positions, max_rows=max_rows, progress=False)
        assert g.scores.shape == (model.cfg.n_layers, model.cfg.n_experts)
        for l in range(model.cfg.n_layers):
            if l not in sparse:
                assert torch.isnan(g.scores[l]).all() and torch.isnan(g.layer_scores[l])
                continue
            r = moelens.trace_experts(model, setup, l, positions=positions, progress=False)
            assert (g.scores[l] - r.scores).abs().max() < 1e-5, (positions, l)
            assert float(g.layer_scores[l]) == pytest.approx(r.layer_score, abs=1e-5)
            assert g.clean_routed[l] == r.clean_routed and g.noise_routed[l] == r.noise_routed
    assert (g.scores[sparse] - setup.corrupted).abs().max() > 1e-3
    one = moelens.trace_expert_grid(model, setup, layers=[sparse[-1]], progress=False)
    assert torch.isnan(one.scores[sparse[0]]).all() and torch.isfinite(one.scores[sparse[-1]]).all()
    (l, e, v), = one.top(1)
    assert l == sparse[-1] and v == pytest.approx(float(one.scores[l].max()))
    df = g.to_dataframe()
    assert len(df) == len(sparse) * model.cfg.n_experts and set(df["method"]) == {"exact"}
    back = TraceResult.load(g.save(tmp_path / "g.json"))
    assert isinstance(back, ExpertGridResult) and torch.allclose(back.scores, g.scores, equal_nan=True)
    fig = g.plot()
    assert fig.data[0].z.shape == (len(sparse), model.cfg.n_experts) and "exact" in set(fig.data[0].customdata.flatten())
    if sparse[0] != 0:
        with pytest.raises(ValueError, match="dense"):
            moelens.trace_expert_grid(model, setup, layers=[0], progress=False)
