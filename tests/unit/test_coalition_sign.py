"""The greedy coalition search follows the sign of the layer's effect, for both signs."""

import pytest
import torch

from moelens import FactCase, HookedMoETransformer
from moelens.tracing.trace import coalition_score, prepare, resolve_positions, trace_coalitions


@pytest.fixture(scope="module")
def model():
    return HookedMoETransformer.from_pretrained("moelens-tiny-facts")


def reference_greedy(model, setup, layer, pool, target_fraction, max_size):
    """The search written out with coalition_score, one candidate at a time."""
    pos = resolve_positions("last", setup.tokenized)
    layer_score = float(setup.restore_scores(model, layer, [setup.layer_delta(layer, pos)], pos)[0])
    target = setup.corrupted + target_fraction * (layer_score - setup.corrupted)
    up = layer_score >= setup.corrupted
    chosen, curve = [], []
    while len(chosen) < max_size:
        scores = {e: coalition_score(model, setup, layer, chosen + [e], pos) for e in pool if e not in chosen}
        e = (max if up else min)(scores, key=scores.get)
        chosen.append(e)
        curve.append(scores[e])
        if (curve[-1] >= target) if up else (curve[-1] <= target):
            return chosen, curve, True, layer_score
    return chosen, curve, False, layer_score


@pytest.mark.parametrize("case,seed,expect_sign", [
    (FactCase("Tel Mor plays the", "Tel Mor", "saxophone", "trombone"), 3, -1),   # restoring layer 3 hurts
    (FactCase("Tel Mor plays the", "Tel Mor", "saxophone", "trombone"), 5, +1),  # the layer rescues: two steps up
])
def test_greedy_search_both_signs(model, case, seed, expect_sign):
    setup = prepare(model, case, seed=seed, n_samples=5)
    r = trace_coalitions(model, setup, 3, progress=False)
    assert (r.layer_score - r.corrupted > 0) == (expect_sign > 0)
    assert r.sign == expect_sign
    chosen, curve, reached, layer_score = reference_greedy(model, setup, 3, r.union, r.target_fraction,
                                                           min(len(r.union), 2 * model.cfg.top_k))
    assert r.layer_score == pytest.approx(layer_score, abs=1e-4)
    assert r.greedy == chosen
    assert torch.allclose(r.curve, torch.tensor(curve), atol=1e-4)
    assert r.reached == reached
    # the first step moves the contrast the way the layer does
    assert expect_sign * (float(r.curve[0]) - r.corrupted) > 0
    target = r.corrupted + r.target_fraction * (r.layer_score - r.corrupted)
    if r.reached:
        assert expect_sign * (float(r.curve[-1]) - target) >= 0
        assert all(expect_sign * (float(v) - target) < 0 for v in r.curve[:-1])
