"""Attribution patching equals an independent autograd computation, approaches exact tracing for a
vanishing noise scale, and screen-then-verify returns exact trace_experts scores for what it verifies."""

import pytest
import torch

import moelens
from moelens import FactCase, HookedMoETransformer
from moelens.architectures import ARCHITECTURES
from moelens.testing import toy_tokenizer
from moelens.tracing.attribution import ExpertAttributionResult, LayerAttributionResult, ScreenResult
from moelens.tracing.cases import tokenize_case
from moelens.tracing.trace import embedding_std, prepare

ARCHS = ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v2_lite", "deepseek_v2_full", "deepseek_v3", "glm4_moe",
         "glm4_moe_lite", "qwen3_next", "qwen3_5_moe", "gpt_oss", "granitemoe", "granitemoeshared", "minimax_m2", "ernie4_5_moe", "phimoe", "llama4", "flex_olmo", "gemma4", "deepseek_v32", "glm_moe_dsa", "deepseek_v4"]
CASE = FactCase("w5 w9 w14 w3 w77 w21 w8", "w14 w3", "w40", "w41")
EXPERT_HOOKS = ("hook_expert_indices", "hook_expert_weights", "hook_expert_out", "hook_mlp_out", "hook_attn_out",
                "hook_resid_post")


def _load(tiny_dirs, name):
    if name.startswith("deepseek") and "DeepseekV2ForCausalLM" not in ARCHITECTURES:
        pytest.skip("DeepSeek-V2 not registered")
    d, _ = tiny_dirs(name)
    m = HookedMoETransformer.from_pretrained(d)
    m.tokenizer = toy_tokenizer(256)
    return m


@pytest.fixture(params=ARCHS)
def model(request, tiny_dirs):
    return _load(tiny_dirs, request.param)


def reference(model, case, z, sigma):
    """Plain TransformerLens hooks and ``retain_grad``: per-layer gradients of each corrupted run's
    logit difference w.r.t. mlp_out/attn_out/resid_post, and the clean and corrupted caches."""
    tc = tokenize_case(model.tokenizer, case, prepend_bos=model.default_prepend_bos())
    tokens = tc.tokens
    subj = list(tc.subject_positions)
    noise = z * sigma

    def corrupt(act, hook):
        act = act.clone()
        act[:, subj] = act[:, subj] + noise
        return act.detach().requires_grad_(True)  # a leaf: the graph starts at the embeddings

    stored = {}

    def keep(act, hook):
        act.retain_grad()
        stored[hook.name] = act

    keep_names = lambda n: n.endswith(EXPERT_HOOKS)  # noqa: E731
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens, names_filter=keep_names)
        _, corr = model.run_with_cache(tokens.expand(z.shape[0], -1), names_filter=keep_names,
                                       fwd_hooks=[("hook_embed", corrupt)])
    grad_names = lambda n: n.endswith(("hook_mlp_out", "hook_attn_out", "hook_resid_post"))  # noqa: E731
    logits = model.run_with_hooks(tokens.expand(z.shape[0], -1),
                                  fwd_hooks=[("hook_embed", corrupt), (grad_names, keep)])
    t, f = tc.target_true_id, tc.target_foil_id
    metric = logits[:, -1, t] - logits[:, -1, f]
    metric.sum().backward()
    grads = {n: a.grad.detach() for n, a in stored.items()}
    return float(metric.detach().mean()), clean, corr, grads


