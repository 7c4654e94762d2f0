"""Attribution patching (AtP): a first-order screen of every expert of every layer in one backward pass.

Exact expert tracing (:func:`moelens.trace_experts`) costs one suffix run per (layer, expert, noise
sample). Attribution patching (Nanda 2023; Kramar et al. 2024, "AtP*") replaces each run by its
first-order Taylor estimate around the corrupted run, from one clean run, one corrupted run and one
backward pass:

``a.scores[l, e] = corrupted + mean_s  g_s(l) . delta_e,s``

* ``g_s(l)``: gradient of the metric of corrupted run ``s`` with respect to ``blocks.{l}.hook_mlp_out``
  at the traced position. Everything downstream is differentiated as computed (attention, norms,
  router softmax and combine weights of later layers); the chosen experts are fixed by the forward
  (``top-k`` indices have no gradient).
* ``delta_e,s = c_e(clean) - c_e(corrupted run s)`` at that position, ``c_e`` being
  ``cache.expert_contribution(l, e)`` - exactly the edit :func:`~moelens.trace_experts` makes.

Because ``g . delta_e`` is linear in ``delta_e``, each dot product is taken per routed slot
(``w_k * g . E_k(x)``) and scattered onto the experts: no ``[n_experts, d_model]`` tensor is built.
The same gradients give the first-order estimate of the :func:`~moelens.trace_layers` grid
(:func:`attribute_layers`: restoring ``mlp_out``, ``attn_out`` or ``resid_post`` at one
(layer, position)). :func:`screen_experts` ranks every (layer, expert) pair by the estimate and
re-scores the top ones exactly with the suffix engine.

When the estimate is poor: the patch is not small - a restored expert whose contribution moves the
residual far (the metric is then nonlinear along the way: saturated softmax in attention or in the
router, a norm's scale), and routing flips (restoring an expert at layer ``l`` changes which experts
later layers choose; the gradient sees only the combine weights of the experts chosen in the
corrupted run). See ``docs/attribution.md`` for measurements on the bundled model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from moelens.components.moe import combine_weights
from moelens.tracing.cases import FactCase
from moelens.tracing.engine import base_names_filter, corrupted_run_with_gradients
from moelens.tracing.trace import (
    KIND_HOOKS, LayerTraceResult, PositionSpec, TraceResult, TraceSetup, _common, prepare, resolve_positions,
    routed_sets, warn_if_post_normed_moe,
)

_SINGLE = ("last", "subject_last")  # position specs that give one position (2-D expert scores)


def attribution_names_filter(name: str) -> bool:
    """What the clean and corrupted runs of an attribution must cache: what the suffix engine needs
    (residuals, block outputs, keys/values or recurrent state: the gradient pass and the exact
    verification run on it) and the expert hooks the contributions are built from."""
    return base_names_filter(name) or name.endswith(("hook_expert_indices", "hook_expert_weights", "hook_expert_out"))


def corrupted_gradients(model, setup: TraceSetup, kinds: Sequence[str] = ("mlp",)) -> dict[str, Tensor]:
    """Gradients ``[n_samples, pos, d_model]`` (fp32) of each corrupted run's metric with respect to
    ``blocks.{l}.hook_{mlp_out|attn_out|resid_post}`` for every layer and position, from one whole
    forward and one backward through plain hooks (the reference the suffix pass of
    :func:`suffix_gradients` is tested against).

    Each hook adds a zero leaf that requires grad (so the gradient is that of the hooked activation,
    whatever ``requires_grad`` the parameters have); parameters are frozen during the pass, so the
    autograd graph holds only what input gradients need and nothing else is cached."""
    batch = setup.tokens.expand(setup.n_samples, -1)
    return corrupted_run_with_gradients(model, batch, setup.corrupt(), setup.metric, lambda name: False, kinds)[2]


def suffix_gradients(model, setup: TraceSetup, kinds: Sequence[str], p0: int,
                     direction: str = "restore") -> dict[str, Tensor]:
    """Gradients ``[rows, T - p0, d_model]`` (fp32) of the metric with respect to
    ``blocks.{l}.hook_{kind}`` at positions ``p0..T-1``: of each corrupted run (``"restore"``, rows =
    noise samples) or of the clean run (``"necessity"``, one row). From the gradients ``prepare(...,
    gradients=kinds)`` took when it has them; otherwise one forward and backward of the positions
    ``p0..T-1`` only (:meth:`SuffixEngine.gradients`; the same gradients, since nothing before
    ``p0`` depends on what comes after it): for the last position, one token per layer."""
    names = [f"blocks.{l}.hook_{KIND_HOOKS[k]}" for k in kinds for l in range(model.cfg.n_layers)]
    have = (getattr(setup, "gradients", None) or {}) if direction == "restore" else {}
    if all(n in have for n in names):
        return {n: have[n][:, p0:] for n in names}
    return setup.engine(model, direction).gradients(p0, [KIND_HOOKS[k] for k in kinds])


def _slot_dots(cache, layer: int, g: Tensor, positions: list[int]) -> Tensor:
    """``sum_e [e routed] w_e g . E_e(x)`` per expert: ``g . c_e`` ``[n_samples, len(positions), n_experts]``
    for gradients ``g [n_samples, len(positions), d]`` at ``positions`` against ``cache``'s
    contributions (batch 1 or n_samples)."""
    idx = cache[f"blocks.{layer}.mlp.hook_expert_indices"][:, positions]  # [b, P, k]
    w = combine_weights(cache.model.cfg, cache[f"blocks.{layer}.mlp.hook_expert_weights"][:, positions].float())
    out = cache[f"blocks.{layer}.mlp.hook_expert_out"][:, positions].float()  # [b, P, k, d]
    g = g.to(out.device)  # [S, P, d]
    if out.shape[0] == 1:  # the clean run: one row against every sample's gradient
        dots = torch.einsum("spd,pkd->spk", g, out[0]) * w[0]  # [S, P, k]
        idx = idx[0].expand(g.shape[0], -1, -1)
    else:  # the corrupted runs: row s against gradient s
        dots = torch.einsum("spd,spkd->spk", g, out) * w
    res = torch.zeros(*dots.shape[:2], cache.model.cfg.n_experts, device=dots.device)
    return res.scatter_add_(-1, idx.to(dots.device), dots)


def _check_single(spec: PositionSpec) -> bool:
    return (isinstance(spec, str) and spec in _SINGLE) or isinstance(spec, int)


# ---------------------------------------------------------------------------------- results
@dataclass
class ExpertAttributionResult(TraceResult):
    """First-order estimates of :func:`~moelens.trace_experts` for every layer at once.

    ``scores``: ``[n_layers, n_experts]`` (one position) or ``[n_layers, n_positions, n_experts]``;
    NaN on dense layers. ``layer_scores``: the estimate of restoring the whole ``hook_mlp_out``
    (``[n_layers]`` or ``[n_layers, n_positions]``). ``clean_routed[l]``: experts the clean run
    routed at the positions (empty for dense layers)."""

    scores: Tensor = None
    layer_scores: Tensor = None
    positions: list = field(default_factory=list)
    per_position: bool = False
    clean_routed: list = field(default_factory=list)
    method: str = "attribution"  # a first-order estimate, never an exact trace

    @property
    def n_layers(self) -> int:
        return self.scores.shape[0]

    def to_dataframe(self):
        """One row per (layer, [position,] expert) of a sparse layer: estimate and estimated rescue."""
        import pandas as pd

        rows = []
        s = self.scores if self.per_position else self.scores[:, None]
        for l in range(s.shape[0]):
            for j, p in enumerate(self.positions if self.per_position else [self.positions[-1]]):
                if torch.isnan(s[l, j]).all():
                    continue
                for e in range(s.shape[-1]):
                    v = float(s[l, j, e])
                    rows.append({"layer": l, "position": p, "token": self.str_tokens[p], "expert": e, "estimate": v,
                                 "rescue": float(self.rescue(v)), "clean_routed": e in self.clean_routed[l],
                                 "method": self.method})
        return pd.DataFrame(rows)

    def top(self, n: int = 10) -> list[tuple[int, int, float]]:
        """The ``n`` highest estimates as ``(layer, expert, estimate)`` (single-position results)."""
        if self.per_position:
            raise ValueError("top() ranks a single-position result: use positions='last' (or an int)")
        flat = torch.nan_to_num(self.scores, nan=-float("inf")).flatten()
        order = torch.argsort(flat, descending=True)[:n]
        E = self.scores.shape[1]
        return [(int(i) // E, int(i) % E, float(flat[i])) for i in order if torch.isfinite(flat[i])]

    def plot(self, title: Optional[str] = None, position: int = -1):
        """Layers x experts heatmap of the estimated normalised rescue (one position; ``position``
        indexes ``positions`` for per-position results)."""
        from moelens.plotting.attribution import expert_attribution_heatmap

        s = self.scores[:, position] if self.per_position else self.scores
        p = self.positions[position] if self.per_position else self.positions[-1]
        return expert_attribution_heatmap(
            self.rescue(s), clean_routed=self.clean_routed,
            title=title or f"Attribution estimate of expert restoration at '{self.str_tokens[p]}' (position {p})",
        )

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ExpertAttributionResult":
        return _load(cls, path)


@dataclass
class LayerAttributionResult(LayerTraceResult):
    """First-order estimate of the :func:`~moelens.trace_layers` grid ``scores [n_layers, n_positions]``;
    ``to_dataframe``/``plot`` as for :class:`~moelens.LayerTraceResult` (the dataframe has ``method``)."""

    method: str = "attribution"

    def to_dataframe(self):
        df = super().to_dataframe()
        df["method"] = self.method
        return df

    def plot(self, title: Optional[str] = None):
        what = {"mlp": "MoE output", "resid": "residual stream", "attn": "attention output"}[self.kind]
        done = ("restored at one (layer, token) of the corrupted run" if self.direction == "restore"
                else "corrupted at one (layer, token) of the clean run")
        return super().plot(title=title or f"Attribution estimate: {what} {done}")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "LayerAttributionResult":
        return _load(cls, path)


@dataclass
class ScreenResult(TraceResult):
    """Screen then verify: every (layer, expert) pair's estimate, the top ones re-scored exactly.

    ``scores [n_layers, n_experts]``: the exact contrast where ``verified`` is True, else the
    first-order estimate (NaN on dense layers). ``estimates``: the estimate everywhere; ``exact``:
    NaN where not verified. ``layer_scores``: exact contrast with the whole MoE output restored, for
    each layer holding a verified pair (NaN elsewhere)."""

    scores: Tensor = None
    estimates: Tensor = None
    exact: Tensor = None
    verified: Tensor = None  # bool [n_layers, n_experts]
    layer_scores: Tensor = None
    positions: list = field(default_factory=list)
    clean_routed: list = field(default_factory=list)
    n_verify: int = 10

    def top(self, n: int = 5, verified_only: bool = True) -> list[tuple[int, int, float]]:
        """The ``n`` highest scores as ``(layer, expert, score)``; by default among verified pairs only."""
        s = self.exact if verified_only else self.scores
        flat = torch.nan_to_num(s, nan=-float("inf")).flatten()
        order = torch.argsort(flat, descending=True)[:n]
        E = s.shape[1]
        return [(int(i) // E, int(i) % E, float(flat[i])) for i in order if torch.isfinite(flat[i])]

    def to_dataframe(self):
        """One row per (layer, expert) of a sparse layer; ``method`` is ``"exact"`` or ``"attribution"``."""
        import pandas as pd

        rows = []
        for l in range(self.scores.shape[0]):
            if torch.isnan(self.estimates[l]).all():
                continue
            for e in range(self.scores.shape[1]):
                v = float(self.scores[l, e])
                rows.append({"layer": l, "expert": e, "score": v, "rescue": float(self.rescue(v)),
                             "method": "exact" if bool(self.verified[l, e]) else "attribution",
                             "estimate": float(self.estimates[l, e]), "exact": float(self.exact[l, e]),
                             "clean_routed": e in self.clean_routed[l]})
        return pd.DataFrame(rows)

    def plot(self, title: Optional[str] = None):
        from moelens.plotting.attribution import expert_attribution_heatmap

        p = self.positions[-1]
        return expert_attribution_heatmap(
            self.rescue(self.scores), clean_routed=self.clean_routed, verified=self.verified,
            title=title or (f"Expert restoration at '{self.str_tokens[p]}': top {int(self.verified.sum())} "
                            f"verified exactly, the rest first-order estimates"),
        )

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ScreenResult":
        return _load(cls, path)


def _load(cls, path):
    data = json.loads(Path(path).read_text())
    kind = data.pop("type")
    if kind != cls.__name__:
        raise ValueError(f"{path} holds a {kind}, not a {cls.__name__}")
    for key in ("scores", "layer_scores", "estimates", "exact"):
        if data.get(key) is not None:
            data[key] = torch.tensor(data[key], dtype=torch.float32)
    if data.get("verified") is not None:
        data["verified"] = torch.tensor(data["verified"], dtype=torch.bool)
    return cls(**data)


# ---------------------------------------------------------------------------------- entry points
def attribute_experts(
    model,
    case: Union[FactCase, TraceSetup],
    *,
    positions: PositionSpec = "last",
    **prepare_kwargs,
) -> ExpertAttributionResult:
    """First-order estimate of :func:`~moelens.trace_experts` for every expert of every layer.

    ``positions``: ``"last"`` (default), ``"subject_last"`` or an int -> ``scores [n_layers, n_experts]``;
    ``"all"``, ``"subject"`` or a list -> ``[n_layers, n_positions, n_experts]``, each entry the
    estimate of restoring that expert at that one position. NaN on dense layers. ``case``: a
    :class:`~moelens.FactCase` (then ``noise=``, ``seed=``, ``n_samples=``, ``sigma=``... as for
    :func:`~moelens.trace_experts`) or a :class:`~moelens.TraceSetup` from :func:`moelens.tracing.prepare`.
    The backward runs over positions ``min(positions)..T-1`` only (:func:`suffix_gradients`).
    """
    setup = case if isinstance(case, TraceSetup) else prepare(
        model, case, names_filter=attribution_names_filter, **prepare_kwargs)
    pos = resolve_positions(positions, setup.tokenized)
    single = _check_single(positions)
    warn_if_post_normed_moe(model, list(model.cfg.moe_layers))
    p0 = min(pos)
    rel = [p - p0 for p in pos]
    grads = suffix_gradients(model, setup, ("mlp",), p0)
    L, E = model.cfg.n_layers, model.cfg.n_experts
    scores = torch.full((L, len(pos), E), float("nan"))
    layer_scores = torch.empty(L, len(pos))
    clean_routed = []
    with torch.no_grad():
        for l in range(L):
            name = f"blocks.{l}.hook_mlp_out"
            g = grads[name][:, rel]  # [S, P, d]
            d = setup.clean_cache[name][:, pos].float().to(g.device) - setup.corrupted_cache[name][:, pos].float().to(g.device)
            layer_scores[l] = setup.corrupted + (g * d).sum(-1).mean(0).cpu()
            if l in model.cfg.moe_layers:
                est = _slot_dots(setup.clean_cache, l, g, pos) - _slot_dots(setup.corrupted_cache, l, g, pos)
                scores[l] = setup.corrupted + est.mean(0).cpu()
                clean_routed.append(routed_sets(setup, l, pos)[0])
            else:
                clean_routed.append([])
    if single:
        scores, layer_scores = scores[:, 0], layer_scores[:, 0]
    return ExpertAttributionResult(
        scores=scores, layer_scores=layer_scores, positions=pos, per_position=not single, clean_routed=clean_routed,
        **{**_common(setup), "settings": {**setup.settings, "positions": positions, "method": "attribution"}},
    )


def attribute_layers(
    model,
    case: Union[FactCase, TraceSetup],
    *,
    kind: str = "mlp",
    positions: PositionSpec = "all",
    direction: str = "restore",
    window: int = 1,
    **prepare_kwargs,
) -> LayerAttributionResult:
    """First-order estimate of :func:`~moelens.trace_layers` (``window=1``) for ``h`` the ``kind``
    hook (``mlp``: ``hook_mlp_out``, ``attn``: ``hook_attn_out``, ``resid``: ``hook_resid_post``) at
    each (layer, position):

    * ``direction="restore"``: ``scores[l, p] = corrupted + mean_s g_s . (h_clean - h_corrupted_s)``,
      ``g_s`` the gradient of corrupted run ``s``'s metric;
    * ``direction="necessity"``: ``scores[l, p] = clean + mean_s g_clean . (h_corrupted_s - h_clean)``,
      ``g_clean`` the gradient of the clean run's metric (one row: cheaper still).

    ``window`` must be 1: the first-order estimate of restoring several layers at once is not the
    sum of their single-layer terms (each layer's gradient includes the paths through the later
    layers of the window, which the restoration cuts), and computing it takes one extra pass per
    cell, which is what the exact suffix engine costs: use ``trace_layers(window=w)``."""
    if kind not in KIND_HOOKS:
        raise ValueError(f"kind={kind!r}: use one of {sorted(KIND_HOOKS)}")
    if direction not in ("restore", "necessity"):
        raise ValueError(f"direction={direction!r}: use 'restore' or 'necessity'")
    if window != 1:
        raise ValueError(
            f"window={window!r}: attribution estimates single-layer cells only. Restoring a window is not "
            f"the sum of its layers' first-order terms, and its own estimate costs a pass per cell, as much "
            f"as the exact result: use moelens.trace_layers(model, case, window={window!r}) (exact, suffix engine)")
    setup = case if isinstance(case, TraceSetup) else prepare(
        model, case, names_filter=attribution_names_filter, **prepare_kwargs)
    pos = resolve_positions(positions, setup.tokenized)
    p0 = min(pos)
    rel = [p - p0 for p in pos]
    grads = suffix_gradients(model, setup, (kind,), p0, direction=direction)
    L = model.cfg.n_layers
    scores = torch.empty(L, len(pos))
    base = setup.corrupted if direction == "restore" else setup.clean
    with torch.no_grad():
        for l in range(L):
            name = f"blocks.{l}.hook_{KIND_HOOKS[kind]}"
            g = grads[name][:, rel]
            clean = setup.clean_cache[name][:, pos].float().to(g.device)
            corrupted = setup.corrupted_cache[name][:, pos].float().to(g.device)
            d = clean - corrupted if direction == "restore" else corrupted - clean
            scores[l] = base + (g * d).flatten(2).sum(-1).mean(0).cpu()  # over (streams and) d_model
    settings = {**setup.settings, "kind": kind, "window": 1, "direction": direction, "positions": positions,
                "method": "attribution"}
    return LayerAttributionResult(scores=scores, layers=list(range(L)), positions=pos, kind=kind, direction=direction,
                                  **{**_common(setup), "settings": settings})


def verify_pairs(model, setup: TraceSetup, pairs: Sequence[tuple[int, int]], positions: list[int],
                 max_rows: int = 128) -> tuple[dict, dict]:
    """Exact contrasts of restoring each ``(layer, expert)`` (as :func:`~moelens.trace_experts`) and of
    restoring each involved layer's whole MoE output: ``({(l, e): score}, {l: layer_score})``."""
    by_layer: dict[int, list[int]] = {}
    for l, e in pairs:
        by_layer.setdefault(int(l), []).append(int(e))
    items, keys = [], []
    for l, experts in sorted(by_layer.items()):
        items.append((l, setup.layer_delta(l, positions)))
        keys.append(l)
        for e in experts:
            items.append((l, setup.expert_delta(l, [e], positions)))
            keys.append((l, e))
    vals = setup.restore_scores_at(model, items, positions, max_rows=max_rows)  # every layer in one pass
    exact = {k: float(v) for k, v in zip(keys, vals) if isinstance(k, tuple)}
    layer_exact = {k: float(v) for k, v in zip(keys, vals) if not isinstance(k, tuple)}
    return exact, layer_exact


