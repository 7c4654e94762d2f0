"""``from_pretrained(..., keep_quantized=True)``: FP8-block and MXFP4 weights kept packed and
dequantised one expert at a time, bit-identical to the default (dequantise at load) in fp32 and
bf16, with the resident bytes of the checkpoint; dequantisation checked against transformers' own."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors import safe_open

import moelens
from moelens import FactCase, HookedMoETransformer
from moelens.analysis.expert_dla import expert_weight_lens
from moelens.loading import CheckpointError
from moelens.quant.fp8 import Fp8BlockFormat
from moelens.quant.packed import PackedAccessError, PackedTensor, dequantize_fp8, packed_tensors, resident_bytes
from moelens.testing import fp8_quantize_block, save_fp8_copy, save_mxfp4_copy, save_tiny, toy_tokenizer

warnings.filterwarnings("ignore", message=".*RoPE scaling factor.*")

CASE = FactCase("w5 w9 w14 w3 w77 w21 w8", "w14 w3", "w40", "w41")


def file_bytes(directory) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A bf16 DeepSeek-V3 checkpoint in FP8 blocks (attention, dense, shared and routed experts) and
    a bf16 gpt-oss checkpoint with MXFP4 expert banks, both quantised from sharpened tiny models."""
    root = tmp_path_factory.mktemp("packed")
    save_tiny("deepseek_v3", root / "v3", dtype=torch.bfloat16)
    save_fp8_copy(root / "v3", root / "fp8", block=(8, 8))
    save_tiny("gpt_oss", root / "oss", dtype=torch.bfloat16)
    save_mxfp4_copy(root / "oss", root / "mxfp4")
    return {"fp8": root / "fp8", "mxfp4": root / "mxfp4"}


