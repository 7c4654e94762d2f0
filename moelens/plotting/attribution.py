"""Figures of attribution results: a layers x experts heatmap of the (estimated) normalised rescue.

Dense layers are left blank (NaN), clean-routed experts are ringed, exactly verified pairs (from
:func:`moelens.tracing.attribution.screen_experts`) carry a cross. The colour scale is diverging,
centred on 0 (no rescue), symmetric about the largest magnitude. The height follows the layer
count (:func:`moelens.plotting.style.heatmap_size`), values are printed in the cells where they fit,
and cells stay readable at 48 layers x 128 experts (hover shows every value).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import plotly.graph_objects as go
import torch

from moelens.plotting.style import HOVER, base_layout, cell_text, heatmap_size


def expert_attribution_heatmap(
    rescue,
    *,
    clean_routed: Optional[Sequence[Sequence[int]]] = None,
    verified=None,
    title: Optional[str] = None,
    metric: str = "normalised rescue",
    status: str = "estimate",
) -> go.Figure:
    """Heatmap ``rescue [n_layers, n_experts]`` (layers down, experts across); ``clean_routed[l]``:
    experts to ring at layer ``l``; ``verified``: bool ``[n_layers, n_experts]`` of exact values;
    ``status``: what the other values are, named on hover (``"estimate"`` or ``"exact"``)."""
    z = np.asarray(rescue.detach().cpu() if isinstance(rescue, torch.Tensor) else rescue, dtype=float)
    if z.ndim != 2:
        raise ValueError(f"rescue must be [n_layers, n_experts], got shape {z.shape}")
    n_layers, n_experts = z.shape
    rows = [l for l in range(n_layers) if np.isfinite(z[l]).any()]  # sparse layers only
    zz = z[rows]
    finite = zz[np.isfinite(zz)]
    m = float(np.abs(finite).max()) if finite.size else 1.0
    m = m if m > 0 else 1.0
    status = np.full(zz.shape, status, dtype=object)
    if verified is not None:
        v = np.asarray(verified.cpu() if isinstance(verified, torch.Tensor) else verified, dtype=bool)[rows]
        status[v] = "exact"
    plot_h, _, show = heatmap_size(len(rows), n_experts, value_chars=5)
    fig = go.Figure(go.Heatmap(
        z=zz, x=list(range(n_experts)), y=[f"L{l}" for l in rows], customdata=status,
        colorscale="RdBu", zmid=0.0, zmin=-m, zmax=m, xgap=1 if n_experts <= 64 else 0, ygap=1,
        hovertemplate="layer %{y}, expert %{x}<br>" + metric + " %{z:" + HOVER + "} (%{customdata})<extra></extra>",
        colorbar=dict(title=dict(text=metric, side="right")),
        **cell_text(show),
    ))
    # with values printed in the cells, the marks sit at the cell's left edge, off the number
    shift = -0.38 if show else 0.0
    if clean_routed is not None:
        xs, ys = [], []
        for l in rows:
            for e in clean_routed[l]:
                xs.append(e + shift)
                ys.append(f"L{l}")
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name="clean-routed",
                                 marker=dict(symbol="circle-open", size=7, color="black", line=dict(width=1)),
                                 hoverinfo="skip"))
    if verified is not None:
        xs, ys = [], []
        for i, l in enumerate(rows):
            for e in np.nonzero(v[i])[0]:
                xs.append(int(e) + shift)
                ys.append(f"L{l}")
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name="verified exactly",
                                 marker=dict(symbol="x", size=8 if show else 10, color="black",
                                             line=dict(width=1, color="white")),
                                 hoverinfo="skip"))
    base_layout(
        fig, title or f"Expert attribution ({metric})", plot_height=plot_h,
        xaxis=dict(title=dict(text="expert"), range=[-0.5, n_experts - 0.5], dtick=max(1, n_experts // 32)),
        yaxis=dict(title=dict(text="layer"), autorange="reversed", type="category"),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
        margin=dict(l=60, r=30, t=110),
    )
    return fig
