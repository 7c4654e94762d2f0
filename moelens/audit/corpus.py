"""The audit's corpus: loading texts (the package sample, a bundled model's own sentences, text
files, Hugging Face datasets) under a token budget, tokenizing them, left padding, plus the
small helpers shared by the audit (layer checks, progress bars)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from moelens.audit.constants import BUNDLED_DEFAULT, SAMPLE_CORPUS, CorpusLike


def read_paragraphs(path: Union[str, os.PathLike]) -> list[str]:
    """Paragraphs of a text file: blocks separated by blank lines, inner newlines -> spaces."""
    text = Path(path).read_text(encoding="utf-8")
    paragraphs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def bundled_corpus(model: Union[str, os.PathLike] = BUNDLED_DEFAULT, *, n: Optional[int] = None, seed: int = 0) -> list[str]:
    """Sentences of a bundled model's own world: ``prompt.format(subject) + " " + true object`` for
    every record of its ``facts.jsonl`` (the text the model was trained on, without BOS/EOS),
    deduplicated, in a deterministic shuffled order (``seed``), the first ``n`` if given.

    ``model`` is a bundled model's short name or a checkpoint directory holding ``facts.jsonl``.
    """
    from moelens import loading

    directory = loading.resolve(model)
    path = Path(directory) / "facts.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no facts.jsonl; bundled_corpus needs a model trained on a facts file")
    sentences, seen = [], set()
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rw = json.loads(line)["requested_rewrite"]
            s = rw["prompt"].format(rw["subject"]) + " " + rw["target_true"]["str"]
            if s not in seen:
                seen.add(s)
                sentences.append(s)
    random.Random(seed).shuffle(sentences)
    return sentences[:n] if n is not None else sentences


def _count_tokens(text: str, tokenizer) -> int:
    if tokenizer is None:
        return len(text.split())
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _truncate(text: str, n: int, tokenizer) -> str:
    if tokenizer is None:
        return " ".join(text.split()[:n])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n]
    return tokenizer.decode(ids)


def _budget(texts: Iterable[str], max_tokens: Optional[int], tokenizer) -> list[str]:
    """Non-empty ``texts`` in order, stopping once ``max_tokens`` tokens are used (the text that
    crosses the budget is truncated to fit)."""
    out, used = [], 0
    for text in texts:
        text = text.strip() if isinstance(text, str) else text
        if not text:
            continue
        if max_tokens is None:
            out.append(text)
            continue
        n = _count_tokens(text, tokenizer)
        if used + n > max_tokens:
            rest = max_tokens - used
            if rest > 0:
                out.append(_truncate(text, rest, tokenizer))
            break
        out.append(text)
        used += n
        if used >= max_tokens:
            break
    return out


def _dataset_texts(ds, split: str, text_field: str) -> Iterable[str]:
    if isinstance(ds, dict):  # DatasetDict / IterableDatasetDict
        if split not in ds:
            raise KeyError(f"dataset has no split {split!r} (splits: {list(ds.keys())})")
        ds = ds[split]
    cols = ds.column_names
    if cols is not None and text_field not in cols:
        raise KeyError(f"dataset has no column {text_field!r} (columns: {list(cols)}); pass text_field=...")
    for row in ds:
        yield row[text_field]


def load_corpus(
    source: CorpusLike = None,
    *,
    tokenizer: Any = None,
    max_tokens: Optional[int] = None,
    split: str = "train",
    text_field: str = "text",
) -> list[str]:
    """A corpus as a list of texts (one sequence each).

    ``source`` may be

    * ``None`` or ``"sample"``: the package's ``moelens/data/corpus_sample.txt``;
    * a text file: paragraphs separated by blank lines;
    * a list of strings (returned, blank ones dropped);
    * ``"facts"`` or ``"facts:NAME_OR_DIR"``, or a checkpoint directory with ``facts.jsonl``:
      :func:`bundled_corpus` of that model (default ``moelens-tiny-facts``);
    * a Hugging Face ``datasets`` object, a directory written by ``save_to_disk``, or a dataset
      name ``"NAME"`` / ``"NAME:CONFIG"`` loaded with ``datasets.load_dataset(..., split=split)``
      (offline: only from the local cache when ``HF_DATASETS_OFFLINE=1``); ``text_field`` names
      the text column.

    ``max_tokens`` caps the corpus size, counting tokens with ``tokenizer`` (whitespace words
    without one); the text crossing the budget is truncated.
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if source is None or (isinstance(source, str) and source == "sample"):
        return _budget(read_paragraphs(SAMPLE_CORPUS), max_tokens, tokenizer)
    if isinstance(source, (list, tuple)):
        if not all(isinstance(s, str) for s in source):
            raise TypeError("load_corpus: a list source must hold strings (pass token ids to run_audit directly)")
        return _budget(source, max_tokens, tokenizer)
    if isinstance(source, (str, os.PathLike)):
        s = str(source)
        if s == "facts" or s.startswith("facts:"):
            return _budget(bundled_corpus(s[6:] or BUNDLED_DEFAULT), max_tokens, tokenizer)
        path = Path(s).expanduser()
        if path.is_file():
            return _budget(read_paragraphs(path), max_tokens, tokenizer)
        if path.is_dir() and (path / "facts.jsonl").is_file():
            return _budget(bundled_corpus(path), max_tokens, tokenizer)
        ds = load_dataset_source(s, split, what="not a text file, not 'sample'/'facts'")
        return _budget(_dataset_texts(ds, split, text_field), max_tokens, tokenizer)
    if hasattr(source, "column_names"):  # a datasets.Dataset / DatasetDict object
        return _budget(_dataset_texts(source, split, text_field), max_tokens, tokenizer)
    raise TypeError(f"load_corpus: unsupported source of type {type(source).__name__}")


