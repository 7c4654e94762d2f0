"""Plotly figures for moelens results.

Every function takes plain arrays (numpy arrays, torch tensors or nested lists)
plus labels and returns a :class:`plotly.graph_objects.Figure`.  Nothing here
calls ``fig.show()``: result objects call these from their ``.plot()`` methods
and the caller decides whether to show, save (:func:`save_html`) or further
edit the figure.

Conventions
-----------
* Token labels are ``"i: token"`` with ``i`` the absolute position in the
  prompt; subject tokens get a ``*`` suffix and a bold tick label.
* Heatmaps keep the input array untouched as ``fig.data[0].z`` (as float), so
  ``fig.data[0].z[i, j]`` is the score of row ``i``, column ``j`` of the input.
* Inputs are validated eagerly; errors name the offending argument and shapes.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

from moelens.formatting import format_p

__all__ = [
    "restoration_heatmap",
    "expert_rescue_heatmap",
    "expert_rescue_bar",
    "routing_map",
    "coalition_curve",
    "protocol_summary",
    "layer_curve",
    "save_html",
    "format_token_labels",
]

# Colour scales per restored component, in the spirit of the ROME causal
# tracing figures (purple = hidden state, green = MLP/MoE, red = attention).
_KIND_STYLE: dict[str, tuple[str, str]] = {
    "resid": ("Purples", "residual stream (hidden state)"),
    "hidden": ("Purples", "residual stream (hidden state)"),
    "block": ("Purples", "residual stream (hidden state)"),
    "mlp": ("Greens", "MLP / MoE output"),
    "moe": ("Greens", "MoE output"),
    "experts": ("Greens", "routed-expert output"),
    "shared": ("Greens", "shared-expert output"),
    "attn": ("Reds", "attention output"),
}

_ROUTE_STYLE: dict[str, tuple[str, str]] = {
    "both": ("routed in both runs", "#7b3294"),
    "clean": ("routed in clean run only", "#1f77b4"),
    "noise": ("routed in corrupted run only", "#d62728"),
    "neither": ("not routed", "#b0b0b0"),
}


# --------------------------------------------------------------------------- #
# Input helpers
# --------------------------------------------------------------------------- #
def _to_numpy(x: Any, name: str, *, ndim: int | None = None) -> np.ndarray:
    """Convert numpy / torch / nested sequences to a float64 numpy array."""
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, no torch import
        # .double() also handles bfloat16 / bool, which numpy cannot take directly
        arr = x.detach().cpu().double().numpy()
    else:
        try:
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"{name} must be numeric (numpy array, torch tensor or nested "
                f"list of numbers); could not convert {type(x).__name__}: {e}"
            ) from None
    arr = np.asarray(arr, dtype=np.float64)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(
            f"{name} must be {ndim}-D, got {arr.ndim}-D array of shape "
            f"{tuple(arr.shape)}"
        )
    return arr


def _py(v: Any) -> Any:
    """numpy / torch scalars -> plain Python scalars (clean JSON, clean labels)."""
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
        return v.item()
    return v


def _label_list(values: Any, name: str, n: int, *, what: str) -> list:
    """Validate a 1-D sequence of axis labels of length ``n`` (unique)."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence, got a string {values!r}")
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        values = values.detach().cpu().tolist()
    elif isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise ValueError(
                f"{name} must be 1-D, got shape {tuple(values.shape)}"
            )
        values = values.tolist()
    try:
        out = [_py(v) for v in values]
    except TypeError:
        raise TypeError(
            f"{name} must be a sequence, got {type(values).__name__}"
        ) from None
    if len(out) != n:
        raise ValueError(
            f"{name} has length {len(out)} but the data has {n} {what}"
        )
    if len(set(map(repr, out))) != len(out):
        raise ValueError(f"{name} contains duplicate entries: {out}")
    return out


def _str_tokens(str_tokens: Any, name: str = "str_tokens") -> list[str]:
    if isinstance(str_tokens, (str, bytes)):
        raise TypeError(
            f"{name} must be a sequence of token strings, got a single string "
            f"{str_tokens!r}"
        )
    try:
        return [str(t) for t in str_tokens]
    except TypeError:
        raise TypeError(
            f"{name} must be a sequence of token strings, got "
            f"{type(str_tokens).__name__}"
        ) from None


