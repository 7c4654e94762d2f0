"""`moelens trace` resumes cannot mix runs: end to end through the CLI (main(argv)) on the bundled model.

Edited cases, id-less records, two different files, a larger --limit, summary-only options, the
same model by name or by path, kill and resume with a torn line, and `moelens merge` on a mix.
"""

import json
import shutil

import pandas as pd
import pytest

from moelens.cli import main
from moelens.loading import bundled_models
from moelens.tracing import protocol

FACTS = bundled_models()["moelens-tiny-facts"] / "facts.jsonl"
COMMON = ["--samples", "1", "--min-clean=-1e9", "--min-drop=-1e9", "--bootstrap", "50", "--permutations", "50"]


def records(n, start=0, step=37, ids=True):
    rows = [json.loads(l) for l in FACTS.read_text().splitlines()[start::step][:n]]
    if not ids:
        for r in rows:
            for k in ("case_id", "fact_id", "template_id"):
                r.pop(k, None)
    return rows


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trace(facts, out, *extra, model="moelens-tiny-facts"):
    return main(["trace", "--model", str(model), "--facts", str(facts), "--out", str(out), *COMMON, *extra])


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error message"
    return err[-1]


def n_lines(path):
    return len(path.read_text().splitlines())


def test_edited_case_is_refused_naming_both_values(tmp_path, capsys):
    rows = records(6)
    facts = write(tmp_path / "facts.jsonl", rows)
    assert trace(facts, tmp_path / "o") == 0
    before = (tmp_path / "o" / "summary.csv").read_text()
    old_foil = rows[2]["requested_rewrite"]["target_new"]["str"]
    rows[2]["requested_rewrite"]["target_new"]["str"] = "Kenya" if old_foil != "Kenya" else "Chile"
    write(facts, rows)
    capsys.readouterr()
    assert trace(facts, tmp_path / "o") == 2
    line = error_line(capsys)
    assert f"case '{rows[2]['case_id']}'" in line and repr(old_foil) in line and "target_foil" in line
    assert (tmp_path / "o" / "summary.csv").read_text() == before  # nothing written over


def test_idless_records_from_another_file_are_refused(tmp_path, capsys):
    a = write(tmp_path / "a.jsonl", records(6, ids=False))
    b = write(tmp_path / "b.jsonl", records(6, start=5, ids=False))
    assert trace(a, tmp_path / "o") == 0
    capsys.readouterr()
    assert trace(b, tmp_path / "o") == 2
    line = error_line(capsys)
    assert "facts" in line and str(a.resolve()) in line and str(b.resolve()) in line
    # the same file edited in place: the id-less case '#0' changed
    rows = records(6, ids=False)
    rows[0]["requested_rewrite"]["subject"] = rows[1]["requested_rewrite"]["subject"]
    write(a, rows)
    assert trace(a, tmp_path / "o") == 2
    line = error_line(capsys)
    assert "case '#0'" in line and rows[1]["requested_rewrite"]["subject"] in line


