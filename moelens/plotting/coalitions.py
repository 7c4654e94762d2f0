"""Figures of coalition search: rescue as the greedy search adds experts."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from moelens.plotting.style import (
    RESCUE, RESCUE_AXIS, base_layout, fmt, hline, py_scalar, to_numpy,
)

__all__ = ["coalition_curve"]


def coalition_curve(
    sizes: Any,
    rescue: Any,
    *,
    labels: Sequence[Any] | None = None,
    target: float | None = None,
    title: str | None = None,
    target_label: str | None = None,
    layer_rescue: float | None = None,
    rule: str | None = None,
) -> go.Figure:
    """Greedy coalition search: normalised rescue vs coalition size.

    ``labels[i]`` names the expert added at step ``i``; it is written next to each point (and
    on hover).  ``target`` draws a dashed line labelled ``target_label`` (in the legend), and
    ``layer_rescue`` a line for the whole layer restored; 1 (the clean run) is always drawn.
    Values above 1 mean the coalition overshoots the clean run.  ``rule`` states how each step chose
    its expert (e.g. "each step adds the expert that lowers the metric most"): printed under the title.
    """
    x = to_numpy(sizes, "sizes", ndim=1)
    y = to_numpy(rescue, "rescue", ndim=1)
    if x.shape != y.shape:
        raise ValueError(
            f"sizes has shape {tuple(x.shape)} but rescue has shape {tuple(y.shape)}"
        )
    if labels is not None:
        if isinstance(labels, (str, bytes)):
            raise TypeError("labels must be a sequence, got a string")
        labs = [str(py_scalar(v)) for v in labels]
        if len(labs) != len(y):
            raise ValueError(
                f"labels has length {len(labs)} but rescue has shape {tuple(y.shape)}"
            )
    else:
        labs = ["?"] * len(y)
    xs = x.astype(np.int64) if np.all(np.isfinite(x)) and np.all(x == np.round(x)) else x
    fig = go.Figure(
        go.Scatter(
            x=xs,
            y=y,
            mode="lines+markers+text",
            name="coalition",
            text=[html.escape(t) for t in labs],
            textposition=["top right"] + ["top center"] * (len(labs) - 1),
            customdata=labs,
            hovertemplate=(
                "coalition size %{x}<br>added %{customdata}<br>" + RESCUE + " %{y:.3g}"
                "<extra></extra>"
            ),
            showlegend=False,
        )
    )
    refs = [(1.0, "1 = clean run", dict(color="#444", width=1, dash="dot"))]
    if layer_rescue is not None and math.isfinite(float(layer_rescue)):
        refs.append((float(layer_rescue), f"whole layer restored ({fmt(float(layer_rescue))})",
                     dict(color="#4c78a8", width=1, dash="dashdot")))
    if target is not None:
        refs.append((float(target), target_label or f"target {fmt(float(target))}",
                     dict(color="firebrick", width=1.5, dash="dash")))
    shapes = []
    for v, label, style in refs:
        shapes.append(hline(v, **style))
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=style, name=html.escape(label),
                                 hoverinfo="skip"))
    finite = [v for v in y.tolist() if math.isfinite(v)] + [v for v, _, _ in refs] + [0.0]
    pad = 0.12 * (max(finite) - min(finite) or 1.0)
    if title is None:
        title = "Greedy expert coalition search"
    if rule:
        title += f"<br><sup>{html.escape(rule)}</sup>"
    if max(finite) > 1.0 and "above 1" not in title:
        title += "<br><sup>values above 1: restoring these experts overshoots the clean run</sup>"
    x_hi = float(np.nanmax(xs)) if len(xs) else 1.0
    base_layout(
        fig,
        title,
        xaxis=dict(title=dict(text="coalition size (experts restored together)"), dtick=1,
                   range=[-0.4, x_hi + 0.6]),  # room for the first and last point's label
        yaxis=dict(title=dict(text=RESCUE_AXIS), range=[min(finite) - pad, max(finite) + 2 * pad]),
        legend=dict(orientation="h", yanchor="top", y=-0.18, x=0),
        shapes=shapes,
        plot_height=320,
        margin=dict(b=70 + 22 * len(refs)),
    )
    return fig