def ids(b=2, p=9, seed=0):
    return torch.randint(0, 250, (b, p), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_equals_dequantised_bit_for_bit(checkpoints, fmt, dtype):
    d = checkpoints[fmt]
    ref = HookedMoETransformer.from_pretrained(d, dtype=dtype)
    packed = HookedMoETransformer.from_pretrained(d, dtype=dtype, keep_quantized=True)
    banks = [n for n, p in packed_tensors(packed).items() if p.n_lead]
    assert banks and all(".experts." in n for n in banks)
    if fmt == "fp8":  # the other projections are packed too
        assert {"blocks.0.attn.W_q_b", "blocks.0.mlp.w_down", "blocks.1.mlp.shared_experts.w_up"} <= set(packed_tensors(packed))
    with torch.no_grad():
        la, ca = ref.run_with_cache(ids())
        lb, cb = packed.run_with_cache(ids())
    assert set(ca) == set(cb)
    assert torch.equal(la, lb)
    for name in ca:  # router logits, chosen experts, expert outputs ... every hook
        assert torch.equal(ca[name], cb[name]), name
    assert ref.n_params() == packed.n_params() and ref.n_params(active=True) == packed.n_params(active=True)


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_resident_bytes_are_the_checkpoints(checkpoints, fmt):
    d = checkpoints[fmt]
    packed = HookedMoETransformer.from_pretrained(d, dtype=torch.bfloat16, keep_quantized=True)
    ref = HookedMoETransformer.from_pretrained(d, dtype=torch.bfloat16)
    assert resident_bytes(packed) <= 1.1 * file_bytes(d)
    # the measure can fail: the dequantised model holds the experts in bf16 (2 bytes vs 1 or 0.53)
    assert resident_bytes(ref) > 1.2 * file_bytes(d)


def test_fp8_experts_equal_transformers_dequantisation(checkpoints):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    d = checkpoints["fp8"]
    for dtype in (torch.float32, torch.bfloat16):
        m = HookedMoETransformer.from_pretrained(d, dtype=dtype, keep_quantized=True)
        bank = m.blocks[1].mlp.experts.w_down
        with safe_open(d / "model.safetensors", "pt") as f:
            for e in (0, 5):
                key = f"model.layers.1.mlp.experts.{e}.down_proj.weight"
                ref = Fp8Dequantize(None)._dequantize_one(f.get_tensor(key), f.get_tensor(key + "_scale_inv"),
                                                          output_dtype=dtype)
                assert bank[e].dtype == dtype and torch.equal(bank[e], ref)
            key = "model.layers.2.self_attn.kv_b_proj.weight"
            ref = Fp8Dequantize(None)._dequantize_one(f.get_tensor(key), f.get_tensor(key + "_scale_inv"),
                                                      output_dtype=dtype)
        assert torch.equal(m.blocks[2].attn.W_kv_b, ref)  # a packed matrix reads as the dequantised tensor


def test_mxfp4_experts_equal_transformers_dequantisation(checkpoints):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    d = checkpoints["mxfp4"]
    m = HookedMoETransformer.from_pretrained(d, dtype=torch.bfloat16, keep_quantized=True)
    ex = m.blocks[1].mlp.experts
    with safe_open(d / "model.safetensors", "pt") as f:
        p = "model.layers.1.mlp.experts."
        gate_up = convert_moe_packed_tensors(f.get_tensor(p + "gate_up_proj_blocks"), f.get_tensor(p + "gate_up_proj_scales"),
                                             dtype=torch.bfloat16)  # [E, in, 2 I]
        down = convert_moe_packed_tensors(f.get_tensor(p + "down_proj_blocks"), f.get_tensor(p + "down_proj_scales"),
                                          dtype=torch.bfloat16)  # [E, I, d_model]
    for e in range(ex.n_experts):
        assert torch.equal(ex.w_gate[e], gate_up[e][:, 0::2].T)
        assert torch.equal(ex.w_up[e], gate_up[e][:, 1::2].T)
        assert torch.equal(ex.w_down[e], down[e].T)


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_one_expert_dequantised_at_a_time(checkpoints, fmt, monkeypatch):
    m = HookedMoETransformer.from_pretrained(checkpoints[fmt], keep_quantized=True)
    seen = []
    original = PackedTensor._dequantize

    def spy(self, a, b):
        out = original(self, a, b)
        seen.append((self.name, tuple(out.shape)))
        return out

    monkeypatch.setattr(PackedTensor, "_dequantize", spy)
    with torch.no_grad():
        m(ids())
    expert_calls = [s for n, s in seen if ".experts." in n]
    assert expert_calls and all(len(s) == 2 for s in expert_calls)  # [out, in]: one expert, never the bank


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_hooks_generate_tracing_and_attribution_unchanged(checkpoints, fmt):
    ref = HookedMoETransformer.from_pretrained(checkpoints[fmt])
    packed = HookedMoETransformer.from_pretrained(checkpoints[fmt], keep_quantized=True)
    layer = ref.cfg.moe_layers[0]
    for m in (ref, packed):
        m.tokenizer = toy_tokenizer(256)
    tokens = ids(1, 6)

    def force(idx, hook):  # forced routing
        return torch.zeros_like(idx)

    hooks = [(f"blocks.{layer}.mlp.hook_expert_indices", force)]
    with torch.no_grad():
        assert torch.equal(ref.run_with_hooks(tokens, fwd_hooks=hooks), packed.run_with_hooks(tokens, fwd_hooks=hooks))
    gen = [m.generate(tokens, max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False) for m in (ref, packed)]
    assert torch.equal(*gen)
    z = torch.randn(2, 2, ref.cfg.d_model, generator=torch.Generator().manual_seed(1))
    a, b = (moelens.trace_experts(m, CASE, layer, noise=z) for m in (ref, packed))
    assert torch.equal(a.scores, b.scores)
    a, b = (moelens.attribute_experts(m, CASE, noise=z) for m in (ref, packed))
    assert torch.equal(a.scores.nan_to_num(), b.scores.nan_to_num())


def test_weight_lens_dequantises_per_expert_and_whole_bank_use_is_refused(checkpoints):
    ref = HookedMoETransformer.from_pretrained(checkpoints["mxfp4"])
    packed = HookedMoETransformer.from_pretrained(checkpoints["mxfp4"], keep_quantized=True)
    a, b = (expert_weight_lens(m, 1, experts=[0, 3], k=3) for m in (ref, packed))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    bank = packed.blocks[1].mlp.experts.w_down
    assert bank.shape == ref.blocks[1].mlp.experts.w_down.shape
    with pytest.raises(PackedAccessError, match=r"kept packed.*Index it per expert"):
        bank.transpose(1, 2)
    with pytest.raises(ValueError, match="grouped_mm.*kept packed"):
        HookedMoETransformer.from_pretrained(checkpoints["mxfp4"], keep_quantized=True, expert_impl="grouped_mm")(ids())


def test_dtype_change_keeps_the_packed_bytes(checkpoints):
    m = HookedMoETransformer.from_pretrained(checkpoints["fp8"], keep_quantized=True)
    before = resident_bytes(m)
    m.to(torch.bfloat16)
    bank = m.blocks[1].mlp.experts.w_up
    assert bank.q.dtype == torch.float8_e4m3fn and bank[0].dtype == torch.bfloat16
    ref = HookedMoETransformer.from_pretrained(checkpoints["fp8"], dtype=torch.bfloat16)
    assert torch.equal(bank[2], ref.blocks[1].mlp.experts.w_up[2])
    assert resident_bytes(m) < before  # only the unpacked (fp32 -> bf16) tensors shrank


def test_plain_checkpoint_refused(tmp_path):
    save_tiny("qwen3_moe", tmp_path)
    with pytest.raises(CheckpointError, match="nothing to keep packed"):
        HookedMoETransformer.from_pretrained(tmp_path, keep_quantized=True)


@pytest.mark.parametrize("shape, block", [((64, 96), (32, 32)), ((3, 48, 40), (16, 8)), ((40, 72), (16, 64))])
def test_vectorised_fp8_dequantisation_equals_the_loaders(shape, block):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g)
    flat = w.reshape(-1, shape[-1]) if len(shape) == 2 else w
    pairs = [fp8_quantize_block(m, block) for m in (flat if len(shape) == 3 else [flat])]
    q, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    for dtype in (torch.float32, torch.bfloat16):
        ours = dequantize_fp8(q, s, block, dtype)
        theirs = torch.stack([Fp8BlockFormat(block=block).dequantize("w", q[i], s[i], dtype) for i in range(len(q))])
        assert torch.equal(ours, theirs)


