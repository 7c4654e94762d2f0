"""The sparse MoE block: router -> experts -> combine, plus optional shared experts.

Hook points (all ``[batch, pos, ...]``):

``hook_router_logits``  raw router logits ``[batch, pos, n_experts]``
``hook_router_scores``  softmax (or sigmoid) scores before top-k ``[batch, pos, n_experts]`` (fp32)
``hook_router_selection_scores``  DeepSeek-V3 family only: ``scores + e_score_correction_bias``,
                        what top-k selects on ``[batch, pos, n_experts]`` (fp32)
``hook_expert_indices`` chosen experts ``[batch, pos, top_k]`` int64 (editing it re-routes)
``hook_expert_weights`` final combine weight per slot (Granite: times ``residual_multiplier``) ``[batch, pos, top_k]``
``hook_expert_out``     unweighted output of each slot's expert ``[batch, pos, top_k, d_model]``
``hook_routed_out``     ``sum_slots weight * expert_out`` ``[batch, pos, d_model]``
``hook_shared_gate``    Qwen2-MoE only: ``sigmoid(x . w)`` ``[batch, pos, 1]``
``hook_shared_out``     shared-expert output after its gate (Granite: times ``residual_multiplier``)
                        ``[batch, pos, d_model]``

The block's output is ``routed + shared``; the enclosing block hooks it as ``hook_mlp_out``.

Input-scaled experts (``cfg.expert_input_scaled``, Llama 4): the slot weight multiplies the
expert's *input*, ``E_e(w x)``, not its output. There ``hook_expert_weights`` holds ``w`` (the
sigmoid router score, editing it changes the expert's input scale; 0 removes the slot, since the
experts have no biases), ``hook_expert_out`` holds ``E_e(w x)`` (the slot's whole update, already
weighted) and ``hook_routed_out`` is the plain sum of the slots' ``hook_expert_out``. What expert
``e`` adds to the residual stream (``cache.expert_contribution``) is then its ``hook_expert_out``;
:func:`combine_weights` gives the factor of each slot's output in the combine (``w``, or 1 here),
which every contribution computation uses.
Combine numerics follow transformers' default (grouped_mm) backend: per-slot products in
``promote(model dtype, weight dtype)``, summed over slots, cast once to the model dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from moelens.components.experts import Experts, on_gpu_path
from moelens.components.mlp import GatedMLP
from moelens.components.router import Router
from moelens.components.tl_views import MoEViews
from moelens.config import MoEConfig
from moelens.hooks import ShapedHookPoint, has_hooks


def combine_weights(cfg: MoEConfig, weights: Tensor) -> Tensor:
    """The factor each slot's ``hook_expert_out`` is multiplied by in the combine: the slot weight,
    or 1 where the weight already scaled the expert's input (``cfg.expert_input_scaled``)."""
    return torch.ones_like(weights) if cfg.expert_input_scaled else weights


