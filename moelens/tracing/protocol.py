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
``out_dir`` and settings skips finished cases.

Several processes (``torchrun --nproc_per_node N -m moelens.cli trace ...`` or ``accelerate launch``):
cases are sharded by rank (``RANK``/``WORLD_SIZE`` from the environment), each process appends to its
own ``screen.rank{r}.jsonl`` / ``experts.rank{r}.jsonl``, ranks meet at a barrier (gloo/NCCL when a
process group is set up, files otherwise) before the layer choice and before the summary, and rank 0
writes the merged summary. :func:`merge` (``moelens merge --out DIR``) summarises any directory later.
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

from moelens.tracing.cases import FactCase
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
    noise_reference: str = "embedding"  # sigma = noise_scale * std(W_E), or "subjects": ROME's subject-token std
    screen: str = "exact"  # or "attribution": first-order layer and expert screen, top n_verify experts exact
    n_verify: int = 10  # with screen="attribution": experts per case re-scored exactly at the chosen layer


def _rescue(value, clean, corrupted):
    denom = clean - corrupted
    return (value - corrupted) / denom if denom else float("nan")


def _case_key(case: FactCase, index: int) -> str:
    return str(case.case_id) if case.case_id is not None else f"#{index}"


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
            if old != settings:
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise ValueError(
                    f"{self.dir} holds a run with different settings ({', '.join(diff)}): use another --out "
                    f"directory, or delete it to start over"
                )
        else:
            tmp = path.with_suffix(f".tmp{rank}")
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
                    except json.JSONDecodeError:  # a line cut by a crash: redo that case
                        continue
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
    scores = [float(setup.restore_scores(model, l, [setup.layer_delta(l, pos)], pos)[0]) for l in layers]
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
    :func:`moelens.tracing.attribution.attribute_experts`) instead of one suffix run per layer."""
    from moelens.tracing.attribution import attribute_experts

    setup = prepare(model, case, seed=seed, n_samples=cfg.n_samples, noise_scale=cfg.noise_scale,
                    prepend_bos=cfg.prepend_bos, sigma=sigma, gradients=("mlp",))
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
                    prepend_bos=cfg.prepend_bos, sigma=sigma, gradients=("mlp",))
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


def run_protocol(
    model,
    cases: Sequence[FactCase],
    out_dir,
    cfg: ProtocolConfig = ProtocolConfig(),
    *,
    model_name: str = "",
    progress: bool = True,
) -> "ProtocolSummary":
    """Run (or resume) the whole protocol; returns the summary and writes it into ``out_dir``."""
    from tqdm.auto import tqdm

    if not cases:
        raise ValueError("no cases to trace")
    layers = list(cfg.layers) if cfg.layers else list(model.cfg.moe_layers)
    bad = [l for l in layers if l not in model.cfg.moe_layers]
    if bad:
        raise ValueError(f"layers {bad} are not sparse layers of this model (sparse: {list(model.cfg.moe_layers)})")
    settings = {"model": model_name, "n_cases": len(cases), **{k: v for k, v in asdict(cfg).items()}}
    settings["layers"] = layers
    if cfg.screen not in ("exact", "attribution"):
        raise ValueError(f"screen={cfg.screen!r}: use 'exact' or 'attribution'")
    if cfg.screen == "exact":  # the exhaustive protocol's fingerprint stays what it was
        settings.pop("screen"), settings.pop("n_verify")
    screen_fn, expert_fn = ((screen_case, expert_case) if cfg.screen == "exact"
                            else (screen_case_attribution, expert_case_attribution))
    rank, world_size = world()
    out_dir = Path(out_dir)
    store = _Store(out_dir, json.loads(json.dumps(settings)), rank, world_size)
    keys = [_case_key(c, i) for i, c in enumerate(cases)]
    if len(set(keys)) != len(keys):
        raise ValueError("case ids are not unique")
    split = _split(keys, cfg.discovery_fraction, cfg.seed)
    if cfg.noise_reference == "subjects":
        sigma = cfg.noise_scale * subject_embedding_std(model, cases)
    elif cfg.noise_reference == "embedding":
        sigma = None
    else:
        raise ValueError(f"noise_reference={cfg.noise_reference!r}: use 'embedding' or 'subjects'")
    seeds = {k: cfg.seed * 1_000_003 + i for i, k in enumerate(keys)}

    mine = {k for i, k in enumerate(keys) if i % world_size == rank}
    screened = store.read("screen.jsonl")
    todo = [(k, c) for k, c in zip(keys, cases) if k not in screened and k in mine]
    for key, case in tqdm(todo, desc="screening cases", disable=not progress):
        rec = {"key": key, "index": keys.index(key), "case_id": case.case_id, "split": split[key]}
        try:
            rec.update(screen_fn(model, case, cfg, layers, seeds[key], sigma))
        except (ValueError, IndexError) as exc:  # e.g. a case the tokenizer cannot place
            rec.update(error=f"{type(exc).__name__}: {exc}", kept=False)
            warnings.warn(f"case {key}: {exc}; skipped")
        store.append("screen.jsonl", rec)
        screened[key] = rec
    _barrier(out_dir, "screen", rank, world_size)
    screened = store.read("screen.jsonl")

    kept = [screened[k] for k in keys if screened[k].get("kept")]
    disc = [r for r in kept if r["split"] == "discovery"]
    if not disc:
        raise ValueError(
            f"no discovery case passed the filter (clean >= {cfg.min_clean}, drop >= {cfg.min_drop}); "
            f"{len(kept)} of {len(keys)} cases kept in all"
        )
    layer_means = {l: float(np.nanmean([_rescue(r["layer_scores"][str(l)], r["clean"], r["corrupted"]) for r in disc]))
                   for l in layers}
    best_layer = max(layer_means, key=layer_means.get)

    traced = store.read("experts.jsonl")
    by_key = dict(zip(keys, cases))
    todo = [r for r in kept if r["key"] not in traced and r["key"] in mine]
    for r in tqdm(todo, desc=f"expert tracing at layer {best_layer}", disable=not progress):
        rec = {"key": r["key"], "case_id": r["case_id"], "split": r["split"]}
        rec.update(expert_fn(model, by_key[r["key"]], cfg, best_layer, seeds[r["key"]], sigma))
        store.append("experts.jsonl", rec)
        traced[r["key"]] = rec
    _barrier(out_dir, "experts", rank, world_size)
    traced = store.read("experts.jsonl")
    summary = summarize(screened, traced, keys, layers, best_layer, layer_means, cfg, model.cfg.n_experts)
    if rank == 0:
        summary.write(out_dir)
    return summary


def merge(out_dir, n_experts: Optional[int] = None) -> "ProtocolSummary":
    """Summarise a protocol directory from its files (all ranks' results), e.g. after a multi-process
    run whose rank 0 died, or to recompute statistics."""
    out_dir = Path(out_dir)
    settings_path = out_dir / "settings.json"
    if not settings_path.exists():
        raise FileNotFoundError(f"{out_dir} has no settings.json: not a `moelens trace` output directory")
    settings = json.loads(settings_path.read_text())
    cfg = ProtocolConfig(**{k: (tuple(v) if k == "layers" and v is not None else v)
                            for k, v in settings.items() if k in ProtocolConfig.__dataclass_fields__})
    store = _Store.__new__(_Store)
    store.dir, store.rank, store.world_size = out_dir, 0, 1
    screened, traced = store.read("screen.jsonl"), store.read("experts.jsonl")
    if not screened:
        raise ValueError(f"{out_dir} has no screened cases yet")
    keys = sorted(screened, key=lambda k: screened[k].get("index", 0))
    layers = settings["layers"]
    kept_disc = [screened[k] for k in keys if screened[k].get("kept") and screened[k]["split"] == "discovery"]
    layer_means = {l: float(np.nanmean([_rescue(r["layer_scores"][str(l)], r["clean"], r["corrupted"]) for r in kept_disc]))
                   for l in layers}
    traced_layers = {r["layer"] for r in traced.values()}
    best_layer = traced_layers.pop() if len(traced_layers) == 1 else max(layer_means, key=layer_means.get)
    if n_experts is None:
        n_experts = len(next(iter(traced.values()))["expert_scores"]) if traced else 0
    missing = [k for k in keys if screened[k].get("kept") and k not in traced]
    if missing:
        warnings.warn(f"{len(missing)} kept cases have no expert results yet (e.g. {missing[:3]}); summarising the rest")
    summary = summarize(screened, traced, keys, layers, best_layer, layer_means, cfg, n_experts)
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

    def write(self, out_dir: Path) -> None:
        from moelens import plotting

        self.table.to_csv(out_dir / "summary.csv", index=False)
        (out_dir / "summary.json").write_text(json.dumps({
            "layer": self.layer, "expert": self.expert, "layer_means": self.layer_means,
            "expert_means": self.expert_means, "expert_recurrence": self.expert_recurrence, "counts": self.counts,
            "table": self.table.to_dict(orient="records"),
        }, indent=1))
        plotting.save_html(self.plot(), out_dir / "summary.html")
        layers = [int(l) for l in self.layer_means]
        plotting.save_html(plotting.layer_curve([self.layer_means[l] for l in self.layer_means], layers=layers,
                                                title="Discovery: mean MoE-output rescue per layer"),
                           out_dir / "layer_rescue.html")
        plotting.save_html(plotting.expert_rescue_heatmap(np.array([self.expert_means]), layers=[self.layer],
                                                          title=f"Discovery: mean expert rescue at layer {self.layer}"),
                           out_dir / "expert_rescue.html")

    def plot(self, title: Optional[str] = None):
        """The validation quantities with their 95% bootstrap CIs."""
        from moelens import plotting

        return plotting.protocol_summary(self.table, title=title or "Validation: rescue with 95% bootstrap CIs")

    def __str__(self) -> str:
        c = self.counts
        head = (f"cases: {c['total']} total, {c['kept']} kept ({c['discovery']} discovery / {c['validation']} validation), "
                f"{c['errors']} errors, {c['multi_token_targets']} multi-token targets, {c['same_first_token']} identical "
                f"true/foil first tokens\nlayer {self.layer} (chosen on discovery), expert L{self.layer}E{self.expert:03d}")
        return head + "\n" + self.table.to_string(index=False, float_format=lambda v: f"{v:+.3f}")


def summarize(screened, traced, keys, layers, best_layer, layer_means, cfg: ProtocolConfig, n_experts: int) -> ProtocolSummary:
    import pandas as pd

    disc = [traced[k] for k in keys if k in traced and traced[k]["split"] == "discovery"]
    val = [traced[k] for k in keys if k in traced and traced[k]["split"] == "validation"]

    def rescues(r):
        return [_rescue(s, r["clean"], r["corrupted"]) for s in r["expert_scores"]]

    recurrence = [float(np.mean([e in r["clean_routed"] for r in disc])) if disc else 0.0 for e in range(n_experts)]
    means = [float(np.nanmean([rescues(r)[e] for r in disc])) if disc else float("nan") for e in range(n_experts)]
    eligible = [e for e in range(n_experts) if recurrence[e] >= cfg.recurrence] or list(range(n_experts))
    expert = max(eligible, key=lambda e: means[e])
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
        "same_first_token": sum("share their first token" in w for w in warn),
    }
    return ProtocolSummary(table=pd.DataFrame(table), layer=best_layer, expert=expert,
                           layer_means={str(l): v for l, v in layer_means.items()}, expert_means=means,
                           expert_recurrence=recurrence, counts=counts)
