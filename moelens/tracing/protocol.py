"""The dataset protocol of expert-aware causal tracing, resumable.

1. **Screen** every case: clean contrast, corrupted contrast (noise on the subject), and the
   contrast with each sparse layer's MoE output restored at the traced position. Keep cases with
   ``clean >= min_clean`` and ``clean - corrupted >= min_drop``. Cases are split into discovery and
   validation halves (seeded shuffle).
2. **Pick the layer** with the highest mean normalised rescue on discovery cases.
3. **Trace experts** at that layer for every kept case: each expert's rescue, the clean- and
   noise-routed sets, and the two coalitions (clean-routed, clean-or-noise union).
4. **Select the expert** recurrence-first on discovery: clean-active in at least ``recurrence`` of
   discovery cases, then highest mean rescue. **Evaluate on validation**: layer rescue, expert
   rescue, specificity (expert rescue minus that of a random other clean-active expert of the
   layer), coalition rescues; bootstrap CIs and sign-flip tests.

With ``screen="attribution"`` (``moelens trace --screen attribution``) step 1's layer scores are
first-order estimates (:mod:`moelens.tracing.attribution`, one backward pass per case for every
layer) and step 3 screens every expert of the chosen layer the same way and re-scores the
``n_verify`` highest exactly: ``experts.jsonl`` lists them in ``verified`` (the other
``expert_scores`` are estimates). Coalitions and the layer score of step 3 stay exact.

Normalised rescue = ``(patched - corrupted) / (clean - corrupted)``. Each case's results are
appended to JSONL files as it finishes (``screen.jsonl``, ``experts.jsonl``); a rerun with the same
``out_dir`` and settings skips finished cases and prints what each phase has done. One run at a time
holds ``out_dir`` (:mod:`moelens.rundir`): :func:`run_protocol` and :func:`merge` refuse a directory
another run is writing into, or one holding another command's results.

Resuming cannot mix runs (:mod:`moelens.tracing.fingerprint`): ``settings.json`` records every
setting that changes a case's numbers, the facts source and the model's content fingerprint; each
result line carries its case's content hash and the run's settings hash. A rerun whose settings,
facts source or model differ, or whose selected case differs from the one stored under the same
key, raises :class:`~moelens.tracing.fingerprint.ResumeError` naming what differs with both values.
A rerun with more cases (a larger ``--limit``) computes only the new cases (and redoes expert
tracing where the chosen layer changes); the summary-only settings (``n_bootstrap``,
``n_permutations``, ``recurrence``) just re-summarise. A line torn by a crash is removed on resume.

Several processes (``torchrun --nproc_per_node N -m moelens.cli trace ...`` or ``accelerate launch``):
cases are sharded by rank (``RANK``/``WORLD_SIZE`` from the environment), each process appends to its
own ``screen.rank{r}.jsonl`` / ``experts.rank{r}.jsonl``, ranks meet at a barrier (gloo/NCCL when a
process group is set up, files otherwise) before the layer choice and before the summary, and rank 0
writes the merged summary. :func:`merge` (``moelens merge --trace-dir DIR``) summarises any directory later.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from moelens.rundir import holds_run_dir
from moelens.tracing.cases import FactCase
from moelens.tracing.cases import case_key as _case_key
from moelens.tracing.fingerprint import (
    ResumeError, case_fingerprint, facts_identity, model_fingerprint, settings_fingerprint,
)
from moelens.tracing.stats import bootstrap_ci, sign_flip_test
from moelens.tracing.trace import (
    coalition_score, prepare, resolve_positions, subject_embedding_std, trace_experts,
)
from moelens.tracing.trace import routed_sets


@dataclass(frozen=True)
class ProtocolConfig:
    min_clean: float = 1.0
    min_drop: float = 0.5
    noise_scale: float = 3.0
    n_samples: int = 1  # the preprint uses one noise draw per case
    seed: int = 0
    position: str = "last"
    discovery_fraction: float = 0.5
    recurrence: float = 0.5
    n_bootstrap: int = 5000
    n_permutations: int = 10000
    prepend_bos: Optional[bool] = None
    layers: Optional[tuple[int, ...]] = None  # candidate layers (default: every sparse layer)
    # sigma = noise_scale * std(W_E) ("embedding"), or * the subject tokens' embedding std ("subjects": the
    # noised tokens only; "subjects_rome": ROME's collect_embedding_std, the tokenizer's special tokens included)
    noise_reference: str = "embedding"
    screen: str = "exact"  # or "attribution": first-order layer and expert screen, top n_verify experts exact
    n_verify: int = 10  # with screen="attribution": experts per case re-scored exactly at the chosen layer


FORMAT = 2  # results carry case and settings fingerprints
# do not change a case's numbers (skipped_records: malformed records of the facts file, kept for merge's counts)
SUMMARY_ONLY = ("model", "n_cases", "n_bootstrap", "n_permutations", "recurrence", "skipped_records")


class ProtocolError(ValueError):
    """The protocol cannot produce a summary (no case passed the filter on one side of the split)."""


def _compared(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in SUMMARY_ONLY}


def _rescue(value, clean, corrupted):
    denom = clean - corrupted
    return (value - corrupted) / denom if denom else float("nan")


def _argmax(keys, values) -> object:
    """The first of ``keys`` with the highest ``values[k]``; NaN counts as lowest (plain ``max`` keeps a
    leading NaN, since every comparison with it is false)."""
    return max(keys, key=lambda k: values[k] if np.isfinite(values[k]) else -np.inf)


def world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed or the launcher's environment."""
    import os

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier(out_dir: Path, name: str, rank: int, world_size: int, timeout: float = 24 * 3600) -> None:
    if world_size == 1:
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        return
    import time

    (out_dir / f".{name}.rank{rank}.done").write_text("done")
    start = time.time()
    while not all((out_dir / f".{name}.rank{r}.done").exists() for r in range(world_size)):
        if time.time() - start > timeout:
            raise TimeoutError(f"rank {rank}: other ranks did not finish {name} within {timeout:.0f}s")
        time.sleep(0.2)


