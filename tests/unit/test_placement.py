"""Multi-device placement on a CPU-only machine.

* planning: ``infer_device_map`` on tiny and real (meta-device) models, with fake devices;
* all-"cpu" device maps with the device hooks attached must give exactly the plain model;
* a genuine two-device run, "cpu" -> "meta": the second half of the model lives on the meta
  device, so every tensor (residual, AttentionContext cos/sin/key_mask) really has to be moved
  for the forward to run at all (values on meta are not computed, shapes and devices are).
"""

from __future__ import annotations

import pytest
import torch

from moelens import placement as P
from moelens.components.attention import AttentionContext
from moelens.model import HookedMoETransformer
from moelens.testing import tiny_hf_config

GIB = 2**30


def tiny_dict(name="qwen3_moe", **overrides) -> dict:
    cfg = tiny_hf_config(name, **overrides).to_dict()
    cfg["architectures"] = [type(tiny_hf_config(name)).__name__.replace("Config", "ForCausalLM")]
    return cfg


def tiny_meta(**overrides):
    return HookedMoETransformer.from_config(tiny_dict(**overrides), device="meta")


def all_cpu_map(model):
    return {u: "cpu" for u in P.placement_units(model)}


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 256, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding in row 0 -> a key_mask in the AttentionContext
    return toks, mask


# ---------------------------------------------------------------------------------------------- planning
def test_units_in_execution_order():
    m = tiny_meta(num_hidden_layers=4)
    assert P.placement_units(m) == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "ln_final", "unembed"]
    sizes = P.unit_sizes(m)
    assert list(sizes) == P.placement_units(m)
    assert sum(sizes.values()) == sum(p.numel() * 4 for p in m.parameters()) + m.rope_inv_freq.numel() * 4
    assert sizes["blocks.1"] > sizes["embed"] > sizes["ln_final"] > 0
    assert P.unit_sizes(m, dtype=torch.bfloat16)["blocks.1"] * 2 == sizes["blocks.1"]
    assert sizes["embed"] == m.embed.W_E.numel() * 4 + m.rope_inv_freq.numel() * 4  # root buffer goes with embed


def test_sequential_split_under_a_budget():
    m = tiny_meta(num_hidden_layers=4)
    sizes = P.unit_sizes(m)
    units = list(sizes)
    first_half = sum(sizes[u] for u in units[:3])  # embed, blocks.0, blocks.1
    plan = P.infer_device_map(m, {"cpu": first_half, "meta": 10 * GIB})
    assert list(plan) == units  # every unit assigned, order preserved
    assert [plan[u] for u in units] == ["cpu"] * 3 + ["meta"] * 4
    # exactly one unit too little: blocks.1 spills over
    plan = P.infer_device_map(m, {"cpu": first_half - 1, "meta": 10 * GIB})
    assert [plan[u] for u in units] == ["cpu"] * 2 + ["meta"] * 5


def test_pipeline_never_goes_backwards_and_budgets_hold():
    m = tiny_meta(num_hidden_layers=6)
    sizes = P.unit_sizes(m)
    block = sizes["blocks.1"]
    budgets = {"cuda:0": 2 * block + sizes["embed"], 1: 3 * block, "cuda:2": 10 * block}
    for strategy in ("sequential", "balanced"):
        plan = P.infer_device_map(m, budgets, strategy=strategy)
        order = ["cuda:0", "cuda:1", "cuda:2"]
        idx = [order.index(d) for d in plan.values()]
        assert idx == sorted(idx), (strategy, plan)
        for dev in order:
            assert sum(sizes[u] for u, d in plan.items() if d == dev) <= P._parse_memory(budgets)[dev]


def test_balanced_splits_evenly():
    m = tiny_meta(num_hidden_layers=8, mlp_only_layers=[])
    plan = P.infer_device_map(m, {0: 10 * GIB, 1: 10 * GIB}, strategy="balanced")
    blocks = [plan[f"blocks.{i}"] for i in range(8)]
    assert blocks == ["cuda:0"] * 4 + ["cuda:1"] * 4
    assert plan["embed"] == "cuda:0" and plan["unembed"] == "cuda:1"
    seq = P.infer_device_map(m, {0: 10 * GIB, 1: 10 * GIB})
    assert set(seq.values()) == {"cuda:0"}  # sequential fills the first device


