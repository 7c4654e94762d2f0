"""The suffix engine equals the full-forward reference on every architecture and entry point."""

import pytest
import torch

import moelens
from moelens import FactCase, HookedMoETransformer
from moelens import patching as P
from moelens.architectures import ARCHITECTURES
from moelens.testing import toy_tokenizer
from moelens.tracing.trace import coalition_score, prepare

ARCHS = ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v2_lite", "deepseek_v2_full", "deepseek_v3", "glm4_moe",
         "glm4_moe_lite", "qwen3_next", "qwen3_5_moe", "gpt_oss", "granitemoe", "granitemoeshared", "minimax_m2", "ernie4_5_moe", "phimoe", "llama4", "flex_olmo", "gemma4", "deepseek_v32", "glm_moe_dsa", "deepseek_v4"]
CASE = FactCase("w5 w9 w14 w3 w77 w21 w8", "w14 w3", "w40", "w41")


@pytest.fixture(params=ARCHS)
def model(request, tiny_dirs):
    if request.param.startswith("deepseek") and "DeepseekV2ForCausalLM" not in ARCHITECTURES:
        pytest.skip("DeepSeek-V2 not registered")
    d, _ = tiny_dirs(request.param)
    m = HookedMoETransformer.from_pretrained(d)
    m.tokenizer = toy_tokenizer(256)
    return m


@pytest.mark.parametrize("kind,window,direction", [("mlp", 1, "restore"), ("resid", 1, "restore"),
                                                   ("attn", 3, "restore"), ("mlp", 1, "necessity")])
def test_layer_grid(model, kind, window, direction):
    setup = prepare(model, CASE, seed=0, n_samples=3)
    fast = moelens.trace_layers(model, setup, kind=kind, window=window, direction=direction, progress=False)
    ref = moelens.trace_layers(model, setup, kind=kind, window=window, direction=direction, engine="full",
                               progress=False)
    assert (fast.scores - ref.scores).abs().max() < 1e-4
    assert (ref.scores - ref.corrupted).abs().max() > 1e-3  # the patches matter


def test_experts_and_coalitions(model):
    setup = prepare(model, CASE, seed=1, n_samples=2)
    for layer in model.cfg.moe_layers:
        fast = moelens.trace_experts(model, setup, layer, positions="subject", progress=False)
        ref = moelens.trace_experts(model, setup, layer, positions="subject", engine="full", progress=False)
        assert (fast.scores - ref.scores).abs().max() < 1e-4
        assert fast.layer_score == pytest.approx(ref.layer_score, abs=1e-4)
    layer = model.cfg.moe_layers[0]
    pos = [setup.tokens.shape[1] - 1]
    experts = setup.clean_cache.expert_mask(layer)[0, -1].nonzero().flatten().tolist()
    sets = [[setup.corrupt(), P.RestoreExperts(layer, experts, setup.clean_cache, setup.corrupted_cache, positions=pos)]]
    ref = P.run_sweep(model, setup.tokens, sets, setup.metric, group_size=2, progress=False).values[0]
    assert coalition_score(model, setup, layer, experts, pos) == pytest.approx(float(ref), abs=1e-4)


def test_engine_does_less_work(model):
    setup = prepare(model, CASE, seed=0, n_samples=2)
    eng = setup.engine(model)
    T, L = setup.tokens.shape[1], model.cfg.n_layers
    cells = [(l, l + 1, p) for l in range(L) for p in range(T)]
    with torch.no_grad():
        eng.grid("mlp_out", cells, setup.clean_cache, 2, 1)
    if eng.full_positions:  # DeepSeek-V4: resumed at the layer, over all positions
        floor = sum((L - l) * T for l, _, p in cells) * 2
        assert eng.token_layers == floor < L * T * len(cells) * 2
        return
    floor = sum((L - l) * (T - p) for l, _, p in cells) * 2
    assert eng.token_layers == floor < L * T * len(cells) * 2 * 0.6


