"""Router, experts and the MoE combine, each on its own."""

import pytest
import torch

from moelens.components.experts import Experts
from moelens.components.moe import MoE
from moelens.components.router import Router
from moelens.config import MoEConfig


def cfg(**kw):
    base = dict(architecture="test", n_layers=1, d_model=16, d_vocab=10, n_heads=2, n_kv_heads=2, d_head=8,
                n_experts=8, top_k=3, d_expert=12, moe_layers=[0])
    return MoEConfig(**{**base, **kw})


def init(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return module


def test_experts_sorted_equals_loop_equals_per_token():
    ex = init(Experts(8, 16, 12))
    x = torch.randn(3, 5, 16)
    idx = torch.randint(0, 8, (3, 5, 3))
    idx[0, 0] = torch.tensor([4, 4, 4])  # forced duplicates are allowed
    a, b = ex.forward_sorted(x, idx), ex.forward_loop(x, idx)
    assert (a - b).abs().max() < 1e-6
    assert (ex.forward_grouped(x, idx) - b).abs().max() < 1e-5
    for bb, p, s in [(0, 0, 1), (2, 4, 2), (1, 3, 0)]:
        e = int(idx[bb, p, s])
        h = torch.nn.functional.silu(x[bb, p] @ ex.w_gate[e].T) * (x[bb, p] @ ex.w_up[e].T)
        assert (a[bb, p, s] - h @ ex.w_down[e].T).abs().max() < 1e-5


def test_router_semantics():
    r = init(Router(cfg(norm_topk_prob=True)))
    x = torch.randn(2, 4, 16)
    scores = r.scores(r.logits(x))
    idx = r.select(scores)
    assert torch.equal(idx, torch.topk(scores, 3, dim=-1).indices)
    w = r.weights(scores, idx, torch.float32)
    assert torch.allclose(w.sum(-1), torch.ones(2, 4))
    raw = Router(cfg(norm_topk_prob=False, routed_scaling_factor=16.0, router_weights_dtype="float32"))
    raw.load_state_dict(r.state_dict())
    w2 = raw.weights(scores, idx, torch.bfloat16)
    assert w2.dtype == torch.float32 and torch.allclose(w2, scores.gather(-1, idx) * 16)
    assert r.weights(scores, idx, torch.bfloat16).dtype == torch.bfloat16


def test_group_limited_greedy_by_hand():
    r = Router(cfg(topk_method="group_limited_greedy", n_group=4, topk_group=2, top_k=3))
    # groups of 2 experts: maxima 0.30, 0.25, 0.20, 0.10 -> keep groups 0 and 1
    s = torch.tensor([[[0.30, 0.01, 0.25, 0.02, 0.20, 0.19, 0.10, 0.0]]])
    assert sorted(r.select(s)[0, 0].tolist()) == [0, 2, 3]  # 4 and 5 are excluded with their group
    greedy = Router(cfg(top_k=3))
    assert sorted(greedy.select(s)[0, 0].tolist()) == [0, 2, 4]


def test_moe_combine_and_shared_gate():
    moe = init(MoE(cfg(d_shared=10, shared_gate=True)))
    x = torch.randn(2, 3, 16)
    seen = {}
    for name in ("hook_expert_weights", "hook_expert_out", "hook_routed_out", "hook_shared_out", "hook_shared_gate"):
        getattr(moe, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    out = moe(x)
    routed = (seen["hook_expert_out"] * seen["hook_expert_weights"][..., None]).sum(-2)
    assert (seen["hook_routed_out"] - routed).abs().max() < 1e-6
    gate = torch.sigmoid(x @ moe.W_shared_gate.T)
    assert (seen["hook_shared_gate"] - gate).abs().max() < 1e-6
    assert (seen["hook_shared_out"] - gate * moe.shared_experts(x)).abs().max() < 1e-6
    assert (out - routed - seen["hook_shared_out"]).abs().max() < 1e-6


def v3_cfg(**kw):
    return cfg(**{**dict(n_experts=8, top_k=3, topk_method="noaux_tc", n_group=4, topk_group=2, topk_sorted=False,
                         router_score_func="sigmoid", router_correction_bias=True, router_renorm_eps=1e-20,
                         router_fp32_params=True, norm_topk_prob=True, routed_scaling_factor=2.5,
                         router_dtype="float32", router_weights_dtype="float32"), **kw})


def test_noaux_tc_by_hand():
    r = Router(v3_cfg())
    # groups of 2: top-2 sums 0.9+0.0=0.9, 0.5+0.45=0.95, 0.7+0.1=0.8, 0.3+0.3=0.6 -> keep groups 1 and 0
    c = torch.tensor([[[0.9, 0.0, 0.5, 0.45, 0.7, 0.1, 0.3, 0.3]]])
    assert sorted(r.select(c)[0, 0].tolist()) == [0, 2, 3]  # 4 (0.7) is excluded with its group
    # V2's rule (group max 0.9, 0.5, 0.7, 0.3; 0 mask) keeps groups 0 and 2 instead
    v2 = Router(cfg(topk_method="group_limited_greedy", n_group=4, topk_group=2, top_k=3))
    assert sorted(v2.select(c)[0, 0].tolist()) == [0, 4, 5]
    # masked groups are -inf, not 0: negative selection scores in the kept groups (0, 1) still win
    # over the masked experts (a 0 mask would pick a masked expert before expert 0 at -0.5)
    neg = torch.tensor([[[-0.5, -0.6, -0.1, -0.2, 0.0, -9.0, -9.0, -9.0]]])
    assert sorted(r.select(neg)[0, 0].tolist()) == [0, 2, 3]


def test_sigmoid_scores_bias_selects_and_weights_stay_unbiased():
    r = Router(v3_cfg())
    with torch.no_grad():
        r.W_router.copy_(torch.randn(8, 16))
        r.b_correction.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 5.0]))
    x = torch.randn(2, 4, 16)
    s = r.scores(r.logits(x))
    assert torch.equal(s, torch.sigmoid(x.float() @ r.W_router.T))
    c = r.selection_scores(s)
    idx = r.select(c)
    assert (idx == 6).any(-1).all() and (idx == 7).any(-1).all()  # the bias forces group 3 in
    w = r.weights(s, idx, torch.bfloat16)
    g = s.gather(-1, idx)
    assert w.dtype == torch.float32 and torch.equal(w, g / (g.sum(-1, keepdim=True) + 1e-20) * 2.5)


