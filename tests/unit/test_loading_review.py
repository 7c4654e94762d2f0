"""Loading must not give a silently different model from transformers' for the same directory:
tied embeddings with a distinct ``lm_head.weight``, ``rope_scaling`` next to ``rope_parameters``,
sliding ``layer_types`` an architecture does not implement, an index naming the wrong shard."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelens import HookedMoETransformer
from moelens.architectures import UnsupportedConfigError, translate_config
from moelens.loading import CheckpointError
from moelens.testing import edit_config

TOKENS = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 64]])


@pytest.fixture()
def ckpt(tiny_copy):
    return tiny_copy("mixtral")


def hf_logits(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def ours(path, **kwargs):
    model = HookedMoETransformer.from_pretrained(path, **kwargs)
    with torch.no_grad():
        return model, model(TOKENS)


def test_tied_config_with_a_distinct_lm_head_is_loaded_untied_like_transformers(ckpt, caplog):
    edit_config(ckpt, tie_word_embeddings=True)  # the checkpoint keeps its own (different) lm_head.weight
    with caplog.at_level("WARNING", logger="moelens"):
        model, logits = ours(ckpt)
    assert "untied" in caplog.text
    assert model.unembed.w_u is not model.embed.W_E and not model.cfg.tie_word_embeddings
    sd = load_file(ckpt / "model.safetensors")
    assert torch.equal(model.unembed.w_u, sd["lm_head.weight"])
    torch.testing.assert_close(logits, hf_logits(ckpt), atol=1e-4, rtol=1e-4)
    # an explicit override keeps them tied (the embedding is then the unembedding)
    tied, _ = ours(ckpt, tie_word_embeddings=True)
    assert tied.unembed.w_u is tied.embed.W_E


def test_tied_config_with_an_equal_or_absent_lm_head_stays_tied(ckpt):
    edit_config(ckpt, tie_word_embeddings=True)
    sd = load_file(ckpt / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    model, logits = ours(ckpt)
    assert model.unembed.w_u is model.embed.W_E
    torch.testing.assert_close(logits, hf_logits(ckpt), atol=1e-4, rtol=1e-4)
    del sd["lm_head.weight"]
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    model, _ = ours(ckpt)
    assert model.unembed.w_u is model.embed.W_E


def test_rope_scaling_replaces_rope_parameters_as_in_transformers(ckpt):
    # a v5 config (rope_parameters theta 1e6) with a legacy rope_scaling added by hand: transformers
    # reads rope_scaling alone (`rope_scaling or rope_parameters`), its theta from the top-level field
    edit_config(ckpt, rope_scaling={"type": "default"}, rope_theta=5000.0)
    model, logits = ours(ckpt)
    assert model.cfg.rope_theta == 5000.0
    torch.testing.assert_close(logits, hf_logits(ckpt), atol=1e-4, rtol=1e-4)
    edit_config(ckpt, rope_scaling={"type": "linear", "factor": 4.0})
    with pytest.raises(UnsupportedConfigError, match="rope scaling type 'linear'"):
        HookedMoETransformer.from_pretrained(ckpt)


def test_partial_rotary_factor_read_from_rope_scaling():
    from moelens.testing import tiny_hf_config

    hf = tiny_hf_config("glm4_moe").to_dict()  # rope_parameters: partial_rotary_factor 0.5 of head_dim 24
    assert translate_config(hf).rotary_dim == 12
    hf["rope_scaling"] = {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25}
    assert translate_config(hf).rotary_dim == 6


@pytest.mark.parametrize("name", ["qwen2_moe", "qwen3_moe", "mixtral"])
def test_sliding_layer_types_are_refused_where_not_implemented(name):
    from moelens.testing import tiny_hf_config

    hf = tiny_hf_config(name).to_dict()
    n = hf["num_hidden_layers"]
    translate_config({**hf, "layer_types": ["full_attention"] * n})  # inert: accepted
    bad = {**hf, "layer_types": ["sliding_attention"] + ["full_attention"] * (n - 1), "sliding_window": 4}
    with pytest.raises(UnsupportedConfigError, match="layer_types with 'sliding_attention'"):
        translate_config(bad)


def reshard(ckpt, assign):
    sd = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    shards: dict = {}
    for key, t in sd.items():
        shards.setdefault(assign(key), {})[key] = t
    weight_map = {}
    for fname, tensors in shards.items():
        save_file(tensors, ckpt / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    return weight_map


def test_keys_split_oddly_across_shards_load_identically(ckpt, tiny_dirs):
    _, reference = ours(tiny_dirs("mixtral")[0])
    rng = random.Random(0)  # experts of one layer, and gate/up/down of one expert, in different shards
    weight_map = reshard(ckpt, lambda k: f"model-0000{rng.randint(1, 3)}-of-00003.safetensors")
    assert len(set(weight_map.values())) == 3
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, logits = ours(ckpt)
    assert torch.equal(logits, reference)


def test_index_naming_the_wrong_shard(ckpt):
    weight_map = reshard(ckpt, lambda k: "a.safetensors" if "layers.1." in k else "b.safetensors")
    key = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    weight_map[key] = "b.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=f"maps {key} to b.safetensors, which does not hold it"):
        HookedMoETransformer.from_pretrained(ckpt)
