"""Interventional effects: the change in cross-entropy when one routed expert's contribution is
removed at one position (batched row-wise ablations of ``hook_expert_weights``), and hooks that
remove an expert at a position or everywhere."""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from moelens.audit.ablation import removal_hooks
from moelens.audit.constants import EFFECT_COLUMNS
from moelens.audit.corpus import _check_layers


def sample_positions(n_tokens: int, n_positions: Optional[int], seed: int, seq_index: int = 0) -> list[int]:
    """Positions ``p`` (with a next token, ``0 <= p <= n_tokens - 2``) to ablate in one sequence:
    all of them when ``n_positions`` is None or not smaller, else a uniform sample without
    replacement from ``numpy.random.default_rng([seed, seq_index])``, sorted."""
    valid = max(n_tokens - 1, 0)
    if n_positions is None or n_positions >= valid:
        return list(range(valid))
    rng = np.random.default_rng([seed, seq_index])
    return sorted(int(p) for p in rng.choice(valid, size=n_positions, replace=False))


def _ablate_weights(w: Tensor, rows: Tensor, pos: Tensor, slots: Tensor, renormalize: bool) -> Tensor:
    """``w`` with slot ``slots[i]`` zeroed at ``(rows[i], pos[i])``; with ``renormalize`` the
    remaining slots of that token are rescaled so the weights keep their original sum (left
    unscaled when nothing remains)."""
    w = w.clone()
    if renormalize:
        sel = w[rows, pos].float()  # [n, top_k]
        total = sel.sum(-1)
        rest = total - sel.gather(-1, slots[:, None])[:, 0]
        scale = torch.where(rest != 0, total / torch.where(rest != 0, rest, torch.ones_like(rest)), torch.ones_like(rest))
        w[rows, pos] = (sel * scale[:, None]).to(w.dtype)
    w[rows, pos, slots] = 0
    return w


def _row_hook(rows: Tensor, pos: Tensor, slots: Tensor, renormalize: bool):
    def hook(w, hook):
        return _ablate_weights(w, rows.to(w.device), pos.to(w.device), slots.to(w.device), renormalize)

    return hook


def _token_nll(logits: Tensor, tokens: Tensor) -> Tensor:
    """``[rows, pos-1]`` next-token cross-entropy of each position (float32)."""
    rows, n, v = logits.shape
    targets = tokens[1:].expand(rows, n - 1)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, v), targets.reshape(-1), reduction="none").view(rows, n - 1)


@torch.no_grad()
def expert_effects(
    model,
    tokens: Union[Tensor, Sequence[int]],
    *,
    layers: Optional[Sequence[int]] = None,
    positions: Optional[Iterable[int]] = None,
    renormalize: bool = False,
    max_batch: int = 64,
) -> pd.DataFrame:
    """Causal effect of removing each routed expert at each position of one sequence.

    For every layer in ``layers``, position ``p`` in ``positions`` (default: every position with a
    next token) and routing slot ``s``, the slot's combine weight is set to 0 at position ``p``
    only (row-wise ``hook_expert_weights`` hook), which removes exactly that expert's contribution
    there; with ``renormalize`` the token's other slots are rescaled to the original weight sum.
    Unrouted experts contribute nothing, so they are not ablated (their effect is exactly 0).

    The ablations are stacked as rows of one batch (each row a copy of the sequence with one
    (layer, position, slot) ablated), ``max_batch`` rows per forward. Returns one row per
    ablation: ``layer, position, slot, expert, weight`` (clean combine weight), ``clean_ce``
    (clean cross-entropy of predicting token ``p+1`` at ``p``), ``delta_next`` (its change:
    ablated - clean) and ``delta_suffix`` (the change summed over positions ``p..end``, i.e. every
    prediction the ablation can affect).
    """
    return pd.DataFrame(_sequence_effects(model, tokens, _check_layers(model, layers), positions, renormalize, max_batch))


