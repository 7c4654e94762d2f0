"""DeepSeek-V2 parity against transformers 5 (fp32, CPU) on tiny random checkpoints.

Variants: ``lite`` (direct q_proj, greedy routing), ``full`` (q low-rank path, group-limited greedy
with top_k 3 > topk_group 2, routed_scaling_factor 16), ``dense2`` (``full`` with two dense first
layers out of four), ``yarn_factor`` (``lite`` with mscale != mscale_all_dim, so the cos/sin
attention_factor is not 1), ``no_yarn`` (``lite`` with default RoPE) and ``big_eps`` (``full`` with
``rms_norm_eps=0.1``, which the MLA latent norms must not use).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import moelens
from moelens import HookedMoETransformer
from moelens.architectures import translate_config
from moelens.architectures.base import UnsupportedConfigError
from moelens.testing import save_tiny

warnings.filterwarnings("ignore", message=".*RoPE scaling factor.*")

ATOL = 1e-4
BATCH, POS = 2, 12

VARIANTS = {
    "lite": ("deepseek_v2_lite", {}),
    "full": ("deepseek_v2_full", {}),
    "dense2": ("deepseek_v2_full", dict(first_k_dense_replace=2, num_hidden_layers=4)),
    "yarn_factor": ("deepseek_v2_lite", dict(rope_scaling={
        "type": "yarn", "factor": 8, "original_max_position_embeddings": 4, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.5})),
    "no_yarn": ("deepseek_v2_lite", dict(rope_scaling=None)),
    # the latent norms keep eps 1e-6 whatever rms_norm_eps says
    "big_eps": ("deepseek_v2_full", dict(rms_norm_eps=0.1)),
}


class Pair:
    """A tiny transformers model, its checkpoint directory and the moelens model loaded from it."""

    def __init__(self, tmp_path_factory, variant: str):
        name, overrides = VARIANTS[variant]
        self.dir = tmp_path_factory.mktemp(variant)
        self.hf = save_tiny(name, self.dir, **overrides)
        self.overrides = overrides
        self.name = name
        self.model = HookedMoETransformer.from_pretrained(self.dir)
        self.tokens = torch.randint(0, 256, (BATCH, POS), generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def hf_run(self, tokens, attention_mask=None, **kwargs):
        """HF output plus, per sparse layer, the router's (weights, indices) ``[T, k]``."""
        routed, handles = [], []
        for layer in self.hf.model.layers:
            if hasattr(layer.mlp, "gate"):
                handles.append(layer.mlp.gate.register_forward_hook(lambda m, i, o: routed.append((o[1], o[2]))))
        try:
            out = self.hf(tokens, attention_mask=attention_mask, output_router_logits=True, **kwargs)
        finally:
            for h in handles:
                h.remove()
        return out, routed


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    spin-waiting makes each forward take ~1 s instead of ~10 ms."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pairs(one_thread, tmp_path_factory):
    cache: dict[str, Pair] = {}

    def get(variant: str) -> Pair:
        if variant not in cache:
            cache[variant] = Pair(tmp_path_factory, variant)
        return cache[variant]

    return get


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_router_and_expert_sets_match(pairs, variant):
    p = pairs(variant)
    m, cfg = p.model, p.model.cfg
    n_dense = p.hf.config.first_k_dense_replace
    assert cfg.moe_layers == list(range(n_dense, cfg.n_layers))
    assert cfg.attention == "mla" and cfg.rope_interleaved and not cfg.norm_topk_prob
    out, routed = p.hf_run(p.tokens)
    with torch.no_grad():
        logits, cache = m.run_with_cache(p.tokens)
    assert (out.logits - logits).abs().max().item() < ATOL
    assert out.logits.abs().max().item() > 1.0  # not trivially small
    assert len(out.router_logits) == len(routed) == len(cfg.moe_layers)
    group_limited_mattered = False
    for i, l in enumerate(cfg.moe_layers):
        ours = cache[f"blocks.{l}.mlp.hook_router_logits"]
        assert ours.dtype == torch.float32
        assert (out.router_logits[i].view(BATCH, POS, -1) - ours).abs().max().item() < ATOL
        hf_w, hf_idx = routed[i]
        idx = cache[f"blocks.{l}.mlp.hook_expert_indices"].reshape(-1, cfg.top_k)
        w = cache[f"blocks.{l}.mlp.hook_expert_weights"].reshape(-1, cfg.top_k)
        hf_sorted, hf_order = hf_idx.sort(-1)
        our_sorted, our_order = idx.sort(-1)
        assert torch.equal(hf_sorted, our_sorted), f"layer {l}: chosen expert sets differ"
        assert (hf_w.gather(-1, hf_order) - w.gather(-1, our_order)).abs().max().item() < ATOL
        plain = torch.topk(cache[f"blocks.{l}.mlp.hook_router_scores"].reshape(-1, cfg.n_experts), cfg.top_k).indices
        group_limited_mattered |= not torch.equal(plain.sort(-1).values, our_sorted)
    if cfg.topk_method == "group_limited_greedy":
        assert group_limited_mattered, "test input never exercises the group restriction"


