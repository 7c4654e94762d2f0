"""The ``moelens audit`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from moelens.audit.corpus import load_corpus
from moelens.audit.run import AuditSettingsError, _default_corpus, run_audit


def _parse_layers(text: Optional[str]) -> Optional[list[int]]:
    if text is None or text.strip().lower() in ("", "all"):
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be comma-separated integers like 1,2 (got {text!r})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moelens audit", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Expert importance audit: do routing statistics (utilisation, mean weight, output norm/std) "
                    "predict the causal effect of removing an expert? See docs/audit.md.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory, bundled model name or hub id")
    p.add_argument("--corpus", default=None,
                   help="text file (paragraphs separated by blank lines), 'sample', 'facts[:MODEL]', a saved "
                        "datasets directory or a dataset NAME[:CONFIG] (default: the bundled model's own "
                        "sentences if it has facts.jsonl, else the package sample)")
    p.add_argument("--layers", default=None, help="comma-separated sparse layers (default: all)")
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument("--n-positions", type=int, default=16, help="positions sampled per sequence (0: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampled positions")
    p.add_argument("--max-batch", type=int, default=64, help="ablation rows per forward")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward for the statistics")
    p.add_argument("--renormalize", action="store_true", help="rescale the remaining weights to the original sum")
    p.add_argument("--scope", choices=("next", "suffix"), default="next",
                   help="effect tested: CE change of the next-token prediction at the position, or summed over "
                        "all later predictions")
    p.add_argument("--max-tokens", type=int, default=None, help="cap the corpus at this many tokens")
    p.add_argument("--max-seq-len", type=int, default=None, help="truncate each sequence")
    p.add_argument("--split", default="train", help="dataset split (datasets corpora)")
    p.add_argument("--text-field", default="text", help="dataset text column (datasets corpora)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--image-format", choices=("png", "svg", "pdf"), default=None,
                   help="also write every figure as a static image next to report.html (needs kaleido, Chromium)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return p


def audit_main(argv: Optional[Sequence[str]] = None, debug: bool = False) -> int:
    """``moelens audit``: run :func:`run_audit` from the command line; returns an exit code
    (user errors: one line on stderr and 2; ``debug=True`` raises them instead)."""
    args = build_parser().parse_args(argv)
    from moelens.model import HookedMoETransformer

    try:
        layers = _parse_layers(args.layers)
        model = HookedMoETransformer.from_pretrained(args.model)
        if args.corpus is None:
            corpus = _default_corpus(model)
            if args.max_tokens is not None:
                corpus = load_corpus(list(corpus), tokenizer=model.tokenizer, max_tokens=args.max_tokens)
        else:
            corpus = load_corpus(args.corpus, tokenizer=model.tokenizer, max_tokens=args.max_tokens,
                                 split=args.split, text_field=args.text_field)
        result = run_audit(
            model, corpus, layers=layers, n_positions=args.n_positions or None, seed=args.seed,
            renormalize=args.renormalize, scope=args.scope, max_batch=args.max_batch, batch_size=args.batch_size,
            max_seq_len=args.max_seq_len, out_dir=args.out, progress=not args.no_progress,
        )
    except (AuditSettingsError, FileNotFoundError, ValueError, KeyError, argparse.ArgumentTypeError) as exc:
        if debug:
            raise
        print(f"moelens audit: error: {' '.join(str(exc).split())} (--debug shows the traceback)", file=sys.stderr)
        return 2
    from moelens.formatting import format_p

    cols = ["metric", "layer", "n", "mean_diff", "cohens_d", "p_t", "p_wilcoxon", "p_holm"]
    table = result.summary[cols].copy()
    for c in ("p_t", "p_wilcoxon", "p_holm"):
        table[c] = [format_p(p) for p in table[c]]
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.image_format:
        from moelens.audit.html_report import write_audit_report

        write_audit_report(result, Path(args.out) / "report.html", image_format=args.image_format)
    print(f"\nwrote {Path(args.out) / 'report.html'} (every figure), summary.csv, stats.json, effects.jsonl")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(audit_main())