def test_router_keeps_fp32_params_under_to_bfloat16():
    r = Router(v3_cfg()).to(torch.bfloat16)
    assert r.W_router.dtype == r.b_correction.dtype == torch.float32
    assert Router(cfg()).to(torch.bfloat16).W_router.dtype == torch.bfloat16


# ------------------------------------------------------------------ RoPE arithmetic, l2norm layout
def test_complex_rope_is_transformers_deepseek_v2_rope_bit_for_bit():
    """``rope_arith="complex"`` tables equal transformers' V2 ``freqs_cis`` and the rotation its
    ``apply_rotary_emb``, bit for bit, also for shapes whose complex multiply has a scalar tail
    (pos * d/2 not a multiple of the vector width); both equal the readable real rotation to ~1 ulp."""
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import apply_rotary_emb

    from moelens.components.rope import (
        apply_rope_complex, apply_rope_interleaved, rope_cos_sin, rope_frequencies,
    )

    inv_freq, factor = rope_frequencies(8, 10000.0, {"factor": 40, "original_max_position_embeddings": 4,
                                                     "mscale": 1.0, "mscale_all_dim": 0.5})
    assert factor != 1.0
    g = torch.Generator().manual_seed(0)
    for b, p, h in [(2, 37, 3), (1, 5, 4), (3, 64, 2)]:
        positions = torch.arange(p)[None]
        angles = positions[..., None].float() * inv_freq
        freqs_cis = torch.polar(torch.ones_like(angles), angles) * factor  # transformers' V2 rotary_emb
        cos, sin = rope_cos_sin(positions, inv_freq, factor, "complex")
        assert torch.equal(cos, freqs_cis.real) and torch.equal(sin, freqs_cis.imag)
        real_cos, real_sin = rope_cos_sin(positions, inv_freq, factor)
        assert (real_cos - cos).abs().max() < 1e-6 and (real_sin - sin).abs().max() < 1e-6
        for dtype in (torch.bfloat16, torch.float32):
            # as in the MLA: the rope part is the tail of [.., dn + dr] heads
            q = torch.randn(b, p, h, 16 + 8, generator=g).to(dtype)[..., 16:]
            k = torch.randn(b, p, 1, 8, generator=g).to(dtype)
            want_q, want_k = apply_rotary_emb(q.transpose(1, 2), k.transpose(1, 2), freqs_cis)
            assert torch.equal(apply_rope_complex(q, cos, sin), want_q.transpose(1, 2))
            assert torch.equal(apply_rope_complex(k, cos, sin), want_k.transpose(1, 2))
            ref = apply_rope_interleaved(q.float(), cos, sin)
            assert (apply_rope_complex(q.float(), cos, sin) - ref).abs().max() < 1e-5
    cos, sin = rope_cos_sin(torch.arange(64)[None], inv_freq, factor, "complex")
    real_cos, real_sin = rope_cos_sin(torch.arange(64)[None], inv_freq, factor)
    assert not (torch.equal(cos, real_cos) and torch.equal(sin, real_sin))  # libm vs torch's vectorised cos/sin
    with pytest.raises(ValueError, match="rope_arith"):
        rope_cos_sin(torch.arange(3)[None], inv_freq, 1.0, "polar")


def test_l2norm_is_independent_of_the_memory_layout():
    """A strided last axis (a slice of the transposed conv output, as in the mixer) gives the same
    bits as a contiguous copy, which is what transformers normalises. (Whether a plain sum over the
    strided slice gives other bits depends on the CPU's kernels, so that is not asserted.)"""
    from moelens.components.gated_deltanet import l2norm

    mixed = torch.randn(8, 96, 64, generator=torch.Generator().manual_seed(0)).transpose(1, 2)  # [b, pos, ch]
    q = mixed[..., :32].reshape(8, 64, 2, 16)
    assert q.stride(-1) != 1
    contiguous = q.contiguous()
    assert torch.equal(l2norm(q), l2norm(contiguous))
    assert torch.equal(l2norm(contiguous), contiguous * torch.rsqrt((contiguous * contiguous).sum(-1, keepdim=True) + 1e-6))