@pytest.mark.parametrize("variant", ["lite", "full"])
def test_fused_layout_loads_identically(pairs, tmp_path, variant):
    p = pairs(variant)
    name, overrides = VARIANTS[variant]
    save_tiny(name, tmp_path, fused=True, **overrides)
    fused = HookedMoETransformer.from_pretrained(tmp_path)
    ref = p.model.state_dict()
    for k, v in fused.state_dict().items():
        assert torch.equal(v, ref[k]), k
    with torch.no_grad():
        assert torch.equal(fused(p.tokens), p.model(p.tokens))


@pytest.mark.parametrize("variant", ["lite", "full"])
def test_left_padded_batch_matches_at_real_positions(pairs, variant):
    p = pairs(variant)
    mask = torch.ones(BATCH, POS, dtype=torch.long)
    mask[0, :5] = 0
    mask[1, :1] = 0
    out, routed = p.hf_run(p.tokens, attention_mask=mask)
    with torch.no_grad():
        ours = p.model(p.tokens, attention_mask=mask)
    real = mask.bool()
    assert (out.logits[real] - ours[real]).abs().max().item() < ATOL


@pytest.mark.parametrize("variant", ["lite", "full"])
def test_explicit_attention_equals_sdpa_and_hf_eager_pattern(pairs, variant):
    p = pairs(variant)
    m = p.model
    mask = torch.ones(BATCH, POS, dtype=torch.long)
    mask[0, :3] = 0
    patterns = {}

    def keep(t, hook):
        patterns[hook.name] = t.detach().clone()

    with torch.no_grad():
        for attention_mask in (None, mask):
            sdpa = m(p.tokens, attention_mask=attention_mask)
            names = [f"blocks.{l}.attn.hook_pattern" for l in range(m.cfg.n_layers)]
            explicit = m.run_with_hooks(p.tokens, attention_mask=attention_mask, fwd_hooks=[(n, keep) for n in names])
            assert (sdpa - explicit).abs().max().item() < 1e-5
    # the last run's patterns (with padding) equal transformers' eager attention weights
    previous = p.hf.config._attn_implementation
    p.hf.set_attn_implementation("eager")
    try:
        out, _ = p.hf_run(p.tokens, attention_mask=mask, output_attentions=True)
    finally:
        p.hf.set_attn_implementation(previous)
    real_q = mask.bool()
    for l, hf_att in enumerate(out.attentions):
        ours = patterns[f"blocks.{l}.attn.hook_pattern"]
        diff = (hf_att - ours).abs().permute(0, 2, 1, 3)[real_q]  # real query positions only
        assert diff.max().item() < 1e-5, l


