"""Models built from the presets (:mod:`moelens.presets`) on the meta device, without memory or
files: :func:`preset_summary` (parameter counts) and :func:`transformers_meta_model` (transformers'
own model of a preset, for cross-checks). Kept apart from :mod:`moelens.presets`, which the model
imports to resolve a preset name, so that neither module imports the other."""

from __future__ import annotations

from moelens.presets import PRESET_INFO, get_preset, resolve_name

__all__ = ["preset_summary", "transformers_meta_model"]


def preset_summary(name: str) -> dict:
    """Parameter counts of a preset, computed on the meta device (no memory, ~a second).

    Returns ``{"name", "alias", "architecture", "total_params", "active_params",
    "active_params_no_embeddings", "total_params_no_embeddings", "published_params",
    "bytes_bf16", "n_layers", "n_experts", "top_k", "quantization", "bytes_unpacked", "bytes_packed",
    "gpus_unpacked", "gpus_packed"}``. ``bytes_unpacked`` is the resident bytes of the bf16 model
    (as the default loader builds it; fp32 router weights where the architecture keeps them),
    ``bytes_packed`` that of ``keep_quantized=True`` for presets whose hub checkpoint is FP8 or
    MXFP4 (else None); ``gpus_*`` name the smallest set of :data:`moelens.placement.GPU_SETS` that
    holds them (:func:`moelens.placement.smallest_gpu_set`; None: none of them). "Active" counts only ``top_k`` of the
    routed experts of every sparse layer (shared experts, dense layers, attention and norms
    always count); the embedding and unembedding matrices are excluded from the ``*_no_embeddings``
    numbers.
    """
    import torch

    from moelens.model import HookedMoETransformer
    from moelens.placement import smallest_gpu_set
    from moelens.quant.packed import hf_format, resident_bytes

    hub_id = resolve_name(name)
    model = HookedMoETransformer.from_config(get_preset(hub_id), device="meta")
    total = model.n_params()
    bf16 = HookedMoETransformer.from_config(get_preset(hub_id), device="meta", dtype=torch.bfloat16)
    fmt = hf_format(get_preset(hub_id))
    packed = None
    if fmt is not None:
        packed = HookedMoETransformer.from_config(get_preset(hub_id), device="meta", dtype=torch.bfloat16,
                                                  keep_quantized=True)
    fits = {k: (smallest_gpu_set(m) or {}).get("gpus") for k, m in (("unpacked", bf16), ("packed", packed)) if m is not None}
    return {
        "name": hub_id,
        "alias": PRESET_INFO[hub_id]["alias"],
        "architecture": model.cfg.architecture,
        "total_params": total,
        "total_params_no_embeddings": model.n_params(include_embeddings=False),
        "active_params": model.n_params(active=True),
        "active_params_no_embeddings": model.n_params(active=True, include_embeddings=False),
        "published_params": PRESET_INFO[hub_id]["published_params"],
        "bytes_bf16": 2 * total,
        "quantization": fmt[0] if fmt else None,
        "bytes_unpacked": resident_bytes(bf16),
        "bytes_packed": resident_bytes(packed) if packed is not None else None,
        "gpus_unpacked": fits["unpacked"],
        "gpus_packed": fits.get("packed"),
        "n_layers": model.cfg.n_layers,
        "n_experts": model.cfg.n_experts,
        "top_k": model.cfg.top_k,
    }


def transformers_meta_model(name: str):
    """The transformers 5 model of a preset, instantiated on the meta device (for cross-checks).

    Built as ``AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))`` under
    ``torch.device("meta")``: no memory is allocated and no file is read.
    """
    import torch
    import transformers

    from moelens.architectures import MODEL_TYPE_ALIASES

    cfg = get_preset(name)
    cfg["model_type"] = MODEL_TYPE_ALIASES.get(cfg["model_type"], cfg["model_type"])  # kimi_k2 -> deepseek_v3
    cfg.pop("quantization_config", None)  # a format of the weights, not of the model
    hf_config = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(hf_config)
