"""Unit tests for moelens.plotting (fast; no rendering, no network)."""

import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from moelens import plotting as P

TOKS = ["The", " Eiffel", " Tower", " is", " in", " Paris"]
SUBJ = (1, 2)


def _scores(n_layers=4, n_pos=6, seed=0):
    return np.random.default_rng(seed).random((n_layers, n_pos))


def _trace_y_values(trace):
    return np.asarray(trace.y, dtype=float)


# --------------------------------------------------------------------------- #
# restoration_heatmap
# --------------------------------------------------------------------------- #
def test_restoration_heatmap_data_and_labels():
    s = _scores()
    fig = P.restoration_heatmap(s, TOKS, subject_positions=SUBJ)
    assert isinstance(fig, go.Figure)
    h = fig.data[0]
    assert isinstance(h, go.Heatmap)
    np.testing.assert_allclose(np.asarray(h.z), s)
    assert h.transpose is True  # layers on x, positions on y
    assert list(h.x) == [0, 1, 2, 3]
    ticks = list(fig.layout.yaxis.ticktext)
    assert len(ticks) == len(TOKS)
    for i, (tok, lab) in enumerate(zip(TOKS, ticks)):
        assert lab.replace("<b>", "").startswith(f"{i}: ")
        assert tok in lab
        if i in SUBJ:
            assert lab.endswith("*</b>") and lab.startswith("<b>")
        else:
            assert "*" not in lab and "<b>" not in lab
    assert list(h.y) == ticks
    # hover mentions layer, position (token) and score
    for word in ("layer", "position", "score", "%{z"):
        assert word in h.hovertemplate
    # subject rows are marked in the tick labels only: no shape drawn over the axis and its labels
    assert len(fig.layout.shapes) == 0


def test_restoration_heatmap_torch_input():
    torch = pytest.importorskip("torch")
    t = torch.tensor(_scores(), dtype=torch.bfloat16)
    fig = P.restoration_heatmap(t, TOKS)
    np.testing.assert_allclose(np.asarray(fig.data[0].z), t.double().numpy())


def _bar_values(tick_vals):
    return [float(v) for v in tick_vals]


def test_restoration_heatmap_diverging_about_corrupted_never_clips():
    s = _scores()
    s[0, 0] = -0.6  # restoring hurts: below the corrupted value
    fig = P.restoration_heatmap(s, TOKS, clean=0.9, corrupted=0.05, kind="attn", metric="logit diff")
    h = fig.data[0]
    assert h.zmid == pytest.approx(0.05)
    # symmetric about corrupted and covering every cell (and clean): no clipping
    assert h.zmax - 0.05 == pytest.approx(0.05 - h.zmin)
    assert h.zmin <= s.min() and h.zmax >= s.max() and h.zmax >= 0.9
    assert not h.reversescale  # towards clean = blue end of RdBu
    assert h.colorbar.title.text == "logit diff"
    ticks = dict(zip(_bar_values(h.colorbar.tickvals), h.colorbar.ticktext))
    assert any("corrupted" in t and v == pytest.approx(0.05) for v, t in ticks.items())
    assert any("clean" in t and v == pytest.approx(0.9) for v, t in ticks.items())
    assert "clean" in fig.layout.title.text and "corrupted" in fig.layout.title.text
    assert "attention" in fig.layout.title.text
    # hover gives the normalised rescue of each cell
    np.testing.assert_allclose(np.asarray(h.customdata).T, (s - 0.05) / 0.85)

    # lower-is-better metric: still centred on corrupted, blue still towards clean
    fig = P.restoration_heatmap(s, TOKS, clean=0.05, corrupted=0.9)
    h = fig.data[0]
    assert h.zmid == pytest.approx(0.9) and h.zmin <= s.min() and h.zmax >= s.max()
    assert h.reversescale

    # custom title kept verbatim
    fig = P.restoration_heatmap(s, TOKS, title="my title")
    assert fig.layout.title.text == "my title"


@pytest.mark.parametrize("seed", range(5))
def test_no_figure_clips_its_data(seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(5, 7)) * rng.uniform(0.1, 10)
    clean, corrupted = rng.normal(size=2) * 3
    h = P.restoration_heatmap(z, [f"t{i}" for i in range(7)], clean=clean, corrupted=corrupted).data[0]
    assert h.zmin <= z.min() and h.zmax >= z.max() and h.zmin <= min(clean, corrupted) and h.zmax >= max(clean, corrupted)
    h = P.expert_rescue_heatmap(z, layers=list(range(5))).data[0]
    assert h.zmin <= z.min() and h.zmax >= z.max() and h.zmid == 0
    w = np.abs(z)
    h = P.routing_map(w, [f"t{i}" for i in range(5)]).data[0]
    assert h.zmin <= w.min() and h.zmax >= w.max()


