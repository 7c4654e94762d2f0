"""Pool per-model audit tables into one family, correct for multiple comparisons, and set them
beside the audit paper's published 60 cells (``moelens/data/audit_paper_pertoken_60.csv``)."""

from __future__ import annotations

from importlib import resources
from typing import Sequence

import numpy as np
import pandas as pd

from moelens.tracing.stats import benjamini_hochberg, holm_bonferroni

PUBLISHED_FILE = "audit_paper_pertoken_60.csv"
METRIC_SHORT = {"utilization_rate": "util", "activation_norm": "act_norm",
                "mean_routing_weight_when_active": "mean_rw_active", "activation_std": "act_std"}


def published_table() -> pd.DataFrame:
    """The paper's 60 per-token cells as published (one row per model x layer x metric)."""
    with resources.files("moelens.data").joinpath(PUBLISHED_FILE).open() as fh:
        return pd.read_csv(fh)


def bonferroni(pvalues: Sequence[float]) -> np.ndarray:
    p = np.asarray(pvalues, dtype=float)
    return np.minimum(p * len(p), 1.0)


def pool(tables: Sequence[pd.DataFrame], p_column: str = "p_t") -> pd.DataFrame:
    """Concatenate per-model summaries (``model, layer, metric, n, mean_diff, d, p_t, p_w``) into
    one family and add Bonferroni, Holm and Benjamini-Hochberg adjustments of ``p_column`` and of
    ``p_w`` over the *whole* family (the paper's claimed family: 4 metrics x 5 layers x 3 models = 60).
    Cells without a p-value (NaN: fewer than two pairs, constant differences) stay NaN and are not
    counted in the family, as in :func:`moelens.audit.report.summarize`."""
    df = pd.concat(list(tables), ignore_index=True)
    if df.empty:
        raise ValueError("nothing to pool: every table is empty")
    for col, tag in ((p_column, ""), ("p_w", "_w")):
        if col not in df:
            continue
        p = df[col].to_numpy(dtype=float)
        finite = np.isfinite(p)  # an untestable cell (n < 2, constant differences) has no p-value
        for name, fn in (("p_bonf", bonferroni), ("p_holm", holm_bonferroni), ("p_bh", benjamini_hochberg)):
            adjusted = np.full(len(p), np.nan)
            if finite.any():
                adjusted[finite] = fn(p[finite])
            df[f"{name}{tag}"] = adjusted
    df.attrs["family_size"] = len(df)
    return df


def compare_with_published(pooled: pd.DataFrame) -> pd.DataFrame:
    """``pooled`` joined with the published cells on (model, layer, metric): each of ``d``,
    ``p_t``, ``p_w`` beside its published value (``*_paper``), for the cells a run shares with the
    paper (rows of other models or layers keep NaN in the ``*_paper`` columns)."""
    pub = published_table()[["model", "layer", "metric", "n", "d", "p_t", "p_w", "p_holm60"]]
    pub = pub.rename(columns={c: f"{c}_paper" for c in ("n", "d", "p_t", "p_w", "p_holm60")})
    return pooled.merge(pub, on=["model", "layer", "metric"], how="left")


def _cell(d: float, p_t: float, p_w: float) -> str:
    if not np.isfinite(d):
        return "n/a"
    return f"{d:+.3f} ({_p(p_t)}; {_p(p_w)})"


def _p(p: float) -> str:
    if not np.isfinite(p):
        return "n/a"
    return "< 1e-4" if p < 1e-4 else f"{p:.3f}"


def paper_layout(df: pd.DataFrame, value: str = "") -> str:
    """A markdown table per model in the paper's layout: rows = metrics, columns = layers, each
    cell ``d (p_t; p_w)``. With ``value="_paper"`` the published columns of
    :func:`compare_with_published` are laid out instead."""
    out = []
    for model, sub in df.groupby("model", sort=False):
        layers = sorted(sub["layer"].unique())
        out.append(f"**{model}**\n")
        out.append("| metric | " + " | ".join(f"L{l}" for l in layers) + " |")
        out.append("|---|" + "---|" * len(layers))
        for metric, msub in sub.groupby("metric", sort=False):
            cells = []
            for l in layers:
                r = msub[msub["layer"] == l]
                cells.append(_cell(*(float(r.iloc[0][c + value]) for c in ("d", "p_t", "p_w"))) if len(r) else "")
            out.append(f"| {METRIC_SHORT.get(metric, metric)} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)
