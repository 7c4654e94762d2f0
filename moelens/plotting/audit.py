"""Figures of the expert-importance audit (:mod:`moelens.audit`): Cohen's d of top- vs bottom-ranked
experts per (ranking metric, layer), and the progressive-ablation curves."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from moelens.plotting.style import base_layout, fmt, heatmap_size, hline

__all__ = ["cohens_d_heatmap", "progressive_ablation_curve"]


def _stars(p: float) -> str:
    if not np.isfinite(p):
        return ""
    return "***" if p < 1e-3 else "**" if p < 1e-2 else "*" if p < 0.05 else ""


def cohens_d_heatmap(summary, scope: str = "next", title: str | None = None) -> go.Figure:
    """Heatmap of Cohen's d (top - bottom ranked expert's effect) over metric x layer, from
    :func:`moelens.audit.report.summarize`'s table; each cell prints d (three significant digits),
    stars for its Holm-adjusted p (* <.05, ** <.01, *** <.001) and n."""
    s = summary
    metrics = list(dict.fromkeys(s["metric"]))
    layers = sorted(set(s["layer"]))
    z = np.full((len(metrics), len(layers)), np.nan)
    text = [["" for _ in layers] for _ in metrics]
    for _, r in s.iterrows():
        i, j = metrics.index(r["metric"]), layers.index(r["layer"])
        z[i, j] = r["cohens_d"]
        text[i][j] = ("n/a" if not np.isfinite(r["cohens_d"])
                      else f"{fmt(r['cohens_d'])}{_stars(r['p_holm'])}<br>n={int(r['n'])}")
    lim = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    plot_h = max(heatmap_size(len(metrics), len(layers))[0], 44 * len(metrics))  # two lines per cell
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"layer {l}" for l in layers], y=metrics, text=text, texttemplate="%{text}",
        colorscale="RdBu", reversescale=True, zmid=0, zmin=-lim, zmax=lim,
        colorbar=dict(title="Cohen's d"), xgap=1, ygap=1,
        hovertemplate="%{y}, %{x}<br>d = %{z:.3g}<extra></extra>",
    ))
    base_layout(
        fig,
        title or f"Does the higher-ranked expert matter more? Cohen's d of the CE increase ({scope})"
                 f"<br><sup>top- minus bottom-ranked active expert when removed; d > 0: the ranking "
                 f"predicts importance; stars: Holm-adjusted p (* < .05, ** < .01, *** < .001)</sup>",
        plot_height=plot_h,
        xaxis=dict(title=dict(text="layer")),
        yaxis=dict(title=dict(text="ranking"), autorange="reversed", automargin=True),
    )
    return fig


def progressive_ablation_curve(summary, cliff: float) -> go.Figure:
    """One line per layer: mean CE increase after removing the top-k experts (hover: median and
    quartiles), the cliff threshold dashed."""
    fig = go.Figure()
    for layer, sub in summary.groupby("layer"):
        sub = sub.sort_values("k")
        fig.add_trace(go.Scatter(x=sub["k"], y=sub["mean"], mode="lines+markers", name=f"layer {layer}",
                                 customdata=sub[["median", "p25", "p75"]].to_numpy(),
                                 hovertemplate=f"layer {layer}, k=%{{x}}<br>mean Delta CE %{{y:.3g}}<br>median "
                                               "%{customdata[0]:.3g} (p25 %{customdata[1]:.3g}, p75 "
                                               "%{customdata[2]:.3g})<extra></extra>"))
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=dict(color="gray", dash="dash"),
                             name=f"cliff threshold {fmt(cliff)} nats", hoverinfo="skip"))
    base_layout(fig, "Progressive ablation: CE increase when the top-1..k experts are removed", plot_height=320,
                xaxis=dict(title=dict(text="k (experts removed, highest routing weight first)"), dtick=1),
                yaxis=dict(title=dict(text="mean CE increase (nats)")),
                shapes=[hline(cliff, color="gray", dash="dash", width=1)])
    return fig
