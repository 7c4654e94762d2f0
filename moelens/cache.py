"""An :class:`transformer_lens.ActivationCache` that understands experts.

Everything is computed from three cached hooks of a sparse layer: ``hook_expert_indices``
``[batch, pos, top_k]``, ``hook_expert_weights`` ``[batch, pos, top_k]`` and ``hook_expert_out``
``[batch, pos, top_k, d_model]``. Expert ``e``'s contribution at a position is its weighted update
``w_e * E_e(x)`` if ``e`` was routed there, else zero; summed over experts it is ``hook_routed_out``.
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from moelens.analysis.tl_cache import TLAnalysisMixin
from moelens.components.moe import combine_weights


class MoEActivationCache(TLAnalysisMixin, ActivationCache):
    """Activation cache with expert-level views (contributions, routing tables, usage), on which
    TransformerLens' analysis methods work (see :mod:`moelens.analysis.tl_cache`)."""

    # ------------------------------------------------------------------ lookups
    def __getitem__(self, key) -> Tensor:
        """As :class:`ActivationCache`; a name that is not cached raises a ``KeyError`` suggesting the
        closest cached names (``cache["blocks.2.mlp.hook_router_logit"]`` -> ``...hook_router_logits``)."""
        try:
            return super().__getitem__(key)
        except KeyError as exc:
            reason = exc.args[0] if exc.args and isinstance(exc.args[0], str) and " " in exc.args[0] else None
        from moelens.hooks import suggest_hook_names
        from moelens.patching import SHORT_NAMES

        name, layer = (key, None) if isinstance(key, str) else (key[0], key[1] if len(key) > 1 else None)
        if isinstance(layer, int) and layer < 0:
            layer += self.model.cfg.n_layers
        close = suggest_hook_names(str(name), self.cache_dict, layer=layer, short_names=SHORT_NAMES)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        head = reason.rstrip(".") + "." if reason else f"{key!r} is not in this cache."
        raise KeyError(
            f"{head}{hint} `list(cache.keys())` lists what was cached (a names_filter "
            f"keeps only some hooks; hook names are documented in docs/concepts.md)."
        ) from None

    def _hook(self, layer: int, name: str) -> Tensor:
        layer = self._check_layer(layer, sparse=True)
        key = f"blocks.{layer}.mlp.{name}"
        if key not in self.cache_dict:
            raise KeyError(
                f"{key} is not in this cache. Run `model.run_with_cache(..., names_filter=...)` with a filter "
                f"that keeps blocks.{layer}.mlp.hook_expert_indices, hook_expert_weights and hook_expert_out "
                f"(e.g. moelens.expert_names_filter(layers=[{layer}]))."
            )
        return self.cache_dict[key]

    def _check_layer(self, layer: int, sparse: bool = False) -> int:
        """The layer, normalised (one indexing rule: negative counts from the last layer)."""
        from moelens.patching import normalize_index

        cfg = self.model.cfg
        layer = normalize_index(layer, cfg.n_layers, "layer")
        if sparse and layer not in cfg.moe_layers:
            raise ValueError(f"layer {layer} is a dense layer; sparse (MoE) layers are {list(cfg.moe_layers)}")
        return layer

    def _check_expert(self, expert: int) -> int:
        from moelens.patching import normalize_index

        return normalize_index(expert, self.model.cfg.n_experts, "expert")

    # ------------------------------------------------------------------ contributions
    def expert_contribution(self, layer: int, expert: int) -> Float[Tensor, "batch pos d_model"]:
        """Expert ``expert``'s weighted update ``w_e * E_e(x)`` at every position (zero where it was
        not routed; ``E_e(w_e x)`` where the weight scales the expert's input, Llama 4). Summed over
        all experts it equals ``blocks.{layer}.mlp.hook_routed_out``. Where the block normalises its
        FFN output (FlexOlmo's post-norm) this is the update *before* that norm; ``decompose_resid``
        carries it through the norm at the run's scale."""
        expert = self._check_expert(expert)
        idx = self._hook(layer, "hook_expert_indices")
        w = combine_weights(self.model.cfg, self._hook(layer, "hook_expert_weights"))
        out = self._hook(layer, "hook_expert_out")
        slot_w = torch.where(idx == expert, w, torch.zeros_like(w))
        return (out * slot_w.unsqueeze(-1)).sum(-2).to(out.dtype)

    def expert_contributions(self, layer: int) -> Float[Tensor, "batch pos n_experts d_model"]:
        """All experts' contributions at once, dense. Memory-heavy: ``batch*pos*n_experts*d_model``
        elements (e.g. 128 experts x 2048 wide is 1 MB per position in fp32)."""
        idx = self._hook(layer, "hook_expert_indices")
        w = combine_weights(self.model.cfg, self._hook(layer, "hook_expert_weights"))
        out = self._hook(layer, "hook_expert_out")
        weighted = (out * w.unsqueeze(-1)).to(out.dtype)
        d = out.shape[-1]  # leading dims [batch, pos], or [pos] in a cache made with remove_batch_dim=True
        dense = torch.zeros(*idx.shape[:-1], self.model.cfg.n_experts, d, dtype=out.dtype, device=out.device)
        return dense.scatter_add_(-2, idx.unsqueeze(-1).expand(*idx.shape, d), weighted)

    def routed_plus_shared(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        """``hook_routed_out + hook_shared_out`` (equals ``hook_mlp_out``)."""
        routed = self._hook(layer, "hook_routed_out")
        if self.model.cfg.has_shared_experts:
            return routed + self._hook(layer, "hook_shared_out")
        return routed

    # ------------------------------------------------------------------ routing views
    def expert_mask(self, layer: int) -> Bool[Tensor, "batch pos n_experts"]:
        """True where the expert was routed."""
        idx = self._hook(layer, "hook_expert_indices")
        mask = torch.zeros(*idx.shape[:-1], self.model.cfg.n_experts, dtype=torch.bool, device=idx.device)
        return mask.scatter_(-1, idx, True)

    def expert_weight_map(self, layer: int) -> Float[Tensor, "batch pos n_experts"]:
        """Combine weight of each expert at each position (0 where not routed)."""
        idx = self._hook(layer, "hook_expert_indices")
        w = self._hook(layer, "hook_expert_weights").float()
        dense = torch.zeros(*idx.shape[:-1], self.model.cfg.n_experts, device=idx.device)
        return dense.scatter_add_(-1, idx, w)

    # run_with_cache(..., pos_slice=s): every hook was sliced on its position axis. `positions` are the
    # original positions the cached ones stand for (None: all of them, or unknown for embeddings input)
    pos_slice = None
    positions: Optional[Tensor] = None

    def set_pos_slice(self, pos_slice, n_pos: Optional[int] = None) -> None:
        """Record that this cache holds only ``pos_slice`` of the positions (``run_with_cache`` does it),
        and slice ``tokens`` / ``attention_mask`` alike so that the expert views stay aligned."""
        from transformer_lens.utilities import Slice

        s = Slice.unwrap(pos_slice)
        self.pos_slice = s
        if n_pos is not None:
            self.positions = torch.as_tensor(s.indices(n_pos)).reshape(-1)
        if self.tokens is not None:
            self.tokens = s.apply(self.tokens, dim=-1)
        if self.attention_mask is not None:
            self.attention_mask = s.apply(self.attention_mask, dim=-1)

    tokens: Optional[Tensor] = None  # the input tokens, when run_with_cache was given tokens or text
    # the run's attention mask ([batch, pos], 1 for real tokens): the one run_with_cache was given, or
    # the one it built when it padded a list of texts; None when every position was a real token
    attention_mask: Optional[Tensor] = None

    def routing(self, layer: int, batch: Optional[int] = None, tokens: Optional[Tensor] = None):
        """A tidy pandas table, one row per (batch, position, slot): position, token string, slot,
        expert, combine weight and router score. Token strings come from ``tokens`` (default: the
        input the cache was made from) when the model has a tokenizer. In a cache made with
        ``pos_slice``, ``position`` is the original position (``cache.positions``)."""
        import pandas as pd

        tokens = self.tokens if tokens is None else tokens
        layer = self._check_layer(layer, sparse=True)
        idx = self._hook(layer, "hook_expert_indices")
        w = self._hook(layer, "hook_expert_weights").float()
        key = f"blocks.{layer}.mlp.hook_router_scores"
        scores = self.cache_dict[key].float().gather(-1, idx) if key in self.cache_dict else None
        if not self.has_batch_dim:  # remove_batch_dim=True: one sequence, reported as batch 0
            idx, w = idx[None], w[None]
            scores = None if scores is None else scores[None]
        if tokens is not None and tokens.ndim == 1:
            tokens = tokens[None]
        rows = []
        batches = range(idx.shape[0]) if batch is None else [batch]
        tok = getattr(self.model, "tokenizer", None)
        pos_of = (lambda p: int(self.positions[p])) if self.positions is not None else (lambda p: p)  # noqa: E731
        for b in batches:
            strs = None
            if tokens is not None and tok is not None:
                strs = [tok.decode([t]) for t in tokens[b].tolist()]
            for p in range(idx.shape[1]):
                for s in range(idx.shape[2]):
                    rows.append(
                        {
                            "batch": b, "position": pos_of(p), "token": strs[p] if strs else None, "slot": s,
                            "expert": int(idx[b, p, s]), "weight": float(w[b, p, s]),
                            "score": float(scores[b, p, s]) if scores is not None else None,
                        }
                    )
        return pd.DataFrame(rows)

    def expert_usage(self, layer: int, attention_mask: Optional[Tensor] = None) -> Int[Tensor, "n_experts"]:
        """Number of (token) positions routed to each expert. Padding is excluded: positions where
        ``attention_mask`` (default: the run's, ``cache.attention_mask``) is 0 are not counted."""
        mask = self.expert_mask(layer)
        attention_mask = self.attention_mask if attention_mask is None else attention_mask
        if attention_mask is not None:
            mask = mask & attention_mask.bool().to(mask.device)[..., None]
        return mask.sum(dim=tuple(range(mask.ndim - 1)))  # over batch and pos (pos only without a batch dim)

    def routing_entropy(self, layer: int) -> Float[Tensor, "batch pos"]:
        """Entropy (nats) of the router's score distribution at each position."""
        layer = self._check_layer(layer, sparse=True)
        key = f"blocks.{layer}.mlp.hook_router_scores"
        if key not in self.cache_dict:
            self._hook(layer, "hook_router_scores")
        p = self.cache_dict[key].float()
        return -(p * p.clamp_min(1e-30).log()).sum(-1)


def expert_names_filter(layers=None, shared: bool = True):
    """A ``names_filter`` keeping what the expert views of :class:`MoEActivationCache` need."""
    wanted = ("hook_expert_indices", "hook_expert_weights", "hook_expert_out", "hook_router_scores",
              "hook_routed_out", "hook_shared_out", "hook_mlp_out")
    if not shared:
        wanted = wanted[:-2]

    def keep(name: str) -> bool:
        if not name.endswith(wanted):
            return False
        if layers is None:
            return True
        return any(name.startswith(f"blocks.{l}.") for l in layers)

    return keep
