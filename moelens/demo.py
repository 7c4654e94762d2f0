"""`moelens demo`: the whole mission on the bundled model in a couple of minutes on a CPU."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from moelens.rundir import holds_run_dir

BUNDLED = "moelens-tiny-facts"


def _mean_ci(rows: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column means of ``rows [n_cases, k]`` with 95% percentile-bootstrap CIs (NaN below 2 cases)."""
    from moelens.tracing.stats import bootstrap_ci

    rows = np.asarray(rows, dtype=float)
    mean = np.nanmean(rows, axis=0)
    lo, hi = np.full_like(mean, np.nan), np.full_like(mean, np.nan)
    for j in range(rows.shape[1]):
        col = rows[:, j][np.isfinite(rows[:, j])]
        if len(col) >= 2:
            _, lo[j], hi[j] = bootstrap_ci(col, n_resamples=2000, seed=seed)
    return mean, lo, hi


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


@holds_run_dir("demo")  # one run per directory (moelens.rundir)
def run_demo(out_dir, n_facts: int = 4, n_samples: int = 5, seed: int = 0, progress: bool = True,
             image_format: str | None = None, started: float | None = None) -> dict:
    """Trace a handful of the bundled model's facts; write one HTML report ``out_dir/report.html``
    (and, with ``image_format`` png/svg/pdf, every figure as a static image); return the numbers.
    ``started``: the ``time.time()`` the run began (default: now; the command line passes its own
    start, so imports and loading count): the printed and reported run time is measured from it."""
    start = time.time() if started is None else float(started)
    from tqdm.auto import tqdm

    from moelens import HookedMoETransformer, plotting
    from moelens.formatting import format_number
    from moelens.loading import bundled_models
    from moelens.plotting.report import Report, announce_images, format_duration
    from moelens.tracing import load_facts, trace_coalitions, trace_experts, trace_layers
    from moelens.tracing.protocol import ProtocolConfig

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
    per_fact_rescue = np.zeros((len(chosen), len(sparse), model.cfg.n_experts))
    per_fact_layer = np.zeros((len(chosen), len(sparse)))
    lines, layer_traces, expert_traces = [], [], []
    for i, case in enumerate(tqdm(chosen, desc="tracing facts", disable=not progress)):
        setup = setups[i]
        layer_traces.append(trace_layers(model, setup, positions="all", progress=False))
        row = []
        for j, layer in enumerate(sparse):
            r = trace_experts(model, setup, layer, progress=False)
            row.append(r)
            per_fact_rescue[i, j] = [r.rescue(float(s)) for s in r.scores]
            per_fact_layer[i, j] = r.rescue(r.layer_score)
        expert_traces.append(row)
        lines.append((case, setup.clean, setup.corrupted))
    rescue = per_fact_rescue.mean(0)
    layer_rescue, layer_lo, layer_hi = _mean_ci(per_fact_layer, seed)
    best = int(np.argmax(layer_rescue))
    best_layer = sparse[best]
    coalitions = [trace_coalitions(model, s, best_layer, progress=False) for s in setups]
    exp_mean, exp_lo, exp_hi = _mean_ci(per_fact_rescue[:, best], seed)

    # ------------------------------------------------------------------ the report
    import pandas as pd

    rep = Report(f"moelens demo: where do {BUNDLED}'s facts live?", run_seconds=None,
                 subtitle=f"{model.cfg.architecture}, {model.cfg.n_layers} layers, {model.cfg.n_experts} experts "
                          f"(top-{model.cfg.top_k}); {len(chosen)} facts, {n_samples} noise samples each. "
                          f"Normalised rescue = (patched - corrupted) / (clean - corrupted): 0 = the corrupted "
                          f"run (subject embeddings noised), 1 = the clean run.")
    table = pd.DataFrame([{
        "fact": f"{c.prompt} -> {c.target_true} (vs {c.target_foil})", "clean": cl, "corrupted": co,
        **{f"layer {l} rescue": per_fact_layer[i, j] for j, l in enumerate(sparse)},
        f"coalition at L{best_layer} (greedy)": (coalitions[i].rescue(float(coalitions[i].curve[-1]))
                                                 if len(coalitions[i].curve) else float("nan")),
        "greedy rule": "raise the metric most" if coalitions[i].sign >= 0 else "lower the metric most",
        "greedy experts": " ".join(f"E{e}" for e in coalitions[i].greedy),
    } for i, (c, cl, co) in enumerate(lines)])
    rep.add_heading("Summary")
    rep.add_table(table, caption="Each fact: the metric logit(true) - logit(foil) in the clean and corrupted runs, "
                                 "the normalised rescue from restoring each sparse layer's MoE output at the "
                                 f"last position, and the greedy coalition at layer {best_layer}: its rule follows the "
                                 "sign of the whole layer's effect (raise the metric most when restoring the layer "
                                 "raises it, lower it most when restoring the layer lowers it)")
    rep.add_heading(f"Across the {len(chosen)} facts")
    figures = {}
    figures["layer_rescue"] = plotting.layer_curve(
        layer_rescue, layers=sparse, ci_low=None if len(chosen) < 2 else layer_lo,
        ci_high=None if len(chosen) < 2 else layer_hi,
        title=f"Restoring one layer's MoE output at the last position: mean over {len(chosen)} facts")
    rep.add_figure(figures["layer_rescue"], "Each point is the mean normalised rescue over the facts when the whole "
                   "MoE output of that layer is restored (clean value patched into the corrupted run) at the last "
                   "position; the band is a 95% bootstrap CI over facts. 0 = no effect, 1 = the clean run's "
                   "metric fully recovered.", name="layer_rescue")
    figures["expert_rescue"] = plotting.expert_rescue_heatmap(
        rescue, layers=sparse, title=f"Mean normalised rescue of each expert over {len(chosen)} facts (last position)")
    rep.add_figure(figures["expert_rescue"], "One cell per (layer, expert): the mean rescue when only that expert's "
                   "clean contribution is restored. White = no effect (corrupted), blue = towards the clean run, "
                   "red = restoring the expert moves the prediction further away. The colour range is symmetric "
                   "and covers every cell.", name="expert_rescue")
    figures["best_layer_experts"] = plotting.expert_rescue_bar(
        exp_mean, ci_low=exp_lo if len(chosen) > 1 else None, ci_high=exp_hi if len(chosen) > 1 else None,
        baseline=float(layer_rescue[best]), layer=best_layer,
        title=f"Experts at layer {best_layer} (the best layer): mean rescue over {len(chosen)} facts")
    rep.add_figure(figures["best_layer_experts"], "Bars: mean normalised rescue of each expert at the best layer, "
                   "sorted; error bars: 95% bootstrap CI over facts. The red dashed line is the rescue from "
                   "restoring the whole layer: an expert near it carries most of the layer's effect.",
                   name="best_layer_experts")
    options = []
    for i, (case, lt) in enumerate(zip(chosen, layer_traces)):
        e, c = expert_traces[i][best], coalitions[i]
        with torch.no_grad():
            _, cache = model.run_with_cache(setups[i].tokens)
        items = [
            rep.figure(lt.plot(title=f"Restoring the MoE output at one layer and position: {case.prompt!r} -> "
                                     f"{case.target_true!r} (vs {case.target_foil!r})"),
                       "Each cell: the metric after restoring the clean MoE output of one layer at one position in "
                       "the corrupted run. White = the corrupted value (no effect), blue = towards clean, red = "
                       "away; the colour bar marks both. Starred rows are the noised subject tokens.",
                       name=f"fact{i + 1}_restoration"),
            rep.figure(e.plot(), "One bar per expert of the best layer: normalised rescue from restoring that "
                       "expert alone at the last position, coloured by whether the router chose it in the clean "
                       "and/or corrupted run.", name=f"fact{i + 1}_experts"),
            rep.figure(c.plot(), "Greedy search: each step restores one more expert (named at the point) together "
                       "with those before, " + ("choosing the one that raises the metric most, since restoring the "
                       "whole layer raises it" if c.sign >= 0 else "choosing the one that LOWERS the metric most: "
                       "restoring the whole layer lowers it here, and the search follows the layer's sign (it does "
                       "not pick the expert that helps most)") + ", until the target fraction of the whole layer's "
                       "effect is reached. Values above 1 overshoot the clean run.",
                       name=f"fact{i + 1}_coalition"),
            rep.figure(plotting.routing_map(cache.expert_weight_map(best_layer)[0], lt.str_tokens, layer=best_layer,
                                            prompt=case.prompt),
                       "The router's combine weight for each token (rows) and expert (columns) in the clean run; "
                       "white = not routed.", name=f"fact{i + 1}_routing"),
        ]
        options.append((f"{i + 1}. {case.prompt} -> {case.target_true}", items))
    rep.add_heading("Each fact")
    rep.add_selector("Fact:", options)
    rep.add_heading("Settings")
    rep.add_settings({"model": BUNDLED, "n_facts": len(chosen), "n_samples": n_samples, "seed": seed,
                      "noise_scale": setups[0].settings["noise_scale"], "sigma": setups[0].sigma,
                      "position traced": "last", "sparse layers": sparse, "best layer": best_layer})
    rep.run_seconds = time.time() - start  # everything but writing the file (and images)
    announce_images(image_format, len(rep.figures()))
    report = rep.write(out / "report.html", image_format=image_format)

    print(f"\nfacts passing the protocol's filter (clean >= {protocol.min_clean}, noise drop >= {protocol.min_drop}); "
          f"{skipped} candidate(s) skipped")
    names = [f"{c.prompt} -> {c.target_true} (vs {c.target_foil})" for c, _, _ in lines]
    width = max(len("fact"), *(len(n) for n in names))  # never cut a fact
    print(f"{'fact':{width}s} {'clean':>7s} {'corrupted':>9s}")
    for name, (case, clean, corrupted) in zip(names, lines):
        print(f"{name:{width}s} {format_number(clean):>7s} {format_number(corrupted):>9s}")
    print("\nmean normalised rescue from restoring each layer's MoE output at the last position:")
    print("  " + "  ".join(f"L{l}: {format_number(v)}" for l, v in zip(sparse, layer_rescue)))
    top = np.argsort(-rescue[best])[:3]
    print(f"best layer {best_layer}; its top experts by mean rescue: "
          + ", ".join(f"E{e} {format_number(rescue[best, e])}" for e in top))
    for c, case in zip(coalitions, chosen):
        reached = format_number(c.rescue(float(c.curve[-1]))) if len(c.curve) else "n/a"
        how = "raising the metric most" if c.sign >= 0 else "lowering the metric most, as restoring the layer does"
        print(f"  coalition for {case.subject!r}: clean-routed {c.clean_routed} rescue "
              f"{format_number(c.rescue(c.clean_routed_score))}; greedy ({how}) {c.greedy} reaches {reached}")
    files = [report] + ([out / f"{f.name}.{image_format}" for f in rep.figures()] if image_format else [])
    print(f"\nwrote {report} ({len(rep.figures())} figures{', and ' + image_format.upper() + ' images' if image_format else ''}); "
          f"the run took {format_duration(time.time() - start)}")
    return {"layer_rescue": dict(zip(sparse, layer_rescue.tolist())), "best_layer": best_layer,
            "expert_rescue": rescue.tolist(), "files": [str(f) for f in files]}
