"""The command line: fast help, --version, help text and defaults for every option, one meaning per
flag name, one-line errors with exit status 2 (and --debug for the traceback)."""

import subprocess
import sys
from pathlib import Path

import pytest

from moelens.cli import build_parser, main

DATA = Path(__file__).parent.parent / "data"


def test_help_and_version_import_nothing_heavy():
    code = ("import sys, time; t = time.time()\n"
            "from moelens.cli import main\n"
            "for argv in (['--help'], ['--version'], ['demo', '--help'], ['trace', '--help'], ['merge', '--help'], ['audit', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'plotly', 'numpy', 'pandas') if m in sys.modules]\n"
            "print('HEAVY', heavy, 'SECONDS', time.time() - t)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "HEAVY [] " in out, out
    assert "moelens " in out  # the version line
    # importing nothing heavy is what keeps --help under a second (~0.1 s on a quiet machine); the
    # wall-time bound is loose so that a loaded CI box does not fail it
    assert float(out.split("SECONDS")[1]) < 5.0


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("moelens ")


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subs.choices.items():
        if name == "audit":
            from moelens.audit import build_parser as audit_parser

            sub = audit_parser()
        text = sub.format_help()
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings} has no help text"
            if not action.required and action.default not in (None, False, "==SUPPRESS==") and action.nargs != 0:
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.option_strings)
        flat = " ".join(text.split())
        # no misleading defaults: a flag's stored value ("--no-bos (default: True)"), a bare None, or a
        # second "(default: ...)" after a help text that already says what the default is
        for bad in ("(default: None)", "(default: True)", "(default: False)", "(default: ==SUPPRESS==)"):
            assert bad not in flat, (name, bad)
        for action in sub._actions:
            if action.option_strings and action.help:
                helped = " ".join(sub._get_formatter()._expand_help(action).split()) if action.help else ""
                assert helped.count("(default") <= 1, (name, action.option_strings, helped)


def test_one_meaning_per_flag_name():
    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    demo = {o for a in subs.choices["demo"]._actions for o in a.option_strings}
    assert "--n-facts" in demo and "--facts" not in demo  # --facts is the trace's facts *file*
    merge = {o for a in subs.choices["merge"]._actions for o in a.option_strings}
    assert "--trace-dir" in merge and "--out" not in merge


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    cases = [
        ["trace", "--model", "moelens-tiny-facts", "--facts", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")],
        ["merge", "--trace-dir", str(tmp_path / "not_a_run")],
        ["demo", "--out", str(tmp_path / "d"), "--n-facts", "0"],
        ["trace", "--model", str(tmp_path / "no_such_model"), "--facts", str(DATA / "counterfact_sample.jsonl"),
         "--out", str(tmp_path / "o")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err, err
    with pytest.raises(FileNotFoundError):
        main(["--debug"] + cases[0])
    with pytest.raises(FileNotFoundError):
        main(cases[0] + ["--debug"])


def test_layer_out_of_range_and_settings_mismatch(mixtral_tok_dir, tmp_path, capsys):
    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join((DATA / "counterfact_sample.jsonl").read_text().splitlines()[:4]) + "\n")
    base = ["trace", "--model", str(mixtral_tok_dir), "--facts", str(facts), "--min-clean=-1e9", "--min-drop=-1e9",
            "--bootstrap", "50", "--permutations", "50"]
    assert main(base + ["--out", str(tmp_path / "a"), "--layers", "99"]) == 2
    err = capsys.readouterr().err
    assert "99" in err and err.count("\n") == 1
    assert main(base + ["--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "b"), "--seed", "3"]) == 2  # settings mismatch on resume
    err = capsys.readouterr().err
    assert "different settings" in err and err.count("\n") == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(capsys):
    assert main(["trace", "--model", "moelens-tiny-facts", "--facts", str(DATA / "counterfact_sample.jsonl"),
                 "--out", "unused", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and err.count("\n") == 1


def test_p_values_and_skipped_records_in_the_printed_summary():
    import pandas as pd

    from moelens.formatting import format_p
    from moelens.tracing.protocol import ProtocolSummary

    assert [format_p(p) for p in (0.0, 5e-5, 0.0123, 0.5, float("nan"))] == ["< 1e-4", "< 1e-4", "0.012", "0.50", "n/a"]
    table = pd.DataFrame([{"quantity": "layer rescue", "estimate": 0.5, "ci_low": 0.4, "ci_high": 0.6,
                           "p_value": 0.0, "n": 10}])
    counts = {"total": 10, "kept": 10, "discovery": 5, "validation": 5, "errors": 0, "multi_token_targets": 0,
              "same_first_token": 0, "skipped_records": 2}
    text = str(ProtocolSummary(table=table, layer=1, expert=3, layer_means={"1": 0.5}, expert_means=[0.0] * 4,
                               expert_recurrence=[0.0] * 4, counts=counts))
    assert "< 1e-4" in text and "+0.000" not in text
    assert "cases: 10 total (+ 2 malformed records skipped)" in text


def test_trace_cli_counts_malformed_records(mixtral_tok_dir, tmp_path, capsys):
    facts = tmp_path / "facts.jsonl"
    good = (DATA / "counterfact_sample.jsonl").read_text().splitlines()[:4]
    facts.write_text("\n".join(good[:2] + ['{"not": "a case"}'] + good[2:]) + "\n")
    assert main(["trace", "--model", str(mixtral_tok_dir), "--facts", str(facts), "--out", str(tmp_path / "o"),
                 "--min-clean=-1e9", "--min-drop=-1e9", "--bootstrap", "50", "--permutations", "50"]) == 0
    assert "cases: 4 total (+ 1 malformed record skipped)" in capsys.readouterr().out
    # summary.json says the same, and is strict JSON (an undefined statistic is null, not NaN)
    import json

    text = (tmp_path / "o" / "summary.json").read_text()
    data = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"non-strict JSON: {c}")))
    assert data["counts"]["skipped_records"] == 1
