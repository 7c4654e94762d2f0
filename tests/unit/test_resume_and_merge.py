"""Truthful progress and merge: a resumed trace says what each phase has done; `moelens merge` of an
intact directory keeps every count of summary.json and labels each case by its fact."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest

from moelens.cli import main
from moelens.tracing import load_facts, protocol
from moelens.tracing.protocol import ProtocolConfig, run_protocol

DATA = Path(__file__).parent.parent / "data"
CFG = ProtocolConfig(min_clean=-1e9, min_drop=-1e9, n_bootstrap=50, n_permutations=50)


@pytest.fixture(scope="module")
def model(mixtral_tok_dir):
    from moelens import HookedMoETransformer

    return HookedMoETransformer.from_pretrained(mixtral_tok_dir)


@pytest.fixture(scope="module")
def cases():
    return load_facts(DATA / "counterfact_sample.jsonl", limit=6)


def _dies_on(monkeypatch, name: str, call: int):
    real = getattr(protocol, name)
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(protocol, name, dying)
    return real


def test_resume_counts_what_screening_has_done(model, cases, tmp_path, monkeypatch, capsys):
    real = _dies_on(monkeypatch, "screen_case", 4)  # killed after 3 of 6 cases were screened
    with pytest.raises(KeyboardInterrupt):
        run_protocol(model, cases, tmp_path, CFG, progress=False)
    monkeypatch.setattr(protocol, "screen_case", real)
    run_protocol(model, cases, tmp_path, CFG, progress=True)
    out = capsys.readouterr().out
    assert "resuming: screening 3/6 cases done (3 kept); expert tracing 0/3 kept cases done" in out, out
    assert len((tmp_path / "screen.jsonl").read_text().splitlines()) == 6


def test_resume_counts_what_expert_tracing_has_done(model, cases, tmp_path, monkeypatch, capsys):
    real = _dies_on(monkeypatch, "expert_case", 3)  # every case screened, 2 traced
    with pytest.raises(KeyboardInterrupt):
        run_protocol(model, cases, tmp_path, CFG, progress=False)
    monkeypatch.setattr(protocol, "expert_case", real)
    summary = run_protocol(model, cases, tmp_path, CFG, progress=True)
    out = capsys.readouterr().out
    assert (f"resuming: screening 6/6 cases done (6 kept); expert tracing 2/6 kept cases done (at layer "
            f"{summary.layer})") in out, out
    assert f"expert tracing at layer {summary.layer}: 2/6 kept cases done before, 4 to trace" in out, out


def test_merge_keeps_every_count_and_the_case_labels(mixtral_tok_dir, tmp_path, capsys):
    facts = tmp_path / "facts.jsonl"
    good = (DATA / "counterfact_sample.jsonl").read_text().splitlines()[:4]
    facts.write_text("\n".join(good[:2] + ['{"not": "a case"}'] + good[2:]) + "\n")
    out = tmp_path / "o"
    assert main(["trace", "--model", str(mixtral_tok_dir), "--facts", str(facts), "--out", str(out),
                 "--min-clean=-1e9", "--min-drop=-1e9", "--bootstrap", "50", "--permutations", "50"]) == 0
    traced_summary = json.loads((out / "summary.json").read_text())
    assert traced_summary["counts"]["skipped_records"] == 1
    traced_report = html.unescape((out / "report.html").read_text())
    assert main(["merge", "--trace-dir", str(out)]) == 0
    assert "(+ 1 malformed record skipped)" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text()) == traced_summary
    merged_report = html.unescape((out / "report.html").read_text())
    first = load_facts(facts)[0]
    label = f"{first.prompt} -> {first.target_true}"
    assert label in traced_report and label in merged_report
    assert "case 0 [" not in merged_report and "case #0" not in merged_report
