"""The paired comparison of rankings (:func:`summarize`: top- vs bottom-ranked active expert by
each metric, with paired tests and multiple-comparison corrections) and :class:`AuditResult`."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd

from moelens.audit.constants import CONTROL, METRICS, STAT_COLUMNS
from moelens.tracing import stats as _stats


def _stat_lookup(stats: pd.DataFrame, metric: str, layer: int, n_experts: int) -> np.ndarray:
    sub = stats[stats["layer"] == layer]
    v = np.full(n_experts, np.nan)
    v[sub["expert"].to_numpy(int)] = sub[metric].to_numpy(float)
    return v


def _safe(fn, *args) -> float:
    try:
        out = fn(*args)
    except ValueError:
        return math.nan
    return float(out if not isinstance(out, tuple) else out[1])


def summarize(
    effects: pd.DataFrame,
    stats: pd.DataFrame,
    *,
    metrics: Sequence[str] = METRICS,
    scope: str = "next",
    control: bool = True,
    n_bootstrap: int = 2000,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Compare top- vs bottom-ranked active experts by their interventional effects.

    At each ablated (sequence, layer, position) the routed experts are ranked by each metric's
    corpus-level value from ``stats`` (and, for the ``token_weight`` control, by their combine
    weight at that token); the pair is (highest, lowest). Positions where the two ranks tie are
    skipped. ``scope`` picks the effect: ``"next"`` (``delta_next``) or ``"suffix"``.

    Returns ``(summary, pairs)``. ``summary`` has one row per (metric, layer): ``n`` pairs,
    ``mean_top``, ``mean_bottom``, ``mean_diff`` (top - bottom), its bootstrap 95% CI
    (``ci_lo``, ``ci_hi``), ``frac_top_larger``, ``cohens_d`` (paired), ``t``/``p_t`` (paired
    t-test, two-sided), ``p_wilcoxon`` (two-sided), and ``p_holm``/``p_bh`` (of ``p_t``) and
    ``p_holm_wilcoxon``/``p_bh_wilcoxon``, each corrected across all rows of the table.
    """
    if scope not in ("next", "suffix"):
        raise ValueError(f"scope must be 'next' or 'suffix', got {scope!r}")
    unknown = [m for m in metrics if m not in stats.columns]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; available: {list(STAT_COLUMNS[:-1])}")
    col = f"delta_{scope}"
    if "seq" not in effects.columns:  # effects of a single sequence (expert_effects)
        effects = effects.assign(seq=0)
    n_experts = int(stats["expert"].max()) + 1 if len(stats) else 0
    names = list(metrics) + ([CONTROL] if control else [])
    layers = sorted(set(stats["layer"].tolist()) | set(effects["layer"].tolist() if len(effects) else []))
    rows, pairs = [], []
    for layer in layers:
        sub = effects[effects["layer"] == layer].sort_values(["seq", "position", "slot"], kind="stable")
        k = int(sub["slot"].max()) + 1 if len(sub) else 0
        if len(sub) and len(sub) % k:
            raise ValueError(f"layer {layer}: effects are missing slots (need every slot of each position)")
        g = len(sub) // k if k else 0
        experts = sub["expert"].to_numpy(int).reshape(g, k)
        eff = sub[col].to_numpy(float).reshape(g, k)
        seq = sub["seq"].to_numpy(int).reshape(g, k)[:, 0] if g else np.zeros(0, int)
        pos = sub["position"].to_numpy(int).reshape(g, k)[:, 0] if g else np.zeros(0, int)
        for name in names:
            if name == CONTROL:
                v = sub["weight"].to_numpy(float).reshape(g, k)
            else:
                v = _stat_lookup(stats, name, layer, n_experts)[experts] if g else np.zeros((0, k))
            v = np.where(np.isnan(v), -np.inf, v)  # never-routed experts rank lowest
            top, bot = v.argmax(1), v.argmin(1)
            ar = np.arange(g)
            ok = v[ar, top] > v[ar, bot]
            a, b = eff[ar, top][ok], eff[ar, bot][ok]
            pairs.append(pd.DataFrame({
                "metric": name, "layer": layer, "seq": seq[ok], "position": pos[ok],
                "expert_top": experts[ar, top][ok], "expert_bottom": experts[ar, bot][ok],
                "effect_top": a, "effect_bottom": b,
            }))
            rows.append(_pair_row(name, layer, a, b, n_bootstrap))
    summary = pd.DataFrame(rows)
    for p_col, suffix in (("p_t", ""), ("p_wilcoxon", "_wilcoxon")):
        for adj, fn in (("p_holm", _stats.holm_bonferroni), ("p_bh", _stats.benjamini_hochberg)):
            adjusted = np.full(len(summary), np.nan)
            finite = np.isfinite(summary[p_col].to_numpy(float)) if len(summary) else np.zeros(0, bool)
            if finite.any():
                adjusted[finite] = fn(summary[p_col].to_numpy(float)[finite])
            summary[adj + suffix] = adjusted
    pairs_df = pd.concat(pairs, ignore_index=True) if pairs else pd.DataFrame()
    return summary, pairs_df


