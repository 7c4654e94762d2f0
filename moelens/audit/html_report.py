"""The HTML report of an audit run (``report.html``): the test table, the Cohen's d heatmap, and
per layer each expert's mean ablation effect (95% CI) next to its routing statistics."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np


def build_audit_report(result):
    """A :class:`moelens.report.Report` for an :class:`~moelens.audit.report.AuditResult`."""
    from moelens import plotting
    from moelens.formatting import format_p
    from moelens.report import Report

    s = result.summary
    rep = Report("moelens audit: do routing statistics predict an expert's causal importance?",
                 subtitle=f"Effect = increase of cross-entropy ({result.scope}) when one routed expert is removed "
                          f"at one position. {len(result.effects)} ablations.")
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
        items = [rep.figure(plotting.expert_rescue_bar(
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
    rep.add_heading("Settings")
    rep.add_settings({"scope": result.scope, **{k: v for k, v in (result.settings or {}).items()}})
    return rep


def write_audit_report(result, path, image_format: Optional[str] = None) -> Path:
    """Write the audit's report to ``path`` (and static images with ``image_format``)."""
    return build_audit_report(result).write(Path(path), image_format=image_format)