class _Store:
    """Append-only JSONL files keyed by case, with a settings fingerprint for safe resumes.

    With several ranks each appends to ``<name>.rank{r}.jsonl``; reads merge every rank's file."""

    def __init__(self, out_dir: Path, settings: dict, rank: int = 0, world_size: int = 1):
        self.dir = Path(out_dir)
        self.rank, self.world_size = rank, world_size
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "settings.json"
        if world_size > 1 and rank != 0:
            import time

            start = time.time()
            while not path.exists() and time.time() - start < 600:
                time.sleep(0.1)
        if path.exists():
            old = json.loads(path.read_text())
            _check_settings(self.dir, old, settings)
            if rank == 0 and old != settings:  # summary-only settings and the case count follow the latest run
                self._write_settings(path, settings)
        else:
            self._write_settings(path, settings)
        self.run = settings_fingerprint(_compared(settings))
        for name in ("screen.jsonl", "experts.jsonl"):
            _repair(self._file(name))

    def _write_settings(self, path: Path, settings: dict) -> None:
        tmp = path.with_suffix(f".tmp{self.rank}")
        tmp.write_text(json.dumps(settings, indent=1))
        tmp.replace(path)

    def _file(self, name: str) -> Path:
        return self.dir / (name if self.world_size == 1 else name.replace(".jsonl", f".rank{self.rank}.jsonl"))

    def read(self, name: str) -> dict:
        out = {}
        for path in [self.dir / name, *sorted(self.dir.glob(name.replace(".jsonl", ".rank*.jsonl")))]:
            if not path.exists():
                continue
            for line in path.read_text().splitlines():
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a crash (another rank's file): redo that case
                        continue
                    if rec.get("run") != self.run:
                        raise ResumeError(
                            f"{path} holds results of another run (settings hash {rec.get('run')!r}, this "
                            f"directory's settings.json: {self.run!r}): it was copied in or written by an older "
                            f"moelens; move it out, or start over in another --out directory"
                        )
                    out[rec["key"]] = rec
        return out

    def append(self, name: str, record: dict) -> None:
        path = self._file(name)
        torn = False
        if path.exists() and path.stat().st_size:
            with open(path, "rb") as f:
                f.seek(-1, 2)
                torn = f.read(1) != b"\n"
        with open(path, "a") as f:
            f.write(("\n" if torn else "") + json.dumps(record) + "\n")
            f.flush()


def _repair(path: Path) -> None:
    """Remove lines that do not parse (a line torn by a crash) so the JSONL stays readable (pandas)."""
    if not path.exists() or not path.stat().st_size:
        return
    data = path.read_bytes()
    good = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError:
            continue
        good.append(line)
    fixed = b"".join(line + b"\n" for line in good)
    if fixed != data:
        tmp = path.with_suffix(".repair")
        tmp.write_bytes(fixed)
        tmp.replace(path)


def _check_settings(out_dir: Path, old: dict, new: dict) -> None:
    """Refuse to resume a run whose case-affecting settings differ (one line, both values)."""
    if old.get("format") != FORMAT:
        raise ResumeError(
            f"{out_dir} holds a run written by an older moelens, without case fingerprints, so resuming it "
            f"could mix results: use another --out directory, or delete it to start over"
        )
    a, b = _compared(old), _compared(new)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) == b.get(k):
            continue
        if k == "model_fingerprint":
            diffs.append(f"model: {old.get('model')!r} (fingerprint {a.get(k)}) there, {new.get('model')!r} "
                         f"(fingerprint {b.get(k)}) now")
        else:
            diffs.append(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now")
    if diffs:
        raise ResumeError(
            f"{out_dir} holds a run with different settings ({'; '.join(diffs)}): use another --out directory, "
            f"or delete it to start over"
        )


def _check_cases(out_dir: Path, records: dict, keys: list, cases: Sequence[FactCase], hashes: dict) -> None:
    """Refuse stored results whose case is not the selected record with the same key."""
    for key, case in zip(keys, cases):
        rec = records.get(key)
        if rec is None or rec.get("case_hash") == hashes[key]:
            continue
        old, new = rec.get("case") or {}, case.to_dict()
        diff = [f for f in new if old.get(f) != new.get(f)]
        what = (f"{diff[0]} {old.get(diff[0])!r} there, {new.get(diff[0])!r} now" if diff
                else f"content hash {rec.get('case_hash')} there, {hashes[key]} now")
        raise ResumeError(
            f"case {key!r} in {out_dir} was traced from a different record ({what}): the facts changed; use "
            f"another --out directory, or delete it to start over"
        )


def _split(keys: list[str], fraction: float, seed: int) -> dict[str, str]:
    order = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    n_disc = int(round(len(order) * fraction))
    return {k: ("discovery" if i < n_disc else "validation") for i, k in enumerate(order)}


def screen_case(model, case: FactCase, cfg: ProtocolConfig, layers: Sequence[int], seed: int,
                sigma: Optional[float] = None) -> dict:
    """Clean/corrupted contrast and per-layer MoE-output restoration at the traced position."""
    setup = prepare(model, case, seed=seed, n_samples=cfg.n_samples, noise_scale=cfg.noise_scale,
                    prepend_bos=cfg.prepend_bos, sigma=sigma)
    pos = resolve_positions(cfg.position, setup.tokenized)
    # every layer's MoE output restored, the rows of all layers in one engine pass
    scores = setup.restore_scores_at(model, [(l, setup.layer_delta(l, pos)) for l in layers], pos).tolist()
    keep = setup.clean >= cfg.min_clean and setup.clean - setup.corrupted >= cfg.min_drop
    return {
        "clean": setup.clean, "corrupted": setup.corrupted, "kept": bool(keep),
        "layer_scores": {str(l): float(s) for l, s in zip(layers, scores)},
        "warnings": list(setup.tokenized.warnings),
    }


def expert_case(model, case: FactCase, cfg: ProtocolConfig, layer: int, seed: int,
                sigma: Optional[float] = None) -> dict:
    setup = prepare(model, case, seed=seed, n_samples=cfg.n_samples, noise_scale=cfg.noise_scale,
                    prepend_bos=cfg.prepend_bos, sigma=sigma)
    r = trace_experts(model, setup, layer, positions=cfg.position, progress=False)
    pos = resolve_positions(cfg.position, setup.tokenized)
    union = sorted(set(r.clean_routed) | set(r.noise_routed))
    return {
        "clean": setup.clean, "corrupted": setup.corrupted, "layer": layer, "layer_score": r.layer_score,
        "expert_scores": [float(s) for s in r.scores], "clean_routed": r.clean_routed, "noise_routed": r.noise_routed,
        "coalition_clean": coalition_score(model, setup, layer, r.clean_routed, pos),
        "coalition_union": coalition_score(model, setup, layer, union, pos),
    }


def screen_case_attribution(model, case: FactCase, cfg: ProtocolConfig, layers: Sequence[int], seed: int,
                            sigma: Optional[float] = None) -> dict:
    """:func:`screen_case` with first-order layer scores (one backward pass for every layer,
    :func:`moelens.tracing.attribution.attribute_experts`) instead of restoring every layer exactly."""
    from moelens.tracing.attribution import attribute_experts

    setup = prepare(model, case, seed=seed, n_samples=cfg.n_samples, noise_scale=cfg.noise_scale,
                    prepend_bos=cfg.prepend_bos, sigma=sigma)
    pos = resolve_positions(cfg.position, setup.tokenized)
    a = attribute_experts(model, setup, positions=pos)
    # a set of positions is restored jointly: the first-order estimate is the sum over positions
    est = setup.corrupted + (a.layer_scores - setup.corrupted).sum(-1)
    keep = setup.clean >= cfg.min_clean and setup.clean - setup.corrupted >= cfg.min_drop
    return {
        "clean": setup.clean, "corrupted": setup.corrupted, "kept": bool(keep),
        "layer_scores": {str(l): float(est[l]) for l in layers}, "layer_scores_method": "attribution",
        "warnings": list(setup.tokenized.warnings),
    }


def expert_case_attribution(model, case: FactCase, cfg: ProtocolConfig, layer: int, seed: int,
                            sigma: Optional[float] = None) -> dict:
    """:func:`expert_case` screening every expert of ``layer`` by attribution and re-scoring the
    ``cfg.n_verify`` highest exactly; ``expert_scores`` mixes exact values (experts in ``verified``)
    with first-order estimates (the rest). The layer score and coalitions are exact."""
    from moelens.tracing.attribution import screen_experts

    setup = prepare(model, case, seed=seed, n_samples=cfg.n_samples, noise_scale=cfg.noise_scale,
                    prepend_bos=cfg.prepend_bos, sigma=sigma)
    s = screen_experts(model, setup, n_verify=cfg.n_verify, positions=cfg.position, layers=[layer])
    pos = resolve_positions(cfg.position, setup.tokenized)
    clean_routed, noise_routed, _ = routed_sets(setup, layer, pos)
    union = sorted(set(clean_routed) | set(noise_routed))
    return {
        "clean": setup.clean, "corrupted": setup.corrupted, "layer": layer, "layer_score": float(s.layer_scores[layer]),
        "expert_scores": [float(v) for v in s.scores[layer]], "clean_routed": clean_routed, "noise_routed": noise_routed,
        "verified": [int(e) for e in s.verified[layer].nonzero().flatten()],
        "expert_estimates": [float(v) for v in s.estimates[layer]],
        "coalition_clean": coalition_score(model, setup, layer, clean_routed, pos),
        "coalition_union": coalition_score(model, setup, layer, union, pos),
    }


@holds_run_dir("trace")  # one run per directory (moelens.rundir)
def run_protocol(
    model,
    cases: Sequence[FactCase],
    out_dir,
    cfg: ProtocolConfig = ProtocolConfig(),
    *,
    model_name: str = "",
    facts_source=None,
    progress: bool = True,
    started: Optional[float] = None,
) -> "ProtocolSummary":
    """Run (or resume) the whole protocol; returns the summary and writes it into ``out_dir``.

    ``facts_source``: where ``cases`` were read from (a path or dataset id), recorded so that a rerun
    into the same ``out_dir`` with another source is refused. ``model_name``: how the model is
    named in the outputs (the model's identity is its content fingerprint). ``started``: the
    ``time.time()`` the run began (default: now; the command line passes its own start, so the
    model's loading counts): the run's wall time is ``summary.run_seconds``, in summary.json and
    the report."""
    import time

    from tqdm.auto import tqdm

    started = time.time() if started is None else float(started)

    if not cases:
        raise ValueError("no cases to trace")
    layers = list(cfg.layers) if cfg.layers else list(model.cfg.moe_layers)
    bad = [l for l in layers if l not in model.cfg.moe_layers]
    if bad:
        raise ValueError(f"layers {bad} are not sparse layers of this model (sparse: {list(model.cfg.moe_layers)})")
    if cfg.screen not in ("exact", "attribution"):
        raise ValueError(f"screen={cfg.screen!r}: use 'exact' or 'attribution'")
    screen_fn, expert_fn = ((screen_case, expert_case) if cfg.screen == "exact"
                            else (screen_case_attribution, expert_case_attribution))
    if cfg.noise_reference in ("subjects", "subjects_rome"):
        sigma = cfg.noise_scale * subject_embedding_std(
            model, cases, tokenization="rome" if cfg.noise_reference == "subjects_rome" else "moelens")
    elif cfg.noise_reference == "embedding":
        sigma = None
    else:
        raise ValueError(f"noise_reference={cfg.noise_reference!r}: use 'embedding', 'subjects' or 'subjects_rome'")
    display, fingerprint = model_fingerprint(model, model_name or None)
    settings = {"format": FORMAT, "model": display, "model_fingerprint": fingerprint,
                "facts": facts_identity(facts_source), "n_cases": len(cases),
                "skipped_records": len(getattr(cases, "skipped", []) or []),
                **{k: v for k, v in asdict(cfg).items()}}
    settings["layers"] = layers
    if cfg.screen == "exact":  # the exhaustive protocol's fingerprint stays what it was
        settings.pop("screen"), settings.pop("n_verify")
    if sigma is not None:  # a per-dataset noise level: more cases change it, and so every case's numbers
        settings["sigma"] = sigma
    rank, world_size = world()
    out_dir = Path(out_dir)
    keys = [_case_key(c, i) for i, c in enumerate(cases)]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"case ids are not unique: {dup[:5]}")
    store = _Store(out_dir, json.loads(json.dumps(settings)), rank, world_size)
    hashes = {k: case_fingerprint(c) for k, c in zip(keys, cases)}
    split = _split(keys, cfg.discovery_fraction, cfg.seed)
    seeds = {k: cfg.seed * 1_000_003 + i for i, k in enumerate(keys)}

    mine = {k for i, k in enumerate(keys) if i % world_size == rank}
    screened = store.read("screen.jsonl")
    traced = store.read("experts.jsonl")
    _check_cases(out_dir, screened, keys, cases, hashes)
    _check_cases(out_dir, traced, keys, cases, hashes)
    if rank == 0 and progress and any(k in screened for k in keys):  # what each phase has done so far
        n_screened = sum(k in screened for k in keys)
        kept_keys = [k for k in keys if k in screened and screened[k].get("kept")]
        at = sorted({traced[k]["layer"] for k in kept_keys if k in traced})
        print(f"resuming: screening {n_screened}/{len(keys)} cases done ({len(kept_keys)} kept); expert tracing "
              f"{sum(k in traced for k in kept_keys)}/{len(kept_keys)} kept cases done"
              + (f" (at layer {', '.join(map(str, at))})" if at else ""))
    todo = [(k, c) for k, c in zip(keys, cases) if k not in screened and k in mine]
    for key, case in tqdm(todo, desc="screening cases", disable=not progress):
        rec = {"key": key, "index": keys.index(key), "case_id": case.case_id, "split": split[key],
               "case_hash": hashes[key], "run": store.run, "case": case.to_dict()}
        try:
            rec.update(screen_fn(model, case, cfg, layers, seeds[key], sigma))
        except (ValueError, IndexError) as exc:  # e.g. a case the tokenizer cannot place
            rec.update(error=f"{type(exc).__name__}: {exc}", kept=False)
            warnings.warn(f"case {key}: {exc}; skipped")
        store.append("screen.jsonl", rec)
        screened[key] = rec
    _barrier(out_dir, "screen", rank, world_size)
    screened = store.read("screen.jsonl")
    for k in keys:  # the split of the current selection (a larger --limit re-splits)
        screened[k]["split"] = split[k]

    kept = [screened[k] for k in keys if screened[k].get("kept")]
    disc = [r for r in kept if r["split"] == "discovery"]
    if not disc:
        raise ProtocolError(
            f"no discovery case passed the filter (clean >= {cfg.min_clean}, drop >= {cfg.min_drop}); "
            f"{len(kept)} of {len(keys)} cases kept in all; trace more cases (--limit) or loosen --min-clean/--min-drop"
        )
    layer_means = {l: float(np.nanmean([_rescue(r["layer_scores"][str(l)], r["clean"], r["corrupted"]) for r in disc]))
                   for l in layers}
    best_layer = _argmax(layer_means, layer_means)

    traced = store.read("experts.jsonl")
    by_key = dict(zip(keys, cases))
    # new cases, and cases traced at another layer before more cases changed the choice
    todo = [r for r in kept if (r["key"] not in traced or traced[r["key"]]["layer"] != best_layer) and r["key"] in mine]
    n_done = sum(traced.get(r["key"], {}).get("layer") == best_layer for r in kept)
    if n_done and rank == 0 and progress:
        print(f"expert tracing at layer {best_layer}: {n_done}/{len(kept)} kept cases done before, "
              f"{len(kept) - n_done} to trace")
    for r in tqdm(todo, desc=f"expert tracing at layer {best_layer}", disable=not progress):
        rec = {"key": r["key"], "case_id": r["case_id"], "split": r["split"], "case_hash": hashes[r["key"]],
               "run": store.run}
        rec.update(expert_fn(model, by_key[r["key"]], cfg, best_layer, seeds[r["key"]], sigma))
        store.append("experts.jsonl", rec)
        traced[r["key"]] = rec
    _barrier(out_dir, "experts", rank, world_size)
    traced = {k: r for k, r in store.read("experts.jsonl").items() if r["layer"] == best_layer}
    for k, r in traced.items():
        r["split"] = split.get(k, r["split"])
    _check_validation(kept, traced, keys, split, cfg)
    summary = summarize(screened, traced, keys, layers, best_layer, layer_means, cfg, model.cfg.n_experts)
    summary.counts["skipped_records"] = len(getattr(cases, "skipped", []) or [])  # malformed records of the file
    summary.run_seconds = time.time() - started
    if rank == 0:
        summary.write(out_dir)
    return summary


