"""Quantised checkpoint formats, dequantised tensor by tensor while the weights stream in.

``quantization_config.quant_method`` in ``config.json`` selects the format; see
:mod:`moelens.quant.fp8` (DeepSeek-style FP8 blocks) and :mod:`moelens.quant.mxfp4` (gpt-oss's MXFP4
expert banks, stored as ``*_blocks``/``*_scales`` pairs and dequantised by the loader pair by pair).
"""

from __future__ import annotations

from typing import Optional

from moelens.quant.fp8 import Fp8BlockFormat, QuantFormatError

SUPPORTED_QUANT_METHODS = ("fp8", "mxfp4")


def checkpoint_format(hf_config: dict) -> Optional[Fp8BlockFormat]:
    """The dequantiser for ``hf_config['quantization_config']``, or None for a plain checkpoint.

    Raises :class:`QuantFormatError` for a ``quant_method`` moelens cannot dequantise."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == "fp8":
        return Fp8BlockFormat.from_config(qc)
    if method == "mxfp4":  # no per-weight scales: the loader pairs *_blocks with *_scales (moelens.quant.mxfp4)
        return None
    raise QuantFormatError(
        f"config.json: quantization_config.quant_method={method!r} is not supported by moelens "
        f"(supported: {', '.join(SUPPORTED_QUANT_METHODS)}). Use a bf16/fp32 copy of the checkpoint, "
        f"or dequantise it with transformers first."
    )


__all__ = ["Fp8BlockFormat", "QuantFormatError", "SUPPORTED_QUANT_METHODS", "checkpoint_format"]