def test_attribution_equals_plain_autograd(model):
    torch.manual_seed(0)
    n_subj = 2
    z = torch.randn(3, n_subj, model.cfg.d_model)
    sigma = 3.0 * embedding_std(model)  # std(W_E), times the embedding scale where there is one (Gemma)
    corrupted, clean, corr, grads = reference(model, CASE, z, sigma)
    a = moelens.attribute_experts(model, CASE, noise=z)
    allp = moelens.attribute_experts(model, CASE, noise=z, positions="all")
    L, E, T = model.cfg.n_layers, model.cfg.n_experts, allp.scores.shape[1]
    assert a.scores.shape == (L, E) and allp.scores.shape == (L, T, E)
    assert a.corrupted == pytest.approx(corrupted, abs=1e-4)
    moved = 0.0
    for l in range(L):
        if l not in model.cfg.moe_layers:
            assert torch.isnan(a.scores[l]).all() and torch.isnan(allp.scores[l]).all()
            continue
        g = grads[f"blocks.{l}.hook_mlp_out"]
        for e in range(E):
            delta = clean.expert_contribution(l, e) - corr.expert_contribution(l, e)  # [S, T, d]
            per_pos = corrupted + (g * delta).sum(-1).mean(0)  # [T]
            assert float(a.scores[l, e]) == pytest.approx(float(per_pos[-1]), abs=1e-4)
            assert (allp.scores[l, :, e] - per_pos).abs().max() < 1e-4
            moved = max(moved, float((per_pos - corrupted).abs().max()))
    assert moved > 1e-2  # the estimates are not all the corrupted contrast
    # the whole-MoE-output estimate and the layer grid (mlp, attn, resid)
    for kind, hook in (("mlp", "hook_mlp_out"), ("attn", "hook_attn_out"), ("resid", "hook_resid_post")):
        grid = moelens.attribute_layers(model, CASE, noise=z, kind=kind)
        assert grid.scores.shape == (L, T)
        for l in range(L):
            name = f"blocks.{l}.{hook}"
            # summed over d_model (and, with several residual streams, over the streams)
            ref = corrupted + (grads[name] * (clean[name] - corr[name])).flatten(2).sum(-1).mean(0)
            assert (grid.scores[l] - ref).abs().max() < 1e-4, (kind, l)
            if kind == "mlp":
                assert float(a.layer_scores[l]) == pytest.approx(float(ref[-1]), abs=1e-4)


def test_parameters_keep_requires_grad(tiny_dirs):
    model = _load(tiny_dirs, "mixtral")
    flags = [p.requires_grad for p in model.parameters()]
    model.W_E.requires_grad_(False)
    flags[[n for n, _ in model.named_parameters()].index("embed.W_E")] = False
    moelens.attribute_experts(model, CASE, seed=0, n_samples=2)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v2_full"])
