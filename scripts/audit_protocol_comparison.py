"""How much each protocol choice moves the audit's effect sizes (docs/audit.md, "How much each choice matters").

Runs, on the bundled model ``moelens-tiny-facts`` and its own sentences, the corrected audit with
each removal choice changed one at a time (scope: position / sequence; semantics: zero /
route_around / reroute), and the paper's protocol with each model's metric definitions
(flavours olmoe / deepseek / qwen, forced on this Qwen3-MoE model). Prints one markdown table of
Cohen's d per (metric, layer) and configuration.

    python scripts/audit_protocol_comparison.py [--n-seqs 120] [--n-positions 4] [--n-tests 120]
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from moelens import HookedMoETransformer
from moelens.audit import bundled_corpus, run_audit
from moelens.audit.paper import run_paper_protocol

CORRECTED = [("position", "zero"), ("sequence", "zero"), ("position", "route_around"), ("position", "reroute")]
SHORT = {"utilization": "util", "mean_weight": "mean_rw", "output_norm": "act_norm", "output_std": "act_std",
         "token_weight": "token_weight", "utilization_rate": "util", "mean_routing_weight_when_active": "mean_rw",
         "activation_norm": "act_norm", "activation_std": "act_std"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-seqs", type=int, default=120)
    ap.add_argument("--n-positions", type=int, default=4)
    ap.add_argument("--n-tests", type=int, default=120)
    args = ap.parse_args()
    model = HookedMoETransformer.from_pretrained("moelens-tiny-facts")
    texts = bundled_corpus(n=args.n_seqs)
    cols = {}
    for scope, semantics in CORRECTED:
        t0 = time.time()
        r = run_audit(model, texts, n_positions=args.n_positions, seed=0, ablation_scope=scope, semantics=semantics,
                      progress=False)
        s = r.summary
        cols[f"corrected {scope}/{semantics}"] = {(SHORT[m], l): d for m, l, d in zip(s.metric, s.layer, s.cohens_d)}
        print(f"corrected {scope}/{semantics}: {time.time() - t0:.0f} s", flush=True)
    for flavour in ("olmoe", "deepseek", "qwen"):
        t0 = time.time()
        res = run_paper_protocol(model, texts[:100], layers=model.cfg.moe_layers, flavour=flavour,
                                 n_tests=args.n_tests, filter_texts=False, progress=False)
        s = res["summary"]
        col = {(SHORT[m], l): d for m, l, d in zip(s.metric, s.layer, s.d)}
        c = res["control"]
        col.update({("token_weight", l): d for l, d in zip(c.layer, c.d)})
        cols[f"paper ({flavour} definitions)"] = col
        print(f"paper {flavour}: {time.time() - t0:.0f} s", flush=True)
    table = pd.DataFrame(cols)
    table.index = [f"{m} L{l}" for m, l in table.index]
    print()
    print("| metric, layer | " + " | ".join(table.columns) + " |")
    print("|---|" + "---|" * len(table.columns))
    for name, row in table.iterrows():
        print(f"| {name} | " + " | ".join("" if pd.isna(v) else f"{v:+.3f}" for v in row) + " |")


if __name__ == "__main__":
    main()
