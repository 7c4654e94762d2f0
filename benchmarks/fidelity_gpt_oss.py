"""Fidelity of moelens' gpt-oss against transformers on a tiny random checkpoint (fp32 and bf16).

For each dtype the checkpoint is saved by transformers in that dtype (the bf16 one is what a
dequantised gpt-oss checkpoint looks like) and loaded by both libraries in it. Reported:

* max |logit error| over all positions, next to max |logit| (scale);
* max |router logit error| over all layers;
* expert-set agreement: the fraction of (token, layer) pairs where moelens and transformers choose
  the same set of ``top_k`` experts (transformers: ``topk`` of its router logits).

Run: ``PYTHONPATH=. python benchmarks/fidelity_gpt_oss.py [--batch 4 --pos 96 --window 16]``
(about a minute on one CPU core). The tiny config is ``moelens.testing.TINY_CONFIGS["gpt_oss"]``
with ``sliding_window`` overridden (sequences are several windows long), sharpened weights (active
SwiGLU clamp, sinks taking ~25 % of attention).
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from moelens import HookedMoETransformer
from moelens.testing import save_tiny


def measure(dtype: torch.dtype, batch: int, pos: int, window: int, seed: int) -> dict:
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        save_tiny("gpt_oss", d, dtype=dtype, sliding_window=window, seed=seed)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
        model = HookedMoETransformer.from_pretrained(d, dtype=dtype)
    ids = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))
    names = lambda n: n.endswith(("hook_router_logits", "hook_expert_indices"))  # noqa: E731
    with torch.no_grad():
        out = hf(ids, output_router_logits=True)
        logits, cache = model.run_with_cache(ids, names_filter=names)
    router_err, agree = 0.0, []
    for layer in model.cfg.moe_layers:
        theirs = out.router_logits[layer].view(batch, pos, -1)
        ours = cache[f"blocks.{layer}.mlp.hook_router_logits"]
        router_err = max(router_err, (ours.float() - theirs.float()).abs().max().item())
        a = cache[f"blocks.{layer}.mlp.hook_expert_indices"].sort(-1).values
        b = torch.topk(theirs, model.cfg.top_k, dim=-1).indices.sort(-1).values
        agree.append((a == b).all(-1).float())
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "max_logit_err": (logits.float() - out.logits.float()).abs().max().item(),
        "max_abs_logit": out.logits.float().abs().max().item(),
        "max_router_logit_err": router_err,
        "expert_set_agreement": torch.stack(agree).mean().item(),
        "pairs": batch * pos * len(model.cfg.moe_layers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pos", type=int, default=96)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"gpt-oss tiny checkpoint, {args.batch} x {args.pos} tokens, sliding window {args.window}")
    print("| dtype | max logit error | max logit | max router-logit error | expert-set agreement (token x layer) |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        r = measure(dtype, args.batch, args.pos, args.window, args.seed)
        print(f"| {r['dtype']} | {r['max_logit_err']:.2e} | {r['max_abs_logit']:.2f} | {r['max_router_logit_err']:.2e} "
              f"| {100 * r['expert_set_agreement']:.2f} % of {r['pairs']} |")


if __name__ == "__main__":
    main()