def _sequence_effects(model, tokens, layers, positions, renormalize, max_batch, ablation_scope: str = "position",
                      semantics: str = "zero") -> dict[str, list]:
    """See :func:`expert_effects`. ``ablation_scope``/``semantics``: how the expert is removed
    (:mod:`moelens.audit.ablation`); the default (one position, zeroed weight) uses the row-wise
    weight hook directly, any other choice goes through :func:`~moelens.audit.ablation.removal_hooks`."""
    if semantics == "route_around":
        renormalize = True
    generic = ablation_scope != "position" or semantics == "reroute"
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    device = model.rope_inv_freq.device
    x = torch.as_tensor(tokens, dtype=torch.long).reshape(-1).to(device)
    n = x.numel()
    cols: dict[str, list] = {c: [] for c in EFFECT_COLUMNS}
    positions = list(range(n - 1)) if positions is None else sorted({int(p) for p in positions})
    if any(not 0 <= p < n - 1 for p in positions):
        raise ValueError(f"positions must lie in [0, {n - 2}] (a next token is needed), got {positions}")
    if not positions:
        return cols
    names = [f"blocks.{l}.mlp.hook_expert_{k}" for l in layers for k in ("indices", "weights")]
    logits, cache = model.run_with_cache(x[None], names_filter=names, return_cache_object=False)
    clean = _token_nll(logits, x)[0]
    k = model.cfg.top_k
    ablations = [(l, p, s) for l in layers for p in positions for s in range(k)]
    delta_next, delta_suffix = [], []
    for start in range(0, len(ablations), max_batch):
        chunk = ablations[start:start + max_batch]
        rows = len(chunk)
        hooks = []
        for l in layers:
            r = [i for i, a in enumerate(chunk) if a[0] == l]
            if r and generic:
                experts = [int(cache[f"blocks.{l}.mlp.hook_expert_indices"][0, a[1], a[2]]) if a[0] == l else -1
                           for a in chunk]
                hooks += removal_hooks(model, l, experts, [a[1] for a in chunk], scope=ablation_scope,
                                       semantics="route_around" if renormalize and semantics == "zero" else semantics)
            elif r:
                hooks.append((
                    f"blocks.{l}.mlp.hook_expert_weights",
                    _row_hook(torch.tensor(r), torch.tensor([chunk[i][1] for i in r]),
                              torch.tensor([chunk[i][2] for i in r]), renormalize),
                ))
        out = model.run_with_hooks(x[None].expand(rows, n), fwd_hooks=hooks)
        delta = _token_nll(out, x) - clean[None]  # [rows, n-1]
        pos = torch.tensor([a[1] for a in chunk], device=delta.device)
        delta_next += delta.gather(1, pos[:, None])[:, 0].tolist()
        after = torch.arange(n - 1, device=delta.device)[None] >= pos[:, None]
        delta_suffix += (delta * after).sum(1).tolist()
    clean_list = clean.tolist()
    for (l, p, s), dn, ds in zip(ablations, delta_next, delta_suffix):
        cols["layer"].append(l)
        cols["position"].append(p)
        cols["slot"].append(s)
        cols["expert"].append(int(cache[f"blocks.{l}.mlp.hook_expert_indices"][0, p, s]))
        cols["weight"].append(float(cache[f"blocks.{l}.mlp.hook_expert_weights"][0, p, s]))
        cols["clean_ce"].append(clean_list[p])
        cols["delta_next"].append(dn)
        cols["delta_suffix"].append(ds)
    return cols


def remove_expert_hooks(
    model, layer: int, expert: int, position: Optional[int] = None, renormalize: bool = False
) -> list[tuple[str, Callable]]:
    """``fwd_hooks`` that remove expert ``expert``'s contribution at layer ``layer`` (at one
    position, or everywhere when ``position`` is None) by zeroing the weight of whatever slot it
    was routed to; tokens where it was not routed are untouched (so removing an unrouted expert
    changes nothing). Use with ``model.run_with_hooks(..., fwd_hooks=remove_expert_hooks(...))``."""
    _check_layers(model, [layer])
    state: dict[str, Tensor] = {}

    def grab(idx, hook):
        state["idx"] = idx
        return idx

    def zero(w, hook):
        hit = state.pop("idx") == expert  # [batch, pos, top_k]
        if position is not None:
            keep = torch.zeros_like(hit)
            keep[:, position] = True
            hit = hit & keep
        if not bool(hit.any()):
            return w
        if renormalize:
            total = w.float().sum(-1, keepdim=True)
            rest = total - (w.float() * hit).sum(-1, keepdim=True)
            scale = torch.where(rest != 0, total / torch.where(rest != 0, rest, torch.ones_like(rest)), torch.ones_like(rest))
            scale = torch.where(hit.any(-1, keepdim=True), scale, torch.ones_like(scale))
            w = (w.float() * scale).to(w.dtype)
        return w.masked_fill(hit, 0)

    pre = f"blocks.{layer}.mlp."
    return [(pre + "hook_expert_indices", grab), (pre + "hook_expert_weights", zero)]