def _json_safe(obj):
    """Strict JSON: a NaN or infinite number (an undefined CI, a mean over no case) becomes null."""
    import math

    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _check_validation(kept, traced, keys, split, cfg) -> None:
    val = [k for k in keys if k in traced and split.get(k) == "validation"]
    if not val:
        n_val = sum(r["split"] == "validation" for r in kept)
        raise ProtocolError(
            f"no validation case to evaluate: {len(kept)} of {len(keys)} cases passed the filter (clean >= "
            f"{cfg.min_clean}, drop >= {cfg.min_drop}) and {n_val} of them are validation cases"
            + ("" if n_val else f" (discovery fraction {cfg.discovery_fraction})")
            + "; trace more cases (--limit) or loosen --min-clean/--min-drop"
        )


@holds_run_dir("merge", owner="trace", must_exist=True)
def merge(out_dir, n_experts: Optional[int] = None) -> "ProtocolSummary":
    """Summarise a protocol directory from its files (all ranks' results), e.g. after a multi-process
    run whose rank 0 died, or to recompute statistics."""
    out_dir = Path(out_dir)
    settings_path = out_dir / "settings.json"
    if not settings_path.exists():
        raise FileNotFoundError(f"{out_dir} has no settings.json: not a `moelens trace` output directory")
    settings = json.loads(settings_path.read_text())
    if settings.get("format") != FORMAT:
        raise ResumeError(f"{out_dir} was written by an older moelens, without case fingerprints: its results "
                          f"cannot be checked for a mix of runs; trace again into a new --out directory")
    cfg = ProtocolConfig(**{k: (tuple(v) if k == "layers" and v is not None else v)
                            for k, v in settings.items() if k in ProtocolConfig.__dataclass_fields__})
    store = _Store.__new__(_Store)
    store.dir, store.rank, store.world_size = out_dir, 0, 1
    store.run = settings_fingerprint(_compared(settings))
    screened, traced = store.read("screen.jsonl"), store.read("experts.jsonl")
    if not screened:
        raise ValueError(f"{out_dir} has no screened cases yet")
    # the latest run's selection: its first n_cases cases (an earlier, larger --limit left more lines)
    keys = sorted((k for k in screened if screened[k].get("index", 0) < settings["n_cases"]),
                  key=lambda k: screened[k].get("index", 0))
    if len(keys) < settings["n_cases"]:  # e.g. a rank died before screening its share
        warnings.warn(f"{settings['n_cases'] - len(keys)} of the {settings['n_cases']} selected cases have no "
                      f"screening results; the split and the summary cover the {len(keys)} screened cases only "
                      f"(rerun the trace command to compute the rest)")
    split = _split(keys, cfg.discovery_fraction, cfg.seed)
    for k in keys:
        screened[k]["split"] = split[k]
    layers = settings["layers"]
    kept_disc = [screened[k] for k in keys if screened[k].get("kept") and screened[k]["split"] == "discovery"]
    layer_means = {l: float(np.nanmean([_rescue(r["layer_scores"][str(l)], r["clean"], r["corrupted"]) for r in kept_disc]))
                   for l in layers}
    best_layer = _argmax(layer_means, layer_means)
    traced = {k: r for k, r in traced.items() if k in split and r["layer"] == best_layer}
    for k, r in traced.items():
        r["split"] = split[k]
    if n_experts is None:
        n_experts = len(next(iter(traced.values()))["expert_scores"]) if traced else 0
    missing = [k for k in keys if screened[k].get("kept") and k not in traced]
    if missing:
        warnings.warn(f"{len(missing)} kept cases have no expert results yet (e.g. {missing[:3]}); summarising the rest")
    kept = [screened[k] for k in keys if screened[k].get("kept")]
    _check_validation(kept, traced, keys, split, cfg)
    summary = summarize(screened, traced, keys, layers, best_layer, layer_means, cfg, n_experts)
    skipped = settings.get("skipped_records")
    if skipped is None:  # a directory written before settings.json kept the count: the last summary's
        try:
            skipped = json.loads((out_dir / "summary.json").read_text())["counts"]["skipped_records"]
        except (OSError, ValueError, KeyError, TypeError):
            skipped = None
    if skipped is not None:
        summary.counts["skipped_records"] = skipped
    previous = out_dir / "summary.json"
    if previous.exists():  # the run's wall time stays the run's (merging takes a second)
        try:
            summary.run_seconds = json.loads(previous.read_text()).get("run_seconds")
        except (json.JSONDecodeError, AttributeError):
            pass
    summary.write(out_dir)
    return summary


