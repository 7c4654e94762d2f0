"""Routed experts: a bank of SwiGLU FFNs evaluated only on the (token, slot) pairs routed to them.

Implementations with identical results (``expert_impl``, tested equal):

* :meth:`Experts.forward_loop` (``"loop"``) - the reference: for each expert, find its (token, slot)
  pairs with a mask and run the FFN on them.
* :meth:`Experts.forward_sorted` (``"sorted"``) - sort the ``batch*pos*top_k`` pairs by expert once,
  run each expert on one contiguous slice, un-permute. Reads the per-expert counts back to the
  host (one synchronisation per layer on a GPU); one small matmul per routed expert.
* :meth:`Experts.forward_grouped` (``"grouped_mm"``) - the same sorted rows through
  ``torch._grouped_mm``, one kernel per projection for all experts (what transformers runs by
  default), with no host synchronisation: the group offsets stay on the device.
* ``"auto"`` (the default) picks per call, by the input's device: ``grouped_mm`` on CUDA where
  torch has a grouped kernel for the dtype (:func:`grouped_mm_available`), ``sorted`` elsewhere.

Weights kept packed (``keep_quantized=True``, :mod:`moelens.quant.packed`) are dequantised one
expert at a time inside :meth:`Experts.ffn`, so packed banks run the per-expert paths (``auto``
chooses ``sorted``; ``grouped_mm`` would need the whole bank dequantised and is refused).

All return the output of each slot's expert, ``[batch, pos, top_k, d_model]``: unweighted, or with
``slot_scale [batch, pos, top_k]`` (Llama 4's input-scaled experts) the expert applied to its
slot's scaled input ``slot_scale * x``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from moelens.components.tl_views import ExpertViews


def clamped_swiglu(gate: Tensor, up: Tensor, alpha: float, limit: float) -> Tensor:
    """gpt-oss's expert activation, in transformers' operation order:
    ``g = min(g, limit)``, ``u = clamp(u, -limit, limit)``, ``(u + 1) * g * sigmoid(alpha * g)``."""
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def gate_activation(act: str):
    """The gate nonlinearity of a gated FFN: ``silu`` or ``gelu_tanh`` (GELU, tanh approximation: Gemma)."""
    if act == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.silu


# tests set "on" to run the GPU code path on the CPU (moelens.testing.gpu_code_path)
GPU_CODE_PATH = {"on": False}


def on_gpu_path(t: Tensor) -> bool:
    """Whether ``t``'s computation takes the GPU code path (no host synchronisation)."""
    return t.device.type == "cuda" or GPU_CODE_PATH["on"]


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``expert_impl="auto"`` runs ``torch._grouped_mm`` here: CUDA devices of compute
    capability >= 8.0 (>= 9.0 before torch 2.9), in bf16 (the dtype its CUDA kernel takes); any
    device where torch has the op under :func:`moelens.testing.gpu_code_path`."""
    if GPU_CODE_PATH["on"] and device.type != "cuda":
        return hasattr(torch, "_grouped_mm")
    if device.type != "cuda" or dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    major, minor = torch.cuda.get_device_capability(device)
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return (major, minor) >= (8, 0) if version >= (2, 9) else major == 9


class Experts(ExpertViews, nn.Module):
    """``n_experts`` gated FFNs. ``act="silu"``: ``w_down (silu(w_gate x) * w_up x)``;
    ``act="clamped_swiglu"`` (gpt-oss): :func:`clamped_swiglu`. With ``bias`` (gpt-oss) every
    projection has a per-expert bias ``b_gate``/``b_up [n_experts, d_expert]``, ``b_down [n_experts, d_model]``,
    added after the matmul (as transformers adds it)."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int, impl: str = "auto", *, bias: bool = False,
                 act: str = "silu", alpha: float = 1.702, limit: float = 7.0):
        super().__init__()
        self.n_experts = n_experts
        self.impl = impl
        self.act, self.alpha, self.limit = act, alpha, limit
        if act not in ("silu", "clamped_swiglu", "gelu_tanh", "clamped_silu"):
            raise ValueError(f"unknown expert activation {act!r} (silu, clamped_swiglu, gelu_tanh, clamped_silu)")
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        if bias:
            self.b_gate = nn.Parameter(torch.zeros(n_experts, d_expert))
            self.b_up = nn.Parameter(torch.zeros(n_experts, d_expert))
            self.b_down = nn.Parameter(torch.zeros(n_experts, d_model))
        else:
            self.b_gate = self.b_up = self.b_down = None

    def activation(self, gate: Tensor, up: Tensor) -> Tensor:
        if self.act == "clamped_swiglu":
            return clamped_swiglu(gate, up, self.alpha, self.limit)
        if self.act == "clamped_silu":  # DeepSeek-V4
            return F.silu(gate.clamp(max=self.limit)) * up.clamp(min=-self.limit, max=self.limit)
        return gate_activation(self.act)(gate) * up

    def ffn(self, e: int, x: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
        """Expert ``e`` applied to rows ``x``."""
        gate, up = F.linear(x, self.w_gate[e]), F.linear(x, self.w_up[e])
        if self.b_gate is not None:
            gate, up = gate + self.b_gate[e], up + self.b_up[e]
        out = F.linear(self.activation(gate, up), self.w_down[e])
        return out + self.b_down[e] if self.b_down is not None else out

    @property
    def packed(self) -> bool:
        """Whether the expert weights are kept packed (``keep_quantized=True``)."""
        return "w_gate" in self._modules

    def resolved_impl(self, x: Tensor) -> str:
        """The implementation a call on ``x`` runs (``"auto"`` resolved by device, dtype and packing)."""
        impl = self.impl
        if impl == "auto":
            return "grouped_mm" if not self.packed and grouped_mm_available(x.device, x.dtype) else "sorted"
        if impl == "grouped_mm" and self.packed:
            raise ValueError(
                "expert_impl='grouped_mm' needs every expert's weights at once, but they are kept packed "
                "(keep_quantized=True) and dequantised one expert at a time: use expert_impl='auto' or 'sorted', "
                "or load without keep_quantized"
            )
        return impl

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], indices: Int[Tensor, "batch pos top_k"],
        slot_scale: Optional[Float[Tensor, "batch pos top_k"]] = None,
    ) -> Float[Tensor, "batch pos top_k d_model"]:
        impl = self.resolved_impl(x)
        if impl == "loop":
            return self.forward_loop(x, indices, slot_scale)
        if impl == "grouped_mm":
            return self.forward_grouped(x, indices, slot_scale)
        return self.forward_sorted(x, indices, slot_scale)

    def forward_loop(self, x: Tensor, indices: Tensor, slot_scale: Optional[Tensor] = None) -> Tensor:
        out = x.new_zeros(*indices.shape, x.shape[-1])
        for e in range(self.n_experts):
            b, p, s = (indices == e).nonzero(as_tuple=True)
            if b.numel():
                rows = x[b, p] if slot_scale is None else (x[b, p] * slot_scale[b, p, s, None]).to(x.dtype)
                out[b, p, s] = self.ffn(e, rows)
        return out

    def _sorted_rows(self, x: Tensor, indices: Tensor, slot_scale: Optional[Tensor]):
        """(flat expert ids, sort order, the rows in that order (scaled per slot when asked))."""
        k = indices.shape[-1]
        x_flat = x.reshape(-1, x.shape[-1])
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        rows = x_flat[order // k]
        if slot_scale is not None:
            rows = (rows * slot_scale.reshape(-1)[order, None]).to(x.dtype)
        return flat, order, rows

    def forward_sorted(self, x: Tensor, indices: Tensor, slot_scale: Optional[Tensor] = None) -> Tensor:
        flat, order, rows = self._sorted_rows(x, indices, slot_scale)
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        pieces, start = [], 0
        for e, n in enumerate(counts):
            if n:
                pieces.append(self.ffn(e, rows[start : start + n]))
                start += n
        out = torch.empty(flat.numel(), x.shape[-1], dtype=x.dtype, device=x.device)
        out[order] = torch.cat(pieces) if pieces else rows
        return out.view(*indices.shape, x.shape[-1])

    def forward_grouped(self, x: Tensor, indices: Tensor, slot_scale: Optional[Tensor] = None) -> Tensor:
        if not hasattr(torch, "_grouped_mm"):
            raise RuntimeError("expert_impl='grouped_mm' needs torch._grouped_mm (PyTorch >= 2.8)")
        flat, order, rows = self._sorted_rows(x, indices, slot_scale)
        # counts by scatter-add, not bincount (which reads the maximum back to the host on CUDA)
        counts = torch.zeros(self.n_experts, dtype=torch.int32, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        gate = torch._grouped_mm(rows, self.w_gate.transpose(1, 2), offs=offsets)
        up = torch._grouped_mm(rows, self.w_up.transpose(1, 2), offs=offsets)
        if self.b_gate is not None:
            sorted_ids = flat[order]
            gate, up = gate + self.b_gate[sorted_ids], up + self.b_up[sorted_ids]
        down = torch._grouped_mm(self.activation(gate, up), self.w_down.transpose(1, 2), offs=offsets)
        if self.b_down is not None:
            down = down + self.b_down[sorted_ids]
        out = torch.empty_like(down)
        out[order] = down
        return out.view(*indices.shape, x.shape[-1])
