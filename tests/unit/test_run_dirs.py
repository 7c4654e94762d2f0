"""One run per output directory (moelens.rundir): a second run into a directory in use is refused
while the first is writing, a crashed run leaves no lock behind, no record is written twice, and no
command writes into another command's directory or into a file.

The concurrent tests are deterministic: the first run is paused inside its first write (an event,
not a sleep) while the second one starts."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from moelens.cli import main
from moelens.rundir import LOCK, RunDirError, claim, results_of

DATA = Path(__file__).parent.parent / "data"
FAST = ["--min-clean=-1e9", "--min-drop=-1e9", "--bootstrap", "50", "--permutations", "50"]


def in_thread(fn):
    """Run ``fn`` in another thread (a claim is re-entrant within one thread, not across threads)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def one_error_line(err: str, *words) -> None:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    f = tmp_path_factory.mktemp("facts") / "facts.jsonl"
    f.write_text("\n".join((DATA / "counterfact_sample.jsonl").read_text().splitlines()[:4]) + "\n")
    return f


def test_second_run_while_the_first_writes_is_refused_and_nothing_is_written_twice(
        mixtral_tok_dir, facts, tmp_path, capsys, monkeypatch):
    from moelens import HookedMoETransformer
    from moelens.tracing import load_facts, protocol
    from moelens.tracing.protocol import ProtocolConfig, run_protocol

    model = HookedMoETransformer.from_pretrained(mixtral_tok_dir)
    cases = load_facts(facts)
    cfg = ProtocolConfig(min_clean=-1e9, min_drop=-1e9, n_bootstrap=50, n_permutations=50)
    out = tmp_path / "run"
    writing, go_on = threading.Event(), threading.Event()
    real_append = protocol._Store.append

    def paused_append(self, name, record):
        real_append(self, name, record)
        if not writing.is_set():  # the first record is on disk: hold the run here
            writing.set()
            assert go_on.wait(120), "the test never released the first run"

    monkeypatch.setattr(protocol._Store, "append", paused_append)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(run_protocol, model, cases, out, cfg, progress=False)
        assert writing.wait(120)
        try:
            held = snapshot(out)
            for argv in (["trace", "--model", str(mixtral_tok_dir), "--facts", str(facts), "--out", str(out), *FAST],
                         ["merge", "--trace-dir", str(out)],
                         ["demo", "--out", str(out)],
                         ["audit", "--model", str(mixtral_tok_dir), "--out", str(out)]):
                assert main(argv) == 2, argv
                one_error_line(capsys.readouterr().err, f"moelens {argv[0]}: error:", str(out))
            with pytest.raises(RunDirError, match=r"in use by `moelens trace` \(pid \d+ on .* since "):
                run_protocol(model, cases, out, cfg, progress=False)
            assert snapshot(out) == held, "a refused run changed the directory"
        finally:
            go_on.set()
        first.result()
    keys = [json.loads(l)["key"] for l in (out / "screen.jsonl").read_text().splitlines()]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == len(cases)
    # the directory is free again: a rerun resumes and adds no line
    monkeypatch.setattr(protocol._Store, "append", real_append)
    run_protocol(model, cases, out, cfg, progress=False)
    assert len((out / "screen.jsonl").read_text().splitlines()) == len(cases)


