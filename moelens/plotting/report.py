"""One self-contained, offline HTML report per run (``moelens demo``, ``trace``, ``audit``).

A :class:`Report` collects a summary table, figures (each with a short "how to read this"),
groups of figures behind a selector (e.g. one per traced fact) and the run's settings, and writes
a single HTML file with plotly.js included once (about 4.8 MB, whatever the number of figures).
The file needs no network. Every figure is drawn at the page's width; a figure behind a selector
is drawn when its option is first shown (so hundreds of cases open at once). Numbers in tables and
settings have three significant digits (:func:`moelens.formatting.format_number`).
``write(..., image_format="png")`` also writes every figure as a static image next to it (PNG, SVG
or PDF through kaleido, one browser for all of them; see :func:`write_images`).

>>> rep = Report("My run")
>>> rep.add_table(df, caption="summary")
>>> rep.add_figure(fig, "Blue cells: restoring helps.")
>>> rep.write("out/report.html")
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from moelens.formatting import format_number, format_settings_value

IMAGE_FORMATS = ("png", "svg", "pdf")


@dataclass
class _Figure:
    fig: Any  # a plotly Figure, or a figure spec dict (see Report.figure)
    how_to_read: str
    name: str

    @property
    def figure(self):
        """The item as a validated plotly Figure (a spec dict converted, with the house template)."""
        if isinstance(self.fig, dict):
            from moelens.plotting.style import as_figure

            return as_figure(self.fig)
        return self.fig


@dataclass
class _Group:
    label: str
    options: list  # [(option name, [items])]


@dataclass
class Report:
    """Builder of a single-file HTML report. Items appear in the order they are added."""

    title: str
    subtitle: str = ""
    run_seconds: Optional[float] = None  # wall time of the run, named under the title
    items: list = field(default_factory=list)
    _names: set = field(default_factory=set)

    # ------------------------------------------------------------------ building
    def _name(self, name: Optional[str]) -> str:
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", name or f"figure_{len(self._names) + 1}").strip("_") or "figure"
        out, i = base, 2
        while out in self._names:
            out, i = f"{base}_{i}", i + 1
        self._names.add(out)
        return out

    def figure(self, fig, how_to_read: str, name: Optional[str] = None) -> _Figure:
        """A figure item (for :meth:`add_selector`); ``name`` names its static image file. ``fig``
        is a plotly Figure or a figure spec (``{"data": [...], "layout": {...}}`` from a ``*_spec``
        function of :mod:`moelens.plotting`: embedded as it is, drawn with the page's template)."""
        import plotly.graph_objects as go

        if isinstance(fig, dict) and set(fig) <= {"data", "layout"} and "data" in fig:
            return _Figure(fig, how_to_read, self._name(name))
        if not isinstance(fig, go.Figure):
            raise TypeError(f"fig must be a plotly Figure or a figure spec dict, got {type(fig).__name__}")
        return _Figure(fig, how_to_read, self._name(name))

    def add_figure(self, fig, how_to_read: str, name: Optional[str] = None) -> "Report":
        self.items.append(self.figure(fig, how_to_read, name))
        return self

    def add_heading(self, text: str) -> "Report":
        self.items.append(("h2", text))
        return self

    def add_text(self, text: str) -> "Report":
        """A paragraph of plain text (escaped)."""
        self.items.append(("p", text))
        return self

    def add_table(self, df, caption: str = "", formatters: Optional[dict] = None, collapsed: bool = False) -> "Report":
        """A pandas DataFrame (or list of dicts) as an HTML table; ``collapsed``: behind a closed
        ``<details>`` whose summary is the caption (long tables)."""
        import pandas as pd

        if not isinstance(df, pd.DataFrame):
            df = pd.DataFrame(df)
        self.items.append(("table", df, caption, formatters or {}, collapsed))
        return self

    def add_settings(self, settings: dict, caption: str = "Settings") -> "Report":
        self.items.append(("settings", dict(settings), caption))
        return self

    def add_selector(self, label: str, options: Sequence[tuple[str, Sequence]]) -> "Report":
        """Groups of items behind a drop-down (one shown at a time): ``options`` is a list of
        ``(option name, [figure items made by figure(), strings or DataFrames])``."""
        options = [(str(n), list(v)) for n, v in options]
        if not options:
            raise ValueError("add_selector needs at least one option")
        self.items.append(_Group(label, options))
        return self

    def figures(self) -> list[_Figure]:
        out = []
        for it in self.items:
            if isinstance(it, _Figure):
                out.append(it)
            elif isinstance(it, _Group):
                out += [x for _, v in it.options for x in v if isinstance(x, _Figure)]
        return out

    # ------------------------------------------------------------------ rendering
    def _render_item(self, it, counter: list) -> str:
        if isinstance(it, _Figure):
            counter[0] += 1
            spec = _spec_json(it.fig).replace("</", "<\\/")
            fid = f"fig{counter[0]}"
            return (f'<figure class="ml-figure"><div class="ml-plot" id="{fid}" data-name="{it.name}"></div>'
                    f'<script type="application/json" id="{fid}-spec">{spec}</script>'
                    f'<figcaption><b>How to read this.</b> {html.escape(it.how_to_read)}</figcaption></figure>')
        if isinstance(it, str):
            return f"<p>{html.escape(it)}</p>"
        if hasattr(it, "to_html") and hasattr(it, "columns"):  # a DataFrame inside a selector panel
            return self._render_item(("table", it, "", {}, False), counter)
        if isinstance(it, _Group):
            gid = f"group{counter[0]}-{id(it)}"
            opts = "".join(f'<option value="{i}">{html.escape(n)}</option>' for i, (n, _) in enumerate(it.options))
            panels = "".join(
                f'<div class="ml-panel" data-group="{gid}" data-index="{i}"{"" if i == 0 else " hidden"}>'
                + "".join(self._render_item(x, counter) for x in v) + "</div>"
                for i, (_, v) in enumerate(it.options)
            )
            return (f'<div class="ml-selector"><label>{html.escape(it.label)} '
                    f'<select data-group="{gid}" onchange="mlSelect(this)">{opts}</select></label> '
                    f'<span class="ml-count">({len(it.options)} in all)</span></div>{panels}')
        kind = it[0]
        if kind == "h2":
            return f"<h2>{html.escape(it[1])}</h2>"
        if kind == "p":
            return f"<p>{html.escape(it[1])}</p>"
        if kind == "table":
            _, df, caption, formatters, collapsed = it
            table = _table_html(df, formatters)
            if collapsed:
                return f"<details><summary>{html.escape(caption or 'table')}</summary>{table}</details>"
            cap = f"<p class='ml-caption'>{html.escape(caption)}</p>" if caption else ""
            return cap + table
        if kind == "settings":
            _, settings, caption = it
            rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(format_settings_value(v))}</td></tr>"
                           for k, v in settings.items())
            return (f"<details open><summary>{html.escape(caption)}</summary><table class='ml-table ml-settings'>{rows}"
                    f"</table></details>")
        raise TypeError(f"unknown report item {it!r}")

    def to_html(self) -> str:
        import plotly.io as pio
        from plotly.offline import get_plotlyjs

        from moelens.plotting.style import TEMPLATE

        counter = [0]
        body = "".join(self._render_item(it, counter) for it in self.items)
        body += ('<script type="application/json" id="ml-template">'
                 + json.dumps(pio.templates[TEMPLATE].to_plotly_json()).replace("</", "<\\/") + "</script>")
        sub = f"<p class='ml-sub'>{html.escape(self.subtitle)}</p>" if self.subtitle else ""
        if self.run_seconds is not None:
            sub += f"<p class='ml-sub ml-time'>Run time: {html.escape(format_duration(self.run_seconds))}.</p>"
        return _TEMPLATE.format(title=html.escape(self.title), sub=sub, body=body,
                                plotlyjs=get_plotlyjs(), script=_SCRIPT, style=_STYLE)

    def write(self, path, image_format: Optional[str] = None, image_scale: float = 2.0) -> Path:
        """Write the report (parent directories created); with ``image_format`` (png/svg/pdf)
        also every figure as ``<figure name>.<format>`` in the same directory. Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(), encoding="utf-8")
        if image_format:
            from moelens.plotting.style import as_figure

            figs = self.figures()
            write_images([as_figure(f.fig) if isinstance(f.fig, dict) else f.fig for f in figs], [path.parent / f"{f.name}.{image_format}" for f in figs],
                         scale=image_scale)
        return path


def _is_number(v) -> bool:
    import numbers

    return isinstance(v, numbers.Number) and not isinstance(v, bool)


_NUMBER_TEXT = re.compile(r"^(?:[<>]=?\s*)?[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?$|^n/a$")


def _numeric_cell(v) -> bool:
    """A number, or a number already formatted as text (``"< 1e-4"``, ``"0.032"``: p-values)."""
    return _is_number(v) or v is None or (isinstance(v, str) and bool(_NUMBER_TEXT.match(v.strip())))


def _table_html(df, formatters: Optional[dict] = None) -> str:
    """A DataFrame as an HTML table: numbers to three significant digits
    (:func:`~moelens.formatting.format_number`), NaN as n/a; numeric columns (also pre-formatted
    p-values) right-aligned, text left-aligned. ``formatters`` maps a column to its own ``value -> str``."""
    formatters = formatters or {}
    cols = list(df.columns)
    numeric = {c: all(_numeric_cell(v) for v in df[c].tolist()) for c in cols}
    head = "".join(f'<th class="{"ml-num" if numeric[c] else "ml-text"}">{html.escape(str(c))}</th>' for c in cols)
    rows = []
    for rec in df.itertuples(index=False, name=None):
        cells = []
        for c, v in zip(cols, rec):
            text = formatters[c](v) if c in formatters else (format_number(v) if _is_number(v) or v is None
                                                              else str(v))
            cells.append(f'<td class="{"ml-num" if numeric[c] else "ml-text"}">{html.escape(text)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="ml-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _spec_json(fig) -> str:
    """A figure's JSON: a plotly Figure's own, or a spec dict's (numpy arrays as lists)."""
    if isinstance(fig, dict):
        from plotly.io.json import to_json_plotly

        return to_json_plotly(fig)
    return fig.to_json()