def _index_list(values: Any, name: str, n: int) -> list[int]:
    """Integer indices in ``[0, n)``; also accepts a boolean mask of length n."""
    if values is None:
        return []
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(
                f"{name} given as a boolean mask must have shape ({n},), got "
                f"{tuple(arr.shape)}"
            )
        return [int(i) for i in np.flatnonzero(arr)]
    arr = arr.reshape(-1) if arr.ndim == 0 else arr
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise TypeError(f"{name} must contain integer indices, got {arr.tolist()}")
    out = [int(i) for i in arr]
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ValueError(f"{name} has indices {bad} outside [0, {n})")
    return out


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _clean_token(tok: str) -> str:
    """Make a token printable in a tick label / hover box (HTML-escaped)."""
    tok = tok.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return html.escape(tok, quote=False)


def format_token_labels(
    str_tokens: Sequence[str],
    positions: Sequence[int] | None = None,
    subject_positions: Iterable[int] = (),
    *,
    bold: bool = True,
) -> list[str]:
    """Tick labels ``"i: token"`` for ``positions`` (default: all).

    Subject positions get a ``*`` suffix and (if ``bold``) are wrapped in
    ``<b>...</b>``.  Tokens are HTML-escaped since plotly renders tick text as
    pseudo-HTML.
    """
    toks = _str_tokens(str_tokens)
    if positions is None:
        positions = range(len(toks))
    subj = set(int(s) for s in subject_positions)
    labels = []
    for p in positions:
        p = int(p)
        lab = f"{p}: {_clean_token(toks[p])}"
        if p in subj:
            lab += "*"
            if bold:
                lab = f"<b>{lab}</b>"
        labels.append(lab)
    return labels


def _html_metric(metric: str) -> str:
    return html.escape(str(metric), quote=False)


# Diverging scale: red = away from the clean run, white = the reference, blue = towards clean.
_DIVERGING = "RdBu"


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values inside ``[lo, hi]``."""
    span = hi - lo
    if not (math.isfinite(span) and span > 0):
        return [lo]
    raw = span / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _diverging(
    z: np.ndarray,
    *,
    reference: float | None,
    other: float | None = None,
    metric: str = "metric",
    ref_name: str = "corrupted",
    other_name: str = "clean",
    marks: Sequence[tuple[float, str]] = (),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Heatmap colour settings centred on ``reference`` that cover every finite value of ``z``
    (and ``other``): returns ``(heatmap kwargs, colorbar)``.  Blue points from ``reference``
    towards ``other`` (red away from it); the colour bar names the metric and marks both values."""
    finite = z[np.isfinite(z)]
    if reference is None:  # no meaningful centre: a sequential scale over the data
        heat: dict[str, Any] = dict(colorscale="Viridis")
        if finite.size and finite.max() > finite.min():
            heat.update(zmin=float(finite.min()), zmax=float(finite.max()))
        return heat, dict(title=dict(text=_html_metric(metric), side="right"))
    ref = float(reference)
    extent = [float(np.max(np.abs(finite - ref)))] if finite.size else []
    if other is not None and math.isfinite(float(other)):
        extent.append(abs(float(other) - ref))
    m = max(extent + [0.0])
    if m == 0:
        m = 1.0
    m *= 1.02  # a hair of headroom: the extreme cell is not exactly at the bar's end
    heat = dict(zmid=ref, zmin=ref - m, zmax=ref + m, colorscale=_DIVERGING)
    # RdBu runs red (low) -> blue (high); make "towards other" blue
    heat["reversescale"] = bool(other is not None and float(other) < ref)
    ticks = _nice_ticks(ref - m, ref + m)
    named = [(ref, ref_name)]
    if other is not None:
        named.append((float(other), other_name))
    named += list(marks)
    keep = [t for t in ticks if all(abs(t - v) > 0.12 * m for v, _ in named)]
    vals = keep + [v for v, _ in named]
    text = [_fmt(t) for t in keep] + [f"{_fmt(v)} = {html.escape(n)}" for v, n in named]
    order = np.argsort(vals)
    colorbar = dict(
        title=dict(text=_html_metric(metric), side="right"),
        tickvals=[vals[i] for i in order],
        ticktext=[text[i] for i in order],
    )
    return heat, colorbar


