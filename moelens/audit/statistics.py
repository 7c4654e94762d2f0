"""Observational expert statistics, streamed over a corpus: per (layer, expert) utilisation,
mean combine weight, output norm and std when active, and the layer's routing entropy."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from moelens.audit.constants import STAT_COLUMNS, CorpusLike
from moelens.audit.corpus import _check_layers, _pad_left, _progress, tokenize_corpus


class _StatsAccumulator:
    """Running float64 sums per (layer, expert), updated by hooks, one batch at a time."""

    def __init__(self, layers: Sequence[int], n_experts: int):
        self.n_experts = n_experts
        z = lambda: {l: np.zeros(n_experts) for l in layers}  # noqa: E731
        self.count, self.weight, self.norm, self.elem, self.elem_sq = z(), z(), z(), z(), z()
        self.tokens = {l: 0 for l in layers}
        self.entropy = {l: 0.0 for l in layers}
        self.d_model = None
        self.mask: Optional[Tensor] = None
        self._idx: dict[int, Tensor] = {}
        self._w: dict[int, Tensor] = {}

    def hooks(self, layers: Sequence[int]) -> list:
        out = []
        for l in layers:
            pre = f"blocks.{l}.mlp."
            out += [
                (pre + "hook_router_scores", self._scores_hook(l)),
                (pre + "hook_expert_indices", self._stash(l, self._idx)),
                (pre + "hook_expert_weights", self._stash(l, self._w)),
                (pre + "hook_expert_out", self._out_hook(l)),
            ]
        return out

    def _scores_hook(self, layer):
        def hook(scores, hook):
            p = scores[self.mask].double()
            p = p / p.sum(-1, keepdim=True)  # softmax: unchanged; sigmoid scores: normalised to a distribution
            ent = -(p * p.clamp_min(1e-30).log()).sum(-1)
            self.entropy[layer] += float(ent.sum())
            self.tokens[layer] += int(p.shape[0])

        return hook

    @staticmethod
    def _stash(layer, store):
        def hook(x, hook):
            store[layer] = x

        return hook

    def _out_hook(self, layer):
        def hook(out, hook):
            m = self.mask
            idx = self._idx.pop(layer)[m].reshape(-1).cpu().numpy()
            w = self._w.pop(layer)[m].double().reshape(-1).cpu().numpy()
            o = out[m].double()  # [N, top_k, d_model]
            self.d_model = o.shape[-1]
            n = self.n_experts
            self.count[layer] += np.bincount(idx, minlength=n)
            self.weight[layer] += np.bincount(idx, weights=w, minlength=n)
            self.norm[layer] += np.bincount(idx, weights=o.norm(dim=-1).reshape(-1).cpu().numpy(), minlength=n)
            self.elem[layer] += np.bincount(idx, weights=o.sum(-1).reshape(-1).cpu().numpy(), minlength=n)
            self.elem_sq[layer] += np.bincount(idx, weights=o.pow(2).sum(-1).reshape(-1).cpu().numpy(), minlength=n)

        return hook

    def frame(self) -> pd.DataFrame:
        rows = []
        for l in self.count:
            c = self.count[l]
            tokens = self.tokens[l]
            with np.errstate(invalid="ignore", divide="ignore"):
                n_elem = c * (self.d_model or 0)
                mean_elem = self.elem[l] / n_elem
                var = np.maximum(self.elem_sq[l] / n_elem - mean_elem**2, 0.0)
                for e in range(self.n_experts):
                    active = c[e] > 0
                    rows.append({
                        "layer": l, "expert": e, "n_tokens": tokens, "n_active": int(c[e]),
                        "utilization": c[e] / tokens if tokens else math.nan,
                        "mean_weight": self.weight[l][e] / c[e] if active else math.nan,
                        "output_norm": self.norm[l][e] / c[e] if active else math.nan,
                        "output_std": math.sqrt(var[e]) if active else math.nan,
                        "routing_entropy": self.entropy[l] / tokens if tokens else math.nan,
                    })
        return pd.DataFrame(rows, columns=["layer", "expert", "n_tokens", "n_active", *STAT_COLUMNS])


@torch.no_grad()
def expert_statistics(
    model,
    corpus: CorpusLike,
    *,
    layers: Optional[Sequence[int]] = None,
    batch_size: int = 8,
    max_seq_len: Optional[int] = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Observational statistics of every (layer, expert), streamed over the corpus.

    Sequences run ``batch_size`` at a time (left padded; padding excluded) and only running sums
    are kept, so memory does not grow with the corpus. Columns:

    ``n_tokens``        real tokens seen by the layer
    ``n_active``        tokens routed to the expert (an expert fills at most one slot per token)
    ``utilization``     ``n_active / n_tokens``
    ``mean_weight``     mean final combine weight (``hook_expert_weights``) when active
    ``output_norm``     mean L2 norm of the unweighted expert output (``hook_expert_out``) when active
    ``output_std``      std (ddof=0) of all elements of the expert's outputs when active, pooled
                        over tokens and ``d_model``
    ``routing_entropy`` the layer's mean entropy (nats) of the router's softmax over experts
                        (sigmoid routers: of the scores normalised to sum 1)

    Per-expert metrics are NaN for experts never routed.
    """
    layers = _check_layers(model, layers)
    seqs = tokenize_corpus(model, corpus, max_seq_len=max_seq_len)
    acc = _StatsAccumulator(layers, model.cfg.n_experts)
    hooks = acc.hooks(layers)
    device = model.rope_inv_freq.device
    batches = [seqs[i:i + batch_size] for i in range(0, len(seqs), batch_size)]
    for batch in _progress(batches, progress, desc="expert statistics", unit="batch"):
        tokens, mask = _pad_left(batch)
        acc.mask = mask.bool().to(device)
        model.run_with_hooks(
            tokens.to(device), attention_mask=mask.to(device), fwd_hooks=hooks, stop_at_layer=max(layers) + 1
        )
    return acc.frame()