def test_big_models_stay_legible():
    """48 layers x 128 experts: figures take the page's width and grow in height with the rows; the
    bar chart keeps the top experts."""
    from moelens.plotting.style import MIN_ROW_PX

    rng = np.random.default_rng(0)
    fig = P.expert_rescue_heatmap(rng.normal(size=(48, 128)), layers=list(range(48)))
    assert fig.layout.width is None and fig.layout.height >= 48 * MIN_ROW_PX
    fig = P.restoration_heatmap(rng.normal(size=(48, 30)), [f"t{i}" for i in range(30)], clean=1.0, corrupted=0.0)
    assert fig.layout.width is None and fig.layout.height >= 30 * 20
    s = rng.normal(size=128)
    fig = P.expert_rescue_bar(s)
    shown = [x for t in fig.data if isinstance(t, go.Bar) for x in t.x]
    assert len(shown) == 40 and "top 40 of 128" in fig.layout.title.text
    assert shown == [f"E{e}" for e in np.argsort(-s)[:40]]  # the best ones, in order


def test_restoration_heatmap_positions_subset():
    s = _scores(n_pos=3)
    fig = P.restoration_heatmap(s, TOKS, positions=[1, 2, 5], subject_positions=SUBJ,
                                layers=[10, 11, 12, 13])
    ticks = list(fig.layout.yaxis.ticktext)
    assert ticks[0] == "<b>1:  Eiffel*</b>"
    assert ticks[1] == "<b>2:  Tower*</b>"
    assert ticks[2] == "5:  Paris"
    assert list(fig.data[0].x) == [10, 11, 12, 13]


def test_restoration_heatmap_escapes_html_tokens():
    toks = ["<s>", "a\nb", "x"]
    fig = P.restoration_heatmap(np.zeros((2, 3)), toks)
    ticks = list(fig.layout.yaxis.ticktext)
    assert ticks[0] == "0: &lt;s&gt;"
    assert ticks[1] == "1: a\\nb"


def test_restoration_heatmap_validation():
    s = _scores()
    with pytest.raises(ValueError, match=r"str_tokens has length 5.*\(4, 6\)|\(4, 6\).*str_tokens has length 5"):
        P.restoration_heatmap(s, TOKS[:5])
    with pytest.raises(ValueError, match="scores must be 2-D.*shape \\(6,\\)"):
        P.restoration_heatmap(np.zeros(6), TOKS)
    with pytest.raises(ValueError, match="layers has length 3.*4 layers"):
        P.restoration_heatmap(s, TOKS, layers=[0, 1, 2])
    with pytest.raises(ValueError, match="positions has length 2"):
        P.restoration_heatmap(_scores(n_pos=3), TOKS, positions=[0, 1])
    with pytest.raises(ValueError, match="positions has indices \\[9\\]"):
        P.restoration_heatmap(_scores(n_pos=2), TOKS, positions=[0, 9])
    with pytest.raises(ValueError, match="subject_positions has indices \\[7\\]"):
        P.restoration_heatmap(s, TOKS, subject_positions=[7])
    with pytest.raises(TypeError, match="str_tokens"):
        P.restoration_heatmap(s, "The Eiffel")


# --------------------------------------------------------------------------- #
# expert_rescue_heatmap
# --------------------------------------------------------------------------- #
def test_expert_rescue_heatmap():
    s = np.array([[0.5, -1.0, 0.0], [2.0, 0.1, -0.3]])
    fig = P.expert_rescue_heatmap(s, layers=[3, 7])
    h = fig.data[0]
    np.testing.assert_allclose(np.asarray(h.z), s)
    assert list(h.y) == [3, 7]
    assert list(h.x) == [0, 1, 2]
    assert h.zmid == 0
    assert h.zmin <= -2.0 and h.zmax >= 2.0 and h.zmax == pytest.approx(-h.zmin)
    assert "rescue" in h.colorbar.title.text
    assert any("clean" in t for t in h.colorbar.ticktext) and any("corrupted" in t for t in h.colorbar.ticktext)
    for word in ("layer", "expert", "%{z"):
        assert word in h.hovertemplate

    fig = P.expert_rescue_heatmap(s, layers=[3, 7], experts=["e0", "e1", "e2"], title="T")
    assert list(fig.data[0].x) == ["e0", "e1", "e2"]
    assert fig.layout.title.text == "T"