def chromium_path() -> Optional[str]:
    """A Chrome/Chromium executable for kaleido: ``$BROWSER_PATH``, else the first of
    chromium / chromium-browser / google-chrome on PATH (Debian: ``apt-get install chromium``)."""
    env = os.environ.get("BROWSER_PATH")
    if env and Path(env).exists():
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class StaticExportError(RuntimeError):
    """Static image export is not possible here (kaleido or a Chromium browser missing)."""


def format_duration(seconds: float) -> str:
    """``"13 s"``, ``"2 min 05 s"``, ``"1 h 02 min"``."""
    s = max(0.0, float(seconds))
    if s < 60:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def announce_images(image_format: Optional[str], n_figures: Optional[int] = None) -> None:
    """One line on stderr before static images are written (they take seconds: kaleido starts a
    headless Chromium, then draws every figure), so a slow step is never silent."""
    if not image_format:
        return
    import sys

    what = f"{n_figures} figures" if n_figures is not None else "every figure"
    print(f"moelens: writing {what} as {image_format.upper()} too (kaleido + Chromium: a few seconds more)",
          file=sys.stderr)


def _export_figure(fig):
    """The figure as a static image draws it: at :data:`~moelens.plotting.style.EXPORT_WIDTH` px
    when it has no width of its own (figures take the page's width in a report)."""
    from moelens.plotting.style import EXPORT_WIDTH

    if fig.layout.width is None:
        fig = type(fig)(fig)  # a copy: the report's figure keeps the page's width
        # kaleido draws an autosized figure at its own default size (700 x 500): fix both
        fig.update_layout(width=EXPORT_WIDTH, autosize=False)
    return fig


