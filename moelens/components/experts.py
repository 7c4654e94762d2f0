"""Routed experts: a bank of SwiGLU FFNs evaluated only on the (token, slot) pairs routed to them.

Two implementations with identical results:

* :meth:`Experts.forward_loop` - the reference: for each expert, find its (token, slot) pairs
  with a mask and run the FFN on them.
* :meth:`Experts.forward_sorted` - the default: sort the ``batch*pos*top_k`` pairs by expert once,
  run each expert on one contiguous slice (batched matmuls), un-permute.
* :meth:`Experts.forward_grouped` - opt-in (``expert_impl="grouped_mm"``): the same sorted rows
  through ``torch._grouped_mm``, one kernel per projection for all experts (what transformers uses
  by default; meant for GPUs with many experts; tested equal on CPU, not measured on a GPU here).

Both return the *unweighted* output of each slot's expert, ``[batch, pos, top_k, d_model]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn


def clamped_swiglu(gate: Tensor, up: Tensor, alpha: float, limit: float) -> Tensor:
    """gpt-oss's expert activation, in transformers' operation order:
    ``g = min(g, limit)``, ``u = clamp(u, -limit, limit)``, ``(u + 1) * g * sigmoid(alpha * g)``."""
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class Experts(nn.Module):
    """``n_experts`` gated FFNs. ``act="silu"``: ``w_down (silu(w_gate x) * w_up x)``;
    ``act="clamped_swiglu"`` (gpt-oss): :func:`clamped_swiglu`. With ``bias`` (gpt-oss) every
    projection has a per-expert bias ``b_gate``/``b_up [n_experts, d_expert]``, ``b_down [n_experts, d_model]``,
    added after the matmul (as transformers adds it)."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int, impl: str = "sorted", *, bias: bool = False,
                 act: str = "silu", alpha: float = 1.702, limit: float = 7.0):
        super().__init__()
        self.n_experts = n_experts
        self.impl = impl
        self.act, self.alpha, self.limit = act, alpha, limit
        if act not in ("silu", "clamped_swiglu", "clamped_silu"):
            raise ValueError(f"unknown expert activation {act!r} (silu, clamped_swiglu, clamped_silu)")
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
        return F.silu(gate) * up

    def ffn(self, e: int, x: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
        """Expert ``e`` applied to rows ``x``."""
        gate, up = F.linear(x, self.w_gate[e]), F.linear(x, self.w_up[e])
        if self.b_gate is not None:
            gate, up = gate + self.b_gate[e], up + self.b_up[e]
        out = F.linear(self.activation(gate, up), self.w_down[e])
        return out + self.b_down[e] if self.b_down is not None else out

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], indices: Int[Tensor, "batch pos top_k"]
    ) -> Float[Tensor, "batch pos top_k d_model"]:
        if self.impl == "loop":
            return self.forward_loop(x, indices)
        if self.impl == "grouped_mm":
            return self.forward_grouped(x, indices)
        return self.forward_sorted(x, indices)

    def forward_loop(self, x: Tensor, indices: Tensor) -> Tensor:
        out = x.new_zeros(*indices.shape, x.shape[-1])
        for e in range(self.n_experts):
            b, p, s = (indices == e).nonzero(as_tuple=True)
            if b.numel():
                out[b, p, s] = self.ffn(e, x[b, p])
        return out

    def forward_sorted(self, x: Tensor, indices: Tensor) -> Tensor:
        k = indices.shape[-1]
        x_flat = x.reshape(-1, x.shape[-1])
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        rows = x_flat[order // k]
        pieces, start = [], 0
        for e, n in enumerate(counts):
            if n:
                pieces.append(self.ffn(e, rows[start : start + n]))
                start += n
        out = torch.empty(flat.numel(), x.shape[-1], dtype=x.dtype, device=x.device)
        out[order] = torch.cat(pieces) if pieces else rows
        return out.view(*indices.shape, x.shape[-1])

    def forward_grouped(self, x: Tensor, indices: Tensor) -> Tensor:
        if not hasattr(torch, "_grouped_mm"):
            raise RuntimeError("expert_impl='grouped_mm' needs torch._grouped_mm (PyTorch >= 2.8)")
        k = indices.shape[-1]
        x_flat = x.reshape(-1, x.shape[-1])
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        offsets = torch.cumsum(torch.bincount(flat, minlength=self.n_experts), 0).to(torch.int32)
        rows = x_flat[order // k]
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