def test_expert_rescue_heatmap_validation():
    s = np.zeros((2, 3))
    with pytest.raises(ValueError, match="layers has length 3"):
        P.expert_rescue_heatmap(s, layers=[0, 1, 2])
    with pytest.raises(ValueError, match="experts has length 2"):
        P.expert_rescue_heatmap(s, layers=[0, 1], experts=[0, 1])
    with pytest.raises(ValueError, match="scores must be 2-D"):
        P.expert_rescue_heatmap(np.zeros((2, 3, 4)), layers=[0, 1])
    with pytest.raises(ValueError, match="duplicate"):
        P.expert_rescue_heatmap(s, layers=[1, 1])
    # all-zero scores still build (a non-empty range about 0)
    fig = P.expert_rescue_heatmap(s, layers=[0, 1])
    assert fig.data[0].zmin < 0 < fig.data[0].zmax


# --------------------------------------------------------------------------- #
# expert_rescue_bar
# --------------------------------------------------------------------------- #
def _bars(fig):
    return [t for t in fig.data if isinstance(t, go.Bar)]


def test_expert_rescue_bar_groups():
    s = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    fig = P.expert_rescue_bar(s, clean_routed=[1, 2], noise_routed=[2, 3], layer=5,
                              baseline=0.25)
    by_name = {t.name: t for t in _bars(fig)}
    assert set(by_name) == {"routed in both runs", "routed in clean run only",
                            "routed in corrupted run only", "not routed"}
    assert list(by_name["routed in both runs"].x) == ["E2"]
    assert list(by_name["routed in clean run only"].x) == ["E1"]
    assert list(by_name["routed in corrupted run only"].x) == ["E3"]
    assert list(by_name["not routed"].x) == ["E5", "E4", "E0"]
    # one bar per expert, each with its score, on a categorical axis sorted by score
    xs = [x for t in _bars(fig) for x in t.x]
    ys = np.concatenate([_trace_y_values(t) for t in _bars(fig)])
    assert sorted(xs) == sorted(f"E{e}" for e in range(6)) and len(set(xs)) == 6
    np.testing.assert_allclose([ys[xs.index(f"E{e}")] for e in range(6)], s)
    assert fig.layout.xaxis.type == "category"
    assert list(fig.layout.xaxis.categoryarray) == [f"E{e}" for e in (5, 4, 3, 2, 1, 0)]
    colours = {t.marker.color for t in _bars(fig)}
    assert len(colours) == 4
    assert "layer 5" in fig.layout.title.text
    # reference lines are in the legend, not as labels that can collide with bars
    assert any(sh.y0 == pytest.approx(0.25) for sh in fig.layout.shapes)
    names = [t.name for t in fig.data if not isinstance(t, go.Bar)]
    assert names == ["0 = corrupted run", "1 = clean run", "whole layer restored (0.250)"]
    assert not fig.layout.annotations


def test_expert_trace_plot_shows_normalised_rescue():
    """ExpertTraceResult.plot draws (score - corrupted) / (clean - corrupted), not the raw contrast."""
    import torch

    from moelens.tracing.trace import ExpertTraceResult

    raw = torch.tensor([10.5, 11.7, 11.0, 10.9])
    r = ExpertTraceResult(clean=11.5, corrupted=10.7, case={"prompt": "p", "target_true": "a", "target_foil": "b"},
                          str_tokens=["p"], subject_positions=[0], settings={}, scores=raw, layer=2,
                          layer_score=11.1, clean_routed=[1], noise_routed=[2])
    fig = r.plot()
    xs = [x for t in _bars(fig) for x in t.x]
    ys = np.concatenate([_trace_y_values(t) for t in _bars(fig)])
    np.testing.assert_allclose([ys[xs.index(f"E{e}")] for e in range(4)], (raw.numpy() - 10.7) / 0.8, rtol=1e-6)
    assert any(sh.y0 == pytest.approx(0.5) for sh in fig.layout.shapes)  # the whole layer's rescue


