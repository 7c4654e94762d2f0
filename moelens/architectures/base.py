"""Shared machinery for the per-architecture modules: config translation and checkpoint key maps.

An :class:`Architecture` is data: which HF ``config.json`` fields it reads (and their class
defaults), which it ignores because they do not change inference, which must hold a specific
value, how the remaining knobs are derived, and a declarative list of :class:`KeyRule` mapping
checkpoint keys to moelens parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

# Fields of any HF config that never change the forward computation.
GENERIC_IGNORED = frozenset(
    {
        "architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
        "use_cache", "initializer_range", "max_position_embeddings", "output_router_logits",
        "router_aux_loss_coef", "attention_dropout", "id2label", "label2id", "return_dict",
        "output_hidden_states", "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder",
        "problem_type", "tokenizer_class", "auto_map", "router_jitter_noise", "aux_loss_alpha",
        "seq_aux", "_attn_implementation", "_experts_implementation", "use_return_dict", "bos_token_id",
        "eos_token_id", "pad_token_id", "tie_word_embeddings", "task_specific_params", "prefix",
        "finetuning_task", "decoder_start_token_id", "sep_token_id", "num_labels", "_commit_hash",
        "layer_types", "max_window_layers",
        # the format of the stored weights, read by the loader for every architecture (moelens.quant:
        # FP8 blocks and MXFP4 are dequantised or kept packed; any other quant_method is refused there)
        "quantization_config",
    }
)


class UnsupportedConfigError(ValueError):
    """A config.json field changes the computation in a way moelens does not implement."""


@dataclass(frozen=True)
class KeyRule:
    """Maps checkpoint keys matching ``src`` onto the moelens parameter(s) ``dst``.

    Placeholders: ``{L}`` layer index, ``{E}`` expert index. ``op``:

    * ``"copy"``: the tensor is the whole parameter;
    * ``"expert"``: the tensor is slice ``[E]`` of a stacked ``[n_experts, ...]`` parameter;
    * ``"split"``: the tensor is the fused ``[n_experts, 2*I, d]`` gate_up block, whose first half
      along dim 1 goes to ``dst[0]`` (gate) and second half to ``dst[1]`` (up).
    * ``"convert"``: ``convert(tensor, cfg)`` returns one tensor per ``dst`` (a reshape or a
      de-interleave of a fused checkpoint tensor, e.g. Qwen3-Next's ``in_proj_qkvz``).
    """

    src: str
    dst: Union[str, tuple[str, ...]]
    op: str = "copy"
    convert: Optional[Callable] = None

    def regex(self) -> re.Pattern:
        pattern = re.escape(self.src).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)")
        return re.compile(pattern + "$")


@dataclass(frozen=True)
class Architecture:
    """One HF architecture: how to read its config and its checkpoint."""

    name: str  # config.json's architectures[0]
    model_type: str
    translate: Callable[[dict], dict]  # HF config dict (defaults applied) -> MoEConfig kwargs
    defaults: dict  # HF fields read by ``translate`` with their class defaults
    key_rules: tuple[KeyRule, ...]
    required: dict = field(default_factory=dict)  # field -> allowed values (tuple)
    ignored: frozenset = frozenset()
    aliases: dict = field(default_factory=dict)  # alternative HF name -> canonical name
    ignored_keys: tuple[str, ...] = (r".*rotary_emb\.inv_freq$",)
    hf_config_class: str = ""
    hf_model_class: str = ""
    # checkpoint tensors that are not part of the decoder (multi-token prediction layers, ...):
    # full-match regexes; the loader skips them and prints one line saying how many. The token
    # ``{MTP_LAYER}`` matches a layer index >= the model's n_layers (the layers a checkpoint
    # appends after the decoder, e.g. DeepSeek-V3's ``model.layers.61``).
    skip_keys: tuple[str, ...] = ()
    # (old, new) prefixes rewritten on checkpoint keys before the key rules apply
    # (e.g. a multimodal wrapper's ``model.language_model.`` -> ``model.``)
    key_prefixes: tuple[tuple[str, str], ...] = ()
    # read the model's fields from this sub-dict of config.json (a multimodal wrapper's text_config)
    sub_config: str = ""
    # what the skipped tensors are, for the loader's one-line note (default: multi-token prediction layers)
    skip_note: str = ""


def rope_dict(hf: dict) -> dict:
    """The RoPE dict transformers 5 uses: a non-empty legacy ``rope_scaling`` *replaces*
    ``rope_parameters`` (``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict``:
    ``rope_scaling or rope_parameters``), so a config carrying both follows ``rope_scaling``."""
    return dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})


def rope_settings(hf: dict, arch: str, allow_yarn: bool = False, allow_longrope: bool = False,
                  allow_llama3: bool = False) -> dict:
    """theta and scaling from v5 ``rope_parameters`` or the legacy ``rope_theta``/``rope_scaling``
    (the dict's own ``rope_theta`` first, then the top-level field, as transformers reads them)."""
    scaling = rope_dict(hf)
    theta = scaling.pop("rope_theta", None)
    theta = hf.get("rope_theta") if theta is None else theta
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type == "default":
        return {"rope_theta": float(theta) if theta is not None else None, "rope_scaling": None}
    if rope_type == "yarn" and allow_yarn:
        return {"rope_theta": float(theta) if theta is not None else None,
                "rope_scaling": tuple(sorted((k, v) for k, v in scaling.items() if v is not None))}
    if rope_type == "longrope" and allow_longrope:  # PhiMoE: per-dim factors, short/long mscale
        fields = ("short_factor", "long_factor", "short_mscale", "long_mscale", "original_max_position_embeddings")
        missing = [k for k in fields if scaling.get(k) is None and not (k == "original_max_position_embeddings"
                                                                      and hf.get(k) is not None)]
        if missing:
            raise UnsupportedConfigError(f"{arch}: longrope rope scaling needs {', '.join(missing)}")
        original = scaling.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
        items = {k: tuple(float(f) for f in scaling[k]) if k.endswith("_factor") else float(scaling[k])
                 for k in fields[:4]}
        return {"rope_theta": float(theta) if theta is not None else None,
                "rope_scaling": tuple(sorted({**items, "rope_type": "longrope",
                                              "original_max_position_embeddings": int(original)}.items()))}
    if rope_type == "llama3" and allow_llama3:
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if scaling.get(k) is None]
        if missing:
            raise UnsupportedConfigError(f"{arch}: llama3 rope scaling without {', '.join(missing)}")
        return {"rope_theta": float(theta) if theta is not None else None,
                "rope_scaling": tuple(sorted([("rope_type", "llama3")] + [(k, scaling[k]) for k in keys]))}
    supported = (["default"] + (["yarn"] if allow_yarn else []) + (["longrope"] if allow_longrope else [])
                 + (["llama3"] if allow_llama3 else []))
    raise UnsupportedConfigError(
        f"{arch}: rope scaling type {rope_type!r} is not supported by moelens "
        f"(supported: {', '.join(supported)}). Remove `rope_scaling` or open an issue."
    )


def moe_layers_qwen(n_layers: int, mlp_only_layers, decoder_sparse_step: int, n_experts: int) -> tuple[int, ...]:
    """Qwen2/3-MoE rule: layer L is sparse iff L not in mlp_only_layers, experts > 0 and
    ``(L + 1) % decoder_sparse_step == 0``."""
    only = set(mlp_only_layers or [])
    return tuple(
        l for l in range(n_layers)
        if l not in only and n_experts > 0 and (l + 1) % max(decoder_sparse_step, 1) == 0
    )


COMMON_RULES = (
    KeyRule("model.embed_tokens.weight", "embed.W_E"),
    KeyRule("model.norm.weight", "ln_final.w"),
    KeyRule("lm_head.weight", "unembed.w_u"),
    KeyRule("model.layers.{L}.input_layernorm.weight", "blocks.{L}.ln1.w"),
    KeyRule("model.layers.{L}.post_attention_layernorm.weight", "blocks.{L}.ln2.w"),
)

GQA_RULES = (
    KeyRule("model.layers.{L}.self_attn.q_proj.weight", "blocks.{L}.attn.w_q"),
    KeyRule("model.layers.{L}.self_attn.k_proj.weight", "blocks.{L}.attn.w_k"),
    KeyRule("model.layers.{L}.self_attn.v_proj.weight", "blocks.{L}.attn.w_v"),
    KeyRule("model.layers.{L}.self_attn.o_proj.weight", "blocks.{L}.attn.w_o"),
    KeyRule("model.layers.{L}.self_attn.q_proj.bias", "blocks.{L}.attn.b_q"),
    KeyRule("model.layers.{L}.self_attn.k_proj.bias", "blocks.{L}.attn.b_k"),
    KeyRule("model.layers.{L}.self_attn.v_proj.bias", "blocks.{L}.attn.b_v"),
    KeyRule("model.layers.{L}.self_attn.q_norm.weight", "blocks.{L}.attn.q_norm_w"),
    KeyRule("model.layers.{L}.self_attn.k_norm.weight", "blocks.{L}.attn.k_norm_w"),
)

DENSE_MLP_RULES = (
    KeyRule("model.layers.{L}.mlp.gate_proj.weight", "blocks.{L}.mlp.w_gate"),
    KeyRule("model.layers.{L}.mlp.up_proj.weight", "blocks.{L}.mlp.w_up"),
    KeyRule("model.layers.{L}.mlp.down_proj.weight", "blocks.{L}.mlp.w_down"),
)


def expert_rules(prefix: str, gate: str, up: str, down: str, router: str) -> tuple[KeyRule, ...]:
    """Per-expert hub keys ``model.layers.{L}.<prefix>.experts.{E}.<gate|up|down>.weight``."""
    base = f"model.layers.{{L}}.{prefix}"
    return (
        KeyRule(f"{base}.{router}.weight", "blocks.{L}.mlp.router.W_router"),
        KeyRule(f"{base}.experts.{{E}}.{gate}.weight", "blocks.{L}.mlp.experts.w_gate", "expert"),
        KeyRule(f"{base}.experts.{{E}}.{up}.weight", "blocks.{L}.mlp.experts.w_up", "expert"),
        KeyRule(f"{base}.experts.{{E}}.{down}.weight", "blocks.{L}.mlp.experts.w_down", "expert"),
    )


# transformers 5 in-memory ("fused") layout, written by save_pretrained(save_original_format=False)
FUSED_EXPERT_RULES = (
    KeyRule("model.layers.{L}.mlp.gate.weight", "blocks.{L}.mlp.router.W_router"),
    KeyRule(
        "model.layers.{L}.mlp.experts.gate_up_proj",
        ("blocks.{L}.mlp.experts.w_gate", "blocks.{L}.mlp.experts.w_up"),
        "split",
    ),
    KeyRule("model.layers.{L}.mlp.experts.down_proj", "blocks.{L}.mlp.experts.w_down"),
)


def shared_expert_rules(name: str) -> tuple[KeyRule, ...]:
    base = f"model.layers.{{L}}.mlp.{name}"
    return (
        KeyRule(f"{base}.gate_proj.weight", "blocks.{L}.mlp.shared_experts.w_gate"),
        KeyRule(f"{base}.up_proj.weight", "blocks.{L}.mlp.shared_experts.w_up"),
        KeyRule(f"{base}.down_proj.weight", "blocks.{L}.mlp.shared_experts.w_down"),
    )
