"""Qwen3-Next and Qwen3.5-MoE (Gated DeltaNet + gated full attention) vs transformers, fp32, 1e-4.

Sequences of 70 tokens: longer than the delta rule's chunk (64) and the convolution window (4);
the tiny configs mix linear and full attention layers (and Qwen3-Next a dense layer). Negative
controls show the comparison fails when the recurrent state, the decay or the output gates are
dropped.
"""

import json

import pytest
import torch

import moelens.components.gated_deltanet as gdn
from moelens import HookedMoETransformer, check_shapes
from moelens.testing import save_tiny

ARCHS = ["qwen3_next", "qwen3_5_moe"]
TOL = 1e-4
GEN = torch.Generator().manual_seed(3)
IDS = torch.randint(0, 256, (2, 70), generator=GEN)


def hf_out(hf, ids, mask=None):
    with torch.no_grad():
        return hf(ids, attention_mask=mask, output_router_logits=True)


def max_logit_error(model, hf, ids=IDS, mask=None, **kw) -> float:
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, **kw)
    real = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
    return float((hf_out(hf, ids, mask).logits - ours)[real].abs().max())


@pytest.fixture(params=ARCHS)
def pair(request, tiny_dirs):
    d, hf = tiny_dirs(request.param)
    return HookedMoETransformer.from_pretrained(d), hf


def test_config_is_a_hybrid(pair):
    model, hf = pair
    cfg = model.cfg
    assert cfg.linear_attn_layers == [i for i, t in enumerate(hf.config.layer_types) if t == "linear_attention"]
    assert 0 < len(cfg.linear_attn_layers) < cfg.n_layers
    assert cfg.rotary_dim == cfg.d_head // 4 and cfg.rope_dim == cfg.rotary_dim
    assert cfg.norm_zero_centered and cfg.attn_output_gate and cfg.shared_gate
    assert type(model.blocks[cfg.linear_attn_layers[0]].attn).__name__ == "GatedDeltaNet"


def test_logits_router_and_experts_match(pair):
    model, hf = pair
    out = hf_out(hf, IDS)
    with torch.no_grad(), check_shapes(model):
        logits, cache = model.run_with_cache(IDS)
    assert (out.logits - logits).abs().max() < TOL
    assert out.logits.abs().max() > 1.0
    b, p = IDS.shape
    assert len(out.router_logits) == len(model.cfg.moe_layers)
    for i, layer in enumerate(model.cfg.moe_layers):
        theirs = out.router_logits[i].view(b, p, -1)
        assert (cache[f"blocks.{layer}.mlp.hook_router_logits"] - theirs).abs().max() < TOL
        chosen = cache[f"blocks.{layer}.mlp.hook_expert_indices"].sort(-1).values
        ref = torch.topk(torch.softmax(theirs.float(), -1), model.cfg.top_k, -1).indices.sort(-1).values
        assert torch.equal(chosen, ref)


def test_left_padding_matches(pair):
    model, hf = pair
    mask = torch.ones_like(IDS)
    mask[1, :9] = 0
    assert max_logit_error(model, hf, mask=mask) < TOL


def test_token_by_token_reference_equals_chunked(pair):
    model, hf = pair
    ref = HookedMoETransformer.from_config(model.cfg.replace(delta_rule_impl="recurrent"))
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (ref(IDS) - model(IDS)).abs().max() < 1e-4  # fp32 rounding only (docs/models.md)
    assert max_logit_error(ref, hf) < TOL


# ------------------------------------------------------------------------------ negative controls
def test_dropping_the_state_breaks_parity(pair, monkeypatch):
    model, hf = pair
    chunked = gdn.delta_rule_chunked

    def no_memory(q, k, v, g, beta, initial_state=None, chunk_size=64):  # every token starts from an empty state
        outs = [chunked(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], beta[:, t:t + 1])[0]
                for t in range(q.shape[1])]
        return torch.cat(outs, 1), None

    monkeypatch.setattr(gdn, "delta_rule_chunked", no_memory)
    assert max_logit_error(model, hf) > 1e-2


def test_dropping_the_decay_breaks_parity(pair):
    model, hf = pair
    hooks = [(f"blocks.{l}.attn.hook_decay", lambda g, hook: torch.zeros_like(g)) for l in model.cfg.linear_attn_layers]
    with model.hooks(fwd_hooks=hooks):
        assert max_logit_error(model, hf) > 1e-2