def screen_experts(
    model,
    case: Union[FactCase, TraceSetup],
    *,
    n_verify: int = 10,
    positions: PositionSpec = "last",
    layers: Optional[Sequence[int]] = None,
    max_rows: int = 128,
    **prepare_kwargs,
) -> ScreenResult:
    """Screen every (layer, expert) pair with :func:`attribute_experts`, then verify the ``n_verify``
    highest estimates exactly (suffix runs, equal to :func:`~moelens.trace_experts`). ``layers``:
    screen only these sparse layers (default: all). ``positions``: as for ``trace_experts`` (a set of
    positions is restored jointly; its estimate is the sum of the per-position first-order terms)."""
    setup = case if isinstance(case, TraceSetup) else prepare(
        model, case, names_filter=attribution_names_filter, **prepare_kwargs)
    pos = resolve_positions(positions, setup.tokenized)
    a = attribute_experts(model, setup, positions=pos)  # [L, P, E] per position
    est = setup.corrupted + (a.scores - setup.corrupted).sum(1)  # joint first-order estimate
    if layers is not None:
        bad = [l for l in layers if l not in model.cfg.moe_layers]
        if bad:
            raise ValueError(f"layers {bad} are not sparse layers (sparse: {list(model.cfg.moe_layers)})")
        keep = torch.zeros(est.shape[0], dtype=torch.bool)
        keep[list(layers)] = True
        est[~keep] = float("nan")
    flat = torch.nan_to_num(est, nan=-float("inf")).flatten()
    n = min(int(n_verify), int(torch.isfinite(flat).sum()))
    order = torch.argsort(flat, descending=True)[:n]
    E = est.shape[1]
    pairs = [(int(i) // E, int(i) % E) for i in order]
    exact_vals, layer_exact = verify_pairs(model, setup, pairs, pos, max_rows=max_rows)
    exact = torch.full_like(est, float("nan"))
    verified = torch.zeros(est.shape, dtype=torch.bool)
    for (l, e), v in exact_vals.items():
        exact[l, e], verified[l, e] = v, True
    layer_scores = torch.full((est.shape[0],), float("nan"))
    for l, v in layer_exact.items():
        layer_scores[l] = v
    clean_routed = [routed_sets(setup, l, pos)[0] if l in model.cfg.moe_layers else [] for l in range(est.shape[0])]
    return ScreenResult(
        scores=torch.where(verified, exact, est), estimates=est, exact=exact, verified=verified,
        layer_scores=layer_scores, positions=pos, clean_routed=clean_routed, n_verify=int(n_verify),
        **{**_common(setup), "settings": {**setup.settings, "positions": positions, "n_verify": int(n_verify),
                                          "method": "screen+verify"}},
    )


__all__ = ["ExpertAttributionResult", "LayerAttributionResult", "ScreenResult", "attribute_experts",
           "attribute_layers", "corrupted_gradients", "screen_experts", "suffix_gradients", "verify_pairs"]
