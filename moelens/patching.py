"""Interventions as small declarative objects, composed and batched.

An :class:`Intervention` knows which hook points it touches and how to edit their activation for
a block of batch rows. Lists of interventions compose (applied together, in list order at each
hook), and :func:`run_sweep` runs many intervention *sets* as batch rows of as few forwards as
memory allows::

    from moelens import patching as P
    clean_logits, clean = model.run_with_cache(tokens)
    sets = [[P.Corrupt(positions=subj, noise=z), P.Replace("mlp_out", layer=l, positions=[p], source=clean)]
            for l in range(model.cfg.n_layers) for p in range(tokens.shape[1])]
    result = P.run_sweep(model, tokens, sets, metric=P.logit_diff(t_true, t_foil), group_size=len(z))

Hook names may be given in full (``"blocks.3.hook_mlp_out"``) or by short name plus ``layer``
(``"mlp_out"``, ``"resid_pre"``, ``"routed_out"``, ``"expert_weights"`` ...; see :data:`SHORT_NAMES`).
Positions index the ``pos`` axis (``query_pos`` for attention patterns). One indexing rule holds
for layers, experts, slots and positions everywhere in moelens (interventions, tracing, the
cache's expert views): Python's, so negative values count from the end (:func:`normalize_index`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from moelens.components.moe import combine_weights
from moelens.hooks import unknown_hook_error

SHORT_NAMES = {
    "embed": "hook_embed",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "z": "blocks.{layer}.attn.hook_z",
    "pattern": "blocks.{layer}.attn.hook_pattern",
    "router_logits": "blocks.{layer}.mlp.hook_router_logits",
    "router_scores": "blocks.{layer}.mlp.hook_router_scores",
    "expert_indices": "blocks.{layer}.mlp.hook_expert_indices",
    "expert_weights": "blocks.{layer}.mlp.hook_expert_weights",
    "expert_out": "blocks.{layer}.mlp.hook_expert_out",
    "routed_out": "blocks.{layer}.mlp.hook_routed_out",
    "shared_out": "blocks.{layer}.mlp.hook_shared_out",
}

Positions = Union[None, int, Sequence[int], Tensor]
Rows = slice
HookFn = Callable[[Tensor, Rows, object], Tensor]


# ---------------------------------------------------------------------------------- helpers
def hook_name(model, hook: str, layer: Optional[int] = None) -> str:
    """Full hook name from a full name or a short name + layer; raises with suggestions."""
    if hook in SHORT_NAMES:
        template = SHORT_NAMES[hook]
        if "{layer}" in template:
            if layer is None:
                raise ValueError(f"hook {hook!r} needs a layer (layer=...)")
            layer = _check_layer(model, layer)
            template = template.format(layer=layer)
        hook = template
    if hook not in model.hook_dict:
        raise unknown_hook_error(hook, model.hook_dict, layer=layer, short_names=SHORT_NAMES)
    return hook


def normalize_index(index, n: int, what: str) -> int:
    """moelens' one indexing rule, for layers, experts, slots and positions alike: Python's. An
    integer in ``[-n, n)``; negative counts from the end (``-1`` is the last). Returns ``index % n``."""
    import operator

    try:
        if isinstance(index, bool):
            raise TypeError
        index = operator.index(index)
    except TypeError:
        raise IndexError(f"{what}={index!r}: give an integer index") from None
    if not -n <= index < n:
        raise IndexError(f"{what}={index} out of range: there are {n} ({what} 0..{n - 1}, or -{n}..-1 from the end)")
    return index % n


def _check_layer(model, layer: int) -> int:
    """The layer index, normalised (negative counts from the last layer)."""
    return normalize_index(layer, model.cfg.n_layers, "layer")


def _axes(model, name: str) -> list[str]:
    return model.hook_dict[name].dims.split()


def _pos_axis(model, name: str) -> int:
    axes = _axes(model, name)
    for a in ("pos", "query_pos"):
        if a in axes:
            return axes.index(a)
    raise ValueError(f"{name} has no position axis ([{' '.join(axes)}])")


def _int_list(values, what: str) -> list[int]:
    """Python ints from an int or a sequence/tensor of ints; floats and booleans (e.g. a boolean
    mask, which ``torch.as_tensor(..., dtype=long)`` would silently turn into indices 0/1) raise."""
    import operator

    if isinstance(values, Tensor):
        if values.dtype == torch.bool or values.is_floating_point() or values.is_complex():
            raise IndexError(f"{what}: give integer indices, got a {values.dtype} tensor")
        return [int(v) for v in values.reshape(-1).tolist()]
    if isinstance(values, bool) or not isinstance(values, Iterable):
        values = [values]
    out = []
    for v in values:
        try:
            if isinstance(v, bool) or (isinstance(v, Tensor) and v.dtype == torch.bool):
                raise TypeError
            out.append(operator.index(v))
        except TypeError:
            raise IndexError(f"{what}={v!r}: give integer indices") from None
    return out


def _positions(pos: Positions, n: int, what: str = "positions") -> Union[slice, Tensor]:
    if pos is None:
        return slice(None)
    idx = torch.as_tensor(_int_list(pos, what), dtype=torch.long)
    bad = idx[(idx < -n) | (idx >= n)]
    if bad.numel():
        raise IndexError(f"{what} {bad.tolist()} out of range for a sequence of {n} tokens")
    return idx % n


def _index(ndim: int, rows: Rows, pos_axis: int, pos) -> tuple:
    index: list = [slice(None)] * ndim
    index[0] = rows
    index[pos_axis] = pos
    return tuple(index)


def _source_tensor(source, name: str) -> Tensor:
    if isinstance(source, Tensor):
        return source
    if name not in source:
        raise KeyError(
            f"the source cache has no {name!r}: cache it (run_with_cache with a names_filter that keeps it)"
        )
    return source[name]


def _rows_of(src: Tensor, rows: Rows, n_rows: int, name: str) -> Tensor:
    """The source rows aligned with the target rows (a batch-1 source broadcasts)."""
    if src.shape[0] == 1:
        return src
    if src.shape[0] == n_rows:
        return src
    raise ValueError(
        f"{name}: source batch {src.shape[0]} does not fit the {n_rows} rows it patches (give batch 1 or {n_rows})"
    )


# ---------------------------------------------------------------------------------- base class
class Intervention:
    """Base class: ``hooks(model)`` -> ``[(hook_name, fn(act, rows, hook) -> act)]``."""

    def hooks(self, model) -> list[tuple[str, HookFn]]:
        raise NotImplementedError

    def validate(self, model) -> None:
        self.hooks(model)


def _layers(layer, layers) -> list[Optional[int]]:
    if layer is not None and layers is not None:
        raise ValueError("give either layer= or layers=, not both")
    if layers is not None:
        return list(layers)
    return [layer]


@dataclass
class Replace(Intervention):
    """Replace an activation by the source's at given layers/positions (restoration patching).

    ``source``: a cache (any mapping name -> tensor, e.g. a clean run's cache) or a tensor shaped
    like the activation. ``slots`` selects routing slots on hooks with a ``top_k`` axis;
    ``experts`` selects experts on hooks with an ``n_experts`` axis (router logits/scores).
    """

    hook: str
    source: Union[Mapping[str, Tensor], Tensor]
    layer: Optional[int] = None
    layers: Optional[Sequence[int]] = None
    positions: Positions = None
    slots: Optional[Sequence[int]] = None
    experts: Optional[Sequence[int]] = None

    def hooks(self, model):
        out = []
        for layer in _layers(self.layer, self.layers):
            name = hook_name(model, self.hook, layer)
            src = _source_tensor(self.source, name)
            sel = _sub_axis(model, name, self.slots, self.experts)
            out.append((name, self._fn(model, name, src, sel)))
        return out

    def _fn(self, model, name, src, sel):
        pos_axis = _pos_axis(model, name)

        def fn(act: Tensor, rows: Rows, hook) -> Tensor:
            n_rows = act[rows].shape[0]
            s = _rows_of(src, rows, n_rows, name)
            if s.shape[1:] != act.shape[1:]:
                raise ValueError(f"{name}: source shape {tuple(s.shape)} does not match activation {tuple(act.shape)}")
            pos = _positions(self.positions, act.shape[pos_axis])
            index = _index(act.ndim, rows, pos_axis, pos)
            src_index = (slice(None),) + index[1:]
            if sel is not None:
                axis, idx = sel
                index = _with_axis(index, axis, idx, pos)
                src_index = _with_axis(src_index, axis, idx, pos)
            act = act.clone()
            act[index] = s[src_index].to(act.device, act.dtype).expand_as(act[index])
            return act

        return fn


def _sub_axis(model, name, slots, experts):
    axes = _axes(model, name)
    if slots is not None and experts is not None:
        raise ValueError("give slots= or experts=, not both")
    if slots is not None:
        if "top_k" not in axes:
            raise ValueError(f"{name} has no slot axis ([{' '.join(axes)}]): slots= does not apply")
        return axes.index("top_k"), torch.as_tensor(_check_range(slots, model.cfg.top_k, "slot"), dtype=torch.long)
    if experts is not None:
        if "n_experts" not in axes:
            raise ValueError(
                f"{name} has no expert axis ([{' '.join(axes)}]): experts= applies to router logits/scores; "
                f"to patch single experts' outputs use RestoreExperts / AblateExpert"
            )
        return axes.index("n_experts"), torch.as_tensor(_check_range(experts, model.cfg.n_experts, "expert"),
                                                        dtype=torch.long)
    return None


def _check_range(values, n, what) -> list[int]:
    """Indices normalised by :func:`normalize_index` (negative counts from the end)."""
    values = _int_list(values, what)
    bad = [v for v in values if not -n <= v < n]
    if bad:
        raise IndexError(f"{what} {bad} out of range: there are {n} ({what} 0..{n - 1}, or -{n}..-1 from the end)")
    return [v % n for v in values]


def _with_axis(index: tuple, axis: int, idx: Tensor, pos) -> tuple:
    """Add an advanced index on ``axis`` to an index that may already hold advanced positions."""
    index = list(index)
    if isinstance(pos, Tensor):
        # positions and sub-axis both advanced: take their outer product
        pos_axis = next(i for i, v in enumerate(index) if v is pos)
        index[pos_axis] = pos[:, None]
        index[axis] = idx[None, :]
    else:
        index[axis] = idx
    return tuple(index)


@dataclass
class AddDelta(Intervention):
    """Add ``delta`` (broadcastable to the selected ``[rows, positions, ...]`` slice) to an activation."""

    hook: str
    delta: Tensor
    layer: Optional[int] = None
    positions: Positions = None

    def hooks(self, model):
        name = hook_name(model, self.hook, self.layer)
        pos_axis = _pos_axis(model, name)

        def fn(act, rows, hook):
            pos = _positions(self.positions, act.shape[pos_axis])
            index = _index(act.ndim, rows, pos_axis, pos)
            act = act.clone()
            act[index] = act[index] + self.delta.to(act.device, act.dtype)
            return act

        return [(name, fn)]


def expert_delta(model, layer: int, experts: Iterable[int], clean, corrupted) -> Float[Tensor, "batch pos d_model"]:
    """``sum_e c_e(clean) - c_e(corrupted)`` from two :class:`MoEActivationCache` s."""
    experts = list(experts)
    if not experts:
        raise ValueError("experts is empty")
    delta = None
    for e in experts:
        d = clean.expert_contribution(layer, int(e)) - corrupted.expert_contribution(layer, int(e))
        delta = d if delta is None else delta + d
    return delta


@dataclass
class RestoreExperts(Intervention):
    """Add ``delta = sum_e c_e(clean) - c_e(corrupted)`` to the MoE output (``hook_mlp_out``) at
    ``positions``: the expert-tracing intervention of the expert-aware causal tracing protocol.
    ``corrupted`` may have a batch of noise samples aligned with the patched rows."""

    layer: int
    experts: Sequence[int]
    clean: object
    corrupted: object
    positions: Positions = -1

    def hooks(self, model):
        layer = _check_layer(model, self.layer)
        experts = _check_range(list(self.experts), model.cfg.n_experts, "expert")
        delta = expert_delta(model, layer, experts, self.clean, self.corrupted)
        name = hook_name(model, "mlp_out", layer)

        def fn(act, rows, hook):
            n_rows = act[rows].shape[0]
            d = _rows_of(delta, rows, n_rows, name)
            pos = _positions(self.positions, act.shape[1])
            act = act.clone()
            act[rows, pos] = act[rows, pos] + d[:, pos].to(act.device, act.dtype)
            return act

        return [(name, fn)]


@dataclass
class Ablate(Intervention):
    """Ablate an activation (a whole block output by default) at given layers/positions.

    ``mode``: ``"zero"``; ``"mean"`` (the mean of ``reference`` over batch and, unless
    ``per_position``, positions: ``reference`` is a cache or a tensor); ``"resample"`` (rows of
    ``reference`` drawn with ``seed``).
    """

    hook: str = "mlp_out"
    layer: Optional[int] = None
    layers: Optional[Sequence[int]] = None
    positions: Positions = None
    mode: str = "zero"
    reference: Union[None, Mapping[str, Tensor], Tensor] = None
    per_position: bool = False
    seed: int = 0

    def hooks(self, model):
        if self.mode not in ("zero", "mean", "resample"):
            raise ValueError(f"mode={self.mode!r}: use 'zero', 'mean' or 'resample'")
        if self.mode != "zero" and self.reference is None:
            raise ValueError(f"mode={self.mode!r} needs reference= (a cache or tensor to take values from)")
        out = []
        for layer in _layers(self.layer, self.layers):
            name = hook_name(model, self.hook, layer)
            ref = _source_tensor(self.reference, name) if self.reference is not None else None
            out.append((name, self._fn(model, name, ref)))
        return out

    def _fn(self, model, name, ref):
        pos_axis = _pos_axis(model, name)

        def fn(act, rows, hook):
            pos = _positions(self.positions, act.shape[pos_axis])
            index = _index(act.ndim, rows, pos_axis, pos)
            act = act.clone()
            if self.mode == "zero":
                act[index] = 0
                return act
            if self.mode == "mean":
                dims = (0,) if self.per_position else (0, pos_axis)
                value = ref.float().mean(dim=dims, keepdim=True)
                if self.per_position:
                    value = value[_index(value.ndim, slice(None), pos_axis, pos)]
            else:
                gen = torch.Generator().manual_seed(self.seed)
                n_rows = act[rows].shape[0]
                pick = torch.randint(ref.shape[0], (n_rows,), generator=gen)
                value = ref[pick][_index(ref.ndim, slice(None), pos_axis, pos)]
            act[index] = value.to(act.device, act.dtype).expand_as(act[index])
            return act

        return fn


@dataclass
class AblateExpert(Intervention):
    """Remove experts' contributions at ``positions`` while the other routed experts keep their
    weights (``renormalize=True``: the remaining weights are rescaled to the original total).

    Implemented on ``hook_expert_weights``: the slots holding an ablated expert get weight 0.
    ``mode="mean"`` instead replaces the expert's contribution (where routed) by its mean
    contribution over ``reference`` (a :class:`MoEActivationCache`), on ``hook_routed_out``.
    Ablating an expert that is not routed at a position changes nothing there.
    """

    layer: int
    experts: Sequence[int]
    positions: Positions = None
    renormalize: bool = False
    mode: str = "zero"
    reference: object = None

    def hooks(self, model):
        layer = _check_layer(model, self.layer)
        if layer not in model.cfg.moe_layers:
            raise ValueError(f"layer {self.layer} is dense; sparse layers are {list(model.cfg.moe_layers)}")
        experts = torch.as_tensor(_check_range(list(self.experts), model.cfg.n_experts, "expert"), dtype=torch.long)
        w_name = hook_name(model, "expert_weights", layer)
        if self.mode == "zero":
            return self._zero_hooks(model, w_name, experts)
        if self.mode != "mean" or self.reference is None:
            raise ValueError("AblateExpert mode must be 'zero', or 'mean' with reference= (a cache)")
        return self._mean_hooks(model, experts, layer)

    def _zero_hooks(self, model, name, experts):
        idx_name = name.replace("hook_expert_weights", "hook_expert_indices")
        state = {}

        def grab(act, rows, hook):
            state["indices"] = act
            return act

        grab.reads_only = True  # to_hooks runs it after every edit of hook_expert_indices

        def fn(w, rows, hook):
            idx = state["indices"]
            pos = _positions(self.positions, w.shape[1])
            hit = torch.isin(idx[rows], experts.to(idx.device))
            sel = torch.zeros_like(hit)
            sel[:, pos] = hit[:, pos]
            w = w.clone()
            sub = w[rows]
            kept = sub.masked_fill(sel, 0)
            if self.renormalize:
                total, rest = sub.sum(-1, keepdim=True), kept.sum(-1, keepdim=True)
                kept = torch.where(sel.any(-1, keepdim=True), kept * total / rest.clamp_min(1e-20), kept)
            w[rows] = kept
            return w

        return [(idx_name, grab), (name, fn)]

    def _mean_hooks(self, model, experts, layer):
        l = layer
        mean = {int(e): self.reference.expert_contribution(l, int(e)).float() for e in experts}
        routed_mask = {int(e): self.reference.expert_mask(l)[..., int(e)] for e in experts}
        never = [e for e, m in routed_mask.items() if not bool(m.any())]
        if never:
            raise ValueError(
                f"AblateExpert(mode='mean'): expert(s) {never} are never routed at layer {l} in the reference cache, "
                f"so their mean contribution is undefined; use a larger reference or mode='zero'"
            )
        mean = {e: m.sum((0, 1)) / routed_mask[e].sum().clamp_min(1) for e, m in mean.items()}
        state = {}
        names = [hook_name(model, n, l) for n in ("expert_indices", "expert_weights", "expert_out", "routed_out")]

        def grab(key):
            def fn(act, rows, hook):
                state[key] = act
                return act
            fn.reads_only = True  # to_hooks runs it after every edit of that hook point
            return fn

        def fn(act, rows, hook):
            idx, w, out = state["expert_indices"], state["expert_weights"], state["expert_out"]
            pos = _positions(self.positions, act.shape[1])
            act = act.clone()
            for e, m in mean.items():
                slot_w = torch.where(idx[rows] == e, combine_weights(model.cfg, w[rows]), torch.zeros_like(w[rows]))
                current = (out[rows] * slot_w.unsqueeze(-1)).sum(-2)
                routed = (idx[rows] == e).any(-1, keepdim=True)
                change = torch.where(routed, m.to(act.dtype) - current, torch.zeros_like(current))
                act[rows, pos] = act[rows, pos] + change[:, pos].to(act.dtype)
            return act

        return [(names[0], grab("expert_indices")), (names[1], grab("expert_weights")),
                (names[2], grab("expert_out")), (names[3], fn)]


@dataclass
class ForceRouting(Intervention):
    """Fix the chosen experts (and optionally their weights) at ``positions`` of a sparse layer.

    ``experts``: a list of ``top_k`` expert ids (same at every position), a tensor broadcastable
    to ``[rows, positions, top_k]``, or a cache (use that run's ``hook_expert_indices``, e.g. the
    clean run's routing). ``weights``: None (the architecture's rule: gathered from the router
    scores at the forced experts, renormalised where the architecture renormalises, scaled by
    ``routed_scaling_factor``), a tensor, or a cache (use its ``hook_expert_weights``).
    """

    layer: int
    experts: Union[Sequence[int], Tensor, Mapping[str, Tensor]]
    positions: Positions = None
    weights: Union[None, Tensor, Mapping[str, Tensor]] = None

    def hooks(self, model):
        layer = _check_layer(model, self.layer)
        if layer not in model.cfg.moe_layers:
            raise ValueError(f"layer {self.layer} is dense; sparse layers are {list(model.cfg.moe_layers)}")
        idx_name = hook_name(model, "expert_indices", layer)
        hooks = [(idx_name, self._setter(idx_name, self.experts, model, is_index=True))]
        if self.weights is not None:
            w_name = hook_name(model, "expert_weights", layer)
            hooks.append((w_name, self._setter(w_name, self.weights, model, is_index=False)))
        return hooks

    def _setter(self, name, value, model, is_index):
        if isinstance(value, (list, tuple)):
            # ids keep their own dtype so that floats / booleans reach the integer check below
            value = torch.as_tensor(value) if is_index else torch.as_tensor(value, dtype=torch.float32)
        if not isinstance(value, Tensor):
            value = _source_tensor(value, name)
        if is_index:
            if value.shape[-1] != model.cfg.top_k:
                raise ValueError(f"forced experts need top_k={model.cfg.top_k} ids per position, got shape {tuple(value.shape)}")
            value = torch.as_tensor(_check_range(value.reshape(-1).tolist(), model.cfg.n_experts, "expert"),
                                    dtype=torch.long).reshape(value.shape)
            flat = value.reshape(-1, value.shape[-1])
            dup = (flat.sort(-1).values.diff(dim=-1) == 0).any(-1)
            if bool(dup.any()):
                raise ValueError(
                    f"forced experts {flat[dup.nonzero()[0, 0]].tolist()} name the same expert twice at a position: "
                    f"each of the top_k={model.cfg.top_k} slots needs a different expert (the router never picks one twice)"
                )

        def fn(act, rows, hook):
            pos = _positions(self.positions, act.shape[1])
            act = act.clone()
            v = value.to(act.device, act.dtype)
            sub = act[rows]
            if v.ndim == 3 and v.shape[1] == act.shape[1]:
                v = v[:, pos]
            sub[:, pos] = v.expand_as(sub[:, pos])
            act[rows] = sub
            return act

        return fn


@dataclass
class Corrupt(Intervention):
    """Add noise to the token embeddings (``hook_embed``) at ``positions``.

    ``noise``: a tensor ``[n_rows or 1, len(positions), d_model]`` used as is; or ``sigma`` and
    ``seed`` to draw ``sigma * N(0, 1)`` of that shape.
    """

    positions: Sequence[int]
    noise: Optional[Tensor] = None
    sigma: Optional[float] = None
    seed: int = 0

    def hooks(self, model):
        if self.noise is None and self.sigma is None:
            raise ValueError("Corrupt needs noise= (a tensor) or sigma= (with seed=)")
        positions = list(self.positions)
        if not positions:
            raise ValueError("Corrupt needs at least one position")

        def fn(act, rows, hook):
            pos = _positions(positions, act.shape[1])
            n_rows = act[rows].shape[0]
            if self.noise is not None:
                z = self.noise
                if z.ndim != 3 or z.shape[1:] != (len(positions), act.shape[-1]) or z.shape[0] not in (1, n_rows):
                    raise ValueError(
                        f"noise shape {tuple(z.shape)} must be [{n_rows} or 1, {len(positions)}, {act.shape[-1]}]"
                    )
            else:
                gen = torch.Generator().manual_seed(self.seed)
                z = self.sigma * torch.randn(n_rows, len(positions), act.shape[-1], generator=gen)
            act = act.clone()
            act[rows, pos] = act[rows, pos] + z.to(act.device, act.dtype)
            return act

        return [("hook_embed", fn)]


# ---------------------------------------------------------------------------------- running
def to_hooks(model, interventions: Sequence[Intervention], rows: Rows = slice(None)) -> list[tuple[str, Callable]]:
    """TransformerLens ``fwd_hooks`` applying ``interventions`` to batch ``rows``.

    Edits come in list order; hooks that only read a hook point (marked ``fn.reads_only = True``,
    e.g. :class:`AblateExpert` reading the chosen experts) come after every edit of the list, so
    they see the activation the model goes on with whatever the list order."""
    edits, reads = [], []
    for iv in interventions:
        for name, fn in iv.hooks(model):
            (reads if getattr(fn, "reads_only", False) else edits).append((name, _bind(fn, rows)))
    return edits + reads


def _bind(fn, rows):
    def hook(act, hook):
        offset = getattr(hook, "pos_offset", 0)  # > 0 during cached generation (moelens.generation)
        if offset:
            return _at_offset(fn, act, rows, hook, offset)
        return fn(act, rows, hook)

    return hook


def _at_offset(fn, act, rows, hook, offset):
    """Apply ``fn`` to an activation whose first position is absolute position ``offset`` (cached
    generation): ``fn`` sees the full-length sequence (earlier positions zero), so ``positions=``
    mean absolute positions (negative ones count from the newest token) as in a full forward."""
    axes = hook.dims.split()
    axis = axes.index("pos") if "pos" in axes else axes.index("query_pos")
    shape = list(act.shape)
    shape[axis] = offset + act.shape[axis]
    full = act.new_zeros(shape)
    full.narrow(axis, offset, act.shape[axis]).copy_(act)
    return fn(full, rows, hook).narrow(axis, offset, act.shape[axis])


def run_with_interventions(model, input, interventions: Sequence[Intervention], **kwargs) -> Tensor:
    """One forward with every intervention applied to every row."""
    with torch.no_grad():
        return model.run_with_hooks(input, fwd_hooks=to_hooks(model, interventions), **kwargs)


# metrics: logits [rows, pos, vocab] -> [rows]
class TokenLogitMetric:
    """A metric that reads a few logits at one position and declares which (``token_ids``), so an
    engine can unembed only those columns of ``W_U`` (:meth:`from_token_logits`) instead of the whole
    vocabulary. Called on full logits ``[rows, pos, vocab]`` it is an ordinary metric."""

    def __init__(self, token_ids: Sequence[int], fn: Callable[[Tensor], Tensor], position: int = -1):
        self.token_ids = [int(t) for t in token_ids]
        self.fn = fn  # logits of token_ids [rows, len(token_ids)] -> [rows]
        self.position = position

    def __call__(self, logits: Tensor) -> Tensor:
        return self.fn(logits[:, self.position, self.token_ids])

    def from_token_logits(self, logits: Tensor) -> Tensor:
        """The metric from the logits of ``token_ids`` only, ``[rows, len(token_ids)]``."""
        return self.fn(logits)


def logit_diff(token_a: int, token_b: int, position: int = -1) -> Callable[[Tensor], Tensor]:
    """``logit[a] - logit[b]`` at ``position`` (the true-vs-foil contrast); a :class:`TokenLogitMetric`."""
    return TokenLogitMetric([token_a, token_b], lambda ab: ab[:, 0].float() - ab[:, 1].float(), position)


def prob(token: int, position: int = -1) -> Callable[[Tensor], Tensor]:
    return lambda logits: torch.softmax(logits[:, position].float(), -1)[:, token]


def logprob(token: int, position: int = -1) -> Callable[[Tensor], Tensor]:
    return lambda logits: torch.log_softmax(logits[:, position].float(), -1)[:, token]


@dataclass
class SweepResult:
    """Metric values of a sweep: ``per_row [n_sets, group_size]`` and their mean ``values [n_sets]``."""

    values: Tensor
    per_row: Tensor
    labels: list = field(default_factory=list)

    def plot(self, title: Optional[str] = None):
        """A bar chart of each set's mean metric value (:func:`moelens.plotting.tracing.sweep_bar`)."""
        from moelens.plotting.tracing import sweep_bar

        names = [str(self.labels[i]) if i < len(self.labels) else str(i) for i in range(len(self.values))]
        return sweep_bar(self.values.tolist(), names, title=title)

    def to_dataframe(self):
        import pandas as pd

        rows = []
        for i, v in enumerate(self.values.tolist()):
            label = self.labels[i] if i < len(self.labels) else i
            rows.append({**(label if isinstance(label, dict) else {"set": label}), "value": v})
        return pd.DataFrame(rows)


def run_sweep(
    model,
    input: Tensor,
    sets: Sequence[Sequence[Intervention]],
    metric: Callable[[Tensor], Tensor],
    *,
    group_size: int = 1,
    attention_mask: Optional[Tensor] = None,
    max_rows: int = 64,
    labels: Optional[list] = None,
    progress: bool = True,
) -> SweepResult:
    """Run every intervention set on ``group_size`` copies of ``input`` (batch 1, or ``group_size``
    rows, e.g. one per noise sample) as batch rows: ``max_rows`` rows per forward at most.

    Row block ``s`` of a forward gets set ``s``'s interventions; metric values are averaged over
    each set's group. Equal to running each set on its own (tested).
    """
    if input.shape[0] not in (1, group_size):
        raise ValueError(f"input batch {input.shape[0]} must be 1 or group_size={group_size}")
    for s in sets:
        for iv in s:
            iv.validate(model)
    per_set = max(1, max_rows // group_size)
    chunks = [list(range(i, min(i + per_set, len(sets)))) for i in range(0, len(sets), per_set)]
    from tqdm.auto import tqdm

    results = []
    for chunk in tqdm(chunks, desc="sweep", unit="forward", disable=not progress or len(chunks) < 2):
        n = len(chunk) * group_size
        batch = input.expand(group_size, -1).repeat(len(chunk), 1) if input.shape[0] == 1 else input.repeat(len(chunk), 1)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.expand(group_size, -1).repeat(len(chunk), 1) if attention_mask.shape[0] == 1 else attention_mask.repeat(len(chunk), 1)
        hooks = []
        for j, s in enumerate(chunk):
            hooks += to_hooks(model, sets[s], rows=slice(j * group_size, (j + 1) * group_size))
        with torch.no_grad():
            logits = model.run_with_hooks(batch, attention_mask=mask, fwd_hooks=hooks)
        results.append(metric(logits).reshape(len(chunk), group_size).cpu())
        assert logits.shape[0] == n
    per_row = torch.cat(results) if results else torch.empty(0, group_size)
    return SweepResult(values=per_row.mean(-1), per_row=per_row, labels=list(labels or []))
