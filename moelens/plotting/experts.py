"""Figures of per-expert results: rescue heatmap (layers x experts) and the sorted bar chart of one layer."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from moelens.plotting.style import (
    RESCUE, RESCUE_AXIS, ROUTE_STYLE, as_figure, base_layout, cell_text, diverging, expert_ticks, fmt, heatmap_size,
    hline, html_text, index_list, label_list, layout_spec, to_numpy,
)

__all__ = ["expert_rescue_heatmap", "expert_rescue_bar", "expert_rescue_bar_spec"]


def expert_rescue_heatmap(
    scores: Any,
    *,
    layers: Sequence[Any],
    experts: Sequence[Any] | None = None,
    title: str | None = None,
    metric: str = RESCUE,
) -> go.Figure:
    """Per-(layer, expert) normalised rescue, diverging colours centred on 0 (the corrupted run).

    ``scores`` is ``[n_layers, n_experts]``; ``fig.data[0].z`` equals it, layers on the y axis
    (top to bottom), experts on the x axis.  The colour range is symmetric about 0 and covers
    every value: nothing is clipped (1 = the clean run is marked on the colour bar when inside the
    range; small effects are not washed out by it).  The height follows the number of layers and
    the values are printed in the cells where they fit (:func:`moelens.plotting.style.heatmap_size`:
    4 x 8 and 48 x 128 both read; hover gives every value).
    """
    z = to_numpy(scores, "scores", ndim=2)
    n_layers, n_exp = z.shape
    layer_labels = label_list(
        layers, "layers", n_layers, what="layers (scores.shape[0])"
    )
    expert_labels = (
        list(range(n_exp))
        if experts is None
        else label_list(experts, "experts", n_exp, what="experts (scores.shape[1])")
    )
    finite = z[np.isfinite(z)]
    # the range is set by the data (small effects stay visible); 1 = clean is marked once it is inside
    reach = float(np.abs(finite).max()) if finite.size else 0.0
    plot_h, _, show = heatmap_size(n_layers, n_exp, value_chars=5)
    heat, colorbar = diverging(z, reference=0.0, other=1.0 if reach >= 1.0 else None, metric=metric,
                               ref_name="corrupted", other_name="clean", bar_px=plot_h)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=expert_labels,
            y=layer_labels,
            hovertemplate="layer %{y}<br>expert %{x}<br>" + html_text(metric)
            + " %{z:.3g}<extra></extra>",
            colorbar=colorbar,
            xgap=1 if n_exp <= 64 else 0,
            ygap=1 if n_layers <= 32 else 0,
            **cell_text(show),
            **heat,
        )
    )
    base_layout(
        fig,
        title if title is not None else "Expert rescue by layer",
        xaxis=dict(title=dict(text="expert"), type="category", **expert_ticks(n_exp)),
        yaxis=dict(title=dict(text="layer"), type="category", autorange="reversed"),
        plot_height=plot_h,
    )
    return fig


def expert_rescue_bar(
    scores: Any,
    *,
    clean_routed: Any = (),
    noise_routed: Any = (),
    layer: Any = None,
    baseline: float | None = None,
    title: str | None = None,
    ci_low: Any = None,
    ci_high: Any = None,
    references: Sequence[tuple[float, str]] | None = None,
    highlight: Any = (),
    top_n: int | None = None,
    metric: str = RESCUE_AXIS,
) -> go.Figure:
    """Bar chart of per-expert rescue at one layer, sorted from most to least helpful.

    ``scores`` is ``[n_experts]``, the plotted quantity itself (normalised rescue for the
    result objects: 0 = corrupted, 1 = clean).  One bar per expert on a categorical axis
    (``"E7"``), sorted by score (NaN last), so bars never overlap; with more than 64 experts
    only the ``top_n`` (default 40) best are drawn and the title says so.  Bars are coloured by
    routing: routed in both runs, clean only, corrupted only, neither (one trace per non-empty
    group).  ``ci_low``/``ci_high`` add error bars (aggregated cases); ``highlight`` outlines
    chosen experts.  ``references`` are ``(value, label)`` dashed lines named in the legend
    (default: 0 = corrupted, 1 = clean); ``baseline`` adds one labelled "whole layer restored".
    Every bar's hover shows expert, value, CI and routing.  The figure is
    :func:`expert_rescue_bar_spec`'s data, validated.
    """
    return as_figure(expert_rescue_bar_spec(
        scores, clean_routed=clean_routed, noise_routed=noise_routed, layer=layer, baseline=baseline, title=title,
        ci_low=ci_low, ci_high=ci_high, references=references, highlight=highlight, top_n=top_n, metric=metric))


def expert_rescue_bar_spec(
    scores: Any,
    *,
    clean_routed: Any = (),
    noise_routed: Any = (),
    layer: Any = None,
    baseline: float | None = None,
    title: str | None = None,
    ci_low: Any = None,
    ci_high: Any = None,
    references: Sequence[tuple[float, str]] | None = None,
    highlight: Any = (),
    top_n: int | None = None,
    metric: str = RESCUE_AXIS,
) -> dict[str, Any]:
    """:func:`expert_rescue_bar` as plain data (``{"data", "layout"}``, no plotly objects): what a
    report embeds for each of hundreds of cases without plotly's per-figure validation cost."""
    s = to_numpy(scores, "scores", ndim=1)
    n = s.shape[0]
    clean_set = set(index_list(clean_routed, "clean_routed", n))
    noise_set = set(index_list(noise_routed, "noise_routed", n))
    hi_set = set(index_list(highlight, "highlight", n))
    if (ci_low is None) != (ci_high is None):
        raise ValueError("ci_low and ci_high must be given together")
    lo = hi = None
    if ci_low is not None:
        lo = to_numpy(ci_low, "ci_low", ndim=1)
        hi = to_numpy(ci_high, "ci_high", ndim=1)
        if lo.shape != s.shape or hi.shape != s.shape:
            raise ValueError(f"ci_low/ci_high must have shape {s.shape}, got {lo.shape} and {hi.shape}")

    def group(e: int) -> str:
        if e in clean_set and e in noise_set:
            return "both"
        if e in clean_set:
            return "clean"
        if e in noise_set:
            return "noise"
        return "neither"

    key = np.where(np.isfinite(s), -s, np.inf)
    order = [int(e) for e in np.argsort(key, kind="stable")]
    if top_n is None:
        top_n = n if n <= 64 else 40
    shown = order[: max(1, int(top_n))]
    cats = [f"E{e}" for e in shown]
    routed_info = bool(clean_set or noise_set)
    data: list[dict[str, Any]] = []
    for gkey, (name, colour) in ROUTE_STYLE.items():
        idx = [e for e in shown if group(e) == gkey]
        if not idx:
            continue
        bar: dict[str, Any] = {}
        if lo is not None:
            bar["error_y"] = dict(type="data", symmetric=False, array=np.clip(hi[idx] - s[idx], 0, None),
                                  arrayminus=np.clip(s[idx] - lo[idx], 0, None), thickness=1.2, width=3)
            custom = np.stack([lo[idx], hi[idx]], axis=1)
            ci_hover = "<br>95% CI [%{customdata[0]:.3g}, %{customdata[1]:.3g}]"
        else:
            custom, ci_hover = None, ""
        data.append(
            dict(
                type="bar",
                x=[f"E{e}" for e in idx],
                y=s[idx],
                name=name if routed_info else "expert",
                marker=dict(color=colour if routed_info else "#4c78a8",
                            line=dict(color=["black" if e in hi_set else "rgba(0,0,0,0)" for e in idx],
                                      width=[2.5 if e in hi_set else 0 for e in idx])),
                customdata=custom,
                hovertemplate=(
                    "expert %{x}<br>" + html_text(metric) + " %{y:.3g}" + ci_hover
                    + (f"<br>{name}" if routed_info else "") + "<extra></extra>"
                ),
                showlegend=routed_info,
                **bar,
            )
        )
    refs = list(references) if references is not None else [(0.0, "0 = corrupted run"), (1.0, "1 = clean run")]
    if baseline is not None:
        refs.append((float(baseline), f"whole layer restored ({fmt(float(baseline))})"))
    dashes = ["solid", "dash", "dot", "dashdot"]
    shapes = []
    for i, (v, label) in enumerate(refs):
        v = float(v)
        if not math.isfinite(v):
            continue
        style = dict(color="#444" if i < 2 else "#e45756", width=1, dash=dashes[i % len(dashes)])
        shapes.append(hline(v, **style))
        data.append(dict(type="scatter", x=[None], y=[None], mode="lines", line=style, name=html.escape(label),
                         hoverinfo="skip", showlegend=True))
    if title is None:
        title = "Expert rescue" + (f" at layer {layer}" if layer is not None else "")
    if len(shown) < n:
        title += f"<br><sup>top {len(shown)} of {n} experts by score (sorted)</sup>"
    else:
        title += "<br><sup>experts sorted by score</sup>"
    return dict(data=data, layout=layout_spec(
        title,
        barmode="overlay",
        bargap=0.15 if len(shown) > 12 else 0.4,
        xaxis=dict(title=dict(text="expert (sorted)"), type="category", categoryorder="array",
                   categoryarray=cats, tickangle=-90 if len(shown) > 24 else 0),
        yaxis=dict(title=dict(text=html_text(metric)), zeroline=True),
        legend=dict(title=dict(text="routing" if routed_info else "")),
        shapes=shapes,
        plot_height=340,
    ))
