"""FP8 block-quantised checkpoints (``quant_method: fp8``): DeepSeek-V3/R1, Kimi-K2, GLM-*-FP8.

Format (DeepSeek's weight documentation; transformers ``integrations/finegrained_fp8.py``):

* ``<name>.weight``: ``float8_e4m3fn`` ``[..., out, in]``;
* ``<name>.weight_scale_inv``: fp32 ``[..., ceil(out/bm), ceil(in/bn)]`` (``weight_block_size``
  ``[bm, bn]``, usually ``[128, 128]``), or UE8M0 exponents (``float8_e8m0fnu``, or ``uint8`` read as
  ``2**(b - 127)``);
* ``W[r, c] = fp32(q[r, c]) * fp32(scale[r // bm, c // bn])``, then cast once to the model dtype.

Block size: the config's ``weight_block_size`` when the scale grid is its ``ceil`` grid (edge blocks
are partial: DeepSeek pads to the block before quantising and drops the padding); otherwise inferred
from the grid as transformers' ``Fp8Dequantize`` does (``out / grid_rows`` x ``in / grid_cols``,
which must divide exactly). Where both rules apply they agree whenever the block divides the
weight; in the one case they differ (a weight that is not a multiple of the config's block but
whose grid divides it) moelens follows DeepSeek's ``ceil`` rule and transformers would use the
smaller block.

Memory: one tensor at a time, with at most one fp32 copy of it (the product is formed in place on
the fp32 up-cast, one row block at a time), then cast to the destination dtype.
Products are formed exactly as transformers forms them (one fp32 multiply per element, one cast),
so the result is bit-identical to its dequantisation (tested on a synthetic checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


class QuantFormatError(ValueError):
    """A quantised checkpoint that moelens cannot read (method, scale grid, dtypes)."""


SCALE_SUFFIX = "_scale_inv"


@dataclass(frozen=True)
class Fp8BlockFormat:
    """``quantization_config`` of an FP8 block checkpoint."""

    block: Optional[tuple[int, int]] = (128, 128)

    @classmethod
    def from_config(cls, qc: dict) -> "Fp8BlockFormat":
        fmt = qc.get("fmt", "e4m3")
        if fmt not in ("e4m3", "float8_e4m3fn", None):  # MiniMax-M2 spells it out
            raise QuantFormatError(f"quantization_config.fmt={fmt!r}: only e4m3 FP8 weights are supported")
        scheme = qc.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", None):
            raise QuantFormatError(
                f"quantization_config.activation_scheme={scheme!r}: only 'dynamic' (no stored activation "
                f"scales) is supported; moelens dequantises the weights and runs in the model dtype"
            )
        block = qc.get("weight_block_size")
        if block is not None:
            if len(block) != 2 or min(block) < 1:
                raise QuantFormatError(f"quantization_config.weight_block_size={block!r}: expected [rows, cols]")
            block = (int(block[0]), int(block[1]))
        return cls(block=block)

    # -- which keys ---------------------------------------------------------------------------
    @staticmethod
    def scale_key(key: str) -> Optional[str]:
        """``<name>.weight`` -> ``<name>.weight_scale_inv`` (None for other keys)."""
        return key + SCALE_SUFFIX if key.endswith("weight") else None

    @staticmethod
    def is_scale(key: str) -> bool:
        return key.endswith("weight" + SCALE_SUFFIX)

    # -- the arithmetic -----------------------------------------------------------------------
    def block_shape(self, key: str, weight_shape, scale_shape) -> tuple[int, int]:
        if len(scale_shape) < 2 or len(weight_shape) < 2:
            raise QuantFormatError(
                f"{key}: scale grid {tuple(scale_shape)} / weight {tuple(weight_shape)}: need at least 2 dims each"
            )
        if tuple(scale_shape[:-2]) != tuple(weight_shape[:-2]):
            raise QuantFormatError(
                f"{key}: scale grid {tuple(scale_shape)} does not match the leading dims of weight {tuple(weight_shape)}"
            )
        rows, cols = weight_shape[-2:]
        grid_r, grid_c = scale_shape[-2:]
        if self.block is not None:
            bm, bn = self.block
            if (math.ceil(rows / bm), math.ceil(cols / bn)) == (grid_r, grid_c):
                return bm, bn
        if grid_r and grid_c and rows % grid_r == 0 and cols % grid_c == 0:
            return rows // grid_r, cols // grid_c
        expected = (
            f"[{math.ceil(rows / self.block[0])}, {math.ceil(cols / self.block[1])}] for weight_block_size "
            f"{list(self.block)}, or a grid dividing the weight" if self.block else "a grid dividing the weight"
        )
        raise QuantFormatError(
            f"{key}: weight_scale_inv has grid {tuple(scale_shape[-2:])} for a weight of shape "
            f"{tuple(weight_shape)}; expected {expected}. The scales do not belong to this weight."
        )

    @staticmethod
    def scales_fp32(scales: Tensor) -> Tensor:
        if scales.dtype == torch.uint8:  # UE8M0 exponents stored as bytes
            return (scales.to(torch.float32) - 127.0).exp2()
        if not scales.dtype.is_floating_point:
            raise QuantFormatError(f"weight_scale_inv of dtype {scales.dtype}: expected fp32, bf16, e8m0 or uint8")
        return scales.to(torch.float32)

    def dequantize(self, key: str, q: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
        """``q * scale`` per block in fp32 (in place on the single fp32 copy), cast to ``dtype``."""
        if q.dtype != torch.float8_e4m3fn:
            raise QuantFormatError(f"{key}: has a weight_scale_inv but dtype {q.dtype}, expected float8_e4m3fn")
        bm, bn = self.block_shape(key, q.shape, scales.shape)
        s = self.scales_fp32(scales)
        w = q.to(torch.float32)
        rows, cols = w.shape[-2:]
        for i in range(s.shape[-2]):
            row_scale = s[..., i, :].repeat_interleave(bn, dim=-1)[..., :cols]  # [..., cols]
            w[..., i * bm : min((i + 1) * bm, rows), :].mul_(row_scale.unsqueeze(-2))
        return w if dtype == torch.float32 else w.to(dtype)


class DenseSlice:
    """A dequantised tensor behind the ``safetensors`` slice interface the loader uses."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor

    def get_shape(self):
        return list(self.tensor.shape)

    def __getitem__(self, index):
        return self.tensor[index]
