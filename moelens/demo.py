"""`moelens demo`: the whole mission on the bundled model in a couple of minutes on a CPU."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

BUNDLED = "moelens-tiny-facts"


def choose_facts(model, facts, n_facts: int, n_samples: int, seed: int):
    """A handful of facts with distinct relations, spread over the world, that pass the dataset
    protocol's filter (clean contrast >= ``min_clean``, noise drop ``clean - corrupted`` >=
    ``min_drop``, :class:`~moelens.tracing.protocol.ProtocolConfig`'s defaults): a case the noise
    barely moves would turn float noise into huge normalised rescues. Fact ``i`` is traced with
    noise seed ``seed + i``. Returns ``(cases, their TraceSetups, number of candidates skipped)``."""
    from moelens.tracing.protocol import ProtocolConfig
    from moelens.tracing.trace import prepare

    protocol = ProtocolConfig()
    chosen, setups, relations, skipped = [], [], set(), 0
    stride = max(1, len(facts) // 97)
    for case in facts[::stride] + [c for i, c in enumerate(facts) if i % stride]:
        if case.relation in relations:
            continue
        setup = prepare(model, case, seed=seed + len(chosen), n_samples=n_samples)
        if setup.clean < protocol.min_clean or setup.clean - setup.corrupted < protocol.min_drop:
            skipped += 1
            continue
        chosen.append(case)
        setups.append(setup)
        relations.add(case.relation)
        if len(chosen) == n_facts:
            return chosen, setups, skipped
    raise ValueError(f"only {len(chosen)} relations have a fact passing the filter (clean >= {protocol.min_clean}, "
                     f"drop >= {protocol.min_drop}) with seed {seed}; ask for fewer facts or another seed")


def run_demo(out_dir, n_facts: int = 4, n_samples: int = 5, seed: int = 0, progress: bool = True) -> dict:
    """Trace a handful of the bundled model's facts; write HTML figures into ``out_dir``; return numbers."""
    from tqdm.auto import tqdm

    from moelens import HookedMoETransformer, plotting
    from moelens.loading import bundled_models
    from moelens.tracing import load_facts, trace_coalitions, trace_experts, trace_layers
    from moelens.tracing.protocol import ProtocolConfig
    from moelens.tracing.trace import prepare

    start = time.time()
    for name, value in (("n_facts", n_facts), ("n_samples", n_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: give a whole number >= 1")
    if BUNDLED not in bundled_models():
        raise FileNotFoundError(f"the bundled model {BUNDLED!r} is missing from this installation")
    facts = load_facts(bundled_models()[BUNDLED] / "facts.jsonl")
    n_relations = len({c.relation for c in facts})
    if n_facts > n_relations:
        raise ValueError(f"n_facts={n_facts}: the demo traces facts of distinct relations and the bundled world "
                         f"has {n_relations}; give 1 to {n_relations}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = HookedMoETransformer.from_pretrained(BUNDLED)
    chosen, setups, skipped = choose_facts(model, facts, n_facts, n_samples, seed)
    protocol = ProtocolConfig()
    sparse = list(model.cfg.moe_layers)
    print(f"model {BUNDLED}: {model.cfg.architecture}, {model.cfg.n_layers} layers, {model.cfg.n_experts} experts "
          f"(top-{model.cfg.top_k}), {model.n_params():,} parameters")
    rescue = np.zeros((len(sparse), model.cfg.n_experts))
    layer_rescue = np.zeros(len(sparse))
    lines = []
    first_trace = None
    for i, case in enumerate(tqdm(chosen, desc="tracing facts", disable=not progress)):
        setup = setups[i]
        if first_trace is None:
            first_trace = trace_layers(model, setup, positions="all", progress=False)
        for j, layer in enumerate(sparse):
            r = trace_experts(model, setup, layer, progress=False)
            rescue[j] += np.array([r.rescue(float(s)) for s in r.scores]) / len(chosen)
            layer_rescue[j] += r.rescue(r.layer_score) / len(chosen)
        lines.append((case, setup.clean, setup.corrupted))
    best = int(np.argmax(layer_rescue))
    best_layer = sparse[best]
    coalitions = [trace_coalitions(model, prepare(model, c, seed=seed + i, n_samples=n_samples), best_layer, progress=False)
                  for i, c in enumerate(chosen)]

    files = {
        "restoration.html": plotting.restoration_heatmap(
            first_trace.scores, first_trace.str_tokens, subject_positions=first_trace.subject_positions,
            layers=first_trace.layers, positions=first_trace.positions, clean=first_trace.clean,
            corrupted=first_trace.corrupted, title=f"Restoring the MoE output: {chosen[0].prompt!r} -> {chosen[0].target_true!r}"),
        "expert_rescue.html": plotting.expert_rescue_heatmap(
            rescue, layers=sparse, title=f"Mean normalised expert rescue over {len(chosen)} facts (last position)"),
        "coalition.html": coalitions[0].plot(title=f"Greedy coalition at layer {best_layer}: {chosen[0].prompt!r}"),
    }
    with torch.no_grad():
        tokens = model.to_tokens(chosen[0].prompt)
        _, cache = model.run_with_cache(tokens)
    files["routing.html"] = plotting.routing_map(
        cache.expert_weight_map(best_layer)[0], model.to_str_tokens(tokens[0]), layer=best_layer)
    for name, fig in files.items():
        plotting.save_html(fig, out / name)

    print(f"\nfacts passing the protocol's filter (clean >= {protocol.min_clean}, noise drop >= {protocol.min_drop}); "
          f"{skipped} candidate(s) skipped")
    print(f"{'fact':58s} {'clean':>7s} {'noised':>7s}")
    for case, clean, corrupted in lines:
        print(f"{(case.prompt + ' -> ' + case.target_true + ' (vs ' + str(case.target_foil) + ')')[:58]:58s} {clean:7.2f} {corrupted:7.2f}")
    print("\nmean normalised rescue from restoring each layer's MoE output at the last position:")
    print("  " + "  ".join(f"L{l}: {v:+.2f}" for l, v in zip(sparse, layer_rescue)))
    top = np.argsort(-rescue[best])[:3]
    print(f"best layer {best_layer}; its top experts by mean rescue: "
          + ", ".join(f"E{e} {rescue[best, e]:+.2f}" for e in top))
    for c, case in zip(coalitions, chosen):
        print(f"  coalition for {case.subject!r}: clean-routed {c.clean_routed} rescue {c.rescue(c.clean_routed_score):+.2f}; "
              f"greedy {c.greedy} reaches {c.rescue(float(c.curve[-1])) if len(c.curve) else float('nan'):+.2f}")
    print(f"\nwrote {', '.join(files)} to {out} in {time.time() - start:.0f}s")
    return {"layer_rescue": dict(zip(sparse, layer_rescue.tolist())), "best_layer": best_layer,
            "expert_rescue": rescue.tolist(), "files": [str(out / f) for f in files]}
