"""Bad checkpoints and configs of the Qwen3.5 / Qwen3-Next hybrids get clear errors."""

import shutil

import pytest
from safetensors.torch import load_file, save_file

from moelens import HookedMoETransformer
from moelens.architectures import UnsupportedConfigError, translate_config
from moelens.loading import CheckpointError
from moelens.testing import edit_config


@pytest.fixture()
def ckpt(tiny_copy):
    return tiny_copy("qwen3_5_moe")


def edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_linear_attention_tensor_is_named(ckpt):
    edit_tensors(ckpt, lambda t: t.pop("model.layers.1.linear_attn.conv1d.weight"))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.W_conv"):
        HookedMoETransformer.from_pretrained(ckpt)


def test_wrong_conv_shape_is_named(ckpt):
    def shrink(t):
        t["model.layers.0.linear_attn.conv1d.weight"] = t["model.layers.0.linear_attn.conv1d.weight"][..., :3].contiguous()
    edit_tensors(ckpt, shrink)
    with pytest.raises(CheckpointError, match=r"conv1d.weight.*blocks\.0\.attn\.W_conv"):
        HookedMoETransformer.from_pretrained(ckpt)


def test_vision_tensor_in_a_text_checkpoint_is_unexpected(ckpt):
    import torch

    edit_tensors(ckpt, lambda t: t.__setitem__("model.visual.patch_embed.proj.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.visual\.patch_embed"):
        HookedMoETransformer.from_pretrained(ckpt)


@pytest.mark.parametrize("field,value", [("attn_output_gate", False), ("output_gate_type", "sigmoid"),
                                         ("hidden_act", "gelu")])
def test_unsupported_variants_are_refused(ckpt, field, value):
    edit_config(ckpt, **{field: value})
    with pytest.raises(UnsupportedConfigError, match=field):
        HookedMoETransformer.from_pretrained(ckpt)


def test_value_heads_must_group_key_heads(ckpt):
    edit_config(ckpt, linear_num_value_heads=3)
    with pytest.raises(ValueError, match="linear_n_v_heads=3 must be a positive multiple"):
        HookedMoETransformer.from_pretrained(ckpt, device="meta")


def test_multimodal_config_needs_its_text_config():
    with pytest.raises(UnsupportedConfigError, match="text_config"):
        translate_config({"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe"})


def test_fused_qwen3_next_tensor_of_the_wrong_size_is_named(tiny_dirs, tmp_path):
    d, _ = tiny_dirs("qwen3_next")
    out = tmp_path / "next"
    shutil.copytree(d, out)

    def shrink(t):
        t["model.layers.0.linear_attn.in_proj_qkvz.weight"] = t["model.layers.0.linear_attn.in_proj_qkvz.weight"][:-3].contiguous()
    edit_tensors(out, shrink)
    with pytest.raises(CheckpointError, match=r"in_proj_qkvz.*does not fit the config"):
        HookedMoETransformer.from_pretrained(out)
