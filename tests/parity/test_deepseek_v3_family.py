"""DeepSeek-V3 router family parity against transformers 5 (fp32, CPU) on tiny random checkpoints:
``DeepseekV3ForCausalLM`` (and Kimi-K2's ``kimi_k2`` configs), ``Glm4MoeForCausalLM`` and
``Glm4MoeLiteForCausalLM``.

Every tiny checkpoint has a non-zero ``e_score_correction_bias`` (std 0.3, so biased selection differs
from plain top-k) and several expert groups with ``topk_group < n_group``. Variants: ``v3`` (q low-rank
path, YaRN, interleaved RoPE, 4 groups keep 2), ``v3_noq`` (direct q_proj), ``v3_half`` (no
``rope_interleave``: half-split RoPE), ``v3_dense2`` (two dense layers), ``v3_raw`` (no renormalisation),
``glm`` (GQA, q/k/v biases, per-head QK-norm, partial RoPE on 12 of 24 dims), ``glm_air`` (no QK-norm, no
biases), ``glm_lite`` (MLA with q low-rank path) and ``glm_lite_noq``.
"""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

import moelens
from moelens import HookedMoETransformer
from moelens.architectures import get_architecture, translate_config
from moelens.architectures.base import UnsupportedConfigError
from moelens.testing import save_tiny

warnings.filterwarnings("ignore", message=".*RoPE scaling factor.*")

ATOL = 1e-4
BATCH, POS = 2, 12

VARIANTS = {
    "v3": ("deepseek_v3", {}),
    "v3_noq": ("deepseek_v3", dict(q_lora_rank=None)),
    "v3_half": ("deepseek_v3", dict(rope_interleave=False)),
    "v3_dense2": ("deepseek_v3", dict(first_k_dense_replace=2, num_hidden_layers=4)),
    "v3_raw": ("deepseek_v3", dict(norm_topk_prob=False, routed_scaling_factor=1.0)),
    "glm": ("glm4_moe", {}),
    "glm_air": ("glm4_moe", dict(use_qk_norm=False, attention_bias=False)),
    "glm_lite": ("glm4_moe_lite", {}),
    "glm_lite_noq": ("glm4_moe_lite", dict(q_lora_rank=None)),
}


