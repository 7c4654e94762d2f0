"""Quantised weights kept packed in memory (``from_pretrained(..., keep_quantized=True)``).

A :class:`PackedTensor` replaces one weight of the model (an expert bank ``[n_experts, out, in]``
or a single ``[out, in]`` matrix) by the checkpoint's own packed bytes, held as buffers:

* ``fmt="fp8"`` (DeepSeek-V3 / Kimi-K2 / GLM ``-FP8``): ``q`` float8_e4m3fn ``[*lead, out, in]`` and
  ``scale`` fp32 ``[*lead, ceil(out/bm), ceil(in/bn)]`` (:mod:`moelens.quant.fp8`);
* ``fmt="mxfp4"`` (gpt-oss expert banks): ``blocks`` uint8 ``[*lead, out, in/32, 16]`` and ``scales``
  uint8 ``[*lead, out, in/32]`` (:mod:`moelens.quant.mxfp4`), already in moelens' ``[out, in]``
  orientation (gpt-oss's fused ``gate_up_proj`` rows are de-interleaved at load: ``w_gate`` holds
  the even output rows, ``w_up`` the odd ones).

Indexing dequantises only what is asked for: ``bank[e]`` is expert ``e``'s ``[out, in]`` matrix in
the model dtype, ``bank[[e1, e2]]`` two of them; the routed experts call it one expert at a time
(:meth:`moelens.components.experts.Experts.ffn`), so the whole layer is never dequantised at once.
The arithmetic is the loader's (:func:`dequantize_fp8`, :func:`moelens.quant.mxfp4.dequantize`):
one fp32 product per element then one cast (FP8), or exact E2M1 x 2^k values (MXFP4), so every
dequantised expert is bit-identical to the weight the default loader stores, and so is every output.

A packed whole matrix (FP8 attention projections, dense and shared MLPs) is dequantised on every
read of its attribute (``attn.w_o`` returns the dequantised tensor): :func:`pack_model` gives its
owning module a subclass that does this, so the modules' forward code is unchanged.

A packed bank is not a tensor: code that needs the whole bank (``experts.w_down.T``) is refused
with an error that says to index it per expert or to load without ``keep_quantized``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from moelens.quant import mxfp4
from moelens.quant.fp8 import Fp8BlockFormat, QuantFormatError

FORMATS = ("fp8", "mxfp4")

# moelens parameters that an FP8 block checkpoint (DeepSeek-V3 / Kimi-K2 / GLM-FP8) stores in FP8:
# every linear projection of the decoder except the router (embeddings, norms, router stay bf16/fp32)
FP8_PACKED = (r"blocks\.\d+\.(attn\.(w_q|w_k|w_v|w_o|W_q_a|W_q_b|W_kv_a|W_kv_b)"
              r"|mlp\.(w_gate|w_up|w_down)|mlp\.experts\.(w_gate|w_up|w_down)|mlp\.shared_experts\.(w_gate|w_up|w_down))")
# what gpt-oss's MXFP4 checkpoints pack: the routed expert banks only
MXFP4_PACKED = r"blocks\.\d+\.mlp\.experts\.(w_gate|w_up|w_down)"
PACKED_PATTERNS = {"fp8": FP8_PACKED, "mxfp4": MXFP4_PACKED}


class PackedAccessError(TypeError):
    """A packed expert bank was used as a whole tensor."""


def dequantize_fp8(q: Tensor, scale: Tensor, block: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """``q * scale`` per ``block`` in fp32, cast once to ``dtype``: the same products as
    :meth:`Fp8BlockFormat.dequantize` (bit-identical, tested), vectorised when the block divides
    the matrix (no Python loop over row blocks: one kernel per step on a GPU)."""
    rows, cols = q.shape[-2:]
    bm, bn = block
    if rows % bm or cols % bn:  # partial edge blocks: the loader's loop
        return Fp8BlockFormat(block=block).dequantize("packed", q, scale, dtype)
    s = Fp8BlockFormat.scales_fp32(scale)
    lead = q.shape[:-2]
    w = q.to(torch.float32).view(*lead, rows // bm, bm, cols // bn, bn) * s[..., :, None, :, None]
    w = w.view(*lead, rows, cols)
    return w if dtype == torch.float32 else w.to(dtype)


class PackedTensor(nn.Module):
    """One weight (``[out, in]``, or a bank ``[*lead, out, in]``) held packed; see the module doc.

    ``shape``/``dtype``/``device`` describe the dequantised tensor (``dtype`` is the model dtype
    the weight is dequantised to; ``model.to(dtype)`` changes it and leaves the packed bytes as
    they are). ``nbytes`` is what is resident."""

    def __init__(self, fmt: str, shape: Sequence[int], dtype: torch.dtype, block: Optional[tuple[int, int]] = None,
                 device=None, name: str = ""):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown packed format {fmt!r} ({', '.join(FORMATS)})")
        self.fmt, self.shape, self.dtype, self.name = fmt, torch.Size(shape), dtype, name
        *lead, rows, cols = self.shape
        if fmt == "fp8":
            self.block = tuple(block or (128, 128))
            bm, bn = self.block
            self.register_buffer("q", torch.empty(*self.shape, dtype=torch.float8_e4m3fn, device=device))
            self.register_buffer("scale", torch.empty(*lead, math.ceil(rows / bm), math.ceil(cols / bn),
                                                      dtype=torch.float32, device=device))
        else:
            if cols % 32:
                raise QuantFormatError(f"{name}: MXFP4 packs 32 values per group; in-features {cols} is not a multiple of 32")
            self.block = (1, 32)
            self.register_buffer("blocks", torch.empty(*lead, rows, cols // 32, 16, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(*lead, rows, cols // 32, dtype=torch.uint8, device=device))
        self.filled: set = set()

    # -- what it looks like ------------------------------------------------------------------
    @property
    def n_lead(self) -> int:
        return len(self.shape) - 2

    @property
    def device(self) -> torch.device:
        return next(iter(self._buffers.values())).device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def extra_repr(self) -> str:
        return f"{self.fmt}, shape={tuple(self.shape)}, dtype={self.dtype}, block={self.block}"

    # -- dequantisation -------------------------------------------------------------------------
    def _packed(self):
        return (self.q, self.scale) if self.fmt == "fp8" else (self.blocks, self.scales)

    def _dequantize(self, a: Tensor, b: Tensor) -> Tensor:
        if self.fmt == "fp8":
            return dequantize_fp8(a, b, self.block, self.dtype)
        return mxfp4.dequantize(a, b, self.dtype)

    def __getitem__(self, index) -> Tensor:
        """Dequantise the selected leading entries (experts): ``bank[e]`` -> ``[out, in]``."""
        if self.n_lead == 0:
            raise PackedAccessError(f"{self.name}: a packed matrix has no expert axis; read it whole (dequantize())")
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        a, b = self._packed()
        out = self._dequantize(a[first], b[first])
        return out[(slice(None),) * (out.ndim - 2) + tuple(rest)] if rest else out

    def dequantize(self) -> Tensor:
        """The whole tensor in the model dtype (for a bank: every expert at once; the forward never
        does this)."""
        return self._dequantize(*self._packed())

    def __len__(self) -> int:
        return self.shape[0]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if hasattr(Tensor, name) and not name.startswith("__"):  # dunders: protocol probes (copy, pickle)
                raise PackedAccessError(
                    f"{self.name or 'this weight'} is kept packed ({self.fmt}, keep_quantized=True), not a tensor: "
                    f"`.{name}` would need the whole {tuple(self.shape)} bank dequantised. Index it per expert "
                    f"(`bank[e]` is expert e's [out, in] matrix in {self.dtype}), or load the model without "
                    f"keep_quantized to have plain tensors."
                ) from None
            raise

    # -- device and dtype moves -----------------------------------------------------------------
    def _apply(self, fn: Callable, recurse: bool = True):
        """``model.to(device)`` / ``to_empty`` move the packed bytes; ``model.to(dtype)`` changes only
        the dtype they are dequantised to (the bytes are the checkpoint's: never re-encoded)."""
        cur = self.device
        probe = fn(torch.empty(0, dtype=self.dtype, device="cpu" if cur.type == "meta" else cur))
        if probe.dtype.is_floating_point:
            self.dtype = probe.dtype
        dev = probe.device
        if dev != cur:
            for k, v in self._buffers.items():
                self._buffers[k] = torch.empty_like(v, device=dev) if v.is_meta else v.to(dev)
        return self

    # -- loading ---------------------------------------------------------------------------------
    def fill(self, key: str, a: Tensor, b: Tensor, index=None, block: Optional[tuple[int, int]] = None) -> None:
        """Copy packed checkpoint tensors (``q``/``scale`` or ``blocks``/``scales``) into entry ``index``
        (an expert) or, with ``index=None``, the whole tensor; shapes are checked."""
        tag = "all" if index is None else index
        if tag in self.filled or ("all" in self.filled):
            from moelens.errors import CheckpointError

            raise CheckpointError(f"{key}: {self.name}{'' if index is None else f'[{index}]'} is filled twice by the checkpoint")
        if self.fmt == "fp8":
            if block is not None and tuple(block) != tuple(self.block):
                if self.filled:
                    raise QuantFormatError(
                        f"{key}: FP8 block {tuple(block)} differs from the {tuple(self.block)} of the other experts of {self.name}")
                self.block = tuple(block)
                *lead, rows, cols = self.shape
                self._buffers["scale"] = torch.empty(*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]),
                                                     dtype=torch.float32, device=self.device)
            b = Fp8BlockFormat.scales_fp32(b)
        dst_a, dst_b = self._packed()
        if index is not None:
            dst_a, dst_b = dst_a[index], dst_b[index]
        for dst, src, what in ((dst_a, a, "weight"), (dst_b, b, "scales")):
            if tuple(dst.shape) != tuple(src.shape):
                from moelens.errors import CheckpointError

                raise CheckpointError(f"{key}: packed {what} of shape {tuple(src.shape)}, expected {tuple(dst.shape)} "
                                      f"(for {self.name}{'' if index is None else f'[{index}]'})")
            dst.copy_(src.to(dst.device))
        self.filled.add(tag)

    def missing(self) -> list:
        if "all" in self.filled:
            return []
        if self.n_lead == 0:
            return ["all"]
        return sorted(set(range(self.shape[0])) - self.filled)