def write_image(fig, path, scale: float = 2.0) -> Path:
    """``fig.write_image(path)`` (format from the suffix: .png, .svg, .pdf) through kaleido,
    pointing kaleido at the system Chromium (:func:`chromium_path`) when ``$BROWSER_PATH`` is unset;
    a figure without a width is drawn :data:`~moelens.plotting.style.EXPORT_WIDTH` px wide.
    Raises :class:`StaticExportError` saying what to install when it cannot work."""
    return write_images([fig], [path], scale=scale)[0]


def write_images(figs: Sequence, paths: Sequence, scale: float = 2.0) -> list[Path]:
    """:func:`write_image` for many figures at once: one kaleido browser draws them all (starting
    one per figure made a PDF demo report 11 times slower than the HTML alone)."""
    paths = [Path(p) for p in paths]
    if len(paths) != len(figs):
        raise ValueError(f"{len(figs)} figures but {len(paths)} paths")
    for path in paths:
        if path.suffix.lstrip(".").lower() not in IMAGE_FORMATS:
            raise ValueError(f"image format {path.suffix.lstrip('.')!r}: use one of {', '.join(IMAGE_FORMATS)}")
    if not paths:
        return []
    try:
        import kaleido  # noqa: F401
    except ImportError:
        raise StaticExportError("static export needs kaleido: pip install kaleido (or moelens[export])") from None
    browser = chromium_path()
    if browser is None:
        raise StaticExportError("static export needs Chrome or Chromium: apt-get install chromium, "
                                "or set BROWSER_PATH to a Chrome executable")
    os.environ.setdefault("BROWSER_PATH", browser)
    import plotly.io as pio

    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    figs = [_export_figure(f) for f in figs]
    # explicit sizes: write_images would draw every figure at its default 700 x 500 otherwise
    pio.write_images(figs, [str(p) for p in paths], scale=scale, width=[int(f.layout.width) for f in figs],
                     height=[int(f.layout.height or 500) for f in figs])
    return paths


