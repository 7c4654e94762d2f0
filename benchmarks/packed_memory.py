"""Packed (``keep_quantized=True``) vs dequantised-at-load: peak host memory while loading and
running, resident weight bytes, and the time cost of dequantising one expert at a time (CPU).

What it does:

1. builds two random checkpoints (bf16, written by transformers' ``save_pretrained``) and their
   quantised copies: a gpt-oss-like model with MXFP4 expert banks (``--experts`` experts of
   ``--width`` x ``--width``) and a DeepSeek-V3-like model in FP8 128 x 128 blocks (attention,
   dense, shared and routed experts), via ``moelens.testing.save_mxfp4_copy`` / ``save_fp8_copy``;
2. loads each quantised checkpoint in a fresh subprocess, once dequantised at load (default) and
   once packed, in bf16, and reports the peak RSS (``ru_maxrss``) after imports, after loading and
   after running a forward of ``--batch`` x ``--seq`` tokens, the resident weight bytes, and the
   median forward time;
3. in the packed child, times dequantising one expert's three matrices (``bank[e]``) against
   running that expert's FFN on the rows a forward gives it on average
   (``batch*seq*top_k / n_experts``).

Usage::

    python benchmarks/packed_memory.py              # ~1 GB of bf16 weights per model, a few minutes on 2 cores
    python benchmarks/packed_memory.py --width 512  # smaller / faster
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child_generate(kind: str, directory: str, width: int, experts: int, layers: int) -> dict:
    import torch
    import transformers

    sys.path.insert(0, str(REPO))
    from moelens.testing import save_fp8_copy, save_mxfp4_copy

    if kind == "mxfp4":
        cfg = transformers.GptOssConfig(
            vocab_size=8192, hidden_size=width, intermediate_size=width, num_hidden_layers=layers,
            num_attention_heads=width // 64, num_key_value_heads=max(1, width // 256), head_dim=64,
            num_local_experts=experts, num_experts_per_tok=4, sliding_window=128,
            layer_types=["sliding_attention", "full_attention"] * (layers // 2),
        )
        cls = transformers.GptOssForCausalLM
    else:
        cfg = transformers.DeepseekV3Config(
            vocab_size=8192, hidden_size=width, intermediate_size=2 * width, moe_intermediate_size=width // 2,
            num_hidden_layers=layers, num_attention_heads=width // 128, num_key_value_heads=width // 128,
            q_lora_rank=width // 2, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
            n_routed_experts=experts, num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2,
            first_k_dense_replace=1, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        )
        cls = transformers.DeepseekV3ForCausalLM
    torch.manual_seed(0)
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.1)
            if p.ndim == 1 and "norm" in str(p.shape):
                p.add_(1.0)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.zero_()
    plain = directory + "-plain"
    model.save_pretrained(plain)
    del model
    if kind == "mxfp4":
        save_mxfp4_copy(plain, directory)
    else:
        save_fp8_copy(plain, directory, block=(128, 128))
    shutil.rmtree(plain)
    files = sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))
    return {"checkpoint_bytes": files}


def child_run(directory: str, packed: bool, batch: int, seq: int, repeats: int) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    from moelens import HookedMoETransformer
    from moelens.quant.packed import resident_bytes

    torch.set_num_threads(1)
    out = {"rss_imports": _maxrss()}
    t = time.perf_counter()
    model = HookedMoETransformer.from_pretrained(directory, dtype=torch.bfloat16, keep_quantized=packed)
    out["load_s"] = time.perf_counter() - t
    out["rss_after_load"] = _maxrss()
    out["resident_bytes"] = resident_bytes(model)
    tokens = torch.randint(0, 8000, (batch, seq), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            model(tokens)
            times.append(time.perf_counter() - t)
    out["forward_s"] = statistics.median(times)
    out["rss_after_forward"] = _maxrss()
    if packed:
        cfg = model.cfg
        ex = model.blocks[cfg.moe_layers[0]].mlp.experts
        rows = max(1, batch * seq * cfg.top_k // cfg.n_experts)
        x = torch.randn(rows, cfg.d_model, dtype=torch.bfloat16)
        deq, ffn = [], []
        with torch.no_grad():
            for e in range(min(8, cfg.n_experts)):
                t = time.perf_counter()
                _ = (ex.w_gate[e], ex.w_up[e], ex.w_down[e])
                deq.append(time.perf_counter() - t)
                t = time.perf_counter()
                ex.ffn(e, x)  # dequantises again and runs the FFN
                ffn.append(time.perf_counter() - t)
        out["dequant_expert_s"] = statistics.median(deq)
        out["ffn_with_dequant_s"] = statistics.median(ffn)
        out["rows_per_expert"] = rows
    return out


def spawn(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.child:
        what, *rest = args.child
        if what == "generate":
            print(json.dumps(child_generate(rest[0], rest[1], *map(int, rest[2:5]))))
        else:
            print(json.dumps(child_run(rest[0], rest[1] == "1", *map(int, rest[2:5]))))
        return 0
    root = Path(tempfile.mkdtemp(prefix="moelens-packed-"))
    rows = []
    try:
        for kind in ("mxfp4", "fp8"):
            d = str(root / kind)
            info = spawn(["generate", kind, d, str(args.width), str(args.experts), str(args.layers)])
            for packed in (0, 1):
                r = spawn(["run", d, str(packed), str(args.batch), str(args.seq), str(args.repeats)])
                rows.append({"format": kind, "packed": bool(packed), **info, **r})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(rows, indent=1))
    mib = lambda b: f"{b / 2**20:,.0f} MiB"
    print("\n| format | load | checkpoint | resident weights | peak RSS added by loading | peak RSS after forward "
          "| forward | dequantise one expert (3 matrices) | that expert's FFN incl. dequantisation |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = (f"{1e3 * r['dequant_expert_s']:.2f} ms | {1e3 * r['ffn_with_dequant_s']:.2f} ms ({r['rows_per_expert']} rows)"
                 if r["packed"] else "- | -")
        print(f"| {r['format']} | {'packed' if r['packed'] else 'dequantised'} | {mib(r['checkpoint_bytes'])} | "
              f"{mib(r['resident_bytes'])} | {mib(r['rss_after_load'] - r['rss_imports'])} | "
              f"{mib(r['rss_after_forward'] - r['rss_imports'])} | {1e3 * r['forward_s']:.0f} ms | {extra} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
