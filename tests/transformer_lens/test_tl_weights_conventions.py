"""TransformerLens' weight conventions on every architecture (docs/transformer_lens.md, CONTRACT.md).

Each name TransformerLens' HookedTransformer has (``W_E``, ``W_U``, ``b_U``, stacked and per-block
``W_Q/W_K/W_V/W_O``, biases, ``QK``/``OV``, MLP and expert weights) has TransformerLens' shape and
meaning. Checked against independent computations: the transformers model's own weights (rows of
``q_proj``, columns of ``o_proj``, rows of ``lm_head``), and the activations of a cached run
(``z_h @ W_O[h]`` summed over heads is ``hook_attn_out``, ``ln_final(resid) @ W_U`` is
``unembed.hook_out``, ``act(x @ W_gate[e]) * (x @ W_in[e]) @ W_out[e]`` each expert's output).

The three families merged after the views were written are checked with their own semantics:
Gemma 4's final soft-cap comes after ``unembed.hook_out`` (``cfg.output_logits_soft_cap``); its
full-attention layers have their own head width / kv heads and K = V (per-block views have the
layer's shapes, stacked names refuse); on post-norm blocks (FlexOlmo, Gemma 4's sandwich) ``W_O`` /
``W_out`` map into the post-norm's input, carried to ``hook_attn_out`` / ``hook_mlp_out`` by the
norm at the run's cached scale; Llama 4's experts read their input scaled by the slot weight;
Gemma 4's parallel dense MLP is ``blocks[l].dense_mlp``.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from transformer_lens import FactoredMatrix

from moelens import HookedMoETransformer
from moelens.testing import TINY_CONFIGS

TL_ACT = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}  # by cfg.act_fn

ARCHS = sorted(TINY_CONFIGS)  # the 11 architectures (DeepSeek-V2 with and without a q low-rank path)
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def runs(tiny_dirs):
    out = {}

    def get(arch):
        if arch not in out:
            d, hf = tiny_dirs(arch)
            model = HookedMoETransformer.from_pretrained(d)
            tokens = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
            with torch.no_grad():
                logits, cache = model.run_with_cache(tokens)
            out[arch] = (model, hf, logits, cache)
        return out[arch]

    return get


def _hf_attn(hf, l):
    layer = hf.model.layers[l]
    return getattr(layer, "self_attn", None)


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_embed_unembed(runs, arch):
    model, hf, logits, cache = runs(arch)
    cfg = model.cfg
    assert model.W_E.shape == (cfg.d_vocab, cfg.d_model)
    assert model.W_U.shape == (cfg.d_model, cfg.d_vocab) and model.unembed.W_U.shape == (cfg.d_model, cfg.d_vocab)
    # b_U: the hub's lm_head bias (PhiMoE), zeros elsewhere; Granite's logits_scaling divides both
    scaling = cfg.logits_scaling
    hub_bias = hf.lm_head.bias if hf.lm_head.bias is not None else torch.zeros(cfg.d_vocab)
    assert model.b_U.shape == (cfg.d_vocab,)
    torch.testing.assert_close(model.b_U, hub_bias / scaling, atol=0, rtol=0)
    # W_U[:, t] is token t's unembedding direction: row t of the hub's lm_head (t < d_model included)
    for t in (3, cfg.d_model - 1, cfg.d_vocab - 1):
        torch.testing.assert_close(model.W_U[:, t], hf.lm_head.weight[t] / scaling, atol=0, rtol=0)
    torch.testing.assert_close(model.W_E, hf.model.embed_tokens.weight, atol=0, rtol=0)
    # unembed.hook_out = ln_final(resid) @ W_U + b_U; the logits are that after TransformerLens' final
    # soft-cap cfg.output_logits_soft_cap (Gemma 4: the hub's final_logit_softcapping; -1.0: none)
    pre = cache["unembed.hook_out"]
    torch.testing.assert_close(cache["ln_final.hook_normalized"] @ model.W_U + model.b_U, pre, **TOL)
    cap = cfg.output_logits_soft_cap
    hub_cap = getattr(hf.config, "final_logit_softcapping", None)
    assert cap == (float(hub_cap) if hub_cap else -1.0)
    if cap > 0:
        torch.testing.assert_close(cap * torch.tanh(pre / cap), logits, **TOL)
        assert (pre - logits).abs().max() > 1e-2  # the cap is active in this run: hook_out is before it
    else:
        assert torch.equal(pre, logits)
    # the final residual stream (DeepSeek-V4: the hyper-connection streams collapsed by hc_head)
    resid = cache["hc_head.hook_collapsed"] if cfg.hc_mult > 1 else cache[f"blocks.{cfg.n_layers - 1}.hook_resid_post"]
    if cfg.normalization_type == "LN":  # LayerNorm (PhiMoE) centres, and adds its bias through W_U
        resid = resid - resid.mean(-1, keepdim=True)
    by_hand = (resid / cache["ln_final.hook_scale"]) @ (model.ln_final.scale_weight[:, None] * model.W_U) + model.b_U
    ln_bias = getattr(model.ln_final, "b", None)
    if ln_bias is not None:
        by_hand = by_hand + ln_bias @ model.W_U
    torch.testing.assert_close(by_hand, pre, **TOL)
    # negative control: a different column is not the token's direction
    assert not torch.allclose(model.W_U[:, 3], hf.lm_head.weight[4])


def _branch_input(model, cache, l, norm, resid):
    """What a branch reads: its pre-norm's output, or the residual stream where the block has no
    pre-norm (FlexOlmo)."""
    if getattr(model.blocks[l], norm) is None:
        return cache[f"blocks.{l}.{resid}"]
    return cache[f"blocks.{l}.{norm}.hook_normalized"]


def _through_post_norm(model, cache, l, norm, x):
    """A branch's pre-norm output carried through its post-norm (``ln1_post``, ``ln2_post``, Gemma 4's
    ``ln2_post_dense``...) at the run's cached scale: ``x / hook_scale * w``; ``x`` where there is none.
    Adding the per-head (or per-part) terms first and normalising after, or the reverse, agree: with
    the scale fixed the norm is linear."""
    post = getattr(model.blocks[l], norm)
    if post is None:
        return x
    scale = cache[f"blocks.{l}.{norm}.hook_scale"]  # [batch, pos, 1]
    if isinstance(x, torch.Tensor) and x.dim() == 4:  # [batch, pos, head, d_model]: one scale per position
        scale = scale.unsqueeze(-2)
    return x / scale * post.w


def _attention_layers(model):
    """Layers with TransformerLens' per-head maps: not linear-attention layers, and not DeepSeek-V4's
    compressed attention, whose names are absent with the reason (checked here)."""
    out = []
    for l in range(model.cfg.n_layers):
        if l in model.cfg.linear_attn_layers:
            continue
        attn = model.blocks[l].attn
        if model.cfg.attention == "compressed":
            for name in ("W_Q", "W_K", "W_V", "W_O", "QK", "OV"):
                with pytest.raises(AttributeError, match="compressed attention has no per-head"):
                    getattr(attn, name)
            continue
        out.append(l)
    return out


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_attention_weights_match_hub_projections(runs, arch):
    model, hf, logits, cache = runs(arch)
    cfg = model.cfg
    h, dm = cfg.n_heads, cfg.d_model
    for l in _attention_layers(model):
        attn, ref = model.blocks[l].attn, _hf_attn(hf, l)
        # the layer's own head widths, from the hub's o_proj (Gemma 4's full-attention layers are wider)
        dv = ref.o_proj.weight.shape[1] // h
        dqk = cfg.d_head_qk if cfg.attention == "mla" else dv
        # W_O[h] = columns h*d_head_v.. of o_proj, transposed: [head, d_head_v, d_model]
        assert attn.W_O.shape == (h, dv, dm)
        for head in range(h):
            # Granite's residual multiplier (which scales the attention update) is folded into W_O and b_O
            torch.testing.assert_close(attn.W_O[head], ref.o_proj.weight[:, head * dv:(head + 1) * dv].T * cfg.residual_multiplier, atol=0, rtol=0)
        if ref.o_proj.bias is not None:
            torch.testing.assert_close(attn.b_O, ref.o_proj.bias * cfg.residual_multiplier, atol=0, rtol=0)
        if getattr(ref, "q_proj", None) is None:  # MLA with a query low-rank path: no linear W_Q
            assert not hasattr(attn, "W_Q")
            continue
        q_w = ref.q_proj.weight.view(h, -1, dm)[:, :dqk]  # a gated q_proj holds [query; gate] per head
        assert attn.W_Q.shape == (h, dm, dqk)
        for head in range(h):
            torch.testing.assert_close(attn.W_Q[head], q_w[head].T, atol=0, rtol=0)
        if getattr(ref, "k_proj", None) is None:  # MLA: keys and values come from a normalised latent
            assert not hasattr(attn, "W_K") and not hasattr(attn, "W_V") and not hasattr(attn, "OV")
            continue
        kv = ref.k_proj.weight.shape[0] // dqk  # the layer's own kv heads (Gemma 4's full layers: fewer)
        rep = h // kv
        assert attn._W_K.shape == (kv, dm, dqk) and attn.W_K.shape == (h, dm, dqk) and attn.W_V.shape == (h, dm, dv)
        # K = V (Gemma 4's full-attention layers: no v_proj): the value is the raw key projection
        v_proj = ref.v_proj.weight if getattr(ref, "v_proj", None) is not None else ref.k_proj.weight
        for head in range(h):  # GQA as TransformerLens: query head h reads key/value head h // (n_heads / n_kv_heads)
            g = head // rep
            torch.testing.assert_close(attn.W_K[head], ref.k_proj.weight[g * dqk:(g + 1) * dqk].T, atol=0, rtol=0)
            torch.testing.assert_close(attn.W_V[head], v_proj[g * dv:(g + 1) * dv].T, atol=0, rtol=0)
        if ref.q_proj.bias is not None:
            torch.testing.assert_close(attn.b_Q, ref.q_proj.bias.view(h, dqk), atol=0, rtol=0)
            torch.testing.assert_close(attn.b_K, ref.k_proj.bias.view(kv, dqk).repeat_interleave(rep, 0), atol=0, rtol=0)
            torch.testing.assert_close(attn._b_V, ref.v_proj.bias.view(kv, dv), atol=0, rtol=0)
            assert attn.b_V.shape == (h, dv)
        else:
            assert attn.b_Q is None and attn.b_K is None and attn.b_V is None
        qk, ov = attn.QK, attn.OV
        assert isinstance(qk, FactoredMatrix) and qk.shape == (h, dm, dm) and ov.shape == (h, dm, dm)
        torch.testing.assert_close(qk.AB, attn.W_Q @ attn.W_K.transpose(-1, -2), **TOL)
        torch.testing.assert_close(ov.AB, attn.W_V @ attn.W_O, **TOL)


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_attention_weights_reproduce_activations(runs, arch):
    """``z_h @ W_O[h]`` (times the output gate) summed over heads plus ``b_O`` is ``hook_attn_out``
    (through ``ln1_post`` at the run's scale on post-norm blocks: FlexOlmo, Gemma 4);
    ``x @ W_V + b_V`` is ``hook_v`` (after Gemma 4's weightless value RMSNorm) and, where no QK-norm or
    clipping sits in between, ``x @ W_Q + b_Q`` is ``hook_q`` (x: the ln1 output, or the residual
    stream without a pre-norm; Llama 4's L2 QK-norm comes after ``hook_q``)."""
    model, hf, logits, cache = runs(arch)
    cfg = model.cfg
    for l in _attention_layers(model):
        attn = model.blocks[l].attn
        z = cache[f"blocks.{l}.attn.hook_z"]
        gate = cache.cache_dict.get(f"blocks.{l}.attn.hook_attn_gate")
        if gate is not None:
            z = z * gate
        per_head = torch.einsum("bphd,hdm->bphm", z, attn.W_O)
        b_O = attn.b_O if attn.b_O is not None else 0
        attn_out = cache["attn_out", l]
        torch.testing.assert_close(_through_post_norm(model, cache, l, "ln1_post", per_head.sum(2) + b_O), attn_out, **TOL)
        if model.blocks[l].ln1_post is not None:
            # per head through the norm (the cache's stack_head_results) sums to hook_attn_out too; the
            # pre-norm sum does not (negative control: the post-norm is not the identity here)
            heads = _through_post_norm(model, cache, l, "ln1_post", per_head)
            torch.testing.assert_close(heads.sum(2) + _through_post_norm(model, cache, l, "ln1_post", b_O), attn_out, **TOL)
            assert (per_head.sum(2) + b_O - attn_out).abs().max() > 1e-3
            if attn.b_O is None:  # what the cache's per-head decomposition uses (before any layer scalar)
                torch.testing.assert_close(cache._head_results(l), heads, **TOL)
        x = _branch_input(model, cache, l, "ln1", "hook_resid_pre")
        if hasattr(attn, "W_Q") and cfg.qk_norm in ("none", "l2") and cfg.clip_qkv is None:
            q = torch.einsum("bpm,hmd->bphd", x, attn.W_Q) + (attn.b_Q if attn.b_Q is not None else 0)
            torch.testing.assert_close(q, cache[f"blocks.{l}.attn.hook_q"], **TOL)
        if hasattr(attn, "_W_V") and cfg.clip_qkv is None:
            v = torch.einsum("bpm,hmd->bphd", x, attn._W_V) + (attn._b_V if attn._b_V is not None else 0)
            if cfg.v_norm:  # Gemma 4: weightless RMSNorm of each value head, before hook_v
                v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
            torch.testing.assert_close(v, cache[f"blocks.{l}.attn.hook_v"], **TOL)


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_stacked_weights(runs, arch):
    model, hf, logits, cache = runs(arch)
    cfg = model.cfg
    L, h, dm = cfg.n_layers, cfg.n_heads, cfg.d_model
    assert model.b_O.shape == (L, dm)
    if cfg.attention == "compressed":  # DeepSeek-V4: no layer has TransformerLens' per-head maps
        for name in ("W_Q", "W_K", "W_V", "W_O", "QK", "OV"):
            assert not hasattr(model, name)
        with pytest.raises(AttributeError, match="absent"):
            model.W_Q
        return
    if cfg.linear_attn_layers:  # hybrids: not every layer has heads; the error names those that do
        with pytest.raises(AttributeError, match=r"read model\.blocks\[l\]\.attn\.W_Q"):
            model.W_Q
        assert not hasattr(model, "W_O") and not hasattr(model, "QK")
        return
    def hub_widths(l):  # (d_head, kv heads) of the hub's layer l
        ref = _hf_attn(hf, l)
        d = ref.o_proj.weight.shape[1] // h
        return d, (ref.k_proj.weight.shape[0] // d if getattr(ref, "k_proj", None) is not None else None)

    widths = {l: hub_widths(l) for l in range(L)}
    if len(set(widths.values())) > 1:
        # Gemma 4: the full-attention layers have their own head width and kv heads (K = V), so no
        # [n_layers, ...] tensor exists; the error names the layers of each shape
        full = [l for l in range(L) if cfg.layer_types[l] == "full_attention"]
        assert full and all(widths[l] == (cfg.full_attn_d_head, cfg.full_attn_n_kv_heads or cfg.n_kv_heads) for l in full)
        sliding = [l for l in range(L) if l not in full]
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "QK", "OV"):
            with pytest.raises(AttributeError, match=rf"differ in shape \(layers {re.escape(str(sliding))}: .*layers "
                                                     rf"{re.escape(str(full))}: .*read model\.blocks\[l\]\.attn\.W_"):
                getattr(model, name)
            assert not hasattr(model, name)
        assert model.blocks[full[0]].attn.W_Q.shape == (h, dm, cfg.full_attn_d_head)
        with pytest.raises(AttributeError, match="differ in shape"):
            model.QK_for_attn_layers()
        return
    assert model.W_O.shape == (L, h, cfg.d_head_v, dm)
    for l in range(L):
        torch.testing.assert_close(model.W_O[l], model.blocks[l].attn.W_O, atol=0, rtol=0)
    if cfg.attention == "mla":
        assert not hasattr(model, "W_K") and not hasattr(model, "OV")
        with pytest.raises(AttributeError, match="normalised latent"):
            model.blocks[0].attn.W_K
        return
    assert model.W_Q.shape == model.W_K.shape == (L, h, dm, cfg.d_head) == model.W_V.shape
    assert model.b_Q.shape == model.b_K.shape == model.b_V.shape == (L, h, cfg.d_head)
    for l in range(L):
        torch.testing.assert_close(model.W_K[l], model.blocks[l].attn.W_K, atol=0, rtol=0)
        b = model.blocks[l].attn.b_Q
        torch.testing.assert_close(model.b_Q[l], b if b is not None else torch.zeros(h, cfg.d_head), atol=0, rtol=0)
    assert model.QK.shape == model.OV.shape == (L, h, dm, dm)
    torch.testing.assert_close(model.OV.AB[1], model.blocks[1].attn.OV.AB, **TOL)


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_mlp_and_expert_weights_reproduce_activations(runs, arch):
    """Dense MLPs: ``act(x @ W_gate) * (x @ W_in)`` is ``hook_post`` and ``hook_post @ W_out`` is
    ``hook_mlp_out`` (through ``ln2_post`` at the run's scale on post-norm blocks); experts:
    ``act(x_e @ W_gate[e]) * (x_e @ W_in[e]) @ W_out[e]`` is the slot's ``hook_expert_out``, with
    ``x_e = x`` or, for Llama 4's input-scaled experts (``cfg.expert_input_scaled``), ``x_e = w * x``
    (``w``: the slot's ``hook_expert_weights``). Gemma 4: the parallel dense MLP is
    ``blocks[l].dense_mlp`` (reads ``ln2``, output ``hook_dense_out`` after ``ln2_post_dense``), the
    experts read ``ln2_moe``, and the router reads the residual stream through its own RMSNorm."""
    model, hf, logits, cache = runs(arch)
    cfg = model.cfg
    act = TL_ACT[cfg.act_fn] if cfg.act_fn in TL_ACT else None  # gpt-oss's clamped SwiGLU: experts only
    if cfg.expert_act == "clamped_silu":  # DeepSeek-V4: experts and shared expert clamp gate and up
        lim = cfg.swiglu_limit

        def act(g, _lim=lim):  # applied to the gate; the up clamp is folded in below
            return torch.nn.functional.silu(g.clamp(max=_lim))
    for l in range(cfg.n_layers):
        block = model.blocks[l]
        mlp = block.mlp
        x = _branch_input(model, cache, l, "ln2", "hook_resid_mid")
        if l not in cfg.moe_layers:
            assert mlp.W_in.shape == mlp.W_gate.shape == (cfg.d_model, cfg.d_mlp)
            assert mlp.W_out.shape == (cfg.d_mlp, cfg.d_model)
            post = act(x @ mlp.W_gate) * (x @ mlp.W_in)
            torch.testing.assert_close(post, cache[f"blocks.{l}.mlp.hook_post"], **TOL)
            torch.testing.assert_close(_through_post_norm(model, cache, l, "ln2_post", post @ mlp.W_out),
                                       cache["mlp_out", l], **TOL)
            continue
        assert not hasattr(mlp, "W_in")
        if getattr(block, "parallel", False):  # Gemma 4: dense MLP beside the MoE, each with its own norms
            dense = block.dense_mlp
            with pytest.raises(AttributeError, match=r"dense_mlp\.W_in"):
                mlp.W_in
            assert dense.W_in.shape == dense.W_gate.shape == (cfg.d_model, cfg.d_mlp)
            assert dense.W_out.shape == (cfg.d_mlp, cfg.d_model)
            post = act(x @ dense.W_gate) * (x @ dense.W_in)
            torch.testing.assert_close(post, cache[f"blocks.{l}.dense_mlp.hook_post"], **TOL)
            dense_out = _through_post_norm(model, cache, l, "ln2_post_dense", post @ dense.W_out)
            torch.testing.assert_close(dense_out, cache[f"blocks.{l}.hook_dense_out"], **TOL)
            # hook_mlp_out = ln2_post(hook_dense_out + hook_moe_out)
            torch.testing.assert_close(
                _through_post_norm(model, cache, l, "ln2_post", dense_out + cache[f"blocks.{l}.hook_moe_out"]),
                cache["mlp_out", l], **TOL)
            x = cache[f"blocks.{l}.ln2_moe.hook_normalized"]  # what the experts read
        if cfg.router_input_norm:  # Gemma 4: W_router (rms(h) * in_norm_w * d_model**-0.5), h the residual stream
            h = cache[f"blocks.{l}.hook_resid_mid"]
            r_in = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * mlp.router.in_norm_w
            torch.testing.assert_close((r_in * cfg.d_model ** -0.5) @ mlp.router.W_router.T,
                                       cache["router_logits", l].to(x.dtype), **TOL)
        ex = mlp.experts
        E, de = cfg.n_experts, cfg.d_expert
        assert ex.W_in.shape == ex.W_gate.shape == (E, cfg.d_model, de) and ex.W_out.shape == (E, de, cfg.d_model)
        idx, out, wts = cache["expert_indices", l], cache["expert_out", l], cache["expert_weights", l]
        for b, p, s in [(0, 0, 0), (1, 5, cfg.top_k - 1), (0, 3, cfg.top_k // 2)]:
            e = int(idx[b, p, s])
            # Llama 4: the slot's weight scales the expert's input, E_e(w x) (the combine then adds slots unweighted)
            xe = x[b, p] * wts[b, p, s] if cfg.expert_input_scaled else x[b, p]
            gate, up = xe @ ex.W_gate[e], xe @ ex.W_in[e]
            if ex.b_gate is not None:  # gpt-oss: biases before the activation, b_out after W_out
                gate, up = gate + ex.b_gate[e], up + ex.b_up[e]
            y = ex.activation(gate, up) @ ex.W_out[e] + (ex.b_out[e] if ex.b_out is not None else 0)
            torch.testing.assert_close(y, out[b, p, s], **TOL)
            if cfg.expert_input_scaled:  # negative control: the unscaled input fails the same check
                y0 = ex.activation(x[b, p] @ ex.W_gate[e], x[b, p] @ ex.W_in[e]) @ ex.W_out[e]
                assert not torch.allclose(y0, out[b, p, s], **TOL)
        if cfg.has_shared_experts:
            sh = mlp.shared_experts
            up = x @ sh.W_in
            if cfg.expert_act == "clamped_silu":
                up = up.clamp(-cfg.swiglu_limit, cfg.swiglu_limit)
            post = act(x @ sh.W_gate) * up
            torch.testing.assert_close(post, cache[f"blocks.{l}.mlp.shared_experts.hook_post"], **TOL)
        if not getattr(block, "parallel", False) and not cfg.has_shared_experts:
            # the routed sum through the post-norm (FlexOlmo) is hook_mlp_out
            torch.testing.assert_close(_through_post_norm(model, cache, l, "ln2_post", cache["routed_out", l]),
                                       cache["mlp_out", l], **TOL)


def test_views_share_storage_and_edits_propagate(runs):
    """The TransformerLens names are views: editing one edits the model (a +1 cannot round away)."""
    model, hf, logits, cache = runs("qwen2_moe")
    tokens = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    attn = model.blocks[1].attn
    with torch.no_grad():
        before = model(tokens)
        attn.W_O[2, 0, 5] += 1.0
        col = 2 * model.cfg.d_head  # head 2's first column of o_proj
        assert attn.w_o[5, col] == pytest.approx(float(hf.model.layers[1].self_attn.o_proj.weight[5, col]) + 1.0)
        after = model(tokens)
        attn.W_O[2, 0, 5] -= 1.0
        assert (after - before).abs().max() > 1e-3
        torch.testing.assert_close(model(tokens), before, atol=1e-6, rtol=0)
        model.W_U[:, 7] *= 2  # W_U is a view of unembed.w_u
        assert torch.equal(model.unembed.w_u[7], 2 * hf.lm_head.weight[7])
        model.W_U[:, 7] /= 2


def test_absent_names_explain_why(runs):
    model = runs("qwen3_next")[0]
    lin = model.cfg.linear_attn_layers[0]
    with pytest.raises(AttributeError, match="Gated DeltaNet"):
        model.blocks[lin].attn.W_Q
    assert not hasattr(model.blocks[lin].attn, "OV")
    with pytest.raises(AttributeError, match="experts"):
        model.blocks[model.cfg.moe_layers[0]].mlp.W_in
    with pytest.raises(AttributeError, match="rotary"):
        model.W_pos
    mla = runs("deepseek_v3")[0]
    with pytest.raises(AttributeError, match="low-rank"):
        mla.blocks[0].attn.W_Q


@torch.no_grad()
def test_grouped_query_attention_equals_attention_with_repeated_kv(runs):
    """Port of TransformerLens' ``test_grouped_query_attention_output_is_correct``: a GQA model equals
    the multi-head model whose K and V are its ``_W_K``/``_W_V`` repeated with ``repeat_interleave``,
    i.e. its TransformerLens ``W_K``/``W_V`` (written back in the hub layout)."""
    gqa = runs("mixtral")[0]
    assert gqa.cfg.n_kv_heads < gqa.cfg.n_heads
    mha = HookedMoETransformer.from_config(gqa.cfg.replace(n_kv_heads=gqa.cfg.n_heads))
    state = dict(gqa.state_dict())
    h, d, dm = gqa.cfg.n_heads, gqa.cfg.d_head, gqa.cfg.d_model
    for l, block in enumerate(gqa.blocks):
        for w in ("W_K", "W_V"):
            state[f"blocks.{l}.attn.w_{w[-1].lower()}"] = getattr(block.attn, w).transpose(1, 2).reshape(h * d, dm)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(mha(tokens), gqa(tokens), atol=1e-5, rtol=1e-5)
    # negative control: repeating the kv heads in the wrong order (tile, not interleave) changes the output
    for l, block in enumerate(gqa.blocks):
        state[f"blocks.{l}.attn.w_k"] = block.attn._W_K.repeat(h // gqa.cfg.n_kv_heads, 1, 1).transpose(1, 2).reshape(h * d, dm)
    mha.load_state_dict(state)
    assert (mha(tokens) - gqa(tokens)).abs().max() > 1e-3


def test_stacked_mlp_weights_when_every_layer_is_dense():
    from moelens.testing import tiny_hf_config

    model = HookedMoETransformer.from_config(tiny_hf_config("qwen3_moe", mlp_only_layers=[0, 1, 2]))
    cfg = model.cfg
    assert cfg.moe_layers == []
    assert model.W_in.shape == model.W_gate.shape == (cfg.n_layers, cfg.d_model, cfg.d_mlp)
    assert model.W_out.shape == (cfg.n_layers, cfg.d_mlp, cfg.d_model)
    assert torch.equal(model.W_in[1], model.blocks[1].mlp.w_up.T) and not model.b_out.any()
    assert model.b_in.shape == (cfg.n_layers, cfg.d_mlp) and not model.b_in.any()
    assert model.blocks[0].mlp.b_in is None  # TransformerLens' post-product bias: no architecture has one
    # with sparse layers, the stacked MLP names are absent and say where the expert weights are
    sparse = HookedMoETransformer.from_config(tiny_hf_config("qwen3_moe"), device="meta")
    assert sparse.cfg.moe_layers
    with pytest.raises(AttributeError, match=r"mlp\.experts\.W_in"):
        sparse.W_in


@torch.no_grad()
def test_tl_parameters_and_svd_interpreter(runs):
    """``model.tl_parameters()`` (TransformerLens 4's name -> tensor dict) is what
    ``transformer_lens.SVDInterpreter`` reads: its OV singular vectors through ``W_U`` equal an
    independent SVD of ``W_V[h] @ W_O[h]``; dense layers' ``w_in``/``w_out`` work, sparse ones refuse."""
    from transformer_lens import SVDInterpreter

    model = runs("qwen3_moe")[0]  # layer 0 dense, layers 1-2 sparse
    params = model.tl_parameters()
    assert torch.equal(params["unembed.W_U"], model.W_U) and torch.equal(params["blocks.1.attn.W_O"], model.W_O[1])
    assert "blocks.0.mlp.W_in" in params and "blocks.1.mlp.experts.W_in" in params and "blocks.1.mlp.W_in" not in params
    svd = SVDInterpreter(model)
    got = svd.get_singular_vectors("OV", layer_index=1, head_index=2, num_vectors=3)[:, 0]  # [d_vocab, 3]
    _, _, Vh = torch.linalg.svd(model.blocks[1].attn.W_V[2] @ model.blocks[1].attn.W_O[2])
    want = model.W_U.T @ Vh[:3].T
    for k in range(3):  # singular vectors are defined up to sign
        sign = torch.sign((got[:, k] * want[:, k]).sum())
        torch.testing.assert_close(got[:, k], sign * want[:, k], atol=1e-4, rtol=1e-4)
    assert svd.get_singular_vectors("w_in", layer_index=0, num_vectors=2).shape == (model.cfg.d_vocab, 1, 2)
    assert svd.get_singular_vectors("w_out", layer_index=0, num_vectors=2).shape == (model.cfg.d_vocab, 1, 2)
    with pytest.raises(NotImplementedError, match="Sparse MoE"):
        svd.get_singular_vectors("w_in", layer_index=1)


@torch.no_grad()
def test_composition_scores_and_attention_layer_circuits(runs):
    """``all_composition_scores`` equals the Frobenius-norm definition computed from dense per-head
    circuits; ``QK/OV_for_attn_layers`` leave a hybrid's Gated DeltaNet layers out."""
    model = runs("mixtral")[0]  # GQA: W_K/W_V repeated to the query heads
    a, b = model.blocks[0].attn, model.blocks[1].attn
    ov1 = a.W_V[1] @ a.W_O[1]
    qk2 = b.W_Q[3] @ b.W_K[3].T
    ov2 = b.W_V[3] @ b.W_O[3]
    for mode, right in (("Q", qk2), ("K", qk2.T), ("V", ov2)):
        scores = model.all_composition_scores(mode)
        assert scores.shape == (2, 4, 2, 4) and scores.head_labels[5] == "L1H1"
        want = (ov1 @ right).norm() / (ov1.norm() * right.norm())
        assert float(scores[0, 1, 1, 3]) == pytest.approx(float(want), rel=1e-4)
        assert not scores[1, :, 0, :].any() and not scores[0, :, 0, :].any()  # only earlier -> later layers
    assert model.all_head_labels()[:2] == ["L0H0", "L0H1"] and len(model.all_head_labels()) == 8
    hybrid = runs("qwen3_next")[0]
    layers, qk = hybrid.QK_for_attn_layers()
    full = [l for l in range(hybrid.cfg.n_layers) if l not in hybrid.cfg.linear_attn_layers]
    assert layers == full and qk.shape == (len(full), hybrid.cfg.n_heads, hybrid.cfg.d_model, hybrid.cfg.d_model)
    torch.testing.assert_close(qk.AB[0], hybrid.blocks[full[0]].attn.QK.AB, atol=1e-5, rtol=1e-5)
    assert hybrid.all_composition_scores("V").layer_indices == full


@torch.no_grad()
def test_new_families_tl_parameters_and_cfg(runs):
    """``tl_parameters()`` on post-norm blocks (no ``ln1``/``ln2`` on FlexOlmo; ``ln1_post``/``ln2_post``
    as TransformerLens' Gemma 2 names them) and on Gemma 4 (its parallel ``dense_mlp``); Gemma 4's
    K = V layers' ``W_V`` is a view of the key weight; ``cfg.act_fn`` / ``output_logits_soft_cap`` in
    TransformerLens' naming."""
    flex = runs("flex_olmo")[0]
    params = flex.tl_parameters()
    assert "blocks.0.ln1.w" not in params and "blocks.0.ln2.w" not in params
    assert params["blocks.0.ln1_post.w"] is flex.blocks[0].ln1_post.w and params["blocks.0.ln2_post.w"] is flex.blocks[0].ln2_post.w
    assert flex.cfg.output_logits_soft_cap == -1.0 and flex.cfg.act_fn == "silu"
    gemma = runs("gemma4")[0]
    cfg = gemma.cfg
    assert cfg.act_fn == "gelu_pytorch_tanh" and cfg.output_logits_soft_cap == cfg.final_logit_softcap > 0
    params = gemma.tl_parameters()
    assert torch.equal(params["blocks.0.dense_mlp.W_in"], gemma.blocks[0].dense_mlp.w_up.T)
    assert "blocks.0.mlp.experts.W_in" in params and "blocks.0.mlp.W_in" not in params
    for n in ("ln1", "ln1_post", "ln2", "ln2_post_dense", "ln2_moe", "ln2_post_moe", "ln2_post"):
        assert f"blocks.0.{n}.w" in params
    full = cfg.layer_types.index("full_attention")
    attn = gemma.blocks[full].attn
    assert attn.w_v is None and attn._W_V.data_ptr() == attn.w_k.data_ptr()  # K = V: one weight
    assert params[f"blocks.{full}.attn._W_V"].shape == (attn.n_kv_heads, cfg.d_model, attn.d_head)