def test_engine_refuses_attached_hooks(tiny_dirs):
    """The engine runs modules on suffix positions only: an attached hook would see offset positions
    (or, at block level, not fire). It refuses, naming the hook and the way out; engine='full' runs
    whole forwards through the hook; hooks_allowed() lets reading hooks through."""
    from moelens.errors import MoelensUserError
    from moelens.tracing.engine import hooks_allowed

    d, _ = tiny_dirs("mixtral")
    model = HookedMoETransformer.from_pretrained(d)
    model.tokenizer = toy_tokenizer(256)
    setup = prepare(model, CASE, seed=0, n_samples=2)
    layer = model.cfg.moe_layers[0]

    def zero_first(act, hook):  # an edit at position 1 of the full sequence
        act = act.clone()
        act[:, 1] = 0
        return act

    with model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", zero_first)]):
        for call in (lambda: moelens.trace_experts(model, setup, layer, progress=False),
                     lambda: moelens.trace_layers(model, setup, progress=False),
                     lambda: moelens.trace_expert_grid(model, setup, progress=False),
                     lambda: moelens.attribute_experts(model, setup)):
            with pytest.raises(MoelensUserError, match=r"blocks\.0\.hook_attn_out.*engine='full'"):
                call()
        hooked = moelens.trace_experts(model, setup, layer, progress=False, engine="full")
    plain = moelens.trace_experts(model, setup, layer, progress=False, engine="full")
    assert (hooked.scores - plain.scores).abs().max() > 1e-4  # the full engine ran the user's edit
    seen = []
    with model.hooks(fwd_hooks=[(f"blocks.{layer + 1}.mlp.hook_expert_indices",
                                 lambda act, hook: seen.append(act.shape))]), hooks_allowed():
        moelens.trace_experts(model, setup, layer, progress=False)
    assert seen and all(s[1] == 1 for s in seen)  # the reading hook saw the one-position suffix
    assert not any(hp._forward_hooks for hp in model.hook_dict.values())
    moelens.trace_experts(model, setup, layer, progress=False)  # nothing attached: runs


def test_a_setup_refuses_weights_edited_after_it(tiny_dirs):
    """A TraceSetup caches the clean and corrupted runs of the weights it was prepared with; after an
    in-place edit a sweep would mix them with suffixes of the edited model. It refuses instead."""
    from moelens.errors import MoelensUserError

    d, _ = tiny_dirs("mixtral")
    model = HookedMoETransformer.from_pretrained(d)
    model.tokenizer = toy_tokenizer(256)
    setup = prepare(model, CASE, seed=0, n_samples=2)
    layer = model.cfg.moe_layers[0]
    before = moelens.trace_experts(model, setup, layer, progress=False).scores
    with torch.no_grad():
        model.blocks[-1].mlp.experts.w_down.mul_(1.5)
    for call in (lambda: moelens.trace_experts(model, setup, layer, progress=False),
                 lambda: moelens.trace_layers(model, setup, progress=False),
                 lambda: moelens.attribute_experts(model, setup)):
        with pytest.raises(MoelensUserError, match="weights changed since this TraceSetup"):
            call()
    fresh = moelens.trace_experts(model, prepare(model, CASE, seed=0, n_samples=2), layer, progress=False).scores
    assert (fresh - before).abs().max() > 1e-6  # the edit matters: the old setup's numbers would be stale


@pytest.mark.parametrize("arch,warns", [("flex_olmo", True), ("gemma4", True), ("mixtral", False)])
def test_expert_scores_warn_where_a_norm_follows_the_moe(tiny_dirs, arch, warns):
    """On post-normed MoEs (FlexOlmo, Gemma 4) the expert scores add the pre-norm update after the norm:
    trace_experts, trace_expert_grid and attribute_experts say so; pre-norm models stay silent."""
    import warnings

    from moelens import attribute_experts, trace_expert_grid, trace_experts

    d, _ = tiny_dirs(arch)
    model = HookedMoETransformer.from_pretrained(d)
    model.tokenizer = toy_tokenizer(256)
    layer = model.cfg.moe_layers[0]
    for run in (lambda: trace_experts(model, CASE, layer, n_samples=2, seed=0, progress=False),
                lambda: trace_expert_grid(model, CASE, n_samples=2, seed=0, progress=False),
                lambda: attribute_experts(model, CASE, n_samples=2, seed=0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
        hits = [w for w in caught if "normalise the MoE output" in str(w.message)]
        assert bool(hits) == warns, [str(w.message) for w in caught]
