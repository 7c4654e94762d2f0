"""Regressions found by checking each intervention against a hand-written hook (patching review)."""

import pytest
import torch

from moelens import HookedMoETransformer
from moelens import patching as P


@pytest.fixture(params=["mixtral", "deepseek_v3"], scope="module")
def model(request, tiny_dirs):
    d, _ = tiny_dirs(request.param)
    return HookedMoETransformer.from_pretrained(d)


def toks(b=2, p=8, seed=0):
    return torch.randint(0, 256, (b, p), generator=torch.Generator().manual_seed(seed))


def test_ablate_expert_sees_forced_routing_whatever_the_list_order(model):
    # AblateExpert reads hook_expert_indices; listed before a ForceRouting it used to read the
    # unforced experts, so it zeroed the wrong slots (and not the forced expert)
    ids, layer, k = toks(), model.cfg.moe_layers[-1], model.cfg.top_k
    forced = list(range(model.cfg.n_experts - k, model.cfg.n_experts))
    idx_name, w_name = (f"blocks.{layer}.mlp.hook_expert_{n}" for n in ("indices", "weights"))

    def force(a, hook):
        a = a.clone()
        a[:, -1] = torch.tensor(forced)
        return a

    def ablate_slot0(w, hook):
        w = w.clone()
        w[:, -1, 0] = 0
        return w

    with torch.no_grad():
        want = model.run_with_hooks(ids, fwd_hooks=[(idx_name, force), (w_name, ablate_slot0)])
    fr, ab = P.ForceRouting(layer, forced, positions=[-1]), P.AblateExpert(layer, [forced[0]], positions=[-1])
    for ivs in ([fr, ab], [ab, fr]):
        got = P.run_with_interventions(model, ids, ivs)
        assert (got - want).abs().max() < 1e-5
    with torch.no_grad():
        _, ref = model.run_with_cache(toks(4, seed=1))
    routed = ref.expert_mask(layer).flatten(0, 1).any(0)
    e = int(routed.nonzero()[0])
    mean_ivs = [P.AblateExpert(layer, [e], positions=[-1], mode="mean", reference=ref),
                P.ForceRouting(layer, [e] + [x for x in forced if x != e][: k - 1], positions=[-1])]
    a = P.run_with_interventions(model, ids, mean_ivs)
    b = P.run_with_interventions(model, ids, mean_ivs[::-1])
    assert (a - b).abs().max() < 1e-5


def test_non_integer_indices_raise(model):
    # floats were truncated and boolean masks read as indices 0/1, silently
    ids, layer = toks(1), model.cfg.moe_layers[0]
    with torch.no_grad():
        _, src = model.run_with_cache(ids)
    mask = torch.zeros(8, dtype=torch.bool)
    mask[-1] = True
    bad = [P.Replace("mlp_out", src, layer=0, positions=[1.5]),
           P.Replace("mlp_out", src, layer=0, positions=mask),
           P.Replace("mlp_out", src, layer=0, positions=True),
           P.Replace("expert_weights", src, layer=layer, slots=[0.5]),
           P.AblateExpert(layer, [1.7]),
           P.AblateExpert(layer, [0], positions=[True]),
           P.ForceRouting(layer, [0.5] + list(range(1, model.cfg.top_k))),
           P.Corrupt([1.0], sigma=1.0)]
    for iv in bad:
        with pytest.raises(IndexError, match="integer"):
            P.run_with_interventions(model, ids, [iv])
    # integer tensors and numpy-style ints still work
    P.run_with_interventions(model, ids, [P.Replace("mlp_out", src, layer=0, positions=torch.tensor([-1, 2]))])


def test_mean_ablation_of_an_expert_the_reference_never_routes_raises(model):
    # the mean over zero routed positions used to be taken as 0 (a silent zero-ablation)
    layer = model.cfg.moe_layers[-1]
    with torch.no_grad():
        _, ref = model.run_with_cache(toks(1, p=2, seed=3))
    never = int((~ref.expert_mask(layer).flatten(0, 1).any(0)).nonzero()[0])
    with pytest.raises(ValueError, match="never routed"):
        P.run_with_interventions(model, toks(1), [P.AblateExpert(layer, [never], mode="mean", reference=ref)])


def test_logit_diff_is_computed_in_fp32():
    logits = torch.tensor([[[256.0, 0.5]]], dtype=torch.bfloat16)  # 255.5 is not a bf16 number
    assert float(P.logit_diff(0, 1)(logits)[0]) == 255.5
