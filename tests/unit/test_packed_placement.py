"""Packed sizes in placement and presets: the arithmetic of ``preset_summary``'s packed and unpacked
bytes against the meta-device model, the smallest GPU set of each, and ``device_map`` planning
of a ``keep_quantized=True`` load with the packed sizes."""

from __future__ import annotations

import math
import re

import pytest
import torch

from moelens import HookedMoETransformer, presets
from moelens.preset_models import preset_summary
from moelens.placement import GPU_CARDS, card_budget, smallest_gpu_set, unit_sizes
from moelens.quant.packed import FP8_PACKED, MXFP4_PACKED, packed_tensors, resident_bytes
from moelens.testing import save_fp8_copy, save_tiny

GIB = 1 << 30


def hand_packed_bytes(name: str) -> int:
    """Bytes of the packed model computed from the unpacked bf16 meta model: FP8 weights 1 byte per
    value + one fp32 scale per 128 x 128 block; MXFP4 banks 16 bytes per 32 values + 1 scale byte."""
    model = HookedMoETransformer.from_config(name, device="meta", dtype=torch.bfloat16)
    fmt = presets.get_preset(name)["quantization_config"]["quant_method"]
    rx = re.compile(FP8_PACKED if fmt == "fp8" else MXFP4_PACKED)
    total = sum(b.numel() * b.element_size() for b in model.buffers())
    for n, p in model.named_parameters():
        if not rx.fullmatch(n):
            total += p.numel() * p.element_size()
        elif fmt == "fp8":
            *lead, rows, cols = p.shape
            total += p.numel() + 4 * math.prod(lead) * math.ceil(rows / 128) * math.ceil(cols / 128)
        else:
            assert p.shape[-1] % 32 == 0
            total += p.numel() // 32 * 17
    return total


@pytest.mark.parametrize("name, fmt, packed_gpus, unpacked_gpus", [
    ("gpt-oss-120b", "mxfp4", "1 x H100 80GB", "2 x H200 141GB"),
    ("gpt-oss-20b", "mxfp4", "1 x H100 80GB", "1 x H100 80GB"),
    ("deepseek-v3", "fp8", "8 x H200 141GB", "16 x H200 141GB"),
    ("kimi-k2", "fp8", "8 x H200 141GB", "16 x H200 141GB"),
])
def test_preset_packed_sizes_and_gpu_sets(name, fmt, packed_gpus, unpacked_gpus):
    s = preset_summary(name)
    assert s["quantization"] == fmt
    assert s["bytes_packed"] == hand_packed_bytes(name)
    unpacked = HookedMoETransformer.from_config(name, device="meta", dtype=torch.bfloat16)
    assert s["bytes_unpacked"] == sum(p.numel() * p.element_size() for p in unpacked.parameters()) + sum(
        b.numel() * b.element_size() for b in unpacked.buffers())
    assert s["bytes_packed"] < 0.55 * s["bytes_unpacked"]
    assert (s["gpus_packed"], s["gpus_unpacked"]) == (packed_gpus, unpacked_gpus)


def test_plain_presets_have_no_packed_size():
    s = preset_summary("qwen3-30b-a3b")
    assert s["quantization"] is None and s["bytes_packed"] is None and s["gpus_packed"] is None
    assert s["gpus_unpacked"] == "1 x H100 80GB"


def test_smallest_gpu_set_respects_the_budgets():
    packed = HookedMoETransformer.from_config("kimi-k2", device="meta", dtype=torch.bfloat16, keep_quantized=True)
    plan = smallest_gpu_set(packed)
    budget = card_budget(GPU_CARDS["H200 141GB"])
    assert plan["n_gpus"] == 8 and plan["budget_per_gpu"] == budget
    assert all(b <= budget for b in plan["bytes_per_gpu"].values())
    assert sum(plan["bytes_per_gpu"].values()) == sum(unit_sizes(packed).values()) == resident_bytes(packed)
    # one card less does not hold it (so 8 is the smallest H200 count)
    with pytest.raises(ValueError):
        from moelens.placement import infer_device_map

        infer_device_map(packed, {i: budget for i in range(7)}, strategy="balanced")


def test_from_config_keep_quantized_needs_meta_and_a_quantised_config():
    with pytest.raises(ValueError, match="meta skeletons only"):
        HookedMoETransformer.from_config("gpt-oss-20b", keep_quantized=True)
    with pytest.raises(ValueError, match="no FP8 or MXFP4"):
        HookedMoETransformer.from_config("qwen3-30b-a3b", device="meta", keep_quantized=True)


def test_device_map_plans_with_packed_sizes(tmp_path):
    save_tiny("deepseek_v3", tmp_path / "v3", dtype=torch.bfloat16)
    save_fp8_copy(tmp_path / "v3", tmp_path / "fp8", block=(8, 8))
    meta = HookedMoETransformer.from_pretrained(tmp_path / "fp8", device="meta", dtype=torch.bfloat16, keep_quantized=True)
    packed_size = sum(unit_sizes(meta).values())
    unpacked_size = sum(unit_sizes(HookedMoETransformer.from_pretrained(
        tmp_path / "fp8", device="meta", dtype=torch.bfloat16)).values())
    assert packed_size < unpacked_size
    budget = {"cpu": packed_size + 1024}  # holds the packed model, not the dequantised one
    m = HookedMoETransformer.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16, keep_quantized=True,
                                             device_map="auto", max_memory=budget)
    assert set(m.device_map.values()) == {"cpu"} and packed_tensors(m)
    # as planned, up to the RoPE frequency buffer (recomputed in fp32 at allocation: a few bytes)
    assert 0 <= resident_bytes(m) - packed_size <= m.rope_inv_freq.numel() * 4
    with pytest.raises(ValueError):
        HookedMoETransformer.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16, device_map="auto", max_memory=budget)