@pytest.mark.parametrize("variant", ["lite", "full"])
def test_every_hook_has_its_declared_shape(pairs, variant):
    p = pairs(variant)
    m = p.model
    with moelens.check_shapes(m), torch.no_grad():
        # a hook on the pattern forces the explicit path, so the score/pattern hooks fire too
        _, cache = m.run_with_cache(p.tokens)
    assert set(cache.keys()) == set(m.hook_dict)
    cfg = m.cfg
    a = cache["blocks.1.attn.hook_rot_k"]
    assert a.shape == (BATCH, POS, cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    assert cache["blocks.1.attn.hook_v"].shape == (BATCH, POS, cfg.n_heads, cfg.v_head_dim)
    assert cache["blocks.1.attn.hook_kv_latent"].shape == (BATCH, POS, cfg.kv_lora_rank)
    assert cache["blocks.1.attn.hook_k_pe"].shape == (BATCH, POS, cfg.qk_rope_head_dim)
    if cfg.q_lora_rank:
        assert cache["blocks.1.attn.hook_q_latent"].shape == (BATCH, POS, cfg.q_lora_rank)
    # the shared rope key: identical across heads before and after RoPE, and nope parts untouched by RoPE
    k, rot_k, dn = cache["blocks.1.attn.hook_k"], cache["blocks.1.attn.hook_rot_k"], cfg.qk_nope_head_dim
    assert torch.equal(k[..., dn:], cache["blocks.1.attn.hook_k_pe"][:, :, None].expand_as(k[..., dn:]))
    assert torch.equal(rot_k[..., dn:], rot_k[:, :, :1, dn:].expand_as(rot_k[..., dn:]))
    assert torch.equal(rot_k[..., :dn], k[..., :dn])


MLA_HOOKS = ["hook_q", "hook_kv_latent", "hook_k_pe", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k",
             "hook_attn_scores", "hook_pattern", "hook_z"]


def _block_hooks(attn: list[str], mlp: list[str]) -> list[str]:
    return (["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized"] + [f"attn.{h}" for h in attn]
            + ["hook_attn_out", "hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized"] + mlp + ["hook_mlp_out", "hook_resid_post"])


SPARSE_MLP = ["mlp.hook_router_logits", "mlp.hook_router_scores", "mlp.hook_expert_indices",
              "mlp.hook_expert_weights", "mlp.hook_expert_out", "mlp.hook_routed_out",
              "mlp.shared_experts.hook_pre", "mlp.shared_experts.hook_post", "mlp.hook_shared_out"]


@pytest.mark.parametrize("variant", ["lite", "dense2"])
def test_hook_names_in_execution_order(pairs, variant):
    m = pairs(variant).model
    attn = (["hook_q_latent"] if m.cfg.q_lora_rank else []) + MLA_HOOKS
    expected = ["hook_embed"]
    for l in range(m.cfg.n_layers):
        mlp = SPARSE_MLP if l in m.cfg.moe_layers else ["mlp.hook_pre", "mlp.hook_post"]
        expected += [f"blocks.{l}.{h}" for h in _block_hooks(attn, mlp)]
    expected += ["ln_final.hook_scale", "ln_final.hook_normalized", "unembed.hook_in", "unembed.hook_out"]
    assert list(m.hook_dict) == expected
    # dense layers: no router / expert hooks at all
    for l in m.cfg.dense_layers:
        names = [n for n in m.hook_dict if n.startswith(f"blocks.{l}.")]
        assert not [n for n in names if "router" in n or "expert" in n]


@pytest.mark.parametrize("variant", ["lite", "full"])
def test_kv_prefix_recomputation_matches_full_sequence(pairs, variant):
    """Attention over a suffix with the prefix's (rot_k, v) prepended equals the full-sequence run."""
    m = pairs(variant).model
    tokens, p0 = pairs(variant).tokens, 5
    with torch.no_grad():
        _, cache = m.run_with_cache(tokens)
        for layer in (0, m.cfg.n_layers - 1):
            attn = m.blocks[layer].attn
            x = cache[f"blocks.{layer}.ln1.hook_normalized"]
            prefix = (cache[f"blocks.{layer}.attn.hook_rot_k"][:, :p0], cache[f"blocks.{layer}.attn.hook_v"][:, :p0])
            ctx = m.attention_context(POS - p0, q_offset=p0)
            full = cache[f"blocks.{layer}.hook_attn_out"][:, p0:]
            assert (attn(x[:, p0:], ctx, kv_prefix=prefix) - full).abs().max().item() < 1e-5
            with m.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", lambda t, hook: t)]):
                assert (attn(x[:, p0:], ctx, kv_prefix=prefix) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["deepseek_v2_lite", "deepseek_v2_full"])
def test_bf16_matches_both_attention_paths(one_thread, tmp_path, name):
    """bf16: SDPA path vs transformers' SDPA, explicit path vs transformers' eager (measured: bit-exact)."""
    save_tiny(name, tmp_path, dtype=torch.bfloat16)
    # reload as users do: transformers keeps the RoPE inverse frequencies in fp32 (a `.to(bf16)`
    # model would hold them in bf16)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    m = HookedMoETransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sdpa = (hf(tokens).logits.float() - m(tokens).float()).abs().max().item()
        hf.set_attn_implementation("eager")
        explicit = m.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda t, hook: t)])
        eager = (hf(tokens).logits.float() - explicit.float()).abs().max().item()
    assert sdpa < 1e-2 and eager < 1e-2, (sdpa, eager)


