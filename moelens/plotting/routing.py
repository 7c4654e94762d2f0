"""Figures of routing: the router's combine weights per token and expert."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from moelens.plotting.style import (
    base_layout, expert_ticks, fmt, format_token_labels, heatmap_size, to_numpy, token_strings,
)

__all__ = ["routing_map"]


def routing_map(
    weights: Any,
    str_tokens: Sequence[str],
    *,
    layer: Any = None,
    title: str | None = None,
    prompt: str | None = None,
) -> go.Figure:
    """Router combine weights ``[n_positions, n_experts]`` (0 = not routed).

    Tokens on the y axis (``"i: token"``, top to bottom), experts on x;
    ``fig.data[0].z`` equals ``weights``.  The colour range is ``[0, max]`` (it covers every
    value); the height follows the number of positions, and routed cells print their weight where
    it fits (empty cells: not routed).  ``prompt`` is named in the default title.
    """
    w = to_numpy(weights, "weights", ndim=2)
    n_pos, n_exp = w.shape
    toks = token_strings(str_tokens)
    if len(toks) != n_pos:
        raise ValueError(
            f"weights has shape {tuple(w.shape)} ([n_positions, n_experts]) but "
            f"str_tokens has length {len(toks)}"
        )
    labels = format_token_labels(toks)
    heat: dict[str, Any] = {}
    finite = w[np.isfinite(w)]
    if finite.size:
        heat.update(zmin=min(0.0, float(finite.min())), zmax=max(float(finite.max()), 1e-12))
    plot_h, _, show = heatmap_size(n_pos, n_exp, value_chars=4)
    text = {}
    if show:  # routed cells only: a grid of zeros would hide the few routed weights
        text = dict(text=[[fmt(v) if v != 0 and np.isfinite(v) else "" for v in row] for row in w.tolist()],
                    texttemplate="%{text}", textfont=dict(size=11))
    fig = go.Figure(
        go.Heatmap(
            z=w,
            x=list(range(n_exp)),
            y=labels,
            colorscale="Blues",
            hovertemplate=(
                "position %{y}<br>expert %{x}<br>combine weight %{z:.3g}<extra></extra>"
            ),
            colorbar=dict(title=dict(text="combine weight<br>(0 = not routed)", side="right")),
            xgap=1 if n_exp <= 64 else 0,
            ygap=1 if n_pos <= 40 else 0,
            **text,
            **heat,
        )
    )
    if title is None:
        title = "Router combine weights" + (
            f" at layer {layer}" if layer is not None else ""
        )
        if prompt is not None:
            title += f"<br><sup>prompt: {html.escape(repr(prompt))}</sup>"
    base_layout(
        fig,
        title,
        xaxis=dict(title=dict(text="expert"), type="category", **expert_ticks(n_exp)),
        yaxis=dict(
            title=dict(text="position: token"),
            type="category",
            tickmode="array",
            tickvals=labels,
            ticktext=labels,
            autorange="reversed",
            automargin=True,
        ),
        plot_height=plot_h,
    )
    return fig
