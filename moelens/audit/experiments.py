"""The audit paper's further experiments from the command line (``moelens audit --experiments``):
:func:`~moelens.audit.paper.progressive_ablation` and :func:`~moelens.audit.paper.redistribution`,
run layer by layer into the audit's output directory next to its other files.

Each experiment keeps its own settings fingerprint, ``{name}_settings.json`` (model weights,
dtype, the corpus rows, the layers and every setting that changes its numbers), and one
``{name}_layer_{l}.json`` per finished layer. A rerun with the same settings loads the finished
layers instead of recomputing them (and says so); a rerun with other settings raises
:class:`~moelens.audit.run.AuditSettingsError` naming what differs, before anything runs. The
tables are written at the end: ``progressive_summary.csv``, ``progressive_steps.csv``,
``redistribution_experts.csv``, ``redistribution_correlations.csv``. The progressive ablation's
``cliff`` threshold is analysis-only (recomputed from the stored steps, recorded in
``progressive_summary.csv`` as ``cliff_threshold``), like the audit's ``scope``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from moelens.errors import MoelensUserError
from moelens.rundir import holds_run_dir

EXPERIMENTS = ("progressive", "redistribution")
EXPERIMENTS_VERSION = 1
CORRELATIONS = {  # redistribution's Spearman correlations across experts: (x, y)
    "rw_gap": ("mean_routing_weight", "mean_gap_norm"),
    "gap_relcomp": ("mean_gap_norm", "relative_compensation"),
    "rw_relcomp": ("mean_routing_weight", "relative_compensation"),
    "cos_gap": ("compensation_cosine", "mean_gap_norm"),
}


def parse_experiments(text: Optional[str]) -> list[str]:
    """``"progressive,redistribution"`` / ``"all"`` / ``"none"`` -> the experiment names, in order."""
    if text is None or text.strip().lower() in ("", "none"):
        return []
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(EXPERIMENTS)
    bad = [n for n in names if n not in EXPERIMENTS]
    if bad:
        raise MoelensUserError(f"--experiments: unknown experiment {', '.join(map(repr, bad))}; give a comma-separated "
                               f"list of {', '.join(EXPERIMENTS)}, or all, or none (got {text!r})")
    return list(dict.fromkeys(names))


@dataclasses.dataclass
class ExperimentConfig:
    """The experiments' settings (the defaults are the paper's scripts')."""

    progressive_positions: int = 500  # targets, one per document
    k_max: Optional[int] = None  # remove the top-1..k_max experts (None: top_k - 1)
    cliff: float = 0.1  # nats; analysis-only
    min_context: int = 32  # tokens before the earliest target
    redistribution_texts: int = 200
    min_chars: int = 100  # rows longer than this (stripped) enter both experiments
    max_length: int = 256  # tokens per row (truncation)
    seed: int = 42  # progressive: random.Random(seed) shuffles the rows and draws the targets
    scope: str = "sequence"  # progressive removal scope (the paper: sequence)
    semantics: str = "zero"  # progressive removal semantics (the paper: zero)
    max_batch: int = 32  # rows per forward; does not change the numbers

    def validate(self, model) -> "ExperimentConfig":
        from moelens.audit.ablation import SCOPES, SEMANTICS

        for name in ("progressive_positions", "redistribution_texts", "min_context"):
            if getattr(self, name) < 1:
                raise MoelensUserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_length < 2:
            raise MoelensUserError(f"--experiment-max-length must be at least 2 tokens, got {self.max_length}")
        if self.min_chars < 0:
            raise MoelensUserError(f"--experiment-min-chars must be >= 0, got {self.min_chars}")
        top_k = model.cfg.top_k
        k_max = self.k_max if self.k_max is not None else top_k - 1
        if not 1 <= k_max <= top_k:
            raise MoelensUserError(f"--progressive-k-max must be between 1 and the model's top_k ({top_k}), got {k_max}"
                                   + (" (top_k - 1 by default; pass --progressive-k-max 1)" if self.k_max is None else ""))
        if self.scope not in SCOPES or self.semantics not in SEMANTICS:
            raise MoelensUserError(f"progressive ablation: scope must be one of {SCOPES} and semantics one of "
                                   f"{SEMANTICS}, got {self.scope!r}, {self.semantics!r}")
        return dataclasses.replace(self, k_max=k_max)


def _rows_sha256(rows: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(rows).encode()).hexdigest()


def experiment_settings(name: str, model, rows: Sequence[str], layers: Sequence[int], cfg: ExperimentConfig) -> dict:
    """The fingerprint of one experiment: what its numbers depend on."""
    from moelens.audit.run import _model_fingerprint

    common = {"experiment": name, "version": EXPERIMENTS_VERSION, "model": _model_fingerprint(model),
              "dtype": str(model.cfg.dtype), "corpus_sha256": _rows_sha256(rows), "n_rows": len(rows),
              "layers": [int(l) for l in layers], "min_chars": cfg.min_chars, "max_length": cfg.max_length}
    if name == "progressive":
        return {**common, "n_positions": cfg.progressive_positions, "seed": cfg.seed, "min_context": cfg.min_context,
                "k_max": cfg.k_max, "scope": cfg.scope, "semantics": cfg.semantics}
    return {**common, "n_texts": cfg.redistribution_texts}


