"""Fidelity of every supported architecture against transformers, on tiny random checkpoints.

For each tiny config of ``moelens.testing.TINY_CONFIGS`` (one or more per architecture; new ones are
picked up automatically) the script saves a sharpened tiny transformers model with
``save_pretrained``, loads it in moelens and in transformers (``from_pretrained``, so transformers
keeps its fp32-protected modules in a bf16 model as it does for real checkpoints), runs the same
random tokens, and reports:

* **max |logit error|** in fp32 and in bf16 (both models in the dtype, CPU, SDPA attention);
* **expert-set agreement in bf16**: the share of (token, sparse layer) pairs at which moelens and
  transformers chose the same *set* of experts (each model routes on its own bf16 activations, so a
  1-ulp difference upstream can flip a near-tie), and the same in fp32 (always 100 % so far).

Routing is discrete: the bf16 rate says how often a bf16 run of moelens chooses other experts than
transformers' bf16 run. The logit scale of these tiny models is O(1-10).

Usage::

    python benchmarks/fidelity.py                 # all tiny configs, markdown table on stdout
    python benchmarks/fidelity.py deepseek_v3 glm4_moe --batch 8 --pos 64

Takes about a minute on one CPU core. The table in docs/models.md ("Fidelity") comes from this script.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
import time
import warnings

import torch


def _layers(model):
    for name, mod in model.named_modules():
        if name.endswith("layers") and isinstance(mod, torch.nn.ModuleList):
            return mod
    raise RuntimeError("no decoder layers found")


@torch.no_grad()
def hf_routing(model, tokens):
    """transformers' logits and, per sparse layer, the chosen experts ``[tokens, top_k]`` (from the
    router module's output tuple: its last int64 matrix)."""
    found: dict[int, torch.Tensor] = {}
    handles = []
    k = getattr(model.config, "num_experts_per_tok", None)
    for i, layer in enumerate(_layers(model)):
        for mod in layer.modules():
            def hook(m, inputs, out, i=i):
                if isinstance(out, tuple):
                    ints = [t for t in out if isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.ndim == 2]
                    if ints:
                        found[i] = ints[-1]
                    elif type(m).__name__.endswith("Router") and k:
                        # Llama 4's router returns (scores, logits): its experts are the top-k of the logits
                        found[i] = out[-1].topk(k, dim=-1).indices
            handles.append(mod.register_forward_hook(hook))
    try:
        logits = model(tokens).logits
    finally:
        for h in handles:
            h.remove()
    return logits, found


@torch.no_grad()
def moelens_routing(model, tokens):
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_expert_indices"))
    k = model.cfg.top_k
    return logits, {l: cache[f"blocks.{l}.mlp.hook_expert_indices"].reshape(-1, k) for l in model.cfg.moe_layers}


def agreement(a: dict, b: dict) -> tuple[int, int]:
    same = total = 0
    for layer, idx in a.items():
        other = b[layer]
        eq = (idx.sort(-1).values == other.sort(-1).values).all(-1)
        same += int(eq.sum())
        total += eq.numel()
    return same, total


def measure(name: str, batch: int, pos: int, seed: int = 0) -> dict:
    from transformers import AutoModelForCausalLM

    from moelens import HookedMoETransformer
    from moelens.testing import TINY_CONFIGS, save_tiny

    row = {"config": name, "architecture": TINY_CONFIGS[name][1]}
    with tempfile.TemporaryDirectory() as d:
        with contextlib.redirect_stderr(io.StringIO()):
            save_tiny(name, d, seed=seed)
        vocab = HookedMoETransformer.from_pretrained(d, device="meta").cfg.d_vocab
        tokens = torch.randint(0, vocab, (batch, pos), generator=torch.Generator().manual_seed(seed + 1))
        for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
            ours = HookedMoETransformer.from_pretrained(d, dtype=dtype)
            hf_logits, hf_idx = hf_routing(hf, tokens)
            our_logits, our_idx = moelens_routing(ours, tokens)
            if sorted(hf_idx) != sorted(our_idx):
                raise RuntimeError(f"{name}: sparse layers differ: transformers {sorted(hf_idx)}, moelens {sorted(our_idx)}")
            same, total = agreement(our_idx, hf_idx)
            row[f"err_{tag}"] = (hf_logits.float() - our_logits.float()).abs().max().item()
            row[f"agree_{tag}"] = (same, total)
            row["scale"] = hf_logits.float().abs().max().item() if tag == "fp32" else row["scale"]
    return row


def table(rows: list[dict]) -> str:
    out = ["| architecture (tiny config) | max \\|logit\\| | max logit error fp32 | max logit error bf16 "
           "| same expert set, fp32 | same expert set, bf16 |", "|---|---|---|---|---|---|"]
    for r in rows:
        a32, a16 = r["agree_fp32"], r["agree_bf16"]
        out.append(
            f"| `{r['architecture']}` ({r['config']}) | {r['scale']:.1f} | {r['err_fp32']:.1e} | {r['err_bf16']:.1e} "
            f"| {100 * a32[0] / a32[1]:.2f} % ({a32[1]}) | {100 * a16[0] / a16[1]:.2f} % ({a16[1] - a16[0]} of {a16[1]} differ) |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    from moelens.testing import TINY_CONFIGS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("configs", nargs="*", help=f"tiny configs (default: all of {', '.join(TINY_CONFIGS)})")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--pos", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    names = args.configs or list(TINY_CONFIGS)
    unknown = [n for n in names if n not in TINY_CONFIGS]
    if unknown:
        print(f"unknown tiny configs: {', '.join(unknown)} (known: {', '.join(TINY_CONFIGS)})", file=sys.stderr)
        return 2
    t0 = time.time()
    rows = [measure(n, args.batch, args.pos, args.seed) for n in names]
    print(table(rows))
    print(f"\n{args.batch} x {args.pos} tokens per config, seed {args.seed}, torch {torch.__version__}, "
          f"CPU, {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
