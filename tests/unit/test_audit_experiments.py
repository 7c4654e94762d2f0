"""`moelens audit --experiments progressive,redistribution`: the paper's further experiments from
the command line, under both protocols; the files equal the Python API's results on the same
inputs; a rerun with the same settings loads instead of recomputing; other settings are refused
with one line before anything runs."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import moelens
from moelens import HookedMoETransformer
from moelens.audit import audit_main, paper
from moelens.testing import toy_tokenizer

BUNDLED = Path(moelens.__file__).parent / "bundled" / "moelens-tiny-facts"


def _rows(n=12, seed=0):
    rng = np.random.default_rng(seed)
    out = [" w1 w2 short \n"]
    for _ in range(n):
        out.append(" " + " ".join(f"w{int(w)}" for w in rng.integers(0, 250, size=int(rng.integers(20, 40)))) + " \n")
    return out


@pytest.fixture(scope="module")
def olmoe(tiny_dirs, tmp_path_factory):
    directory, _ = tiny_dirs("olmoe")
    toy_tokenizer(256).save_pretrained(directory)
    corpus = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in _rows()))
    model = HookedMoETransformer.from_pretrained(directory)
    model.tokenizer = toy_tokenizer(256)
    return directory, corpus, model


EXP = ["--experiments", "progressive,redistribution", "--progressive-positions", "3", "--progressive-min-context", "4",
       "--redistribution-texts", "4", "--experiment-min-chars", "60", "--experiment-max-length", "48",
       "--progressive-k-max", "4"]


def _paper_args(directory, corpus, out):
    return ["--protocol", "paper", "--model", str(directory), "--corpus", str(corpus), "--layers", "1", "--out", str(out),
            "--n-tests", "3", "--no-control", "--first-n", "4", "--no-progress", *EXP]


def _same_summary(got, summary):
    """CSV vs API (the API's cliff is None for a layer without one, the CSV's NaN)."""
    summary = summary.assign(cliff=pd.to_numeric(summary["cliff"]).astype(float))
    pd.testing.assert_frame_equal(got.drop(columns="cliff_threshold"), summary, check_dtype=False, rtol=1e-6)


def _boom(*a, **k):
    raise AssertionError("recomputed although the results were on disk with the same settings")


def test_paper_protocol_experiments_equal_the_api_resume_and_refuse(olmoe, tmp_path, capsys, monkeypatch):
    directory, corpus, model = olmoe
    out = tmp_path / "run"
    assert audit_main(_paper_args(directory, corpus, out)) == 0
    printed = capsys.readouterr().out
    assert "progressive ablation" in printed and "cliff" in printed and "rw_gap" in printed
    assert "computed layers 1" in printed
    # the files equal the Python API on the same rows, layers and settings (seed 42: the paper's)
    rows = paper.load_rows(str(corpus))
    positions = paper.progressive_positions(model, rows, n_positions=3, seed=42, min_chars=60, max_length=48,
                                            min_context=4)
    summary, steps = paper.progressive_ablation(model, positions, [1], k_max=4)
    got = pd.read_csv(out / "progressive_summary.csv")
    assert len(got) == 4 and (got["cliff_threshold"] == 0.1).all()
    _same_summary(got, summary)
    pd.testing.assert_frame_equal(pd.read_csv(out / "progressive_steps.csv"), steps, check_dtype=False, rtol=1e-6)
    frame, corr = paper.redistribution(model, rows, 1, max_length=48, min_chars=60, n_texts=4)
    experts = pd.read_csv(out / "redistribution_experts.csv")
    pd.testing.assert_frame_equal(experts.drop(columns="layer"), frame, check_dtype=False, rtol=1e-6)
    cr = pd.read_csv(out / "redistribution_correlations.csv").set_index("pair")
    for pair, c in corr.items():
        assert cr.loc[pair, "rho"] == pytest.approx(c["rho"], rel=1e-6, nan_ok=True)
        assert cr.loc[pair, "p"] == pytest.approx(c["p"], rel=1e-6, nan_ok=True)
    st = json.loads((out / "progressive_settings.json").read_text())
    fp = st["fingerprint"]
    assert fp["n_positions"] == 3 and fp["seed"] == 42 and fp["k_max"] == 4 and fp["layers"] == [1]
    assert fp["scope"] == "sequence" and fp["semantics"] == "zero" and st["info"]["protocol"] == "paper"
    report = (out / "report.html").read_text()
    assert "Progressive ablation" in report and "Redistribution" in report and "Per-token ablation" in report

    # rerun, same settings and another cliff (analysis only): nothing recomputed, the cliff recomputed
    monkeypatch.setattr(paper, "progressive_ablation", _boom)
    monkeypatch.setattr(paper, "redistribution", _boom)
    assert audit_main(_paper_args(directory, corpus, out) + ["--cliff", "1e9"]) == 0
    printed = capsys.readouterr().out
    assert "loaded layers 1 (finished before with the same settings)" in printed and "computed layers" not in printed
    again = pd.read_csv(out / "progressive_summary.csv")
    assert (again["cliff_threshold"] == 1e9).all() and again["cliff"].isna().all()
    pd.testing.assert_frame_equal(again[["mean", "p95"]], got[["mean", "p95"]])

    # other settings: refused in one line, naming the field, before the audit or the experiments run
    monkeypatch.setattr(paper, "run_paper_protocol", _boom)
    args = _paper_args(directory, corpus, out)
    args[args.index("--progressive-positions") + 1] = "2"
    assert audit_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "n_positions: stored 3, now 2" in err and "progressive" in err


def test_result_files_without_settings_are_not_reused(olmoe, tmp_path, capsys):
    directory, corpus, _ = olmoe
    out = tmp_path / "run"
    out.mkdir()
    (out / "redistribution_layer_1.json").write_text("{}")
    assert audit_main(_paper_args(directory, corpus, out)) == 2
    err = capsys.readouterr().err
    assert "redistribution_layer_1.json" in err and "redistribution_settings.json" in err


@pytest.mark.parametrize("extra, message", [
    (["--experiments", "progresive"], "unknown experiment 'progresive'"),
    (["--progressive-k-max", "9"], "between 1 and the model's top_k (4)"),
    (["--experiment-min-chars", "100000"], "no corpus row is longer than 100000"),
    (["--progressive-min-context", "1000"], "lower --progressive-min-context"),
    (["--redistribution-texts", "0"], "--redistribution-texts must be at least 1"),
])
def test_bad_experiment_settings_are_one_line_errors(olmoe, tmp_path, capsys, extra, message):
    directory, corpus, _ = olmoe
    args = _paper_args(directory, corpus, tmp_path / "o")
    for i in range(0, len(extra), 2):
        args[args.index(extra[i]) + 1] = extra[i + 1]
    assert audit_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o" / "summary.csv").exists()


def test_experiments_do_not_combine_with_pool(tmp_path, capsys):
    assert audit_main(["--pool", str(tmp_path), "--experiments", "all"]) == 2
    assert "--pool" in capsys.readouterr().err


@pytest.mark.skipif(not (BUNDLED / "config.json").is_file(), reason="bundled model moelens-tiny-facts not present")
def test_corrected_protocol_experiments_on_the_bundled_model(tmp_path, capsys, monkeypatch):
    """The corrected protocol: the experiments use the audit's corpus, layers, seed and removal
    (here position-local, route-around)."""
    from moelens.audit.corpus import load_corpus
    from moelens.audit.run import _default_corpus

    out = tmp_path / "run"
    args = ["--model", "moelens-tiny-facts", "--out", str(out), "--layers", "2", "--n-positions", "1",
            "--max-tokens", "120", "--no-progress", "--semantics", "route_around",
            "--experiments", "all", "--progressive-positions", "4", "--progressive-min-context", "4",
            "--progressive-k-max", "2", "--redistribution-texts", "6", "--experiment-min-chars", "30"]
    assert audit_main(args) == 0
    assert "progressive ablation (4 positions, removal position/route_around)" in capsys.readouterr().out
    model = HookedMoETransformer.from_pretrained("moelens-tiny-facts")
    rows = load_corpus(list(_default_corpus(model)), tokenizer=model.tokenizer, max_tokens=120)
    positions = paper.progressive_positions(model, rows, n_positions=4, seed=0, min_chars=30, min_context=4)
    summary, _ = paper.progressive_ablation(model, positions, [2], k_max=2, scope="position", semantics="route_around")
    got = pd.read_csv(out / "progressive_summary.csv")
    _same_summary(got, summary)
    frame, _ = paper.redistribution(model, rows, 2, min_chars=30, n_texts=6)
    pd.testing.assert_frame_equal(pd.read_csv(out / "redistribution_experts.csv").drop(columns="layer"), frame,
                                  check_dtype=False, rtol=1e-6)
    assert "Redistribution" in (out / "report.html").read_text()
    # the audit and the experiments resume together; another audit seed is refused (it is the experiments' too)
    monkeypatch.setattr(paper, "progressive_ablation", _boom)
    assert audit_main(args) == 0
    assert "loaded layers 2" in capsys.readouterr().out
    assert audit_main(args + ["--seed", "3"]) == 2
    assert "seed: stored 0, now 3" in capsys.readouterr().err
