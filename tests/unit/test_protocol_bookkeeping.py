"""The protocol's bookkeeping and choices, on hand-written result files (no model run): the layer and
expert choices against a direct computation, NaN scores, the split after a changed --limit as the
report shows it, merge of a directory with missing cases, and the statistics against exact
enumeration."""

import itertools
import json
import warnings
from dataclasses import asdict

import numpy as np
import pytest

from moelens.tracing.fingerprint import settings_fingerprint
from moelens.tracing.protocol import FORMAT, ProtocolConfig, _compared, _split, merge
from moelens.tracing.report import build_trace_report
from moelens.tracing.stats import bootstrap_ci, sign_flip_test

N_EXPERTS = 4
LAYERS = [0, 1]


def settings(n_cases, **cfg):
    s = {"format": FORMAT, "model": "fake", "model_fingerprint": "f" * 16, "facts": "/facts.jsonl",
         "n_cases": n_cases, **asdict(ProtocolConfig(n_bootstrap=50, n_permutations=50, **cfg))}
    s["layers"] = LAYERS
    s.pop("screen"), s.pop("n_verify")
    return s


def write_dir(path, n_cases, n_lines, split_of, layer_score, expert_scores, traced_layer=1, **cfg):
    """A trace directory: ``n_lines`` screened and traced cases (keys "0", "1", ...), of which the
    selection is the first ``n_cases``; each line's stored split is ``split_of(key)``."""
    path.mkdir()
    s = settings(n_cases, **cfg)
    (path / "settings.json").write_text(json.dumps(s))
    run = settings_fingerprint(_compared(s))
    with open(path / "screen.jsonl", "w") as scr, open(path / "experts.jsonl", "w") as exp:
        for i in range(n_lines):
            key = str(i)
            clean, corrupted = 2.0, 0.0
            scr.write(json.dumps({"key": key, "index": i, "case_id": i, "split": split_of(key), "run": run,
                                  "clean": clean, "corrupted": corrupted, "kept": True,
                                  "layer_scores": {str(l): layer_score(i, l) for l in LAYERS}}) + "\n")
            exp.write(json.dumps({"key": key, "case_id": i, "split": split_of(key), "run": run, "clean": clean,
                                  "corrupted": corrupted, "layer": traced_layer, "layer_score": 1.0,
                                  "expert_scores": expert_scores(i), "clean_routed": [0, 1, 2],
                                  "noise_routed": [2, 3], "coalition_clean": 1.0, "coalition_union": 1.0}) + "\n")
    return path


def test_report_shows_the_summary_split_after_the_limit_changed(tmp_path):
    """screen.jsonl keeps the split each line had when written (an earlier --limit) and lines of
    cases no longer selected; the report's discovery figures must be the summary's discovery cases."""
    n_cases = 8
    current = _split([str(i) for i in range(n_cases)], 0.5, 0)
    d = write_dir(tmp_path / "d", n_cases, 12, split_of=lambda k: "discovery",  # stale: all discovery
                  layer_score=lambda i, l: (i + 1.0) * (l + 1) / 10, expert_scores=lambda i: [i / 10, 1.0, 0.5, 0.0])
    s = merge(d)
    assert s.splits == current  # the halves of the current selection, written to summary.json
    assert json.loads((d / "summary.json").read_text())["splits"] == current
    disc = [i for i in range(n_cases) if current[str(i)] == "discovery"]
    # the layer choice, computed directly: mean normalised rescue over the current discovery cases only
    direct = {str(l): np.mean([(i + 1.0) * (l + 1) / 10 / 2.0 for i in disc]) for l in LAYERS}
    assert s.layer_means == pytest.approx(direct) and s.layer == 1
    figs = {f.name: f.figure for f in build_trace_report(d, s).figures()}
    assert list(figs["layer_rescue"].data[-1].y) == pytest.approx([s.layer_means[str(l)] for l in LAYERS])
    bars = figs["expert_rescue"].data[0]
    by_expert = dict(zip(bars.x, bars.y))
    assert [by_expert[f"E{e}"] for e in range(N_EXPERTS)] == pytest.approx(s.expert_means)
    # one selector entry per traced case of the current selection, each labelled with its current half
    cases = [f for f in figs if f.startswith("case_") and f.endswith("_experts")]
    assert sorted(cases) == sorted(f"case_{i}_experts" for i in range(n_cases))
    titles = {f: figs[f].layout.title.text for f in cases}
    for i in range(n_cases):
        assert f"case {i} ({current[str(i)]})" in titles[f"case_{i}_experts"]


