"""The ``moelens audit`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

# heavy imports (pandas, torch through the audit modules) happen after the arguments are parsed,
# so that `moelens audit --help` answers at once


def _parse_layers(text: Optional[str]) -> Optional[list[int]]:
    if text is None or text.strip().lower() in ("", "all"):
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be comma-separated integers like 1,2 (got {text!r})")


def build_parser() -> argparse.ArgumentParser:
    from moelens.cli_common import HelpFormatter  # one help style: defaults shown once, never for flags

    p = argparse.ArgumentParser(
        prog="moelens audit", formatter_class=HelpFormatter,
        description="Expert importance audit: do routing statistics (utilisation, mean weight, output norm/std) "
                    "predict the causal effect of removing an expert? See docs/audit.md.",
    )
    p.add_argument("--model", default=None, help="checkpoint directory, bundled model name or hub id (required unless --pool)")
    p.add_argument("--protocol", choices=("corrected", "paper"), default="corrected",
                   help="'corrected': moelens' audit (position-local removal, clean statistics, padding excluded); "
                        "'paper': the audit paper's scripts as they run (docs/audit.md) (default: %(default)s)")
    p.add_argument("--corpus", default=None,
                   help="text file (paragraphs separated by blank lines), 'sample', 'facts[:MODEL]', a saved "
                        "datasets directory or a dataset NAME[:CONFIG] (default: the bundled model's own "
                        "sentences if it has facts.jsonl, else the package sample)")
    p.add_argument("--layers", default=None, help="comma-separated sparse layers (default: all)")
    p.add_argument("--out", default=None, help="output directory (resumable; required unless --pool)")
    p.add_argument("--n-positions", type=int, default=16, help="positions sampled per sequence (0: all)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: 0; 42 with --protocol paper, as its scripts)")
    p.add_argument("--max-batch", type=int, default=64, help="ablation rows per forward")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward for the statistics")
    p.add_argument("--renormalize", action="store_true", help="rescale the remaining weights to the original sum")
    p.add_argument("--scope", choices=("next", "suffix"), default="next",
                   help="effect tested: CE change of the next-token prediction at the position, or summed over "
                        "all later predictions")
    p.add_argument("--max-tokens", type=int, default=None, help="cap the corpus at this many tokens")
    p.add_argument("--max-seq-len", type=int, default=None, help="truncate each sequence")
    p.add_argument("--split", default=None, help="dataset split for datasets corpora (default: train; test with --protocol paper)")
    p.add_argument("--text-field", default="text", help="dataset text column (datasets corpora)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--image-format", choices=("png", "svg", "pdf"), default=None,
                   help="also write every figure as a static image next to report.html (needs kaleido, Chromium)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    g = p.add_argument_group("model placement and numerics")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model dtype (default: float32; with --protocol paper the paper's dtype for that model: "
                        "OLMoE float32, DeepSeek-V2 float16, Qwen1.5-MoE bfloat16)")
    g.add_argument("--device", default=None, help="device, e.g. cuda or cpu (default: cpu)")
    g.add_argument("--device-map", default=None, help="spread the model over devices: auto, balanced or sequential")
    g.add_argument("--bos", dest="bos", action="store_true", default=None,
                   help="prepend the tokenizer's special tokens / BOS (default: the tokenizer's own rule)")
    g.add_argument("--no-bos", dest="bos", action="store_false", help="do not prepend BOS / special tokens")
    g.add_argument("--verify", action="store_true",
                   help="first check that moelens' loss on the first texts equals transformers' on the same checkpoint")
    a = p.add_argument_group("ablation (corrected protocol)")
    a.add_argument("--ablation-scope", choices=("position", "sequence"), default="position",
                   help="remove the expert at the sampled position only, or wherever it is routed in the sequence "
                        "(default: %(default)s)")
    a.add_argument("--semantics", choices=("zero", "route_around", "reroute"), default="zero",
                   help="zero its weight; zero and renormalise the survivors; or give its slot to the next-best "
                        "expert (default: %(default)s)")
    q = p.add_argument_group("paper protocol")
    q.add_argument("--n-tests", type=int, default=200, help="positions per metric and layer (default: %(default)s)")
    q.add_argument("--min-chars", type=int, default=50, help="keep corpus rows longer than this, stripped (default: %(default)s)")
    q.add_argument("--first-n", type=int, default=100, help="then keep the first N rows (default: %(default)s)")
    q.add_argument("--no-control", action="store_true", help="skip the routing-weight control")
    q.add_argument("--pool", nargs="+", metavar="DIR", default=None,
                   help="pool finished --protocol paper runs (one per model) into the paper's 60-cell table with "
                        "Bonferroni, Holm and BH over the whole family, beside the published values; no model is run")
    x = p.add_argument_group("further experiments (both protocols; docs/audit.md)")
    x.add_argument("--experiments", default="none", metavar="LIST",
                   help="also run the paper's further experiments on the audit's layers, resumably in --out: "
                        "comma-separated 'progressive' (cumulative removal of the top-1..k experts, the cliff), "
                        "'redistribution' (gap norm, compensation, Spearman correlations), 'all' or 'none' "
                        "(default: %(default)s)")
    x.add_argument("--progressive-positions", type=int, default=500,
                   help="progressive: targets, one per document (default: %(default)s)")
    x.add_argument("--progressive-k-max", type=int, default=None,
                   help="progressive: remove the top-1..K experts (default: top_k - 1)")
    x.add_argument("--progressive-min-context", type=int, default=32,
                   help="progressive: tokens before the earliest target (default: %(default)s)")
    x.add_argument("--cliff", type=float, default=0.1,
                   help="progressive: the cliff is the first k whose mean CE increase exceeds this many nats; "
                        "analysis only, may change on a rerun (default: %(default)s)")
    x.add_argument("--redistribution-texts", type=int, default=200,
                   help="redistribution: the first N qualifying rows (default: %(default)s)")
    x.add_argument("--experiment-min-chars", type=int, default=100,
                   help="both: use corpus rows longer than this many characters, stripped (default: %(default)s)")
    x.add_argument("--experiment-max-length", type=int, default=256,
                   help="both: truncate each row to this many tokens (default: %(default)s)")
    return p


def _experiment_config(args, seed: int, scope: str, semantics: str):
    from moelens.audit.experiments import ExperimentConfig

    return ExperimentConfig(progressive_positions=args.progressive_positions, k_max=args.progressive_k_max,
                            cliff=args.cliff, min_context=args.progressive_min_context,
                            redistribution_texts=args.redistribution_texts, min_chars=args.experiment_min_chars,
                            max_length=args.experiment_max_length, seed=seed, scope=scope, semantics=semantics,
                            max_batch=args.max_batch)


def _print_experiments(results: dict, out) -> None:
    from moelens.audit.experiments import format_summary

    if results:
        print("\n" + format_summary(results))
        files = [f for r in results.values() for f in r.get("files", [])]
        print(f"wrote {', '.join(files)} in {out}")


def _load_model(args, default_dtype):
    import torch

    from moelens.model import HookedMoETransformer

    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    kwargs = {"dtype": dtype}
    if args.device_map:
        kwargs["device_map"] = args.device_map
    elif args.device:
        kwargs["device"] = args.device
    model = HookedMoETransformer.from_pretrained(args.model, **kwargs)
    if args.bos is not None:
        model.cfg = model.cfg.replace(default_prepend_bos=bool(args.bos))
    return model


def _pool_main(args) -> int:
    import pandas as pd

    from moelens.audit import pooling

    tables = []
    for d in args.pool:
        path = Path(d) / "summary.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: --pool takes output directories of finished --protocol paper runs")
        tables.append(pd.read_csv(path))
    pooled = pooling.compare_with_published(pooling.pool(tables))
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        pooled.to_csv(out / "pooled.csv", index=False)
    print(f"family: {len(pooled)} cells; Bonferroni, Holm and BH over all of them\n")
    print("this run:\n" + pooling.paper_layout(pooled))
    if pooled["d_paper"].notna().any():
        print("published (same cells):\n" + pooling.paper_layout(pooled[pooled["d_paper"].notna()], "_paper"))
    cols = ["model", "layer", "metric", "n", "d", "p_t", "p_bonf", "p_holm", "p_bh", "d_paper", "p_t_paper"]
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(pooled[[c for c in cols if c in pooled]].to_string(index=False, float_format=_fmt3))
    if out is not None:
        print(f"\nwrote {out / 'pooled.csv'}")
    return 0


def _paper_main(args, names) -> int:
    from moelens.audit import paper, pooling
    from moelens.model import HookedMoETransformer

    arch = HookedMoETransformer.from_pretrained(args.model, device="meta").cfg.architecture
    flavour = paper.FLAVOURS.get(arch)
    if flavour is None:
        raise ValueError(f"--protocol paper exists for the paper's architectures ({', '.join(sorted(paper.FLAVOURS))}); "
                         f"{args.model} is {arch}")
    model = _load_model(args, paper.PAPER_DTYPES[flavour])
    rows = paper.load_rows(args.corpus, split=args.split or "test", text_field=args.text_field)
    texts = paper.select_texts(rows, min_chars=args.min_chars, n=args.first_n)
    if not texts:
        raise ValueError(f"the corpus {args.corpus} has no row longer than {args.min_chars} characters")
    seed = 42 if args.seed is None else args.seed
    plans = []
    if names:
        from moelens.audit.experiments import plan_experiments

        layers = _parse_layers(args.layers)
        layers = list(paper.PAPER_LAYERS[flavour] if layers is None else layers)
        plans = plan_experiments(names, model, rows, layers, _experiment_config(args, seed, "sequence", "zero"),
                                 args.out, info={"protocol": "paper", "corpus": args.corpus, "split": args.split or "test",
                                                 "text_field": args.text_field})
    if args.verify:
        from moelens import loading

        for r in paper.verify_against_transformers(model, loading.resolve(args.model), texts):
            print(f"verify: moelens {r['moelens']:.6f} == transformers {r['transformers']:.6f}  ({r['text']!r})")
    res = paper.run_paper_protocol(model, texts, layers=_parse_layers(args.layers), flavour=flavour, n_tests=args.n_tests,
                                   seed=seed, filter_texts=False,
                                   control=not args.no_control, max_batch=args.max_batch, progress=not args.no_progress,
                                   out_dir=args.out, add_special_tokens=True if args.bos is None else args.bos)
    summary = res["summary"]
    print(pooling.paper_layout(summary))
    merged = pooling.compare_with_published(summary)
    if merged["d_paper"].notna().any():
        print("published values for the same cells (arXiv 2606.10703):\n"
              + pooling.paper_layout(merged[merged["d_paper"].notna()], "_paper"))
    if len(res["control"]):
        cols = ["layer", "n", "d", "p_t", "p_w", "spearman_rho"]
        print("routing-weight control:\n" + res["control"][cols].to_string(index=False, float_format=_fmt3))
    results = {}
    if plans:
        from moelens.audit.experiments import run_planned

        results = run_planned(plans, model, args.out, progress=not args.no_progress)
        _print_experiments(results, args.out)
    from moelens.plotting.audit_report import write_paper_report

    write_paper_report(res, Path(args.out) / "report.html", experiments=results, image_format=args.image_format)
    print(f"\nwrote {Path(args.out) / 'report.html'}, summary.csv, pairs.csv, stats.csv, control.csv "
          f"(pool several models with: moelens audit --pool DIR1 DIR2 DIR3)")
    return 0


def audit_main(argv: Optional[Sequence[str]] = None, debug: bool = False) -> int:
    """``moelens audit``: run :func:`run_audit` (or the paper's protocol, or pool paper runs) from
    the command line; returns an exit code (user errors: one line on stderr and 2; ``debug=True``
    or ``--debug`` raises them instead)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = debug or args.debug
    from contextlib import ExitStack

    from moelens.rundir import RunDirError, claim

    if args.corpus is not None:  # a mistyped local file: refused before the model loads or the hub is asked
        from moelens.audit.corpus import check_local_source

        try:
            check_local_source(args.corpus)
        except FileNotFoundError as exc:
            if debug:
                raise
            print(f"moelens audit: error: --{' '.join(str(exc).split())}", file=sys.stderr)
            return 2
    with ExitStack() as held:
        if args.out is not None:  # one run per directory (moelens.rundir), refused before the model loads
            try:
                held.enter_context(claim(args.out, "audit"))
            except RunDirError as exc:
                if debug:
                    raise
                print(f"moelens audit: error: {' '.join(str(exc).split())} (--debug shows the traceback)",
                      file=sys.stderr)
                return 2
        return _audit(args, debug)


def _audit(args, debug: bool) -> int:
    import pandas as pd

    from moelens.audit.corpus import load_corpus
    from moelens.audit.run import AuditSettingsError, _default_corpus, run_audit

    try:
        from moelens.audit.experiments import parse_experiments

        names = parse_experiments(args.experiments)
        if args.pool:
            if names:
                raise ValueError("--experiments runs a model; it does not combine with --pool")
            return _pool_main(args)
        if args.model is None or args.out is None:
            raise ValueError("--model and --out are required (unless --pool)")
        if args.protocol == "paper":
            if args.corpus is None:
                raise ValueError("--protocol paper needs --corpus (e.g. wikitext:wikitext-2-raw-v1, or a local "
                                 "text/JSONL file of WikiText-2 raw test rows)")
            return _paper_main(args, names)
        import torch

        layers = _parse_layers(args.layers)
        model = _load_model(args, torch.float32)
        if args.verify:
            from moelens import loading
            from moelens.audit import paper

            texts = load_corpus(args.corpus, split=args.split or "train", text_field=args.text_field) if args.corpus else list(_default_corpus(model))
            for r in paper.verify_against_transformers(model, loading.resolve(args.model), texts):
                print(f"verify: moelens {r['moelens']:.6f} == transformers {r['transformers']:.6f}  ({r['text']!r})")
        if args.corpus is None:
            corpus = _default_corpus(model)
            if args.max_tokens is not None:
                corpus = load_corpus(list(corpus), tokenizer=model.tokenizer, max_tokens=args.max_tokens)
        else:
            corpus = load_corpus(args.corpus, tokenizer=model.tokenizer, max_tokens=args.max_tokens,
                                 split=args.split or "train", text_field=args.text_field)
        plans = []
        if names:
            from moelens.audit.corpus import _check_layers
            from moelens.audit.experiments import plan_experiments

            semantics = "route_around" if args.renormalize and args.semantics == "zero" else args.semantics
            rows = corpus if isinstance(corpus, (list, tuple)) else list(corpus)
            plans = plan_experiments(names, model, rows, _check_layers(model, layers),
                                     _experiment_config(args, args.seed or 0, args.ablation_scope, semantics), args.out,
                                     info={"protocol": "corrected", "corpus": args.corpus, "max_tokens": args.max_tokens,
                                           "split": args.split or "train", "text_field": args.text_field})
        result = run_audit(
            model, corpus, layers=layers, n_positions=args.n_positions or None, seed=args.seed or 0,
            renormalize=args.renormalize, scope=args.scope, max_batch=args.max_batch, batch_size=args.batch_size,
            max_seq_len=args.max_seq_len, out_dir=args.out, progress=not args.no_progress,
            ablation_scope=args.ablation_scope, semantics=args.semantics,
        )
        results = {}
        if plans:
            from moelens.audit.experiments import run_planned

            results = run_planned(plans, model, args.out, progress=not args.no_progress)
    except (AuditSettingsError, FileNotFoundError, ValueError, KeyError, RuntimeError, argparse.ArgumentTypeError) as exc:
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
        print(table.to_string(index=False, float_format=_fmt3))
    _print_experiments(results, args.out)
    if args.image_format or results:
        from moelens.plotting.audit_report import write_audit_report
        from moelens.plotting.report import announce_images

        announce_images(args.image_format)
        write_audit_report(result, Path(args.out) / "report.html", image_format=args.image_format, experiments=results)
    print(f"\nwrote {Path(args.out) / 'report.html'} (every figure), summary.csv, stats.json, effects.jsonl")
    return 0


def _fmt3(v) -> str:
    from moelens.formatting import format_number

    return format_number(v)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(audit_main())