class _DequantOnAccess:
    """Mixin given to a module that owns packed whole matrices: reading such an attribute returns
    the dequantised matrix, so ``F.linear(x, self.w_o)`` runs unchanged."""

    def __getattr__(self, name: str):
        value = super().__getattr__(name)
        if isinstance(value, PackedTensor) and value.n_lead == 0:
            return value.dequantize()
        return value


_SWAPPED: dict[type, type] = {}


def _dequant_on_access(module: nn.Module) -> None:
    cls = type(module)
    if issubclass(cls, _DequantOnAccess):
        return
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type(cls.__name__, (_DequantOnAccess, cls), {"__module__": cls.__module__,
                                                                     "__qualname__": cls.__qualname__})
    module.__class__ = _SWAPPED[cls]


@dataclass(frozen=True)
class PackSpec:
    """How one parameter is kept packed."""

    fmt: str
    block: Optional[tuple[int, int]] = None


def pack_model(model: nn.Module, specs: dict[str, PackSpec]) -> dict[str, PackedTensor]:
    """Replace each named parameter of ``specs`` by a :class:`PackedTensor` of the same shape (on the
    parameter's device: call it on the meta skeleton, before allocation). Returns ``{name: packed}``."""
    out = {}
    for name, spec in specs.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        p = owner._parameters.get(attr)
        if p is None:
            raise KeyError(f"keep_quantized: {name} is not a parameter of the model")
        packed = PackedTensor(spec.fmt, p.shape, p.dtype, spec.block, device=p.device, name=name)
        del owner._parameters[attr]
        owner.add_module(attr, packed)
        if packed.n_lead == 0:
            _dequant_on_access(owner)
        out[name] = packed
    return out


def packed_tensors(model: nn.Module) -> dict[str, PackedTensor]:
    """``{parameter name: PackedTensor}`` of a model (empty when nothing is packed)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedTensor)}


def specs_for(model: nn.Module, fmt: str, block: Optional[tuple[int, int]] = None,
              pattern: Optional[str] = None) -> dict[str, PackSpec]:
    """What a checkpoint of format ``fmt`` packs, by the declarative pattern of the format
    (:data:`PACKED_PATTERNS`): for planning memory on a meta skeleton without the checkpoint."""
    rx = re.compile(pattern or PACKED_PATTERNS[fmt])
    return {n: PackSpec(fmt, block) for n, p in model.named_parameters() if rx.fullmatch(n) and p.ndim >= 2}


def hf_format(hf_config: dict) -> Optional[tuple[str, Optional[tuple[int, int]]]]:
    """``(fmt, block)`` of ``config.json``'s ``quantization_config`` (None for a plain checkpoint)."""
    qc = hf_config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method == "fp8":
        return "fp8", Fp8BlockFormat.from_config(qc).block
    if method == "mxfp4":
        return "mxfp4", None
    return None


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (tied tensors once): what the weights hold in memory."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
