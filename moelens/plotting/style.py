"""What every moelens figure shares: input checks, colour scales, number formatting, sizing.

Sizing rules (tested in ``tests/unit/test_plotting.py``):

* **Width**: no figure fixes its width (``layout.autosize``, ``width`` unset); the report draws each
  at the page's width (plotly's responsive mode) and a static export uses :data:`EXPORT_WIDTH`.
* **Heatmap height** follows the data (:func:`heatmap_size`): ``ROW_PX`` per row up to 12 rows,
  fewer pixels per row as rows grow, never under ``MIN_ROW_PX``, so 4 x 8 and 48 x 128 both read.
* **Cell values** are printed in a heatmap's cells when they fit the cell at a 1000 px page
  (:data:`NOMINAL_PLOT_WIDTH` px of plotting area), otherwise shown on hover only.
* **Numbers**: three significant digits everywhere (:func:`moelens.formatting.format_number`;
  ``HOVER`` is the same rule in plotly's d3 format).
* **Nothing covers a tick label**: colour-bar ticks closer than ``LABEL_GAP_PX`` to a named value
  (``"9.44 = corrupted"``) are dropped; subject tokens are marked in their tick labels (bold, ``*``),
  not by shapes drawn over the axis.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from moelens.formatting import format_number

EXPORT_WIDTH = 1000  # px: a static image (png/svg/pdf) of a figure without a fixed width
NOMINAL_PLOT_WIDTH = 700  # px of plotting area on a 1000 px page (labels, colour bar and margins taken off)
ROW_PX = 30  # px per heatmap row for up to 12 rows
MIN_ROW_PX = 15  # px: the least a row gets (48 layers -> 720 px)
LABEL_GAP_PX = 18  # px between two colour-bar labels (the 12 px font plus air)
CHAR_PX = 6.6  # px per character of the 11 px cell-value font
HOVER = ".3g"  # d3 format of hovered values: three significant digits
TITLE_WIDTH = 720  # px over which titles are wrapped (a 1000 px page's figure, less the tool bar's corner)


def fmt(v: float) -> str:
    """Three significant digits (:func:`moelens.formatting.format_number`)."""
    return format_number(v)


# --------------------------------------------------------------------------- #
# Input helpers
# --------------------------------------------------------------------------- #
def to_numpy(x: Any, name: str, *, ndim: int | None = None) -> np.ndarray:
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


def py_scalar(v: Any) -> Any:
    """numpy / torch scalars -> plain Python scalars (clean JSON, clean labels)."""
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
        return v.item()
    return v


def label_list(values: Any, name: str, n: int, *, what: str) -> list:
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
        out = [py_scalar(v) for v in values]
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


def token_strings(str_tokens: Any, name: str = "str_tokens") -> list[str]:
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


def index_list(values: Any, name: str, n: int) -> list[int]:
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


def clean_token(tok: str) -> str:
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
    toks = token_strings(str_tokens)
    if positions is None:
        positions = range(len(toks))
    subj = set(int(s) for s in subject_positions)
    labels = []
    for p in positions:
        p = int(p)
        lab = f"{p}: {clean_token(toks[p])}"
        if p in subj:
            lab += "*"
            if bold:
                lab = f"<b>{lab}</b>"
        labels.append(lab)
    return labels


def html_text(metric: str) -> str:
    return html.escape(str(metric), quote=False)


# Diverging scale: red = away from the clean run, white = the reference, blue = towards clean.
DIVERGING = "RdBu"

# Colour scales per restored component, in the spirit of the ROME causal
# tracing figures (purple = hidden state, green = MLP/MoE, red = attention).
KIND_STYLE: dict[str, tuple[str, str]] = {
    "resid": ("Purples", "residual stream (hidden state)"),
    "hidden": ("Purples", "residual stream (hidden state)"),
    "block": ("Purples", "residual stream (hidden state)"),
    "mlp": ("Greens", "MLP / MoE output"),
    "moe": ("Greens", "MoE output"),
    "experts": ("Greens", "routed-expert output"),
    "shared": ("Greens", "shared-expert output"),
    "attn": ("Reds", "attention output"),
}

# Bar colours of experts by where the router chose them.
ROUTE_STYLE: dict[str, tuple[str, str]] = {
    "both": ("routed in both runs", "#7b3294"),
    "clean": ("routed in clean run only", "#1f77b4"),
    "noise": ("routed in corrupted run only", "#d62728"),
    "neither": ("not routed", "#b0b0b0"),
}

RESCUE = "normalised rescue"
RESCUE_AXIS = "normalised rescue (0 = corrupted, 1 = clean)"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values inside ``[lo, hi]``."""
    span = hi - lo
    if not (math.isfinite(span) and span > 0):
        return [lo]
    raw = span / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def diverging(
    z: np.ndarray,
    *,
    reference: float | None,
    other: float | None = None,
    metric: str = "metric",
    ref_name: str = "corrupted",
    other_name: str = "clean",
    marks: Sequence[tuple[float, str]] = (),
    bar_px: float = 300.0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Heatmap colour settings centred on ``reference`` that cover every finite value of ``z``
    (and ``other``): returns ``(heatmap kwargs, colorbar)``.  Blue points from ``reference``
    towards ``other`` (red away from it); the colour bar names the metric and marks both values.
    ``bar_px`` is the colour bar's length in pixels: a round tick closer than
    :data:`LABEL_GAP_PX` to a named value is left out, so no label sits on another."""
    finite = z[np.isfinite(z)]
    if reference is None:  # no meaningful centre: a sequential scale over the data
        heat: dict[str, Any] = dict(colorscale="Viridis")
        if finite.size and finite.max() > finite.min():
            heat.update(zmin=float(finite.min()), zmax=float(finite.max()))
        return heat, dict(title=dict(text=html_text(metric), side="right"))
    ref = float(reference)
    extent = [float(np.max(np.abs(finite - ref)))] if finite.size else []
    if other is not None and math.isfinite(float(other)):
        extent.append(abs(float(other) - ref))
    m = max(extent + [0.0])
    if m == 0:
        m = 1.0
    m *= 1.02  # a hair of headroom: the extreme cell is not exactly at the bar's end
    heat = dict(zmid=ref, zmin=ref - m, zmax=ref + m, colorscale=DIVERGING)
    # RdBu runs red (low) -> blue (high); make "towards other" blue
    heat["reversescale"] = bool(other is not None and float(other) < ref)
    named = [(ref, ref_name)]
    if other is not None:
        named.append((float(other), other_name))
    named += list(marks)
    gap = LABEL_GAP_PX * (2 * m) / max(float(bar_px), 1.0)  # value units per label gap
    keep = [t for t in nice_ticks(ref - m, ref + m) if all(abs(t - v) >= gap for v, _ in named)]
    vals = keep + [v for v, _ in named]
    text = [fmt(t) for t in keep] + [f"{fmt(v)} = {html.escape(n)}" for v, n in named]
    order = np.argsort(vals)
    colorbar = dict(
        title=dict(text=html_text(metric), side="right"),
        tickvals=[vals[i] for i in order],
        ticktext=[text[i] for i in order],
    )
    return heat, colorbar


def wrap_title(title: str, width_px: float = TITLE_WIDTH) -> tuple[str, int]:
    """Break the title's lines at spaces so that none is wider than ``width_px`` (about 8.5 px per
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


def title_margin(n_lines: int) -> int:
    """Top margin (px) for a title of ``n_lines`` lines."""
    return 40 + 22 * max(n_lines, 1)


def layout_spec(title: str | None, *, plot_height: int, margin: dict | None = None, **kw: Any) -> dict[str, Any]:
    """The house layout as plain data: the title wrapped at :data:`TITLE_WIDTH` and left-aligned,
    margins sized to it, a plotting area ``plot_height`` px high (the figure's height adds the
    margins) and no fixed width (``autosize``: the page decides; see the module docstring). The
    template (plotly's ``plotly_white``) is added by :func:`as_figure` / the report's page."""
    n_lines = 0
    if title:
        title, n_lines = wrap_title(title)
    margin = dict(margin or {})
    margin.setdefault("t", title_margin(n_lines) if title else 30)
    margin.setdefault("b", 60)
    margin.setdefault("r", 30)
    return dict(
        title=dict(text=title, x=0, xref="paper", xanchor="left") if title else None,
        autosize=True,
        height=int(plot_height + margin["t"] + margin["b"]),
        margin=margin,
        **kw,
    )


def base_layout(fig: go.Figure, title: str | None, *, plot_height: int, margin: dict | None = None,
                **kw: Any) -> go.Figure:
    """:func:`layout_spec` applied to ``fig``, with the white template."""
    fig.update_layout(template=TEMPLATE, **layout_spec(title, plot_height=plot_height, margin=margin, **kw))
    return fig


TEMPLATE = "plotly_white"


def as_figure(spec: dict[str, Any]) -> go.Figure:
    """A figure spec (plain ``{"data": [...], "layout": {...}}``, what the report embeds) as a
    validated plotly Figure with the house template: the public figure functions return this, so
    every spec the report draws is one plotly accepts."""
    fig = go.Figure(spec)
    fig.update_layout(template=TEMPLATE)
    return fig


def hline(y: float, **line: Any) -> dict[str, Any]:
    """A horizontal line across the plotting area at ``y`` as a layout shape (what ``fig.add_hline``
    draws, without its per-call cost: a report builds hundreds of figures)."""
    return dict(type="line", xref="x domain", x0=0, x1=1, yref="y", y0=y, y1=y, line=line, layer="below")


def vline(x: float, **line: Any) -> dict[str, Any]:
    """A vertical line across the plotting area at ``x`` (see :func:`hline`)."""
    return dict(type="line", yref="y domain", y0=0, y1=1, xref="x", x0=x, x1=x, line=line, layer="below")


def expert_ticks(n: int) -> dict[str, Any]:
    """Category axis of ``n`` experts: every label up to 64, then every k-th (hover has all)."""
    return {} if n <= 64 else dict(nticks=min(n, 64))


def heatmap_size(n_rows: int, n_cols: int, *, value_chars: int = 5) -> tuple[int, int, bool]:
    """``(plot-area height px, px per row, print values in cells)`` for ``n_rows x n_cols`` cells.

    Rows get :data:`ROW_PX` up to 12 rows, then the plot area grows more slowly (``360 px`` at
    12 rows to ``720 px`` at 48) and never gives a row under :data:`MIN_ROW_PX`. Values are printed
    when ``value_chars`` characters fit a cell's width at :data:`NOMINAL_PLOT_WIDTH` and the row is
    at least 16 px high."""
    n_rows, n_cols = max(int(n_rows), 1), max(int(n_cols), 1)
    if n_rows <= 12:
        row = ROW_PX
    else:
        row = max(MIN_ROW_PX, int((360 + 10 * (n_rows - 12)) / n_rows))
    col = NOMINAL_PLOT_WIDTH / n_cols
    show = col >= CHAR_PX * value_chars + 6 and row >= 16
    return row * n_rows, row, show


def cell_text(show: bool) -> dict[str, Any]:
    """Heatmap settings that print each cell's value (three significant digits) when ``show``."""
    if not show:
        return {}
    return dict(texttemplate="%{z:" + HOVER + "}", textfont=dict(size=11))
