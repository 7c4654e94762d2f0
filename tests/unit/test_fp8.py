"""FP8 block-quantised checkpoints: dequantised while loading, bit-identical to transformers'
``Fp8Dequantize`` (``integrations/finegrained_fp8.py``), with clear errors for bad input."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moelens import HookedMoETransformer
from moelens.loading import CheckpointError
from moelens.quant import QuantFormatError
from moelens.quant.fp8 import Fp8BlockFormat
from moelens.testing import fp8_quantize_block, save_fp8_copy, save_tiny

warnings.filterwarnings("ignore", message=".*RoPE scaling factor.*")


def hf_dequantize(q, s, dtype):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=dtype)


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    plain, fp8 = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("fp8")
    save_tiny("deepseek_v3", plain)
    keys = save_fp8_copy(plain, fp8, block=(8, 8))  # every tiny dim is a multiple of 8: several blocks each
    return plain, fp8, keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_weights_equal_transformers_dequantisation(fp8_pair, dtype):
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    _, fp8, keys = fp8_pair
    assert any(".experts." in k for k in keys) and any("kv_b_proj" in k for k in keys)
    hf = AutoModelForCausalLM.from_pretrained(fp8, quantization_config=FineGrainedFP8Config(dequantize=True),
                                              dtype=dtype).eval()
    m = HookedMoETransformer.from_pretrained(fp8, dtype=dtype)
    ours, ref = m.state_dict(), hf.state_dict()
    pairs = {"blocks.1.attn.W_q_b": "model.layers.1.self_attn.q_b_proj.weight",
             "blocks.2.attn.W_kv_a": "model.layers.2.self_attn.kv_a_proj_with_mqa.weight",
             "blocks.0.mlp.w_down": "model.layers.0.mlp.down_proj.weight",
             "blocks.1.mlp.experts.w_down": "model.layers.1.mlp.experts.down_proj",
             "blocks.2.mlp.shared_experts.w_up": "model.layers.2.mlp.shared_experts.up_proj.weight",
             "blocks.1.mlp.router.W_router": "model.layers.1.mlp.gate.weight"}
    for a, b in pairs.items():
        assert ours[a].dtype == ref[b].dtype and torch.equal(ours[a], ref[b]), a
    gate_up = ref["model.layers.2.mlp.experts.gate_up_proj"]
    assert torch.equal(torch.cat([ours["blocks.2.mlp.experts.w_gate"], ours["blocks.2.mlp.experts.w_up"]], 1), gate_up)
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(tokens).logits.float() - m(tokens).float()).abs().max().item()
    assert diff < (1e-4 if dtype == torch.float32 else 2e-2)


def test_dequantised_model_differs_from_the_unquantised_one(fp8_pair):
    """The FP8 copy really is quantised (so the equality above is not a plain copy)."""
    plain, fp8, _ = fp8_pair
    a = HookedMoETransformer.from_pretrained(plain).blocks[1].attn.W_q_b
    b = HookedMoETransformer.from_pretrained(fp8).blocks[1].attn.W_q_b
    assert 0 < (a - b).abs().max() < 0.1 * a.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, grid, scale_dtype", [
    ((256, 384), (2, 3), torch.float32),   # the standard 128 x 128 blocks
    ((64, 96), (64, 3), torch.float32),    # [1, 32] blocks, inferred from the grid
    ((48, 40), (3, 5), torch.bfloat16),
    ((256, 128), (2, 1), torch.uint8),     # UE8M0 exponents stored as bytes
])
def test_dequantize_bitwise_equals_transformers(shape, grid, scale_dtype, dtype):
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(shape, generator=g) * 100).to(torch.float8_e4m3fn)
    if scale_dtype == torch.uint8:
        s = torch.randint(110, 135, grid, generator=g, dtype=torch.uint8)
    else:
        s = (torch.rand(grid, generator=g) * 1e-2).to(scale_dtype)
    for block in (None, (128, 128)):
        ours = Fp8BlockFormat(block=block).dequantize("w", q, s, dtype)
        assert ours.dtype == dtype and torch.equal(ours, hf_dequantize(q, s, dtype))


@pytest.mark.parametrize("rows", [201, 200])
def test_partial_edge_blocks_follow_deepseeks_ceil_grid(rows):
    """A weight that is not a multiple of the block (DeepSeek-V3's kv_a_proj_with_mqa has 576 rows):
    its last row/column blocks are partial and reuse their block's scale (DeepSeek pads before
    quantising). transformers infers the block from the grid instead: it refuses 201 rows (not a
    multiple of 2) and reads 200 rows as blocks of 100 (the documented difference)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(rows, 72, generator=g)
    q, s = fp8_quantize_block(w, (128, 64))
    assert s.shape == (2, 2)
    ours = Fp8BlockFormat(block=(128, 64)).dequantize("w", q, s, torch.float32)
    r = torch.arange(rows)[:, None] // 128
    c = torch.arange(72)[None, :] // 64
    assert torch.equal(ours, q.float() * s[r, c])
    assert (ours - w).abs().max() < 0.07 * w.abs().max()
    if rows % 2:
        with pytest.raises(ValueError, match="not divisible"):
            hf_dequantize(q, s, torch.float32)
    else:
        assert not torch.equal(hf_dequantize(q, s, torch.float32), ours)
    # without weight_block_size in the config, the grid must divide the weight
    if rows % 2:
        with pytest.raises(QuantFormatError, match="grid"):
            Fp8BlockFormat(block=None).dequantize("w", q, s, torch.float32)


