"""The `moelens` command: `demo`, `trace`, `audit`."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from moelens.demo import run_demo

    try:
        run_demo(args.out, n_facts=args.facts, n_samples=args.samples, seed=args.seed)
    except ValueError as exc:  # bad --facts / --samples: one line, exit 2
        print(f"moelens demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _init_distributed() -> None:
    """Under torchrun / accelerate launch: a gloo (CPU) or NCCL (GPU) process group for barriers."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and "MASTER_ADDR" in os.environ and torch.distributed.is_available():
        if not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def _trace(args) -> int:
    import torch

    from moelens import HookedMoETransformer
    from moelens.tracing import load_facts
    from moelens.tracing.protocol import ProtocolConfig, run_protocol

    _init_distributed()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    device = args.device
    if device is None and torch.cuda.is_available() and int(__import__("os").environ.get("WORLD_SIZE", 1)) > 1:
        device = f"cuda:{int(__import__('os').environ.get('LOCAL_RANK', 0))}"
    model = HookedMoETransformer.from_pretrained(args.model, dtype=dtype, device=device)
    cases = load_facts(args.facts, limit=args.limit)
    cfg = ProtocolConfig(
        min_clean=args.min_clean, min_drop=args.min_drop, noise_scale=args.noise_scale, n_samples=args.samples,
        noise_reference=args.noise_reference,
        seed=args.seed, prepend_bos=args.bos, n_bootstrap=args.bootstrap, n_permutations=args.permutations,
        layers=tuple(int(x) for x in args.layers.split(",")) if args.layers else None,
        screen=args.screen, n_verify=args.verify,
    )
    from moelens.tracing.fingerprint import ResumeError
    from moelens.tracing.protocol import ProtocolError

    try:
        summary = run_protocol(model, cases, args.out, cfg, model_name=str(args.model), facts_source=args.facts)
    except (ResumeError, ProtocolError) as exc:  # one line, exit 2: the results would be wrong or empty
        print(f"moelens trace: error: {exc}", file=sys.stderr)
        return 2
    from moelens.tracing.protocol import world

    if world()[0] != 0:
        return 0
    print(summary)
    print(f"results in {args.out} (screen.jsonl, experts.jsonl, summary.csv, *.html)")
    return 0


def _merge(args) -> int:
    from moelens.tracing.fingerprint import ResumeError
    from moelens.tracing.protocol import ProtocolError, merge

    try:
        print(merge(args.out))
    except (ResumeError, ProtocolError) as exc:
        print(f"moelens merge: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["audit"]:  # audit parses its own options
        from moelens.audit import audit_main

        return audit_main(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="moelens", description="Mechanistic interpretability for sparse MoE LMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="trace a few facts of the bundled model and write HTML figures")
    p.add_argument("--out", required=True, help="directory for the HTML figures")
    p.add_argument("--facts", type=int, default=4, help="number of facts to trace")
    p.add_argument("--samples", type=int, default=5, help="noise samples per fact")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_demo)

    p = sub.add_parser("trace", help="the expert-aware causal tracing protocol over a facts file (resumable)")
    p.add_argument("--model", required=True, help="checkpoint directory, hub id, or bundled model name")
    p.add_argument("--facts", required=True, help="CounterFact / known_1000 JSON or JSONL file (or HF dataset id)")
    p.add_argument("--out", required=True, help="output directory (rerun with the same one to resume)")
    p.add_argument("--limit", type=int, default=None, help="only the first N cases")
    p.add_argument("--min-clean", type=float, default=1.0)
    p.add_argument("--min-drop", type=float, default=0.5)
    p.add_argument("--noise-scale", type=float, default=3.0)
    p.add_argument("--noise-reference", default="embedding", choices=["embedding", "subjects", "subjects_rome"],
                   help="sigma = noise_scale x std of the embedding matrix, or of the dataset's subject tokens "
                        "(subjects_rome: as ROME's collect_embedding_std, special tokens included)")
    p.add_argument("--samples", type=int, default=1, help="noise draws per case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", default=None, help="comma-separated candidate layers (default: all sparse)")
    p.add_argument("--screen", default="exact", choices=["exact", "attribution"],
                   help="exact: every layer and expert by suffix runs; attribution: first-order screen of every "
                        "layer and expert (one backward pass per case), the top --verify experts re-scored exactly")
    p.add_argument("--verify", type=int, default=10, help="with --screen attribution: experts verified exactly per case")
    p.add_argument("--bootstrap", type=int, default=5000)
    p.add_argument("--permutations", type=int, default=10000)
    bos = p.add_mutually_exclusive_group()
    bos.add_argument("--bos", dest="bos", action="store_true", default=None, help="prepend BOS")
    bos.add_argument("--no-bos", dest="bos", action="store_false", help="do not prepend BOS")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.set_defaults(fn=_trace)

    p = sub.add_parser("merge", help="summarise a `moelens trace` output directory (all ranks' results)")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=_merge)

    sub.add_parser("audit", help="expert importance audit: routing statistics vs ablation effects (see `moelens audit --help`)")

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
