"""The patching primitives and the expert-aware cache, on Mixtral and a shared-expert model."""

import pytest
import torch

from moelens import HookedMoETransformer, expert_names_filter
from moelens import patching as P
from moelens.architectures import ARCHITECTURES

ARCHS = ["mixtral", "qwen2_moe", "deepseek_v3", "llama4", "gemma4", "flex_olmo"]


@pytest.fixture(params=ARCHS)
def model(request, tiny_dirs):
    d, _ = tiny_dirs(request.param)
    return HookedMoETransformer.from_pretrained(d)


def toks(b=1, p=10, seed=0):
    return torch.randint(0, 256, (b, p), generator=torch.Generator().manual_seed(seed))


def run(model, ids, ivs, **kw):
    return P.run_with_interventions(model, ids, ivs, **kw)


def test_empty_intervention_set_is_the_base(model):
    ids = toks(2)
    with torch.no_grad():
        assert torch.equal(run(model, ids, []), model(ids))


def test_restoring_everything_gives_the_source_logits(model):
    clean_ids, corrupt_ids = toks(seed=1), toks(seed=2)
    with torch.no_grad():
        clean_logits, clean = model.run_with_cache(clean_ids)
        # corrupt the embeddings, then restore every attention and MoE output
        layers = range(model.cfg.n_layers)
        ivs = [P.Corrupt(positions=[0, 1, 2], sigma=3.0, seed=0),
               P.Replace("attn_out", layers=layers, source=clean), P.Replace("mlp_out", layers=layers, source=clean)]
        out = run(model, clean_ids, ivs)
        assert (out - clean_logits)[:, 3:].abs().max() < 1e-4  # positions >= 3 see only restored values
        out = run(model, corrupt_ids, [P.Replace("embed", source=clean)])
    assert (out - clean_logits).abs().max() < 1e-6 * max(10.0, float(clean_logits.abs().max()))  # float noise
    assert (model(corrupt_ids) - clean_logits).abs().max() > 1e-2  # and the restoration mattered


def test_ablating_an_unrouted_expert_changes_nothing(model):
    ids = toks()
    layer = model.cfg.moe_layers[-1]
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
        base = model(ids)  # same attention kernel (SDPA) as the patched run
    routed = cache.expert_mask(layer)[0, -1]
    unrouted = int((~routed).nonzero()[0])
    routed_e = int(routed.nonzero()[0])
    with torch.no_grad():
        assert torch.equal(run(model, ids, [P.AblateExpert(layer, [unrouted], positions=[-1])]), base)
        changed = run(model, ids, [P.AblateExpert(layer, [routed_e], positions=[-1])])
    assert (changed[0, -1] - base[0, -1]).abs().max() > 1e-4
    assert torch.equal(changed[0, :-1], base[0, :-1])  # earlier positions untouched


@pytest.mark.parametrize("renormalize", [False, True])
def test_expert_ablation_equals_plain_hook_computation(model, renormalize):
    if renormalize and model.cfg.top_k == 1:
        pytest.skip("top-1 routing (Llama 4): no other slot to renormalise over")
    ids = toks()
    layer = model.cfg.moe_layers[-1]
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    e = int(cache[f"blocks.{layer}.mlp.hook_expert_indices"][0, 4, 0])

    def plain(w, hook):
        idx = cache[f"blocks.{layer}.mlp.hook_expert_indices"]
        w = w.clone()
        hit = idx[0, 4] == e
        total = w[0, 4].sum()
        w[0, 4, hit] = 0
        if renormalize:
            w[0, 4] = w[0, 4] * total / w[0, 4].sum()
        return w

    with torch.no_grad():
        want = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.mlp.hook_expert_weights", plain)])
        got = run(model, ids, [P.AblateExpert(layer, [e], positions=[4], renormalize=renormalize)])
    assert (got - want).abs().max() < 1e-5