def test_expert_rescue_bar_cis_and_highlight():
    s = np.array([0.1, 0.5, 0.3])
    fig = P.expert_rescue_bar(s, ci_low=s - 0.1, ci_high=s + 0.2, highlight=[1])
    (bar,) = _bars(fig)
    assert list(bar.x) == ["E1", "E2", "E0"]
    np.testing.assert_allclose(bar.error_y.array, [0.2, 0.2, 0.2])
    np.testing.assert_allclose(bar.error_y.arrayminus, [0.1, 0.1, 0.1])
    assert list(bar.marker.line.width)[0] > 0 and list(bar.marker.line.width)[1] == 0
    with pytest.raises(ValueError, match="together"):
        P.expert_rescue_bar(s, ci_low=s)


def test_expert_rescue_bar_masks_and_validation():
    s = np.arange(4.0)
    fig = P.expert_rescue_bar(s, clean_routed=np.array([True, False, False, True]))
    names = [t.name for t in _bars(fig)]
    assert names == ["routed in clean run only", "not routed"]
    with pytest.raises(ValueError, match="clean_routed has indices \\[4\\]"):
        P.expert_rescue_bar(s, clean_routed=[4])
    with pytest.raises(ValueError, match="noise_routed given as a boolean mask must have shape \\(4,\\)"):
        P.expert_rescue_bar(s, noise_routed=np.array([True, False]))
    with pytest.raises(ValueError, match="scores must be 1-D"):
        P.expert_rescue_bar(np.zeros((2, 2)))


# --------------------------------------------------------------------------- #
# routing_map
# --------------------------------------------------------------------------- #
def test_routing_map():
    w = np.zeros((6, 4))
    w[np.arange(6), np.arange(6) % 4] = 0.7
    w[np.arange(6), (np.arange(6) + 1) % 4] = 0.3
    fig = P.routing_map(w, TOKS, layer=2)
    h = fig.data[0]
    np.testing.assert_allclose(np.asarray(h.z), w)
    ticks = list(fig.layout.yaxis.ticktext)
    assert [t.split(": ", 1)[1] for t in ticks] == TOKS
    assert h.zmin == 0 and h.zmax >= w.max()
    assert "layer 2" in fig.layout.title.text
    assert "Tel Mor" in P.routing_map(w, TOKS, layer=2, prompt="Tel Mor plays").layout.title.text
    with pytest.raises(ValueError, match=r"weights has shape \(6, 4\).*str_tokens has length 5"):
        P.routing_map(w, TOKS[:5])
    with pytest.raises(ValueError, match="weights must be 2-D"):
        P.routing_map(w[0], TOKS)