def _bf16_run(hf, model, tokens, **overrides):
    """Logits and per sparse layer the router's (logits, weights, indices) of both libraries."""
    routed, handles = [], []
    for layer in hf.model.layers:
        if hasattr(layer.mlp, "gate"):
            handles.append(layer.mlp.gate.register_forward_hook(lambda m, i, o: routed.append(o)))
    names = [f"blocks.{l}.mlp.{h}" for l in model.cfg.moe_layers
             for h in ("hook_router_logits", "hook_expert_weights", "hook_expert_indices")]
    try:
        with torch.no_grad():
            want = hf(tokens).logits
            got, cache = model.run_with_cache(tokens, names_filter=names)
    finally:
        for h in handles:
            h.remove()
    return want, got, routed, cache


@pytest.mark.parametrize("name", ["deepseek_v2_lite", "deepseek_v2_full"])
def test_bf16_bit_identical_to_transformers(one_thread, tmp_path, name):
    """An fp32 checkpoint loaded in bf16 by both libraries (as benchmarks/fidelity.py does): the same
    logits, router logits, combine weights and experts in every slot, bit for bit (CPU, SDPA). This
    needs the router weight kept fp32 (transformers' ``_keep_in_fp32_modules_strict``) and the RoPE in
    transformers' complex arithmetic (``rope_arith="complex"``); without either the bits differ."""
    from transformers import AutoModelForCausalLM

    save_tiny(name, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    m = HookedMoETransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert m.cfg.rope_arith == "complex"
    for l in m.cfg.moe_layers:
        assert m.blocks[l].mlp.router.W_router.dtype == hf.model.layers[l].mlp.gate.weight.dtype == torch.float32
        assert torch.equal(m.blocks[l].mlp.router.W_router, hf.model.layers[l].mlp.gate.weight)
    # 37 positions: pos * d_rope/2 is not a multiple of the complex multiply's vector width (a scalar tail)
    for shape in [(8, 64), (3, 37)]:
        tokens = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1))
        want, got, routed, cache = _bf16_run(hf, m, tokens)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), (got.float() - want.float()).abs().max()
        for l, (logits, weights, indices) in zip(m.cfg.moe_layers, routed):
            k = m.cfg.top_k
            assert torch.equal(cache[f"blocks.{l}.mlp.hook_router_logits"].reshape(logits.shape), logits)
            assert torch.equal(cache[f"blocks.{l}.mlp.hook_expert_indices"].reshape(-1, k), indices)
            assert torch.equal(cache[f"blocks.{l}.mlp.hook_expert_weights"].reshape(-1, k), weights)