def _wrap_title(title: str, width_px: float) -> tuple[str, int]:
    """Break the title's lines at spaces so that none is wider than the figure (about 8.5 px per
    character of the 17 px title font, 6 px for ``<sup>`` lines); returns (title, n_lines)."""
    out: list[str] = []
    for line in title.split("<br>"):
        sup = line.startswith("<sup>")
        text = line[5:-6] if sup and line.endswith("</sup>") else line
        per_char = 6.0 if sup else 8.5
        limit = max(20, int((width_px - 60) / per_char))
        words, cur, pieces = text.split(" "), "", []
        for w in words:
            if cur and len(re.sub(r"<[^>]+>", "", cur + " " + w)) > limit:
                pieces.append(cur)
                cur = w
            else:
                cur = f"{cur} {w}" if cur else w
        pieces.append(cur)
        out += [f"<sup>{p}</sup>" if sup else p for p in pieces]
    return "<br>".join(out), len(out)


def _base_layout(fig: go.Figure, title: str | None, **kw: Any) -> go.Figure:
    n_lines = 1
    if title and kw.get("width"):
        title, n_lines = _wrap_title(title, float(kw["width"]))
    if n_lines > 1 and "margin" not in kw:
        kw["margin"] = dict(t=60 + 22 * n_lines)
        if kw.get("height"):
            kw["height"] = kw["height"] + 22 * (n_lines - 1)
    fig.update_layout(
        title=dict(text=title) if title else None,
        template="plotly_white",
        **kw,
    )
    return fig


# --------------------------------------------------------------------------- #
# Figures
# --------------------------------------------------------------------------- #
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
    z = _to_numpy(scores, "scores", ndim=2)
    n_layers, n_pos = z.shape
    toks = _str_tokens(str_tokens)
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
        pos = _index_list(positions, "positions", len(toks))
        if len(pos) != n_pos:
            raise ValueError(
                f"positions has length {len(pos)} but scores has shape "
                f"{tuple(z.shape)} ([n_layers, n_positions])"
            )
        if len(set(pos)) != len(pos):
            raise ValueError(f"positions contains duplicates: {pos}")
    subj = _index_list(list(subject_positions), "subject_positions", len(toks))
    layer_labels = (
        list(range(n_layers))
        if layers is None
        else _label_list(layers, "layers", n_layers, what="layers (scores.shape[0])")
    )

    labels = format_token_labels(toks, pos, subj)

    kind_desc = _KIND_STYLE.get(kind.lower(), ("", kind))[1]
    heat, colorbar = _diverging(z, reference=corrupted, other=clean, metric=metric,
                                ref_name="corrupted", other_name="clean")
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
                "layer %{x}<br>position %{y}<br>" + _html_metric(metric) + " %{z:.4g}"
                + ("<br>normalised rescue %{customdata:.3f}" if customdata is not None else "")
                + "<extra></extra>"
            ),
            colorbar=colorbar,
            **heat,
        )
    )
    if title is None:
        title = f"Restoring the clean {kind_desc} at one layer and position"
        notes = []
        if clean is not None:
            notes.append(f"clean = {_fmt(float(clean))}")
        if corrupted is not None:
            notes.append(f"corrupted = {_fmt(float(corrupted))}")
        if notes:
            title += "<br><sup>" + ", ".join(notes) + "</sup>"
    _base_layout(
        fig,
        title,
        xaxis=dict(title=dict(text="layer"), type="category"),
        yaxis=dict(
            title=dict(text="position: token" + (" (* = subject)" if subj else "")),
            type="category",
            tickmode="array",
            tickvals=labels,
            ticktext=labels,
            autorange="reversed",
        ),
        height=max(320, 150 + 24 * n_pos),
        width=max(720, 330 + 26 * n_layers),
    )
    fig.update_yaxes(automargin=True)
    # Outline the subject rows so they stand out beyond the tick labels.
    row_of = {p: i for i, p in enumerate(pos)}
    for s in subj:
        if s in row_of:
            r = row_of[s]
            fig.add_shape(
                type="rect",
                xref="paper",
                yref="y",
                x0=0,
                x1=1,
                y0=r - 0.5,
                y1=r + 0.5,
                line=dict(color="black", width=1, dash="dot"),
                fillcolor="rgba(0,0,0,0)",
                layer="above",
            )
    return fig


RESCUE = "normalised rescue"
RESCUE_AXIS = "normalised rescue (0 = corrupted, 1 = clean)"


