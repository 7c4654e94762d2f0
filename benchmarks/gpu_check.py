"""One-command GPU check: bf16 parity with transformers at real widths, timings side by side with
transformers, packed (``keep_quantized=True``) vs dequantised, peak memory; writes one JSON.

    python benchmarks/gpu_check.py --out gpu_check.json            # on one GPU (H100: < 8 minutes)
    python benchmarks/gpu_check.py --small --device cpu --out x.json   # tiny widths, anywhere (a test runs this)

For each model (Qwen3-30B-A3B, gpt-oss-20b, OLMoE-1B-7B, Qwen3.5-35B-A3B: the presets' configs cut
to 2 layers, 4 for Qwen3.5 so that one full-attention layer is in; ``--small``: the test suite's
tiny configs) the script

1. builds the transformers model on the device in bf16 with random weights (std 1/sqrt(fan_in),
   routers x3, norms near 1), saves it (``save_pretrained``) and writes a quantised copy: MXFP4
   expert banks for gpt-oss (as its hub checkpoints), FP8 128x128 blocks for the others
   (``moelens.testing.save_mxfp4_copy`` / ``save_fp8_copy``);
2. loads moelens from the plain copy (default ``expert_impl="auto"``), and from the quantised copy
   twice: dequantised at load and ``keep_quantized=True``;
3. records: bf16 parity with transformers (max |logit| and |router logit| differences, share of
   (token, layer) pairs with the same expert set, greedy generations equal); whether packed equals
   dequantised bit for bit (same ``expert_impl="sorted"`` on both, and the default ``auto`` paths);
   median times of a forward, a forward caching every hook (transformers: hidden states + router
   logits), greedy generation per new token (KV cache) and a zero-ablation sweep over experts of
   the first sparse layer (one forward per expert; transformers: the expert's down projection
   zeroed), and ``moelens.trace_experts`` over every expert of that layer (moelens only), for
   transformers, moelens and moelens packed; peak memory while loading and running;
   resident weight bytes; host synchronisations in one forward on the GPU code path.

The JSON is rewritten after each model, so a run cut short keeps what it measured. Errors of one
model are recorded under its ``"error"`` and the next model runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {  # name: (preset alias, tiny config of moelens.testing, layers kept, packed format)
    "qwen3-30b-a3b": ("qwen3-30b-a3b", "qwen3_moe", 2, "fp8"),
    "gpt-oss-20b": ("gpt-oss-20b", "gpt_oss", 2, "mxfp4"),
    "olmoe-1b-7b": ("olmoe-1b-7b", "olmoe", 2, "fp8"),
    "qwen3.5-35b-a3b": ("qwen3.5-35b-a3b", "qwen3_5_moe", 4, "fp8"),
}
SIZES = {  # workload: (batch, seq) of forward/cache, prompt and new tokens of generate, experts swept, repeats
    "real": dict(batch=4, seq=512, prompt=64, new=32, sweep=16, sweep_seq=128, repeats=5),
    "small": dict(batch=2, seq=8, prompt=6, new=3, sweep=2, sweep_seq=8, repeats=1),
}
ZERO_CENTERED_NORMS = ("Qwen3NextRMSNorm", "Qwen3_5MoeRMSNorm")


# ------------------------------------------------------------------------------------------ helpers
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, repeats, warmup=1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@contextlib.contextmanager
def peak(device, record: dict, key: str):
    """Peak memory (bytes) of the block: GPU allocator peak on CUDA, else None."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    yield
    if device.type == "cuda":
        sync(device)
        record[key] = {"peak_bytes": torch.cuda.max_memory_allocated(device), "before_bytes": before}
    else:
        record[key] = None


def hf_config_for(name: str, small: bool):
    import transformers

    from moelens import presets
    from moelens.architectures import MODEL_TYPE_ALIASES
    from moelens.testing import tiny_hf_config

    alias, tiny, layers, _ = MODELS[name]
    if small:
        return tiny_hf_config(tiny)
    cfg = presets.get_preset(alias)
    cfg.pop("quantization_config", None)
    cfg["model_type"] = MODEL_TYPE_ALIASES.get(cfg["model_type"], cfg["model_type"])
    cfg["num_hidden_layers"] = layers
    if cfg.get("layer_types"):
        cfg["layer_types"] = cfg["layer_types"][:layers]
    for key in ("mlp_only_layers",):
        if cfg.get(key):
            cfg[key] = [l for l in cfg[key] if l < layers]
    return transformers.AutoConfig.for_model(**cfg)


