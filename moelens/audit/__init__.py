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
   :mod:`~moelens.audit.ablation` names the removal semantics both protocols share;
   :mod:`~moelens.audit.experiments` runs progressive ablation and redistribution from the command
   line (``moelens audit --experiments``), resumably in the output directory.

The package is split by idea: :mod:`~moelens.audit.corpus` (loading and tokenizing the corpus),
:mod:`~moelens.audit.statistics` (1), :mod:`~moelens.audit.effects` (2),
:mod:`~moelens.audit.report` (3 and :class:`AuditResult`), :mod:`~moelens.audit.run` (4) and
:mod:`~moelens.audit.cli`; :mod:`~moelens.audit.constants` holds the shared constants. Every name
is re-exported here.
"""

# Names load on first use (PEP 562), so that `moelens audit --help` does not import torch.
import importlib

_SUBMODULES = ("ablation", "cli", "constants", "corpus", "effects", "experiments", "paper", "pooling", "report", "run", "statistics")
_NAMES = {
    "AuditResult": "report",
    "AuditSettingsError": "run",
    "BUNDLED_DEFAULT": "constants",
    "CONTROL": "constants",
    "CorpusLike": "constants",
    "EFFECT_COLUMNS": "constants",
    "METRICS": "constants",
    "SAMPLE_CORPUS": "constants",
    "SETTINGS_VERSION": "constants",
    "STAT_COLUMNS": "constants",
    "_StatsAccumulator": "statistics",
    "_ablate_weights": "effects",
    "_budget": "corpus",
    "_check_layers": "corpus",
    "_check_settings": "run",
    "_corpus_fingerprint": "run",
    "_count_tokens": "corpus",
    "_dataset_texts": "corpus",
    "_default_corpus": "run",
    "_effects_frame": "run",
    "_import_datasets": "corpus",
    "_json_default": "run",
    "_model_fingerprint": "run",
    "_pad_left": "corpus",
    "_pair_row": "report",
    "_parse_layers": "cli",
    "_progress": "corpus",
    "_read_effects": "run",
    "_row_hook": "effects",
    "_safe": "report",
    "_sequence_effects": "effects",
    "_settings": "run",
    "_stat_lookup": "report",
    "_stats_from_json": "run",
    "_stats_to_json": "run",
    "_token_nll": "effects",
    "_truncate": "corpus",
    "_write_json": "run",
    "audit_main": "cli",
    "build_parser": "cli",
    "bundled_corpus": "corpus",
    "expert_effects": "effects",
    "expert_statistics": "statistics",
    "load_corpus": "corpus",
    "load_rows": "paper",
    "pool": "pooling",
    "published_table": "pooling",
    "read_paragraphs": "corpus",
    "removal_hooks": "ablation",
    "remove_expert_hooks": "effects",
    "run_audit": "run",
    "run_paper_protocol": "paper",
    "sample_positions": "effects",
    "summarize": "report",
    "tokenize_corpus": "corpus",
}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"moelens.audit.{name}")
    if name in _NAMES:
        value = getattr(importlib.import_module(f"moelens.audit.{_NAMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moelens.audit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_NAMES) | set(_SUBMODULES))


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
