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
DeepSeek-V3,       fp32 (weight  sigmoid32   noaux_tc on      norm_topk_prob  fp32
Kimi-K2, GLM-4.x   kept fp32)                s + bias,        (+1e-20)        (x routed_scaling_factor)
(V3.2, GLM-5)                                unsorted
DeepSeek-V4        model         sqrt(soft-  top-k of s +     always          model
                                 plus(x))    bias, unsorted;  (+1e-20)        (x routed_scaling_factor)
                                             hash layers:
                                             tid2eid[token]
=================  ============  ==========  ===============  ==============  ============

DeepSeek-V3 router ("noaux_tc"), as transformers' ``DeepseekV3TopkRouter``::

    s = sigmoid(fp32 logits)                                  hook_router_scores (unbiased)
    c = s + b_correction                                      hook_router_selection_scores
    group score = sum of the top-2 of c in each of n_group groups; keep topk_group groups
    (unsorted), the other groups' c set to -inf; idx = topk(c, top_k, sorted=False)
    w = s[idx];  w /= (sum w + 1e-20) if norm_topk_prob;  w *= routed_scaling_factor (fp32)

The bias ``router.b_correction`` (hub ``e_score_correction_bias``, fp32 even in a bf16 model) only
decides *which* experts are chosen; it never enters a combine weight.

gpt-oss (``router_order="topk_softmax"``, ``router_bias``): transformers takes ``topk`` of the
biased logits and a softmax over the k selected logits in the logits' dtype. ``hook_router_scores``
still holds the fp32 softmax over *all* experts (the contract's meaning); its top-k renormalised
equals gpt-oss's weights mathematically, but the weights and the selection are computed from the
logits, as transformers does (same dtype, same ties).

Forced routing: :meth:`Router.weights` gathers the combine weights from the scores at whatever
indices it is given, so editing ``hook_expert_indices`` re-routes and the weights follow the
architecture's rule (renormalised over the forced set where the architecture renormalises).
Editing ``hook_expert_weights`` afterwards overrides the weights themselves.

For the sigmoid router this means: a forced expert ``e`` gets the weight ``s_e`` (its *unbiased*
sigmoid score; the correction bias plays no part), divided by ``sum_{forced} s + 1e-20`` when
``norm_topk_prob``, times ``routed_scaling_factor``. Editing ``hook_router_selection_scores``
changes the choice (group step included) but not the weights; editing ``hook_router_scores``
changes both (the selection scores are computed from the edited scores). Weight edits:
``router.W_router`` (fp32) and ``router.b_correction`` (fp32) are ordinary parameters; an edited
bias moves selection only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from typing import Optional

from jaxtyping import Float, Int
from torch import Tensor, nn

from moelens.config import MoEConfig


class Router(nn.Module):
    """``hashed`` (DeepSeek-V4's hash-routed layers): the experts of a token are the fixed table row
    ``tid2eid[token id]`` (an int64 parameter without gradient; hub buffer ``mlp.gate.tid2eid``);
    the scores still come from the learned ``W_router`` and give the weights. No correction bias."""

    def __init__(self, cfg: MoEConfig, hashed: bool = False):
        super().__init__()
        self.cfg = cfg
        self.hashed = hashed
        self.W_router = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        self.b_router = nn.Parameter(torch.zeros(cfg.n_experts)) if cfg.router_bias else None
        if cfg.router_correction_bias and not hashed:
            self.b_correction = nn.Parameter(torch.zeros(cfg.n_experts))
        if hashed:
            self.tid2eid = nn.Parameter(torch.zeros(cfg.d_vocab, cfg.top_k, dtype=torch.long), requires_grad=False)

    def _apply(self, fn, recurse=True):
        """``model.to(bfloat16)`` keeps the router in fp32 where transformers does
        (``_keep_in_fp32_modules_strict`` of the DeepSeek-V3 family)."""
        super()._apply(fn, recurse)
        if self.cfg.router_fp32_params:
            for p in self.parameters(recurse=False):
                if p.dtype != torch.float32 and p.is_floating_point():
                    p.data = p.data.float()
        b = getattr(self, "b_correction", None)  # an fp32 buffer in every transformers model that has it
        if b is not None and b.dtype != torch.float32:
            b.data = b.data.float()
        return self

    def logits(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos n_experts"]:
        b = self.b_router
        if self.cfg.router_dtype == "float32":
            return F.linear(x.float(), self.W_router.float(), None if b is None else b.float())
        return F.linear(x, self.W_router, b)

    def scores(self, logits: Float[Tensor, "batch pos n_experts"]) -> Float[Tensor, "batch pos n_experts"]:
        if self.cfg.router_score_func == "sigmoid":
            return torch.sigmoid(logits.float())
        if self.cfg.router_score_func == "sqrtsoftplus":  # DeepSeek-V4, in the logits' dtype as transformers
            return F.softplus(logits).sqrt()
        return torch.softmax(logits.float(), dim=-1)

    def selection_scores(self, scores: Float[Tensor, "batch pos n_experts"]) -> Float[Tensor, "batch pos n_experts"]:
        """The scores top-k runs on: ``scores + b_correction`` (fp32) with a correction bias, else the scores."""
        if not self.cfg.router_correction_bias or self.hashed:
            return scores
        return scores + self.b_correction

    def select(
        self, scores: Float[Tensor, "batch pos n_experts"], logits: Optional[Tensor] = None,
        tokens: Optional[Tensor] = None,
    ) -> Int[Tensor, "batch pos top_k"]:
        cfg = self.cfg
        if self.hashed:
            if tokens is None:
                raise ValueError(
                    "a hash-routed layer chooses its experts from the token ids (tid2eid[token]); this forward has "
                    "none (a residual-stream input, start_at_layer): run from tokens, or edit hook_expert_indices"
                )
            return self.tid2eid[tokens.to(self.tid2eid.device)].long()
        if cfg.router_order == "topk_softmax":
            if logits is None:
                raise ValueError("router_order='topk_softmax' selects on the logits: pass logits=")
            return torch.topk(logits, cfg.top_k, dim=-1, sorted=True).indices
        if cfg.topk_method == "noaux_tc":
            grouped = scores.unflatten(-1, (cfg.n_group, -1))
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            keep = torch.topk(group_scores, cfg.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores).scatter_(-1, keep, 1.0)
            scores = grouped.masked_fill(~group_mask.bool()[..., None], float("-inf")).flatten(-2)
            return torch.topk(scores, cfg.top_k, dim=-1, sorted=False).indices
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
            denominator = w.sum(dim=-1, keepdim=True)
            w = w / (denominator + cfg.router_renorm_eps if cfg.router_renorm_eps else denominator)
        if cfg.routed_scaling_factor != 1.0:
            w = w * cfg.routed_scaling_factor
        return w.to(dtype) if cfg.router_weights_dtype == "model" else w