@pytest.mark.parametrize("name", ["deepseek_v2_lite", "deepseek_v2_full"])
def test_bf16_router_weight_rounded_to_bf16_is_detected(one_thread, tmp_path, name):
    """Negative control that differs by construction: a router weight rounded to bf16
    (``router_fp32_params=False``) is not transformers' fp32 weight (the bf16 rounding of these seeded
    fp32 values is exact IEEE arithmetic, the same on every machine), and the fp32 router logits move
    by ~1e-3 relative, four orders of magnitude above an fp32 rounding, so the bit-for-bit comparison
    above sees it on any CPU. (The other fix, transformers' complex RoPE arithmetic instead of real
    products, changes at most an fp32 ulp; whether that reaches the bf16 logits depends on the CPU's
    kernels, so it cannot be a control.)"""
    from transformers import AutoModelForCausalLM

    save_tiny(name, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    m = HookedMoETransformer.from_pretrained(tmp_path, dtype=torch.bfloat16, router_fp32_params=False)
    tokens = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    _, _, routed, cache = _bf16_run(hf, m, tokens)
    l = m.cfg.moe_layers[0]
    ours_w, hf_w = m.blocks[l].mlp.router.W_router, hf.model.layers[l].mlp.gate.weight
    assert ours_w.dtype == torch.bfloat16 and hf_w.dtype == torch.float32
    assert (ours_w.float() - hf_w).abs().max() > 1e-4 * hf_w.abs().max()
    ours = cache[f"blocks.{l}.mlp.hook_router_logits"].reshape(routed[0][0].shape)
    relative = ((ours - routed[0][0]).abs().max() / routed[0][0].abs().max()).item()
    assert relative > 1e-5, relative  # far above fp32 rounding (6e-8): no CPU can round it away


# ---------------------------------------------------------------------------------- negative controls
@pytest.mark.parametrize(
    "override",
    [dict(rope_interleaved=False), dict(norm_topk_prob=True), dict(rope_scaling=None)],
    ids=["half_split_rope", "renormalised_topk", "no_yarn"],
)
def test_negative_controls_are_detected(pairs, override):
    p = pairs("full")
    wrong = HookedMoETransformer.from_pretrained(p.dir, **override)
    with torch.no_grad():
        diff = (p.hf(p.tokens).logits - wrong(p.tokens)).abs().max().item()
    assert diff > 1e-2, override


# ---------------------------------------------------------------------------------- config translation
LITE_CONFIG = {  # deepseek-ai/DeepSeek-V2-Lite config.json (MOE_ARCHITECTURES.md §6.6)
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}


def test_real_lite_config_translates_and_counts_parameters():
    cfg = translate_config(LITE_CONFIG)
    assert cfg.moe_layers == list(range(1, 27)) and cfg.d_mlp == 10944 and cfg.d_shared == 2816
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.d_head_qk, cfg.d_head_v) == (16, 16, 192, 128)
    assert cfg.q_lora_rank is None and cfg.yarn["factor"] == 40 and cfg.rope_theta == 1e4
    assert (cfg.router_dtype, cfg.router_weights_dtype, cfg.topk_sorted) == ("float32", "float32", False)
    model = HookedMoETransformer.from_config(cfg, device="meta")
    assert model.blocks[0].attn.scale == pytest.approx(0.114721, abs=1e-6)
    assert model._rope_factor == pytest.approx(1.0)
    assert model.n_params() == 15_706_484_224  # transformers' meta-device count


def test_class_defaults_match_transformers():
    import transformers

    from moelens.architectures.deepseek_v2 import DEFAULTS

    hf = transformers.DeepseekV2Config().to_dict()
    for key, value in DEFAULTS.items():
        if key in ("rope_parameters", "rope_theta", "rope_scaling", "num_key_value_heads"):
            continue  # normalised by __post_init__ (theta 1e4 default / kv heads = heads)
        assert hf[key] == value, key
    assert hf["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}


@pytest.mark.parametrize(
    "field, value",
    [("topk_method", "noaux_tc"), ("scoring_func", "sigmoid"), ("hidden_act", "gelu"), ("attention_bias", True),
     ("num_key_value_heads", 8), ("ep_size", 2)],
)
def test_unsupported_values_raise_naming_the_field(field, value):
    with pytest.raises(UnsupportedConfigError, match=field):
        translate_config({**LITE_CONFIG, field: value})


def test_group_limited_without_groups_raises():
    with pytest.raises(UnsupportedConfigError, match="n_group"):
        translate_config({**LITE_CONFIG, "topk_method": "group_limited_greedy", "n_group": None})