def test_expert_mean_ablation_moves_contribution_to_reference_mean(model):
    ids = toks(3)
    layer = model.cfg.moe_layers[-1]
    with torch.no_grad():
        _, ref = model.run_with_cache(ids)
        e = int(ref[f"blocks.{layer}.mlp.hook_expert_indices"][0, -1, 0])
        hooks = P.to_hooks(model, [P.AblateExpert(layer, [e], positions=[-1], mode="mean", reference=ref)])
        out = {}
        # the MoE output itself (hook_mlp_out is it only where no norm follows the MoE)
        hooks.append((f"blocks.{layer}.mlp.hook_routed_out", lambda x, hook: out.setdefault("routed", x)))
        model.run_with_hooks(ids[:1], fwd_hooks=hooks)
    mask = ref.expert_mask(layer)[..., e]
    mean_c = ref.expert_contribution(layer, e).sum((0, 1)) / mask.sum()
    routed_out = ref[f"blocks.{layer}.mlp.hook_routed_out"][0, -1]
    want = routed_out - ref.expert_contribution(layer, e)[0, -1] + mean_c
    assert (out["routed"][0, -1] - want).abs().max() < 1e-4


def test_forced_routing_to_clean_routing_is_identity(model):
    ids = toks(2)
    layer = model.cfg.moe_layers[0]
    with torch.no_grad():
        base, clean = model.run_with_cache(ids)
        same = run(model, ids, [P.ForceRouting(layer, experts=clean, weights=clean)])
        rule = run(model, ids, [P.ForceRouting(layer, experts=clean)])  # weights by the router's rule
    tol = 1e-6 * max(10.0, float(base.abs().max()))  # float noise, relative to the logits' scale
    assert (same - base).abs().max() < tol
    assert (rule - base).abs().max() < tol


def test_forced_routing_reroutes(model):
    ids = toks()
    layer = model.cfg.moe_layers[0]
    forced = list(range(model.cfg.top_k))
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
        hooks = P.to_hooks(model, [P.ForceRouting(layer, experts=forced, positions=[2])])
        seen = {}
        hooks.append((f"blocks.{layer}.mlp.hook_expert_indices", lambda x, hook: seen.setdefault("idx", x)))
        hooks.append((f"blocks.{layer}.mlp.hook_expert_weights", lambda x, hook: seen.setdefault("w", x)))
        model.run_with_hooks(ids, fwd_hooks=hooks)
    assert seen["idx"][0, 2].tolist() == forced
    assert torch.equal(seen["idx"][0, 3], cache[f"blocks.{layer}.mlp.hook_expert_indices"][0, 3])
    scores = cache[f"blocks.{layer}.mlp.hook_router_scores"][0, 2, forced]
    if model.cfg.norm_topk_prob:
        scores = scores / scores.sum()
    scores = scores * model.cfg.routed_scaling_factor  # DeepSeek-V3: 2.5 in the tiny config
    if model.cfg.router_per_expert_scale:  # Gemma 4: a learned scale per expert
        scores = scores * model.blocks[layer].mlp.router.per_expert_scale[forced]
    assert torch.allclose(seen["w"][0, 2].float(), scores, atol=1e-6)


