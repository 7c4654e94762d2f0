"""Expert removal as named, documented semantics, batched over rows.

Two independent choices describe how an expert is removed at a sparse layer ``l``:

``scope``
    ``"position"``: only at one position ``p`` of the row (moelens' default audit: the removal
    cannot act through earlier positions); ``"sequence"``: at every position of the row where the
    expert was routed (what the audit paper's forward hooks on ``experts[e]`` do).

``semantics``
    ``"zero"``: the expert's combine weight is set to 0 and the other slots keep theirs (the paper:
    its hook returns ``zeros_like(output)``); ``"route_around"``: as ``zero``, then the surviving
    slots of that token are rescaled to the token's original weight sum; ``"reroute"``: the slot is
    given to the best-scoring expert the token did not choose (scored as the router's top-k
    scores them: ``scores + correction bias`` for the DeepSeek-V3 family, and only within the
    groups the router kept for that token for group-limited routers), and its weight follows the
    architecture's router rule for the new set (``Router.weights`` at the edited indices: the
    renormalised or raw score of the new expert).

Tokens where the expert was not routed are untouched under every semantics, so removing an
unrouted expert changes nothing. Each row of a batch may remove a different expert (``-1``: remove
nothing, the row stays clean), and, with ``scope="position"``, at a different position.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

SCOPES = ("position", "sequence")
SEMANTICS = ("zero", "route_around", "reroute")


def _check(model, layer: int, scope: str, semantics: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    if layer not in model.cfg.moe_layers:
        raise ValueError(
            f"layer {layer} is not a sparse layer of this model (sparse layers: {model.cfg.moe_layers})"
        )


def removal_hooks(
    model,
    layer: int,
    experts: Union[Sequence[int], Sequence[Sequence[int]], Tensor],
    positions: Optional[Union[Sequence[int], Tensor]] = None,
    *,
    scope: str = "sequence",
    semantics: str = "zero",
) -> list[tuple[str, Callable]]:
    """``fwd_hooks`` removing, in row ``r`` of the batch, expert(s) ``experts[r]`` at ``layer``.

    ``experts``: one expert id per row (``-1`` for none), or a list of expert ids per row (several
    experts removed together, e.g. progressive ablation; pad with ``-1``). ``positions``: one
    position per row, required with ``scope="position"``. See the module docstring for the
    semantics. Use with ``model.run_with_hooks(tokens, fwd_hooks=removal_hooks(...))``.
    """
    _check(model, layer, scope, semantics)
    ex = torch.as_tensor(experts, dtype=torch.long)
    if ex.ndim == 1:
        ex = ex[:, None]
    if ex.numel() and int(ex.max()) >= model.cfg.n_experts:
        raise ValueError(f"expert {int(ex.max())} out of range: this model has {model.cfg.n_experts} experts")
    pos = None
    if scope == "position":
        if positions is None:
            raise ValueError("scope='position' needs one position per row")
        pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if pos.numel() != ex.shape[0]:
            raise ValueError(f"{pos.numel()} positions for {ex.shape[0]} rows")
    state: dict[str, Tensor] = {}

    def hit_mask(idx: Tensor) -> Tensor:
        """``[batch, pos, top_k]`` True where the slot holds an expert this row removes."""
        e = ex.to(idx.device)
        if e.shape[0] != idx.shape[0]:
            raise ValueError(f"removal hooks were built for {e.shape[0]} rows, the batch has {idx.shape[0]}")
        hit = (idx[..., None] == e[:, None, None, :]).any(-1)
        if pos is not None:
            keep = torch.zeros_like(hit)
            keep[torch.arange(idx.shape[0], device=idx.device), pos.to(idx.device)] = True
            hit = hit & keep
        return hit

    def grab_scores(scores, hook):
        state["scores"] = scores
        return scores

    def edit_indices(idx, hook):
        hit = hit_mask(idx)
        state["hit"] = hit
        if semantics != "reroute" or not bool(hit.any()):
            return idx
        choice = state.pop("scores")
        scores = choice.float().clone()
        # never re-route to an expert the token already has or to one this row removes
        scores.scatter_(-1, idx, float("-inf"))
        e = ex.to(idx.device)
        banned = (torch.arange(scores.shape[-1], device=idx.device) == e[..., None]).any(-2)  # [batch, n_experts]
        scores = scores.masked_fill(banned[:, None, :], float("-inf"))
        n_hit = int(hit.sum(-1).max())
        scores = _restrict_to_kept_groups(model.cfg, choice, scores, n_hit)
        best = torch.topk(scores, n_hit, dim=-1).indices  # [batch, pos, n_hit]
        order = hit.long().cumsum(-1) - 1  # the j-th hit slot of a token takes its j-th best
        replacement = best.gather(-1, order.clamp(min=0))
        return torch.where(hit, replacement, idx)

    def edit_weights(w, hook):
        hit = state.pop("hit")
        if semantics == "reroute" or not bool(hit.any()):
            return w
        if semantics == "route_around":
            wf = w.float()
            total = wf.sum(-1, keepdim=True)
            rest = (wf * ~hit).sum(-1, keepdim=True)
            scale = torch.where(rest != 0, total / torch.where(rest != 0, rest, torch.ones_like(rest)),
                                torch.ones_like(rest))
            scale = torch.where(hit.any(-1, keepdim=True), scale, torch.ones_like(scale))
            w = (wf * scale).to(w.dtype)
        return w.masked_fill(hit, 0)

    pre = f"blocks.{layer}.mlp."
    hooks = [(pre + "hook_expert_indices", edit_indices), (pre + "hook_expert_weights", edit_weights)]
    if semantics == "reroute":
        # what the router's top-k selects on: the biased scores for the DeepSeek-V3 family
        choice = "hook_router_selection_scores" if model.cfg.router_correction_bias else "hook_router_scores"
        hooks.insert(0, (pre + choice, grab_scores))
    return hooks


def _restrict_to_kept_groups(cfg, choice: Tensor, candidates: Tensor, n_needed: int) -> Tensor:
    """``candidates`` (selection scores, ``-inf`` where banned) with the experts outside the
    token's kept groups also at ``-inf``, for group-limited routers (``noaux_tc``,
    ``group_limited_greedy``): the groups are the ones the router kept for the clean token
    (computed from ``choice`` as :meth:`Router.select` does), so a rerouted slot goes where the
    router's own top-k looks next. A token whose kept groups hold fewer than ``n_needed``
    candidates keeps every expert as a candidate. Other routers: ``candidates`` unchanged."""
    if cfg.topk_method not in ("noaux_tc", "group_limited_greedy") or cfg.n_group <= 1:
        return candidates
    grouped = choice.float().unflatten(-1, (cfg.n_group, -1))
    if cfg.topk_method == "noaux_tc":
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    keep = torch.topk(group_scores, cfg.topk_group, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, keep, True)
    expert_mask = group_mask.repeat_interleave(cfg.n_experts // cfg.n_group, dim=-1)
    restricted = candidates.masked_fill(~expert_mask, float("-inf"))
    room = torch.isfinite(restricted).sum(-1, keepdim=True) >= n_needed
    return torch.where(room, restricted, candidates)
