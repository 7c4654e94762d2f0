"""How reports and figures read: page-wide figures, heatmaps sized to their data (4 x 8 to 48 x 128)
with values in the cells where they fit, colour-bar labels that never sit on each other, nothing
drawn over tick labels, three significant digits everywhere, captions that state the greedy rule,
the run's wall time, and a report of hundreds of cases built in seconds. No browser needed
(tests/test_reports.py draws the reports in Chromium)."""

import json
import time

import numpy as np
import pandas as pd
import pytest

from moelens import plotting as P
from moelens.formatting import format_number, format_settings_value
from moelens.plotting import style
from moelens.plotting.report import Report, format_duration


@pytest.mark.parametrize("value, text", [
    (9.444, "9.44"), (-0.02994, "-0.0299"), (0.978, "0.978"), (1.52, "1.52"), (0.13251777738332748, "0.133"),
    (11.39, "11.4"), (1234.5, "1230"), (9.996, "10.0"), (0.0, "0"), (-0.0000001, "-1.00e-07"), (3, "3"),
    (float("nan"), "n/a"), (None, "n/a"), (float("inf"), "inf"), (np.float32(0.5), "0.500"), (True, "True"),
])
def test_three_significant_digits(value, text):
    assert format_number(value) == text


def test_settings_values_print_three_significant_digits():
    assert format_settings_value(0.13251777738332748) == "0.133"
    assert format_settings_value([0, 1.23456, "x"]) == "[0, 1.23, x]"
    assert format_settings_value({"a": 2.0 / 3}) == "{a: 0.667}"


COMMON = dict(case={"prompt": "Tel Mor plays the"}, str_tokens=["Tel", " Mor"], subject_positions=[0, 1], settings={})


def _figures():
    rng = np.random.default_rng(0)
    toks = [f"t{i}" for i in range(6)]
    import torch

    from moelens.tracing.trace import CoalitionResult

    coal = CoalitionResult(clean=2.0, corrupted=0.0, layer=1, layer_score=1.0, greedy=[3, 1],
                           curve=torch.tensor([0.5, 0.9]), sign=1, **COMMON)
    summary = pd.DataFrame({"metric": ["a", "b"], "layer": [1, 1], "cohens_d": [0.5, -0.2], "p_holm": [0.01, 0.5],
                            "n": [10, 10]})
    return {
        "restoration_heatmap": P.restoration_heatmap(rng.normal(size=(4, 6)), toks, subject_positions=[1, 2],
                                                     clean=2.0, corrupted=0.0),
        "expert_rescue_heatmap": P.expert_rescue_heatmap(rng.normal(size=(4, 8)), layers=list(range(4))),
        "expert_rescue_bar": P.expert_rescue_bar(rng.normal(size=8), clean_routed=[1], baseline=0.4),
        "routing_map": P.routing_map(np.abs(rng.normal(size=(6, 8))), toks),
        "coalition_curve": coal.plot(),
        "layer_curve": P.layer_curve(rng.normal(size=4), layers=[0, 1, 2, 3]),
        "protocol_summary": P.protocol_summary(pd.DataFrame({"quantity": ["x"], "estimate": [0.1], "ci_low": [0.0],
                                                             "ci_high": [0.2]})),
        "expert_attribution_heatmap": P.expert_attribution_heatmap(rng.normal(size=(4, 8))),
        "cohens_d_heatmap": P.cohens_d_heatmap(summary),
        "sweep_bar": P.sweep_bar([0.1, 0.3], ["a", "b"]),
        "generation_routing_map": P.generation_routing_map(torch.tensor([[[0, 1]], [[2, 1]]]),
                                                           torch.tensor([[[0.6, 0.4]], [[0.7, 0.3]]]), [1],
                                                           ["0: a", "1: b"], n_experts=4),
    }


@pytest.mark.parametrize("name", [
    "restoration_heatmap", "expert_rescue_heatmap", "expert_rescue_bar", "routing_map", "coalition_curve",
    "layer_curve", "protocol_summary", "expert_attribution_heatmap", "cohens_d_heatmap", "sweep_bar",
    "generation_routing_map"])
def test_every_figure_takes_the_page_width(name):
    """No figure fixes its width: the report draws it at the page's (and a static image at EXPORT_WIDTH)."""
    fig = _figures()[name]
    assert fig.layout.width is None and fig.layout.autosize is True, name
    assert fig.layout.height and fig.layout.height >= 200, name


