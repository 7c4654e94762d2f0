"""Router-logit attribution: which upstream components chose this expert?

A sparse layer's router logits are linear in its normalised input: ``logits = W_router (w_2 * r / s)``
(+ a router bias where an architecture has one), with ``r`` the residual stream entering the MLP
(``hook_resid_mid``), ``s`` the ln2 scale (``ln2.hook_scale``) and ``w_2`` the ln2 weight. With ``s``
frozen at its cached value, ``r``'s decomposition (embedding, each attention layer or head, each
earlier dense MLP, each earlier routed expert and shared expert, accumulated biases) splits the
router logits exactly: the contributions sum to ``hook_router_logits`` (up to float rounding; tested
in fp32). As with direct logit attribution the split is of the *logits*; the softmax and top-k that
follow are not linear.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


@dataclass
class RouterAttribution:
    """``values[c, batch, pos, expert]``: component ``labels[c]``'s contribution to the router logit
    of ``expert`` in sparse layer ``layer``. ``router_logits`` and ``chosen`` (``hook_expert_indices``)
    are the cached ones; ``values.sum(0)`` equals ``router_logits``."""

    layer: int
    values: Tensor
    labels: list[str]
    router_logits: Tensor
    chosen: Tensor
    str_tokens: Optional[list[list[str]]] = field(default=None, repr=False)

    def residual(self) -> Tensor:
        """``router_logits - values.sum(0)`` (float rounding only)."""
        return self.router_logits.float() - self.values.sum(0)

    def to_frame(self, batch: int = 0, position: int = -1):
        """Tidy table for one position: ``component, expert, chosen, contribution``."""
        import pandas as pd

        v = self.values[:, batch, position].cpu()
        chosen = set(self.chosen[batch, position].tolist())
        rows = [
            {"component": lab, "expert": e, "chosen": e in chosen, "contribution": float(v[c, e])}
            for c, lab in enumerate(self.labels) for e in range(v.shape[1])
        ]
        return pd.DataFrame(rows)

    def plot(self, batch: int = 0, position: int = -1, top: int = 20, experts: Optional[list[int]] = None):
        """Heatmap for one position: the ``top`` components (by largest absolute contribution to the
        chosen experts' logits; the rest summed into ``"other"``) x experts (the chosen ones first,
        marked with *). See :func:`moelens.plotting.analysis.router_attribution_heatmap`."""
        from moelens.plotting.analysis import router_attribution_heatmap

        return router_attribution_heatmap(self, batch=batch, position=position, top=top, experts=experts)


@torch.no_grad()
def router_attribution(
    model, cache, layer: int, heads: bool = False, expert_level: bool = True, pos_slice=None
) -> RouterAttribution:
    """Split sparse layer ``layer``'s router logits into upstream contributions.

    Components: ``embed``, each attention layer ``{l}_attn_out`` up to and including ``layer``
    (``heads=True``: each head ``L{l}H{h}`` instead, and the attention output biases as ``bias``;
    a linear-attention layer stays whole), each earlier MLP (``expert_level=True``:
    ``L{l}E{e}`` per routed expert and ``L{l}_shared``; dense layers ``{l}_mlp_out``) and
    ``router_bias`` (where the router has one, e.g. gpt-oss). With LayerNorm (PhiMoE) each component
    is centred before the scale and the norm's bias is one more component, ``ln_bias``.
    Needs a full cache (``model.run_with_cache(...)``).
    """
    from transformer_lens.utilities import Slice

    cfg = model.cfg
    if layer not in cfg.moe_layers:
        raise ValueError(f"layer {layer} is not sparse; sparse layers are {list(cfg.moe_layers)}")
    ps = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
    comps, labels = cache.decompose_resid(
        layer, mlp_input=True, expert_level=expert_level, pos_slice=ps, return_labels=True
    )
    if getattr(cfg, "hc_mult", 1) > 1:  # DeepSeek-V4: the router reads the streams collapsed by ffn_hc's pre weights
        if heads:
            raise ValueError("router_attribution(heads=True) is not defined for DeepSeek-V4's compressed attention")
        pre = ps.apply(cache[f"blocks.{layer}.ffn_hc.hook_pre"], dim=-2).float()
        comps = (comps.float() * pre.to(comps.device).unsqueeze(-1)).sum(-2).to(comps.dtype)
    if heads:
        keep = [i for i, lab in enumerate(labels) if not lab.endswith("_attn_out")]
        head_stack, head_labels = cache.stack_head_results(layer + 1, pos_slice=ps, return_labels=True, _target=layer)
        comps = torch.cat([comps[keep[:1]], head_stack.to(comps.device, comps.dtype), comps[keep[1:]]])
        labels = [labels[keep[0]], *head_labels, *[labels[i] for i in keep[1:]]]
    # attention output biases: inside each "{l}_attn_out" already; per-head results exclude them
    bias = model.accumulated_bias(layer, mlp_input=True, include_mlp_biases=False)
    if heads and bool((bias != 0).any()):
        comps = torch.cat([comps, bias.to(comps.device, comps.dtype).expand_as(comps[:1])])
        labels.append("bias")
    ln2 = model.blocks[layer].ln2
    router = model.blocks[layer].mlp.router
    W = router.W_router
    dev = W.device
    c = comps.float().to(dev)
    ln_bias = getattr(ln2, "b", None)
    if ln_bias is not None:  # LayerNorm (PhiMoE): each component centred; its bias is one more component
        c = c - c.mean(-1, keepdim=True)
    if ln2 is None:  # post-norm blocks (FlexOlmo): the router reads the residual stream itself
        normed = c
    else:
        scale = ps.apply(cache[f"blocks.{layer}.ln2.hook_scale"], dim=-2).float()
        # the norm the router reads through: ln2, or (Gemma 4) its own input norm of the same residual
        # stream (same statistic as ln2's scale), weight in_norm_w * d_model**-0.5
        in_w = getattr(router, "in_norm_w", None)
        weight = ln2.scale_weight.float() if in_w is None else in_w.float() * model.cfg.d_model ** -0.5
        normed = c / scale.to(dev) * weight.to(dev)
    values = normed @ W.float().T  # [c, ..., n_experts]
    if ln_bias is not None:
        values = torch.cat([values, (ln_bias.float().to(dev) @ W.float().T).expand_as(values[:1])])
        labels.append("ln_bias")
    b_router = next((getattr(router, n) for n in ("b_router", "b_gate", "bias") if getattr(router, n, None) is not None), None)
    if b_router is not None:
        values = torch.cat([values, b_router.float().to(dev).expand_as(values[:1])])
        labels.append("router_bias")
    logits = ps.apply(cache[f"blocks.{layer}.mlp.hook_router_logits"], dim=-2)
    chosen = ps.apply(cache[f"blocks.{layer}.mlp.hook_expert_indices"], dim=-2)
    str_tokens = None
    toks = getattr(cache, "tokens", None)
    if toks is not None and getattr(model, "tokenizer", None) is not None and cache.has_batch_dim:
        t = ps.apply(toks, dim=-1)
        if t.ndim == 2:
            str_tokens = [[model.tokenizer.decode([int(i)]) for i in row] for row in t]
    return RouterAttribution(layer, values, labels, logits, chosen, str_tokens)


__all__ = ["RouterAttribution", "router_attribution"]