def test_two_files_with_ids_do_not_pile_up_and_merge_does_not_mix(tmp_path, capsys):
    a = write(tmp_path / "a.jsonl", records(6))
    b = write(tmp_path / "b.jsonl", [{**r, "case_id": 10_000 + i} for i, r in enumerate(records(6, start=3))])
    assert trace(a, tmp_path / "o") == 0
    alone = (tmp_path / "o" / "summary.csv").read_text()
    assert trace(b, tmp_path / "o") == 2
    assert n_lines(tmp_path / "o" / "screen.jsonl") == 6
    capsys.readouterr()
    assert main(["merge", "--trace-dir", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "summary.csv").read_text() == alone
    # results of another run copied in: merge refuses instead of summarising the mix
    assert trace(b, tmp_path / "other") == 0
    shutil.copy(tmp_path / "other" / "screen.jsonl", tmp_path / "o" / "screen.rank1.jsonl")
    capsys.readouterr()
    assert main(["merge", "--trace-dir", str(tmp_path / "o")]) == 2
    assert "another run" in error_line(capsys)


def test_larger_limit_extends_and_summary_options_resummarise(tmp_path, capsys):
    facts = write(tmp_path / "facts.jsonl", records(8))
    assert trace(facts, tmp_path / "fresh") == 0
    fresh = (tmp_path / "fresh" / "summary.csv").read_text()
    assert trace(facts, tmp_path / "o", "--limit", "5") == 0
    capsys.readouterr()
    assert trace(facts, tmp_path / "o") == 0
    out = capsys.readouterr().out
    assert "resuming: screening 5/8 cases done (5 kept); expert tracing 5/5 kept cases done (at layer " in out
    assert n_lines(tmp_path / "o" / "screen.jsonl") == 8  # only the 3 new cases were screened
    assert (tmp_path / "o" / "summary.csv").read_text() == fresh
    # summary-only options: nothing recomputed, the summary redone with them
    screen, experts = (tmp_path / "o" / "screen.jsonl").read_text(), (tmp_path / "o" / "experts.jsonl").read_text()
    assert trace(facts, tmp_path / "o", "--bootstrap", "80", "--permutations", "70") == 0
    assert "resuming: screening 8/8 cases done (8 kept); expert tracing 8/8 kept cases done" in capsys.readouterr().out
    assert (tmp_path / "o" / "screen.jsonl").read_text() == screen
    assert (tmp_path / "o" / "experts.jsonl").read_text() == experts
    settings = json.loads((tmp_path / "o" / "settings.json").read_text())
    assert settings["n_bootstrap"] == 80 and settings["n_permutations"] == 70
    assert (tmp_path / "o" / "summary.csv").read_text() != fresh  # other resamples, other CIs
    # a setting that changes the numbers is refused, naming both values
    assert trace(facts, tmp_path / "o", "--noise-scale", "2.5") == 2
    line = error_line(capsys)
    assert "noise_scale: 3.0 there, 2.5 now" in line
    # the same model by its bundled name and by its path is the same model
    capsys.readouterr()
    assert trace(facts, tmp_path / "o", model=bundled_models()["moelens-tiny-facts"]) == 0
    assert "resuming: screening 8/8 cases done (8 kept); expert tracing 8/8 kept cases done" in capsys.readouterr().out
    assert (tmp_path / "o" / "screen.jsonl").read_text() == screen
    # another checkpoint (one weight's lowest mantissa bit flipped) is another model
    other = tmp_path / "other-model"
    shutil.copytree(bundled_models()["moelens-tiny-facts"], other)
    data = bytearray((other / "model.safetensors").read_bytes())
    data[-4] ^= 1
    (other / "model.safetensors").write_bytes(bytes(data))
    assert trace(facts, tmp_path / "o", model=other) == 2
    line = error_line(capsys)
    assert "model: 'moelens-tiny-facts' (fingerprint" in line and f"{str(other)!r} (fingerprint" in line


def test_killed_and_resumed_through_the_cli(tmp_path, capsys, monkeypatch):
    facts = write(tmp_path / "facts.jsonl", records(6))
    assert trace(facts, tmp_path / "a") == 0
    real = protocol.expert_case
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(protocol, "expert_case", dying)
    with pytest.raises(KeyboardInterrupt):
        trace(facts, tmp_path / "b")
    monkeypatch.setattr(protocol, "expert_case", real)
    with open(tmp_path / "b" / "experts.jsonl", "a") as f:
        f.write('{"key": "3", "case_id": 3, "spl')  # the line being written when the process died
    capsys.readouterr()
    assert trace(facts, tmp_path / "b") == 0
    assert "resuming: screening 6/6 cases done (6 kept); expert tracing 2/6 kept cases done" in capsys.readouterr().out
    for name in ("screen.jsonl", "experts.jsonl"):
        df = pd.read_json(tmp_path / "b" / name, lines=True)  # no torn line left behind
        assert len(df) == 6 and df["key"].is_unique
    assert (tmp_path / "a" / "summary.csv").read_text() == (tmp_path / "b" / "summary.csv").read_text()


def test_no_validation_case_says_why_and_fails(tmp_path, capsys, monkeypatch):
    rows = records(4)
    facts = write(tmp_path / "facts.jsonl", rows)
    split = protocol._split([str(r["case_id"]) for r in rows], 0.5, 0)
    real = protocol.screen_case

    def validation_cases_fail_the_filter(model, case, *args, **kwargs):
        rec = real(model, case, *args, **kwargs)
        rec["kept"] = split[str(case.case_id)] == "discovery"
        return rec

    monkeypatch.setattr(protocol, "screen_case", validation_cases_fail_the_filter)
    assert trace(facts, tmp_path / "o") == 2
    line = error_line(capsys)
    assert "no validation case" in line and "2 of 4 cases passed the filter" in line and "--limit" in line
    assert not (tmp_path / "o" / "summary.csv").exists()
    # one case: no discovery case either, said as plainly
    assert trace(write(tmp_path / "one.jsonl", rows[:1]), tmp_path / "p") == 2
    assert "no discovery case" in error_line(capsys)
