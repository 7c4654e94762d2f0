"""Figures of the analysis tools (:mod:`moelens.analysis`): expert-level direct logit attribution and
router-logit attribution heatmaps (plotly; ``fig.write_html`` for an offline page)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from moelens.plotting.style import HOVER, base_layout, cell_text, fmt, heatmap_size


def _diverging_range(z: np.ndarray) -> float:
    finite = z[np.isfinite(z)]
    m = float(np.abs(finite).max()) if finite.size else 1.0
    return m if m > 0 else 1.0


def expert_dla_heatmap(df, batch: int = 0, position: Optional[int] = None, title: Optional[str] = None):
    """Layer (rows) x expert (columns) heatmap of :func:`moelens.analysis.expert_dla`'s
    ``attribution`` at one (batch, position) (default: the last position in ``df``). Shared experts,
    where present, are the right-most column ``"shared"``; routed cells are outlined with a dot.
    Colour: the attribution in logit units, diverging around 0."""
    import plotly.graph_objects as go

    d = df[df["batch"] == batch]
    if d.empty:
        raise ValueError(f"no rows for batch {batch}")
    position = int(d["position"].max()) if position is None else position
    d = d[d["position"] == position]
    if d.empty:
        raise ValueError(f"no rows for position {position}; positions in the table: {sorted(df['position'].unique())}")
    layers = sorted(d["layer"].unique())
    experts = sorted(e for e in d["expert"].unique() if e >= 0)
    has_shared = bool((d["expert"] < 0).any())
    cols = [str(e) for e in experts] + (["shared"] if has_shared else [])
    z = np.full((len(layers), len(cols)), np.nan)
    routed_x, routed_y = [], []
    routed = np.zeros(z.shape, dtype=bool)
    li = {l: i for i, l in enumerate(layers)}
    ci = {e: i for i, e in enumerate(experts)}
    for row in d.itertuples():
        c = len(experts) if row.expert < 0 else ci[row.expert]
        z[li[row.layer], c] = row.attribution
        if row.expert >= 0 and row.routed:
            routed_x.append(cols[c])
            routed_y.append(f"L{row.layer}")
            routed[li[row.layer], c] = True
    m = _diverging_range(z)
    ylabels = [f"L{l}" for l in layers]
    metric = df.attrs.get("metric", "direct logit attribution")
    tok = d["token"].iloc[0] if "token" in d and d["token"].iloc[0] is not None else None
    where = f"position {position}" + (f" ({tok!r})" if tok is not None else "")
    plot_h, _, show = heatmap_size(len(layers), len(cols), value_chars=7)
    # values in the cells where they fit, a routed cell's value ringed ("o 0.123"); else circle markers
    text = {}
    if show:
        text = dict(text=[[("" if not np.isfinite(v) else ("o " if r else "") + fmt(v)) for v, r in zip(zr, rr)]
                          for zr, rr in zip(z.tolist(), routed.tolist())], texttemplate="%{text}",
                    textfont=dict(size=11))
    fig = go.Figure(
        go.Heatmap(
            z=z, x=cols, y=ylabels, colorscale="RdBu", zmid=0.0, zmin=-m, zmax=m,
            colorbar=dict(title="logit"),
            hovertemplate="layer %{y}<br>expert %{x}<br>attribution %{z:" + HOVER + "}<extra></extra>",
            **text,
        )
    )
    if not show:
        fig.add_trace(
            go.Scatter(x=routed_x, y=routed_y, mode="markers", name="routed here",
                       marker=dict(symbol="circle-open", size=7 if len(cols) <= 64 else 4, color="black"),
                       hoverinfo="skip")
        )
    n_cols, n_rows = len(cols), len(layers)
    base_layout(
        fig, title or f"Experts' {metric}<br><sup>at {where}; "
                      + ("'o': routed there" if show else "circles: routed there") + "</sup>", plot_height=plot_h,
        showlegend=False,
        xaxis=dict(title="expert", type="category", tickangle=0 if n_cols <= 32 else -90,
                   nticks=min(n_cols, 64)),
        yaxis=dict(title="layer", type="category", autorange="reversed"),
        margin=dict(l=70, r=40, b=90),
    )
    return fig


def router_attribution_heatmap(ra, batch: int = 0, position: int = -1, top: int = 20,
                               experts: Optional[list[int]] = None, title: Optional[str] = None):
    """Components (rows: the ``top`` by largest absolute contribution to the chosen experts, the
    rest summed as ``"other"``, the total as ``"router logit"``) x experts (columns: the chosen ones
    first, starred, then the others, or ``experts``) for one position of a
    :class:`~moelens.analysis.router_attribution.RouterAttribution`."""
    import plotly.graph_objects as go

    v = ra.values[:, batch, position].float().cpu().numpy()  # [c, n_experts]
    chosen = [int(e) for e in ra.chosen[batch, position].tolist()]
    n_exp = v.shape[1]
    if experts is None:
        experts = chosen + [e for e in range(n_exp) if e not in chosen]
    score = np.abs(v[:, chosen]).max(axis=1)
    order = np.argsort(-score)
    keep = sorted(order[: min(top, len(order))].tolist())
    rest = [i for i in range(v.shape[0]) if i not in set(keep)]
    rows = [v[i, experts] for i in keep]
    labels = [ra.labels[i] for i in keep]
    if rest:
        rows.append(v[rest][:, experts].sum(0))
        labels.append(f"other ({len(rest)})")
    rows.append(v[:, experts].sum(0))
    labels.append("router logit")
    z = np.stack(rows)
    xlabels = [f"{e}*" if e in chosen else str(e) for e in experts]
    m = _diverging_range(z[:-1])
    tok = None
    if ra.str_tokens is not None:
        tok = ra.str_tokens[batch][position]
    n_pos = ra.values.shape[2]
    where = f"position {position % n_pos}" + (f" ({tok!r})" if tok is not None else "")
    plot_h, _, show = heatmap_size(len(labels), len(xlabels), value_chars=5)
    fig = go.Figure(
        go.Heatmap(
            z=z, x=xlabels, y=labels, colorscale="RdBu", zmid=0.0, zmin=-m, zmax=m,
            colorbar=dict(title="router logit"),
            hovertemplate="%{y}<br>expert %{x}<br>contribution %{z:" + HOVER + "}<extra></extra>",
            **cell_text(show),
        )
    )
    n_cols = len(xlabels)
    base_layout(
        fig, title or (f"Router-logit attribution, layer {ra.layer}, {where}<br><sup>contribution of each upstream "
                       f"component to each expert's router logit (frozen ln2 scale); * = chosen experts</sup>"),
        plot_height=plot_h,
        xaxis=dict(title="expert", type="category", tickangle=0 if n_cols <= 32 else -90),
        yaxis=dict(title="upstream component", type="category", autorange="reversed", automargin=True),
        margin=dict(l=140, r=40, b=70),
    )
    return fig


__all__ = ["expert_dla_heatmap", "router_attribution_heatmap"]
