"""Expert steering (SteerMoE) as an intervention of :mod:`moelens.patching`, and its detector.

SteerMoE (Fayyaz et al., "Steering MoE LLMs via Expert (De)Activation", ICLR 2026,
arXiv:2509.09660; reference code ``adobe-research/SteerMoE``) finds behaviour-linked experts by
how much more often the router picks them on one set of prompts than on a paired set, then
forces them on or off during generation by editing the router logits. Its rule, per token and
steered layer (``src/modeling_vllm/*.py`` of the reference code)::

    lp = log_softmax(router_logits)
    lp[activated]   = max(lp) + 0.01      # above every other expert: always selected
    lp[deactivated] = min(lp) - 0.01      # below every other expert: never selected
    router_logits  <- lp                  # softmax/top-k/renormalisation then run as usual

so untouched experts keep their relative scores (``softmax(lp) == softmax(logits)`` before the
edit) and an activated expert gets a combine weight slightly above the best original expert's.
:class:`SteerExperts` applies exactly that on ``hook_router_logits`` (``method="logits"``), or
forces only the selection (``method="route"``: activated experts replace the lowest-scored chosen
ones, deactivated ones are replaced by the next best unchosen one, the router's other chosen
experts stay; the combine weights follow the architecture's rule from the unedited scores). The logit rule is written for softmax routers;
on a sigmoid router (DeepSeek-V3 family) ``method="logits"`` raises and ``method="route"`` applies
(the other experts ranked on the biased selection scores, as the router ranks them).

:func:`detect_experts` is SteerMoE's detector with a paired statistic: for each (layer, expert)
the routing frequency (share of real tokens whose top-k includes the expert) on each prompt of
set A and of its paired prompt in set B, SteerMoE's risk difference (token-pooled frequency A
minus B), and a paired t-test over the prompt pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from moelens.patching import Intervention, Positions, _check_layer, _check_range, _positions, hook_name

__all__ = ["SteerExperts", "detect_experts", "routing_frequencies", "steering_from_ranking"]

STEER_MARGIN = 0.01  # SteerMoE's offset above the max / below the min log-probability


@dataclass
class SteerExperts(Intervention):
    """Force ``activate`` experts on and ``deactivate`` experts off at ``layer`` (or ``layers``),
    at ``positions`` (default every position: prompt and every generated token).

    ``method="logits"``: SteerMoE's router-logit rule (see the module docstring);
    ``method="route"``: forced selection, weights by the architecture's rule.
    At most ``top_k`` experts can be activated per layer; an expert cannot be both.
    """

    layer: Optional[int] = None
    activate: Sequence[int] = ()
    deactivate: Sequence[int] = ()
    layers: Optional[Sequence[int]] = None
    positions: Positions = None
    method: str = "logits"

    def _layers(self, model) -> list[int]:
        if (self.layer is None) == (self.layers is None):
            raise ValueError("SteerExperts needs layer= or layers= (one of them)")
        layers = [self.layer] if self.layer is not None else list(self.layers)
        for l in layers:
            _check_layer(model, l)
            if l not in model.cfg.moe_layers:
                raise ValueError(f"layer {l} is dense; sparse layers are {list(model.cfg.moe_layers)}")
        return layers

    def _validate(self, model) -> tuple[Tensor, Tensor]:
        if self.method not in ("logits", "route"):
            raise ValueError(f"method={self.method!r}: use 'logits' (SteerMoE's router-logit rule) or 'route'")
        on, off = [int(e) for e in self.activate], [int(e) for e in self.deactivate]
        if not on and not off:
            raise ValueError("SteerExperts needs experts to activate= and/or deactivate=")
        on = _check_range(on, model.cfg.n_experts, "expert")  # negative ids count from the end, as in patching
        off = _check_range(off, model.cfg.n_experts, "expert")
        if set(on) & set(off):
            raise ValueError(f"experts {sorted(set(on) & set(off))} are both activated and deactivated")
        if len(set(on)) > model.cfg.top_k:
            raise ValueError(f"{len(set(on))} experts to activate, but only top_k={model.cfg.top_k} are routed per token")
        if len(set(off)) > model.cfg.n_experts - model.cfg.top_k:
            raise ValueError(f"deactivating {len(set(off))} of {model.cfg.n_experts} experts leaves fewer than top_k={model.cfg.top_k}")
        return torch.tensor(sorted(set(on)), dtype=torch.long), torch.tensor(sorted(set(off)), dtype=torch.long)

    def hooks(self, model):
        on, off = self._validate(model)
        if self.method == "logits" and getattr(model.cfg, "router_score_func", "softmax") != "softmax":
            raise ValueError(
                f"method='logits' is SteerMoE's rule for softmax routers; this model's router scores with "
                f"{model.cfg.router_score_func} (and may select on biased scores): use method='route'"
            )
        out = []
        for layer in self._layers(model):
            if self.method == "logits":
                out.append((hook_name(model, "router_logits", layer), self._logit_fn(on, off)))
            else:
                out.extend(self._route_hooks(model, layer, on, off))
        return out

    def _logit_fn(self, on: Tensor, off: Tensor):
        def fn(act, rows, hook):
            pos = _positions(self.positions, act.shape[1])
            act = act.clone()
            sub = act[rows][:, pos]
            lp = torch.log_softmax(sub.float(), dim=-1).to(act.dtype)
            top, bottom = lp.max(-1, keepdim=True).values, lp.min(-1, keepdim=True).values
            # max + 0.01 / min - 0.01 in the logits' dtype: in bf16 the margin is below the spacing once
            # |lp| >= 4, so it would round back to a tie (a deactivated expert could still be chosen);
            # then the next representable value keeps the edited expert strictly above / below
            hi = torch.maximum((top.float() + STEER_MARGIN).to(act.dtype), torch.nextafter(top, torch.full_like(top, float("inf"))))
            lo = torch.minimum((bottom.float() - STEER_MARGIN).to(act.dtype), torch.nextafter(bottom, torch.full_like(bottom, -float("inf"))))
            if on.numel():
                lp[..., on.to(lp.device)] = hi.expand(*hi.shape[:-1], on.numel())
            if off.numel():
                lp[..., off.to(lp.device)] = lo.expand(*lo.shape[:-1], off.numel())
            block = act[rows]
            block[:, pos] = lp
            act[rows] = block
            return act

        return fn

    def _route_hooks(self, model, layer, on, off):
        state = {}
        sorted_ = model.cfg.topk_sorted

        def grab(act, rows, hook):
            state["scores"] = act
            return act

        def fn(idx, rows, hook):
            pos = _positions(self.positions, idx.shape[1])
            scores = state["scores"][rows][:, pos].float().clone()
            chosen = idx[rows][:, pos]
            # the router's own choice ranks above every other expert (its group limits included), so
            # only the edited experts change; the others are ranked on the (selection) scores
            span = scores.max() - scores.min() + 1.0
            scores.scatter_add_(-1, chosen, span.expand(chosen.shape).contiguous())
            top, bottom = scores.max() + 1.0, scores.min() - 1.0
            if on.numel():
                scores[..., on.to(scores.device)] = top  # chosen first, whatever their score
            if off.numel():
                scores[..., off.to(scores.device)] = bottom  # never chosen
            forced = torch.topk(scores, model.cfg.top_k, dim=-1, sorted=sorted_).indices
            unchanged = (forced.sort(-1).values == chosen.sort(-1).values).all(-1, keepdim=True)
            forced = torch.where(unchanged, chosen, forced)  # same experts: keep the router's slot order
            idx = idx.clone()
            block = idx[rows]
            block[:, pos] = forced.to(idx.dtype)
            idx[rows] = block
            return idx

        # rank the other experts as the router's top-k does: on the selection scores where the
        # architecture has them (DeepSeek-V3 family: scores + correction bias), else the scores
        ranked = f"blocks.{layer}.mlp.hook_router_selection_scores"
        source = ranked if ranked in model.hook_dict else hook_name(model, "router_scores", layer)
        return [(source, grab), (hook_name(model, "expert_indices", layer), fn)]


# ---------------------------------------------------------------------------------------------- detection
@torch.no_grad()
def routing_frequencies(
    model, prompts: Union[Sequence[str], Tensor], layers: Optional[Sequence[int]] = None,
    attention_mask: Optional[Tensor] = None, positions: str = "all", batch_size: int = 16,
    prepend_bos: Optional[bool] = None,
) -> Tensor:
    """``[n_prompts, n_layers, n_experts]``: the share of each prompt's tokens (real tokens only;
    ``positions="last"``: the last token only) whose chosen experts include each expert."""
    if positions not in ("all", "last"):
        raise ValueError(f"positions={positions!r}: use 'all' or 'last'")
    layers = list(model.cfg.moe_layers) if layers is None else [int(l) for l in layers]
    for l in layers:
        if l not in model.cfg.moe_layers:
            raise ValueError(f"layer {l} is not sparse; sparse layers: {list(model.cfg.moe_layers)}")
    if isinstance(prompts, Tensor):
        tokens, mask = prompts, (attention_mask if attention_mask is not None else torch.ones_like(prompts))
        if positions == "last" and not bool(mask[:, -1].all()):
            raise ValueError("positions='last' needs left padding (every row's last token real): the "
                             "attention_mask has padding in the last column")
    else:
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts")
        tokens, mask = model.tokenize(prompts, prepend_bos=prepend_bos)
    names = [f"blocks.{l}.mlp.hook_expert_indices" for l in layers]
    out = []
    for lo in range(0, tokens.shape[0], batch_size):
        t, m = tokens[lo : lo + batch_size], mask[lo : lo + batch_size]
        _, cache = model.run_with_cache(t, attention_mask=m, names_filter=names)
        m = m.bool().cpu()
        if positions == "last":
            m = torch.zeros_like(m)
            m[:, -1] = True
        per_layer = []
        for name in names:
            idx = cache[name].cpu()
            hit = torch.zeros(*idx.shape[:2], model.cfg.n_experts).scatter_(-1, idx, 1.0)  # [b, pos, E]
            per_layer.append((hit * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1))
        out.append(torch.stack(per_layer, 1))
    return torch.cat(out)


def detect_experts(
    model, prompts_a, prompts_b, layers: Optional[Sequence[int]] = None, positions: str = "all",
    batch_size: int = 16, prepend_bos: Optional[bool] = None,
):
    """Rank (layer, expert) by how much more often they are routed on ``prompts_a`` than on the
    paired ``prompts_b`` (same length; pair ``i`` is ``(prompts_a[i], prompts_b[i])``).

    Returns a DataFrame sorted by ``|risk_diff|`` (largest first), one row per (layer, expert):
    ``freq_a``/``freq_b`` (token-pooled routing frequency on each set), ``risk_diff``
    (``freq_a - freq_b``, SteerMoE's ranking score), ``mean_paired_diff`` (mean over pairs of the
    per-prompt frequency difference), ``t`` and ``p`` (paired t-test over the pairs; ``p`` is 1
    where every difference is 0 and 0 where they are all equal and non-zero) and ``p_holm``
    (Holm-Bonferroni over all rows).
    """
    import numpy as np
    import pandas as pd
    from scipy import stats

    from moelens.tracing.stats import holm_bonferroni

    if isinstance(prompts_a, str) or isinstance(prompts_b, str):
        raise TypeError("prompts_a and prompts_b are lists of prompts")
    if len(prompts_a) != len(prompts_b):
        raise ValueError(f"paired sets need equal sizes, got {len(prompts_a)} and {len(prompts_b)}")
    if len(prompts_a) < 2:
        raise ValueError("a paired statistic needs at least 2 prompt pairs")
    layers = list(model.cfg.moe_layers) if layers is None else [int(l) for l in layers]

    def counts(prompts):
        tokens, mask = model.tokenize(list(prompts), prepend_bos=prepend_bos)
        f = routing_frequencies(model, tokens, layers, mask, positions, batch_size)
        n = mask.sum(1).cpu().float() if positions == "all" else torch.ones(len(prompts))
        return f, n

    fa, na = counts(prompts_a)
    fb, nb = counts(prompts_b)
    pooled_a = (fa * na[:, None, None]).sum(0) / na.sum()
    pooled_b = (fb * nb[:, None, None]).sum(0) / nb.sum()
    d = (fa - fb).double().numpy()  # [pairs, layers, experts]
    n = d.shape[0]
    mean, sd = d.mean(0), d.std(0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean / (sd / np.sqrt(n))
        t = np.where(sd > 0, t, np.where(mean == 0, 0.0, np.sign(mean) * np.inf))
    p = 2 * stats.t.sf(np.abs(t), df=n - 1)
    L, E = mean.shape
    df = pd.DataFrame({
        "layer": np.repeat(layers, E), "expert": np.tile(np.arange(E), L),
        "freq_a": pooled_a.numpy().reshape(-1), "freq_b": pooled_b.numpy().reshape(-1),
        "risk_diff": (pooled_a - pooled_b).numpy().reshape(-1),
        "mean_paired_diff": mean.reshape(-1), "t": t.reshape(-1), "p": p.reshape(-1),
    })
    df["p_holm"] = holm_bonferroni(df["p"].to_numpy())
    df["abs_risk_diff"] = df["risk_diff"].abs()
    df = df.sort_values(["abs_risk_diff", "layer", "expert"], ascending=[False, True, True]).reset_index(drop=True)
    return df.drop(columns="abs_risk_diff")


def steering_from_ranking(
    ranking, n_activate: int = 0, n_deactivate: int = 0, top_k: Optional[int] = None,
    method: str = "logits", reverse: bool = False,
) -> list[SteerExperts]:
    """SteerMoE's selection from a :func:`detect_experts` table: the ``n_activate`` rows with the
    largest positive ``risk_diff`` are activated (at most ``top_k`` per layer, the rest skipped, as
    the reference code does) and the ``n_deactivate`` most negative are deactivated: this steers
    toward set A (``reverse=True``: toward set B). Returns one :class:`SteerExperts` per layer."""
    df = ranking.copy()
    if reverse:
        df["risk_diff"] = -df["risk_diff"]
    df = df.reindex(df["risk_diff"].abs().sort_values(ascending=False).index)
    pos, neg = df[df["risk_diff"] > 0].head(n_activate), df[df["risk_diff"] < 0].head(n_deactivate)
    if len(pos) < n_activate or len(neg) < n_deactivate:
        raise ValueError(
            f"asked for {n_activate} activated and {n_deactivate} deactivated experts, but the ranking has "
            f"{int((df['risk_diff'] > 0).sum())} positive and {int((df['risk_diff'] < 0).sum())} negative differences"
        )
    on: dict[int, list[int]] = {}
    off: dict[int, list[int]] = {}
    for r in pos.itertuples():
        if top_k is None or len(on.get(int(r.layer), [])) < top_k:
            on.setdefault(int(r.layer), []).append(int(r.expert))
    for r in neg.itertuples():
        off.setdefault(int(r.layer), []).append(int(r.expert))
    return [SteerExperts(layer=l, activate=on.get(l, []), deactivate=off.get(l, []), method=method)
            for l in sorted(set(on) | set(off))]