LOCAL_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow")


def check_local_source(source) -> None:
    """Refuse a corpus source that looks like a local path (``./x``, ``/x``, ``~/x``, ``../x`` or a
    name ending in a file suffix such as ``.txt``/``.jsonl``) but does not exist, with a
    ``FileNotFoundError``, before anything asks the Hugging Face hub for a dataset of that name.
    Dataset names (``wikitext:wikitext-2-raw-v1``, ``ORG/NAME``) pass."""
    if not isinstance(source, (str, os.PathLike)):
        return
    s = str(source)
    if s in ("sample", "facts") or s.startswith("facts:") or Path(s).expanduser().exists():
        return
    local = s.startswith(("/", "./", "../", "~", ".\\", "..\\")) or Path(s).suffix.lower() in LOCAL_SUFFIXES
    if local:
        raise FileNotFoundError(f"corpus {s}: no such file or directory (a Hugging Face dataset is named "
                                f"NAME[:CONFIG] or ORG/NAME, without a file suffix)")


def load_dataset_source(source: str, split: str, what: str = "not a file"):
    """A Hugging Face dataset from a ``save_to_disk`` directory or a ``NAME[:CONFIG]`` name
    (``datasets.load_dataset(..., split=split)``); a clear ``FileNotFoundError`` otherwise (at
    once, without a hub lookup, for a missing local-looking path: :func:`check_local_source`)."""
    check_local_source(source)
    datasets = _import_datasets(source)
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            return datasets.load_from_disk(str(path))
        name, _, config = source.partition(":")
        return datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:
        raise FileNotFoundError(
            f"could not load corpus {source!r}: {what}, and datasets could not load it "
            f"({type(exc).__name__}: {exc}); offline, a dataset must already be in the local cache"
        ) from exc


def _import_datasets(what: str):
    try:
        import datasets
    except ImportError as exc:
        raise FileNotFoundError(
            f"{what!r} is not a file or directory, and loading it as a Hugging Face dataset needs the "
            f"`datasets` package (pip install datasets)."
        ) from exc
    return datasets


def tokenize_corpus(model, corpus: CorpusLike, *, max_seq_len: Optional[int] = None) -> list[Tensor]:
    """The corpus as a list of 1-D int64 token tensors (one per sequence, unpadded).

    Texts are tokenized one at a time with ``model.tokenize`` (BOS as the model's default);
    token-id sequences (lists, 1-D tensors, or the rows of a 2-D tensor) are used as given.
    ``max_seq_len`` truncates each sequence to its first ``max_seq_len`` tokens.
    """
    if corpus is None or isinstance(corpus, (str, os.PathLike)) or hasattr(corpus, "column_names"):
        corpus = load_corpus(corpus)
    if isinstance(corpus, Tensor):
        if corpus.ndim != 2:
            raise ValueError(f"a token tensor corpus must be [n_sequences, pos], got shape {tuple(corpus.shape)}")
        corpus = list(corpus)
    seqs = []
    for item in corpus:
        if isinstance(item, str):
            t = model.tokenize(item)[0][0]
        else:
            t = torch.as_tensor(item, dtype=torch.long).reshape(-1)
        t = t.detach().to("cpu", torch.long)
        if max_seq_len is not None:
            t = t[:max_seq_len]
        if t.numel() == 0:
            continue
        if int(t.min()) < 0 or int(t.max()) >= model.cfg.d_vocab:
            raise ValueError(f"token ids out of range [0, {model.cfg.d_vocab})")
        seqs.append(t)
    if not seqs:
        raise ValueError("the corpus is empty")
    return seqs


def _pad_left(seqs: Sequence[Tensor], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    n = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, n - len(s):] = s
        mask[i, n - len(s):] = 1
    return tokens, mask


def _check_layers(model, layers) -> list[int]:
    moe = list(model.cfg.moe_layers)
    if layers is None:
        return moe
    layers = [layers] if isinstance(layers, int) else [int(l) for l in layers]
    bad = [l for l in layers if l not in moe]
    if bad:
        raise ValueError(f"layers {bad} are not sparse (MoE) layers; sparse layers are {moe}")
    if not layers:
        raise ValueError("no layers selected")
    return sorted(set(layers))


def _progress(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)