def _pair_row(metric: str, layer: int, a: np.ndarray, b: np.ndarray, n_bootstrap: int) -> dict:
    d = a - b
    n = int(d.size)
    row = {"metric": metric, "layer": layer, "n": n,
           "mean_top": float(a.mean()) if n else math.nan, "mean_bottom": float(b.mean()) if n else math.nan,
           "mean_diff": float(d.mean()) if n else math.nan, "ci_lo": math.nan, "ci_hi": math.nan,
           "frac_top_larger": float((d > 0).mean()) if n else math.nan,
           "cohens_d": math.nan, "t": math.nan, "p_t": math.nan, "p_wilcoxon": math.nan}
    if n:
        _, row["ci_lo"], row["ci_hi"] = _stats.bootstrap_ci(d, n_resamples=n_bootstrap, seed=0)
    if n >= 2:
        row["cohens_d"] = _safe(_stats.cohens_d_paired, a, b)
        try:
            t = _stats.paired_t_test(a, b)
            row["t"], row["p_t"] = t.statistic, t.pvalue
        except ValueError:
            pass
        row["p_wilcoxon"] = _safe(_stats.wilcoxon_signed_rank, a, b)
    return row


@dataclasses.dataclass
class AuditResult:
    """Outcome of :func:`run_audit`.

    ``summary``: one row per (metric, layer), see :func:`summarize`. ``stats``: the observational
    statistics (:func:`expert_statistics`). ``effects``: one row per ablation (``seq`` plus the
    columns of :func:`expert_effects`). ``pairs``: the (top, bottom) pairs behind each test.
    """

    summary: pd.DataFrame
    stats: pd.DataFrame
    effects: pd.DataFrame
    pairs: pd.DataFrame
    settings: dict
    scope: str = "next"
    out_dir: Optional[Path] = None
    run_seconds: Optional[float] = None  # wall time of run_audit (shown in the report)

    def expert_table(self) -> pd.DataFrame:
        """Observational statistics joined with each expert's mean interventional effect when
        ablated (``mean_effect``, ``n_ablations``), per (layer, expert)."""
        col = f"delta_{self.scope}"
        if len(self.effects):
            agg = self.effects.groupby(["layer", "expert"])[col].agg(["mean", "count"]).reset_index()
            agg.columns = ["layer", "expert", "mean_effect", "n_ablations"]
        else:
            agg = pd.DataFrame(columns=["layer", "expert", "mean_effect", "n_ablations"])
        out = self.stats.merge(agg, on=["layer", "expert"], how="left")
        out["n_ablations"] = out["n_ablations"].fillna(0).astype(int)
        return out

    def correlations(self) -> pd.DataFrame:
        """Expert-level Spearman correlation, per (metric, layer), between the metric and the
        expert's mean interventional effect (experts never ablated are left out)."""
        from scipy.stats import spearmanr

        table = self.expert_table()
        rows = []
        for metric in [m for m in STAT_COLUMNS if m != "routing_entropy"]:
            for layer, sub in table.groupby("layer"):
                sub = sub.dropna(subset=[metric, "mean_effect"])
                rho = p = math.nan
                if len(sub) >= 3 and sub[metric].nunique() > 1 and sub["mean_effect"].nunique() > 1:
                    r = spearmanr(sub[metric], sub["mean_effect"])
                    rho, p = float(r.statistic), float(r.pvalue)
                rows.append({"metric": metric, "layer": layer, "n_experts": len(sub), "spearman_rho": rho, "p": p})
        return pd.DataFrame(rows)

    def plot(self, title: Optional[str] = None):
        """Heatmap of Cohen's d (top - bottom ranked expert's effect) over metric x layer; cells
        are annotated with d and stars for Holm-adjusted p (* <.05, ** <.01, *** <.001)."""
        from moelens.plotting.audit import cohens_d_heatmap

        return cohens_d_heatmap(self.summary, scope=self.scope, title=title)

    def save_html(self, path: Union[str, os.PathLike]) -> Path:
        from moelens.plotting.report import save_html

        return save_html(self.plot(), path)
