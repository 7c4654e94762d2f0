"""Figures of causal tracing: the restoration heatmap (layers x tokens), the per-layer rescue curve
and the validation summary of the dataset protocol."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from moelens.formatting import format_p
from moelens.plotting.style import (
    HOVER, KIND_STYLE, RESCUE_AXIS, as_figure, base_layout, cell_text, diverging, fmt, format_token_labels,
    heatmap_size, hline, html_text, index_list, label_list, layout_spec, to_numpy, token_strings, vline,
)

__all__ = ["restoration_heatmap", "layer_curve", "layer_curve_spec", "protocol_summary", "sweep_bar"]


def restoration_heatmap(
    scores: Any,
    str_tokens: Sequence[str],
    *,
    subject_positions: Iterable[int] = (),
    layers: Sequence[Any] | None = None,
    positions: Sequence[int] | None = None,
    clean: float | None = None,
    corrupted: float | None = None,
    kind: str = "mlp",
    title: str | None = None,
    metric: str = "score",
) -> go.Figure:
    """Causal-tracing heatmap: layers on x, token positions on y.

    Args:
        scores: ``[n_layers, n_positions]`` metric after restoring the clean
            ``kind`` output of a layer at a position into the corrupted run.
        str_tokens: token strings of the whole prompt.
        subject_positions: absolute positions of the subject tokens (marked
            with ``*`` and bold tick labels).
        layers: labels of the ``n_layers`` rows (default ``0..n_layers-1``).
        positions: absolute token positions of the ``n_positions`` columns
            (default all of ``str_tokens``, which must then have length
            ``n_positions``).
        clean: metric of the clean run: marked on the colour bar; cells that
            move towards it are blue.
        corrupted: metric of the corrupted run: the centre (white) of the
            diverging colour scale; cells where restoring *hurts* (moves away
            from clean) are red.  The range is symmetric about ``corrupted``
            and covers every cell and ``clean``: nothing is clipped.
        kind: restored component (``"mlp"``, ``"attn"``, ``"resid"``, ...);
            named in the default title.
        title: figure title (default describes ``kind`` and clean/corrupted).
        metric: name of the metric (the colour bar's title), e.g.
            ``"logit(true) - logit(foil)"``.

    ``fig.data[0].z`` is ``scores`` itself (drawn with ``transpose=True``),
    ``fig.data[0].x`` the layer labels, ``fig.data[0].y`` and
    ``fig.layout.yaxis.ticktext`` the token labels (top to bottom).
    """
    z = to_numpy(scores, "scores", ndim=2)
    n_layers, n_pos = z.shape
    toks = token_strings(str_tokens)
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a string, got {type(kind).__name__}")

    if positions is None:
        if len(toks) != n_pos:
            raise ValueError(
                f"scores has shape {tuple(z.shape)} ([n_layers, n_positions]) "
                f"but str_tokens has length {len(toks)}; pass `positions` when "
                f"scores covers only a subset of the tokens"
            )
        pos = list(range(n_pos))
    else:
        pos = index_list(positions, "positions", len(toks))
        if len(pos) != n_pos:
            raise ValueError(
                f"positions has length {len(pos)} but scores has shape "
                f"{tuple(z.shape)} ([n_layers, n_positions])"
            )
        if len(set(pos)) != len(pos):
            raise ValueError(f"positions contains duplicates: {pos}")
    subj = index_list(list(subject_positions), "subject_positions", len(toks))
    layer_labels = (
        list(range(n_layers))
        if layers is None
        else label_list(layers, "layers", n_layers, what="layers (scores.shape[0])")
    )

    labels = format_token_labels(toks, pos, subj)

    kind_desc = KIND_STYLE.get(kind.lower(), ("", kind))[1]
    plot_h, _, show = heatmap_size(n_pos, n_layers, value_chars=5)
    heat, colorbar = diverging(z, reference=corrupted, other=clean, metric=metric,
                               ref_name="corrupted", other_name="clean", bar_px=plot_h)
    customdata = None
    if clean is not None and corrupted is not None and float(clean) != float(corrupted):
        customdata = (z - float(corrupted)) / (float(clean) - float(corrupted))
    fig = go.Figure(
        go.Heatmap(
            z=z,
            transpose=True,  # z stays [n_layers, n_positions]; drawn layers on x
            x=layer_labels,
            y=labels,
            customdata=customdata.T if customdata is not None else None,
            hovertemplate=(
                "layer %{x}<br>position %{y}<br>" + html_text(metric) + " %{z:" + HOVER + "}"
                + ("<br>normalised rescue %{customdata:" + HOVER + "}" if customdata is not None else "")
                + "<extra></extra>"
            ),
            colorbar=colorbar,
            xgap=1 if n_layers <= 64 else 0,
            ygap=1 if n_pos <= 40 else 0,
            **cell_text(show),
            **heat,
        )
    )
    if title is None:
        title = f"Restoring the clean {kind_desc} at one layer and position"
        notes = []
        if clean is not None:
            notes.append(f"clean = {fmt(float(clean))}")
        if corrupted is not None:
            notes.append(f"corrupted = {fmt(float(corrupted))}")
        if notes:
            title += "<br><sup>" + ", ".join(notes) + "</sup>"
    # subject rows are marked in their tick labels (bold, *): no shape is drawn over the axis
    base_layout(
        fig,
        title,
        plot_height=plot_h,
        xaxis=dict(title=dict(text="layer"), type="category"),
        yaxis=dict(
            title=dict(text="position: token" + (" (* = subject, bold)" if subj else "")),
            type="category",
            tickmode="array",
            tickvals=labels,
            ticktext=labels,
            autorange="reversed",
            automargin=True,
        ),
    )
    return fig


def layer_curve(
    values: Any,
    *,
    layers: Sequence[Any],
    ci_low: Any = None,
    ci_high: Any = None,
    title: str | None = None,
    metric: str = "mean " + RESCUE_AXIS,
) -> go.Figure:
    """Mean rescue per layer, with an optional CI band (one x tick per layer).

    With a band, the figure's traces are ``[ci_high, ci_low (filled), mean]``;
    without, just ``[mean]``.  The mean trace is always ``fig.data[-1]`` and is
    named ``"mean"``.  The figure is :func:`layer_curve_spec`'s data, validated.
    """
    return as_figure(layer_curve_spec(values, layers=layers, ci_low=ci_low, ci_high=ci_high, title=title,
                                      metric=metric))


def layer_curve_spec(
    values: Any,
    *,
    layers: Sequence[Any],
    ci_low: Any = None,
    ci_high: Any = None,
    title: str | None = None,
    metric: str = "mean " + RESCUE_AXIS,
) -> dict[str, Any]:
    """:func:`layer_curve` as plain data (``{"data", "layout"}``, no plotly objects): what a report
    embeds for each of hundreds of cases without plotly's per-figure validation cost."""
    v = to_numpy(values, "values", ndim=1)
    xs = label_list(layers, "layers", v.shape[0], what="values (values.shape[0])")
    if (ci_low is None) != (ci_high is None):
        raise ValueError("ci_low and ci_high must be given together")
    data: list[dict[str, Any]] = []
    if ci_low is not None:
        lo = to_numpy(ci_low, "ci_low", ndim=1)
        hi = to_numpy(ci_high, "ci_high", ndim=1)
        for name, arr in (("ci_low", lo), ("ci_high", hi)):
            if arr.shape != v.shape:
                raise ValueError(
                    f"{name} has shape {tuple(arr.shape)} but values has shape "
                    f"{tuple(v.shape)}"
                )
        data.append(dict(type="scatter", x=xs, y=hi, mode="lines", line=dict(width=0),
                         name="ci_high", showlegend=False, hoverinfo="skip"))
        data.append(dict(type="scatter", x=xs, y=lo, mode="lines", line=dict(width=0),
                         fill="tonexty", fillcolor="rgba(31,119,180,0.2)",
                         name="95% CI", hoverinfo="skip"))
        custom = np.stack([lo, hi], axis=1)
        hover = ("layer %{x}<br>mean %{y:.3g}<br>CI [%{customdata[0]:.3g}, "
                 "%{customdata[1]:.3g}]<extra></extra>")
    else:
        custom = None
        hover = "layer %{x}<br>mean %{y:.3g}<extra></extra>"
    data.append(
        dict(
            type="scatter",
            x=xs,
            y=v,
            mode="lines+markers",
            name="mean",
            line=dict(color="#1f77b4"),
            customdata=custom,
            hovertemplate=hover,
        )
    )
    return dict(data=data, layout=layout_spec(
        title if title is not None else "Mean rescue per layer",
        # one tick per layer, at the layer itself (never 0.5, 1.5)
        xaxis=dict(title=dict(text="layer"), tickmode="array", tickvals=xs, ticktext=[str(v) for v in xs]),
        yaxis=dict(title=dict(text=metric)),
        shapes=[hline(0.0, color="#444", width=1)],
        plot_height=320,
    ))


def protocol_summary(df: Any, title: str | None = None) -> go.Figure:
    """Dot-and-error-bar chart of estimates with 95% CIs and a zero line.

    ``df`` needs columns ``quantity``, ``estimate``, ``ci_low``, ``ci_high``
    and optionally ``p_value`` (shown on hover).  One row per quantity, in
    the DataFrame's order from top to bottom; ``fig.data[0].x`` holds the
    estimates.
    """
    required = ["quantity", "estimate", "ci_low", "ci_high"]
    cols = getattr(df, "columns", None)
    if cols is None:
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in required if c not in cols]
    if missing:
        raise ValueError(
            f"df is missing column(s) {missing}; has {list(cols)}, needs {required}"
        )
    if len(df) == 0:
        raise ValueError("df has no rows: nothing to plot")
    q = [str(v) for v in df["quantity"].tolist()]
    est = to_numpy(df["estimate"].to_numpy(), "df['estimate']", ndim=1)
    lo = to_numpy(df["ci_low"].to_numpy(), "df['ci_low']", ndim=1)
    hi = to_numpy(df["ci_high"].to_numpy(), "df['ci_high']", ndim=1)
    has_p = "p_value" in cols
    p = (
        to_numpy(df["p_value"].to_numpy(), "df['p_value']", ndim=1)
        if has_p
        else np.full(len(q), np.nan)
    )
    rows = list(range(len(q)))
    plus = np.clip(hi - est, 0, None)
    minus = np.clip(est - lo, 0, None)
    custom = np.stack([lo, hi, p], axis=1)
    hover = "%{text}<br>estimate %{x:.3g}<br>95% CI [%{customdata[0]:.3g}, %{customdata[1]:.3g}]"
    if has_p:
        hover += "<br>%{hovertext}"
    fig = go.Figure(
        go.Scatter(
            x=est,
            y=rows,
            mode="markers",
            marker=dict(size=10, color="#1f77b4"),
            error_x=dict(type="data", symmetric=False, array=plus, arrayminus=minus,
                         thickness=2, width=6),
            text=[html.escape(s, quote=False) for s in q],
            hovertext=([f"p {format_p(v)}" if format_p(v).startswith("<") else f"p = {format_p(v)}" for v in p]
                       if has_p else None),
            customdata=custom,
            hovertemplate=hover + "<extra></extra>",
            name="estimate",
        )
    )
    base_layout(
        fig,
        title if title is not None else "Protocol summary (95% CI)",
        xaxis=dict(title=dict(text="estimate (95% CI)"), zeroline=True),
        yaxis=dict(
            tickmode="array",
            tickvals=rows,
            ticktext=[html.escape(s, quote=False) for s in q],
            autorange="reversed",
        ),
        showlegend=False,
        shapes=[vline(0.0, dash="dash", color="gray")],
        plot_height=max(120, 40 * len(q)),
    )
    return fig


def sweep_bar(values: Any, labels: Sequence[Any], *, title: str | None = None, metric: str = "metric") -> go.Figure:
    """One bar per intervention set of a sweep (:class:`moelens.patching.SweepResult`): its mean
    metric value, labelled by the set (hover: three significant digits)."""
    v = to_numpy(values, "values", ndim=1)
    names = [str(x) for x in labels]
    if len(names) != v.shape[0]:
        raise ValueError(f"labels has length {len(names)} but values has {v.shape[0]} entries")
    fig = go.Figure(go.Bar(x=names, y=v, hovertemplate="%{x}<br>" + html_text(metric) + " %{y:" + HOVER + "}"
                                                          "<extra></extra>"))
    base_layout(fig, title or "Sweep: mean metric per intervention set", plot_height=320,
                xaxis=dict(title=dict(text="set"), type="category"), yaxis=dict(title=dict(text=html_text(metric))))
    return fig