@torch.no_grad()
def randomize(model, seed: int = 0) -> None:
    """Random weights drawn on the model's device (the rules of ``moelens.testing.sharpen``)."""
    gen = None
    zero_centered = {f"{m}.weight" for m, mod in model.named_modules() if type(mod).__name__ in ZERO_CENTERED_NORMS}
    for name, p in model.named_parameters():
        if gen is None:
            gen = torch.Generator(device=p.device).manual_seed(seed)
        if p.ndim >= 2:
            std = 1.0 if "embed_tokens" in name else p.shape[-1] ** -0.5
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "mlp.router.weight")):
                std *= 3.0
            if name.endswith("mlp.experts.gate_up_proj") and "gpt_oss" in type(model).__module__:
                std = 3.0 * p.shape[-2] ** -0.5  # gpt-oss's [E, d_model, 2I] bank: reach the clamp
            p.normal_(0.0, std, generator=gen)
        elif name.endswith("self_attn.sinks"):
            p.normal_(1.0, 1.0, generator=gen)
        elif name.endswith("A_log"):
            p.uniform_(0.02, 0.2, generator=gen).log_()
        elif name in zero_centered:
            p.normal_(0.0, 0.1, generator=gen)
        elif "norm" in name:
            p.normal_(1.0, 0.1, generator=gen)
        else:
            p.normal_(0.0, 0.1, generator=gen)


def set_impl(model, impl: str) -> None:
    for b in model.blocks:
        if hasattr(b.mlp, "experts"):
            b.mlp.experts.impl = impl


def get_impl(model) -> str:
    return next(b.mlp.experts.impl for b in model.blocks if hasattr(b.mlp, "experts"))


def hf_experts_module(hf, layer: int):
    mlp = hf.model.layers[layer].mlp
    return getattr(mlp, "experts", None)


def router_logits_of(out, n_experts: int):
    logits = getattr(out, "router_logits", None)
    if not logits:
        return None
    return [l.reshape(-1, n_experts).float() for l in logits if l is not None and l.shape[-1] == n_experts]