def test_vanishing_noise_approaches_exact(tiny_dirs, name):
    model = _load(tiny_dirs, name)
    z = torch.randn(2, 2, model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    std = float(model.W_E.detach().std())
    ratios = []
    for scale in (0.3, 0.03, 0.003):
        setup = prepare(model, CASE, noise=z, sigma=scale * std)
        a = moelens.attribute_experts(model, setup)
        err, effect = 0.0, 0.0
        for l in model.cfg.moe_layers:
            exact = moelens.trace_experts(model, setup, l, progress=False).scores
            err = max(err, float((a.scores[l] - exact).abs().max()))
            effect = max(effect, float((exact - setup.corrupted).abs().max()))
        assert effect > 0
        ratios.append(err / effect)
    # first order: the relative error shrinks with the perturbation (about linearly)
    assert ratios[2] < ratios[1] < ratios[0] or ratios[2] < 1e-3
    assert ratios[2] < 0.02, ratios


@pytest.mark.parametrize("name", ["olmoe", "deepseek_v2_lite"])
def test_screen_verifies_exactly(tiny_dirs, name, tmp_path):
    model = _load(tiny_dirs, name)
    setup = prepare(model, CASE, seed=2, n_samples=3)
    s = moelens.screen_experts(model, setup, n_verify=5)
    a = moelens.attribute_experts(model, setup)
    assert int(s.verified.sum()) == 5
    torch.testing.assert_close(s.estimates, a.scores, equal_nan=True)
    # the five verified pairs are the five highest estimates
    flat = torch.nan_to_num(a.scores, nan=-float("inf")).flatten()
    assert set(torch.argsort(flat, descending=True)[:5].tolist()) == set(s.verified.flatten().nonzero().flatten().tolist())
    for l in sorted({int(l) for l, _ in s.verified.nonzero().tolist()}):
        exact = moelens.trace_experts(model, setup, l, progress=False)
        full = moelens.trace_experts(model, setup, l, progress=False, engine="full")
        m = s.verified[l]
        assert (s.scores[l][m] - exact.scores[m]).abs().max() < 1e-5
        assert (s.scores[l][m] - full.scores[m]).abs().max() < 1e-4
        assert s.layer_scores[l] == pytest.approx(exact.layer_score, abs=1e-5)
    # unverified entries are the estimates, exact entries NaN there
    torch.testing.assert_close(s.scores[~s.verified], a.scores[~s.verified], equal_nan=True)
    assert torch.isnan(s.exact[~s.verified]).all()
    df = s.to_dataframe()
    assert (df["method"] == "exact").sum() == 5 and set(df["method"]) == {"exact", "attribution"}
    assert len(df) == len(model.cfg.moe_layers) * model.cfg.n_experts
    top = s.top(3)
    assert all(s.verified[l, e] for l, e, _ in top) and [v for *_, v in top] == sorted([v for *_, v in top], reverse=True)
    back = ScreenResult.load(s.save(tmp_path / "s.json"))
    torch.testing.assert_close(back.scores, s.scores, equal_nan=True)
    assert torch.equal(back.verified, s.verified)
    fig = s.plot()
    assert any(t.name == "verified exactly" and len(t.x) == 5 for t in fig.data)


def test_results_roundtrip_and_layers_filter(tiny_dirs, tmp_path):
    model = _load(tiny_dirs, "qwen3_moe")  # layer 0 is dense
    a = moelens.attribute_experts(model, CASE, seed=0, n_samples=2)
    assert torch.isnan(a.scores[0]).all() and torch.isfinite(a.scores[1:]).all()
    assert a.settings["method"] == "attribution"
    back = ExpertAttributionResult.load(a.save(tmp_path / "a.json"))
    torch.testing.assert_close(back.scores, a.scores, equal_nan=True)
    df = a.to_dataframe()
    assert len(df) == len(model.cfg.moe_layers) * model.cfg.n_experts and set(df["method"]) == {"attribution"}
    assert [x[:2] for x in a.top(3)] == [x[:2] for x in sorted(
        [(l, e, float(a.scores[l, e])) for l in model.cfg.moe_layers for e in range(model.cfg.n_experts)],
        key=lambda t: -t[2])[:3]]
    assert a.plot().data[0].z.shape == (len(model.cfg.moe_layers), model.cfg.n_experts)
    allp = moelens.attribute_experts(model, CASE, seed=0, n_samples=2, positions="all")
    with pytest.raises(ValueError, match="single-position"):
        allp.top()
    assert len(allp.to_dataframe()) == len(model.cfg.moe_layers) * allp.scores.shape[1] * model.cfg.n_experts
    g = moelens.attribute_layers(model, CASE, seed=0, n_samples=2, kind="resid")
    back = LayerAttributionResult.load(g.save(tmp_path / "g.json"))
    torch.testing.assert_close(back.scores, g.scores)
    assert set(back.to_dataframe()["method"]) == {"attribution"}
    with pytest.raises(ValueError, match="sparse"):
        moelens.screen_experts(model, CASE, seed=0, n_samples=2, layers=[0])
    s = moelens.screen_experts(model, CASE, seed=0, n_samples=2, layers=[2], n_verify=3)
    assert s.verified[2].sum() == 3 and s.verified.sum() == 3 and torch.isnan(s.scores[1]).all()


def test_gradients_taken_in_the_corrupted_run_equal_a_separate_pass(tiny_dirs):
    model = _load(tiny_dirs, "qwen2_moe")
    z = torch.randn(2, 2, model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    plain = prepare(model, CASE, noise=z)
    joint = prepare(model, CASE, noise=z, gradients=("mlp", "attn"))
    assert plain.gradients is None and joint.corrupted == pytest.approx(plain.corrupted, abs=1e-6)
    for name, value in plain.corrupted_cache.cache_dict.items():
        torch.testing.assert_close(joint.corrupted_cache[name], value, atol=1e-6, rtol=0)
    torch.testing.assert_close(moelens.attribute_experts(model, joint).scores,
                               moelens.attribute_experts(model, plain).scores, equal_nan=True, atol=1e-5, rtol=0)
    torch.testing.assert_close(moelens.attribute_layers(model, joint, kind="attn").scores,
                               moelens.attribute_layers(model, plain, kind="attn").scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "qwen3_next", "gpt_oss"])
def test_suffix_gradients_equal_the_whole_backward(tiny_dirs, name):
    """The gradients attribution uses come from a pass over positions p0..T-1 only; they equal the
    whole corrupted run's backward at those positions (hybrid linear attention and sliding-window
    attention with sinks included), for every kind and several p0."""
    from moelens.tracing.attribution import corrupted_gradients, suffix_gradients

    model = _load(tiny_dirs, name)
    z = torch.randn(3, 2, model.cfg.d_model, generator=torch.Generator().manual_seed(7))
    setup = prepare(model, CASE, noise=z)
    kinds = ("mlp", "attn", "resid")
    full = corrupted_gradients(model, setup, kinds)
    T = setup.tokens.shape[1]
    for p0 in (0, 3, T - 2, T - 1):
        got = suffix_gradients(model, setup, kinds, p0)
        assert set(got) == set(full)
        for n, g in full.items():
            assert got[n].shape == (3, T - p0, model.cfg.d_model)
            scale = max(1.0, float(g.abs().max()))
            assert (got[n] - g[:, p0:]).abs().max() < 1e-4 * scale, (p0, n)
    assert float(full["blocks.0.hook_mlp_out"][:, -1].abs().max()) > 1e-3  # not trivially zero


@pytest.mark.parametrize("name", ["qwen2_moe", "olmoe"])
def test_necessity_estimate_equals_autograd_on_the_clean_run(tiny_dirs, name):
    model = _load(tiny_dirs, name)
    z = torch.randn(3, 2, model.cfg.d_model, generator=torch.Generator().manual_seed(4))
    sigma = 3.0 * embedding_std(model)  # std(W_E), times the embedding scale where there is one (Gemma)
    _, clean, corr, _ = reference(model, CASE, z, sigma)
    tc = tokenize_case(model.tokenizer, CASE, prepend_bos=model.default_prepend_bos())
    stored = {}

    def keep(act, hook):
        act.retain_grad()
        stored[hook.name] = act

    grad_names = lambda n: n.endswith(("hook_mlp_out", "hook_attn_out", "hook_resid_post"))  # noqa: E731
    with torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(True)
        logits = model.run_with_hooks(tc.tokens, fwd_hooks=[("hook_embed", lambda a, hook: a.detach().requires_grad_(True)),
                                                             (grad_names, keep)])
        metric = logits[:, -1, tc.target_true_id] - logits[:, -1, tc.target_foil_id]
        metric.sum().backward()
    model.zero_grad(set_to_none=True)
    clean_value = float(metric.detach())
    for kind, hook in (("mlp", "hook_mlp_out"), ("attn", "hook_attn_out"), ("resid", "hook_resid_post")):
        for positions in ("all", "last"):
            got = moelens.attribute_layers(model, CASE, noise=z, kind=kind, direction="necessity", positions=positions)
            assert got.direction == "necessity" and got.settings["direction"] == "necessity"
            assert got.clean == pytest.approx(clean_value, abs=1e-4)
            for l in range(model.cfg.n_layers):
                name = f"blocks.{l}.{hook}"
                g = stored[name].grad  # [1, T, d]
                ref = clean_value + (g * (corr[name] - clean[name])).sum(-1).mean(0)  # [T]
                want = ref if positions == "all" else ref[-1:]
                assert (got.scores[l] - want).abs().max() < 1e-4, (kind, l, positions)
    with pytest.raises(ValueError, match="trace_layers"):
        moelens.attribute_layers(model, CASE, noise=z, window=3)
    with pytest.raises(ValueError, match="direction"):
        moelens.attribute_layers(model, CASE, noise=z, direction="denoise")


def test_necessity_estimate_approaches_exact_for_vanishing_noise(tiny_dirs):
    model = _load(tiny_dirs, "qwen3_moe")
    z = torch.randn(2, 2, model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    std = float(model.W_E.detach().std())
    ratios = []
    for scale in (0.3, 0.03, 0.003):
        setup = prepare(model, CASE, noise=z, sigma=scale * std)
        est = moelens.attribute_layers(model, setup, kind="mlp", direction="necessity").scores
        exact = moelens.trace_layers(model, setup, kind="mlp", direction="necessity", progress=False).scores
        effect = float((exact - setup.clean).abs().max())
        assert effect > 0
        ratios.append(float((est - exact).abs().max()) / effect)
    assert ratios[2] < ratios[1] < ratios[0] or ratios[2] < 1e-3
    assert ratios[2] < 0.02, ratios