def test_fingerprints_see_the_packed_weights(checkpoints):
    from moelens.tracing.fingerprint import parameter_checksum
    from moelens.tracing.trace import weights_state

    m = HookedMoETransformer.from_pretrained(checkpoints["mxfp4"], keep_quantized=True)
    before, state = parameter_checksum(m), weights_state(m)
    with torch.no_grad():
        m.blocks[1].mlp.experts.w_down.scales[3, 0, 0] += 1  # an edit of one expert's packed scale
    assert parameter_checksum(m) != before and weights_state(m) != state


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_scales_in_another_shard(checkpoints, fmt, tmp_path):
    """A sharded checkpoint whose scales sit in another shard than their weights loads packed alike."""
    import json

    from safetensors.torch import save_file

    src = checkpoints[fmt]
    with safe_open(src / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    scales = {k: v for k, v in tensors.items() if k.endswith(("_scale_inv", "_scales"))}
    rest = {k: v for k, v in tensors.items() if k not in scales}
    assert scales
    save_file(rest, tmp_path / "model-00001-of-00002.safetensors")
    save_file(scales, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {**{k: "model-00001-of-00002.safetensors" for k in rest},
                            **{k: "model-00002-of-00002.safetensors" for k in scales}}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    a = HookedMoETransformer.from_pretrained(tmp_path, keep_quantized=True)
    b = HookedMoETransformer.from_pretrained(src, keep_quantized=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_deepcopy_and_device_move_keep_the_packed_model(checkpoints):
    import copy

    m = HookedMoETransformer.from_pretrained(checkpoints["fp8"], keep_quantized=True)
    twin = copy.deepcopy(m)
    assert packed_tensors(twin).keys() == packed_tensors(m).keys()
    moved = twin.to("cpu")  # a device move keeps the packed bytes (no dtype change)
    assert moved.blocks[1].mlp.experts.w_gate.q.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        assert torch.equal(m(ids()), twin(ids()))
