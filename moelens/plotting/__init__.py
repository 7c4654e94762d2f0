"""Plotly figures and HTML reports for moelens results: one module per result family.

- `moelens.plotting.style`: what every figure shares: input checks, colour scales, three-significant-digit
  numbers, sizing (page-wide figures, heatmaps sized to their data)
- `moelens.plotting.tracing`: `restoration_heatmap`, `layer_curve`, `protocol_summary`, `sweep_bar`
- `moelens.plotting.experts`: `expert_rescue_heatmap`, `expert_rescue_bar`
- `moelens.plotting.coalitions`: `coalition_curve`
- `moelens.plotting.routing`: `routing_map`, `generation_routing_map`
- `moelens.plotting.attribution`: `expert_attribution_heatmap`
- `moelens.plotting.audit`: `cohens_d_heatmap`, `progressive_ablation_curve`
- `moelens.plotting.analysis`: `expert_dla_heatmap`, `router_attribution_heatmap`
- `moelens.plotting.report`: `Report` (the one-file HTML report), `save_html`, `write_image`, `write_images`
- `moelens.plotting.trace_report` / `moelens.plotting.audit_report`: the reports of `moelens trace` /
  `moelens merge` and of `moelens audit`

Every figure function takes plain arrays (numpy arrays, torch tensors or nested lists) plus labels
and returns a :class:`plotly.graph_objects.Figure`. Nothing here calls ``fig.show()``: result
objects call these from their ``.plot()`` methods and the caller decides whether to show, save
(:func:`save_html`) or further edit the figure.

Conventions
-----------
* Token labels are ``"i: token"`` with ``i`` the absolute position in the prompt; subject tokens
  get a ``*`` suffix and a bold tick label.
* Heatmaps keep the input array untouched as ``fig.data[0].z`` (as float), so
  ``fig.data[0].z[i, j]`` is the score of row ``i``, column ``j`` of the input.
* Figures have no fixed width (they take the page's); heights follow the data
  (:mod:`moelens.plotting.style` states the rules).
* Inputs are validated eagerly; errors name the offending argument and shapes.
"""

from __future__ import annotations

from moelens.plotting.analysis import expert_dla_heatmap, router_attribution_heatmap
from moelens.plotting.attribution import expert_attribution_heatmap
from moelens.plotting.audit import cohens_d_heatmap, progressive_ablation_curve
from moelens.plotting.coalitions import coalition_curve
from moelens.plotting.experts import expert_rescue_bar, expert_rescue_heatmap
from moelens.plotting.report import Report, save_html, write_image
from moelens.plotting.routing import generation_routing_map, routing_map
from moelens.plotting.style import RESCUE, RESCUE_AXIS, format_token_labels
from moelens.plotting.tracing import layer_curve, protocol_summary, restoration_heatmap, sweep_bar

__all__ = [
    "restoration_heatmap",
    "expert_rescue_heatmap",
    "expert_rescue_bar",
    "routing_map",
    "generation_routing_map",
    "sweep_bar",
    "coalition_curve",
    "protocol_summary",
    "layer_curve",
    "expert_attribution_heatmap",
    "expert_dla_heatmap",
    "router_attribution_heatmap",
    "cohens_d_heatmap",
    "progressive_ablation_curve",
    "Report",
    "save_html",
    "write_image",
    "format_token_labels",
    "RESCUE",
    "RESCUE_AXIS",
]
