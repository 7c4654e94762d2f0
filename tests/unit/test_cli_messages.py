"""Command-line messages: Python warnings as one `moelens: warning: ...` line; a mistyped local
`--corpus` refused at once, before the model loads and without asking the hub."""

from __future__ import annotations

from pathlib import Path

import pytest

from moelens.cli import main

DATA = Path(__file__).parent.parent / "data"


def test_warnings_print_as_one_line(mixtral_tok_dir, tmp_path, capsys):
    facts = tmp_path / "facts.jsonl"
    good = (DATA / "counterfact_sample.jsonl").read_text().splitlines()[:4]
    facts.write_text("\n".join(good[:2] + ['{"not": "a case"}'] + good[2:]) + "\n")
    assert main(["trace", "--model", str(mixtral_tok_dir), "--facts", str(facts), "--out", str(tmp_path / "o"),
                 "--min-clean=-1e9", "--min-drop=-1e9", "--bootstrap", "50", "--permutations", "50"]) == 0
    err = capsys.readouterr().err.splitlines()
    warned = [l for l in err if "skipping line 3" in l]
    assert len(warned) == 1 and warned[0].startswith("moelens: warning: "), err
    assert not any("Warning:" in l or "load_facts(" in l for l in err), err  # no category, no source line


def test_show_warning_is_restored_after_main(capsys):
    import warnings

    before = warnings.showwarning
    with pytest.raises(SystemExit):
        main(["--version"])
    assert warnings.showwarning is before


@pytest.mark.parametrize("corpus", ["nope.txt", "./texts/nope", "~/no/such/corpus.jsonl", "../nope.csv"])
def test_missing_local_corpus_is_refused_without_a_hub_lookup(corpus, tmp_path, capsys, monkeypatch):
    import moelens.audit.corpus as corpus_module
    from moelens import HookedMoETransformer

    def forbidden(*args, **kwargs):
        raise AssertionError("a missing local corpus must not reach the model or the hub")

    monkeypatch.setattr(corpus_module, "_import_datasets", forbidden)
    monkeypatch.setattr(HookedMoETransformer, "from_pretrained", forbidden)
    monkeypatch.chdir(tmp_path)
    assert main(["audit", "--model", "moelens-tiny-facts", "--corpus", corpus, "--out", str(tmp_path / "o")]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith(f"moelens audit: error: --corpus {corpus}: no such file"), err
    assert not (tmp_path / "o").exists()
    with pytest.raises(FileNotFoundError, match="no such file"):
        corpus_module.load_corpus(corpus)


def test_dataset_names_are_not_taken_for_paths():
    from moelens.audit.corpus import check_local_source

    for name in ("wikitext:wikitext-2-raw-v1", "Salesforce/wikitext", "sample", "facts", "facts:moelens-tiny-facts"):
        check_local_source(name)  # passes: a dataset name (or a built-in source), looked up as such