class MoE(MoEViews, nn.Module):
    """``layer`` decides per-layer routing (``cfg.hash_moe_layers``: DeepSeek-V4's hash-routed layers,
    whose experts are ``router.tid2eid[token id]``, the token ids coming from ``forward(x, tokens=)``)."""

    def __init__(self, cfg: MoEConfig, layer: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg, hashed=layer is not None and layer in cfg.hash_moe_layers)
        self.experts = Experts(
            cfg.n_experts, cfg.d_model, cfg.d_expert, impl=cfg.expert_impl, bias=cfg.expert_bias,
            act=cfg.mlp_act if cfg.expert_act == "silu" else cfg.expert_act, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit,
        )
        self.hook_router_logits = ShapedHookPoint("batch pos n_experts")
        self.hook_router_scores = ShapedHookPoint("batch pos n_experts")
        if cfg.router_correction_bias and not self.router.hashed:
            self.hook_router_selection_scores = ShapedHookPoint("batch pos n_experts")
        self.hook_expert_indices = ShapedHookPoint("batch pos top_k", kind="int")
        self.hook_expert_weights = ShapedHookPoint("batch pos top_k")
        self.hook_expert_out = ShapedHookPoint("batch pos top_k d_model")
        self.hook_routed_out = ShapedHookPoint("batch pos d_model")
        if cfg.has_shared_experts:
            shared_act = "clamped_silu" if cfg.expert_act == "clamped_silu" else cfg.mlp_act
            self.shared_experts = GatedMLP(cfg.d_model, cfg.d_shared, width_name="d_shared", act=shared_act,
                                           limit=cfg.swiglu_limit)
            if cfg.shared_gate:
                self.W_shared_gate = nn.Parameter(torch.empty(1, cfg.d_model))
                self.hook_shared_gate = ShapedHookPoint("batch pos 1")
            self.hook_shared_out = ShapedHookPoint("batch pos d_model")

    def forward(self, x: Float[Tensor, "batch pos d_model"], router_input: Optional[Tensor] = None,
                tokens: Optional[Tensor] = None) -> Float[Tensor, "batch pos d_model"]:
        """``router_input``: what the router reads when it is not ``x`` (Gemma 4: the residual stream);
        ``tokens [batch, pos]``: the token ids, needed by hash-routed layers only."""
        logits = self.hook_router_logits(self.router.logits(x if router_input is None else router_input))
        raw_scores = self.router.scores(logits)
        scores = self.hook_router_scores(raw_scores)
        if self.cfg.router_order in ("topk_softmax", "sparsemixer", "topk_sigmoid") and has_hooks(self.hook_router_scores):
            self._check_scores_unedited(raw_scores, scores)
        choice = scores
        if self.cfg.router_correction_bias and not self.router.hashed:
            choice = self.hook_router_selection_scores(self.router.selection_scores(scores))
        selected = self.router.select(choice, logits=logits, tokens=tokens)
        indices = self.hook_expert_indices(selected)
        # only an edit can make them invalid; on a GPU only a returned (not in-place) edit is checked,
        # as the check reads the range back to the host (in-place out-of-range edits fail in the gather)
        if has_hooks(self.hook_expert_indices) and (indices is not selected or not on_gpu_path(indices)):
            self._check_indices(indices)
        weights = self.hook_expert_weights(self.router.weights(scores, indices, x.dtype, logits=logits))
        if self.cfg.expert_input_scaled:  # Llama 4: E_e(w x), summed
            expert_out = self.hook_expert_out(self.experts(x, indices, slot_scale=weights))
            routed = self.hook_routed_out(expert_out.sum(dim=-2).to(x.dtype))
        else:
            expert_out = self.hook_expert_out(self.experts(x, indices))
            routed = self.hook_routed_out((expert_out * weights.unsqueeze(-1)).sum(dim=-2).to(x.dtype))
        if not self.cfg.has_shared_experts:
            return routed
        shared = self.shared_experts(x)
        if self.cfg.shared_gate:
            shared = self.hook_shared_gate(torch.sigmoid(F.linear(x, self.W_shared_gate))) * shared
        if self.cfg.residual_multiplier != 1.0:  # Granite: the block's residual multiplier
            shared = shared * self.cfg.residual_multiplier
        return routed + self.hook_shared_out(shared)

    def _check_scores_unedited(self, raw: Tensor, scores: Tensor) -> None:
        """gpt-oss selects and weights from the logits: an edited score tensor would be ignored."""
        if scores is not raw and not torch.equal(scores, raw):
            raise ValueError(
                f"{self.hook_router_scores.name}: this architecture selects and weights experts from the router "
                f"logits (top-k of the logits, softmax over the k), so an edit of hook_router_scores would be "
                f"ignored. Edit hook_router_logits, hook_expert_indices or hook_expert_weights instead."
            )

    def _check_indices(self, indices: Tensor) -> None:
        if indices.dtype.is_floating_point:
            raise TypeError(f"{self.hook_expert_indices.name}: expert indices must be integers, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.cfg.n_experts):
            raise IndexError(
                f"{self.hook_expert_indices.name}: expert index out of range [0, {self.cfg.n_experts}) "
                f"(got min {int(indices.min())}, max {int(indices.max())})"
            )
