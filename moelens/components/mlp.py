"""SwiGLU feed-forward: the dense MLP of non-sparse layers and the shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from moelens.components.tl_views import GatedMLPViews
from moelens.hooks import ShapedHookPoint


class GatedMLP(GatedMLPViews, nn.Module):
    """``w_down (silu(w_gate x) * (w_up x))``. Hooks: ``hook_pre`` (gate pre-activation) and
    ``hook_post`` (the hidden product that ``w_down`` reads), both ``[batch, pos, width]``."""

    def __init__(self, d_model: int, d_hidden: int, width_name: str = "d_mlp", act: str = "silu", limit: float = 0.0):
        super().__init__()
        # "silu", "gelu_tanh" (Gemma), or "clamped_silu" (DeepSeek-V4): silu(min(gate, limit)) *
        # clamp(up, -limit, limit); hook_pre is the unclamped gate pre-activation
        self.act, self.limit = act, limit
        self.w_gate = nn.Parameter(torch.empty(d_hidden, d_model))
        self.w_up = nn.Parameter(torch.empty(d_hidden, d_model))
        self.w_down = nn.Parameter(torch.empty(d_model, d_hidden))
        self.hook_pre = ShapedHookPoint(f"batch pos {width_name}")
        self.hook_post = ShapedHookPoint(f"batch pos {width_name}")

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(F.linear(x, self.w_gate))
        from moelens.components.experts import gate_activation

        up = F.linear(x, self.w_up)
        if self.act == "clamped_silu":
            post = self.hook_post(F.silu(pre.clamp(max=self.limit)) * up.clamp(min=-self.limit, max=self.limit))
        else:
            post = self.hook_post(gate_activation(self.act)(pre) * up)
        return F.linear(post, self.w_down)
