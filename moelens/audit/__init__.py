"""Expert importance audit: do routing statistics predict causal importance?

Pruning and merging heuristics for sparse MoE models rank experts by *observational* statistics
(how often an expert is routed, with what weight, how large its output is). This package asks
whether those rankings predict what happens when an expert is *removed* (docs/audit.md):

1. :func:`expert_statistics` streams a corpus through the model and accumulates, per
   (layer, expert): utilisation, mean combine weight when active, mean output norm when active,
   pooled output std when active, and the layer's mean routing entropy.
2. :func:`expert_effects` measures, for one sequence and a set of positions, the change in
   next-token cross-entropy when one routed expert's contribution is removed at one position
   only (its slot weight set to 0 in ``hook_expert_weights``; the other slots keep their weights,
   or are rescaled to the original sum with ``renormalize=True``). Many ablations are stacked as
   batch rows of one forward.
3. :func:`summarize` pairs, at each sampled position, the top-ranked and the bottom-ranked
   *active* expert by each metric and tests their effect difference (paired t, Wilcoxon,
   Cohen's d, Holm and Benjamini-Hochberg across the table), plus the per-token routing-weight
   control ``token_weight``.
4. :func:`run_audit` does all three, resumably when given an ``out_dir``; :func:`audit_main`
   is the ``moelens audit`` command line.

5. :mod:`~moelens.audit.paper` reruns the audit paper's protocol as its scripts compute it
   (``moelens audit --protocol paper``), with its other experiments (routing-weight control,
   progressive ablation, redistribution); :mod:`~moelens.audit.pooling` pools several models'
   runs into one family with Bonferroni, Holm and BH and sets them beside the published cells;
   :mod:`~moelens.audit.ablation` names the removal semantics both protocols share.

The package is split by idea: :mod:`~moelens.audit.corpus` (loading and tokenizing the corpus),
:mod:`~moelens.audit.statistics` (1), :mod:`~moelens.audit.effects` (2),
:mod:`~moelens.audit.report` (3 and :class:`AuditResult`), :mod:`~moelens.audit.run` (4) and
:mod:`~moelens.audit.cli`; :mod:`~moelens.audit.constants` holds the shared constants. Every name
is re-exported here.
"""

# ruff: noqa: F401  (re-exports, including the private helpers the tests use)

from moelens.audit import ablation, paper, pooling
from moelens.audit.ablation import removal_hooks
from moelens.audit.cli import _parse_layers, audit_main, build_parser
from moelens.audit.paper import load_rows, run_paper_protocol
from moelens.audit.pooling import pool, published_table
from moelens.audit.constants import (
    BUNDLED_DEFAULT,
    CONTROL,
    EFFECT_COLUMNS,
    METRICS,
    SAMPLE_CORPUS,
    SETTINGS_VERSION,
    STAT_COLUMNS,
    CorpusLike,
)
from moelens.audit.corpus import (
    _budget,
    _check_layers,
    _count_tokens,
    _dataset_texts,
    _import_datasets,
    _pad_left,
    _progress,
    _truncate,
    bundled_corpus,
    load_corpus,
    read_paragraphs,
    tokenize_corpus,
)
from moelens.audit.effects import (
    _ablate_weights,
    _row_hook,
    _sequence_effects,
    _token_nll,
    expert_effects,
    remove_expert_hooks,
    sample_positions,
)
from moelens.audit.report import AuditResult, _pair_row, _safe, _stat_lookup, summarize
from moelens.audit.run import (
    AuditSettingsError,
    _check_settings,
    _corpus_fingerprint,
    _default_corpus,
    _effects_frame,
    _json_default,
    _model_fingerprint,
    _read_effects,
    _settings,
    _stats_from_json,
    _stats_to_json,
    _write_json,
    run_audit,
)
from moelens.audit.statistics import _StatsAccumulator, expert_statistics

__all__ = [
    "METRICS",
    "CONTROL",
    "SAMPLE_CORPUS",
    "AuditResult",
    "AuditSettingsError",
    "load_corpus",
    "bundled_corpus",
    "tokenize_corpus",
    "expert_statistics",
    "expert_effects",
    "remove_expert_hooks",
    "sample_positions",
    "summarize",
    "run_audit",
    "audit_main",
    "removal_hooks",
    "run_paper_protocol",
    "load_rows",
    "pool",
    "published_table",
]
