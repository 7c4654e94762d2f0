"""The dataset protocol: per-case quantities, resume after a crash, settings guard, CLI."""

import json
from pathlib import Path

import pytest

import moelens
from moelens import HookedMoETransformer
from moelens.tracing import load_facts, protocol
from moelens.tracing.protocol import ProtocolConfig, run_protocol

DATA = Path(__file__).parent.parent / "data"
CFG = ProtocolConfig(min_clean=-1e9, min_drop=-1e9, n_samples=2, n_bootstrap=200, n_permutations=200)


@pytest.fixture(scope="module")
def model_dir(mixtral_tok_dir):
    return mixtral_tok_dir


@pytest.fixture(scope="module")
def model(model_dir):
    return HookedMoETransformer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def cases():
    return load_facts(DATA / "counterfact_sample.jsonl", limit=6)


def lines(path):
    return sorted(path.read_text().splitlines())


def test_per_case_quantities_equal_the_tracing_entry_points(model, cases, tmp_path):
    s = run_protocol(model, cases, tmp_path, CFG, progress=False)
    screen = [json.loads(l) for l in (tmp_path / "screen.jsonl").read_text().splitlines()]
    experts = {r["key"]: r for r in map(json.loads, (tmp_path / "experts.jsonl").read_text().splitlines())}
    assert len(screen) == 6 and {r["split"] for r in screen} == {"discovery", "validation"}
    rec = screen[0]
    r = moelens.trace_experts(model, cases[0], s.layer, seed=0, n_samples=2, progress=False)
    assert rec["clean"] == pytest.approx(r.clean, abs=1e-5)
    assert rec["corrupted"] == pytest.approx(r.corrupted, abs=1e-5)
    assert rec["layer_scores"][str(s.layer)] == pytest.approx(r.layer_score, abs=1e-4)
    assert experts[rec["key"]]["expert_scores"] == pytest.approx(r.scores.tolist(), abs=1e-4)
    assert list(s.table["quantity"])[:2] == ["layer rescue", "expert rescue"]
    assert (tmp_path / "report.html").exists() and not (tmp_path / "summary.html").exists()  # one report per run
    # the chosen layer maximises the discovery mean rescue
    assert s.layer == max(s.layer_means, key=s.layer_means.get, default=None) or str(s.layer) == max(s.layer_means, key=s.layer_means.get)
    assert "expert" in str(s)


def test_killed_and_resumed_equals_uninterrupted(model, cases, tmp_path, monkeypatch):
    full = run_protocol(model, cases, tmp_path / "a", CFG, progress=False)
    real = protocol.expert_case
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(protocol, "expert_case", dying)
    with pytest.raises(KeyboardInterrupt):
        run_protocol(model, cases, tmp_path / "b", CFG, progress=False)
    assert len((tmp_path / "b" / "experts.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(protocol, "expert_case", real)
    with open(tmp_path / "b" / "experts.jsonl", "a") as f:
        f.write('{"key": "torn')  # a line cut mid-write by the crash is redone
    resumed = run_protocol(model, cases, tmp_path / "b", CFG, progress=False)
    for name in ("screen.jsonl",):
        assert lines(tmp_path / "a" / name) == lines(tmp_path / "b" / name)
    good = [l for l in lines(tmp_path / "b" / "experts.jsonl") if not l.startswith('{"key": "torn')]
    assert sorted(good) == lines(tmp_path / "a" / "experts.jsonl")
    assert resumed.table.equals(full.table)


def test_settings_mismatch_refuses_to_resume(model, cases, tmp_path):
    run_protocol(model, cases[:4], tmp_path, CFG, progress=False)
    with pytest.raises(ValueError, match="different settings.*noise_scale"):
        run_protocol(model, cases[:4], tmp_path, ProtocolConfig(**{**CFG.__dict__, "noise_scale": 2.0}), progress=False)


def test_bad_input(model, cases, tmp_path):
    with pytest.raises(ValueError, match="no cases"):
        run_protocol(model, [], tmp_path, CFG)
    with pytest.raises(ValueError, match="not sparse layers"):
        run_protocol(model, cases, tmp_path / "x", ProtocolConfig(layers=(7,)))
    with pytest.raises(ValueError, match="no discovery case passed"):
        run_protocol(model, cases, tmp_path / "y", ProtocolConfig(min_clean=1e9), progress=False)


def test_cli_trace(model_dir, tmp_path, capsys):
    from moelens.cli import main

    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join((DATA / "counterfact_sample.jsonl").read_text().splitlines()[:4]) + "\n")
    assert main(["trace", "--model", str(model_dir), "--facts", str(facts), "--out", str(tmp_path / "o"),
                 "--min-clean=-1e9", "--min-drop=-1e9", "--bootstrap", "100", "--permutations", "100"]) == 0
    out = capsys.readouterr().out
    assert "layer rescue" in out and (tmp_path / "o" / "summary.csv").exists()


def test_two_processes_under_torchrun_equal_one(model_dir, tmp_path):
    """`moelens trace` under torchrun (2 CPU processes, gloo): cases sharded by rank, results merged."""
    import os
    import subprocess
    import sys

    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join((DATA / "counterfact_sample.jsonl").read_text().splitlines()[:6]) + "\n")
    common = ["trace", "--model", str(model_dir), "--facts", str(facts), "--min-clean=-1e9", "--min-drop=-1e9",
              "--bootstrap", "100", "--permutations", "100", "--samples", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "moelens.cli", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", port,
                          "-m", "moelens.cli", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert sorted((tmp_path / "two").glob("screen.rank*.jsonl")) and not (tmp_path / "two" / "screen.jsonl").exists()
    assert (tmp_path / "one" / "summary.csv").read_text() == (tmp_path / "two" / "summary.csv").read_text()
    # the merge step reproduces the summary from the files alone
    from moelens.tracing.protocol import merge

    (tmp_path / "two" / "summary.csv").unlink()
    merge(tmp_path / "two")
    assert (tmp_path / "one" / "summary.csv").read_text() == (tmp_path / "two" / "summary.csv").read_text()
