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
Llama 4            model         sigmoid32   top-k of the     sigmoid of      model (scales
                                 (hook only) logits, sorted   each chosen     the expert's
                                                              logit           input)
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

Gemma 4 (``router_input_norm``, ``router_per_expert_scale``): the router reads the residual stream
(not the MoE input), ``logits = W (rms(x) * in_norm_w * d_model**-0.5)``; fp32 softmax, top-k,
always renormalised, then each weight times ``per_expert_scale[expert]`` (fp32 combine weights).

The bias ``router.b_correction`` (hub ``e_score_correction_bias``, fp32 even in a bf16 model) only
decides *which* experts are chosen; it never enters a combine weight.

Llama 4 (``router_order="topk_sigmoid"``, ``router_score_func="sigmoid"``): top-k (k = 1) of the
logits (model dtype, sorted), weight = ``sigmoid(logit)`` of each chosen expert in fp32 cast to the
model dtype; ``hook_router_scores`` is the fp32 sigmoid of all logits. The weight scales the
expert's *input* (``cfg.expert_input_scaled``; see :mod:`moelens.components.moe`).

gpt-oss (``router_order="topk_softmax"``, ``router_bias``): transformers takes ``topk`` of the
biased logits and a softmax over the k selected logits in the logits' dtype. ``hook_router_scores``
still holds the fp32 softmax over *all* experts (the contract's meaning); its top-k renormalised
equals gpt-oss's weights mathematically, but the weights and the selection are computed from the
logits, as transformers does (same dtype, same ties).

Granite (``router_order="topk_softmax"``, ``router_dtype="model_upcast"``): model-dtype logits upcast
to fp32, top-k of the logits, fp32 softmax over the k, times ``residual_multiplier``, cast to the
model dtype. ERNIE-4.5: fp32 softmax scores, ``b_correction`` added for selection (sorted top-k),
weights renormalised by ``clamp(sum, min=router_renorm_min)``. MiniMax-M2: sigmoid scores,
``b_correction`` for selection (unsorted top-k, no groups), weights renormalised (no epsilon), fp32.

PhiMoE (``router_order="sparsemixer"``): top-k of the model-dtype logits (sorted); each slot's weight
from :func:`sparsemixer_weights` (a softmax over the logits near the chosen one), not renormalised.

Forced routing: :meth:`Router.weights` gathers the combine weights from the scores at whatever
indices it is given, so editing ``hook_expert_indices`` re-routes and the weights follow the
architecture's rule (renormalised over the forced set where the architecture renormalises).
Editing ``hook_expert_weights`` afterwards overrides the weights themselves.

For the sigmoid router this means: a forced expert ``e`` gets the weight ``s_e`` (its *unbiased*
sigmoid score; the correction bias plays no part), divided by ``sum_{forced} s + 1e-20`` when
``norm_topk_prob``, times ``routed_scaling_factor``. Editing ``hook_router_selection_scores``
changes the choice (group step included) but not the weights; editing ``hook_router_scores``
changes both (the selection scores are computed from the edited scores). Weight edits:
``router.W_router`` (fp32) is an ordinary parameter and ``router.b_correction`` (fp32) a buffer, as
transformers holds it (in ``state_dict()``, not in ``parameters()``); either can be edited in place
under ``torch.no_grad()``, and an edited bias moves selection only.
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
        if cfg.router_correction_bias and cfg.correction_bias_counted and not hashed:
            # ERNIE-4.5: an fp32 nn.Parameter in transformers (``moe_statics.e_score_correction_bias``)
            self.b_correction = nn.Parameter(torch.zeros(cfg.n_experts, dtype=torch.float32))
        elif cfg.router_correction_bias and not hashed:
            # a (persistent) buffer, as transformers' ``e_score_correction_bias``: loaded and saved with
            # the weights, not in ``parameters()`` (an optimiser does not train it); fp32 where the
            # router is kept fp32 (see _apply)
            self.register_buffer("b_correction", torch.zeros(cfg.n_experts, dtype=torch.float32))
        if cfg.router_input_norm:  # Gemma 4: logits = W (rms(x) * in_norm_w * d_model**-0.5)
            self.in_norm_w = nn.Parameter(torch.ones(cfg.d_model))
        if cfg.router_per_expert_scale:  # Gemma 4: a learned scale per expert on the combine weights
            self.per_expert_scale = nn.Parameter(torch.ones(cfg.n_experts))
        if hashed:
            # a (persistent) int64 buffer, as transformers' ``tid2eid``: loaded with the weights, not a parameter
            self.register_buffer("tid2eid", torch.zeros(cfg.d_vocab, cfg.top_k, dtype=torch.long))

    def _apply(self, fn, recurse=True):
        """``model.to(bfloat16)`` keeps the router in fp32 where transformers does
        (``_keep_in_fp32_modules_strict`` of the DeepSeek-V3 family and ERNIE-4.5), the correction bias
        with it (and alone with ``cfg.correction_bias_fp32``: DeepSeek-V4); elsewhere (MiniMax-M2) the
        bias follows the model's dtype, as in transformers."""
        super()._apply(fn, recurse)
        if self.cfg.router_fp32_params:  # the router weight and the correction bias (buffer or parameter)
            for p in self.parameters(recurse=False):
                if p.dtype != torch.float32 and p.is_floating_point():
                    p.data = p.data.float()
        if self.cfg.router_fp32_params or self.cfg.correction_bias_fp32:
            b = self._buffers.get("b_correction")
            if b is not None and b.dtype != torch.float32:
                self._buffers["b_correction"] = b.float()
        return self

    def logits(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos n_experts"]:
        b = self.b_router
        if self.cfg.router_input_norm:
            x32 = x.float()
            normed = (x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps, -0.5)).to(x.dtype)
            x = normed * self.in_norm_w * self.cfg.d_model ** -0.5
        if self.cfg.router_dtype == "float32":
            return F.linear(x.float(), self.W_router.float(), None if b is None else b.float())
        if self.cfg.router_dtype == "model_upcast":  # Granite: model-dtype matmul, fp32 logits
            return F.linear(x, self.W_router, b).float()
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
        if cfg.router_order == "sparsemixer":
            if logits is None:
                raise ValueError("router_order='sparsemixer' selects on the logits: pass logits=")
            # transformers: slot by slot, the first maximal logit (Tensor.max), earlier slots excluded; ties
            # (frequent in bf16) resolve to the lower expert index, which topk does not promise
            remaining, chosen = logits, []
            for _ in range(cfg.top_k):
                idx = remaining.max(dim=-1, keepdim=True).indices
                chosen.append(idx)
                remaining = remaining.scatter(-1, idx, float("-inf"))
            return torch.cat(chosen, dim=-1)
        if cfg.router_order in ("topk_softmax", "topk_sigmoid"):
            if logits is None:
                raise ValueError(f"router_order={cfg.router_order!r} selects on the logits: pass logits=")
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
        if cfg.router_order == "sparsemixer":
            if logits is None:
                raise ValueError("router_order='sparsemixer' weights the logits: pass logits=")
            return sparsemixer_weights(logits, indices, cfg.router_jitter_eps)
        if cfg.router_order == "topk_softmax":
            # softmax over the logits of the chosen (or forced) experts, in the logits' dtype
            if logits is None:
                raise ValueError("router_order='topk_softmax' weights the logits: pass logits=")
            chosen = logits.gather(-1, indices)
            w = torch.softmax(chosen, dim=-1, dtype=chosen.dtype)
            if cfg.residual_multiplier != 1.0:
                w = w * cfg.residual_multiplier
            return w.to(dtype) if cfg.router_weights_dtype == "model" else w
        if cfg.router_order == "topk_sigmoid":
            # Llama 4: sigmoid of each chosen (or forced) logit, in fp32, cast to the logits' dtype
            if logits is None:
                raise ValueError("router_order='topk_sigmoid' weights the logits: pass logits=")
            chosen = logits.gather(-1, indices)
            return torch.sigmoid(chosen.float()).to(chosen.dtype)
        w = scores.gather(-1, indices)
        if cfg.norm_topk_prob:
            denominator = w.sum(dim=-1, keepdim=True)
            if cfg.router_renorm_min:  # ERNIE-4.5: clamp(sum, min=moe_norm_min)
                denominator = denominator.clamp(min=cfg.router_renorm_min)
            w = w / (denominator + cfg.router_renorm_eps if cfg.router_renorm_eps else denominator)
        if cfg.routed_scaling_factor != 1.0:
            w = w * cfg.routed_scaling_factor
        if cfg.residual_multiplier != 1.0:  # Granite: the block's residual multiplier, folded into the combine
            w = w * cfg.residual_multiplier
        if cfg.router_per_expert_scale:  # Gemma 4: after the renormalisation, per chosen expert
            w = w * self.per_expert_scale[indices]
        return w.to(dtype) if cfg.router_weights_dtype == "model" else w


def sparsemixer_weights(
    logits: Float[Tensor, "batch pos n_experts"], indices: Int[Tensor, "batch pos top_k"], eps: float
) -> Float[Tensor, "batch pos top_k"]:
    """PhiMoE's "sparsemixer" combine weights, as transformers computes them in eval mode, in the logits'
    dtype. For slot ``j`` with chosen expert ``e_j`` (logit ``t = logits[e_j]``): the experts of the earlier
    slots are excluded (-inf), so is every expert with ``(t - logit) / max(|logit|, t) > 2 eps``; the
    weight is the softmax of what remains, at ``e_j``. (transformers hard-codes two slots; the rule
    extends to any number, and to forced experts.)"""
    remaining = logits
    weights = []
    for j in range(indices.shape[-1]):
        idx = indices[..., j : j + 1]
        threshold = logits.gather(-1, idx)
        factor = logits.abs().clamp(min=threshold)
        far = ((threshold - logits) / factor) > (2 * eps)
        gates = torch.softmax(remaining.masked_fill(far, float("-inf")), dim=-1)
        weights.append(gates.gather(-1, idx))
        remaining = remaining.scatter(-1, idx, float("-inf"))
    return torch.cat(weights, dim=-1)