def test_too_small_raises_with_sizes():
    m = tiny_meta()
    with pytest.raises(ValueError, match="GiB"):
        P.infer_device_map(m, {"cpu": 1000, "meta": 1000})
    with pytest.raises(ValueError, match="strategy"):
        P.infer_device_map(m, {"cpu": GIB}, strategy="greedy")
    assert P.infer_device_map(m, {"cpu": "1GiB"}) == P.infer_device_map(m, {"cpu": GIB})


def test_real_models_on_two_80gb_gpus():
    mixtral = HookedMoETransformer.from_config("mixtral-8x7b", device="meta", dtype=torch.bfloat16)
    sizes = P.unit_sizes(mixtral)
    rope = mixtral.rope_inv_freq.numel() * mixtral.rope_inv_freq.element_size()  # root buffer, counted in embed
    assert sum(sizes.values()) - rope == 2 * 46_702_792_704  # bf16 weights
    plan = P.infer_device_map(mixtral, {0: "70GiB", 1: "70GiB"}, strategy="balanced")
    per = {d: sum(sizes[u] for u, x in plan.items() if x == d) for d in ("cuda:0", "cuda:1")}
    assert abs(per["cuda:0"] - per["cuda:1"]) < sizes["blocks.0"] * 1.01
    assert [plan[f"blocks.{i}"] for i in range(32)] == ["cuda:0"] * 16 + ["cuda:1"] * 16
    with pytest.raises(ValueError):
        P.infer_device_map(mixtral, {0: "75GiB"})  # 87 GiB do not fit on one 80 GB card
    qwen3 = HookedMoETransformer.from_config("qwen3-30b-a3b", device="meta", dtype=torch.bfloat16)
    assert set(P.infer_device_map(qwen3, {0: "75GiB"}).values()) == {"cuda:0"}
    # sizing a float32 skeleton as bf16 gives the same plan
    fp32 = HookedMoETransformer.from_config("mixtral-8x7b", device="meta")
    assert P.infer_device_map(fp32, {0: "70GiB", 1: "70GiB"}, strategy="balanced", dtype=torch.bfloat16) == plan


def test_resolve_device_map_forms():
    m = tiny_meta()
    units = P.placement_units(m)
    assert P.resolve_device_map(m, "cpu") == {u: "cpu" for u in units}
    assert P.resolve_device_map(m, 1) == {u: "cuda:1" for u in units}
    mixed = P.resolve_device_map(m, {"": "cpu", "blocks": "meta", "blocks.0": "cpu"})
    assert mixed["embed"] == "cpu" and mixed["blocks.0"] == "cpu" and mixed["blocks.2"] == "meta"
    auto = P.resolve_device_map(m, "auto", max_memory={"cpu": GIB, "meta": GIB})
    assert list(auto) == units and set(auto.values()) <= {"cpu", "meta"}
    with pytest.raises(ValueError, match="does not place"):
        P.resolve_device_map(m, {"embed": "cpu", "blocks": "cpu"})
    with pytest.raises(ValueError, match="not placement units"):
        P.resolve_device_map(m, {"": "cpu", "blocks.7": "cpu"})
    assert set(P.resolve_device_map(m, "auto").values()) == {"cpu"}  # no GPU here: everything on CPU


def test_tied_embeddings_stay_together():
    m = tiny_meta(tie_word_embeddings=True)
    sizes = P.unit_sizes(m)
    assert sizes["unembed"] == 0  # counted once, in embed
    plan = P.infer_device_map(m, {"cpu": sizes["embed"] + 1, "meta": GIB})
    assert plan["embed"] == plan["unembed"] == "cpu"
    with pytest.raises(ValueError, match="tied"):
        P.resolve_device_map(m, {"": "cpu", "unembed": "meta"})
    P.materialize(m, {u: "cpu" for u in P.placement_units(m)})
    assert m.unembed.w_u is m.embed.W_E
    assert len(list(m.parameters())) == len({id(p) for p in m.parameters()})


# ---------------------------------------------------------------------------------------------- allocation
def test_materialize_places_every_unit_and_recomputes_rope():
    ref = HookedMoETransformer.from_config(tiny_dict(num_hidden_layers=4), device="cpu", seed=3)
    m = tiny_meta(num_hidden_layers=4)
    plan = {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "cpu", "blocks.2": "meta", "blocks.3": "meta",
            "ln_final": "meta", "unembed": "meta"}
    P.materialize(m, plan, dtype=torch.bfloat16)
    for name, p in m.named_parameters():
        unit = P._unit_of(name, plan)
        assert p.device.type == plan[unit], name
        assert p.dtype == torch.bfloat16
    assert m.rope_inv_freq.device.type == "cpu" and m.rope_inv_freq.dtype == torch.float32
    torch.testing.assert_close(m.rope_inv_freq, ref.rope_inv_freq, rtol=0, atol=0)
    assert m.device_map == plan
    with pytest.raises(ValueError, match="does not cover"):
        P.materialize(tiny_meta(), {"embed": "cpu"})


