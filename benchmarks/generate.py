"""moelens generate() vs transformers' generate(), greedy with the KV cache, on the same weights.

Two random Mixtral-like configs: "tiny" (2 layers, d_model 64, vocab 256) and "mid" (4 layers,
d_model 512, 8 experts top-2, d_expert 1024, vocab 32000). Batch 4, prompt 16 tokens, 32 new
tokens, CPU. Checks the outputs are equal, then prints the median time per generated token and
the ratio (goal: moelens within 1.2x of transformers).

    python benchmarks/generate.py [--repeats 5] [--threads 2] [--device cpu]
"""

import argparse
import copy
import statistics
import tempfile
import time

import torch

CONFIGS = {
    "tiny": dict(),
    "mid": dict(vocab_size=32000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--configs", default="tiny,mid")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from moelens import HookedMoETransformer
    from moelens.testing import save_tiny

    for name in args.configs.split(","):
        d = tempfile.mkdtemp()
        hf = save_tiny("mixtral", d, **CONFIGS[name]).to(args.device)
        model = HookedMoETransformer.from_pretrained(d, device=args.device)
        vocab = model.cfg.d_vocab
        ids = torch.randint(3, vocab, (4, 16), generator=torch.Generator().manual_seed(0)).to(args.device)
        mask = torch.ones_like(ids)
        gc = copy.deepcopy(hf.generation_config)
        n = args.new
        gc.eos_token_id, gc.pad_token_id, gc.do_sample, gc.max_new_tokens, gc.min_new_tokens = None, 0, False, n, n

        def run_hf():
            with torch.no_grad():
                return hf.generate(ids, attention_mask=mask, generation_config=gc)

        def run_ml():
            return model.generate(ids, max_new_tokens=n, do_sample=False, stop_at_eos=False, verbose=False)

        assert torch.equal(run_hf(), run_ml()), "outputs differ"
        t_hf, t_ml = interleaved([run_hf, run_ml], args.repeats, sync=args.device.startswith("cuda"))
        print(f"{name:5s} transformers {t_hf / n * 1e3:7.2f} ms/token   moelens {t_ml / n * 1e3:7.2f} ms/token   "
              f"ratio {t_ml / t_hf:.2f}x (goal <= 1.2x)")


def interleaved(fns, repeats, warmup=1, sync=False):
    """Median time of each function, measured round-robin so machine load hits all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            if sync:
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if sync:
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


if __name__ == "__main__":
    main()
