"""Attribution screen + exact verification vs exhaustive exact expert tracing, and the expert sweep vs its floor.

A random Mixtral-like model (default 16 layers x 64 experts, top-4, d_model 256), vocab 32000,
16-token prompt, 10 noise samples, CPU, one thread, CPU time (``time.process_time``; the machine it
was written on is shared). Measured side by side in one run:

1. a 64-expert last-position exact sweep at one layer (``prepare`` + ``trace_experts``) against the
   floor that any method must run: the clean forward plus the 10-sample corrupted forward;
2. screen (``attribute_experts``: every layer and expert, one backward) + exact verification of the
   top 10, against exhaustive exact tracing of every sparse layer three ways: ``trace_expert_grid``
   (every layer in one sweep), ``trace_experts`` layer by layer (both skip a row whose patch is
   zero - an expert routed neither in the clean run nor in that noise sample: it is the corrupted
   run), and ``trace_experts`` layer by layer running every (layer, expert, sample) row, as the
   sweep did when issue #15 was filed;
3. the per-position grid ``[n_layers, n_positions, n_experts]``: ``attribute_experts(positions="all")``
   (one backward over the whole prompt) against exact ``trace_expert_grid`` at every position;
4. peak memory (extra RSS over the loaded model) of each.

    python benchmarks/attribution.py            # 16 layers x 64 experts (the issue's configuration)
    python benchmarks/attribution.py --layers 48 --experts 128 --top-k 8 --d-model 128   # Qwen3-30B-A3B's shape, narrow
"""

import argparse
import os
from dataclasses import replace
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from tracing import PeakRSS  # noqa: E402  (same directory)