def _check(out: Path, name: str, settings: dict) -> bool:
    """True when ``out`` holds this experiment with the same settings; False when it holds none of
    its files; :class:`AuditSettingsError` otherwise. Writes nothing."""
    from moelens.audit.run import AuditSettingsError

    path = out / f"{name}_settings.json"
    if not path.is_file():
        left = sorted(p.name for p in out.glob(f"{name}_*")) if out.is_dir() else []
        if left:
            raise AuditSettingsError(f"{out} holds {', '.join(left[:3])} but no {path.name}: settings unknown, so "
                                     f"they cannot be reused; use a fresh output directory or delete {out}/{name}_*")
        return False
    old = json.loads(path.read_text()).get("fingerprint", {})
    if old != settings:
        diff = [f"{k}: stored {old.get(k)!r}, now {settings.get(k)!r}"
                for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        raise AuditSettingsError(
            f"Refusing to run --experiments {name} in {out}: its results there were computed with different "
            f"settings ({'; '.join(diff)}). Rerun with the original settings, use a fresh output directory, "
            f"or delete {out}/{name}_*.")
    return True


@dataclasses.dataclass
class Plan:
    """One experiment, checked and ready to run (see :func:`plan_experiments`)."""

    name: str
    settings: dict
    info: dict
    layers: list
    cfg: ExperimentConfig
    rows: list
    resumed: bool = False
    positions: Optional[list] = None  # progressive: (tokens, target) pairs


def plan_experiments(names: Sequence[str], model, rows: Sequence[str], layers: Sequence[int], cfg: ExperimentConfig,
                     out_dir=None, info: Optional[dict] = None) -> list[Plan]:
    """Validate the settings, draw the progressive positions and check each experiment's
    fingerprint in ``out_dir`` (raising on a mismatch) without running or writing anything, so
    that a refusal comes before the audit itself runs."""
    cfg = cfg.validate(model)
    rows = [str(r) for r in rows]
    bad = [l for l in layers if l not in model.cfg.moe_layers]
    if bad:
        raise MoelensUserError(f"layers {bad} are not sparse (MoE) layers; sparse layers are {list(model.cfg.moe_layers)}")
    if model.tokenizer is None:
        raise MoelensUserError("--experiments tokenise the corpus rows with the checkpoint's tokenizer; this model has none")
    long_rows = sum(len(r.strip()) > cfg.min_chars for r in rows)
    if names and not long_rows:
        raise MoelensUserError(f"--experiments: no corpus row is longer than {cfg.min_chars} characters (of {len(rows)} "
                               f"rows); lower --experiment-min-chars")
    out = Path(out_dir) if out_dir is not None else None
    plans = []
    for name in names:
        settings = experiment_settings(name, model, rows, layers, cfg)
        plan = Plan(name, settings, {"model": getattr(model, "name_or_path", None), "max_batch": cfg.max_batch,
                                     **(info or {})}, list(layers), cfg, rows)
        plan.resumed = _check(out, name, settings) if out is not None else False
        if name == "progressive":
            from moelens.audit.paper import progressive_positions

            plan.positions = progressive_positions(model, rows, n_positions=cfg.progressive_positions, seed=cfg.seed,
                                                   min_chars=cfg.min_chars, max_length=cfg.max_length,
                                                   min_context=cfg.min_context)
            if not plan.positions:
                raise MoelensUserError(f"--experiments progressive: no row over {cfg.min_chars} characters has more than "
                                       f"{cfg.min_context} tokens; lower --progressive-min-context or --experiment-min-chars")
        plans.append(plan)
    return plans


def _frame_records(df: pd.DataFrame) -> list[dict]:
    return df.to_dict(orient="records")  # python scalars: exact in JSON (NaN as NaN)


def _progressive_layer(model, plan: Plan, layer: int) -> dict:
    from moelens.audit.paper import progressive_ablation

    _, steps = progressive_ablation(model, plan.positions, [layer], k_max=plan.cfg.k_max, cliff=plan.cfg.cliff,
                                    semantics=plan.cfg.semantics, scope=plan.cfg.scope, max_batch=plan.cfg.max_batch)
    return {"layer": layer, "steps": _frame_records(steps)}


def _redistribution_layer(model, plan: Plan, layer: int) -> dict:
    from moelens.audit.paper import redistribution

    frame, corr = redistribution(model, plan.rows, layer, max_length=plan.cfg.max_length, min_chars=plan.cfg.min_chars,
                                 n_texts=plan.cfg.redistribution_texts)
    return {"layer": layer, "experts": _frame_records(frame), "correlations": corr}


@holds_run_dir("audit")
def run_planned(plans: Sequence[Plan], model, out_dir=None, progress: bool = True) -> dict:
    """Run (or load, layer by layer) each planned experiment; write its tables into ``out_dir``.

    Returns ``{name: result}``; ``progressive``: ``summary`` (per layer x k, see
    :func:`~moelens.audit.paper.progressive_ablation`, plus ``cliff_threshold``), ``steps``;
    ``redistribution``: ``experts`` (per layer x expert), ``correlations`` (per layer x pair:
    ``x``, ``y``, ``rho``, ``p``, ``n_experts``). Each also has ``settings``, ``info``,
    ``computed_layers`` and ``loaded_layers`` (finished before, same settings)."""
    from moelens.audit.corpus import _progress
    from moelens.audit.paper import progressive_summary
    from moelens.audit.run import _write_json

    out = Path(out_dir) if out_dir is not None else None
    results = {}
    for plan in plans:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            if not (out / f"{plan.name}_settings.json").is_file():
                _write_json(out / f"{plan.name}_settings.json", {"fingerprint": plan.settings, "info": plan.info})
        compute = _progressive_layer if plan.name == "progressive" else _redistribution_layer
        recs, computed, loaded = [], [], []
        for layer in _progress(plan.layers, progress, desc=f"{plan.name} experiment", unit="layer"):
            path = out / f"{plan.name}_layer_{layer}.json" if out is not None else None
            if path is not None and path.is_file():
                rec = json.loads(path.read_text())
                loaded.append(layer)
            else:
                rec = compute(model, plan, layer)
                if path is not None:
                    _write_json(path, rec)
                computed.append(layer)
            recs.append(rec)
        res = {"settings": plan.settings, "info": plan.info, "computed_layers": computed, "loaded_layers": loaded}
        if plan.name == "progressive":
            steps = pd.concat([pd.DataFrame(r["steps"]) for r in recs], ignore_index=True)
            summary = progressive_summary(steps, cliff=plan.cfg.cliff)
            summary["cliff_threshold"] = plan.cfg.cliff
            res.update(summary=summary, steps=steps)
            tables = {"progressive_summary.csv": summary, "progressive_steps.csv": steps}
        else:
            experts = pd.concat([pd.DataFrame(r["experts"]).assign(layer=r["layer"]) for r in recs], ignore_index=True)
            experts = experts[["layer", *[c for c in experts.columns if c != "layer"]]]
            corr = []
            for r in recs:
                n = int(pd.DataFrame(r["experts"]).dropna().shape[0])
                for pair, (x, y) in CORRELATIONS.items():
                    c = r["correlations"][pair]
                    corr.append({"layer": r["layer"], "pair": pair, "x": x, "y": y, "rho": c["rho"], "p": c["p"],
                                 "n_experts": n})
            res.update(experts=experts, correlations=pd.DataFrame(corr))
            tables = {"redistribution_experts.csv": experts, "redistribution_correlations.csv": res["correlations"]}
        if out is not None:
            for fname, df in tables.items():
                df.to_csv(out / fname, index=False)
            res["files"] = [f"{plan.name}_settings.json", *tables]
        results[plan.name] = res
    return results


def format_summary(results: dict) -> str:
    """The printed summary: mean Delta CE per layer and k with the cliff; the Spearman correlations."""
    lines = []
    if "progressive" in results:
        r = results["progressive"]
        s, st = r["summary"], r["settings"]
        n = int(r["steps"]["position_index"].nunique()) if len(r["steps"]) else 0
        lines.append(f"progressive ablation ({n} positions, removal {st['scope']}/{st['semantics']}): mean Delta CE "
                     f"(nats) after removing the top-k experts; cliff = first k with mean > {r['summary']['cliff_threshold'].iloc[0]:g}")
        wide = s.pivot(index="layer", columns="k", values="mean")
        wide.columns = [f"k={k}" for k in wide.columns]
        cl = s.groupby("layer")["cliff"].first()
        wide["cliff"] = [("none" if pd.isna(v) else f"k={int(v)}") for v in cl.reindex(wide.index)]
        from moelens.formatting import format_number

        lines.append(wide.reset_index().to_string(index=False, float_format=format_number))
        lines.append(_provenance(r))
    if "redistribution" in results:
        r = results["redistribution"]
        c = r["correlations"]
        lines.append("redistribution: Spearman rho across experts (p)")
        wide = c.assign(cell=[f"{rho:+.3f} ({p:.3g})" for rho, p in zip(c["rho"], c["p"])]).pivot(
            index="layer", columns="pair", values="cell")[list(CORRELATIONS)]
        lines.append(wide.reset_index().to_string(index=False))
        lines.append(_provenance(r))
    return "\n".join(lines)


def _provenance(r: dict) -> str:
    parts = []
    if r["computed_layers"]:
        parts.append(f"computed layers {', '.join(map(str, r['computed_layers']))}")
    if r["loaded_layers"]:
        parts.append(f"loaded layers {', '.join(map(str, r['loaded_layers']))} (finished before with the same settings)")
    return "  (" + "; ".join(parts) + ")"
