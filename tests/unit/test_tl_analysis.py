"""TransformerLens' ActivationCache analysis methods on moelens caches, and the expert axis.

Every architecture (tiny sharpened checkpoints: final-norm weights != 1, so a forgotten norm weight
shows) must give decompositions that sum to the residual stream and to the logits in fp32.
"""

import pytest
import torch

from moelens import HookedMoETransformer
from moelens import analysis as A
from moelens.testing import TINY_CONFIGS

ARCHS = sorted(TINY_CONFIGS)  # every architecture with a tiny test config (new ones are picked up)
# TransformerLens' one-residual-stream semantics; DeepSeek-V4's stream decompositions and DLA are
# tested in tests/parity/test_deepseek_v4.py
ONE_STREAM = [a for a in ARCHS if a != "deepseek_v4"]
TOL = dict(atol=1e-5, rtol=1e-5)


def logits_before_cap(model, cache):
    return torch.nn.functional.linear(model.ln_final(cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]),
                                      model.unembed.w_u)


@pytest.fixture(scope="module")
def runs(tiny_dirs):
    out = {}

    def get(arch):
        if arch not in out:
            d, _ = tiny_dirs(arch)
            model = HookedMoETransformer.from_pretrained(d)
            tokens = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                logits, cache = model.run_with_cache(tokens)
                if model.cfg.final_logit_softcap is not None:
                    # Gemma's soft-cap is not linear: the decompositions sum to the logits before it
                    torch.testing.assert_close(model.unembed.cap(logits_before_cap(model, cache)), logits)
                    # as in TransformerLens, unembed.hook_out holds the logits before the soft-cap
                    torch.testing.assert_close(cache["unembed.hook_out"], logits_before_cap(model, cache))
                    logits = logits_before_cap(model, cache)
            out[arch] = (model, tokens, logits, cache)
        return out[arch]

    return get


@pytest.mark.parametrize("arch", ONE_STREAM)
def test_logit_attrs_sum_to_logits(runs, arch):
    model, tokens, logits, cache = runs(arch)
    assert (model.ln_final.w - 1).abs().max() > 1e-3  # the final norm weight matters in this test
    t = 17
    with torch.no_grad():
        # the constant no component carries (PhiMoE: final LayerNorm bias and lm_head bias; else zero)
        logits = logits - model.logit_bias()
        for kw in ({}, {"expert_level": True}):
            stack = cache.decompose_resid(pos_slice=-1, **kw)
            attrs = cache.logit_attrs(stack, tokens=t, pos_slice=-1)
            torch.testing.assert_close(attrs.sum(0), logits[:, -1, t], **TOL)
        full = cache.get_full_resid_decomposition(pos_slice=-1)
        torch.testing.assert_close(cache.logit_attrs(full, tokens=t, pos_slice=-1).sum(0), logits[:, -1, t], **TOL)
        # logit difference, per batch element, all positions
        good, bad = torch.tensor([3, 4]), torch.tensor([5, 6])
        stack = cache.decompose_resid(expert_level=True)
        diff = cache.logit_attrs(stack, tokens=good, incorrect_tokens=bad).sum(0)
        want = logits.gather(-1, good[:, None, None].expand(2, 7, 1)) - logits.gather(-1, bad[:, None, None].expand(2, 7, 1))
        torch.testing.assert_close(diff, want[..., 0], **TOL)


@pytest.mark.parametrize("arch", ONE_STREAM)
def test_accumulated_resid_apply_ln_gives_logits(runs, arch):
    model, tokens, logits, cache = runs(arch)
    with torch.no_grad():
        acc, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
        assert labels[-1] == "final_post" and len(labels) == model.cfg.n_layers + 1
        # logits = resid_final @ W_U + b_U (PhiMoE's lm_head bias is b_U, not in the residual stream)
        torch.testing.assert_close(acc[-1] @ model.W_U + model.b_U, logits, **TOL)
        # intermediate layer: divided by that layer's ln1 scale (LayerNorm: centred first, as TransformerLens)
        acc1 = cache.accumulated_resid(layer=1, apply_ln=True)
        resid = cache["resid_pre", 1]
        if model.cfg.normalization_type == "LN":
            resid = resid - resid.mean(-1, keepdim=True)
        # post-norm blocks (FlexOlmo) have no ln1: unnormalised
        scale = cache["blocks.1.ln1.hook_scale"] if model.blocks[1].ln1 is not None else 1.0
        torch.testing.assert_close(acc1[-1], resid / scale, **TOL)


