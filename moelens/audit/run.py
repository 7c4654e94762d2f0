"""The audit, end to end: :func:`run_audit`, resumable in an output directory guarded by a
settings fingerprint (model weights, tokenized corpus, sampling settings)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import pandas as pd
from torch import Tensor

from moelens.audit.constants import (
    EFFECT_COLUMNS,
    METRICS,
    SETTINGS_VERSION,
    STAT_COLUMNS,
    CorpusLike,
)
from moelens.audit.corpus import (
    _check_layers,
    _progress,
    bundled_corpus,
    load_corpus,
    tokenize_corpus,
)
from moelens.audit.effects import _sequence_effects, sample_positions
from moelens.audit.report import AuditResult, summarize
from moelens.audit.statistics import expert_statistics
from moelens.rundir import holds_run_dir


class AuditSettingsError(ValueError):
    """An audit output directory was written with different settings than the current run."""


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o).__name__)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def _model_fingerprint(model) -> dict:
    """The model's identity for resuming: its config and a checksum of every weight's values
    (:func:`moelens.tracing.fingerprint.parameter_checksum`: an edit anywhere in any tensor counts)."""
    from moelens.tracing.fingerprint import parameter_checksum

    h = hashlib.sha256()
    h.update(repr(sorted(dataclasses.asdict(model.cfg).items())).encode())
    h.update(parameter_checksum(model).encode())
    return {"architecture": model.cfg.architecture, "sha256": h.hexdigest()}


def _corpus_fingerprint(seqs: Sequence[Tensor]) -> str:
    h = hashlib.sha256()
    for s in seqs:
        h.update(len(s).to_bytes(8, "little"))
        h.update(s.numpy().astype("<i8").tobytes())
    return h.hexdigest()


def _settings(model, seqs, layers, n_positions, seed, renormalize, max_seq_len, ablation_scope="position",
              semantics="zero") -> dict:
    extra = {}
    if ablation_scope != "position" or semantics != "zero":  # new knobs: older settings files stay valid
        extra = {"ablation_scope": ablation_scope, "semantics": semantics}
    return {**extra,
        "version": SETTINGS_VERSION,
        "model": _model_fingerprint(model),
        "corpus_sha256": _corpus_fingerprint(seqs),
        "n_sequences": len(seqs),
        "n_tokens": int(sum(len(s) for s in seqs)),
        "layers": list(layers),
        "n_positions": n_positions,
        "seed": seed,
        "renormalize": bool(renormalize),
        "max_seq_len": max_seq_len,
    }


def _check_settings(out: Path, settings: dict, info: Optional[dict] = None) -> None:
    path = out / "settings.json"
    if not path.is_file():
        if (out / "effects.jsonl").exists():
            raise AuditSettingsError(
                f"{out} holds effects.jsonl but no settings.json: it was not written by this version of "
                f"run_audit; use a fresh output directory."
            )
        _write_json(path, {"fingerprint": settings, "info": info or {}})
        return
    old = json.loads(path.read_text())
    old_fp = old.get("fingerprint", old)
    if old_fp != settings:
        diff = [f"{k}: stored {old_fp.get(k)!r}, now {settings.get(k)!r}"
                for k in sorted(set(old_fp) | set(settings)) if old_fp.get(k) != settings.get(k)]
        raise AuditSettingsError(
            f"Refusing to resume the audit in {out}: it was started with different settings "
            f"({'; '.join(diff)}). Rerun with the original settings, or use a fresh output directory "
            f"(or delete {out})."
        )


def _read_effects(path: Path) -> list[dict]:
    """Complete records of ``effects.jsonl``; a torn last line (killed mid-write) is cut off."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    records, good = [], 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    if good != len(data):
        with open(path, "r+b") as fh:
            fh.truncate(good)
    return records


def _effects_frame(records: Sequence[dict]) -> pd.DataFrame:
    frames = [pd.DataFrame(r["effects"]).assign(seq=r["seq"]) for r in records if r["effects"]["layer"]]
    if not frames:
        return pd.DataFrame(columns=["seq", *EFFECT_COLUMNS])
    df = pd.concat(frames, ignore_index=True)
    return df[["seq", *EFFECT_COLUMNS]]


def _stats_from_json(obj) -> pd.DataFrame:
    df = pd.DataFrame(obj["stats"])
    for c in STAT_COLUMNS:
        df[c] = df[c].astype(float)
    return df


def _stats_to_json(df: pd.DataFrame) -> dict:
    recs = df.astype(object).where(df.notna(), None).to_dict(orient="records")
    return {"stats": recs}


def _default_corpus(model) -> CorpusLike:
    name = getattr(model, "name_or_path", None)
    if name is not None:
        try:
            from moelens import loading

            if (Path(loading.resolve(name)) / "facts.jsonl").is_file():
                return bundled_corpus(name)
        except (FileNotFoundError, OSError):
            pass
    return load_corpus(None)