class Pair:
    """A tiny transformers model, its checkpoint directory and the moelens model loaded from it."""

    def __init__(self, tmp_path_factory, variant: str):
        name, overrides = VARIANTS[variant]
        self.dir = tmp_path_factory.mktemp(variant)
        self.hf = save_tiny(name, self.dir, **overrides)
        self.model = HookedMoETransformer.from_pretrained(self.dir)
        self.tokens = torch.randint(0, 256, (BATCH, POS), generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def hf_run(self, tokens, attention_mask=None, **kwargs):
        """HF output plus, per sparse layer, the router's (logits, weights, indices) ``[T, ...]``."""
        routed, handles = [], []
        for layer in self.hf.model.layers:
            if hasattr(layer.mlp, "gate"):
                handles.append(layer.mlp.gate.register_forward_hook(lambda m, i, o: routed.append(o)))
        try:
            out = self.hf(tokens, attention_mask=attention_mask, **kwargs)
        finally:
            for h in handles:
                h.remove()
        return out, routed


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    cache: dict[str, Pair] = {}

    def get(variant: str) -> Pair:
        if variant not in cache:
            cache[variant] = Pair(tmp_path_factory, variant)
        return cache[variant]

    return get


def _sets(idx: torch.Tensor) -> torch.Tensor:
    return idx.sort(-1).values


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_router_logits_and_expert_sets_match(pairs, variant):
    p = pairs(variant)
    m, cfg = p.model, p.model.cfg
    assert cfg.router_score_func == "sigmoid" and cfg.topk_method == "noaux_tc" and cfg.router_correction_bias
    assert 1 < cfg.topk_group < cfg.n_group or (cfg.n_group > 1 and cfg.topk_group == 1)
    out, routed = p.hf_run(p.tokens)
    with torch.no_grad():
        logits, cache = m.run_with_cache(p.tokens)
    assert (out.logits - logits).abs().max().item() < ATOL
    assert out.logits.abs().max().item() > 1.0
    assert len(routed) == len(cfg.moe_layers) > 0
    bias_mattered = groups_mattered = False
    for (hf_logits, hf_w, hf_idx), l in zip(routed, cfg.moe_layers):
        ours = cache[f"blocks.{l}.mlp.hook_router_logits"]
        assert ours.dtype == torch.float32
        assert (hf_logits.view(BATCH, POS, -1) - ours).abs().max().item() < ATOL
        idx = cache[f"blocks.{l}.mlp.hook_expert_indices"].reshape(-1, cfg.top_k)
        w = cache[f"blocks.{l}.mlp.hook_expert_weights"].reshape(-1, cfg.top_k)
        assert torch.equal(_sets(hf_idx), _sets(idx)), f"layer {l}: chosen expert sets differ"
        hf_order, our_order = hf_idx.sort(-1).indices, idx.sort(-1).indices
        assert (hf_w.gather(-1, hf_order) - w.gather(-1, our_order)).abs().max().item() < ATOL
        assert w.dtype == torch.float32
        # the unbiased scores (hooked) and the selection scores: what each one alone would choose
        scores = cache[f"blocks.{l}.mlp.hook_router_scores"].reshape(-1, cfg.n_experts)
        choice = cache[f"blocks.{l}.mlp.hook_router_selection_scores"].reshape(-1, cfg.n_experts)
        assert torch.equal(scores, torch.sigmoid(ours.reshape(-1, cfg.n_experts)))
        bias = m.blocks[l].mlp.router.b_correction
        assert torch.equal(choice, scores + bias) and bias.abs().min() > 0
        plain = torch.topk(scores, cfg.top_k).indices
        no_groups = torch.topk(choice, cfg.top_k).indices
        bias_mattered |= not torch.equal(_sets(plain), _sets(idx))
        groups_mattered |= not torch.equal(_sets(no_groups), _sets(idx))
    assert bias_mattered, "the correction bias never changes the selection: the test cannot see it ignored"
    assert groups_mattered, "the group restriction never changes the selection"


@pytest.mark.parametrize("variant", ["v3", "glm", "glm_lite"])
def test_ignoring_the_correction_bias_is_detected(pairs, variant):
    """Negative control: the same checkpoint with the bias zeroed chooses other experts and its
    logits move, so the parity test above would fail if the bias were ignored."""
    p = pairs(variant)
    wrong = HookedMoETransformer.from_pretrained(p.dir)
    with torch.no_grad():
        for l in wrong.cfg.moe_layers:
            wrong.blocks[l].mlp.router.b_correction.zero_()
        _, good = p.model.run_with_cache(p.tokens, names_filter=lambda n: n.endswith("hook_expert_indices"))
        logits, bad = wrong.run_with_cache(p.tokens, names_filter=lambda n: n.endswith("hook_expert_indices"))
    moved = sum(not torch.equal(_sets(good[k]), _sets(bad[k])) for k in good.keys())
    assert moved > 0
    assert (p.hf(p.tokens).logits - logits).abs().max().item() > 1e-2


@pytest.mark.parametrize(
    "override",
    [dict(rope_deinterleave=False), dict(router_renorm_eps=0.5), dict(topk_method="group_limited_greedy")],
    ids=["v2_style_rope_output", "wrong_epsilon", "v2_group_rule"],
)
def test_negative_controls_are_detected(pairs, override):
    p = pairs("v3")
    wrong = HookedMoETransformer.from_pretrained(p.dir, **override)
    with torch.no_grad():
        diff = (p.hf(p.tokens).logits - wrong(p.tokens)).abs().max().item()
    if "rope_deinterleave" in override:
        # the V2-style interleaved output computes the same dot products: same logits, other hook layout
        assert diff < ATOL
        with torch.no_grad():
            _, a = p.model.run_with_cache(p.tokens, names_filter="blocks.0.attn.hook_rot_q")
            _, b = wrong.run_with_cache(p.tokens, names_filter="blocks.0.attn.hook_rot_q")
        dn = p.model.cfg.qk_nope_head_dim
        rot_a, rot_b = a["blocks.0.attn.hook_rot_q"][..., dn:], b["blocks.0.attn.hook_rot_q"][..., dn:]
        assert (rot_a - rot_b).abs().max() > 1e-2
        deinterleaved = torch.cat([rot_b[..., 0::2], rot_b[..., 1::2]], -1)
        assert (rot_a - deinterleaved).abs().max() < 1e-6
    else:
        assert diff > 1e-2, override


@pytest.mark.parametrize("variant", ["v3", "glm"])
def test_fused_layout_loads_identically(pairs, tmp_path, variant):
    p = pairs(variant)
    name, overrides = VARIANTS[variant]
    save_tiny(name, tmp_path, fused=True, **overrides)
    fused = HookedMoETransformer.from_pretrained(tmp_path)
    ref = p.model.state_dict()
    for k, v in fused.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_sharded_checkpoint_loads_identically(pairs, tmp_path):
    p = pairs("glm_lite")
    name, overrides = VARIANTS["glm_lite"]
    save_tiny(name, tmp_path, max_shard_size="100KB", **overrides)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    sharded = HookedMoETransformer.from_pretrained(tmp_path)
    ref = p.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in sharded.state_dict().items())