# ---------------------------------------------------------------------------------------------- running
def test_all_cpu_placement_equals_plain_model(tokens):
    toks, mask = tokens
    ref = HookedMoETransformer.from_config(tiny_dict(), device="cpu", seed=1)
    m = P.dispatch(tiny_meta(), all_cpu_map(ref), seed=1)
    assert len(getattr(m, P._HANDLES_ATTR)) == len(P.placement_units(m))
    torch.testing.assert_close(m(toks, attention_mask=mask), ref(toks, attention_mask=mask), rtol=0, atol=0)
    torch.testing.assert_close(m(toks, return_type="loss"), ref(toks, return_type="loss"), rtol=0, atol=0)
    out_ref, cache_ref = ref.run_with_cache(toks, attention_mask=mask)
    out, cache = m.run_with_cache(toks, attention_mask=mask)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    assert set(cache.keys()) == set(cache_ref.keys())
    for key in cache_ref.keys():
        torch.testing.assert_close(cache[key], cache_ref[key], rtol=0, atol=0)
    # hook-based interventions still work, and reset_hooks does not remove the device hooks
    def kill_expert_weights(w, hook):
        return torch.zeros_like(w)

    name = "blocks.1.mlp.hook_expert_weights"
    patched = m.run_with_hooks(toks, fwd_hooks=[(name, kill_expert_weights)])
    patched_ref = ref.run_with_hooks(toks, fwd_hooks=[(name, kill_expert_weights)])
    torch.testing.assert_close(patched, patched_ref, rtol=0, atol=0)
    m.reset_hooks()
    assert len(getattr(m, P._HANDLES_ATTR)) == len(P.placement_units(m))
    # partial runs
    mid = m(toks, stop_at_layer=2)
    torch.testing.assert_close(mid, ref(toks, stop_at_layer=2), rtol=0, atol=0)
    torch.testing.assert_close(m(mid, start_at_layer=2), ref(mid, start_at_layer=2), rtol=0, atol=0)


def test_genuine_two_device_pipeline_cpu_to_meta(tokens):
    """First half on "cpu", second half on "meta": nothing runs unless the hooks move the
    residual and the AttentionContext to the meta device (meta cannot run MoE routing, so the
    meta half is dense layers)."""
    toks, mask = tokens
    cfg = tiny_dict(num_hidden_layers=4, mlp_only_layers=[2, 3])
    plan = {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "cpu", "blocks.2": "meta", "blocks.3": "meta",
            "ln_final": "meta", "unembed": "meta"}
    m = P.dispatch(HookedMoETransformer.from_config(cfg, device="meta"), plan, seed=0)
    ref = HookedMoETransformer.from_config(cfg, device="cpu", seed=0)
    logits, cache = m.run_with_cache(toks, attention_mask=mask)
    assert logits.device.type == "meta" and logits.shape == (2, 9, 256)
    assert cache["blocks.1.hook_resid_post"].device.type == "cpu"
    assert cache["blocks.2.hook_resid_pre"].device.type == "meta"
    assert cache["blocks.3.attn.hook_rot_q"].device.type == "meta"
    assert cache["ln_final.hook_normalized"].device.type == "meta"
    # the cpu half computed real numbers, equal to the plain model's
    _, cache_ref = ref.run_with_cache(toks, attention_mask=mask)
    torch.testing.assert_close(cache["blocks.1.hook_resid_post"], cache_ref["blocks.1.hook_resid_post"], rtol=0, atol=0)
    # run_with_cache(device=...) gathers the cache on one device
    _, cpu_cache = m.run_with_cache(toks, attention_mask=mask, device="meta")
    assert cpu_cache["blocks.0.hook_resid_post"].device.type == "meta"
    # negative control: without the device hooks the forward fails at the device boundary
    P.remove_device_hooks(m)
    with pytest.raises(RuntimeError, match="device"):
        m(toks, attention_mask=mask)