def test_a_nan_layer_or_expert_mean_is_never_chosen(tmp_path):
    """max() with a NaN key keeps the NaN if it comes first: layer 0 and expert 0 have NaN scores."""
    d = write_dir(tmp_path / "d", 8, 8, split_of=lambda k: "x",
                  layer_score=lambda i, l: float("nan") if l == 0 else 1.0,
                  expert_scores=lambda i: [float("nan"), 0.2, 0.8, 0.1], recurrence=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN
        s = merge(d)
    assert s.layer == 1
    assert s.expert == 2


def test_expert_choice_is_recurrence_first_then_mean_then_lowest_index(tmp_path):
    # expert 3 rescues most but is never clean-routed; 1 and 2 tie: the lower index wins
    d = write_dir(tmp_path / "d", 8, 8, split_of=lambda k: "x", layer_score=lambda i, l: 0.5 + l,
                  expert_scores=lambda i: [0.1, 0.6, 0.6, 1.8])
    assert merge(d).expert == 1


def test_merge_warns_about_cases_it_never_saw(tmp_path):
    d = write_dir(tmp_path / "d", 10, 8, split_of=lambda k: "x", layer_score=lambda i, l: 0.5 + l,
                  expert_scores=lambda i: [0.1, 0.6, 0.5, 0.0])
    with pytest.warns(UserWarning, match="2 of the 10 selected cases"):
        merge(d)


def _exact_sign_flip(v, alternative):
    v = np.asarray(v, float)
    null = np.array([np.mean(np.array(s) * v) for s in itertools.product([-1, 1], repeat=len(v))])
    obs = v.mean()
    return {"greater": np.mean(null >= obs - 1e-12), "less": np.mean(null <= obs + 1e-12),
            "two-sided": np.mean(np.abs(null) >= abs(obs) - 1e-12)}[alternative]


@pytest.mark.parametrize("values", [[0.3, -0.1, 0.7, 0.2, 0.0, 0.0, 1.1], [1.0, 1.0, 1.0], [0.0, 0.0], [2.0],
                                    [1.0, -1.0], [0.5, 0.5, -0.5]])
@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_sign_flip_matches_exact_enumeration(values, alternative):
    n = 20000
    p = sign_flip_test(values, n_permutations=n, seed=1, alternative=alternative)
    exact = _exact_sign_flip(values, alternative)
    # Monte Carlo p with the +1 correction: (1 + n * exact) / (1 + n) up to sampling error
    assert p == pytest.approx((1 + n * exact) / (1 + n), abs=4 * np.sqrt(exact * (1 - exact) / n) + 1e-9)


def test_bootstrap_matches_a_direct_percentile_bootstrap():
    v = np.random.default_rng(3).normal(0.2, 1.0, 15)
    rng = np.random.default_rng(0)
    means = v[rng.integers(0, v.size, size=(4000, v.size))].mean(axis=1)
    assert bootstrap_ci(v, n_resamples=4000, seed=0) == pytest.approx((v.mean(), *np.quantile(means, [0.025, 0.975])))


def test_summary_tests_are_one_sided_greater(tmp_path):
    """The documented p-value: sign-flip test of mean > 0, on the validation cases' normalised rescues."""
    scores = [0.4, -0.3, 0.9, -0.6, 0.7, -0.2, 0.5, -0.9]  # expert 1's rescue x 2 (clean - corrupted = 2)
    d = write_dir(tmp_path / "d", 8, 8, split_of=lambda k: "x", layer_score=lambda i, l: 0.5 + l,
                  expert_scores=lambda i: [0.0, scores[i], -5.0, -5.0])
    s = merge(d)
    assert s.expert == 1
    val = [scores[i] / 2.0 for i in range(8) if s.splits[str(i)] == "validation"]
    row = s.table.set_index("quantity").loc["expert rescue"]
    assert row["n"] == len(val) and row["estimate"] == pytest.approx(np.mean(val))
    greater = sign_flip_test(val, n_permutations=50, seed=0, alternative="greater")
    assert row["p_value"] == pytest.approx(greater)
    assert greater != sign_flip_test(val, n_permutations=50, seed=0, alternative="two-sided")
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(bootstrap_ci(val, n_resamples=50, seed=0)[1:])


def test_constant_or_single_values_get_no_ci_or_p(tmp_path):
    d = write_dir(tmp_path / "d", 8, 8, split_of=lambda k: "x", layer_score=lambda i, l: 0.5 + l,
                  expert_scores=lambda i: [0.0, 0.6, -5.0, -5.0])
    row = merge(d).table.set_index("quantity").loc["expert rescue"]
    assert row["estimate"] == pytest.approx(0.3) and row["n"] == 4
    assert np.isnan(row["ci_low"]) and np.isnan(row["ci_high"]) and np.isnan(row["p_value"])