@pytest.mark.parametrize("variant", ["v3", "glm", "glm_lite"])
def test_left_padded_batch_matches_at_real_positions(pairs, variant):
    p = pairs(variant)
    mask = torch.ones(BATCH, POS, dtype=torch.long)
    mask[0, :5] = 0
    out, _ = p.hf_run(p.tokens, attention_mask=mask)
    with torch.no_grad():
        ours = p.model(p.tokens, attention_mask=mask)
    real = mask.bool()
    assert (out.logits[real] - ours[real]).abs().max().item() < ATOL


@pytest.mark.parametrize("variant", ["v3", "glm"])
def test_explicit_attention_path_equals_sdpa(pairs, variant):
    m = pairs(variant).model
    tokens = pairs(variant).tokens
    with torch.no_grad():
        sdpa = m(tokens)
        explicit = m.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda t, hook: t)])
    assert (sdpa - explicit).abs().max().item() < 1e-5


@pytest.mark.parametrize("variant", ["v3", "glm", "glm_lite"])
def test_every_hook_has_its_declared_shape(pairs, variant):
    m = pairs(variant).model
    with moelens.check_shapes(m), torch.no_grad():
        _, cache = m.run_with_cache(pairs(variant).tokens)
    assert set(cache.keys()) == set(m.hook_dict)
    l = m.cfg.moe_layers[0]
    assert cache[f"blocks.{l}.mlp.hook_router_selection_scores"].shape == (BATCH, POS, m.cfg.n_experts)
    # partial RoPE: the pass-through dims of q/k are untouched
    if m.cfg.rotary_dim is not None:
        r = m.cfg.rotary_dim
        assert r < m.cfg.d_head
        assert torch.equal(cache["blocks.0.attn.hook_rot_q"][..., r:], cache["blocks.0.attn.hook_q"][..., r:])
        assert torch.equal(cache["blocks.0.attn.hook_rot_k"][..., r:], cache["blocks.0.attn.hook_k"][..., r:])
        assert not torch.equal(cache["blocks.0.attn.hook_rot_q"][:, 1:, :, :r], cache["blocks.0.attn.hook_q"][:, 1:, :, :r])


@pytest.mark.parametrize("variant", ["v3", "glm", "glm_lite"])
def test_kv_prefix_recomputation_matches_full_sequence(pairs, variant):
    m, tokens, p0 = pairs(variant).model, pairs(variant).tokens, 5
    with torch.no_grad():
        _, cache = m.run_with_cache(tokens)
        for layer in (0, m.cfg.n_layers - 1):
            attn = m.blocks[layer].attn
            x = cache[f"blocks.{layer}.ln1.hook_normalized"]
            prefix = (cache[f"blocks.{layer}.attn.hook_rot_k"][:, :p0], cache[f"blocks.{layer}.attn.hook_v"][:, :p0])
            ctx = m.attention_context(POS - p0, q_offset=p0)
            full = cache[f"blocks.{layer}.hook_attn_out"][:, p0:]
            assert (attn(x[:, p0:], ctx, kv_prefix=prefix) - full).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------- forced routing
def test_forced_routing_weights_follow_the_unbiased_scores(pairs):
    """A forced expert set gets w_e = s_e / (sum_forced s + 1e-20) * routed_scaling_factor, the bias
    playing no part, and the forward uses exactly those experts and weights."""
    p = pairs("v3")
    m, cfg = p.model, p.model.cfg
    l = cfg.moe_layers[0]
    forced = torch.tensor([0, 1, 2, 3])[None, None].expand(BATCH, POS, -1)
    name = f"blocks.{l}.mlp.hook_expert_indices"
    with torch.no_grad():
        _, cache = m.run_with_cache(p.tokens, fwd_hooks=[(name, lambda t, hook: forced.clone())])
    s = cache[f"blocks.{l}.mlp.hook_router_scores"][..., :4]
    expected = s / (s.sum(-1, keepdim=True) + 1e-20) * cfg.routed_scaling_factor
    assert torch.equal(cache[name], forced)
    assert (cache[f"blocks.{l}.mlp.hook_expert_weights"] - expected).abs().max() < 1e-6
    routed = sum(cache.expert_contribution(l, e) for e in range(cfg.n_experts))
    assert (routed - cache[f"blocks.{l}.mlp.hook_routed_out"]).abs().max() < 1e-5