@pytest.mark.parametrize("arch", ONE_STREAM)
def test_decompositions_sum_to_residual_stream(runs, arch):
    model, tokens, logits, cache = runs(arch)
    cfg = model.cfg
    final = cache["resid_post", -1]
    for kw in ({}, {"expert_level": True}):
        torch.testing.assert_close(cache.decompose_resid(**kw).sum(0), final, **TOL)
    full, labels = cache.get_full_resid_decomposition(return_labels=True)
    torch.testing.assert_close(full.sum(0), final, **TOL)
    assert len(labels) == full.shape[0]
    coarse = cache.get_full_resid_decomposition(expand_neurons=False)
    torch.testing.assert_close(coarse.sum(0), final, **TOL)
    # the input to the last sparse layer's MLP (resid_mid), experts of earlier layers
    l = cfg.moe_layers[-1]
    stack, labels = cache.decompose_resid(l, mlp_input=True, expert_level=True, return_labels=True)
    torch.testing.assert_close(stack.sum(0), cache["resid_mid", l], **TOL)
    assert labels[-1] == f"{l}_attn_out"
    for dense in cfg.dense_layers:
        if dense < l:
            assert f"{dense}_mlp_out" in labels
    # projections and apply_ln are consistent with the plain stack
    direction = torch.randn(cfg.d_model, 3, generator=torch.Generator().manual_seed(0))
    proj = cache.get_full_resid_decomposition(pos_slice=-1, project_output_onto=direction, apply_ln=True)
    plain = cache.get_full_resid_decomposition(pos_slice=-1, apply_ln=True)
    torch.testing.assert_close(proj, plain @ direction, **TOL)


@pytest.mark.parametrize("arch", ONE_STREAM)
def test_expert_components_equal_expert_contribution(runs, arch):
    model, tokens, logits, cache = runs(arch)
    cfg = model.cfg
    stack, labels = cache.decompose_resid(expert_level=True, return_labels=True)
    # exact, but for Gemma 4's layer scalars (their product is taken in another order)
    tol = dict(atol=0, rtol=0) if model.blocks[0].layer_scalar is None else dict(atol=1e-5, rtol=1e-5)
    index = {lab: i for i, lab in enumerate(labels)}

    def to_resid(l, x, moe=True):
        """What a part of layer l's FFN output adds to the final residual stream: through the MoE
        branch's post-norm (Gemma 4's parallel blocks) and the FFN post-norm (FlexOlmo, Gemma 4) at the
        run's scales, times the layer scalars of layers l.. (Gemma 4)."""
        block = model.blocks[l]
        if getattr(block, "parallel", False) and moe:
            x = x / cache[f"blocks.{l}.ln2_post_moe.hook_scale"] * block.ln2_post_moe.w
        if block.ln2_post is not None:
            x = block.post_mlp_linear(x, cache[f"blocks.{l}.ln2_post.hook_scale"])
        return scalars(l, x)

    def scalars(l, x):
        for k in range(l, cfg.n_layers):
            if model.blocks[k].layer_scalar is not None:
                x = x * model.blocks[k].layer_scalar
        return x

    for l in range(cfg.n_layers):
        if l in cfg.moe_layers:
            assert f"{l}_mlp_out" not in index
            for e in range(cfg.n_experts):
                torch.testing.assert_close(stack[index[f"L{l}E{e}"]], to_resid(l, cache.expert_contribution(l, e)),
                                           **tol)
            assert (f"L{l}_shared" in index) == cfg.has_shared_experts
            if cfg.has_shared_experts:
                torch.testing.assert_close(stack[index[f"L{l}_shared"]], to_resid(l, cache["shared_out", l]),
                                           **tol)
        else:
            torch.testing.assert_close(stack[index[f"{l}_mlp_out"]], scalars(l, cache["mlp_out", l]), **tol)
        if getattr(model.blocks[l], "parallel", False):  # Gemma 4: the dense branch is its own component
            torch.testing.assert_close(stack[index[f"L{l}_dense"]], to_resid(l, cache[f"blocks.{l}.hook_dense_out"],
                                                                             moe=False), atol=1e-5, rtol=1e-5)
    full, flabels = cache.get_full_resid_decomposition(return_labels=True)
    l = cfg.moe_layers[0]
    torch.testing.assert_close(full[flabels.index(f"L{l}E1")], to_resid(l, cache.expert_contribution(l, 1)),
                               **tol)


