"""`moelens trace --screen attribution`: the dataset protocol with a first-order screen and exact verification."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import moelens
from moelens import HookedMoETransformer
from moelens.tracing import load_facts
from moelens.tracing.protocol import ProtocolConfig, run_protocol
from moelens.tracing.trace import prepare

DATA = Path(__file__).parent.parent / "data"
CFG = ProtocolConfig(min_clean=-1e9, min_drop=-1e9, n_samples=2, n_bootstrap=100, n_permutations=100,
                     screen="attribution", n_verify=3)


@pytest.fixture(scope="module")
def model(mixtral_tok_dir):
    return HookedMoETransformer.from_pretrained(mixtral_tok_dir)


def test_protocol_with_attribution_screen(model, tmp_path):
    cases = load_facts(DATA / "counterfact_sample.jsonl", limit=4)
    s = run_protocol(model, cases, tmp_path, CFG, progress=False)
    screen = [json.loads(l) for l in (tmp_path / "screen.jsonl").read_text().splitlines()]
    experts = {r["key"]: r for r in map(json.loads, (tmp_path / "experts.jsonl").read_text().splitlines())}
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["screen"] == "attribution" and settings["n_verify"] == 3
    rec = screen[0]
    setup = prepare(model, cases[0], seed=0, n_samples=2)  # the protocol's seed for case #0
    a = moelens.attribute_experts(model, setup)
    assert rec["layer_scores_method"] == "attribution"
    for l in model.cfg.moe_layers:
        assert rec["layer_scores"][str(l)] == pytest.approx(float(a.layer_scores[l]), abs=1e-4)
    e = experts[rec["key"]]
    exact = moelens.trace_experts(model, setup, s.layer, progress=False)
    assert len(e["verified"]) == 3
    top3 = torch.argsort(a.scores[s.layer], descending=True)[:3].tolist()
    assert sorted(e["verified"]) == sorted(top3)
    for x in range(model.cfg.n_experts):
        want = exact.scores[x] if x in e["verified"] else a.scores[s.layer, x]
        assert e["expert_scores"][x] == pytest.approx(float(want), abs=1e-4)
    assert e["layer_score"] == pytest.approx(exact.layer_score, abs=1e-4)
    # a rerun with the exhaustive screen into the same directory refuses, naming what differs
    with pytest.raises(ValueError, match="different settings.*screen"):
        run_protocol(model, cases, tmp_path, replace(CFG, screen="exact"), progress=False)
    with pytest.raises(ValueError, match="screen="):
        run_protocol(model, cases, tmp_path / "bad", replace(CFG, screen="gradient"), progress=False)


def test_exact_screen_keeps_its_fingerprint(model, tmp_path):
    cases = load_facts(DATA / "counterfact_sample.jsonl", limit=2)
    cfg = ProtocolConfig(min_clean=-1e9, min_drop=-1e9, n_samples=1, n_bootstrap=50, n_permutations=50)
    run_protocol(model, cases, tmp_path, cfg, progress=False)
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert "screen" not in settings and "n_verify" not in settings  # directories of earlier versions still resume


def test_cli_trace_screen_attribution(mixtral_tok_dir, tmp_path, capsys):
    from moelens.cli import main

    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join((DATA / "counterfact_sample.jsonl").read_text().splitlines()[:4]) + "\n")
    assert main(["trace", "--model", str(mixtral_tok_dir), "--facts", str(facts), "--out", str(tmp_path / "o"),
                 "--min-clean=-1e9", "--min-drop=-1e9", "--bootstrap", "100", "--permutations", "100",
                 "--screen", "attribution", "--verify", "2"]) == 0
    assert "layer rescue" in capsys.readouterr().out
    recs = [json.loads(l) for l in (tmp_path / "o" / "experts.jsonl").read_text().splitlines()]
    assert recs and all(len(r["verified"]) == 2 for r in recs)