def test_dropping_the_output_gates_breaks_parity(pair, monkeypatch):
    model, hf = pair

    def ungated(o, gate, weight, eps):  # the norm without its silu(z) gate
        return weight * (o.float() * torch.rsqrt(o.float().pow(2).mean(-1, keepdim=True) + eps)).to(o.dtype)

    monkeypatch.setattr(gdn, "gated_rms_norm", ungated)
    assert max_logit_error(model, hf) > 1e-2
    monkeypatch.undo()
    full = [l for l in range(model.cfg.n_layers) if l not in model.cfg.linear_attn_layers]
    hooks = [(f"blocks.{l}.attn.hook_attn_gate", lambda s, hook: torch.ones_like(s)) for l in full]
    with model.hooks(fwd_hooks=hooks):
        assert max_logit_error(model, hf) > 1e-2


# ------------------------------------------------------------------------------ the state hook
def test_state_hook_reads_out_and_keeps_logits(pair):
    model, hf = pair
    layer = model.cfg.linear_attn_layers[0]
    with torch.no_grad():
        logits, cache = model.run_with_cache(IDS)
    states = cache[f"blocks.{layer}.attn.hook_state"]
    c = model.cfg
    assert states.shape == (2, IDS.shape[1], c.linear_n_v_heads, c.linear_d_k, c.linear_d_v)
    with torch.no_grad():
        plain = model(IDS)
    assert (plain - logits).abs().max() < 1e-4  # the token-by-token path only differs by rounding
    # o_t = S_t^T q_t / sqrt(d_k), q repeated over the value heads of its key head
    q = cache[f"blocks.{layer}.attn.hook_q"].repeat_interleave(c.linear_n_v_heads // c.linear_n_k_heads, 2)
    read = torch.einsum("bphkv,bphk->bphv", states, q) / c.linear_d_k**0.5
    assert (read - cache[f"blocks.{layer}.attn.hook_delta_out"]).abs().max() < 1e-5


def test_editing_the_state_propagates(pair):
    model, hf = pair
    layer, t = model.cfg.linear_attn_layers[0], 30
    name = f"blocks.{layer}.attn.hook_state"

    def zero_at_t(s, hook):
        s = s.clone()
        s[:, t] = 0
        return s

    with torch.no_grad():
        _, clean = model.run_with_cache(IDS, names_filter=lambda n: n.startswith(f"blocks.{layer}."))
        _, patched = model.run_with_cache(IDS, fwd_hooks=[(name, zero_at_t)],
                                          names_filter=lambda n: n.startswith(f"blocks.{layer}."))
    out_c, out_p = clean[f"blocks.{layer}.attn.hook_delta_out"], patched[f"blocks.{layer}.attn.hook_delta_out"]
    assert torch.equal(out_c[:, :t], out_p[:, :t])
    assert out_p[:, t].abs().max() == 0  # the read-out at t sees the edited (zero) state
    # positions after t: the layer resumed from an empty state after t
    mixer = model.blocks[layer].attn
    x = clean[f"blocks.{layer}.ln1.hook_normalized"]
    conv_in = clean[f"blocks.{layer}.attn.hook_conv_in"]
    zero_state = torch.zeros_like(clean[name][:, 0])
    with torch.no_grad(), model.hooks(fwd_hooks=[]):
        resumed = mixer(x[:, t + 1:], None, (conv_in[:, :t + 1], zero_state))
    assert (resumed - patched[f"blocks.{layer}.hook_attn_out"][:, t + 1:]).abs().max() < 1e-5
    assert (resumed - clean[f"blocks.{layer}.hook_attn_out"][:, t + 1:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="expected"):
        model.run_with_hooks(IDS, fwd_hooks=[(name, lambda s, hook: s[:, :5])])


# ------------------------------------------------------------------------------ delta rule functions
@pytest.mark.parametrize("n,chunk", [(1, 64), (63, 64), (130, 64), (37, 8)])
def test_chunked_equals_recurrent(n, chunk):
    g = torch.Generator().manual_seed(n)
    b, h, dk, dv = 2, 3, 8, 5
    q, k = (gdn.l2norm(torch.randn(b, n, h, dk, generator=g)) for _ in range(2))
    v = torch.randn(b, n, h, dv, generator=g)
    decay = -torch.rand(b, n, h, generator=g) * 0.5
    beta = torch.rand(b, n, h, generator=g)
    s0 = torch.randn(b, h, dk, dv, generator=g)
    o1, s1 = gdn.delta_rule_recurrent(q, k, v, decay, beta, s0)
    o2, s2 = gdn.delta_rule_chunked(q, k, v, decay, beta, s0, chunk_size=chunk)
    assert (o1 - o2).abs().max() < 1e-5 and (s1 - s2).abs().max() < 1e-5
    _, states = gdn.delta_rule_recurrent(q, k, v, decay, beta, s0, return_states=True)
    assert torch.equal(states[:, -1], s1)
    # resuming from the state after position m continues the same sequence
    m = n // 2
    if m:
        o3, s3 = gdn.delta_rule_chunked(q[:, m:], k[:, m:], v[:, m:], decay[:, m:], beta[:, m:], states[:, m - 1], chunk)
        assert (o3 - o1[:, m:]).abs().max() < 1e-5 and (s3 - s1).abs().max() < 1e-5


def test_causal_conv_window():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 12, 6, generator=g), torch.randn(6, 4, generator=g)
    full = gdn.causal_conv(x, w)
    for p in (1, 2, 3, 7):
        assert (gdn.causal_conv(x[:, p:], w, x[:, :p]) - full[:, p:]).abs().max() < 1e-6
    assert (full - gdn.causal_conv(x, w.flip(-1))).abs().max() > 1e-2  # orientation matters


# ------------------------------------------------------------------------------ checkpoints
def test_fused_layout_loads_identically(tmp_path, tiny_dirs):
    d, _ = tiny_dirs("qwen3_5_moe")
    save_tiny("qwen3_5_moe", tmp_path, fused=True)
    a, b = HookedMoETransformer.from_pretrained(d), HookedMoETransformer.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(a(IDS[:, :9]), b(IDS[:, :9]))


def test_multimodal_checkpoint_reads_as_text_model(tmp_path, caplog):
    import transformers

    from moelens.testing import TINY_CONFIGS, sharpen

    text = {**TINY_CONFIGS["qwen3_5_moe"][2]}
    cfg = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=dict(
        depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64))
    torch.manual_seed(0)
    hf = sharpen(transformers.Qwen3_5MoeForConditionalGeneration(cfg)).eval()
    hf.save_pretrained(tmp_path)
    # a multi-token-prediction tensor as in the hub checkpoints
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    assert any(k.startswith("model.visual.") for k in tensors)
    tensors["mtp.fc.weight"] = torch.zeros(4, 4)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen3_5MoeForConditionalGeneration"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="moelens"):
        model = HookedMoETransformer.from_pretrained(tmp_path)
    note = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    n_skipped = sum(k.startswith(("mtp.", "model.visual.")) for k in tensors)
    assert len(note) == 1 and f"skipped {n_skipped} checkpoint tensors" in note[0]
    assert "mtp.*" in note[0] and "model.visual.*" in note[0] and "vision tower" in note[0]
    ids = IDS[:, :20]
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() < TOL


