"""The HTML report of a ``moelens trace`` run (``report.html`` in its output directory).

Built from the run's files (``settings.json``, ``screen*.jsonl``, ``experts*.jsonl``) and its
:class:`~moelens.tracing.protocol.ProtocolSummary`: the validation table, the layer choice and the
expert choice with 95% bootstrap CIs over cases, every traced case behind a selector, and the
settings. One file, plotly.js included once (see :mod:`moelens.plotting.report`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

MAX_CASES_IN_REPORT = 1000


def _records(out_dir: Path, name: str) -> dict:
    out = {}
    for path in [out_dir / name, *sorted(out_dir.glob(name.replace(".jsonl", ".rank*.jsonl")))]:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[rec["key"]] = rec
    return out


def _rescue(v, clean, corrupted):
    d = clean - corrupted
    return (v - corrupted) / d if d else float("nan")


def _mean_ci(rows: np.ndarray, seed: int, n_resamples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from moelens.tracing.stats import bootstrap_ci

    rows = np.asarray(rows, dtype=float)
    if rows.size == 0:
        return (np.full(rows.shape[1:], np.nan),) * 3
    with np.errstate(all="ignore"):
        mean = np.nanmean(rows, axis=0)
    lo, hi = np.full_like(mean, np.nan), np.full_like(mean, np.nan)
    for j in range(rows.shape[1]):
        col = rows[:, j][np.isfinite(rows[:, j])]
        if len(col) >= 2:
            _, lo[j], hi[j] = bootstrap_ci(col, n_resamples=n_resamples, seed=seed)
    return mean, lo, hi


def _case_table(ordered: Sequence[dict], labels: dict, summary):
    """One row per traced case: split, clean and corrupted contrast, the rescue of the whole layer,
    of the chosen expert and of the case's own best expert (``exact`` or ``estimate`` when the run
    screened by attribution and that expert was not verified)."""
    import pandas as pd

    rows = []
    for r in ordered:
        res = [_rescue(s, r["clean"], r["corrupted"]) for s in r["expert_scores"]]
        finite = [(v, e) for e, v in enumerate(res) if np.isfinite(v)]
        best_v, best_e = max(finite) if finite else (float("nan"), None)
        verified = r.get("verified")
        chosen = summary.expert
        rows.append({
            "case": labels.get(r["key"], f"case {r.get('case_id', r['key'])}"), "split": r.get("split", ""),
            "clean": r["clean"], "corrupted": r["corrupted"], "layer": r["layer"],
            "layer rescue": _rescue(r["layer_score"], r["clean"], r["corrupted"]),
            f"L{summary.layer}E{chosen} rescue": res[chosen] if chosen is not None and chosen < len(res) else float("nan"),
            "best expert": best_e, "best expert rescue": best_v,
            "best is": "estimate" if verified is not None and best_e not in verified else "exact",
        })
    return pd.DataFrame(rows)


def build_trace_report(out_dir, summary, cases: Optional[Sequence] = None):
    """A :class:`moelens.plotting.report.Report` for the trace run in ``out_dir`` (``cases``, when given,
    label each case by its prompt)."""
    import pandas as pd

    from moelens.formatting import format_p
    from moelens.plotting.experts import expert_rescue_bar, expert_rescue_bar_spec
    from moelens.plotting.report import Report
    from moelens.plotting.tracing import layer_curve, layer_curve_spec

    out_dir = Path(out_dir)
    settings = json.loads((out_dir / "settings.json").read_text()) if (out_dir / "settings.json").exists() else {}
    screened, traced = _records(out_dir, "screen.jsonl"), _records(out_dir, "experts.jsonl")
    splits = getattr(summary, "splits", None)
    if splits is not None:  # the summary's cases and halves: a line's stored split is the one it had when
        # written (a later, larger --limit can re-split), and lines of cases no longer selected stay in the files
        screened = {k: {**r, "split": splits[k]} for k, r in screened.items() if k in splits}
        traced = {k: {**r, "split": splits[k]} for k, r in traced.items()
                  if k in splits and r.get("layer") == summary.layer}
    seed = int(settings.get("seed", 0))
    n_boot = min(int(settings.get("n_bootstrap", 2000)), 2000)
    labels = {}
    if cases is not None:
        from moelens.tracing.cases import case_key

        labels = {case_key(c, i): f"{c.prompt} -> {c.target_true}" for i, c in enumerate(cases)}
    else:  # e.g. `moelens merge`: each screened record holds its case
        labels = {k: f"{r['case']['prompt']} -> {r['case']['target_true']}" for k, r in screened.items()
                  if isinstance(r.get("case"), dict) and "prompt" in r["case"]}
    layers = [int(l) for l in summary.layer_means]
    c = summary.counts
    rep = Report(f"moelens trace: {settings.get('model') or 'model'}", run_seconds=getattr(summary, "run_seconds", None),
                 subtitle=f"{c['total']} cases, {c['kept']} kept ({c['discovery']} discovery / {c['validation']} "
                          f"validation), {c['errors']} errors. Layer {summary.layer} and expert "
                          f"L{summary.layer}E{summary.expert} chosen on discovery cases, evaluated on validation "
                          f"cases. Normalised rescue = (patched - corrupted) / (clean - corrupted).")
    rep.add_heading("Validation summary")
    table = summary.table.copy()
    if "p_value" in table:
        table["p_value"] = [format_p(p) for p in table["p_value"]]
    rep.add_table(table, caption="Validation quantities: mean normalised rescue, 95% bootstrap CI, sign-flip "
                                 "test p-value, number of cases")
    rep.add_figure(summary.plot(), "Each dot is a validation estimate with its 95% bootstrap CI over cases; the "
                   "dashed line is 0 (no rescue). A CI that excludes 0 is an effect that generalises from the "
                   "discovery cases to new ones.", name="validation_summary")

    disc = [screened[k] for k in screened if screened[k].get("kept") and screened[k].get("split") == "discovery"]
    per_layer = np.array([[_rescue(r["layer_scores"][str(l)], r["clean"], r["corrupted"]) for l in layers]
                          for r in disc]).reshape(len(disc), len(layers))
    mean, lo, hi = _mean_ci(per_layer, seed, n_boot)
    rep.add_heading("Discovery: choosing the layer and the expert")
    rep.add_figure(layer_curve(mean, layers=layers, ci_low=lo, ci_high=hi,
                                        title=f"Restoring one layer's MoE output at the traced position "
                                              f"({len(disc)} discovery cases)"),
                   "Mean normalised rescue over discovery cases when a whole layer's MoE output is restored; the "
                   "band is a 95% bootstrap CI. The layer with the highest mean is traced expert by expert.",
                   name="layer_rescue")
    disc_t = [r for r in traced.values() if r.get("split") == "discovery"]
    n_exp = len(summary.expert_means)
    per_expert = np.array([[_rescue(s, r["clean"], r["corrupted"]) for s in r["expert_scores"]]
                           for r in disc_t]).reshape(len(disc_t), n_exp)
    emean, elo, ehi = _mean_ci(per_expert, seed, n_boot)
    layer_mean = float(np.nanmean([_rescue(r["layer_score"], r["clean"], r["corrupted"]) for r in disc_t])) \
        if disc_t else None
    rep.add_figure(expert_rescue_bar(
        emean, ci_low=elo, ci_high=ehi, highlight=[summary.expert], baseline=layer_mean, layer=summary.layer,
        title=f"Experts at layer {summary.layer}: mean rescue over {len(disc_t)} discovery cases "
              f"(outlined: the chosen expert E{summary.expert})"),
        "One bar per expert, sorted: its mean normalised rescue when restored alone at the traced position, with "
        "a 95% bootstrap CI over discovery cases. The chosen expert (outlined) is the best among those the "
        "router picks in enough cases (recurrence); the red line is the whole layer's rescue.",
        name="expert_rescue")

    ordered = sorted(traced.values(), key=lambda r: screened.get(r["key"], {}).get("index", 0))
    options = []
    for r in ordered[:MAX_CASES_IN_REPORT]:
        scr = screened.get(r["key"], {})
        res = [_rescue(s, r["clean"], r["corrupted"]) for s in r["expert_scores"]]
        name = labels.get(r["key"], f"case {r.get('case_id', r['key'])}")
        # plain figure specs: hundreds of cases build in a second (each is drawn when selected)
        items = [rep.figure(expert_rescue_bar_spec(
            res, clean_routed=r["clean_routed"], noise_routed=r["noise_routed"], layer=r["layer"],
            baseline=_rescue(r["layer_score"], r["clean"], r["corrupted"]), highlight=[summary.expert],
            title=f"Experts at layer {r['layer']}: {name} ({r['split']})"),
            "This case only: each expert's normalised rescue at the traced position, coloured by whether the "
            "router chose it in the clean and/or corrupted run; the chosen expert is outlined.",
            name=f"case_{r['key']}_experts")]
        if scr.get("layer_scores"):
            items.append(rep.figure(layer_curve_spec(
                [_rescue(scr["layer_scores"][str(l)], scr["clean"], scr["corrupted"]) for l in layers],
                layers=layers, metric="normalised rescue (0 = corrupted, 1 = clean)",
                title=f"{name}: restoring one layer's MoE output"),
                f"This case only: clean {scr['clean']:.3g}, corrupted {scr['corrupted']:.3g}; the rescue from "
                f"restoring each layer's MoE output at the traced position.", name=f"case_{r['key']}_layers"))
        options.append((f"{name} [{r['split']}]", items))
    if options:
        rep.add_heading("Each traced case")
        if len(ordered) > MAX_CASES_IN_REPORT:
            rep.add_text(f"Figures for the first {MAX_CASES_IN_REPORT} of {len(ordered)} traced cases; the table "
                         f"below lists every case (all are in experts.jsonl).")
        rep.add_selector("Case:", options)
        rep.add_table(_case_table(ordered, labels, summary), collapsed=True,
                      caption=f"Every traced case ({len(ordered)}): normalised rescue at the traced position")
    skipped = [(k, r.get("error")) for k, r in screened.items() if "error" in r]
    if skipped:
        rep.add_table(pd.DataFrame(skipped, columns=["case", "error"]), caption="Cases that could not be traced")
    rep.add_heading("Settings")
    rep.add_settings(settings)
    return rep


def write_trace_report(out_dir, summary, cases: Optional[Sequence] = None, image_format: Optional[str] = None) -> Path:
    """Write ``out_dir/report.html`` (and static images with ``image_format``); returns its path."""
    return build_trace_report(out_dir, summary, cases).write(Path(out_dir) / "report.html", image_format=image_format)
