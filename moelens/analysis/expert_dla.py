"""Direct logit attribution and logit lens per expert.

Conventions (TransformerLens' frozen-scale DLA): a component ``c`` at a position contributes
``(c / s) . (w_f * W_U[:, t])`` to the logit of token ``t``, where ``s`` is ``ln_final.hook_scale`` at
that position (the clean run's divisor, frozen) and ``w_f`` the final norm's weight. Summed over
all components of the residual stream this is exactly the logit (no unembedding bias in any
supported architecture). An expert's component at a position is its weighted update
``w_e * E_e(x)`` (``cache.expert_contribution``), zero where it was not routed.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from moelens.components.moe import combine_weights

TokenLike = Union[str, int, Tensor, Sequence[int]]


def _token_id(model, t) -> Union[int, Tensor]:
    if isinstance(t, str):
        return model.to_single_token(t)
    if isinstance(t, int):
        return t
    return torch.as_tensor(t)


def _token_str(model, t: int) -> Optional[str]:
    tok = getattr(model, "tokenizer", None)
    return tok.decode([int(t)]) if tok is not None else None


def _positions(n_pos: int, positions) -> list[int]:
    if positions is None:
        return list(range(n_pos))
    if isinstance(positions, int):
        positions = [positions]
    out = []
    for p in positions:
        if not -n_pos <= p < n_pos:
            raise IndexError(f"position {p} out of range for {n_pos} positions")
        out.append(p % n_pos)
    return out


def _directions(model, tokens, incorrect_tokens, batch: int, pos: list[int]) -> Tensor:
    """``[batch, len(pos), d_model]`` logit directions (final norm weight folded in)."""
    def one(t):
        t = _token_id(model, t)
        t = torch.as_tensor(t)
        d = model.tokens_to_residual_directions(t).reshape(*t.shape, -1)  # one token gives [d_model]
        if t.ndim == 0:
            return d.expand(batch, len(pos), -1)
        if t.ndim == 1 and t.shape[0] == batch:
            return d[:, None, :].expand(batch, len(pos), -1)
        if t.ndim == 2 and t.shape == (batch, len(pos)):
            return d
        raise ValueError(
            f"tokens must be one token, one per batch element [batch={batch}], or one per selected "
            f"position [batch, {len(pos)}]; got shape {tuple(t.shape)}"
        )

    d = one(tokens)
    if incorrect_tokens is not None:
        d = d - one(incorrect_tokens)
    return d.float()


@torch.no_grad()
def expert_dla(
    model,
    cache,
    tokens: TokenLike,
    incorrect_tokens: Optional[TokenLike] = None,
    positions: Union[int, Sequence[int], None] = -1,
    layers: Optional[Sequence[int]] = None,
):
    """Direct logit attribution of every routed expert (and shared expert) of the sparse layers.

    ``tokens``: the answer token (text, id, ``[batch]`` ids, or ``[batch, n_positions]`` ids);
    with ``incorrect_tokens`` the attribution is to the logit difference ``tokens - incorrect``.
    ``positions``: an int, a list, or None for all positions (default: the last).

    Returns a tidy ``pandas.DataFrame``, one row per (batch, position, layer, expert): ``batch``,
    ``position``, ``token`` (the input token there, when known), ``layer``, ``expert`` (-1 for the
    shared experts), ``label`` (``"L{l}E{e}"`` / ``"L{l}_shared"``), ``routed``, ``weight`` (combine
    weight, 0 where not routed) and ``attribution`` (logit units; 0 where not routed). The values
    equal ``cache.logit_attrs`` of ``cache.decompose_resid(expert_level=True)``'s components.
    """
    import pandas as pd

    cfg = model.cfg
    scale_full = cache["ln_final.hook_scale"]
    if not cache.has_batch_dim:
        raise ValueError("expert_dla needs a cache with a batch dimension")
    batch, n_pos = scale_full.shape[:2]
    pos = _positions(n_pos, positions)
    layers = list(cfg.moe_layers) if layers is None else list(layers)
    bad = [l for l in layers if l not in cfg.moe_layers]
    if bad:
        raise ValueError(f"layers {bad} are not sparse; sparse layers are {list(cfg.moe_layers)}")
    dirs = _directions(model, tokens, incorrect_tokens, batch, pos)  # [b, P, d]
    scale = scale_full[:, pos].float()  # [b, P, 1]
    in_tokens = getattr(cache, "tokens", None)
    tok_strs = None
    if in_tokens is not None and getattr(model, "tokenizer", None) is not None:
        tok_strs = [[_token_str(model, in_tokens[b, p]) for p in pos] for b in range(batch)]
    rows = []
    for l in layers:
        idx = cache[f"blocks.{l}.mlp.hook_expert_indices"][:, pos]
        w = cache[f"blocks.{l}.mlp.hook_expert_weights"][:, pos].float()
        out = cache[f"blocks.{l}.mlp.hook_expert_out"][:, pos].float()  # [b, P, k, d]
        dev = out.device
        slot = combine_weights(cfg, w) * (out * dirs.to(dev)[:, :, None, :]).sum(-1) / scale.to(dev)  # [b, P, k]
        attr = torch.zeros(batch, len(pos), cfg.n_experts, device=dev).scatter_add_(-1, idx, slot)
        wmap = torch.zeros(batch, len(pos), cfg.n_experts, device=dev).scatter_add_(-1, idx, w)
        routed = torch.zeros(batch, len(pos), cfg.n_experts, dtype=torch.bool, device=dev).scatter_(-1, idx, True)
        attr, wmap, routed = attr.cpu(), wmap.cpu(), routed.cpu()
        shared = None
        if cfg.has_shared_experts:
            so = cache[f"blocks.{l}.mlp.hook_shared_out"][:, pos].float()
            shared = ((so * dirs.to(so.device)).sum(-1) / scale.to(so.device)[..., 0]).cpu()
        for b in range(batch):
            for i, p in enumerate(pos):
                base = {"batch": b, "position": p, "token": tok_strs[b][i] if tok_strs else None, "layer": l}
                for e in range(cfg.n_experts):
                    rows.append({**base, "expert": e, "label": f"L{l}E{e}", "routed": bool(routed[b, i, e]),
                                 "weight": float(wmap[b, i, e]), "attribution": float(attr[b, i, e])})
                if shared is not None:
                    rows.append({**base, "expert": -1, "label": f"L{l}_shared", "routed": True,
                                 "weight": float("nan"), "attribution": float(shared[b, i])})
    df = pd.DataFrame(rows)
    df.attrs["metric"] = _metric_name(model, tokens, incorrect_tokens)
    return df


def _metric_name(model, tokens, incorrect_tokens) -> str:
    def name(t):
        t = _token_id(model, t)
        if isinstance(t, int) or (isinstance(t, Tensor) and t.ndim == 0):
            s = _token_str(model, int(t))
            return repr(s) if s is not None else f"token {int(t)}"
        return "the given tokens"

    m = f"logit of {name(tokens)}"
    if incorrect_tokens is not None:
        m = f"logit difference {name(tokens)} - {name(incorrect_tokens)}"
    return f"direct attribution to the {m}"


@torch.no_grad()
def expert_logit_lens(
    model, cache, layer: int, expert: Union[int, str], position: int = -1, batch: int = 0, k: int = 10,
):
    """The tokens an expert's weighted update at one position promotes and suppresses, read
    through the final norm's frozen scale and the unembedding: ``(w_e E_e(x) / s) . (w_f * W_U[:, v])``
    for every vocabulary token ``v`` (logit units: its direct effect on each logit).

    ``expert="shared"`` reads the shared experts' output. Returns a DataFrame with ``rank``,
    ``direction`` (``"promoted"``/``"suppressed"``), ``token_id``, ``token``, ``logit``; its
    ``attrs["routed"]`` says whether the expert was routed there (if not, every value is 0).
    """
    import pandas as pd

    if cache.has_batch_dim:
        at = (batch, position)
    else:  # remove_batch_dim=True: [pos, ...], one sequence
        if batch not in (0, -1):
            raise IndexError(f"batch {batch}: this cache has no batch dimension (one sequence, batch 0)")
        at = (position,)
    if expert == "shared":
        if not model.cfg.has_shared_experts:
            raise ValueError("this architecture has no shared experts")
        vec = cache[f"blocks.{layer}.mlp.hook_shared_out"][at]
        routed = True
    else:
        vec = cache.expert_contribution(layer, int(expert))[at]
        routed = bool((cache[f"blocks.{layer}.mlp.hook_expert_indices"][at] == int(expert)).any())
    s = cache["ln_final.hook_scale"][at].float()
    if model.cfg.normalization_type == "LN":  # LayerNorm (PhiMoE) centres its input: so does the lens
        vec = vec - vec.mean(-1, keepdim=True)
    W_U = model.W_U  # [d_model, d_vocab]
    d = (vec.float().to(W_U.device) / s.to(W_U.device)) * model.ln_final.scale_weight.float().to(W_U.device)
    logits = d @ W_U.float()  # [d_vocab]
    rows = []
    for direction, largest in (("promoted", True), ("suppressed", False)):
        vals, ids = torch.topk(logits, min(k, logits.numel()), largest=largest)
        for r, (v, i) in enumerate(zip(vals.tolist(), ids.tolist())):
            rows.append({"rank": r, "direction": direction, "token_id": i, "token": _token_str(model, i), "logit": v})
    df = pd.DataFrame(rows)
    df.attrs["routed"] = routed
    return df


@torch.no_grad()
def expert_weight_lens(
    model, layer: int, experts: Optional[Sequence[int]] = None, k: int = 10, largest: bool = True,
    fold_final_norm: bool = True, max_elements: int = 2**26,
):
    """Weight-only logit lens of experts: each output direction of an expert (column ``n`` of its
    down projection ``w_down[e][:, n]``, what hidden neuron ``n`` writes) through the unembedding
    (``w_f * W_U``, the final norm's weight folded in unless ``fold_final_norm=False``).

    Returns ``(values, token_ids)``, each ``[n_selected_experts, d_expert, k]``: the ``k`` tokens
    with the largest (``largest=False``: most negative) logit per direction. The vocabulary is
    processed in chunks sized so that no intermediate exceeds ``max_elements`` numbers, so a
    128-expert x 150k-vocab layer fits in memory. A neuron's activation can have either sign, so
    look at both ``largest=True`` and ``False``.
    """
    cfg = model.cfg
    if layer not in cfg.moe_layers:
        raise ValueError(f"layer {layer} is not sparse; sparse layers are {list(cfg.moe_layers)}")
    experts = list(range(cfg.n_experts)) if experts is None else list(experts)
    w_down = model.blocks[layer].mlp.experts.w_down  # [n_experts, d_model, d_expert]
    W_U = model.W_U  # [d_model, d_vocab]
    dev = W_U.device
    w_f = model.ln_final.scale_weight.float().to(dev) if fold_final_norm else torch.ones(cfg.d_model, device=dev)
    d_exp = w_down.shape[-1]
    n_vocab = W_U.shape[1]
    per_group = max(1, min(len(experts), max_elements // max(d_exp * min(n_vocab, 4096), 1)))
    out_v = torch.empty(len(experts), d_exp, k)
    out_i = torch.empty(len(experts), d_exp, k, dtype=torch.long)
    for g in range(0, len(experts), per_group):
        group = experts[g : g + per_group]
        dirs = w_down[group].to(dev).float().transpose(1, 2).reshape(-1, cfg.d_model)  # [G*d_exp, d_model]
        if cfg.normalization_type == "LN":  # LayerNorm (PhiMoE) centres its input
            dirs = dirs - dirs.mean(-1, keepdim=True)
        dirs = dirs * w_f
        rows = dirs.shape[0]
        chunk = max(k, max_elements // max(rows, 1))
        best_v = torch.full((rows, k), float("-inf"), device=dev)
        best_i = torch.zeros((rows, k), dtype=torch.long, device=dev)
        sign = 1.0 if largest else -1.0
        for start in range(0, n_vocab, chunk):
            logits = sign * (dirs @ W_U[:, start : start + chunk].float())  # [rows, chunk]
            kk = min(k, logits.shape[1])
            v, i = torch.topk(logits, kk, dim=-1)
            cat_v, cat_i = torch.cat([best_v, v], -1), torch.cat([best_i, i + start], -1)
            top = torch.topk(cat_v, k, dim=-1)
            best_v, best_i = top.values, cat_i.gather(-1, top.indices)
        out_v[g : g + len(group)] = (sign * best_v).view(len(group), d_exp, k).cpu()
        out_i[g : g + len(group)] = best_i.view(len(group), d_exp, k).cpu()
    return out_v, out_i


def expert_weight_lens_frame(model, layer: int, experts: Optional[Sequence[int]] = None, k: int = 5, **kwargs):
    """:func:`expert_weight_lens` as a tidy DataFrame: ``layer, expert, neuron, rank, token_id,
    token, logit``."""
    import pandas as pd

    experts = list(range(model.cfg.n_experts)) if experts is None else list(experts)
    vals, ids = expert_weight_lens(model, layer, experts, k=k, **kwargs)
    rows = []
    for a, e in enumerate(experts):
        for n in range(vals.shape[1]):
            for r in range(k):
                i = int(ids[a, n, r])
                rows.append({"layer": layer, "expert": e, "neuron": n, "rank": r, "token_id": i,
                             "token": _token_str(model, i), "logit": float(vals[a, n, r])})
    return pd.DataFrame(rows)


__all__ = ["expert_dla", "expert_logit_lens", "expert_weight_lens", "expert_weight_lens_frame"]
