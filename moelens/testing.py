"""Tiny random transformers models for parity checks (no downloads).

``tiny_hf_model("mixtral")`` builds a small model from the transformers config class with
"sharpened" weights (std ``1/sqrt(fan_in)``, router x3) so that outputs are O(1) and routing is
decisive; ``save_tiny(...)`` writes it with ``save_pretrained`` (the hub's own key layout).
The same builders back moelens' parity tests; use them to check a new architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

TINY_CONFIGS: dict[str, tuple[str, str, dict]] = {
    # name: (config class, model class, kwargs)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5,
    )),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, moe_intermediate_size=32, intermediate_size=192, num_experts=8, num_experts_per_tok=4,
        norm_topk_prob=True, mlp_only_layers=[0], rope_theta=1e6,
    )),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=32, num_experts=8, num_experts_per_tok=4, norm_topk_prob=False, rope_theta=1e4,
        rms_norm_eps=1e-5,
    )),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        qkv_bias=True, moe_intermediate_size=32, shared_expert_intermediate_size=96, intermediate_size=160,
        num_experts=8, num_experts_per_tok=4, norm_topk_prob=False, mlp_only_layers=[0], rope_theta=1e6,
    )),
    "deepseek_v2_lite": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=160,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
        moe_intermediate_size=24, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 16, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    )),
    "deepseek_v2_full": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=160,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
        moe_intermediate_size=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=16.0,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 16, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    )),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=4, sliding_window=4,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 4096, "rope_theta": 150000.0},
    )),
    # hybrids: Gated DeltaNet + gated full attention (layer_types), partial RoPE, (1 + w) norms
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, intermediate_size=96, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False, mlp_only_layers=[2],
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
    )),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25,
                         "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    )),
    # DeepSeek-V3 router family: several groups with topk_group < n_group, YaRN, q low-rank path
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=160,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
        moe_intermediate_size=24, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        rope_interleave=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
    )),
    # GLM-4.5/4.6/4.7: GQA with q/k/v biases, per-head QK-norm, partial RoPE (half of head_dim 24)
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=160,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, attention_bias=True, use_qk_norm=True,
        moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, n_group=2,
        topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
    )),
    # GLM-4.7-Flash: MLA (q low-rank) with the V3 router, layer 0 dense
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, intermediate_size=160, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=24,
        n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.8,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )),
    # DeepSeek-V3.2: V3 + DeepSeek Sparse Attention; index_topk=5 of 16 positions so the indexer drops keys
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=160,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
        moe_intermediate_size=24, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        index_topk=5, index_head_dim=16, index_n_heads=8,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
    )),
    # GLM-5: interleaved indexer RoPE and cross-layer index sharing (layer 2 reuses layer 1's top-k)
    "glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=4, first_k_dense_replace=1, intermediate_size=160,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=24, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
        moe_intermediate_size=24, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        index_topk=5, index_head_dim=16, index_n_heads=8, indexer_types=["full", "full", "shared", "full"],
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )),
    # DeepSeek-V4: 3 residual streams, sliding window 8, CSA (rate 4, 2 of the entries kept) and HCA
    # (rate 8) layers, one hash-routed layer; 32-token sequences make the window, the compression and
    # the indexer all select
    "deepseek_v4": ("DeepseekV4Config", "DeepseekV4ForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=32, q_lora_rank=32,
        partial_rotary_factor=0.25, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8}, hc_mult=3,
        sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=4, index_head_dim=16, index_topk=2,
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"], swiglu_limit=1.0,
        rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16,
                         "beta_fast": 32, "beta_slow": 1},
    )),
}


ZERO_CENTERED_NORMS = ("Qwen3NextRMSNorm", "Qwen3_5MoeRMSNorm")


def tiny_hf_config(name: str, **overrides: Any):
    import transformers

    cfg_cls, _, kwargs = TINY_CONFIGS[name]
    return getattr(transformers, cfg_cls)(**{**kwargs, **overrides})


@torch.no_grad()
def sharpen(model: torch.nn.Module, seed: int = 0, router_scale: float = 3.0) -> torch.nn.Module:
    """Redraw every matrix with std ``1/sqrt(fan_in)`` (router rows x ``router_scale``), norms at
    1 + small noise and biases small, so outputs are O(1) and the router is decisive. DeepSeek-V3
    correction biases (buffers) get std 0.3, enough to change which experts are selected."""
    gen = torch.Generator().manual_seed(seed)
    # norms that scale by (1 + w) (Qwen3.5 / Qwen3-Next) are drawn around 0, not 1
    zero_centered = {f"{m}.weight" for m, mod in model.named_modules() if type(mod).__name__ in ZERO_CENTERED_NORMS}
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            std = 1.0 if "embed_tokens" in name else p.shape[-1] ** -0.5
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "mlp.router.weight")):
                std *= router_scale
            if name.endswith("mlp.experts.gate_up_proj") and p.ndim == 3 and "gpt_oss" in type(model).__module__:
                # gpt-oss: transposed [E, d_model, 2I] bank; x3 so that |gate|, |up| > swiglu_limit=7 happens
                std = 3.0 * p.shape[-2] ** -0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        elif name.endswith("self_attn.sinks"):
            p.copy_(1.0 + torch.randn(p.shape, generator=gen))  # sinks that take a real share of attention
        elif name.endswith("A_log"):  # Gated DeltaNet: slow decays (0.8..0.98 per token) so the state matters
            p.copy_(torch.empty(p.shape).uniform_(0.02, 0.2, generator=gen).log())
        elif name in zero_centered:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        elif "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # DeepSeek-V3 family: a selection-only bias (buffer)
            b.copy_(0.3 * torch.randn(b.shape, generator=gen))
        elif name.endswith("tid2eid"):  # DeepSeek-V4 hash routing: distinct random experts per token
            n_experts = model.config.n_routed_experts
            b.copy_(torch.stack([torch.randperm(n_experts, generator=gen)[: b.shape[1]] for _ in range(b.shape[0])]))
    return model


def tiny_hf_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A sharpened tiny transformers model of architecture ``name`` (see :data:`TINY_CONFIGS`)."""
    import transformers

    _, model_cls, _ = TINY_CONFIGS[name]
    torch.manual_seed(seed)
    cfg = tiny_hf_config(name, **overrides)
    model = getattr(transformers, model_cls)(cfg)
    sharpen(model, seed=seed)
    return model.to(dtype).eval()