def test_move_to_device_handles_context_and_kv_prefix():
    ctx = AttentionContext(cos=torch.ones(1, 4, 2), sin=torch.zeros(1, 4, 2),
                           key_mask=torch.ones(1, 4, dtype=torch.bool), q_offset=3)
    meta = torch.device("meta")
    moved = P.move_to_device(ctx, meta)
    assert isinstance(moved, AttentionContext) and moved.q_offset == 3
    assert moved.cos.is_meta and moved.sin.is_meta and moved.key_mask.is_meta
    assert not ctx.cos.is_meta  # the original is untouched
    assert P.move_to_device(ctx, meta) is moved  # one copy per device and forward
    assert P.move_to_device(moved, meta) is moved
    no_mask = AttentionContext(cos=torch.ones(1, 4, 2), sin=torch.zeros(1, 4, 2), key_mask=None)
    assert P.move_to_device(no_mask, meta).key_mask is None
    args = (torch.ones(2), ctx, (torch.ones(3), torch.ones(3)))
    out = P.move_to_device(args, meta)
    assert out[0].is_meta and out[1].cos.is_meta and all(t.is_meta for t in out[2])
    assert P.move_to_device({"kv_prefix": None, "x": torch.ones(1)}, meta)["x"].is_meta


def test_attach_is_idempotent_and_removable(tokens):
    toks, _ = tokens
    m = P.dispatch(tiny_meta(), "cpu", seed=0)
    n = len(P.placement_units(m))
    P.attach_device_hooks(m, m.device_map)
    assert len(getattr(m, P._HANDLES_ATTR)) == n
    assert sum(len(mod._forward_pre_hooks) for mod in m.modules()) == n
    P.remove_device_hooks(m)
    assert sum(len(mod._forward_pre_hooks) for mod in m.modules()) == 0
    m(toks)


def _blocks_per_device(plan):
    out = {}
    for unit, dev in plan.items():
        if unit.startswith("blocks."):
            out[dev] = out.get(dev, 0) + 1
    return out


def test_v3_family_plans_of_docs_gpu():
    """The plans quoted in docs/gpu.md §4 (bf16 skeletons of the presets)."""
    air = HookedMoETransformer.from_config("glm-4.5-air", device="meta", dtype=torch.bfloat16)
    plan = P.infer_device_map(air, {0: "125GiB", 1: "125GiB"}, strategy="balanced")
    assert _blocks_per_device(plan) == {"cuda:0": 23, "cuda:1": 23}
    plan = P.infer_device_map(air, {i: "70GiB" for i in range(3)}, strategy="balanced")
    assert _blocks_per_device(plan) == {"cuda:0": 16, "cuda:1": 15, "cuda:2": 15}
    flash = HookedMoETransformer.from_config("glm-4.7-flash", device="meta", dtype=torch.bfloat16)
    assert set(P.infer_device_map(flash, {0: "70GiB"}).values()) == {"cuda:0"}
    # the router stays fp32 in a bf16 skeleton (as transformers keeps it), and is sized so
    assert flash.blocks[1].mlp.router.W_router.dtype == torch.float32
    v3 = HookedMoETransformer.from_config("deepseek-v3", device="meta", dtype=torch.bfloat16)
    plan = P.infer_device_map(v3, {**{i: "125GiB" for i in range(8)}, "cpu": "400GiB"})
    assert _blocks_per_device(plan) == {"cuda:0": 8, **{f"cuda:{i}": 5 for i in range(1, 8)}, "cpu": 18}
    with pytest.raises(ValueError, match="Cannot place"):
        P.infer_device_map(v3, {i: "125GiB" for i in range(8)})


def test_v3_family_all_cpu_placement_equals_plain_model(tokens):
    toks, mask = tokens
    ref = HookedMoETransformer.from_config(tiny_dict("deepseek_v3"), device="cpu", seed=1)
    skeleton = HookedMoETransformer.from_config(tiny_dict("deepseek_v3"), device="meta")
    m = P.dispatch(skeleton, all_cpu_map(ref), seed=1)
    torch.testing.assert_close(m(toks, attention_mask=mask), ref(toks, attention_mask=mask), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gemma4", "llama4", "flex_olmo"])
def test_new_families_all_cpu_placement_equals_plain_model(tokens, name):
    """Gemma 4's second RoPE table (full-attention layers) is recomputed on placement like the first."""
    from moelens.testing import TINY_CONFIGS

    toks, mask = tokens
    cfg = {**tiny_hf_config(name).to_dict(), "architectures": [TINY_CONFIGS[name][1]]}
    ref = HookedMoETransformer.from_config(cfg, device="cpu", seed=1)
    skeleton = HookedMoETransformer.from_config(cfg, device="meta")
    m = P.dispatch(skeleton, all_cpu_map(ref), seed=1)
    torch.testing.assert_close(m(toks, attention_mask=mask), ref(toks, attention_mask=mask), rtol=0, atol=0)
