"""gpt-oss vs transformers on tiny sharpened checkpoints saved by transformers itself.

The tiny config has ``sliding_window=4`` (layers 0 and 2 sliding, 1 and 3 full), non-zero sinks and
biases, and expert weights large enough that the clamped SwiGLU's limit (7) is reached; sequences
are longer than the window. Negative controls show that dropping the clamp, the sinks or the
window breaks parity by a wide margin.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelens import HookedMoETransformer, check_shapes
from moelens.architectures import UnsupportedConfigError, translate_config
from moelens.loading import CheckpointError
from moelens.quant import mxfp4
from moelens.testing import save_tiny, tiny_hf_config, assert_topk_parity, hf_forward, random_ids

TOL = 1e-4
WINDOW = 4

ids_of, hf_run = random_ids, hf_forward


def assert_parity(model, hf, ids, mask=None, tol=TOL):
    return assert_topk_parity(model, hf, ids, mask, tol)








@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    d, hf = tiny_dirs("gpt_oss")
    return d, hf, HookedMoETransformer.from_pretrained(d)


def test_config_translation(tiny):
    _, _, model = tiny
    cfg = model.cfg
    assert cfg.architecture == "GptOssForCausalLM"
    assert cfg.layer_types == ("sliding_attention", "full_attention") * 2 and cfg.sliding_window == WINDOW
    assert [cfg.attention_window(l) for l in range(4)] == [WINDOW, None, WINDOW, None]
    assert cfg.moe_layers == [0, 1, 2, 3] and cfg.router_order == "topk_softmax" and cfg.router_bias
    assert cfg.expert_act == "clamped_swiglu" and cfg.swiglu_limit == 7.0 and cfg.swiglu_alpha == 1.702
    assert dict(cfg.rope_scaling)["truncate"] is False
    assert cfg.attn_sinks and cfg.qkv_bias and cfg.attn_o_bias


@pytest.mark.parametrize("p", [13, 24])
def test_logits_router_and_experts_match(tiny, p):
    d, hf, model = tiny
    ids = ids_of(p=p)
    assert p > WINDOW
    out, _, cache = assert_parity(model, hf, ids)
    assert out.logits.abs().max() > 1.0  # O(1) logits: the comparison is sensitive
    # the checkpoint exercises what it should: non-zero sinks and biases, an active clamp
    attn, experts = model.blocks[0].attn, model.blocks[0].mlp.experts
    assert attn.sinks.abs().min() > 0 and attn.b_O.abs().max() > 0 and model.blocks[0].mlp.router.b_router.abs().max() > 0
    x = cache["blocks.0.ln2.hook_normalized"].reshape(-1, model.cfg.d_model)
    gate = torch.einsum("nd,eid->nei", x, experts.w_gate) + experts.b_gate
    up = torch.einsum("nd,eid->nei", x, experts.w_up) + experts.b_up
    assert (gate > 7).any() and (up.abs() > 7).any()
    assert cache["blocks.0.attn.hook_sink_weight"].mean() > 0.05


def test_left_padding_with_attention_mask(tiny):
    _, hf, model = tiny
    ids = ids_of(3, 12, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :1] = 0
    assert_parity(model, hf, ids, mask)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        alone = model(ids[:1, 5:])
    assert (full[0, 5:] - alone[0]).abs().max() < TOL


def test_fp32_and_grouped_expert_paths_equal_the_loop(tiny):
    d, _, _ = tiny
    ids = ids_of(4, 16)
    ref = HookedMoETransformer.from_pretrained(d, expert_impl="loop")
    with torch.no_grad():
        want = ref(ids)
        for impl in ("sorted", "grouped_mm"):
            got = HookedMoETransformer.from_pretrained(d, expert_impl=impl)(ids)
            assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("drop", ["clamp", "sinks", "window", "router_order"])
def test_negative_controls(tiny, drop):
    """Dropping one gpt-oss ingredient must break parity by a wide margin (the parity test can fail)."""
    d, hf, _ = tiny
    overrides = {"clamp": dict(swiglu_limit=math.inf), "window": dict(layer_types=None, sliding_window=None),
                 "router_order": dict(router_order="softmax_topk", norm_topk_prob=False)}.get(drop, {})
    wrong = HookedMoETransformer.from_pretrained(d, **overrides)
    if drop == "sinks":
        with torch.no_grad():
            for block in wrong.blocks:
                block.attn.sinks.fill_(-math.inf)  # exp(-inf) = 0: attention without sinks
    ids = ids_of(p=16)
    with torch.no_grad():
        assert (wrong(ids) - hf_run(hf, ids).logits).abs().max() > 1e-2


def test_sink_hook_and_window_in_the_pattern(tiny):
    _, _, model = tiny
    ids = ids_of(2, 10)
    with check_shapes(model), torch.no_grad():
        _, cache = model.run_with_cache(ids)
    assert set(cache.keys()) == set(model.hook_dict)
    for layer in range(4):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        sink = cache[f"blocks.{layer}.attn.hook_sink_weight"]
        assert sink.shape == (2, model.cfg.n_heads, 10)
        torch.testing.assert_close(pattern.sum(-1) + sink, torch.ones_like(sink))
        q, k = torch.arange(10)[:, None], torch.arange(10)[None, :]
        outside = (k > q) | ((q - k >= WINDOW) if layer % 2 == 0 else torch.zeros(10, 10, dtype=torch.bool))
        assert pattern[..., outside].abs().max() == 0
        if layer % 2:
            assert pattern[..., (q - k) >= WINDOW].max() > 0  # full layers see beyond the window


def test_editing_the_sink_weight_renormalises_over_tokens(tiny):
    """Setting hook_sink_weight to 0 is exactly attention without sinks (sink logit -inf)."""
    d, _, model = tiny
    ids = ids_of(2, 11)
    with torch.no_grad():
        edited = model.run_with_hooks(ids, fwd_hooks=[(lambda n: n.endswith("hook_sink_weight"),
                                                       lambda x, hook: torch.zeros_like(x))])
        no_sinks = HookedMoETransformer.from_pretrained(d)
        for block in no_sinks.blocks:
            block.attn.sinks.fill_(-math.inf)
        assert (edited - no_sinks(ids)).abs().max() < 1e-5
        assert (edited - model(ids)).abs().max() > 1e-2


def test_forced_routing_and_score_edits(tiny):
    _, _, model = tiny
    ids = ids_of(1, 6)
    forced = torch.tensor([5, 2, 7, 0])

    def force(x, hook):
        return forced.expand_as(x).clone()

    with torch.no_grad():
        _, cache = model.run_with_cache(ids, fwd_hooks=[("blocks.1.mlp.hook_expert_indices", force)])
    logits = cache["blocks.1.mlp.hook_router_logits"]
    want = torch.softmax(logits[..., forced], dim=-1)  # softmax over the forced experts' logits
    torch.testing.assert_close(cache["blocks.1.mlp.hook_expert_weights"], want)
    # hook_router_scores is the softmax over all experts; its renormalised top-k equals the weights
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    scores, idx = cache["blocks.1.mlp.hook_router_scores"], cache["blocks.1.mlp.hook_expert_indices"]
    top = scores.gather(-1, idx)
    torch.testing.assert_close(top / top.sum(-1, keepdim=True), cache["blocks.1.mlp.hook_expert_weights"])
    # gpt-oss selects from the logits: an edited score tensor would be ignored, so it is refused
    with pytest.raises(ValueError, match="hook_router_logits"):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.1.mlp.hook_router_scores", lambda x, hook: x * 0 + 1)])


def test_bf16_checkpoint_follows_transformers(tmp_path):
    save_tiny("gpt_oss", tmp_path, dtype=torch.bfloat16)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model = HookedMoETransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids = ids_of(2, 14, seed=3)
    out = hf_run(hf, ids)
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids)
    for layer in range(4):
        ours = cache[f"blocks.{layer}.mlp.hook_router_logits"]
        assert ours.dtype == torch.bfloat16
        theirs = out.router_logits[layer].view(2, 14, -1)
        assert (ours.float() - theirs.float()).abs().max() <= 0.1
        same = (cache[f"blocks.{layer}.mlp.hook_expert_indices"].sort(-1).values
                == torch.topk(theirs, 4, dim=-1).indices.sort(-1).values).all(-1)
        assert same.float().mean() >= 0.9
        assert cache[f"blocks.{layer}.mlp.hook_expert_weights"].dtype == torch.bfloat16  # softmax in bf16
    assert (logits.float() - out.logits.float()).abs().max() < 0.25


def test_meta_parameter_count_equals_transformers():
    import transformers

    hf_cfg = tiny_hf_config("gpt_oss")
    model = HookedMoETransformer.from_config(hf_cfg, seed=0)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    assert model.n_params() == sum(p.numel() for p in hf.parameters())


def test_config_errors():
    base = tiny_hf_config("gpt_oss").to_dict()
    base["architectures"] = ["GptOssForCausalLM"]
    with pytest.raises(UnsupportedConfigError, match="quant_method='gptq' is not handled"):
        translate_config({**base, "quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(UnsupportedConfigError, match="layer_types"):
        translate_config({**base, "layer_types": ["chunked_attention"] * 4})
    with pytest.raises(UnsupportedConfigError, match="layer_types"):
        translate_config({**base, "layer_types": ["full_attention"] * 3})
    # the class defaults (no rope parameters, no layer_types) translate like transformers' __post_init__
    cfg = translate_config({k: v for k, v in base.items() if k not in ("rope_parameters", "layer_types")})
    assert cfg.layer_types[:2] == ("sliding_attention", "full_attention") and cfg.rope_theta == 150000.0
    assert dict(cfg.rope_scaling)["factor"] == 32.0


# ----------------------------------------------------------------------------------------- MXFP4
MXFP4_QC = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def make_mxfp4_checkpoint(directory, seed=0, scale_range=(124, 129)):
    """A tiny gpt-oss checkpoint whose expert banks are random MXFP4 ``*_blocks``/``*_scales``."""
    save_tiny("gpt_oss", directory, dtype=torch.bfloat16)
    sd = load_file(directory / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for key in [k for k in sd if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, d_in, d_out = sd.pop(key).shape  # in-memory [E, in, out]; packed along `in`
        sd[key + "_blocks"] = torch.randint(0, 256, (e, d_out, d_in // 32, 16), dtype=torch.uint8, generator=gen)
        sd[key + "_scales"] = torch.randint(*scale_range, (e, d_out, d_in // 32), dtype=torch.uint8, generator=gen)
    save_file(sd, directory / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"] = MXFP4_QC
    (directory / "config.json").write_text(json.dumps(cfg))
    return sd


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_mxfp4_dequantisation_is_bit_exact(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(0, 256, (3, 40, 4), dtype=torch.uint8, generator=gen)  # every exponent, extremes too
    scales[0, 0] = torch.tensor([0, 127, 254, 255], dtype=torch.uint8)
    ours = mxfp4.dequantize_experts(blocks, scales, dtype)
    theirs = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=dtype)
    assert ours.shape == theirs.shape == (3, 128, 40) and ours.dtype == theirs.dtype == dtype
    bits = {torch.float32: torch.int32}.get(dtype, torch.int16)
    assert torch.equal(ours.view(bits), theirs.view(bits))
    # hand check of the format: low nibble first, E2M1 table, exponent - 127
    b = torch.zeros(1, 1, 1, 16, dtype=torch.uint8)
    b[..., 0] = 0x71  # low nibble 1 (+0.5), high nibble 7 (+6)
    b[..., 1] = 0xF9  # low nibble 9 (-0.5), high nibble 15 (-6)
    s = torch.full((1, 1, 1), 129, dtype=torch.uint8)  # x 4
    w = mxfp4.dequantize(b, s, torch.float32)[0, 0]
    assert w[:4].tolist() == [2.0, 24.0, -2.0, -24.0] and w[4:].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mxfp4_checkpoint_loads_like_transformers(tmp_path, dtype):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    make_mxfp4_checkpoint(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=dtype, quantization_config=Mxfp4Config(dequantize=True)
    ).eval()
    model = HookedMoETransformer.from_pretrained(tmp_path, dtype=dtype)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for layer in range(4):
        ex, theirs = model.blocks[layer].mlp.experts, hf.model.layers[layer].mlp.experts
        gate_up, down = theirs.gate_up_proj.data, theirs.down_proj.data
        assert gate_up.dtype == dtype
        assert torch.equal(ex.w_gate.transpose(1, 2).contiguous().view(bits), gate_up[..., 0::2].contiguous().view(bits))
        assert torch.equal(ex.w_up.transpose(1, 2).contiguous().view(bits), gate_up[..., 1::2].contiguous().view(bits))
        assert torch.equal(ex.w_down.transpose(1, 2).contiguous().view(bits), down.view(bits))
    if dtype == torch.float32:
        assert_parity(model, hf, ids_of(2, 12))


def test_mxfp4_bad_input(tmp_path):
    sd = make_mxfp4_checkpoint(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = {"quant_method": "awq"}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError, match="quant_method='awq' is not handled by moelens"):
        HookedMoETransformer.from_pretrained(tmp_path)
    cfg["quantization_config"] = MXFP4_QC
    cfg_path.write_text(json.dumps(cfg))
    key = "model.layers.1.mlp.experts.down_proj"
    good = sd[key + "_scales"]
    sd[key + "_scales"] = good[:, :, :0].contiguous() if good.shape[-1] == 1 else good[..., :-1].contiguous()
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(mxfp4.QuantizationError, match="do not match"):
        HookedMoETransformer.from_pretrained(tmp_path)
    sd.pop(key + "_scales")
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(mxfp4.QuantizationError, match="no partner"):
        HookedMoETransformer.from_pretrained(tmp_path)
    sd[key + "_scales"] = good
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg.pop("quantization_config")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no quantization_config"):
        HookedMoETransformer.from_pretrained(tmp_path)
    with pytest.raises(mxfp4.QuantizationError, match="do not match"):
        mxfp4.dequantize(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(mxfp4.QuantizationError, match="uint8"):
        mxfp4.dequantize(torch.zeros(2, 3, 16), torch.zeros(2, 3, dtype=torch.uint8))


def test_gpt_oss_120b_needs_two_h200s_in_bf16():
    """The device_map plan of docs/gpu.md: 217.6 GiB of bf16 weights, 18 blocks per H200."""
    from moelens.placement import infer_device_map, unit_sizes

    skeleton = HookedMoETransformer.from_config("gpt-oss-120b", device="meta", dtype=torch.bfloat16)
    total = sum(unit_sizes(skeleton).values())
    assert 217 * 2**30 < total < 218 * 2**30
    with pytest.raises(ValueError):
        infer_device_map(skeleton, {0: "131GiB"})  # one H200
    plan = infer_device_map(skeleton, {0: "120GiB", 1: "120GiB"}, strategy="balanced")
    on = lambda dev: sorted(int(k.split(".")[1]) for k, v in plan.items() if k.startswith("blocks.") and v == dev)  # noqa: E731
    assert on("cuda:0") == list(range(18)) and on("cuda:1") == list(range(18, 36))


def test_audit_effects_and_placement_on_gpt_oss(tiny):
    """The audit's batched ablations equal direct hooks on a sequence longer than the window, and
    an all-"cpu" device map with the device hooks gives exactly the plain model."""
    import torch.nn.functional as F

    from moelens import placement as P
    from moelens.audit import expert_effects

    d, _, model = tiny
    tokens = ids_of(1, 12, seed=5)[0]
    eff = expert_effects(model, tokens, layers=[0, 1], positions=[2, 9], max_batch=5)
    assert len(eff) == 2 * 2 * model.cfg.top_k

    def nll(logits):
        return F.cross_entropy(logits[0, :-1].float(), tokens[1:], reduction="none")

    with torch.no_grad():
        clean = nll(model(tokens[None]))
        for row in list(eff.itertuples())[::3]:
            def zero(w, hook, row=row):
                w = w.clone()
                w[0, row.position, row.slot] = 0
                return w

            hooked = model.run_with_hooks(tokens[None], fwd_hooks=[(f"blocks.{row.layer}.mlp.hook_expert_weights", zero)])
            delta = nll(hooked) - clean
            assert row.delta_next == pytest.approx(float(delta[row.position]), abs=1e-5)
            assert row.delta_suffix == pytest.approx(float(delta[row.position:].sum()), abs=1e-5)
    assert eff["delta_next"].abs().max() > 1e-3

    placed = HookedMoETransformer.from_pretrained(d, device_map={u: "cpu" for u in P.placement_units(model)})
    ids = ids_of(2, 11)
    with torch.no_grad():
        torch.testing.assert_close(placed(ids), model(ids), rtol=0, atol=0)


def test_tracing_past_the_window_equals_full_forwards(tiny):
    """Suffix engine (prefix K/V of earlier positions, window mask in absolute positions) vs one
    full forward per cell, on a prompt three windows long; restoring early positions matters."""
    import moelens
    from moelens import FactCase
    from moelens.testing import toy_tokenizer
    from moelens.tracing.trace import prepare

    _, _, model = tiny
    model.tokenizer = toy_tokenizer(256)
    case = FactCase("w5 w9 w14 w3 w77 w21 w8 w30 w31 w32 w33", "w9 w14", "w40", "w41")
    setup = prepare(model, case, seed=0, n_samples=2)
    assert setup.tokens.shape[1] >= 3 * WINDOW
    for kind in ("resid", "attn"):
        fast = moelens.trace_layers(model, setup, kind=kind, progress=False)
        ref = moelens.trace_layers(model, setup, kind=kind, engine="full", progress=False)
        assert (fast.scores - ref.scores).abs().max() < 1e-4
        assert (ref.scores - ref.corrupted).abs().max() > 1e-3


def test_mxfp4_blocks_and_scales_in_different_shards(tmp_path):
    """A sharded MXFP4 checkpoint whose *_blocks and *_scales sit in different shards loads like
    the single-file one."""
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    single.mkdir()
    sharded.mkdir()
    sd = make_mxfp4_checkpoint(single)
    first = {k: v for k, v in sd.items() if not k.endswith("_scales")}
    second = {k: v for k, v in sd.items() if k.endswith("_scales")}
    save_file(first, sharded / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(second, sharded / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in second})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (sharded / "config.json").write_text((single / "config.json").read_text())
    a = HookedMoETransformer.from_pretrained(single, dtype=torch.bfloat16)
    b = HookedMoETransformer.from_pretrained(sharded, dtype=torch.bfloat16)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