@dataclass
class ProtocolSummary:
    table: "object"  # pandas DataFrame: quantity, estimate, ci_low, ci_high, p_value, n
    layer: int
    expert: int
    layer_means: dict
    expert_means: list  # discovery mean rescue per expert at the chosen layer
    expert_recurrence: list  # discovery fraction of cases where each expert was clean-active
    counts: dict
    splits: Optional[dict] = None  # case key -> "discovery" / "validation", for the current selection
    run_seconds: Optional[float] = None  # wall time of the run that computed it (run_protocol's `started` to the end)

    def write(self, out_dir: Path) -> None:
        self.table.to_csv(out_dir / "summary.csv", index=False)
        (out_dir / "summary.json").write_text(json.dumps(_json_safe({
            "layer": self.layer, "expert": self.expert, "layer_means": self.layer_means,
            "expert_means": self.expert_means, "expert_recurrence": self.expert_recurrence, "counts": self.counts,
            "splits": self.splits, "table": self.table.to_dict(orient="records"), "run_seconds": self.run_seconds,
        }), indent=1, allow_nan=False))
        from moelens.plotting.trace_report import write_trace_report

        write_trace_report(out_dir, self)  # report.html: every figure, one file

    def plot(self, title: Optional[str] = None):
        """The validation quantities with their 95% bootstrap CIs."""
        from moelens.plotting.tracing import protocol_summary

        return protocol_summary(self.table, title=title or "Validation: rescue with 95% bootstrap CIs")

    def __str__(self) -> str:
        from moelens.formatting import format_p
        from moelens.plotting.report import format_duration

        c = self.counts
        n_skip = c.get("skipped_records") or 0
        skipped = f" (+ {n_skip} malformed record{'s' if n_skip != 1 else ''} skipped)" if n_skip else ""
        head = (f"cases: {c['total']} total{skipped}, {c['kept']} kept ({c['discovery']} discovery / {c['validation']} "
                f"validation), {c['errors']} errors, {c['multi_token_targets']} multi-token targets, "
                f"{c['same_first_token']} identical true/foil first tokens\nlayer {self.layer} (chosen on discovery), "
                f"expert L{self.layer}E{self.expert:03d}")
        table = self.table.copy()
        if "p_value" in table:
            table["p_value"] = [format_p(p) for p in table["p_value"]]
        from moelens.formatting import format_number

        run = f"\nrun time {format_duration(self.run_seconds)}" if self.run_seconds is not None else ""
        return head + run + "\n" + table.to_string(index=False, float_format=format_number)


