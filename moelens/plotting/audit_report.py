"""The HTML report of an audit run (``report.html``): the test table, the Cohen's d heatmap, and
per layer each expert's mean ablation effect (95% CI) next to its routing statistics; also the
report of the paper's protocol and of the further experiments."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd


def build_audit_report(result, experiments: Optional[dict] = None):
    """A :class:`moelens.plotting.report.Report` for an :class:`~moelens.audit.report.AuditResult` (and the
    results of :func:`moelens.audit.experiments.run_planned`, if any)."""
    from moelens.formatting import format_p
    from moelens.plotting.experts import expert_rescue_bar
    from moelens.plotting.report import Report

    s = result.summary
    rep = Report("moelens audit: do routing statistics predict an expert's causal importance?",
                 subtitle=f"Effect = increase of cross-entropy ({result.scope}) when one routed expert is removed "
                          f"at one position. {len(result.effects)} ablations.",
                 run_seconds=getattr(result, "run_seconds", None))
    rep.add_heading("Tests")
    cols = [c for c in ["metric", "layer", "n", "mean_diff", "cohens_d", "p_t", "p_wilcoxon", "p_holm"] if c in s]
    table = s[cols].copy()
    for c in ("p_t", "p_wilcoxon", "p_holm"):
        if c in table:
            table[c] = [format_p(p) for p in table[c]]
    rep.add_table(table, caption="Per (ranking metric, layer): paired difference of the removal effect between "
                                 "the top- and bottom-ranked active expert at each sampled position")
    rep.add_figure(result.plot(), "Each cell: Cohen's d of (effect of removing the top-ranked expert) minus (effect "
                   "of removing the bottom-ranked one) for one ranking metric and layer. Red (d > 0): the metric "
                   "ranks important experts first; blue: the opposite; white: no relation. Stars: Holm-adjusted "
                   "p-values; n: number of positions.", name="audit_cohens_d")

    table = result.expert_table()
    col = f"delta_{result.scope}"
    eff = result.effects
    options = []
    for layer in sorted(set(table["layer"])):
        sub = table[table["layer"] == layer].sort_values("expert")
        experts = [int(e) for e in sub["expert"]]
        n_exp = max(experts) + 1 if experts else 0
        mean = np.full(n_exp, np.nan)
        lo, hi = np.full(n_exp, np.nan), np.full(n_exp, np.nan)
        if len(eff):
            for e, g in eff[eff["layer"] == layer].groupby("expert")[col]:
                v = g.to_numpy(dtype=float)
                v = v[np.isfinite(v)]
                if len(v):
                    mean[int(e)] = v.mean()
                    if len(v) >= 2:  # normal-approximation 95% CI of the mean
                        half = 1.96 * v.std(ddof=1) / math.sqrt(len(v))
                        lo[int(e)], hi[int(e)] = mean[int(e)] - half, mean[int(e)] + half
        items = [rep.figure(expert_rescue_bar(
            mean, ci_low=lo, ci_high=hi, references=[(0.0, "0 = no effect")], layer=layer,
            metric="mean CE increase when removed (nats)",
            title=f"Layer {layer}: effect of removing each expert (mean over its ablations)"),
            "One bar per expert, sorted: the mean increase of cross-entropy when that expert is removed at a "
            "position where the router chose it; error bars: 95% CI (normal approximation). Experts never "
            "ablated have no bar.", name=f"layer{layer}_effects")]
        stat_cols = [c for c in ("utilization", "mean_weight", "output_norm", "output_std") if c in sub]
        if stat_cols:
            items.append(sub[["expert", *stat_cols, "mean_effect", "n_ablations"]].reset_index(drop=True))
        options.append((f"layer {layer}", items))
    if options:
        rep.add_heading("Each layer")
        rep.add_selector("Layer:", options)
    add_experiments_section(rep, experiments)
    rep.add_heading("Settings")
    rep.add_settings({"scope": result.scope, **{k: v for k, v in (result.settings or {}).items()}})
    return rep


def write_audit_report(result, path, image_format: Optional[str] = None, experiments: Optional[dict] = None) -> Path:
    """Write the audit's report to ``path`` (and static images with ``image_format``)."""
    return build_audit_report(result, experiments).write(Path(path), image_format=image_format)


def _fmt_p_columns(df, cols):
    from moelens.formatting import format_p

    df = df.copy()
    for c in cols:
        if c in df:
            df[c] = [format_p(p) for p in df[c]]
    return df


