"""The router: logits -> scores -> chosen experts -> combine weights, each step a function.

Semantics per architecture (all from transformers 5, selected by config fields):

=================  ============  ==========  ===============  ==============  ============
architecture       logits dtype  scores      selection        renormalise     weight dtype
=================  ============  ==========  ===============  ==============  ============
Mixtral            model         softmax32   top-k, sorted    always          fp32
Qwen2/3-MoE, OLMoE model         softmax32   top-k, sorted    norm_topk_prob  model
DeepSeek-V2        fp32          softmax32   greedy or        never           fp32
                                             group-limited,                   (x routed_scaling_factor)
                                             unsorted
gpt-oss            model (+bias) softmax32   top-k of the     softmax over    model
                                 (hook only) logits, sorted   the k logits
=================  ============  ==========  ===============  ==============  ============

gpt-oss (``router_order="topk_softmax"``, ``router_bias``): transformers takes ``topk`` of the
biased logits and a softmax over the k selected logits in the logits' dtype. ``hook_router_scores``
still holds the fp32 softmax over *all* experts (the contract's meaning); its top-k renormalised
equals gpt-oss's weights mathematically, but the weights and the selection are computed from the
logits, as transformers does (same dtype, same ties).

Forced routing: :meth:`Router.weights` gathers the combine weights from the scores at whatever
indices it is given, so editing ``hook_expert_indices`` re-routes and the weights follow the
architecture's rule (renormalised over the forced set where the architecture renormalises).
Editing ``hook_expert_weights`` afterwards overrides the weights themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from typing import Optional

from jaxtyping import Float, Int
from torch import Tensor, nn

from moelens.config import MoEConfig


class Router(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.W_router = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        self.b_router = nn.Parameter(torch.zeros(cfg.n_experts)) if cfg.router_bias else None

    def logits(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos n_experts"]:
        b = self.b_router
        if self.cfg.router_dtype == "float32":
            return F.linear(x.float(), self.W_router.float(), None if b is None else b.float())
        return F.linear(x, self.W_router, b)

    @staticmethod
    def scores(logits: Float[Tensor, "batch pos n_experts"]) -> Float[Tensor, "batch pos n_experts"]:
        return torch.softmax(logits.float(), dim=-1)

    def select(
        self, scores: Float[Tensor, "batch pos n_experts"], logits: Optional[Tensor] = None
    ) -> Int[Tensor, "batch pos top_k"]:
        cfg = self.cfg
        if cfg.router_order == "topk_softmax":
            if logits is None:
                raise ValueError("router_order='topk_softmax' selects on the logits: pass logits=")
            return torch.topk(logits, cfg.top_k, dim=-1, sorted=True).indices
        if cfg.topk_method == "group_limited_greedy":
            grouped = scores.unflatten(-1, (cfg.n_group, -1))
            group_scores = grouped.max(dim=-1).values
            keep = torch.topk(group_scores, cfg.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores).scatter_(-1, keep, 1.0)
            scores = (grouped * group_mask[..., None]).flatten(-2)
        return torch.topk(scores, cfg.top_k, dim=-1, sorted=cfg.topk_sorted).indices

    def weights(
        self, scores: Float[Tensor, "batch pos n_experts"], indices: Int[Tensor, "batch pos top_k"], dtype,
        logits: Optional[Tensor] = None,
    ) -> Float[Tensor, "batch pos top_k"]:
        cfg = self.cfg
        if cfg.router_order == "topk_softmax":
            # softmax over the logits of the chosen (or forced) experts, in the logits' dtype
            if logits is None:
                raise ValueError("router_order='topk_softmax' weights the logits: pass logits=")
            chosen = logits.gather(-1, indices)
            return torch.softmax(chosen, dim=-1, dtype=chosen.dtype)
        w = scores.gather(-1, indices)
        if cfg.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        if cfg.routed_scaling_factor != 1.0:
            w = w * cfg.routed_scaling_factor
        return w.to(dtype) if cfg.router_weights_dtype == "model" else w