def summarize(screened, traced, keys, layers, best_layer, layer_means, cfg: ProtocolConfig, n_experts: int) -> ProtocolSummary:
    import pandas as pd

    disc = [traced[k] for k in keys if k in traced and traced[k]["split"] == "discovery"]
    val = [traced[k] for k in keys if k in traced and traced[k]["split"] == "validation"]

    def rescues(r):
        return [_rescue(s, r["clean"], r["corrupted"]) for s in r["expert_scores"]]

    recurrence = [float(np.mean([e in r["clean_routed"] for r in disc])) if disc else 0.0 for e in range(n_experts)]
    means = [float(np.nanmean([rescues(r)[e] for r in disc])) if disc else float("nan") for e in range(n_experts)]
    eligible = [e for e in range(n_experts) if recurrence[e] >= cfg.recurrence] or list(range(n_experts))
    expert = _argmax(eligible, means)
    rng = random.Random(cfg.seed)
    rows = {"layer rescue": [], "expert rescue": [], "specificity": [], "coalition (clean-routed)": [],
            "coalition (clean or noise routed)": []}
    for r in val:
        res = rescues(r)
        rows["layer rescue"].append(_rescue(r["layer_score"], r["clean"], r["corrupted"]))
        rows["expert rescue"].append(res[expert])
        others = [e for e in r["clean_routed"] if e != expert]
        if others:
            rows["specificity"].append(res[expert] - res[rng.choice(others)])
        rows["coalition (clean-routed)"].append(_rescue(r["coalition_clean"], r["clean"], r["corrupted"]))
        rows["coalition (clean or noise routed)"].append(_rescue(r["coalition_union"], r["clean"], r["corrupted"]))
    table = []
    for name, values in rows.items():
        v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
        if len(v) >= 2 and np.ptp(v) > 0:
            mean, lo, hi = bootstrap_ci(v, n_resamples=cfg.n_bootstrap, seed=cfg.seed)
            p = sign_flip_test(v, n_permutations=cfg.n_permutations, seed=cfg.seed)
        else:
            mean, lo, hi, p = (float(v.mean()) if len(v) else float("nan")), float("nan"), float("nan"), float("nan")
        table.append({"quantity": name, "estimate": float(mean), "ci_low": float(lo), "ci_high": float(hi),
                      "p_value": float(p), "n": int(len(v))})
    all_screened = [screened[k] for k in keys]
    warn = [w for r in all_screened for w in r.get("warnings", [])]
    counts = {
        "total": len(keys), "kept": sum(bool(r.get("kept")) for r in all_screened),
        "discovery": len(disc), "validation": len(val), "errors": sum("error" in r for r in all_screened),
        "multi_token_targets": sum(" tokens [" in w and "the metric uses the first" in w for w in warn),
        "same_first_token": sum("share their first token" in w for w in warn)
        + sum("have the same first token" in r.get("error", "") for r in all_screened),
    }
    return ProtocolSummary(table=pd.DataFrame(table), layer=best_layer, expert=expert,
                           layer_means={str(l): v for l, v in layer_means.items()}, expert_means=means,
                           expert_recurrence=recurrence, counts=counts,
                           splits={k: screened[k]["split"] for k in keys})
