"""How good is the attribution screen on the bundled model? Numbers quoted in docs/attribution.md.

For each of the 100 facts of scripts/analyze_bundled_model.py (``facts[::36][:100]``, 5 noise samples,
seed = fact index), at the last position:

* exhaustive exact expert tracing of every (layer, expert) (the suffix engine, equal to
  ``trace_experts``), recording for every patched row whether a later layer's chosen experts at the
  last position differ from the corrupted run's (a routing flip);
* the first-order estimates of ``attribute_experts``;
* correlation of estimate and exact over all pairs and over the pairs the patch changes (non-zero
  delta), top-5 recovery of the screen alone, and the number of verified candidates N (highest
  estimates re-scored exactly) needed for the verified top-5 to equal the exhaustive top-5;
* the estimate's error with and without a downstream routing flip;
* the same for the layer grid (``attribute_layers`` vs ``trace_layers``, kinds mlp/attn/resid, and the
  necessity direction for mlp).

    python scripts/attribution_accuracy.py [--facts 100] [--threads 2]
"""

import argparse
from dataclasses import replace

import numpy as np
import torch

import moelens
from moelens import HookedMoETransformer
from moelens.loading import bundled_models
from moelens.tracing.engine import hooks_allowed
from moelens.tracing.trace import prepare


def exact_with_flips(model, setup, layer, pos):
    """Exact scores [n_experts] (as trace_experts) and flip fraction [n_experts] over noise samples."""
    E, n, L = model.cfg.n_experts, setup.n_samples, model.cfg.n_layers
    captured = {j: [] for j in range(layer + 1, L)}

    def grab(act, hook):
        captured[int(hook.name.split(".")[1])].append(act[:, -1].clone())

    hooks = [(f"blocks.{j}.mlp.hook_expert_indices", grab) for j in captured if j in model.cfg.moe_layers]
    deltas = [setup.expert_delta(layer, [e], pos) for e in range(E)]
    every_row = replace(setup, corrupted_samples=None)  # run zero-delta rows too: one captured row per (expert, sample)
    with model.hooks(fwd_hooks=hooks), hooks_allowed():  # the hooks only read each row's routing
        scores = every_row.restore_scores(model, layer, deltas, pos, max_rows=10_000)
    flips = torch.zeros(E * n, dtype=torch.bool)
    samples = torch.arange(n).repeat(E)
    for j, chunks in captured.items():
        if not chunks:
            continue
        idx = torch.cat(chunks).sort(-1).values  # [E * n, k]
        base = setup.corrupted_cache[f"blocks.{j}.mlp.hook_expert_indices"][samples, -1].sort(-1).values
        flips |= (idx != base).any(-1)
    return scores, flips.reshape(E, n).float().mean(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m = HookedMoETransformer.from_pretrained("moelens-tiny-facts")
    facts = moelens.load_facts(bundled_models()["moelens-tiny-facts"] / "facts.jsonl")
    sel = facts[::36][: args.facts]
    L, E = m.cfg.n_layers, m.cfg.n_experts
    corr_all, corr_moved, top5_screen, need_n, err_flip, err_noflip = [], [], [], [], [], []
    grids = [("mlp", "restore"), ("attn", "restore"), ("resid", "restore"), ("mlp", "necessity")]
    grid_corr = {k: [] for k in grids}
    grid_err = {k: [] for k in grids}
    err_by_layer = [[] for _ in range(L)]
    for i, case in enumerate(sel):
        s = prepare(m, case, seed=i, n_samples=5)
        pos = [s.tokens.shape[1] - 1]
        span = s.clean - s.corrupted
        a = moelens.attribute_experts(m, s)
        exact = torch.empty(L, E)
        flips = torch.empty(L, E)
        for l in m.cfg.moe_layers:
            exact[l], flips[l] = exact_with_flips(m, s, l, pos)
        est = a.scores
        moved = torch.stack([torch.stack([(s.expert_delta(l, [e], pos) != 0).any() for e in range(E)]) for l in range(L)])
        x, y = est.flatten().numpy(), exact.flatten().numpy()
        corr_all.append(np.corrcoef(x, y)[0, 1])
        mv = moved.flatten().numpy()
        if mv.sum() >= 3:
            corr_moved.append(np.corrcoef(x[mv], y[mv])[0, 1])
        top_exact = np.sort(y)[::-1][:5]
        order = np.argsort(-x, kind="stable")
        top5_screen.append(bool(np.allclose(np.sort(y[order[:5]])[::-1], top_exact, atol=1e-5)))
        for n in range(5, L * E + 1):  # verified top-5 of the n highest estimates == exhaustive top-5
            if np.allclose(np.sort(y[order[:n]])[::-1][:5], top_exact, atol=1e-5):
                need_n.append(n)
                break
        err = np.abs(x - y) / abs(span)
        fl = flips.flatten().numpy() > 0
        err_flip += list(err[mv & fl])
        err_noflip += list(err[mv & ~fl])
        for l in range(L):
            err_by_layer[l] += list(err.reshape(L, E)[l][moved[l].numpy()])
        for kind, direction in grid_corr:
            g = moelens.attribute_layers(m, s, kind=kind, direction=direction)
            t = moelens.trace_layers(m, s, kind=kind, direction=direction, progress=False)
            gx, gy = g.scores.flatten().numpy(), t.scores.flatten().numpy()
            keep = np.abs(gy - (s.corrupted if direction == "restore" else s.clean)) > 1e-6
            if keep.sum() >= 3:
                grid_corr[kind, direction].append(np.corrcoef(gx[keep], gy[keep])[0, 1])
            grid_err[kind, direction] += list(np.abs(gx - gy)[keep] / abs(span))
        if (i + 1) % 10 == 0:
            print(f"{i + 1} facts done", flush=True)
    need = np.array(need_n)
    print(f"facts: {len(sel)}; {L} layers x {E} experts = {L * E} (layer, expert) pairs; 5 noise samples; last position")
    print(f"correlation(estimate, exact), per fact: all pairs median {np.median(corr_all):.3f} "
          f"(mean {np.mean(corr_all):.3f}); pairs with a non-zero delta median {np.median(corr_moved):.3f} "
          f"(mean {np.mean(corr_moved):.3f}, {len(corr_moved)} facts)")
    print(f"screen's own top-5 == exact top-5: {np.mean(top5_screen):.0%} of facts")
    for n in (5, 6, 8, 10, 12, 15):
        print(f"  verify top {n:2d}: verified top-5 == exhaustive top-5 on {np.mean(need <= n):.0%} of facts")
    print(f"  candidates needed: median {np.median(need):.0f}, 90th percentile {np.percentile(need, 90):.0f}, max {need.max()}")
    print(f"normalised |estimate - exact| of pairs with a non-zero delta: with a downstream routing flip "
          f"mean {np.mean(err_flip):.3f} (n={len(err_flip)}), without mean {np.mean(err_noflip):.3f} (n={len(err_noflip)})")
    print("  by layer: " + ", ".join(f"L{l} {np.mean(v):.3f} (n={len(v)})" for l, v in enumerate(err_by_layer) if v))
    for kind, direction in grid_corr:
        print(f"layer grid ({kind}, {direction}): correlation over changed cells median {np.median(grid_corr[kind, direction]):.3f}; "
              f"normalised |error| mean {np.mean(grid_err[kind, direction]):.3f}")


if __name__ == "__main__":
    main()