def _expert_ticks(n: int) -> dict[str, Any]:
    """Category axis of ``n`` experts: every label up to 64, then every k-th (hover has all)."""
    return {} if n <= 64 else dict(nticks=min(n, 64))


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
    range; small effects are not washed out by it).  Width and height grow with the
    number of experts and layers (128 experts x 48 layers stays legible; hover gives each value).
    """
    z = _to_numpy(scores, "scores", ndim=2)
    n_layers, n_exp = z.shape
    layer_labels = _label_list(
        layers, "layers", n_layers, what="layers (scores.shape[0])"
    )
    expert_labels = (
        list(range(n_exp))
        if experts is None
        else _label_list(experts, "experts", n_exp, what="experts (scores.shape[1])")
    )
    finite = z[np.isfinite(z)]
    # the range is set by the data (small effects stay visible); 1 = clean is marked once it is inside
    reach = float(np.abs(finite).max()) if finite.size else 0.0
    heat, colorbar = _diverging(z, reference=0.0, other=1.0 if reach >= 1.0 else None, metric=metric,
                                ref_name="corrupted", other_name="clean")
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=expert_labels,
            y=layer_labels,
            hovertemplate="layer %{y}<br>expert %{x}<br>" + _html_metric(metric)
            + " %{z:.4g}<extra></extra>",
            colorbar=colorbar,
            xgap=1 if n_exp <= 64 else 0,
            ygap=1 if n_layers <= 32 else 0,
            **heat,
        )
    )
    _base_layout(
        fig,
        title if title is not None else "Expert rescue by layer",
        xaxis=dict(title=dict(text="expert"), type="category", **_expert_ticks(n_exp)),
        yaxis=dict(title=dict(text="layer"), type="category", autorange="reversed"),
        height=max(260, 170 + 22 * n_layers),
        width=max(680, 300 + 11 * n_exp),
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
    Every bar's hover shows expert, value, CI and routing.
    """
    s = _to_numpy(scores, "scores", ndim=1)
    n = s.shape[0]
    clean_set = set(_index_list(clean_routed, "clean_routed", n))
    noise_set = set(_index_list(noise_routed, "noise_routed", n))
    hi_set = set(_index_list(highlight, "highlight", n))
    if (ci_low is None) != (ci_high is None):
        raise ValueError("ci_low and ci_high must be given together")
    lo = hi = None
    if ci_low is not None:
        lo = _to_numpy(ci_low, "ci_low", ndim=1)
        hi = _to_numpy(ci_high, "ci_high", ndim=1)
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
    fig = go.Figure()
    for gkey, (name, colour) in _ROUTE_STYLE.items():
        idx = [e for e in shown if group(e) == gkey]
        if not idx:
            continue
        bar: dict[str, Any] = {}
        if lo is not None:
            bar["error_y"] = dict(type="data", symmetric=False, array=np.clip(hi[idx] - s[idx], 0, None),
                                  arrayminus=np.clip(s[idx] - lo[idx], 0, None), thickness=1.2, width=3)
            custom = np.stack([lo[idx], hi[idx]], axis=1)
            ci_hover = "<br>95% CI [%{customdata[0]:.3f}, %{customdata[1]:.3f}]"
        else:
            custom, ci_hover = None, ""
        fig.add_trace(
            go.Bar(
                x=[f"E{e}" for e in idx],
                y=s[idx],
                name=name if routed_info else "expert",
                marker=dict(color=colour if routed_info else "#4c78a8",
                            line=dict(color=["black" if e in hi_set else "rgba(0,0,0,0)" for e in idx],
                                      width=[2.5 if e in hi_set else 0 for e in idx])),
                customdata=custom,
                hovertemplate=(
                    "expert %{x}<br>" + _html_metric(metric) + " %{y:.4g}" + ci_hover
                    + (f"<br>{name}" if routed_info else "") + "<extra></extra>"
                ),
                showlegend=routed_info,
                **bar,
            )
        )
    refs = list(references) if references is not None else [(0.0, "0 = corrupted run"), (1.0, "1 = clean run")]
    if baseline is not None:
        refs.append((float(baseline), f"whole layer restored ({_fmt(float(baseline))})"))
    dashes = ["solid", "dash", "dot", "dashdot"]
    for i, (v, label) in enumerate(refs):
        v = float(v)
        if not math.isfinite(v):
            continue
        style = dict(color="#444" if i < 2 else "#e45756", width=1, dash=dashes[i % len(dashes)])
        fig.add_hline(y=v, line=style)
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=style, name=html.escape(label),
                                 hoverinfo="skip", showlegend=True))
    if title is None:
        title = "Expert rescue" + (f" at layer {layer}" if layer is not None else "")
    if len(shown) < n:
        title += f"<br><sup>top {len(shown)} of {n} experts by score (sorted)</sup>"
    else:
        title += "<br><sup>experts sorted by score</sup>"
    _base_layout(
        fig,
        title,
        barmode="overlay",
        bargap=0.15,
        xaxis=dict(title=dict(text="expert (sorted)"), type="category", categoryorder="array",
                   categoryarray=cats, tickangle=-90 if len(shown) > 24 else 0),
        yaxis=dict(title=dict(text=_html_metric(metric)), zeroline=True),
        legend=dict(title=dict(text="routing" if routed_info else "")),
        height=460,
        width=max(720, 360 + 16 * len(shown)),
    )
    return fig


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
    value); size grows with positions and experts.  ``prompt`` is named in the default title.
    """
    w = _to_numpy(weights, "weights", ndim=2)
    n_pos, n_exp = w.shape
    toks = _str_tokens(str_tokens)
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
    fig = go.Figure(
        go.Heatmap(
            z=w,
            x=list(range(n_exp)),
            y=labels,
            colorscale="Blues",
            hovertemplate=(
                "position %{y}<br>expert %{x}<br>combine weight %{z:.4g}<extra></extra>"
            ),
            colorbar=dict(title=dict(text="combine weight<br>(0 = not routed)", side="right")),
            xgap=1 if n_exp <= 64 else 0,
            ygap=1 if n_pos <= 40 else 0,
            **heat,
        )
    )
    if title is None:
        title = "Router combine weights" + (
            f" at layer {layer}" if layer is not None else ""
        )
        if prompt is not None:
            title += f"<br><sup>prompt: {html.escape(repr(prompt))}</sup>"
    _base_layout(
        fig,
        title,
        xaxis=dict(title=dict(text="expert"), type="category", **_expert_ticks(n_exp)),
        yaxis=dict(
            title=dict(text="position: token"),
            type="category",
            tickmode="array",
            tickvals=labels,
            ticktext=labels,
            autorange="reversed",
            automargin=True,
        ),
        height=max(320, 150 + 24 * n_pos),
        width=max(680, 320 + 11 * n_exp),
    )
    return fig


def coalition_curve(
    sizes: Any,
    rescue: Any,
    *,
    labels: Sequence[Any] | None = None,
    target: float | None = None,
    title: str | None = None,
    target_label: str | None = None,
    layer_rescue: float | None = None,
) -> go.Figure:
    """Greedy coalition search: normalised rescue vs coalition size.

    ``labels[i]`` names the expert added at step ``i``; it is written next to each point (and
    on hover).  ``target`` draws a dashed line labelled ``target_label`` (in the legend), and
    ``layer_rescue`` a line for the whole layer restored; 1 (the clean run) is always drawn.
    Values above 1 mean the coalition overshoots the clean run.
    """
    x = _to_numpy(sizes, "sizes", ndim=1)
    y = _to_numpy(rescue, "rescue", ndim=1)
    if x.shape != y.shape:
        raise ValueError(
            f"sizes has shape {tuple(x.shape)} but rescue has shape {tuple(y.shape)}"
        )
    if labels is not None:
        if isinstance(labels, (str, bytes)):
            raise TypeError("labels must be a sequence, got a string")
        labs = [str(_py(v)) for v in labels]
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
                "coalition size %{x}<br>added %{customdata}<br>" + RESCUE + " %{y:.4g}"
                "<extra></extra>"
            ),
            showlegend=False,
        )
    )
    refs = [(1.0, "1 = clean run", dict(color="#444", width=1, dash="dot"))]
    if layer_rescue is not None and math.isfinite(float(layer_rescue)):
        refs.append((float(layer_rescue), f"whole layer restored ({_fmt(float(layer_rescue))})",
                     dict(color="#4c78a8", width=1, dash="dashdot")))
    if target is not None:
        refs.append((float(target), target_label or f"target {_fmt(float(target))}",
                     dict(color="firebrick", width=1.5, dash="dash")))
    for v, label, style in refs:
        fig.add_hline(y=v, line=style)
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=style, name=html.escape(label),
                                 hoverinfo="skip"))
    finite = [v for v in y.tolist() if math.isfinite(v)] + [v for v, _, _ in refs] + [0.0]
    pad = 0.12 * (max(finite) - min(finite) or 1.0)
    if title is None:
        title = "Greedy expert coalition search"
    if max(finite) > 1.0 and "above 1" not in title:
        title += "<br><sup>values above 1: restoring these experts overshoots the clean run</sup>"
    _base_layout(
        fig,
        title,
        xaxis=dict(title=dict(text="coalition size (experts restored together)"), rangemode="tozero", dtick=1),
        yaxis=dict(title=dict(text=RESCUE_AXIS), range=[min(finite) - pad, max(finite) + 2 * pad]),
        legend=dict(orientation="h", yanchor="top", y=-0.2, x=0),
        height=480,
        width=max(720, 300 + 70 * len(y)),
    )
    return fig


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
    est = _to_numpy(df["estimate"].to_numpy(), "df['estimate']", ndim=1)
    lo = _to_numpy(df["ci_low"].to_numpy(), "df['ci_low']", ndim=1)
    hi = _to_numpy(df["ci_high"].to_numpy(), "df['ci_high']", ndim=1)
    has_p = "p_value" in cols
    p = (
        _to_numpy(df["p_value"].to_numpy(), "df['p_value']", ndim=1)
        if has_p
        else np.full(len(q), np.nan)
    )
    rows = list(range(len(q)))
    plus = np.clip(hi - est, 0, None)
    minus = np.clip(est - lo, 0, None)
    custom = np.stack([lo, hi, p], axis=1)
    hover = "%{text}<br>estimate %{x:.4g}<br>95% CI [%{customdata[0]:.4g}, %{customdata[1]:.4g}]"
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
    fig.add_vline(x=0, line_dash="dash", line_color="gray")
    _base_layout(
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
        height=max(250, 80 + 40 * len(q)),
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
    named ``"mean"``.
    """
    v = _to_numpy(values, "values", ndim=1)
    xs = _label_list(layers, "layers", v.shape[0], what="values (values.shape[0])")
    if (ci_low is None) != (ci_high is None):
        raise ValueError("ci_low and ci_high must be given together")
    fig = go.Figure()
    if ci_low is not None:
        lo = _to_numpy(ci_low, "ci_low", ndim=1)
        hi = _to_numpy(ci_high, "ci_high", ndim=1)
        for name, arr in (("ci_low", lo), ("ci_high", hi)):
            if arr.shape != v.shape:
                raise ValueError(
                    f"{name} has shape {tuple(arr.shape)} but values has shape "
                    f"{tuple(v.shape)}"
                )
        fig.add_trace(go.Scatter(x=xs, y=hi, mode="lines", line=dict(width=0),
                                 name="ci_high", showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=xs, y=lo, mode="lines", line=dict(width=0),
                                 fill="tonexty", fillcolor="rgba(31,119,180,0.2)",
                                 name="95% CI", hoverinfo="skip"))
        custom = np.stack([lo, hi], axis=1)
        hover = ("layer %{x}<br>mean %{y:.4g}<br>CI [%{customdata[0]:.4g}, "
                 "%{customdata[1]:.4g}]<extra></extra>")
    else:
        custom = None
        hover = "layer %{x}<br>mean %{y:.4g}<extra></extra>"
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=v,
            mode="lines+markers",
            name="mean",
            line=dict(color="#1f77b4"),
            customdata=custom,
            hovertemplate=hover,
        )
    )
    fig.add_hline(y=0.0, line=dict(color="#444", width=1))
    _base_layout(
        fig,
        title if title is not None else "Mean rescue per layer",
        # one tick per layer, at the layer itself (never 0.5, 1.5)
        xaxis=dict(title=dict(text="layer"), tickmode="array", tickvals=xs, ticktext=[str(v) for v in xs]),
        yaxis=dict(title=dict(text=metric)),
        height=420,
        width=max(720, 300 + 18 * len(xs)),
    )
    return fig


def save_html(fig: go.Figure, path: str | Path) -> Path:
    """Write ``fig`` as a standalone HTML file with plotly.js embedded.

    The file works offline (no CDN script).  Parent directories are created.
    Returns the path written.
    """
    if not isinstance(fig, go.Figure):
        raise TypeError(f"fig must be a plotly Figure, got {type(fig).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path, include_plotlyjs=True, full_html=True, include_mathjax=False)
    return path