def test_editing_selection_scores_moves_choice_not_weights(pairs):
    p = pairs("glm")
    m, cfg = p.model, p.model.cfg
    l = cfg.moe_layers[0]

    def favour_7(t, hook):
        t = t.clone()
        t[..., 7] = 10.0
        return t

    with torch.no_grad():
        _, cache = m.run_with_cache(p.tokens, fwd_hooks=[(f"blocks.{l}.mlp.hook_router_selection_scores", favour_7)])
    idx = cache[f"blocks.{l}.mlp.hook_expert_indices"]
    assert (idx == 7).any(-1).all()
    s = cache[f"blocks.{l}.mlp.hook_router_scores"].gather(-1, idx)
    expected = s / (s.sum(-1, keepdim=True) + 1e-20) * cfg.routed_scaling_factor
    assert (cache[f"blocks.{l}.mlp.hook_expert_weights"] - expected).abs().max() < 1e-6


# ------------------------------------------------------------------------------------------ bf16
@pytest.mark.parametrize("name", ["deepseek_v3", "glm4_moe", "glm4_moe_lite"])
def test_bf16_matches_and_router_stays_fp32(tmp_path, name):
    save_tiny(name, tmp_path, dtype=torch.bfloat16)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    m = HookedMoETransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for l in m.cfg.moe_layers:
        router = m.blocks[l].mlp.router
        hf_gate = hf.model.layers[l].mlp.gate
        assert router.W_router.dtype == router.b_correction.dtype == hf_gate.weight.dtype == torch.float32
        assert torch.equal(router.W_router, hf_gate.weight)
        assert torch.equal(router.b_correction, hf_gate.e_score_correction_bias)
    assert m.blocks[0].attn.w_o.dtype == torch.bfloat16
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (hf(tokens).logits.float() - m(tokens).float()).abs().max().item()
    assert diff < 2e-2, diff


# ------------------------------------------------------------------------------- loading: MTP, Kimi-K2
def test_mtp_layer_is_skipped_with_one_line(tmp_path, caplog):
    """A checkpoint with one more layer than config.json says (the MTP layer) loads, with a note."""
    hf = save_tiny("deepseek_v3", tmp_path, num_hidden_layers=4)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="moelens"):
        m = HookedMoETransformer.from_pretrained(tmp_path)
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        n_mtp = sum(1 for k in f.keys() if k.startswith("model.layers.3."))
    assert n_mtp > 20
    assert len(lines) == 1 and f"skipped {n_mtp} checkpoint tensors" in lines[0] and "multi-token" in lines[0]
    assert "model.layers.{>=3}.*" in lines[0]
    with torch.no_grad():
        hf.model.layers = hf.model.layers[:3]
        hf.config.num_hidden_layers = 3
        tokens = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
        assert (hf(tokens).logits - m(tokens)).abs().max().item() < ATOL