@pytest.mark.parametrize("arch", ONE_STREAM)
def test_router_attribution_sums_to_router_logits(runs, arch):
    model, tokens, logits, cache = runs(arch)
    for l in model.cfg.moe_layers:
        ra = A.router_attribution(model, cache, l)
        torch.testing.assert_close(ra.values.sum(0), cache["router_logits", l].float(), **TOL)
        assert ra.labels[0] == "embed" and f"{l}_attn_out" in ra.labels
        heads = A.router_attribution(model, cache, l, heads=True, pos_slice=-1)
        torch.testing.assert_close(heads.values.sum(0), cache["router_logits", l][:, -1].float(), **TOL)
        for j in range(l + 1):  # every attention layer up to l: per head, or whole where it has no heads
            assert (f"L{j}H0" in heads.labels) != (f"{j}_attn_out" in heads.labels)
        # a layer appears as "{l}_attn_out" only where it has no per-head split (linear attention)
        for lab in heads.labels:
            if lab.endswith("_attn_out"):
                assert f"L{lab.split('_')[0]}H0" not in heads.labels
    frame = ra.to_frame(batch=1, position=3)
    assert frame.groupby("expert")["contribution"].sum().values == pytest.approx(
        cache["router_logits", l][1, 3].tolist(), abs=1e-5)
    fig = ra.plot(batch=1, position=3, top=5)
    assert fig.data[0].z.shape[0] == 7  # 5 components + "other" + the router logit


