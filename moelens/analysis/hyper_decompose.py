"""Decomposing DeepSeek-V4's residual streams into component contributions.

With ``hc`` residual streams mixed by hyper-connections (:mod:`moelens.components.hyper`) the stream
state is ``[batch, pos, hc, d_model]``. Given the mixing weights of the run (``post`` and ``comb`` of
every site, ``pre`` of the final head, all read from the cache), every step is linear in the
streams: a component ``c`` (the embedding, an attention output, an expert's weighted update) that
enters with ``post`` is carried as ``v_c (x) c`` with a per-position stream vector ``v_c [hc]``,
updated by each later site as ``v_c <- comb^T v_c``; the embedding enters with ``v = 1`` in every
stream. The stream state entering block ``l`` is then exactly ``sum_c v_c (x) c``, and the final
collapsed residual (``hc_head.hook_collapsed``, what the final norm reads) is
``sum_c (pre . v_c) c``: each component contributes its own vector times a per-position gain.

This is exact *given the run's mixing weights*, as TransformerLens' decompositions are exact given
the run's norm scales: the weights themselves depend on the streams, so a component's gain is not
what it would contribute alone.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def stream_components(cache, layer: Optional[int] = None, mlp_input: bool = False, mode: str = "all",
                      pos_slice=None, incl_embeds: bool = True, expert_level: bool = False):
    """``(components, labels)``: with ``layer=None`` the contributions to the final collapsed residual
    ``[n, *batch_pos, d_model]`` (summing to ``hc_head.hook_collapsed``); with ``layer=l`` the
    stream-resolved contributions ``[n, *batch_pos, hc, d_model]`` to the streams entering block ``l``
    (``hook_resid_pre``; ``hook_resid_mid`` with ``mlp_input``)."""
    from transformer_lens.utilities import Slice

    cfg = cache.model.cfg
    s = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
    if mode not in ("all", "mlp", "attn"):
        raise ValueError(f"mode must be 'all', 'mlp' or 'attn', got {mode!r}")
    final = layer is None or layer == -1
    stop = cfg.n_layers if final else layer
    vecs: list[Tensor] = []  # [*batch_pos, hc] per component
    values: list[Tensor] = []  # [*batch_pos, d_model] per component
    labels: list[str] = []
    keep: list[bool] = []
    embed = s.apply(cache["hook_embed"], dim=-2)
    vecs.append(torch.ones(*embed.shape[:-1], cfg.hc_mult, dtype=torch.float32, device=embed.device))
    values.append(embed)
    labels.append("embed")
    keep.append(incl_embeds)

    def site(l: int, name: str, pieces, piece_labels, wanted: bool):
        comb = s.apply(cache[f"blocks.{l}.{name}.hook_comb"], dim=-3).float()
        post = s.apply(cache[f"blocks.{l}.{name}.hook_post"], dim=-2).float()
        for i, v in enumerate(vecs):
            vecs[i] = torch.einsum("...jk,...j->...k", comb, v)
        for piece, lab in zip(pieces, piece_labels):
            vecs.append(post)
            values.append(piece)
            labels.append(lab)
            keep.append(wanted)

    for l in range(stop + (1 if mlp_input and not final else 0)):
        attn = s.apply(cache[f"blocks.{l}.hook_attn_out"], dim=-2)
        site(l, "attn_hc", [attn], [f"{l}_attn_out"], mode != "mlp")
        if l == stop:  # mlp_input: the streams after block `layer`'s attention
            break
        stack, lab = cache._mlp_pieces(l, s, expert_level=expert_level)
        site(l, "ffn_hc", list(stack), lab, mode != "attn")
    chosen = [i for i, k in enumerate(keep) if k]
    if final:
        pre = s.apply(cache["hc_head.hook_pre"], dim=-2).float()
        out = [((pre * vecs[i]).sum(-1, keepdim=True) * values[i].float()).to(values[i].dtype) for i in chosen]
    else:
        out = [(vecs[i].unsqueeze(-1) * values[i].float().unsqueeze(-2)).to(values[i].dtype) for i in chosen]
    return torch.stack(out), [labels[i] for i in chosen]