def test_unknown_layer_type_is_refused(tiny_dirs, tmp_path):
    from moelens.architectures import translate_config
    from moelens.architectures.base import UnsupportedConfigError

    d, _ = tiny_dirs("qwen3_next")
    hf = json.loads((d / "config.json").read_text())
    hf["layer_types"] = ["linear_attention", "sliding_attention", "full_attention", "full_attention"]
    with pytest.raises(UnsupportedConfigError, match="sliding_attention"):
        translate_config(hf)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_matches_within_bf16_rounding(arch, tmp_path):
    """bf16 weights loaded by both libraries: the zero-centred norms agree exactly, the Gated DeltaNet
    mixer of layer 0 (given the same input) within one bf16 ulp, router logits within 2 ulps, and
    >= 90% of routing decisions are the same experts (later layers flip a few near-ties)."""
    from transformers import AutoModelForCausalLM

    save_tiny(arch, tmp_path, dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model = HookedMoETransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = IDS[:, :40]
    b, p = ids.shape
    with torch.no_grad():
        out = hf(ids, output_router_logits=True, output_hidden_states=True)
        logits, cache = model.run_with_cache(ids)
        x = cache["blocks.0.ln1.hook_normalized"]
        assert torch.equal(hf.model.layers[0].input_layernorm(out.hidden_states[0]), x)
        mixer = hf.model.layers[0].linear_attn(x)
    ours = cache["blocks.0.hook_attn_out"]
    assert ours.dtype == torch.bfloat16 and cache["blocks.0.attn.hook_decay"].dtype == torch.float32
    assert (mixer.float() - ours.float()).abs().max() <= 0.016  # one bf16 ulp at |x| ~ 3
    assert (out.router_logits[0].view(b, p, -1).float() - cache["blocks.0.mlp.hook_router_logits"].float()).abs().max() <= 0.07
    agree = []
    for i, layer in enumerate(model.cfg.moe_layers):
        theirs = torch.topk(torch.softmax(out.router_logits[i].float(), -1), model.cfg.top_k, -1).indices.sort(-1).values
        agree.append((cache[f"blocks.{layer}.mlp.hook_expert_indices"].sort(-1).values.view(-1, model.cfg.top_k) == theirs).all(-1))
    assert torch.cat(agree).float().mean() >= 0.9
    assert (logits.float() - out.logits.float()).abs().max() < 1.0


def _half_length_l2norm(x, eps=1e-6):
    """A negative control that differs by construction: q and k normalised to length 1/2, not 1 (a
    factor of two is exact in bf16, so nothing can round the change away)."""
    return 0.5 * x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_bit_identical_to_transformers(arch, tmp_path, monkeypatch):
    """An fp32 checkpoint loaded in bf16 by both libraries (as benchmarks/fidelity.py does): the same
    logits, router logits and experts in every slot, bit for bit (CPU, one thread), at a length inside
    one delta-rule chunk and at one spanning two. Negative control (Qwen3-Next): q and k normalised to
    another length break it. (The old bug, a sum over a strided slice, is mathematically the same
    reduction: whether its bits differ depends on the CPU's kernels, so it cannot be a control.)"""
    from transformers import AutoModelForCausalLM

    save_tiny(arch, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model = HookedMoETransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    routed = []
    for layer in hf.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(lambda m, i, o: routed.append(o))
    names = [f"blocks.{l}.mlp.{h}" for l in model.cfg.moe_layers for h in ("hook_router_logits", "hook_expert_indices")]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for shape in [(8, 64), (2, 100)]:
            ids = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1))
            routed.clear()
            with torch.no_grad():
                want = hf(ids).logits
                got, cache = model.run_with_cache(ids, names_filter=names)
            assert got.dtype == torch.bfloat16 and torch.equal(got, want), (got.float() - want.float()).abs().max()
            for l, (logits, _, indices) in zip(model.cfg.moe_layers, routed):
                assert torch.equal(cache[f"blocks.{l}.mlp.hook_router_logits"].reshape(logits.shape), logits)
                assert torch.equal(cache[f"blocks.{l}.mlp.hook_expert_indices"].reshape(indices.shape), indices)
        if arch == "qwen3_next":
            monkeypatch.setattr(gdn, "l2norm", _half_length_l2norm)
            ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                assert not torch.equal(model(ids), hf(ids).logits)
    finally:
        torch.set_num_threads(previous)