def test_a_crashed_run_leaves_no_lock(tmp_path):
    out = tmp_path / "d"
    code = ("import sys\nfrom moelens.rundir import claim\n"
            f"with claim({str(out)!r}, 'trace'):\n    print('held', flush=True)\n    sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=f"pid {proc.pid} "):
            with claim(out, "trace"):
                pass
    finally:
        proc.kill()  # SIGKILL: no cleanup code runs in it
        proc.wait(60)
    assert (out / LOCK).exists()  # the file stays (it names the owner); the lock died with the process
    with claim(out, "trace"):
        assert json.loads((out / LOCK).read_text())["owner"] == "trace"


def test_another_commands_directory_or_a_file_is_refused_untouched(mixtral_tok_dir, facts, tmp_path, capsys):
    trace_dir = tmp_path / "trace"
    assert main(["trace", "--model", str(mixtral_tok_dir), "--facts", str(facts), "--out", str(trace_dir), *FAST]) == 0
    capsys.readouterr()
    demo_dir = tmp_path / "demo"
    with claim(demo_dir, "demo"):
        (demo_dir / "report.html").write_text("<html>demo</html>")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    legacy = tmp_path / "legacy_trace"  # written before the lock file existed
    legacy.mkdir()
    for f in ("settings.json", "screen.jsonl", "report.html"):
        (legacy / f).write_bytes((trace_dir / f).read_bytes())
    before = {d: snapshot(d) for d in (trace_dir, demo_dir, legacy)}
    trace = ["trace", "--model", str(mixtral_tok_dir), "--facts", str(facts), *FAST]
    for argv, words in (
        (["demo", "--out", str(trace_dir)], ["holds the results of `moelens trace`"]),
        (["demo", "--out", str(legacy)], ["holds the results of `moelens trace`"]),
        ([*trace, "--out", str(demo_dir)], ["holds the results of `moelens demo`"]),
        (["audit", "--model", str(mixtral_tok_dir), "--out", str(trace_dir)], ["holds the results of `moelens trace`"]),
        (["merge", "--trace-dir", str(demo_dir)], ["holds the results of `moelens demo`"]),
        ([*trace, "--out", str(a_file)], ["is a file, not a directory"]),
        (["demo", "--out", str(a_file)], ["is a file, not a directory"]),
        (["audit", "--model", str(mixtral_tok_dir), "--out", str(a_file)], ["is a file, not a directory"]),
        (["merge", "--trace-dir", str(a_file)], ["is a file, not a directory"]),
        ([*trace, "--out", str(a_file / "sub")], ["is a file, not a directory"]),
    ):
        assert main(argv) == 2, argv
        one_error_line(capsys.readouterr().err, f"moelens {argv[0]}: error:", *words)
    assert {d: snapshot(d) for d in (trace_dir, demo_dir, legacy)} == before
    assert a_file.read_text() == "mine" and not (tmp_path / "notes.txt" / "sub").exists()
    assert results_of(trace_dir) == results_of(legacy) == "trace" and results_of(demo_dir) == "demo"


def test_ranks_of_one_launch_share_a_directory_another_launch_is_refused(tmp_path):
    out = tmp_path / "d"
    with claim(out, "trace", rank=0, world_size=2, launch="A"):
        # rank 1 of the same launch joins; a single-process run and another launch's ranks are refused
        with ThreadPoolExecutor(1) as pool:
            rank1 = threading.Event()
            release = threading.Event()

            def hold_rank1():
                with claim(out, "trace", rank=1, world_size=2, launch="A", wait_for_rank0=5):
                    rank1.set()
                    release.wait(60)

            joined = pool.submit(hold_rank1)
            assert rank1.wait(60)
            try:
                with pytest.raises(RunDirError, match="in use by `moelens trace` rank 1"):
                    in_thread(lambda: claim(out, "trace", rank=1, world_size=2, launch="B").__enter__())
                with pytest.raises(RunDirError, match="in use by `moelens trace` rank 0"):
                    in_thread(lambda: claim(out, "trace").__enter__())
                with pytest.raises(RunDirError, match="did not claim the directory"):
                    in_thread(lambda: claim(out, "trace", rank=2, world_size=3, launch="B",
                                            wait_for_rank0=0.2).__enter__())
            finally:
                release.set()
            joined.result()
    with claim(out, "trace"):  # all released
        pass


def test_stale_barrier_markers_are_removed_by_rank0(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / ".screen.rank1.done").write_text("done")  # left by an earlier multi-process run
    with claim(out, "trace", rank=0, world_size=2, launch="A"):
        assert not (out / ".screen.rank1.done").exists()


def test_a_directory_with_nothing_but_a_lock_file_is_free_for_any_command(tmp_path):
    out = tmp_path / "d"
    with claim(out, "trace"):
        pass  # e.g. the model failed to load: nothing written
    assert results_of(out) is None
    with claim(out, "demo"):
        (out / "report.html").write_text("demo")
    assert results_of(out) == "demo"