def test_heatmaps_sized_to_their_data_with_values_where_they_fit():
    rng = np.random.default_rng(1)
    small = P.expert_rescue_heatmap(rng.normal(size=(4, 8)), layers=list(range(4)))
    big = P.expert_rescue_heatmap(rng.normal(size=(48, 128)), layers=list(range(48)))
    # 4 x 8: rows of ROW_PX, every value printed in its cell (three significant digits)
    assert small.data[0].texttemplate == "%{z:" + style.HOVER + "}" and style.HOVER == ".3g"
    m = small.layout.margin
    assert small.layout.height - m.t - m.b == 4 * style.ROW_PX
    # 48 x 128: no room for numbers in a cell (hover has them), rows at least MIN_ROW_PX high
    assert big.data[0].texttemplate is None
    assert big.layout.height - big.layout.margin.t - big.layout.margin.b >= 48 * style.MIN_ROW_PX
    # the plot grows with the rows, less than linearly past 12
    heights = [style.heatmap_size(n, 8)[0] for n in (4, 8, 12, 24, 48, 96)]
    assert heights == sorted(heights) and heights[-1] >= 96 * style.MIN_ROW_PX
    assert all(style.heatmap_size(n, 8)[1] >= style.MIN_ROW_PX for n in range(1, 200))
    # values print only if they fit a cell at a 1000 px page
    assert style.heatmap_size(4, 8)[2] and not style.heatmap_size(4, 64)[2]


def test_routing_map_prints_only_routed_weights():
    w = np.zeros((3, 4))
    w[0, 1], w[2, 3] = 0.25, 0.7517
    t = P.routing_map(w, ["a", "b", "c"]).data[0].text
    assert [list(r) for r in t] == [["", "0.250", "", ""], ["", "", "", ""], ["", "", "", "0.752"]]


def _label_px(fig):
    h = fig.data[0]
    m = fig.layout.margin
    plot_h = fig.layout.height - m.t - m.b
    return sorted((v - h.zmin) / (h.zmax - h.zmin) * plot_h for v in h.colorbar.tickvals)


def test_colour_bar_labels_never_overlap():
    """The demo's 'corrupted = 9.49' sat on the '10' tick; every two labels are now LABEL_GAP_PX apart."""
    z = np.linspace(8.0, 12.5, 40).reshape(4, 10)
    fig = P.restoration_heatmap(z, [f"t{i}" for i in range(10)], clean=11.39, corrupted=9.492)
    px = _label_px(fig)
    assert len(px) >= 3 and min(np.diff(px)) >= style.LABEL_GAP_PX
    text = list(fig.data[0].colorbar.ticktext)
    assert "9.49 = corrupted" in text and "11.4 = clean" in text
    assert all(not t[0].isdigit() or len(t.split(" ")[0].replace("-", "").replace(".", "")) <= 4 for t in text)


def test_nothing_drawn_over_the_tick_labels():
    fig = P.restoration_heatmap(np.zeros((3, 4)), ["a", " Jor", "b", "c"], subject_positions=[1], clean=1.0,
                                corrupted=0.0)
    assert not fig.layout.shapes  # the subject is marked in its tick label only
    assert "<b>1:  Jor*</b>" in list(fig.layout.yaxis.ticktext)
    for name, f in _figures().items():
        for shape in f.layout.shapes or ():
            # reference lines span the plotting area ("x domain"), never the paper margins with the labels
            assert shape.xref in ("x domain", "x") and shape.yref in ("y", "y domain"), name


def test_marks_do_not_cover_cell_values():
    """Where a heatmap prints its values, routing/verification marks sit off the number (attribution:
    at the cell's left edge) or in the text itself (expert DLA: "o 0.123")."""
    from moelens.analysis import expert_dla_heatmap

    v = np.zeros((2, 4), bool)
    v[1, 2] = True
    fig = P.expert_attribution_heatmap(np.full((2, 4), 0.5), clean_routed=[[1], [3]], verified=v)
    assert fig.data[0].texttemplate  # values printed
    assert [round(x % 1, 2) for t in fig.data[1:] for x in t.x] == [0.62, 0.62, 0.62]  # e - 0.38: left edge
    df = pd.DataFrame({"batch": 0, "position": 0, "layer": [0, 0, 1, 1], "expert": [0, 1, 0, 1],
                       "attribution": [0.5, -0.25, 0.125, 1.0], "routed": [True, False, False, True]})
    fig = expert_dla_heatmap(df)
    assert len(fig.data) == 1 and [list(r) for r in fig.data[0].text] == [["o 0.500", "-0.250"], ["0.125", "o 1.00"]]


def test_greedy_rule_is_stated():
    import torch

    from moelens.tracing.trace import CoalitionResult

    down = CoalitionResult(clean=2.0, corrupted=1.0, layer=3, layer_score=0.5, greedy=[5],
                           curve=torch.tensor([0.8]), sign=-1, **COMMON)
    assert "lowers the metric most" in down.rule
    title = down.plot().layout.title.text
    assert "lowers the metric most" in title and "helps most" not in title
    up = CoalitionResult(clean=2.0, corrupted=1.0, layer=3, layer_score=1.5, greedy=[5], curve=torch.tensor([1.4]),
                         sign=1, **COMMON)
    assert "raises the metric most" in up.rule and "raises the metric most" in up.plot().layout.title.text