def test_scale_in_another_shard(fp8_pair, tmp_path):
    _, fp8, keys = fp8_pair
    tensors = {}
    with safe_open(fp8 / "model.safetensors", "pt") as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    scales = {k: v for k, v in tensors.items() if k.endswith("_scale_inv")}
    rest = {k: v for k, v in tensors.items() if k not in scales}
    save_file(rest, tmp_path / "model-00001-of-00002.safetensors")
    save_file(scales, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {**{k: "model-00001-of-00002.safetensors" for k in rest},
                            **{k: "model-00002-of-00002.safetensors" for k in scales}}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((fp8 / "config.json").read_text())
    a = HookedMoETransformer.from_pretrained(tmp_path).state_dict()
    b = HookedMoETransformer.from_pretrained(fp8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ bad input
def _copy(src, dst):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


def _edit(directory, fn):
    path = directory / "model.safetensors"
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fn(tensors)
    save_file(tensors, path)


def test_unsupported_quant_method(fp8_pair, tmp_path):
    _copy(fp8_pair[1], tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantFormatError, match="quant_method='awq'.*supported: fp8"):
        HookedMoETransformer.from_pretrained(tmp_path)
    # the skeleton still builds on the meta device (no weights read)
    assert HookedMoETransformer.from_pretrained(tmp_path, device="meta").n_params() > 0


def test_static_activation_scales_are_refused(fp8_pair, tmp_path):
    _copy(fp8_pair[1], tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["activation_scheme"] = "static"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantFormatError, match="activation_scheme"):
        HookedMoETransformer.from_pretrained(tmp_path)


def test_scales_of_the_wrong_grid(fp8_pair, tmp_path):
    _copy(fp8_pair[1], tmp_path)
    key = "model.layers.1.self_attn.q_b_proj.weight_scale_inv"

    def bad(t):
        t[key] = torch.ones(5, 5)

    _edit(tmp_path, bad)
    with pytest.raises(QuantFormatError, match=r"q_b_proj.weight.*grid \(5, 5\).*\(96, 48\)"):
        HookedMoETransformer.from_pretrained(tmp_path)


def test_fp8_weight_without_its_scale(fp8_pair, tmp_path):
    _copy(fp8_pair[1], tmp_path)
    _edit(tmp_path, lambda t: t.pop("model.layers.1.self_attn.q_b_proj.weight_scale_inv"))
    with pytest.raises(QuantFormatError, match="q_b_proj.weight: an FP8 tensor without"):
        HookedMoETransformer.from_pretrained(tmp_path)


def test_scale_without_its_weight(fp8_pair, tmp_path):
    _copy(fp8_pair[1], tmp_path)
    _edit(tmp_path, lambda t: t.__setitem__("model.layers.1.self_attn.bogus.weight_scale_inv", torch.ones(1, 1)))
    with pytest.raises(CheckpointError, match="unexpected.*bogus.weight_scale_inv"):
        HookedMoETransformer.from_pretrained(tmp_path)


def test_correction_bias_of_the_wrong_size(fp8_pair, tmp_path):
    _copy(fp8_pair[0], tmp_path)
    _edit(tmp_path, lambda t: t.__setitem__("model.layers.1.mlp.gate.e_score_correction_bias", torch.zeros(15)))
    with pytest.raises(CheckpointError, match=r"e_score_correction_bias: checkpoint shape \(15,\), expected \(16,\)"):
        HookedMoETransformer.from_pretrained(tmp_path)
