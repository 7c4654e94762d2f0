"""Supported architectures, keyed by ``config.json``'s ``architectures[0]``.

Adding an architecture = one thin module defining an :class:`~moelens.architectures.base.Architecture`
(config field table + key map) and one line in :data:`ARCHITECTURES`; see docs/models.md.
"""

from __future__ import annotations

from typing import Any

import torch

from moelens.architectures import mixtral, olmoe, qwen2_moe, qwen3_5_moe, qwen3_moe, qwen3_next
from moelens.architectures.base import (
    GENERIC_IGNORED, Architecture, KeyRule, UnsupportedConfigError,
)
from moelens.config import MoEConfig

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a for a in (mixtral.ARCH, qwen3_moe.ARCH, olmoe.ARCH, qwen2_moe.ARCH)
}
ARCHITECTURES.update({a.name: a for a in (qwen3_next.ARCH, qwen3_5_moe.ARCH, qwen3_5_moe.MULTIMODAL_ARCH)})


def _register_optional() -> None:
    try:
        from moelens.architectures import deepseek_v2
    except ImportError:  # pragma: no cover - module under construction
        return
    ARCHITECTURES[deepseek_v2.ARCH.name] = deepseek_v2.ARCH
    from moelens.architectures import deepseek_v3, glm4_moe, glm4_moe_lite

    for arch in (deepseek_v3.ARCH, glm4_moe.ARCH, glm4_moe_lite.ARCH):
        ARCHITECTURES[arch.name] = arch
    from moelens.architectures import gpt_oss

    ARCHITECTURES[gpt_oss.ARCH.name] = gpt_oss.ARCH
    from moelens.architectures import granitemoe
    from moelens.architectures import ernie4_5_moe, minimax_m2, phimoe

    for arch in (granitemoe.ARCH, granitemoe.SHARED_ARCH, minimax_m2.ARCH, ernie4_5_moe.ARCH, phimoe.ARCH):
        ARCHITECTURES[arch.name] = arch
    from moelens.architectures import llama4

    ARCHITECTURES[llama4.ARCH.name] = llama4.ARCH
    ARCHITECTURES[llama4.MULTIMODAL_ARCH.name] = llama4.MULTIMODAL_ARCH
    from moelens.architectures import flex_olmo

    ARCHITECTURES[flex_olmo.ARCH.name] = flex_olmo.ARCH
    from moelens.architectures import gemma4

    ARCHITECTURES[gemma4.ARCH.name] = gemma4.ARCH
    ARCHITECTURES[gemma4.MULTIMODAL_ARCH.name] = gemma4.MULTIMODAL_ARCH
    from moelens.architectures import deepseek_v4, deepseek_v32, glm_moe_dsa

    for arch in (deepseek_v32.ARCH, glm_moe_dsa.ARCH, deepseek_v4.ARCH):
        ARCHITECTURES[arch.name] = arch


_register_optional()


class UnsupportedArchitectureError(ValueError):
    pass


# hub model_types that transformers does not register, read as another architecture
# (contract, "Loading": Kimi-K2's checkpoints are DeepSeek-V3)
MODEL_TYPE_ALIASES = {"kimi_k2": "deepseek_v3"}
# hub ``architectures[0]`` names of remote-code checkpoints whose model transformers implements under
# another class name (microsoft/Phi-3.5-MoE-instruct's config.json says PhiMoEForCausalLM)
ARCHITECTURE_ALIASES = {"PhiMoEForCausalLM": "PhimoeForCausalLM"}


def get_architecture(hf_config: dict) -> Architecture:
    names = hf_config.get("architectures") or []
    name = names[0] if names else None
    name = ARCHITECTURE_ALIASES.get(name, name)
    if name is None:
        by_type = {a.model_type: a for a in ARCHITECTURES.values()}
        model_type = MODEL_TYPE_ALIASES.get(hf_config.get("model_type"), hf_config.get("model_type"))
        if model_type in by_type:
            return by_type[model_type]
    if name not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"Unsupported architecture {name!r} (model_type {hf_config.get('model_type')!r}). "
            f"moelens supports: {', '.join(sorted(ARCHITECTURES))}."
        )
    return ARCHITECTURES[name]


def translate_config(hf_config: dict, dtype: torch.dtype = torch.float32, **overrides: Any) -> MoEConfig:
    """Translate a Hugging Face ``config.json`` dict into a :class:`MoEConfig`.

    Raises :class:`UnsupportedConfigError` naming every field that would change the computation
    in a way moelens does not implement (unknown fields with a value, or known fields with an
    unsupported value).
    """
    arch = get_architecture(hf_config)
    if arch.sub_config:  # a multimodal wrapper: the text model's fields live in a sub-dict
        if not isinstance(hf_config.get(arch.sub_config), dict):
            raise UnsupportedConfigError(f"config.json for {arch.name} has no `{arch.sub_config}` dict")
        top = hf_config
        sub = top[arch.sub_config]
        hf_config = {**sub, "tie_word_embeddings": top.get("tie_word_embeddings", sub.get("tie_word_embeddings", False))}
    hf = {arch.aliases.get(k, k): v for k, v in hf_config.items()}
    problems = []
    for key, allowed in arch.required.items():
        if key in hf and hf[key] not in allowed:
            problems.append(f"{key}={hf[key]!r} (supported: {', '.join(map(repr, allowed))})")
    types = hf.get("layer_types")
    if "layer_types" not in arch.defaults and isinstance(types, list) and set(types) - {"full_attention"}:
        # an architecture without per-layer attention types: only all-full-attention lists are inert
        # (transformers' Qwen2-MoE, e.g., would window the 'sliding_attention' layers)
        problems.append(
            f"layer_types with {', '.join(sorted(map(repr, set(types) - {'full_attention'})))} entries "
            f"(moelens' {arch.name} implements full attention in every layer)"
        )
    known = set(arch.defaults) | set(arch.required) | GENERIC_IGNORED | arch.ignored
    for key, value in hf.items():
        if key not in known and value not in (None, False, [], {}, 0):
            problems.append(f"{key}={value!r} (not handled by moelens' {arch.name} implementation)")
    if problems:
        raise UnsupportedConfigError(
            f"config.json for {arch.name} has fields that change the computation and that moelens does not "
            f"handle: {'; '.join(problems)}. Remove them if they are inert for your checkpoint, or open an issue."
        )
    full = {**arch.defaults, **{k: v for k, v in hf.items() if k in arch.defaults}}
    kwargs = arch.translate(full)
    kwargs.update(
        architecture=arch.name,
        tie_word_embeddings=bool(full.get("tie_word_embeddings", False)),
        bos_token_id=full.get("bos_token_id"),
        eos_token_id=_first(full.get("eos_token_id")),
        pad_token_id=full.get("pad_token_id"),
        n_ctx=hf.get("max_position_embeddings"),
        dtype=dtype,
    )
    kwargs.update(overrides)
    return MoEConfig(**kwargs)


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) and x else x


__all__ = [
    "ARCHITECTURES", "Architecture", "KeyRule", "UnsupportedArchitectureError", "UnsupportedConfigError",
    "get_architecture", "translate_config",
]
