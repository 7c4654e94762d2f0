"""Every bad input gets a clear exception that says what to do."""


import pytest
import torch
from safetensors.torch import load_file, save_file

from moelens import HookedMoETransformer
from moelens.architectures import UnsupportedArchitectureError, UnsupportedConfigError
from moelens.loading import CheckpointError
from moelens.testing import edit_config


@pytest.fixture()
def ckpt(tiny_copy):
    return tiny_copy("mixtral")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HookedMoETransformer.from_pretrained(tmp_path)


def test_missing_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such checkpoint directory"):
        HookedMoETransformer.from_pretrained(tmp_path / "nope" / "deeper")


def test_unsupported_architecture_lists_supported(ckpt):
    edit_config(ckpt, architectures=["JambaForCausalLM"], model_type="jamba")
    with pytest.raises(UnsupportedArchitectureError, match="MixtralForCausalLM.*Qwen3MoeForCausalLM|Qwen3MoeForCausalLM"):
        HookedMoETransformer.from_pretrained(ckpt)


def test_unhandled_config_field_is_named(ckpt):
    edit_config(ckpt, sliding_window=4096, some_new_knob=3)
    with pytest.raises(UnsupportedConfigError) as err:
        HookedMoETransformer.from_pretrained(ckpt)
    assert "sliding_window=4096" in str(err.value) and "some_new_knob=3" in str(err.value)


def test_unsupported_rope_scaling(ckpt):
    edit_config(ckpt, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6})
    with pytest.raises(UnsupportedConfigError, match="linear"):
        HookedMoETransformer.from_pretrained(ckpt)


def test_missing_and_unexpected_keys_are_named(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    tensors["model.layers.1.block_sparse_moe.experts.3.w9.weight"] = torch.zeros(2)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        HookedMoETransformer.from_pretrained(ckpt)
    msg = str(err.value)
    assert "blocks.1.mlp.experts.w_down[experts [3]]" in msg
    assert "model.layers.1.block_sparse_moe.experts.3.w9.weight" in msg


def test_config_with_fewer_layers_than_checkpoint(ckpt):
    edit_config(ckpt, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match="unexpected checkpoint keys.*model.layers.1"):
        HookedMoETransformer.from_pretrained(ckpt)


def test_shape_mismatch_names_key_and_shapes(ckpt):
    edit_config(ckpt, intermediate_size=64)
    with pytest.raises(CheckpointError) as err:
        HookedMoETransformer.from_pretrained(ckpt)
    assert "w1.weight: checkpoint shape (128, 64), expected (64, 64)" in str(err.value)


def test_pickle_only_checkpoint_is_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="never unpickles.*safetensors"):
        HookedMoETransformer.from_pretrained(ckpt)


def test_hook_name_typo_suggests_closest(tiny_dirs):
    d, _ = tiny_dirs("mixtral")
    model = HookedMoETransformer.from_pretrained(d)
    ids = torch.randint(0, 256, (1, 4))
    with pytest.raises(KeyError, match="Did you mean 'blocks.1.mlp.hook_router_logits'"):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.1.mlp.hook_router_logit", lambda x, hook: x)])
    with pytest.raises(KeyError, match="blocks.0.mlp.hook_expert_out"):
        model.run_with_cache(ids, names_filter=["blocks.0.mlp.hook_experts_out"])
    with pytest.raises(KeyError, match="Did you mean"):
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_psot", lambda x, hook: x)]):
            pass


def test_forced_routing_out_of_range_expert(tiny_dirs):
    d, _ = tiny_dirs("mixtral")
    model = HookedMoETransformer.from_pretrained(d)
    with pytest.raises(IndexError, match=r"expert index out of range \[0, 8\)"):
        model.run_with_hooks(
            torch.randint(0, 256, (1, 4)),
            fwd_hooks=[("blocks.0.mlp.hook_expert_indices", lambda x, hook: torch.full_like(x, 9))],
        )


def test_no_tokenizer_message(tiny_dirs):
    d, _ = tiny_dirs("mixtral")
    model = HookedMoETransformer.from_pretrained(d)
    assert model.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):
        model.to_tokens("hello")
