"""The `moelens` command: `demo`, `trace`, `merge`, `audit`.

Heavy modules (torch, transformers, plotly) are imported only after the arguments are parsed,
so ``moelens --help`` and ``moelens --version`` answer at once. User mistakes (a missing file,
a layer out of range, a settings mismatch, an unavailable device) print one line and exit with
status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import time

from moelens.cli_common import HelpFormatter

_STARTED = time.time()  # the command's start: run times count the imports and the model's loading

IMAGE_FORMATS = ("png", "svg", "pdf")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moelens")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _check_device(device) -> None:
    """``--device cuda`` (or ``cuda:N``, ``mps``) that this machine does not have: a user error."""
    if device is None or device in ("cpu", "meta"):
        return
    import torch

    from moelens.errors import MoelensUserError

    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise MoelensUserError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                                   f"built {'with' if torch.version.cuda else 'without'} CUDA); use --device cpu")
        index = int(str(device).split(":")[1]) if ":" in str(device) else 0
        if index >= torch.cuda.device_count():
            raise MoelensUserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif str(device) == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise MoelensUserError("--device mps: MPS is not available here; use --device cpu")


def _demo(args) -> int:
    from moelens.demo import run_demo

    run_demo(args.out, n_facts=args.n_facts, n_samples=args.samples, seed=args.seed, image_format=args.image_format,
             started=_STARTED)
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


def _parse_layers(text):
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        from moelens.errors import MoelensUserError

        raise MoelensUserError(f"--layers must be comma-separated integers like 1,2 (got {text!r})") from None


def _trace(args) -> int:
    import os
    from pathlib import Path

    from moelens.rundir import claim

    if not Path(args.facts).exists() and (args.facts.endswith((".json", ".jsonl")) or os.sep in args.facts):
        raise FileNotFoundError(f"--facts {args.facts}: no such file")
    _parse_layers(args.layers)
    _check_device(args.device)
    with claim(args.out, "trace"):  # one run per directory, refused before the model is loaded
        return _run_trace(args)


def _run_trace(args) -> int:
    import os

    import torch

    from moelens import HookedMoETransformer
    from moelens.tracing import load_facts
    from moelens.tracing.protocol import ProtocolConfig, run_protocol

    layers = _parse_layers(args.layers)
    _init_distributed()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    device = args.device
    if device is None and torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    model = HookedMoETransformer.from_pretrained(args.model, dtype=dtype, device=device)
    cases = load_facts(args.facts, limit=args.limit)
    cfg = ProtocolConfig(
        min_clean=args.min_clean, min_drop=args.min_drop, noise_scale=args.noise_scale, n_samples=args.samples,
        noise_reference=args.noise_reference,
        seed=args.seed, prepend_bos=args.bos, n_bootstrap=args.bootstrap, n_permutations=args.permutations,
        layers=layers,
        screen=args.screen, n_verify=args.verify,
    )
    from moelens.tracing.fingerprint import ResumeError
    from moelens.tracing.protocol import ProtocolError

    try:
        summary = run_protocol(model, cases, args.out, cfg, model_name=str(args.model), facts_source=args.facts,
                               started=_STARTED)
    except (ResumeError, ProtocolError) as exc:  # one line, exit 2: the results would be wrong or empty
        if getattr(args, "debug", False):
            raise
        print(f"moelens trace: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    from moelens.tracing.protocol import world

    if world()[0] != 0:
        return 0
    from moelens.plotting.report import announce_images, format_duration
    from moelens.plotting.trace_report import write_trace_report

    announce_images(args.image_format)
    report = write_trace_report(args.out, summary, cases=cases, image_format=args.image_format)
    print(summary)
    print(f"results in {args.out}: {report.name} (every figure), summary.csv, summary.json, screen.jsonl, "
          f"experts.jsonl" + (f", *.{args.image_format}" if args.image_format else "")
          + f"; the run took {format_duration(time.time() - _STARTED)}")
    return 0


def _merge(args) -> int:
    from moelens.rundir import claim

    with claim(args.trace_dir, "merge", owner="trace", must_exist=True):
        return _run_merge(args)


def _run_merge(args) -> int:
    from moelens.tracing.fingerprint import ResumeError
    from moelens.tracing.protocol import ProtocolError, merge
    from moelens.plotting.report import announce_images
    from moelens.plotting.trace_report import write_trace_report

    try:
        summary = merge(args.trace_dir)
    except (ResumeError, ProtocolError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"moelens merge: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    if args.image_format:
        announce_images(args.image_format)
        write_trace_report(args.trace_dir, summary, image_format=args.image_format)
    print(summary)
    print(f"rewrote summary.csv, summary.json and report.html in {args.trace_dir}")
    return 0


def _audit(args) -> int:  # never called: `moelens audit ...` is handed to the audit's own parser
    raise AssertionError("unreachable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelens", formatter_class=HelpFormatter,
        description="Mechanistic interpretability for sparse mixture-of-experts LMs: trace where facts live.",
        epilog="Each command writes one self-contained HTML report (report.html) into its output directory.\n"
               "`moelens COMMAND --help` lists a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"moelens {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")

    def image_format(p):
        p.add_argument("--image-format", choices=IMAGE_FORMATS, default=None,
                       help="also write every figure as a static image of this format next to report.html "
                            "(needs kaleido and Chrome/Chromium)")

    p = sub.add_parser("demo", parents=[common], formatter_class=HelpFormatter,
                       help="trace a few facts of the bundled model; write report.html",
                       description="Trace a few facts of the bundled moelens-tiny-facts model (layer sweep, expert "
                                   "tracing, coalitions), print a summary and write OUT/report.html.")
    p.add_argument("--out", required=True, help="output directory for report.html")
    p.add_argument("--n-facts", type=int, default=4, help="how many facts to trace")
    p.add_argument("--samples", type=int, default=5, help="noise samples per fact")
    p.add_argument("--seed", type=int, default=0, help="random seed of the noise")
    image_format(p)
    p.set_defaults(fn=_demo)

    p = sub.add_parser("trace", parents=[common], formatter_class=HelpFormatter,
                       help="the expert-aware causal tracing protocol over a facts file (resumable)",
                       description="Screen every case, pick the layer and expert on discovery cases, evaluate them "
                                   "on validation cases (see docs/tracing.md). Rerun with the same --out to resume.")
    p.add_argument("--model", required=True, help="checkpoint directory, hub id, or bundled model name")
    p.add_argument("--facts", required=True, help="CounterFact / known_1000 JSON or JSONL file (or HF dataset id)")
    p.add_argument("--out", required=True, help="output directory (rerun with the same one to resume)")
    p.add_argument("--limit", type=int, default=None, help="only the first N cases")
    p.add_argument("--min-clean", type=float, default=1.0, help="keep cases whose clean contrast is at least this")
    p.add_argument("--min-drop", type=float, default=0.5, help="keep cases where noise lowers the contrast by at least this")
    p.add_argument("--noise-scale", type=float, default=3.0, help="noise sigma in units of the reference std")
    p.add_argument("--noise-reference", default="embedding", choices=["embedding", "subjects", "subjects_rome"],
                   help="sigma = noise_scale x std of the embedding matrix, or of the dataset's subject tokens "
                        "(subjects_rome: as ROME's collect_embedding_std, special tokens included)")
    p.add_argument("--samples", type=int, default=1, help="noise draws per case")
    p.add_argument("--seed", type=int, default=0, help="random seed (noise, discovery/validation split)")
    p.add_argument("--layers", default=None, help="comma-separated candidate layers (default: all sparse)")
    p.add_argument("--screen", default="exact", choices=["exact", "attribution"],
                   help="exact: every layer and expert by suffix runs; attribution: first-order screen of every "
                        "layer and expert (one backward pass per case), the top --verify experts re-scored exactly")
    p.add_argument("--verify", type=int, default=10, help="with --screen attribution: experts verified exactly per case")
    p.add_argument("--bootstrap", type=int, default=5000, help="bootstrap resamples for the CIs")
    p.add_argument("--permutations", type=int, default=10000, help="sign-flip permutations for the p-values")
    bos = p.add_mutually_exclusive_group()
    bos.add_argument("--bos", dest="bos", action="store_true", default=None,
                     help="prepend BOS (default: the model's own convention)")
    bos.add_argument("--no-bos", dest="bos", action="store_false", help="do not prepend BOS")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cpu, or each rank's GPU under torchrun)")
    image_format(p)
    p.set_defaults(fn=_trace)

    p = sub.add_parser("merge", parents=[common], formatter_class=HelpFormatter,
                       help="recompute the summary and report of a `moelens trace` output directory (all ranks)",
                       description="Read a `moelens trace` output directory (every rank's results), recompute "
                                   "the summary and rewrite summary.csv, summary.json and report.html there.")
    p.add_argument("--trace-dir", required=True, help="the --out directory of a `moelens trace` run")
    image_format(p)
    p.set_defaults(fn=_merge)

    sub.add_parser("audit", help="expert importance audit: routing statistics vs ablation effects "
                                 "(see `moelens audit --help`)", add_help=False)
    return parser


def _user_errors() -> tuple:
    from moelens.errors import MoelensUserError

    errors = [MoelensUserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
              ValueError, IndexError]
    try:
        from moelens.plotting.report import StaticExportError

        errors.append(StaticExportError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in msg:
        msg += f": {exc.filename}"
    return msg


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning as one line, ``moelens: warning: ...`` (no category, no source line)."""
    print(f"moelens: warning: {' '.join(str(message).split())}", file=sys.stderr if file is None else file)


def main(argv=None) -> int:
    import warnings

    with warnings.catch_warnings():  # restores the caller's warning display afterwards
        warnings.showwarning = _show_warning
        return _main(argv)


def _main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    if argv[:1] == ["audit"] or (argv[:1] == ["--debug"] and argv[1:2] == ["audit"]):
        rest = argv[argv.index("audit") + 1:]
        from moelens.audit.cli import audit_main

        return _guarded("audit", lambda: audit_main([a for a in rest if a != "--debug"], debug=debug), debug)
    args = build_parser().parse_args(argv)
    return _guarded(args.command, lambda: args.fn(args), debug)


def _guarded(command: str, fn, debug: bool) -> int:
    try:
        return fn() or 0
    except Exception as exc:
        if debug or not isinstance(exc, _user_errors()):
            raise
        print(f"moelens {command}: error: {_one_line(exc)} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