def build_paper_report(res: dict, experiments: Optional[dict] = None):
    """A :class:`moelens.plotting.report.Report` for :func:`moelens.audit.paper.run_paper_protocol`'s result:
    the per-token table, the routing-weight control, the further experiments and the settings."""
    from moelens.plotting.report import Report

    s = res["summary"]
    model = s["model"].iloc[0] if len(s) else ""
    rep = Report(f"moelens audit, the paper's protocol (arXiv 2606.10703): {model}",
                 subtitle="Per-token ablation as the paper's scripts compute it: at each sampled position, the CE "
                          "increase when the active expert ranked highest by a metric is removed (sequence-wide) "
                          "minus the increase for the lowest-ranked one. No multiple-comparison correction here; "
                          "pool models with moelens audit --pool.")
    rep.add_heading("Per-token ablation")
    cols = [c for c in ["layer", "metric", "n", "mean_high", "mean_low", "mean_diff", "d", "p_t", "p_w",
                        "pct_high", "uniq_top", "uniq_bot"] if c in s]
    rep.add_table(_fmt_p_columns(s[cols], ("p_t", "p_w")),
                  caption="Per (layer, metric): n pairs, mean CE increase of the high- and low-ranked expert, their "
                          "mean difference, Cohen's d (the flavour's definition), paired t and Wilcoxon p, % of pairs "
                          "where the high-ranked expert mattered more, distinct experts on each side")
    c = res.get("control")
    if c is not None and len(c):
        cols = [x for x in ["layer", "n", "mean_diff", "d", "p_t", "p_w", "spearman_rho", "spearman_p"] if x in c]
        rep.add_heading("Routing-weight control")
        rep.add_table(_fmt_p_columns(c[cols], ("p_t", "p_w", "spearman_p")),
                      caption="Highest vs lowest per-token routing weight among the active experts (sequence-wide "
                              "removal); spearman_rho: weight ratio vs effect difference")
    add_experiments_section(rep, experiments)
    rep.add_heading("Settings")
    rep.add_settings(res.get("settings") or {})
    return rep


def write_paper_report(res: dict, path, image_format: Optional[str] = None, experiments: Optional[dict] = None) -> Path:
    """Write the paper protocol's report to ``path`` (and static images with ``image_format``)."""
    return build_paper_report(res, experiments).write(Path(path), image_format=image_format)


def add_experiments_section(rep, experiments: Optional[dict]) -> None:
    """The further experiments' tables (``moelens audit --experiments``), if any were run."""
    if not experiments:
        return
    from moelens.plotting.audit import progressive_ablation_curve

    if "progressive" in experiments:
        r = experiments["progressive"]
        s, st = r["summary"], r["settings"]
        cliff = float(s["cliff_threshold"].iloc[0])
        n = int(r["steps"]["position_index"].nunique()) if len(r["steps"]) else 0
        rep.add_heading("Progressive ablation")
        rep.add_text(f"At {n} target positions (one per document), the experts routed at the position predicting the "
                     f"target are removed cumulatively, highest routing weight first (k = 1..{st['k_max']}; removal "
                     f"{st['scope']}/{st['semantics']}), and the increase of that prediction's cross-entropy is "
                     f"measured. The cliff is the first k whose mean increase exceeds {cliff:g} nats.")
        rep.add_figure(progressive_ablation_curve(s, cliff), "One line per layer: the mean CE increase after removing the "
                       "top-k experts (hover: median and quartiles; the table below has the spread); dashed: the "
                       "cliff threshold.", name="progressive_ablation")
        cliffs = s.groupby("layer")["cliff"].first()
        rep.add_table([{"layer": int(l), "cliff": "none" if pd.isna(v) else f"k = {int(v)}"} for l, v in cliffs.items()],
                      caption=f"The cliff per layer (first k with mean CE increase > {cliff:g} nats)")
        cols = ["layer", "k", "mean", "std", "median", "p25", "p75", "p95", "pct_positive", "weight_removed"]
        rep.add_table(s[cols], caption="Per (layer, k): CE increase (nats) over positions; pct_positive: % of "
                                       "positions where it increased; weight_removed: mean share of the routing "
                                       "weight removed")
    if "redistribution" in experiments:
        r = experiments["redistribution"]
        c = r["correlations"]
        rep.add_heading("Redistribution")
        rep.add_text("Per expert, over the tokens where it is routed: the gap (its weighted contribution to the MoE "
                     "block output, i.e. what removing it takes away), the compensation cosine cos(gap, output "
                     "without it), the relative compensation |ablated| max(cos, 0) / |gap|, its mean routing "
                     "probability and token coverage; then Spearman correlations across the experts of a layer.")
        table = c[["layer", "pair", "x", "y", "rho", "p", "n_experts"]]
        rep.add_table(_fmt_p_columns(table, ("p",)), caption="Spearman rho across experts, per layer")
        e = r["experts"]
        options = [(f"layer {layer}", [sub.drop(columns="layer").reset_index(drop=True)])
                   for layer, sub in e.groupby("layer")]
        if options:
            rep.add_selector("Per-expert redistribution, layer:", options)
    settings = {f"{name}: {k}": v for name, r in experiments.items() for k, v in r["settings"].items()
                if k != "experiment"}
    rep.add_settings(settings, caption="Further experiments: settings (also in progressive_settings.json, "
                                       "redistribution_settings.json)")