# --------------------------------------------------------------------------- #
# coalition_curve
# --------------------------------------------------------------------------- #
def test_coalition_curve():
    fig = P.coalition_curve([1, 2, 3], [0.2, 0.5, 0.8], labels=["L3E1", "L3E7", "L5E0"],
                            target=0.75)
    tr = fig.data[0]
    assert list(tr.x) == [1, 2, 3]
    np.testing.assert_allclose(_trace_y_values(tr), [0.2, 0.5, 0.8])
    assert list(tr.customdata) == ["L3E1", "L3E7", "L5E0"]
    assert "customdata" in tr.hovertemplate
    assert any(sh.y0 == pytest.approx(0.75) for sh in fig.layout.shapes)
    assert list(tr.text) == ["L3E1", "L3E7", "L5E0"]  # added experts are visible without hovering
    # no target -> only the clean-run reference line
    assert [sh.y0 for sh in P.coalition_curve([1, 2], [0.1, 0.2]).layout.shapes] == [1.0]
    # the y range shows every point and reference line
    fig = P.coalition_curve([0, 1], [0.0, 1.4], target=0.8, target_label="target: 90%", layer_rescue=0.9)
    lo, hi = fig.layout.yaxis.range
    assert lo < 0 and hi > 1.4
    assert "target: 90%" in [t.name for t in fig.data]
    with pytest.raises(ValueError, match="sizes has shape \\(2,\\) but rescue has shape \\(3,\\)"):
        P.coalition_curve([1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="labels has length 1"):
        P.coalition_curve([1, 2], [0.1, 0.2], labels=["a"])


# --------------------------------------------------------------------------- #
# protocol_summary
# --------------------------------------------------------------------------- #
def test_protocol_summary():
    df = pd.DataFrame({
        "quantity": ["rescue", "specificity", "gap"],
        "estimate": [0.4, -0.1, 0.0],
        "ci_low": [0.3, -0.3, -0.05],
        "ci_high": [0.6, 0.05, 0.1],
        "p_value": [0.001, 0.2, 0.9],
    })
    fig = P.protocol_summary(df, title="Summary")
    tr = fig.data[0]
    np.testing.assert_allclose(np.asarray(tr.x), df["estimate"])
    np.testing.assert_allclose(np.asarray(tr.error_x.array), [0.2, 0.15, 0.1])
    np.testing.assert_allclose(np.asarray(tr.error_x.arrayminus), [0.1, 0.2, 0.05])
    assert list(fig.layout.yaxis.ticktext) == ["rescue", "specificity", "gap"]
    assert "%{hovertext}" in tr.hovertemplate and list(tr.hovertext)[0] == "p = 0.001"
    assert P.protocol_summary(df.assign(p_value=[1e-5, 0.2, 0.5])).data[0].hovertext[0] == "p < 1e-4"
    assert any(sh.x0 == 0 and sh.x1 == 0 for sh in fig.layout.shapes)  # zero line
    assert fig.layout.title.text == "Summary"

    # p_value optional
    fig = P.protocol_summary(df.drop(columns="p_value"))
    assert "hovertext" not in fig.data[0].hovertemplate


def test_protocol_summary_validation():
    with pytest.raises(ValueError, match="missing column.*ci_high"):
        P.protocol_summary(pd.DataFrame({"quantity": ["a"], "estimate": [1.0],
                                         "ci_low": [0.0]}))
    with pytest.raises(TypeError, match="DataFrame"):
        P.protocol_summary({"quantity": ["a"]})
    with pytest.raises(ValueError, match="no rows"):
        P.protocol_summary(pd.DataFrame(columns=["quantity", "estimate", "ci_low", "ci_high"]))


# --------------------------------------------------------------------------- #
# layer_curve
# --------------------------------------------------------------------------- #
def test_layer_curve():
    v = [0.1, 0.4, 0.2]
    fig = P.layer_curve(v, layers=[1, 3, 5])
    assert len(fig.data) == 1
    np.testing.assert_allclose(_trace_y_values(fig.data[0]), v)
    # one tick per layer, at the layers themselves (no 0.5, 1.5)
    assert list(fig.layout.xaxis.tickvals) == [1, 3, 5]
    assert "rescue" in fig.layout.yaxis.title.text

    fig = P.layer_curve(v, layers=[0, 1, 2], ci_low=[0.0, 0.3, 0.1], ci_high=[0.2, 0.5, 0.3])
    assert len(fig.data) == 3
    mean = fig.data[-1]
    assert mean.name == "mean"
    assert list(mean.x) == [0, 1, 2]
    np.testing.assert_allclose(_trace_y_values(mean), v)
    band = [t for t in fig.data if t.fill == "tonexty"]
    assert len(band) == 1
    np.testing.assert_allclose(_trace_y_values(band[0]), [0.0, 0.3, 0.1])

    with pytest.raises(ValueError, match="together"):
        P.layer_curve(v, layers=[0, 1, 2], ci_low=v)
    with pytest.raises(ValueError, match="ci_high has shape \\(2,\\) but values has shape \\(3,\\)"):
        P.layer_curve(v, layers=[0, 1, 2], ci_low=v, ci_high=[1, 2])
    with pytest.raises(ValueError, match="layers has length 2"):
        P.layer_curve(v, layers=[0, 1])


# --------------------------------------------------------------------------- #
# save_html
# --------------------------------------------------------------------------- #
def test_save_html_standalone_offline(tmp_path):
    fig = P.restoration_heatmap(_scores(), TOKS, subject_positions=SUBJ,
                                title="uniquetitle42")
    out = P.save_html(fig, tmp_path / "nested" / "dir" / "trace.html")
    assert out == tmp_path / "nested" / "dir" / "trace.html"
    assert out.is_file()
    text = out.read_text(encoding="utf-8")
    # plotly.js bundle embedded
    assert len(text) > 1_000_000
    assert "Plotly" in text and "newPlot" in text
    # figure's data present
    assert "uniquetitle42" in text
    assert "Eiffel" in text and "Tower" in text
    assert '"heatmap"' in text
    # no external script (CDN) reference
    assert not re.search(r"<script[^>]*\bsrc\s*=", text)
    assert "cdn.plot.ly/plotly" not in text


def test_save_html_rejects_non_figure(tmp_path):
    with pytest.raises(TypeError, match="plotly Figure"):
        P.save_html({"data": []}, tmp_path / "x.html")