def test_cache_layer_carries_the_state_between_steps(pair):
    """A DeltaNetCacheLayer (what generation keeps per linear-attention layer) resumes the conv
    window and the recurrent state: a prompt then one token at a time equals the full forward."""
    model, hf = pair
    layer = model.cfg.linear_attn_layers[0]
    mixer = model.blocks[layer].attn
    name = f"blocks.{layer}.ln1.hook_normalized"
    with torch.no_grad():
        _, cache = model.run_with_cache(IDS, names_filter=name)
        x = cache[name]
        full = mixer(x)
        c = mixer.new_cache_layer()
        steps = [mixer(x[:, :50], None, c)] + [mixer(x[:, t:t + 1], None, c) for t in range(50, IDS.shape[1])]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
    assert c.seq_len == IDS.shape[1] and c.window.shape[1] == model.cfg.linear_conv_kernel - 1
    assert c.state.shape == (2, model.cfg.linear_n_v_heads, model.cfg.linear_d_k, model.cfg.linear_d_v)
    c.select(torch.tensor([1]))
    assert c.state.shape[0] == 1 and c.window.shape[0] == 1
    # the final state equals the token-by-token definition's
    with torch.no_grad():
        _, states = model.run_with_cache(IDS, names_filter=f"blocks.{layer}.attn.hook_state")
    assert (states[f"blocks.{layer}.attn.hook_state"][1:, -1] - c.state).abs().max() < 1e-5