# ------------------------------------------------------------------------------------------ one model
def check_model(name: str, device: torch.device, small: bool, workdir: Path, record: dict) -> None:
    import transformers

    from moelens import HookedMoETransformer
    from moelens.quant.packed import packed_tensors, resident_bytes
    from moelens.testing import count_host_syncs, gpu_code_path, save_fp8_copy, save_mxfp4_copy

    w = SIZES["small" if small else "real"]
    fmt = MODELS[name][3]
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    hf_config = hf_config_for(name, small)
    mem: dict = {}
    with peak(device, mem, "transformers_build"):
        with torch.device(device):
            hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        randomize(hf)
        hf.eval()
    plain, quant = workdir / f"{name}-plain", workdir / f"{name}-{fmt}"
    hf.save_pretrained(str(plain))
    if fmt == "mxfp4":
        save_mxfp4_copy(plain, quant, device=device)
    else:
        save_fp8_copy(plain, quant, block=(16, 16) if small else (128, 128), device=device)
    record["setup_s"] = round(time.perf_counter() - t0, 2)
    record["checkpoint_bytes"] = {
        "plain": sum(f.stat().st_size for f in plain.glob("*.safetensors")),
        fmt: sum(f.stat().st_size for f in quant.glob("*.safetensors")),
    }
    models = {}
    for key, path, kwargs in (("moelens", plain, {}), ("moelens_dequantised", quant, {}),
                              ("moelens_packed", quant, {"keep_quantized": True})):
        with peak(device, mem, f"{key}_load"):
            models[key] = HookedMoETransformer.from_pretrained(path, dtype=dtype, device=device, **kwargs)
    ml, mp = models["moelens"], models["moelens_packed"]
    cfg = ml.cfg
    record["config"] = {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_experts": cfg.n_experts,
                        "top_k": cfg.top_k, "d_expert": cfg.d_expert, "d_vocab": cfg.d_vocab,
                        "moe_layers": list(cfg.moe_layers), "packed_format": fmt,
                        "packed_tensors": len(packed_tensors(mp))}
    record["resident_bytes"] = {k: resident_bytes(m) for k, m in models.items()}
    record["resident_bytes"]["transformers"] = resident_bytes(hf)
    gen = torch.Generator().manual_seed(0)
    vocab = min(cfg.d_vocab, hf_config.vocab_size) - 1
    tokens = torch.randint(0, vocab, (w["batch"], w["seq"]), generator=gen).to(device)
    layer = cfg.moe_layers[0]
    record["expert_impl"] = {k: m.blocks[layer].mlp.experts.resolved_impl(tokens.new_zeros(1, dtype=dtype))
                             for k, m in models.items()}

    # -- a first forward on the default path; if the grouped kernel fails here, say so and go on sorted
    for key in ("moelens", "moelens_dequantised"):
        try:
            with torch.no_grad():
                models[key](tokens[:1, :16])
        except RuntimeError as exc:
            record.setdefault("grouped_mm_error", {})[key] = f"{type(exc).__name__}: {exc}"[:2000]
            set_impl(models[key], "sorted")
            record["expert_impl"][key] = "sorted (grouped_mm failed)"

    # -- parity with transformers (bf16, plain checkpoint) --------------------------------------
    with torch.no_grad():
        out = hf(tokens, output_router_logits=True)
        logits, cache = ml.run_with_cache(tokens)
    parity = {"max_abs_logit_diff": (out.logits.float() - logits.float()).abs().max().item(),
              "max_abs_logit": out.logits.float().abs().max().item()}
    theirs = router_logits_of(out, cfg.n_experts)
    if theirs and len(theirs) == len(cfg.moe_layers):
        ours = [cache[f"blocks.{l}.mlp.hook_router_logits"].reshape(-1, cfg.n_experts).float() for l in cfg.moe_layers]
        parity["max_abs_router_logit_diff"] = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
        same = []
        for l, t in zip(cfg.moe_layers, theirs):
            mine = cache[f"blocks.{l}.mlp.hook_expert_indices"].reshape(-1, cfg.top_k).sort(-1).values
            ref = t.topk(cfg.top_k, dim=-1).indices.sort(-1).values
            same.append((mine == ref).all(-1).float())
        parity["expert_set_agreement"] = torch.cat(same).mean().item()
    else:
        parity["max_abs_router_logit_diff"] = parity["expert_set_agreement"] = None
    record["parity"] = parity
    del out, cache

    # -- packed vs dequantised ---------------------------------------------------------------------
    with torch.no_grad():
        md = models["moelens_dequantised"]
        auto_a, auto_b = md(tokens), mp(tokens)
        impls = [get_impl(m) for m in (md, mp)]
        for m in (md, mp):
            set_impl(m, "sorted")
        sorted_a, sorted_b = md(tokens), mp(tokens)
        for m, impl in zip((md, mp), impls):
            set_impl(m, impl)
    record["packed"] = {"bit_identical_same_impl": bool(torch.equal(sorted_a, sorted_b)),
                        "max_abs_diff_default_impls": (auto_a.float() - auto_b.float()).abs().max().item()}
    del auto_a, auto_b, sorted_a, sorted_b
    del models["moelens_dequantised"], md
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # -- host syncs of one forward on the GPU code path -------------------------------------------
    with torch.no_grad(), contextlib.ExitStack() as stack:
        if device.type != "cuda":
            stack.enter_context(gpu_code_path())
        counter = stack.enter_context(count_host_syncs())
        ml(tokens)
    record["host_syncs_per_forward"] = {"count": len(counter.calls), "ops": sorted(set(counter.calls))}
    if device.type == "cuda":  # torch's own detector
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            ml(tokens)
            sync(device)
        torch.cuda.set_sync_debug_mode("default")
        record["host_syncs_per_forward"]["cuda_sync_debug_warnings"] = sum(
            "synchroniz" in str(c.message).lower() for c in caught)

    # -- timings -----------------------------------------------------------------------------------
    reps = w["repeats"]
    times: dict = {}
    runners = {"transformers": hf, "moelens": ml, "moelens_packed": mp}
    with torch.no_grad():
        times["forward"] = {k: median_time(lambda m=m: m(tokens), device, reps) for k, m in runners.items()}
        times["cache_all"] = {
            "transformers": median_time(lambda: hf(tokens, output_hidden_states=True, output_router_logits=True),
                                        device, reps),
            "moelens": median_time(lambda: ml.run_with_cache(tokens), device, reps),
            "moelens_packed": median_time(lambda: mp.run_with_cache(tokens), device, reps),
        }
    prompt = tokens[:1, : w["prompt"]] if w["prompt"] <= w["seq"] else torch.randint(0, vocab, (1, w["prompt"]), generator=gen).to(device)
    new = w["new"]

    def gen_hf():
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)

    def gen_ml(m):
        return m.generate(prompt, max_new_tokens=new, do_sample=False, stop_at_eos=False, verbose=False)

    with torch.no_grad():
        outs = {"transformers": gen_hf()[:, prompt.shape[1]:], "moelens": gen_ml(ml)[:, prompt.shape[1]:],
                "moelens_packed": gen_ml(mp)[:, prompt.shape[1]:]}
        record["parity"]["greedy_tokens_equal"] = bool(torch.equal(outs["transformers"].cpu(), outs["moelens"].cpu()))
        times["generate_per_token"] = {
            "transformers": median_time(gen_hf, device, max(1, reps // 2), warmup=0) / new,
            "moelens": median_time(lambda: gen_ml(ml), device, max(1, reps // 2), warmup=0) / new,
            "moelens_packed": median_time(lambda: gen_ml(mp), device, max(1, reps // 2), warmup=0) / new,
        }
    times["expert_sweep_per_expert"] = sweep_times(hf, ml, mp, layer, tokens[:1, : w["sweep_seq"]], w["sweep"], device)
    times["trace_experts"] = trace_times(ml, mp, layer, device, n_samples=2 if small else 8)
    record["times_s"] = times
    with peak(device, mem, "moelens_forward"), torch.no_grad():
        ml(tokens)
    with peak(device, mem, "moelens_packed_forward"), torch.no_grad():
        mp(tokens)
    with peak(device, mem, "transformers_forward"), torch.no_grad():
        hf(tokens)
    record["peak_memory"] = mem
    record["elapsed_s"] = round(time.perf_counter() - t0, 2)
    del hf, ml, mp, models
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sweep_times(hf, ml, mp, layer: int, tokens, n: int, device) -> dict:
    """Seconds per expert of a zero-ablation sweep of experts 0..n-1 at ``layer``, one forward each."""
    experts = list(range(min(n, ml.cfg.n_experts)))
    name = f"blocks.{layer}.mlp."

    def moelens_sweep(m):
        state = {}

        def keep(idx, hook):
            state["idx"] = idx

        for e in experts:
            def zero(out, hook, e=e):
                return out * (state["idx"] != e).unsqueeze(-1).to(out.dtype)

            m.run_with_hooks(tokens, fwd_hooks=[(name + "hook_expert_indices", keep), (name + "hook_expert_out", zero)])

    hf_experts = hf_experts_module(hf, layer)

    def hf_sweep():
        params = [getattr(hf_experts, p) for p in ("down_proj", "down_proj_bias") if getattr(hf_experts, p, None) is not None]
        for e in experts:
            saved = [p[e].clone() for p in params]
            for p in params:
                p[e].zero_()
            hf(tokens)
            for p, s in zip(params, saved):
                p[e].copy_(s)

    out = {}
    with torch.no_grad():
        if hf_experts is not None and isinstance(getattr(hf_experts, "down_proj", None), torch.Tensor):
            out["transformers"] = median_time(hf_sweep, device, 1) / len(experts)
        else:
            out["transformers"] = None
        out["moelens"] = median_time(lambda: moelens_sweep(ml), device, 1) / len(experts)
        out["moelens_packed"] = median_time(lambda: moelens_sweep(mp), device, 1) / len(experts)
    return out


def trace_times(ml, mp, layer: int, device, n_samples: int) -> dict:
    """Seconds of ``moelens.trace_experts`` (every expert of ``layer``, ``n_samples`` noise samples,
    the suffix engine) on a 7-token fact prompt of the toy tokenizer; transformers has no equivalent."""
    import moelens
    from moelens.testing import toy_tokenizer

    case = moelens.FactCase("w5 w9 w14 w3 w77 w21 w8", "w14 w3", "w40", "w41")
    z = torch.randn(n_samples, 2, ml.cfg.d_model, generator=torch.Generator().manual_seed(0))
    out = {"transformers": None}
    for key, m in (("moelens", ml), ("moelens_packed", mp)):
        m.tokenizer = toy_tokenizer(256)
        out[key] = median_time(lambda m=m: moelens.trace_experts(m, case, layer, noise=z.to(device)), device, 1)
    return out


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--small", action="store_true", help="tiny widths (runs on a CPU in seconds)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    ap.add_argument("--workdir", default=None, help="where checkpoints are written (default: /dev/shm if present)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip the remaining models after this many seconds")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; choose from {list(MODELS)}")
    import transformers

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "device_type": device.type, "small": args.small, "dtype": "bfloat16",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "workload": SIZES["small" if args.small else "real"], "models": {},
    }
    root = args.workdir
    if root is None and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        # checkpoints in RAM when there is room for the largest (gpt-oss-20b cut: ~9 GB plain + packed)
        root = "/dev/shm" if args.small or shutil.disk_usage("/dev/shm").free > 24 << 30 else None
    workdir = Path(tempfile.mkdtemp(prefix="moelens-gpu-check-", dir=root))
    t0 = time.perf_counter()
    out = Path(args.out)
    try:
        for name in names:
            record: dict = {}
            result["models"][name] = record
            if time.perf_counter() - t0 > args.budget_s:
                record["error"] = f"skipped: the {args.budget_s:.0f} s budget was spent"
                continue
            try:
                check_model(name, device, args.small, workdir, record)
            except Exception as exc:  # record and go on with the next model
                record["error"] = f"{type(exc).__name__}: {exc}"
                record["traceback"] = traceback.format_exc()[-4000:]
            finally:
                for d in workdir.iterdir():
                    shutil.rmtree(d, ignore_errors=True)
                result["elapsed_s"] = round(time.perf_counter() - t0, 2)
                out.write_text(json.dumps(result, indent=2))
            print(f"{name}: {'error: ' + record['error'] if 'error' in record else 'ok'} "
                  f"({record.get('elapsed_s', '-')} s)", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["elapsed_s"] = round(time.perf_counter() - t0, 2)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
