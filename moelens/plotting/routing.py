"""Figures of routing: the router's combine weights per token and expert."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import plotly.graph_objects as go

from moelens.plotting.style import (
    base_layout, expert_ticks, fmt, format_token_labels, heatmap_size, to_numpy, token_strings,
)

__all__ = ["routing_map", "generation_routing_map"]


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


def generation_routing_map(
    indices: Any, weights: Any, layers: Sequence[int], token_labels: Sequence[str],
    n_experts: Optional[int] = None, title: Optional[str] = None,
):
    """Plotly heatmap of a generation's routing: generated tokens (x) x sparse layers (y), each
    cell coloured by the expert with the largest combine weight (its id is written in the cell
    when the grid is small); the hover lists every chosen expert and its weight.

    ``indices``/``weights``: ``[n_steps, n_layers, top_k]`` torch tensors (``moelens.generation.RoutingTrace.plot``
    calls this)."""
    indices, weights = indices.cpu(), weights.cpu().float()
    n, nl, k = indices.shape
    if weights.shape != indices.shape or len(layers) != nl or len(token_labels) != n:
        raise ValueError(
            f"shapes disagree: indices {tuple(indices.shape)}, weights {tuple(weights.shape)}, "
            f"{len(layers)} layers, {len(token_labels)} token labels"
        )
    top = indices.gather(-1, weights.argmax(-1, keepdim=True))[..., 0].T  # [layers, steps]
    order = weights.argsort(-1, descending=True)
    hover = [[
        f"token {token_labels[s]}<br>layer {layers[l]}<br>" + "<br>".join(
            f"expert {int(indices[s, l, j])}: weight {fmt(float(weights[s, l, j]))}" for j in order[s, l].tolist())
        for s in range(n)] for l in range(nl)]
    n_experts = int(n_experts if n_experts is not None else int(indices.max()) + 1 if indices.numel() else 1)
    y = [f"L{l}" for l in layers]
    x = [f"{lab}" for lab in token_labels]
    # duplicate labels would merge columns: keep the step number in front (labels are "s: token")
    small = n * nl <= 1500
    fig = go.Figure(go.Heatmap(
        z=top.numpy().astype(float), x=list(range(n)), y=list(range(nl)), zmin=0, zmax=max(n_experts - 1, 1),
        colorscale="Turbo", colorbar=dict(title="top-weight<br>expert id"),
        text=top.numpy().astype(str) if small else None, texttemplate="%{text}" if small else None,
        customdata=hover, hovertemplate="%{customdata}<extra></extra>", xgap=1, ygap=1,
    ))
    fig.update_xaxes(tickmode="array", tickvals=list(range(n)), ticktext=x, tickangle=-60, title="generated token (step: token)")
    step = max(1, nl // 48)
    fig.update_yaxes(tickmode="array", tickvals=list(range(0, nl, step)), ticktext=y[::step], title="sparse layer",
                     autorange="reversed")
    base_layout(
        fig, title or "Routing of each generated token<br><sup>colour: the expert with the largest combine weight; "
        "hover for all chosen experts</sup>",
        plot_height=heatmap_size(nl, n, value_chars=3)[0], margin=dict(l=70, r=40, b=160), plot_bgcolor="white",
    )
    return fig