@pytest.mark.parametrize("fn, spec_fn, kwargs", [
    (P.expert_rescue_bar, "expert_rescue_bar_spec",
     dict(scores=[0.1, 0.5, -0.2, 0.0], clean_routed=[1], noise_routed=[2], baseline=0.4, highlight=[1],
          ci_low=[0.0, 0.4, -0.3, 0.0], ci_high=[0.2, 0.6, 0.0, 0.1])),
    (P.layer_curve, "layer_curve_spec", dict(values=[0.1, 0.4, 0.2], layers=[0, 1, 2], ci_low=[0, 0.3, 0.1],
                                             ci_high=[0.2, 0.5, 0.3])),
])
def test_report_specs_are_the_figures(fn, spec_fn, kwargs):
    """The plain specs a report embeds per case are exactly the public figures' data (plotly validates them)."""
    import plotly.graph_objects as go

    from moelens.plotting import experts, tracing

    spec = getattr(experts if hasattr(experts, spec_fn) else tracing, spec_fn)(**kwargs)
    assert isinstance(spec, dict) and not any(isinstance(t, go.Figure) for t in spec["data"])
    fig = fn(**kwargs)
    direct = go.Figure(spec)  # raises on anything plotly.js would not understand
    direct.update_layout(template=style.TEMPLATE)
    assert direct.to_plotly_json() == fig.to_plotly_json()


def test_report_tables_settings_and_run_time():
    rep = Report("t", run_seconds=13.4)
    rep.add_table(pd.DataFrame({"clean": [9.444, 11.39], "rescue": [-0.02994, 1.5234]}))
    rep.add_settings({"sigma": 0.13251777738332748, "layers": [1, 2]})
    text = rep.to_html()
    for shown in ("9.44", "11.4", "-0.0299", "1.52", "<td>0.133</td>", "Run time: 13 s."):
        assert shown in text, shown
    for hidden in ("9.444", "0.02994", "0.1325"):
        assert hidden not in text, hidden
    assert format_duration(4.2) == "4.2 s" and format_duration(125) == "2 min 05 s"
    # text left, numbers (also p-values already formatted as text) right
    rep = Report("t")
    rep.add_table(pd.DataFrame({"case": ["Jor Nimdra -> Italy"], "p_value": ["< 1e-4"], "n": [8]}))
    text = rep.to_html()
    assert '<td class="ml-text">Jor Nimdra -&gt; Italy</td>' in text
    assert '<td class="ml-num">&lt; 1e-4</td>' in text and '<td class="ml-num">8</td>' in text


def test_hundreds_of_cases_build_in_seconds(tmp_path):
    """One figure spec per case, no plotly validation per figure: 400 cases build in a few seconds
    (plotly Figures took ~0.1 s each: 30 s for 150 cases)."""
    from test_protocol_bookkeeping import write_dir

    from moelens.tracing.protocol import merge
    from moelens.tracing.report import build_trace_report

    d = write_dir(tmp_path / "d", 400, 400, split_of=lambda k: "discovery",
                  layer_score=lambda i, l: (i % 7 + 1.0) * (l + 1) / 10,
                  expert_scores=lambda i: [i % 5 / 10, 1.0, 0.5, 0.0])
    s = merge(d)
    t = time.perf_counter()
    rep = build_trace_report(d, s)
    html_text = rep.to_html()
    elapsed = time.perf_counter() - t
    assert len([f for f in rep.figures() if f.name.startswith("case_")]) == 2 * 400
    assert elapsed < 8.0, f"{elapsed:.1f} s for 400 cases"
    assert html_text.count('class="ml-plot"') == len(rep.figures())


def test_summary_records_the_run_time(tmp_path):
    from test_protocol_bookkeeping import write_dir

    from moelens.tracing.protocol import merge

    d = write_dir(tmp_path / "d", 8, 8, split_of=lambda k: "discovery", layer_score=lambda i, l: (i + 1.0) / 10,
                  expert_scores=lambda i: [i / 10, 1.0, 0.5, 0.0], traced_layer=0)
    s = merge(d)
    s.run_seconds = 42.0
    s.write(d)
    assert json.loads((d / "summary.json").read_text())["run_seconds"] == 42.0
    assert merge(d).run_seconds == 42.0  # a merge keeps the run's own time
    assert "Run time: 42 s." in (d / "report.html").read_text()