@holds_run_dir("audit")  # one run per directory (moelens.rundir)
def run_audit(
    model,
    corpus: CorpusLike = None,
    *,
    layers: Optional[Sequence[int]] = None,
    n_positions: Optional[int] = 16,
    seed: int = 0,
    metrics: Sequence[str] = METRICS,
    renormalize: bool = False,
    scope: str = "next",
    max_batch: int = 64,
    batch_size: int = 8,
    max_seq_len: Optional[int] = None,
    out_dir: Union[str, os.PathLike, None] = None,
    progress: bool = True,
    callback: Optional[Callable[[int, dict], None]] = None,
    ablation_scope: str = "position",
    semantics: str = "zero",
) -> AuditResult:
    """Audit whether observational expert statistics predict the causal effect of removal.

    ``corpus``: anything :func:`load_corpus` or :func:`tokenize_corpus` accepts (default: the
    bundled model's own sentences for a bundled model with ``facts.jsonl``, else the package
    sample). ``layers``: sparse layers (default all). ``n_positions``: positions sampled per
    sequence (``None``: all), drawn with ``seed``. ``renormalize``/``max_batch``: see
    :func:`expert_effects`. ``scope``: which effect the tests use (``"next"`` or ``"suffix"``).
    ``ablation_scope`` (``"position"``, default, or ``"sequence"``) and ``semantics`` (``"zero"``,
    ``"route_around"``, ``"reroute"``): how each expert is removed, see :mod:`moelens.audit.ablation`
    (``renormalize=True`` is ``semantics="route_around"``).

    With ``out_dir`` the run is resumable: ``settings.json`` (fingerprint of model weights,
    tokenized corpus, layers, ``n_positions``, ``seed``, ``renormalize``, ``max_seq_len``),
    ``stats.json`` (written once computed), ``effects.jsonl`` (one line appended per finished
    sequence), and at the end ``summary.csv`` and ``report.html``. Rerunning with the same
    settings skips finished sequences; different settings raise :class:`AuditSettingsError`.
    ``callback(seq_index, record)`` is called after each sequence is saved.
    """
    import time

    started = time.time()
    layers = _check_layers(model, layers)
    if corpus is None:
        corpus = _default_corpus(model)
    seqs = tokenize_corpus(model, corpus, max_seq_len=max_seq_len)
    from moelens.audit.ablation import SCOPES, SEMANTICS

    if ablation_scope not in SCOPES or semantics not in SEMANTICS:
        raise ValueError(f"ablation_scope must be one of {SCOPES} and semantics one of {SEMANTICS}, "
                         f"got {ablation_scope!r}, {semantics!r}")
    settings = _settings(model, seqs, layers, n_positions, seed, renormalize, max_seq_len, ablation_scope, semantics)
    out = Path(out_dir) if out_dir is not None else None
    done: list[dict] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _check_settings(out, settings, {"model": getattr(model, "name_or_path", None), "metrics": list(metrics),
                                        "scope": scope, "max_batch": max_batch, "batch_size": batch_size})
        done = _read_effects(out / "effects.jsonl")

    # observational statistics (once)
    stats_path = out / "stats.json" if out is not None else None
    if stats_path is not None and stats_path.is_file():
        stats = _stats_from_json(json.loads(stats_path.read_text()))
    else:
        stats = expert_statistics(model, seqs, layers=layers, batch_size=batch_size, progress=progress)
        if stats_path is not None:
            _write_json(stats_path, _stats_to_json(stats))

    # interventional effects, sequence by sequence
    records = list(done)
    finished = {r["seq"] for r in done}
    todo = [i for i in range(len(seqs)) if i not in finished]
    bar = _progress(todo, progress, desc="expert ablations", unit="seq", total=len(seqs), initial=len(finished))
    for i in bar:
        positions = sample_positions(len(seqs[i]), n_positions, seed, i)
        cols = _sequence_effects(model, seqs[i], layers, positions, renormalize, max_batch, ablation_scope, semantics)
        rec = {"seq": i, "n_tokens": len(seqs[i]), "positions": positions, "effects": cols}
        if out is not None:
            with open(out / "effects.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        records.append(rec)
        if callback is not None:
            callback(i, rec)
    records.sort(key=lambda r: r["seq"])

    effects = _effects_frame(records)
    summary, pairs = summarize(effects, stats, metrics=metrics, scope=scope)
    result = AuditResult(summary=summary, stats=stats, effects=effects, pairs=pairs, settings=settings,
                         scope=scope, out_dir=out, run_seconds=time.time() - started)
    if out is not None:
        summary.to_csv(out / "summary.csv", index=False)
        from moelens.plotting.audit_report import write_audit_report

        write_audit_report(result, out / "report.html")  # one file, every figure
    return result
