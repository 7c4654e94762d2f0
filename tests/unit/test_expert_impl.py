"""The expert implementation is chosen by device (``expert_impl="auto"``): grouped kernels on CUDA,
the per-expert ``sorted`` path on CPU; the GPU path never synchronises with the host, counted on
CPU by running it under :class:`moelens.testing.gpu_code_path` with :class:`count_host_syncs`."""

from __future__ import annotations

import pytest
import torch

from moelens import HookedMoETransformer
from moelens.components.experts import grouped_mm_available
from moelens.testing import count_host_syncs, gpu_code_path

ARCHS = ["qwen3_moe", "gpt_oss", "deepseek_v3", "qwen2_moe"]


def ids(b=2, p=7, seed=0):
    return torch.randint(0, 250, (b, p), generator=torch.Generator().manual_seed(seed))


def test_auto_picks_by_device():
    cpu = torch.device("cpu")
    assert not grouped_mm_available(cpu, torch.bfloat16) and not grouped_mm_available(cpu, torch.float32)
    m = HookedMoETransformer.from_config({"architectures": ["Qwen3MoeForCausalLM"], **_tiny_qwen3()}, seed=0)
    experts = m.blocks[m.cfg.moe_layers[0]].mlp.experts
    assert m.cfg.expert_impl == "auto" and experts.resolved_impl(torch.zeros(1)) == "sorted"
    with gpu_code_path():
        assert experts.resolved_impl(torch.zeros(1)) == ("grouped_mm" if hasattr(torch, "_grouped_mm") else "sorted")
    assert experts.resolved_impl(torch.zeros(1)) == "sorted"  # the flag is scoped
    forced = HookedMoETransformer.from_config(m.cfg, expert_impl="loop").blocks[m.cfg.moe_layers[0]].mlp.experts
    with gpu_code_path():
        assert forced.resolved_impl(torch.zeros(1)) == "loop"  # an explicit choice is kept


def _tiny_qwen3():
    from moelens.testing import tiny_hf_config

    return tiny_hf_config("qwen3_moe").to_dict()


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_path_has_no_host_sync(arch, tiny_dirs):
    d, _ = tiny_dirs(arch)
    model = HookedMoETransformer.from_pretrained(d)
    with torch.no_grad(), gpu_code_path(), count_host_syncs() as gpu:
        model(ids())
        model.run_with_cache(ids())  # every hook cached: the hook checks stay on the device too
    assert gpu.calls == [], f"host syncs on the GPU path: {gpu.calls}"
    # the counter sees the sorted path's per-layer count read-back (so the zero above can fail)
    with torch.no_grad(), count_host_syncs() as cpu:
        model(ids())
    assert len(cpu.calls) >= len(model.cfg.moe_layers) and "Tensor.tolist" in cpu.calls


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
@pytest.mark.parametrize("arch", ["gpt_oss", "deepseek_v3"])
def test_gpu_path_equals_the_reference_loop(arch, tiny_dirs):
    d, _ = tiny_dirs(arch)
    ref = HookedMoETransformer.from_pretrained(d, expert_impl="loop")
    auto = HookedMoETransformer.from_pretrained(d)
    with torch.no_grad():
        b, cb = ref.run_with_cache(ids())
        with gpu_code_path():
            a, ca = auto.run_with_cache(ids())
    assert (a - b).abs().max() < 1e-5
    for l in ref.cfg.moe_layers:
        key = f"blocks.{l}.mlp.hook_expert_out"
        assert (ca[key] - cb[key]).abs().max() < 1e-5
        assert torch.equal(ca[f"blocks.{l}.mlp.hook_expert_indices"], cb[f"blocks.{l}.mlp.hook_expert_indices"])


def test_edited_indices_still_checked_on_the_gpu_path(tiny_dirs):
    d, _ = tiny_dirs("qwen3_moe")
    model = HookedMoETransformer.from_pretrained(d)
    layer = model.cfg.moe_layers[0]
    bad = [(f"blocks.{layer}.mlp.hook_expert_indices", lambda idx, hook: idx + model.cfg.n_experts)]
    for ctx in (gpu_code_path(), torch.no_grad()):
        with ctx, pytest.raises(IndexError, match="out of range"):
            model.run_with_hooks(ids(), fwd_hooks=bad)


def test_sink_edits_still_apply_without_a_host_sync(tiny_dirs):
    """gpt-oss: an edit of hook_sink_weight rescales the pattern (decided on the device)."""
    d, _ = tiny_dirs("gpt_oss")
    model = HookedMoETransformer.from_pretrained(d)
    name = "blocks.0.attn.hook_sink_weight"

    def zero_in_place(s, hook):
        s.zero_()
    with torch.no_grad():
        clean = model(ids())
        same = model.run_with_hooks(ids(), fwd_hooks=[(name, lambda s, hook: s.clone())])
        edited = model.run_with_hooks(ids(), fwd_hooks=[(name, lambda s, hook: torch.zeros_like(s))])
        in_place = model.run_with_hooks(ids(), fwd_hooks=[(name, zero_in_place)])
    assert torch.equal(clean, same)
    assert (clean - edited).abs().max() > 1e-3 and torch.equal(edited, in_place)