def test_batched_sweep_equals_one_at_a_time(model):
    ids = toks()
    with torch.no_grad():
        _, clean = model.run_with_cache(ids)
    z = torch.randn(3, 2, model.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 2
    metric = P.logit_diff(5, 7)
    sets = [[P.Corrupt([1, 2], noise=z), P.Replace("mlp_out", layer=l, positions=[p], source=clean)]
            for l in range(model.cfg.n_layers) for p in (2, 5, 9)]
    sets.append([P.Corrupt([1, 2], noise=z), P.AblateExpert(model.cfg.moe_layers[0], [0, 1, 2])])
    batched = P.run_sweep(model, ids, sets, metric, group_size=3, max_rows=8, progress=False)
    for i, s in enumerate(sets):
        with torch.no_grad():
            one = metric(run(model, ids.expand(3, -1), s)).mean()
        assert abs(float(batched.values[i]) - float(one)) < 1e-4
    assert batched.per_row.shape == (len(sets), 3)


def test_add_delta_of_expert_contributions_matches_restore_experts(model):
    clean_ids = toks(seed=3)
    layer = model.cfg.moe_layers[-1]
    z = torch.randn(1, 2, model.cfg.d_model) * 3
    with torch.no_grad():
        _, clean = model.run_with_cache(clean_ids)
        _, corrupted = model.run_with_cache(clean_ids, fwd_hooks=P.to_hooks(model, [P.Corrupt([0, 1], noise=z)]))
        experts = clean[f"blocks.{layer}.mlp.hook_expert_indices"][0, -1].tolist()
        delta = P.expert_delta(model, layer, experts, clean, corrupted)[:, -1]
        a = run(model, clean_ids, [P.Corrupt([0, 1], noise=z), P.RestoreExperts(layer, experts, clean, corrupted)])
        b = run(model, clean_ids, [P.Corrupt([0, 1], noise=z), P.AddDelta("mlp_out", delta, layer=layer, positions=[-1])])
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v2_lite", "deepseek_v3",
                                  "glm4_moe", "glm4_moe_lite", "gpt_oss", "granitemoe", "granitemoeshared", "minimax_m2", "ernie4_5_moe", "phimoe", "deepseek_v32", "glm_moe_dsa"])
def test_cache_decompositions(arch, tiny_dirs):
    if arch.startswith("deepseek") and "DeepseekV2ForCausalLM" not in ARCHITECTURES:
        pytest.skip("DeepSeek-V2 support not registered")
    d, _ = tiny_dirs(arch)
    model = HookedMoETransformer.from_pretrained(d)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks(2))
    for l in model.cfg.moe_layers:
        routed = cache[f"blocks.{l}.mlp.hook_routed_out"]
        total = sum(cache.expert_contribution(l, e) for e in range(model.cfg.n_experts))
        assert (total - routed).abs().max() < 1e-5
        assert (cache.expert_contributions(l).sum(2) - routed).abs().max() < 1e-5
        assert (cache.routed_plus_shared(l) - cache[f"blocks.{l}.hook_mlp_out"]).abs().max() < 1e-5
        usage = cache.expert_usage(l)
        assert int(usage.sum()) == 2 * 10 * model.cfg.top_k
        table = cache.routing(l)
        assert len(table) == 2 * 10 * model.cfg.top_k and set(table.columns) >= {"position", "slot", "expert", "weight", "score"}
        assert cache.routing_entropy(l).shape == (2, 10)


def test_names_filter_and_cpu_cache(model):
    layer = model.cfg.moe_layers[-1]
    with torch.no_grad():
        _, cache = model.run_with_cache(toks(), names_filter=expert_names_filter(layers=[layer]), device="cpu")
    assert all(k.startswith(f"blocks.{layer}.") for k in cache.keys())
    assert cache.expert_contribution(layer, 0).device.type == "cpu"
    other = [l for l in model.cfg.moe_layers if l != layer]
    if other:
        with pytest.raises(KeyError, match="not in this cache"):
            cache.expert_contribution(other[0], 0)