def test_decoder_layer_keys_are_not_skipped(tmp_path):
    """skip_keys only drops layers beyond n_layers: a missing decoder layer is still an error."""
    save_tiny("deepseek_v3", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(moelens.loading.CheckpointError, match="missing"):
        HookedMoETransformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("keep_architectures", [True, False])
def test_kimi_k2_checkpoint_reads_as_deepseek_v3(pairs, tmp_path, keep_architectures):
    p = pairs("v3")
    for f in p.dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "kimi_k2"
    cfg["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}
    if not keep_architectures:
        del cfg["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert get_architecture(cfg).name == "DeepseekV3ForCausalLM"
    kimi = HookedMoETransformer.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(kimi(p.tokens), p.model(p.tokens))


# ---------------------------------------------------------------------------------- config translation
@pytest.mark.parametrize("cls, module", [("DeepseekV3Config", "deepseek_v3"), ("Glm4MoeConfig", "glm4_moe"),
                                         ("Glm4MoeLiteConfig", "glm4_moe_lite")])
def test_class_defaults_match_transformers(cls, module):
    import importlib

    import transformers

    defaults = importlib.import_module(f"moelens.architectures.{module}").DEFAULTS
    hf = getattr(transformers, cls)().to_dict()
    for key, value in defaults.items():
        if key in ("rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor", "head_dim"):
            continue  # normalised into rope_parameters by __post_init__
        if key == "mlp_layer_types":
            assert hf[key] == ["dense"] + ["sparse"] * (hf["num_hidden_layers"] - 1)  # what None means
            continue
        if key in hf:
            assert hf[key] == value, key
    # parameter counts: DeepSeek-V3's and GLM-4.7-Flash's class defaults are their presets, counted
    # against transformers in tests/unit/test_presets.py


def test_glm_partial_rotary_from_legacy_top_level_field():
    base = {"architectures": ["Glm4MoeForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 32, "num_hidden_layers": 2, "n_routed_experts": 8}
    assert translate_config(base).rotary_dim == 16  # transformers' default factor 0.5
    assert translate_config({**base, "partial_rotary_factor": 0.25}).rotary_dim == 8
    assert translate_config({**base, "partial_rotary_factor": 1.0}).rotary_dim is None
    assert translate_config({**base, "partial_rotary_factor": 0.25}).rope_dim == 8


@pytest.mark.parametrize(
    "arch, field, value",
    [("DeepseekV3ForCausalLM", "scoring_func", "softmax"), ("DeepseekV3ForCausalLM", "topk_method", "greedy"),
     ("DeepseekV3ForCausalLM", "attention_bias", True), ("DeepseekV3ForCausalLM", "n_group", 3),
     ("DeepseekV3ForCausalLM", "n_group", 256), ("Glm4MoeForCausalLM", "hidden_act", "gelu"),
     ("Glm4MoeLiteForCausalLM", "partial_rotary_factor", 0.5), ("Glm4MoeLiteForCausalLM", "first_k_dense_replace", 3)],
)
def test_unsupported_values_raise_naming_the_field(arch, field, value):
    cfg = {"architectures": [arch], field: value}
    with pytest.raises(UnsupportedConfigError, match=field):
        translate_config(cfg)


# -------------------------------------------------------------------- the correction bias is a buffer
@pytest.mark.parametrize("variant", ["v3", "glm", "glm_lite"])
def test_correction_bias_is_a_buffer_as_in_transformers(pairs, variant):
    """``parameters()`` counts what transformers' does (an optimiser would not train the bias), the
    bias is in ``state_dict()`` / ``named_buffers()`` with transformers' values, fp32 after a cast."""
    p = pairs(variant)
    m = p.model
    assert sum(x.numel() for x in m.parameters()) == sum(x.numel() for x in p.hf.parameters())
    assert m.n_params() == sum(x.numel() for x in p.hf.parameters())
    names = {n for n, _ in m.named_parameters()}
    buffers = dict(m.named_buffers())
    state = m.state_dict()
    for l in m.cfg.moe_layers:
        key = f"blocks.{l}.mlp.router.b_correction"
        assert key not in names and key in buffers and key in state
        assert torch.equal(buffers[key], p.hf.model.layers[l].mlp.gate.e_score_correction_bias)
    half = HookedMoETransformer.from_pretrained(p.dir).to(torch.bfloat16)
    assert all(half.blocks[l].mlp.router.b_correction.dtype == torch.float32 for l in half.cfg.moe_layers)


def test_correction_bias_in_meta_counts_fingerprints_and_edits(pairs):
    from moelens.tracing.fingerprint import parameter_checksum
    from moelens.tracing.trace import weights_state

    p = pairs("v3")
    meta = HookedMoETransformer.from_pretrained(p.dir, device="meta")
    assert sum(x.numel() for x in meta.parameters()) == sum(x.numel() for x in p.hf.parameters())
    assert all(b.is_meta for b in meta.buffers())
    fresh = HookedMoETransformer.from_config(p.model.cfg)
    assert all(torch.equal(fresh.blocks[l].mlp.router.b_correction, torch.zeros(fresh.cfg.n_experts))
               for l in fresh.cfg.moe_layers)
    m = HookedMoETransformer.from_pretrained(p.dir)
    before, state = parameter_checksum(m), weights_state(m)
    l = m.cfg.moe_layers[0]
    with torch.no_grad():
        m.blocks[l].mlp.router.b_correction[3] += 1.0  # an edit far above any rounding
    assert parameter_checksum(m) != before, "the fingerprint must see the correction bias"
    assert weights_state(m) != state, "an in-place edit of the bias must mark the weights as edited"