def test_inherited_methods_agree_with_hand_computation(runs):
    model, tokens, logits, cache = runs("qwen3_moe")
    cfg = model.cfg
    with torch.no_grad():
        # hook_scale is the divisor sqrt(mean(x^2) + eps)
        for l in range(cfg.n_layers):
            x = cache["resid_pre", l]
            scale = (x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps).sqrt()
            torch.testing.assert_close(cache[f"blocks.{l}.ln1.hook_scale"], scale, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(cache[f"blocks.{l}.ln1.hook_normalized"], model.blocks[l].ln1.w * x / scale,
                                       atol=1e-5, rtol=1e-5)
        # stack_activation / accumulated_resid
        torch.testing.assert_close(cache.stack_activation("resid_pre"),
                                   torch.stack([cache[f"blocks.{l}.hook_resid_pre"] for l in range(cfg.n_layers)]))
        acc = cache.accumulated_resid(pos_slice=-1)
        torch.testing.assert_close(acc[0], cache["hook_embed"][:, -1])
        # per-head results: z_h w_o[:, h]^T, summing to attn_out
        heads, labels = cache.stack_head_results(layer=2, return_labels=True)
        assert labels[:2] == ["L0H0", "L0H1"] and heads.shape[0] == 2 * cfg.n_heads
        d = cfg.d_head_v
        z = cache["blocks.1.attn.hook_z"]
        w_o = model.blocks[1].attn.w_o
        for h in range(cfg.n_heads):
            torch.testing.assert_close(heads[cfg.n_heads + h], z[:, :, h] @ w_o[:, h * d:(h + 1) * d].T)
        torch.testing.assert_close(heads[cfg.n_heads:].sum(0), cache["attn_out", 1], **TOL)
        # apply_ln_to_stack at the unembed: divide by ln_final's scale (the weight is in the direction)
        stack = cache.decompose_resid(pos_slice=-1)
        torch.testing.assert_close(cache.apply_ln_to_stack(stack, pos_slice=-1),
                                   stack / cache["ln_final.hook_scale"][:, -1], atol=0, rtol=0)
        # logit_attrs by hand
        t = 9
        want = (stack / cache["ln_final.hook_scale"][:, -1]) @ (model.ln_final.w * model.W_U[:, t])
        torch.testing.assert_close(cache.logit_attrs(stack, tokens=t, pos_slice=-1), want, **TOL)
        torch.testing.assert_close(model.tokens_to_residual_directions(torch.tensor([t, 3])),
                                   model.ln_final.w * model.W_U[:, [t, 3]].T)
        assert model.accumulated_bias(cfg.n_layers).abs().max() == 0


def test_short_keys(runs):
    model, tokens, logits, cache = runs("qwen2_moe")
    for short, tail in [
        ("expert_indices", "mlp.hook_expert_indices"), ("router_logits", "mlp.hook_router_logits"),
        ("router_scores", "mlp.hook_router_scores"), ("expert_weights", "mlp.hook_expert_weights"),
        ("expert_out", "mlp.hook_expert_out"), ("routed_out", "mlp.hook_routed_out"),
        ("shared_out", "mlp.hook_shared_out"), ("resid_pre", "hook_resid_pre"), ("attn_out", "hook_attn_out"),
        ("mlp_out", "hook_mlp_out"), ("resid_post", "hook_resid_post"), ("resid_mid", "hook_resid_mid"),
    ]:
        assert cache[short, 2] is cache[f"blocks.2.{tail}"]
    assert cache["expert_indices", -1] is cache["blocks.2.mlp.hook_expert_indices"]
    assert cache["scale", 1, "ln2"] is cache["blocks.1.ln2.hook_scale"]
    assert cache["z", 1] is cache["blocks.1.attn.hook_z"]
    _, _, _, mla = runs("deepseek_v2_lite")
    assert mla["kv_latent", 1] is mla["blocks.1.attn.hook_kv_latent"]
    assert mla["k_pe", -1] is mla["blocks.2.attn.hook_k_pe"]
    with pytest.raises(KeyError):
        cache["pre", 1]  # TransformerLens' blocks.1.mlp.hook_pre: a sparse layer has none (no guessing)
    with pytest.raises(KeyError, match="not in this cache"):
        cache["expert_indices", 0]  # a dense layer
    # dense-only neuron stack works; across a sparse layer it says what to use instead
    neurons = cache.stack_neuron_results(1, pos_slice=-1)
    assert neurons.shape[0] == model.cfg.d_mlp
    torch.testing.assert_close(neurons.sum(0), cache["mlp_out", 0][:, -1], **TOL)
    with pytest.raises(ValueError, match="expert_level"):
        cache.stack_neuron_results(2)
    # batch slicing keeps the MoE cache class and its tokens
    one = cache.apply_slice_to_batch_dim(1)
    assert type(one) is type(cache) and one.tokens.shape == (1, tokens.shape[1])
    assert torch.equal(one["expert_indices", 1], cache["expert_indices", 1][1])


def test_hook_scale_edits_take_effect_and_unedited_is_bitwise(runs):
    model, tokens, logits, cache = runs("mixtral")
    with torch.no_grad():
        # hooking hook_scale without editing it leaves the forward bitwise unchanged
        scales = [n for n in model.hook_dict if n.endswith("hook_scale")]
        seen = []
        hooked = model.run_with_hooks(tokens, fwd_hooks=[(n, lambda s, hook: seen.append(hook.name)) for n in scales])
        assert torch.equal(hooked, model(tokens)) and len(seen) == len(scales) == 2 * model.cfg.n_layers + 1

        def double(scale, hook):
            return scale * 2

        def double_inplace(scale, hook):
            scale.mul_(2)

        for fn in (double, double_inplace):
            _, c = model.run_with_cache(tokens, fwd_hooks=[("blocks.1.ln2.hook_scale", fn)],
                                        names_filter=["blocks.1.ln2.hook_normalized"])
            torch.testing.assert_close(c["blocks.1.ln2.hook_normalized"], cache["blocks.1.ln2.hook_normalized"] / 2)
        with torch.inference_mode():
            _, c = model.run_with_cache(tokens, fwd_hooks=[("blocks.1.ln2.hook_scale", double_inplace)],
                                        names_filter=["blocks.1.ln2.hook_normalized"])
        torch.testing.assert_close(c["blocks.1.ln2.hook_normalized"], cache["blocks.1.ln2.hook_normalized"] / 2)


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2_full"])
def test_expert_dla_equals_logit_attrs(runs, arch):
    model, tokens, logits, cache = runs(arch)
    cfg = model.cfg
    df = A.expert_dla(model, cache, 11, incorrect_tokens=12, positions=[2, -1])
    stack, labels = cache.decompose_resid(expert_level=True, return_labels=True)
    ref = cache.logit_attrs(stack, tokens=11, incorrect_tokens=12)  # [component, batch, pos]
    n_rows = 2 * 2 * len(cfg.moe_layers) * (cfg.n_experts + cfg.has_shared_experts)
    assert len(df) == n_rows
    got = torch.tensor(df["attribution"].values, dtype=torch.float32)
    want = torch.tensor([float(ref[labels.index(r.label), r.batch, r.position]) for r in df.itertuples()])
    torch.testing.assert_close(got, want, **TOL)
    assert (df.loc[~df.routed, "attribution"] == 0).all()
    assert (df.loc[df.expert >= 0].groupby(["batch", "position", "layer"])["routed"].sum() == cfg.top_k).all()
    fig = A.expert_dla_heatmap(df, batch=1, position=2)
    assert fig.data[0].z.shape == (len(cfg.moe_layers), cfg.n_experts + cfg.has_shared_experts)


def test_expert_logit_lens_and_weight_lens(runs):
    model, tokens, logits, cache = runs("qwen3_moe")
    l, b, p = 2, 1, 4
    e = int(cache["expert_indices", l][b, p, 0])
    lens = A.expert_logit_lens(model, cache, l, e, position=p, batch=b, k=5)
    assert lens.attrs["routed"]
    full = (cache.expert_contribution(l, e)[b, p] / cache["ln_final.hook_scale"][b, p]) @ (
        model.ln_final.w[:, None] * model.W_U)
    top = full.topk(5)
    assert lens[lens.direction == "promoted"]["token_id"].tolist() == top.indices.tolist()
    torch.testing.assert_close(torch.tensor(lens[lens.direction == "promoted"]["logit"].values), top.values.double(),
                               **TOL)
    # weight-only lens: chunked over the vocabulary equals the brute force
    vals, ids = A.expert_weight_lens(model, l, experts=[0, 3], k=4, max_elements=1000)
    W = model.blocks[l].mlp.experts.w_down[[0, 3]]  # [2, d_model, d_expert]
    brute = torch.einsum("edn,vd->env", W * model.ln_final.w[None, :, None], model.W_U.T).detach()
    bt = brute.topk(4, dim=-1)
    assert torch.equal(ids, bt.indices)
    torch.testing.assert_close(vals, bt.values)
    low, _ = A.expert_weight_lens(model, l, experts=[0], k=2, largest=False, max_elements=1000)
    torch.testing.assert_close(low, brute[:1].topk(2, dim=-1, largest=False).values)


def test_to_tokens_accepts_sae_lens_arguments(tmp_path):
    from moelens.testing import toy_tokenizer

    model = HookedMoETransformer.from_config(
        {"architectures": ["MixtralForCausalLM"], "vocab_size": 256, "hidden_size": 32, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 16, "num_local_experts": 4,
         "num_experts_per_tok": 2, "max_position_embeddings": 4},
        seed=0, tokenizer=toy_tokenizer(256),
    )
    assert model.cfg.n_ctx == 4
    text = "w1 w2 w3 w4 w5 w6"
    assert model.to_tokens(text, truncate=False).shape == (1, 7)
    assert model.to_tokens(text).shape == (1, 4)
    assert model.to_tokens(text, truncate=True, move_to_device=False).device.type == "cpu"