def save_tiny(
    name: str, directory: str | Path, *, seed: int = 0, fused: bool = False, max_shard_size: Optional[str] = None,
    dtype: torch.dtype = torch.float32, **overrides: Any,
):
    """Build :func:`tiny_hf_model` and ``save_pretrained`` it (hub per-expert keys unless ``fused``)."""
    model = tiny_hf_model(name, seed=seed, dtype=dtype, **overrides)
    kwargs: dict[str, Any] = {}
    if fused:
        kwargs["save_original_format"] = False
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(directory), **kwargs)
    return model


def edit_config(directory: str | Path, **changes: Any) -> None:
    """Update fields of a saved checkpoint's ``config.json`` in place (tests of config handling)."""
    import json

    path = Path(directory) / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def toy_tokenizer(vocab_size: int = 256):
    """A word-level fast tokenizer over ``w0 .. w{n}`` plus ``<bos>``/``<pad>``, for tracing tests of
    tiny models (every word one token; ``w17`` is token 17)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 2)}
    vocab.update({"<bos>": vocab_size - 2, "<pad>": vocab_size - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab_size - 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>")


FP8_PROJECTIONS = r".*\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight"


def fp8_quantize_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-style FP8 block quantisation of a 2-D weight: ``(q float8_e4m3fn, scale_inv fp32
    [ceil(out/bm), ceil(in/bn)])`` with ``w ~= q * scale_inv`` per block (amax / 448 scaling)."""
    import math

    rows, cols = w.shape
    bm, bn = block
    grid = torch.empty(math.ceil(rows / bm), math.ceil(cols / bn), dtype=torch.float32)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            blk = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].float()
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            grid[i, j] = s
            q[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = (blk / s).to(torch.float8_e4m3fn)
    return q, grid


def save_fp8_copy(src: str | Path, dst: str | Path, block: tuple[int, int] = (128, 128),
                  pattern: str = FP8_PROJECTIONS, write_block_size: bool = True) -> list[str]:
    """Copy the checkpoint in ``src`` to ``dst`` with every 2-D tensor whose key fully matches
    ``pattern`` stored as FP8 blocks (``<key>`` float8_e4m3fn + ``<key>_scale_inv`` fp32) and
    ``quantization_config`` added to config.json, as DeepSeek-V3's FP8 checkpoints are laid out.
    Returns the quantised keys."""
    import json
    import re
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json":
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  **({"weight_block_size": list(block)} if write_block_size else {})}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    rx, done = re.compile(pattern), []
    for shard in sorted(src.glob("*.safetensors")):
        out = {}
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.ndim == 2 and rx.fullmatch(key):
                    out[key], out[key + "_scale_inv"] = fp8_quantize_block(t, block)
                    done.append(key)
                else:
                    out[key] = t
        save_file(out, dst / shard.name, metadata={"format": "pt"})
    if (src / "model.safetensors.index.json").is_file():
        index = json.loads((src / "model.safetensors.index.json").read_text())
        for key in done:
            index["weight_map"][key + "_scale_inv"] = index["weight_map"][key]
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return done