def test_bad_input_errors(model):
    ids = toks()
    with torch.no_grad():
        _, clean = model.run_with_cache(ids, names_filter=["blocks.0.hook_mlp_out"])
    dense = [l for l in range(model.cfg.n_layers) if l not in model.cfg.moe_layers]
    with pytest.raises(IndexError, match="layer=99 out of range"):
        run(model, ids, [P.Replace("mlp_out", layer=99, source=clean)])
    with pytest.raises(IndexError, match=r"positions \[40\] out of range"):
        run(model, ids, [P.Replace("mlp_out", layer=0, positions=[40], source=clean)])
    with pytest.raises(IndexError, match="expert .* out of range"):
        run(model, ids, [P.AblateExpert(model.cfg.moe_layers[0], [99])])
    with pytest.raises(ValueError, match="no expert axis"):
        run(model, ids, [P.Replace("mlp_out", layer=0, experts=[1], source=clean)])
    with pytest.raises(KeyError, match="source cache has no 'blocks.1.hook_mlp_out'"):
        run(model, ids, [P.Replace("mlp_out", layer=1, source=clean)])
    with pytest.raises(ValueError, match="does not match activation"):
        run(model, ids, [P.Replace("mlp_out", layer=0, source=torch.zeros(1, 3, model.cfg.d_model))])
    with pytest.raises(KeyError, match="Did you mean"):
        run(model, ids, [P.Replace("blocks.0.hook_mlp_outt", source=clean)])
    with pytest.raises(ValueError, match="noise shape"):
        run(model, ids, [P.Corrupt([0, 1], noise=torch.zeros(1, 3, model.cfg.d_model))])
    if dense:
        with pytest.raises(ValueError, match="is dense"):
            run(model, ids, [P.ForceRouting(dense[0], experts=[0] * model.cfg.top_k)])


def test_block_ablation_zero_mean_resample(model):
    ids = toks(3, seed=5)
    name = "blocks.1.hook_mlp_out"
    with torch.no_grad():
        _, ref = model.run_with_cache(ids, names_filter=[name])
        seen = {}
        grab = (name, lambda x, hook: seen.__setitem__("act", x.clone()))

        def run_ablate(iv, rows=ids[:1]):
            model.run_with_hooks(rows, fwd_hooks=P.to_hooks(model, [iv]) + [grab])
            return seen["act"]

        act = run_ablate(P.Ablate("mlp_out", layer=1, positions=[2, 4]))
        assert torch.equal(act[0, [2, 4]], torch.zeros(2, model.cfg.d_model))
        assert torch.allclose(act[0, 3], ref[name][0, 3], atol=1e-5)  # other positions untouched
        act = run_ablate(P.Ablate("mlp_out", layer=1, positions=[2], mode="mean", reference=ref))
        assert torch.allclose(act[0, 2], ref[name].mean((0, 1)), atol=1e-6)
        act = run_ablate(P.Ablate("mlp_out", layer=1, positions=[2], mode="mean", reference=ref, per_position=True))
        assert torch.allclose(act[0, 2], ref[name][:, 2].mean(0), atol=1e-6)
        act = run_ablate(P.Ablate("mlp_out", layer=1, positions=[2], mode="resample", reference=ref, seed=3))
        assert any(torch.allclose(act[0, 2], ref[name][b, 2], atol=1e-6) for b in range(3))
    with pytest.raises(ValueError, match="needs reference"):
        P.Ablate("mlp_out", layer=1, mode="mean").hooks(model)


def test_replace_slots_and_experts_sub_axes(model):
    layer = model.cfg.moe_layers[0]
    a, b = toks(seed=8), toks(seed=9)
    with torch.no_grad():
        _, src = model.run_with_cache(a)
        seen = {}
        names = [f"blocks.{layer}.mlp.hook_router_logits", f"blocks.{layer}.mlp.hook_expert_weights"]
        grabs = [(n, lambda x, hook: seen.__setitem__(hook.name, x.clone())) for n in names]
        ivs = [P.Replace("router_logits", layer=layer, positions=[3, 5], experts=[1, 2], source=src),
               P.Replace("expert_weights", layer=layer, positions=[6], slots=[0], source=src)]
        _, base = model.run_with_cache(b)
        model.run_with_hooks(b, fwd_hooks=P.to_hooks(model, ivs) + grabs)
    logits = seen[names[0]]
    assert torch.allclose(logits[0, 3:6:2][:, 1:3], src[names[0]][0, 3:6:2][:, 1:3], atol=1e-6)
    assert torch.allclose(logits[0, 3, 3:], base[names[0]][0, 3, 3:], atol=1e-5)  # other experts untouched
    w = seen[names[1]]
    assert torch.allclose(w[0, 6, 0], src[names[1]][0, 6, 0], atol=1e-6)
