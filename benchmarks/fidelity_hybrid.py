"""Fidelity of the Qwen3-Next / Qwen3.5-MoE hybrids against transformers on tiny random checkpoints.

For each architecture: the max |logit| error of moelens vs transformers in fp32 and in bf16 (both
loaded from the same checkpoint with ``from_pretrained(dtype=...)``, as users load them; a
``.to(torch.bfloat16)`` of an fp32 transformers model would also round its RoPE inverse
frequencies to bf16, a different computation), the bf16 expert agreement (share of token x layer routing
decisions whose expert *sets* are identical), and how far the token-by-token delta rule
(``delta_rule_impl="recurrent"``, the definition) is from the chunked one that both libraries use
for prompts. Batch 4 x 100 tokens (longer than the 64-token chunk).

    python benchmarks/fidelity_hybrid.py
"""

import tempfile

import torch


def routed_sets(out, b, p, k):
    return [torch.topk(torch.softmax(r.float(), -1), k, -1).indices.sort(-1).values.view(b, p, k)
            for r in out.router_logits]


def main():
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM

    from moelens import HookedMoETransformer
    from moelens.testing import save_tiny

    tokens = torch.randint(0, 256, (4, 100), generator=torch.Generator().manual_seed(0))
    b, p = tokens.shape
    print(f"{'architecture':24s} {'fp32 max err':>12s} {'bf16 max err':>12s} {'bf16 experts':>13s} "
          f"{'recurrent-chunked fp32':>23s} {'bf16':>8s}  (max |logit| {'':s})")
    for arch in ("qwen3_next", "qwen3_5_moe"):
        d = tempfile.mkdtemp()
        save_tiny(arch, d)
        row = {}
        for dtype in (torch.float32, torch.bfloat16):
            model = HookedMoETransformer.from_pretrained(d, dtype=dtype)
            hf_d = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
            with torch.no_grad():
                want = hf_d(tokens, output_router_logits=True)
                got, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_expert_indices"))
                ref = HookedMoETransformer.from_pretrained(d, dtype=dtype, delta_rule_impl="recurrent")(tokens)
            row[dtype] = float((want.logits.float() - got.float()).abs().max())
            row[(dtype, "rec")] = float((ref.float() - got.float()).abs().max())
            if dtype == torch.bfloat16:
                theirs = routed_sets(want, b, p, model.cfg.top_k)
                ours = [cache[f"blocks.{l}.mlp.hook_expert_indices"].sort(-1).values for l in model.cfg.moe_layers]
                same = torch.stack([(o == t).all(-1) for o, t in zip(ours, theirs)])
                row["agree"] = float(same.float().mean())
            else:
                row["scale"] = float(want.logits.abs().max())
        print(f"{arch:24s} {row[torch.float32]:12.2e} {row[torch.bfloat16]:12.2e} {row['agree']:13.2%} "
              f"{row[(torch.float32, 'rec')]:23.2e} {row[(torch.bfloat16, 'rec')]:8.2e}  ({row['scale']:.2f})")


if __name__ == "__main__":
    main()