def best_of(fn, repeats):
    """Best CPU time (process_time, one thread: robust on a shared machine) of ``repeats`` runs."""
    times, out = [], None
    for _ in range(repeats):
        t = time.process_time()
        out = fn()
        times.append(time.process_time() - t)
    return min(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--no-per-position", action="store_true", help="skip the exact per-position grid (long on big configs)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # internal: one measurement per process
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import moelens
    from moelens import FactCase, HookedMoETransformer
    from moelens import patching as P
    from moelens.testing import tiny_hf_config, toy_tokenizer
    from moelens.tracing.trace import prepare

    hf = tiny_hf_config("mixtral", vocab_size=32000, hidden_size=args.d_model, num_hidden_layers=args.layers,
                        num_attention_heads=8, num_key_value_heads=2, intermediate_size=args.d_model,
                        num_local_experts=args.experts, num_experts_per_tok=args.top_k)
    model = HookedMoETransformer.from_config(hf, seed=0, tokenizer=toy_tokenizer(32000))  # std 1/sqrt(fan_in)
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.router.W_router.mul_(3.0)  # a decisive router, as moelens.testing.sharpen does
    words = [f"w{i}" for i in (5, 9, 14, 3, 77, 21, 8, 30, 31, 32, 33, 34, 35, 36, 37)]
    case = FactCase(" ".join(words), "w14 w3 w77", "w40", "w41")  # 16 tokens with BOS
    n, L, r = args.samples, model.cfg.n_layers, args.repeats
    kw = dict(seed=0, n_samples=n)
    setup = prepare(model, case, **kw)
    tokens = setup.tokens
    layer = L // 2

    def floor():
        with torch.no_grad():
            model(tokens)
            return model.run_with_hooks(tokens.expand(n, -1), fwd_hooks=P.to_hooks(model, [setup.corrupt()]))

    def sweep():
        return moelens.trace_experts(model, case, layer, progress=False, **kw)

    def exhaustive(every_row=False):
        s = prepare(model, case, **kw)
        if every_row:  # no zero-patch rows skipped: every (layer, expert, sample) row runs
            s = replace(s, corrupted_samples=None)
        return {l: moelens.trace_experts(model, s, l, progress=False).scores for l in model.cfg.moe_layers}

    def screen():
        return moelens.screen_experts(model, case, n_verify=10, **kw)

    if args.memory_of:  # a fresh process: the allocator holds nothing from other measurements
        def naive():  # what attribution avoids: every hook kept with its gradient, and parameter gradients
            kept = {}

            def keep(act, hook):
                if act.requires_grad:
                    act.retain_grad()
                kept[hook.name] = act

            with torch.enable_grad():
                logits = model.run_with_hooks(tokens.expand(n, -1), fwd_hooks=P.to_hooks(model, [setup.corrupt()])
                                              + [(lambda name: True, keep)])
                setup.metric(logits).sum().backward()
            return kept

        fn = {"attribution": lambda: moelens.attribute_experts(model, case, **kw), "exhaustive": exhaustive,
              "screen": screen, "naive": naive}[args.memory_of]
        with PeakRSS() as m:
            fn()
        print(m.extra)
        return

    def memory_of(what):
        import subprocess

        out = subprocess.run([sys.executable, __file__, "--memory-of", what, "--layers", str(args.layers),
                              "--experts", str(args.experts), "--d-model", str(args.d_model), "--samples", str(n),
                              "--threads", str(args.threads), "--top-k", str(args.top_k)], capture_output=True,
                             text=True, check=True)
        return int(out.stdout.split()[-1])

    t_floor, _ = best_of(floor, r)
    t_prep, _ = best_of(lambda: prepare(model, case, **kw), r)
    t_sweep, _ = best_of(sweep, r)
    t_att, _ = best_of(lambda: moelens.attribute_experts(model, case, **kw), r)
    t_screen, sc = best_of(screen, r)
    T = tokens.shape[1]
    t_att_all, a_all = best_of(lambda: moelens.attribute_experts(model, case, positions="all", **kw), r)

    def exact_per_position():  # [L, T, E]: trace_expert_grid at each position on one prepared setup
        s = prepare(model, case, **kw)
        return torch.stack([moelens.trace_expert_grid(model, s, positions=[p], progress=False).scores
                            for p in range(T)], 1)

    if not args.no_per_position:
        t_exact_all, exact_all = best_of(exact_per_position, 1)
        fin = torch.isfinite(exact_all)
        corr_all = float(torch.corrcoef(torch.stack([a_all.scores[fin], exact_all[fin]]))[0, 1])
    t_grid, grid = best_of(lambda: moelens.trace_expert_grid(model, case, progress=False, **kw), r)
    t_exh, ex = best_of(exhaustive, 1)
    t_every, ex_every = best_of(lambda: exhaustive(every_row=True), 1)
    same = max(max(float((ex[l] - ex_every[l]).abs().max()), float((ex[l] - grid.scores[l]).abs().max())) for l in ex)
    mem = {}
    exact = torch.stack([ex[l] for l in range(L)])
    top_exact = set(torch.argsort(exact.flatten(), descending=True)[:5].tolist())
    top_screen = {l * model.cfg.n_experts + e for l, e, _ in sc.top(5)}
    est = sc.estimates.flatten()
    corr = float(torch.corrcoef(torch.stack([est, exact.flatten()]))[0, 1])
    mib = 2**20
    print(f"model: {L} layers x {model.cfg.n_experts} experts (top-{args.top_k}), d_model {args.d_model}, vocab 32000; "
          f"prompt {tokens.shape[1]} tokens; {n} noise samples; {args.threads} threads; best of {r}")
    print(f"floor (clean forward + {n}-sample corrupted forward): {t_floor * 1e3:.0f} ms")
    print(f"exact {model.cfg.n_experts}-expert sweep at layer {layer}, last position (prepare + trace_experts): "
          f"{t_sweep * 1e3:.0f} ms = {t_sweep / t_floor:.2f}x the floor (prepare alone {t_prep / t_floor:.2f}x)")
    print(f"attribution of every layer and expert: {t_att * 1e3:.0f} ms = {t_att / t_floor:.2f}x the floor")
    print(f"screen + verify top 10: {t_screen * 1e3:.0f} ms = {t_screen / t_floor:.2f}x the floor")
    print(f"exhaustive exact, trace_expert_grid ({len(model.cfg.moe_layers)} layers x {model.cfg.n_experts} experts in "
          f"one sweep): {t_grid * 1e3:.0f} ms = {t_grid / t_floor:.1f}x the floor -> screen + verify "
          f"{t_grid / t_screen:.1f}x faster")
    print(f"exhaustive exact, trace_experts layer by layer: {t_exh * 1e3:.0f} ms = "
          f"{t_exh / t_floor:.1f}x the floor -> screen + verify {t_exh / t_screen:.1f}x faster")
    print(f"exhaustive exact running every (layer, expert, sample) row: {t_every * 1e3:.0f} ms = "
          f"{t_every / t_floor:.1f}x the floor -> screen + verify {t_every / t_screen:.1f}x faster "
          f"(max |difference| of the three exhaustive results {same:.1e})")
    print(f"per-position expert grid [{L} layers, {T} positions, {model.cfg.n_experts} experts]: attribute_experts("
          f"positions='all') {t_att_all * 1e3:.0f} ms = {t_att_all / t_floor:.1f}x the floor", end="")
    if args.no_per_position:
        print(" (exact per-position grid not measured: --no-per-position)")
    else:
        print(f"; exact (trace_expert_grid at each position) {t_exact_all * 1e3:.0f} ms = {t_exact_all / t_floor:.1f}x "
              f"the floor -> attribution {t_exact_all / t_att_all:.1f}x faster; correlation(estimate, exact) over all "
              f"cells {corr_all:.3f}")
    print(f"  this prompt: verified top-5 == exhaustive top-5: {top_screen == top_exact}; "
          f"correlation(estimate, exact) over all pairs {corr:.3f}")
    sys.stdout.flush()
    mem = {what: memory_of(what) for what in ("attribution", "screen", "exhaustive", "naive")}
    print(f"memory (extra peak RSS over the loaded model, each in a fresh process): attribution "
          f"{mem['attribution'] / mib:.0f} MiB, screen + verify {mem['screen'] / mib:.0f} MiB, exhaustive exact "
          f"{mem['exhaustive'] / mib:.0f} MiB; a plain backward keeping every hook with its gradient (and the "
          f"parameters' gradients) "
          f"{mem['naive'] / mib:.0f} MiB (model {sum(p.numel() * p.element_size() for p in model.parameters()) / mib:.0f} MiB)")


if __name__ == "__main__":
    main()