def save_html(fig, path) -> Path:
    """Write ``fig`` as a standalone HTML file with plotly.js embedded, drawn at the window's width.

    The file works offline (no CDN script).  Parent directories are created.
    Returns the path written.
    """
    import plotly.graph_objects as go

    if not isinstance(fig, go.Figure):
        raise TypeError(f"fig must be a plotly Figure, got {type(fig).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path, include_plotlyjs=True, full_html=True, include_mathjax=False,
                   config={"responsive": True, "displaylogo": False})
    return path


_STYLE = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1500px;
padding:0 24px;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:4px} h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
.ml-sub{color:#555;margin-top:0}
.ml-table{border-collapse:collapse;font-size:0.9em;margin:8px 0}
.ml-table th,.ml-table td{border-bottom:1px solid #e3e3e3;padding:3px 10px;text-align:left;vertical-align:top}
.ml-table th{background:#f6f6f6} .ml-table .ml-num{text-align:right;font-variant-numeric:tabular-nums}
.ml-settings td{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:0.95em}
.ml-figure{margin:16px 0 28px 0;width:100%} .ml-plot{width:100%}
.ml-figure figcaption{color:#333;font-size:0.92em;max-width:75em}
.ml-selector{margin:12px 0;padding:8px;background:#f4f7fb;border:1px solid #d8e2ef;border-radius:4px}
.ml-caption{font-weight:600;margin-bottom:2px} .ml-count{color:#666} details summary{cursor:pointer;font-weight:600}
"""

_SCRIPT = """
// Figures are drawn at the page's width (responsive), and only once they are visible: a hidden
// panel has no width, and a report of hundreds of cases opens without drawing all of them.
function mlDraw(el){
  if(el.dataset.drawn || el.offsetParent === null) return;
  var spec = JSON.parse(document.getElementById(el.id + '-spec').textContent);
  spec.layout = spec.layout || {};
  if(!spec.layout.template) spec.layout.template = mlTemplate();
  Plotly.newPlot(el, spec.data, spec.layout || {}, {displaylogo:false, responsive:true, displayModeBar:'hover'});
  el.dataset.drawn = '1';
}
var mlTemplateCache = null;
function mlTemplate(){
  if(!mlTemplateCache) mlTemplateCache = JSON.parse(document.getElementById('ml-template').textContent);
  return mlTemplateCache;
}
function mlSelect(sel){
  document.querySelectorAll('.ml-panel[data-group="' + sel.dataset.group + '"]').forEach(function(p){
    p.hidden = (p.dataset.index !== sel.value);
    if(!p.hidden) p.querySelectorAll('.ml-plot').forEach(mlDraw);
  });
}
window.addEventListener('load', function(){
  document.querySelectorAll('.ml-plot').forEach(mlDraw);
});
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{style}</style>
<script type="text/javascript">{plotlyjs}</script>
<script type="text/javascript">{script}</script>
</head><body>
<h1>{title}</h1>{sub}
{body}
<p class="ml-sub">Written by moelens. Interactive figures: hover for values, drag to zoom, double-click to reset;
the camera icon saves a PNG.</p>
</body></html>
"""
