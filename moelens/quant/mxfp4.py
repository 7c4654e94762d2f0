"""MXFP4 checkpoints (gpt-oss): dequantised tensor by tensor while the weights stream in.

Format (OCP microscaling, as gpt-oss's hub checkpoints store the expert weights):

* ``<name>_blocks``: uint8 ``[*prefix, G, 16]``; each byte holds two FP4 (E2M1) values, the low
  nibble first (even position), the high nibble second; 16 bytes = one group of 32 values.
* ``<name>_scales``: uint8 ``[*prefix, G]``, one E8M0 exponent per group: the group is multiplied
  by ``2 ** (scale - 127)``.
* E2M1 values by nibble: ``+0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, -0.5, -1, -1.5, -2, -3, -4, -6``.

``W[..., 32 g + j] = LUT[nibble] * 2 ** (scale[..., g] - 127)``, computed with ``torch.ldexp`` in the
destination dtype, then the last two axes of the ``[E, out, in]`` result are swapped to the
in-memory ``[E, in, out]`` layout (``gate_up_proj [E, d_model, 2 d_expert]``,
``down_proj [E, d_expert, d_model]``). This is what transformers' ``_convert_moe_packed_tensors``
(``transformers/integrations/mxfp4.py``) computes when it dequantises (``Mxfp4Config(dequantize=True)``,
or on machines without its MXFP4 kernels); the test suite checks the two are equal bit for bit.
Every E2M1 value times a power of two is exact in bf16 and fp32 (within their exponent range),
so the dequantised weights are the checkpoint's values, not an approximation of them.

Loading (:mod:`moelens.loading`): a ``*_blocks`` key is paired with its ``*_scales`` key (in any
shard), and the pair is presented to the key map as the plain tensor ``<name>`` through
:class:`DequantizedSlice`, which dequantises one expert at a time (peak memory: one expert's
matrix, not the whole layer).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moelens.quant.fp8 import QuantFormatError

FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCKS, SCALES = "_blocks", "_scales"
SUPPORTED_METHODS = ("mxfp4",)


class QuantizationError(QuantFormatError):
    """An MXFP4 checkpoint moelens cannot read (unknown method, inconsistent tensors)."""


def is_mxfp4(hf_config: dict) -> bool:
    """Whether ``config.json`` declares ``quantization_config.quant_method == "mxfp4"``."""
    qc = hf_config.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == "mxfp4"


def quant_method(hf_config: dict) -> Optional[str]:
    """``quantization_config.quant_method`` of a gpt-oss ``config.json`` (None when not quantised);
    raises :class:`QuantizationError` for any method but MXFP4 (the only one gpt-oss ships in)."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method not in SUPPORTED_METHODS:
        raise QuantizationError(
            f"quantization_config.quant_method={method!r} is not handled by moelens (supported: "
            f"{', '.join(SUPPORTED_METHODS)}). Load a dequantised (bf16) copy of the checkpoint instead, or open an issue."
        )
    return method


_LUTS: dict = {}


def _lut(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The E2M1 value table in ``dtype`` on ``device``, made once per pair (a host-to-device copy
    per call would stall a GPU that dequantises experts as it runs)."""
    key = (dtype, str(device))
    if key not in _LUTS:
        _LUTS[key] = torch.tensor(FP4_VALUES, dtype=dtype, device=device)
    return _LUTS[key]


def dequantize(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``[*prefix, G, 16]`` uint8 blocks and ``[*prefix, G]`` uint8 scales -> ``[*prefix, G*32]``
    in ``dtype`` (no transpose; see :func:`dequantize_experts` for the expert layout)."""
    check_pair(blocks, scales)
    lut = _lut(dtype, blocks.device)
    blocks = blocks.to(torch.uint8)
    exponents = scales.to(torch.int32) - 127
    *prefix, g, b = blocks.shape
    out = torch.empty(*prefix, g, 2 * b, dtype=dtype, device=blocks.device)
    out[..., 0::2] = lut[(blocks & 0x0F).to(torch.int)]
    out[..., 1::2] = lut[(blocks >> 4).to(torch.int)]
    torch.ldexp(out, exponents[..., None], out=out)
    return out.reshape(*prefix, g * 2 * b)


def dequantize_experts(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """An expert bank ``[E, out, G, 16]`` -> the in-memory ``[E, in = G*32, out]`` tensor, as transformers
    loads ``gate_up_proj`` / ``down_proj`` from ``*_blocks`` / ``*_scales``."""
    return dequantize(blocks, scales, dtype).transpose(-1, -2).contiguous()


def check_pair(blocks: Tensor, scales: Tensor, name: str = "") -> None:
    where = f"{name}: " if name else ""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise QuantizationError(
            f"{where}MXFP4 blocks and scales must be uint8 (got {blocks.dtype} and {scales.dtype})"
        )
    if blocks.ndim < 2 or blocks.shape[-1] != 16:
        raise QuantizationError(f"{where}MXFP4 blocks must end in 16 bytes per group, got shape {tuple(blocks.shape)}")
    if tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise QuantizationError(
            f"{where}MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match: "
            f"expected scales of shape {tuple(blocks.shape[:-1])} (one exponent per 32-value group)"
        )


class DequantizedSlice:
    """A blocks/scales pair seen as the dequantised ``[E, in, out]`` tensor, with the two methods
    of a ``safetensors`` slice that :mod:`moelens.loading` uses: ``get_shape()`` and indexing.
    Integer or slice indices on the expert axis dequantise only those experts."""

    def __init__(self, blocks_slice, scales_slice, name: str, dtype: torch.dtype):
        self.blocks, self.scales, self.name, self.dtype = blocks_slice, scales_slice, name, dtype
        bshape, sshape = tuple(blocks_slice.get_shape()), tuple(scales_slice.get_shape())
        if len(bshape) != 4 or bshape[-1] != 16 or bshape[:-1] != sshape:
            raise QuantizationError(
                f"{name}: MXFP4 {name}{BLOCKS} {bshape} and {name}{SCALES} {sshape} do not match: expected "
                f"blocks [n_experts, out, groups, 16] and scales [n_experts, out, groups]"
            )
        e, out, g, _ = bshape
        self.shape = (e, g * 32, out)

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index):
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if isinstance(first, int):
            sel = (slice(first, first + 1),)
        elif isinstance(first, slice):
            sel = (first,)
        else:
            raise TypeError(f"{self.name}: unsupported index {index!r} into a dequantised MXFP4 tensor")
        blocks, scales = self.blocks[sel], self.scales[sel]
        check_pair(blocks, scales, self.name)
        full = dequantize_experts(blocks, scales, self.dtype)
        if isinstance(first, int):
            full = full[0]
        return full[rest] if rest else full
