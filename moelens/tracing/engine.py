"""The suffix engine: tracing sweeps that recompute only what a patch can change.

A patch at layer ``l`` and position ``p`` cannot change layers below ``l`` nor positions before
``p``. The engine keeps the base run's (corrupted, or clean for necessity) residual stream and
post-RoPE keys/values of every layer, and recomputes only positions ``p..T-1`` of layers
``l..L-1``, attending to the cached keys/values of positions ``< p``. A linear-attention (Gated
DeltaNet) layer instead resumes from the base run's recurrent state after position ``p - 1`` and
its convolution inputs at positions ``p - K + 1 .. p - 1`` (``attn.hook_state``,
``attn.hook_conv_in``). A DeepSeek Sparse Attention layer (DeepSeek-V3.2, GLM-5) also gets the base
run's indexer keys of positions ``< p`` (``attn.indexer.hook_k``; what an attention module needs is
its ``prefix_hooks``), so its indexer scores the suffix queries against every earlier key exactly as
the full forward; a GLM-5 shared-indexer layer reuses the top-k its row computed at the last indexer
layer of the suffix run, or the base run's (``attn.hook_index_topk``) for a row that joined later
(its earlier layers are the base run's). DeepSeek-V4 (several residual streams, compressed
attention pooling whole windows from position 0) is resumed at the layer over all positions
(``SuffixEngine.full_positions``). Rows of many cells and
noise samples are batched into each block call; a cell "joins" the batch at the first layer it
changes, so a layer x position grid costs ``sum over cells (L - l) * (T - p)`` token-layers per
noise sample (the theoretical floor) instead of ``L * T``.

Results equal the plain full-forward computation of :mod:`moelens.tracing.trace` up to float
rounding (tested on every architecture and tracing entry point).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

_BASE_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "attn.hook_rot_k", "attn.hook_v",
               "hook_attn_out", "hook_mlp_out", "attn.hook_state", "attn.hook_conv_in", "attn.indexer.hook_k",
               "attn.hook_index_topk", "ffn_hc.hook_post")


def base_names_filter(name: str) -> bool:
    """What a base run must cache for the engine (and the tracing sources)."""
    return name.endswith(_BASE_HOOKS)


@dataclass
class BaseRun:
    """Activations of the unpatched run, ``batch`` rows (1 or one per noise sample)."""

    cache: object  # MoEActivationCache (or mapping) holding base_names_filter hooks
    batch: int
    n_pos: int
    tokens: Optional[Tensor] = None  # [1 or batch, pos] token ids (hash-routed layers read them)

    def get(self, name: str) -> Tensor:
        return self.cache[name]


_HOOKS_ALLOWED = [False]


@contextmanager
def hooks_allowed():
    """Let the engine run while hooks are attached to the model, for hooks that only *read* what
    the engine's block calls compute (e.g. the routing of each patched row). The caller takes on
    that such a hook sees suffix positions ``p..T-1`` only, in row order of the engine's batches,
    and that block-level hook points (``hook_resid_*``, ``hook_attn_out``, ``hook_mlp_out``) do
    not fire."""
    _HOOKS_ALLOWED.append(True)
    try:
        yield
    finally:
        _HOOKS_ALLOWED.pop()


def check_no_hooks(model) -> None:
    """Refuse to run the engine while hooks are attached to ``model``: it calls attention and MoE
    modules on the positions a patch can change only, so an attached hook would see a shorter,
    offset position axis (an edit at position ``i`` landing on position ``p + i``), and the
    block-level hook points would not fire at all - a silently different intervention."""
    if _HOOKS_ALLOWED[-1]:
        return
    attached = [name for name, hp in model.hook_dict.items() if hp._forward_hooks]
    if attached:
        from moelens.errors import MoelensUserError

        more = f" and {len(attached) - 3} more" if len(attached) > 3 else ""
        raise MoelensUserError(
            f"hooks are attached to the model ({', '.join(attached[:3])}{more}): the tracing engine recomputes "
            f"only the positions and layers a patch can change, so they would see offset positions or not fire. "
            f"Remove them first (model.reset_hooks(), or leave the `with model.hooks(...)` block; permanent hooks: "
            f"model.reset_hooks(including_permanent=True), spliced SAEs: moelens.sae.remove_saes(model)); to trace "
            f"with your own intervention in place, use engine='full' (trace_layers / trace_experts), which runs "
            f"whole forwards through your hooks"
        )


class SuffixEngine:
    """Run suffixes of a cached base run with edits. ``metric(logits [rows, pos, vocab]) -> [rows]``.
    Refuses to run while hooks are attached to the model (:func:`check_no_hooks`).

    Models whose attention cannot resume from cached keys (DeepSeek-V4: several residual streams,
    compressed attention pooling whole windows from position 0; ``full_positions``) are resumed at
    the layer only: blocks ``l..L-1`` run over all positions from the base run's streams, the edit
    applied at position ``p``; every API keeps its positions-``p..T-1`` shapes."""

    def __init__(self, model, base: BaseRun, metric: Callable[[Tensor], Tensor], max_rows: int = 512):
        self.model = model
        self.full_positions = getattr(model.cfg, "hc_mult", 1) > 1 or getattr(model.cfg, "attention", "") == "compressed"
        self.base = base
        self.metric = metric
        self.max_rows = max_rows
        self.token_layers = 0  # work counter: (rows x positions) summed over block calls
        # DSA (GLM-5 index sharing): the top-k of the last indexer layer for each row of the current
        # pass ([rows, T - p, index_topk]); rows join a pass at the end of the state, so the rows
        # this holds are the state's first rows (reset at the start of every pass)
        self._index_topk: Optional[Tensor] = None

    # -------------------------------------------------------------- one block on a suffix
    def _block(self, layer: int, state: Tensor, samples: Tensor, p: int, edit=None) -> Tensor:
        """Block ``layer`` on suffix ``state [R, T-p, d]`` (rows from base samples ``samples``).

        ``edit(kind, value)`` may change ``"attn_out"``, ``"mlp_out"`` or ``"resid_post"``.
        """
        block = self.model.blocks[layer]
        state = state.to(block.device)  # blocks may sit on different devices (device_map)
        n = state.shape[1]
        rows = samples % self.base.batch
        if self.full_positions:
            ctx = self.model.attention_context(n, device=state.device)
            if self.base.tokens is not None:
                tok = self.base.tokens
                ctx.tokens = (tok if tok.shape[0] == 1 else tok[rows.to(tok.device)]).expand(state.shape[0], -1).to(state.device)
            self.token_layers += state.shape[0] * n
            return block(state, ctx, edit=edit)
        ctx = self.model.attention_context(n, q_offset=p, device=state.device)
        prefix = None
        if p > 0 and getattr(block, "is_linear_attn", False):
            dev = self._cache_device(layer)
            kernel = self.model.cfg.linear_conv_kernel
            window = self.base.get(f"blocks.{layer}.attn.hook_conv_in")[rows.to(dev), max(0, p - kernel + 1):p]
            s0 = self.base.get(f"blocks.{layer}.attn.hook_state")[rows.to(dev), p - 1]
            prefix = (window.to(state.device), s0.to(state.device))
        elif p > 0:
            dev = self._cache_device(layer)
            names = getattr(block.attn, "prefix_hooks", ("hook_rot_k", "hook_v"))
            prefix = tuple(self.base.get(f"blocks.{layer}.attn.{h}")[rows.to(dev), :p].to(state.device) for h in names)
        if getattr(block.attn, "shares_index", False):
            ctx.carry.index_topk = self._carried_topk(layer, rows, p, state.device)
        attn = block.attn_branch(state, ctx, prefix)
        if ctx.carry.index_topk is not None:
            self._index_topk = ctx.carry.index_topk
        if edit is not None:
            attn = edit("attn_out", attn)
        mid = state + attn
        mlp = block.mlp_branch(mid)
        if edit is not None:
            mlp = edit("mlp_out", mlp)
        out = block.add_mlp(mid, mlp)
        if edit is not None:
            out = edit("resid_post", out)
        self.token_layers += state.shape[0] * n
        return out

    def _carried_topk(self, layer: int, rows: Tensor, p: int, device) -> Tensor:
        """The top-k a GLM-5 shared-indexer layer reuses, per row: this pass's last indexer result for
        the rows that ran it, the base run's for the rows that joined after it."""
        have = None if self._index_topk is None else self._index_topk.to(device)
        n_have = 0 if have is None else have.shape[0]
        if n_have == rows.shape[0]:
            return have
        base = self.base.get(f"blocks.{layer}.attn.hook_index_topk")
        joined = base[rows[n_have:].to(base.device), p:].to(device)
        return joined if have is None else torch.cat([have, joined])

    def _cache_device(self, layer: int):
        return self.base.get(f"blocks.{layer}.hook_resid_pre").device

    def _start(self, p: int) -> int:
        """First position a pass computes: ``p``, or 0 for ``full_positions`` models."""
        return 0 if self.full_positions else p

    def _finish(self, state: Tensor) -> Tensor:
        last = state[:, -1:]
        if getattr(self.model.cfg, "hc_mult", 1) > 1:  # collapse the residual streams (DeepSeek-V4)
            last = self.model.hc_head(last.to(self.model.hc_head.hc_fn.device))
        last = last.to(self.model.ln_final.w.device)
        x = self.model.ln_final(last).to(self.model.unembed.w_u.device)
        ids = getattr(self.metric, "token_ids", None)
        if ids is not None and getattr(self.metric, "position", None) == -1:
            # the metric declares the few logits it reads: unembed only those rows of unembed.w_u (columns of W_U)
            b_u = self.model.unembed.b_u
            logits = torch.nn.functional.linear(x[:, -1], self.model.unembed.w_u[ids], None if b_u is None else b_u[ids])
            scaling = self.model.unembed.logits_scaling  # Granite divides its logits
            logits = logits / scaling if scaling != 1.0 else logits
            return self.metric.from_token_logits(self.model.unembed.cap(logits))  # Gemma's soft-cap
        return self.metric(self.model.unembed(x))

    # -------------------------------------------------------------- gradients on a suffix
    def gradients(self, p: int, kinds: Sequence[str]) -> dict[str, Tensor]:
        """Gradients ``[batch, T - p, d_model]`` (fp32) of each base row's metric with respect to
        ``blocks.{l}.hook_{kind}`` (``kind`` in ``"attn_out"``, ``"mlp_out"``, ``"resid_post"``) at
        positions ``p..T-1``, for every layer: one forward and one backward of the suffix only.

        Exact, not an approximation: an activation at position ``q >= p`` influences the metric only
        through positions ``>= q`` (causal attention), so the graph of positions ``p..T-1`` - with
        the base run's keys/values (or recurrent state) of earlier positions as constants - holds
        every path from it to the metric. For the last position alone that is one token per layer
        instead of the whole sequence. Parameters are frozen during the pass and each hooked value
        gets a zero leaf, so the graph holds only what these input gradients need."""
        check_no_hooks(self.model)
        bad = [k for k in kinds if k not in ("attn_out", "mlp_out", "resid_post")]
        if bad:
            raise ValueError(f"gradients of {bad}: use 'attn_out', 'mlp_out' or 'resid_post'")
        L = self.model.cfg.n_layers
        rows = torch.arange(self.base.batch)
        leaves: dict[str, Tensor] = {}
        self._index_topk = None
        with frozen_parameters(self.model), torch.enable_grad():
            base = self.base.get("blocks.0.hook_resid_pre")
            state = base[:, self._start(p):].to(self.model.blocks[0].device)
            for j in range(L):
                def edit(what, value, j=j):
                    if what not in kinds:
                        return value
                    z = torch.zeros_like(value, requires_grad=True)
                    leaves[f"blocks.{j}.hook_{what}"] = z
                    return value + z
                state = self._block(j, state, rows, p, edit)
            value = self._finish(state)
            grads = torch.autograd.grad(value.sum(), list(leaves.values()), allow_unused=True)
        skip = p - self._start(p)  # full_positions: the positions before p are computed too
        return {n: (torch.zeros_like(z, dtype=torch.float32) if g is None else g.float())[:, skip:]
                for (n, z), g in zip(leaves.items(), grads)}

    # -------------------------------------------------------------- from a resid_post edit
    def run_from_resid_post(self, layer: int, p: int, deltas: Tensor, samples: Tensor) -> Tensor:
        """Rows whose ``resid_post`` of ``layer`` at positions ``>= p`` is the base's plus
        ``deltas [R, T-p, d]``; returns the metric per row."""
        return self.run_from_resid_posts(torch.full((deltas.shape[0],), int(layer)), p, deltas, samples)

    def run_from_resid_posts(self, layers: Tensor, p: int, deltas: Tensor, samples: Tensor) -> Tensor:
        """As :meth:`run_from_resid_post`, row ``r`` edited after layer ``layers[r]``: rows of
        different layers share one pass (a row joins the batch at the first block it changes, so
        each block is called once per chunk of rows, not once per edited layer)."""
        check_no_hooks(self.model)
        L = self.model.cfg.n_layers
        layers = torch.as_tensor(layers, dtype=torch.long).cpu()
        order = torch.argsort(layers, stable=True)
        out = torch.empty(len(order))
        device = self.model.W_E.device
        for lo in range(0, len(order), self.max_rows):
            idx = order[lo : lo + self.max_rows]
            ls, s = layers[idx], samples[idx]
            d = deltas[idx.to(deltas.device)]
            state: Optional[Tensor] = None
            self._index_topk = None
            joined = torch.empty(0, dtype=torch.long)
            first = int(ls[0])
            for j in range(first + 1, L + 1):
                # join the rows edited after block j - 1 (contiguous: the rows are sorted by layer)
                a, b = int(torch.searchsorted(ls, j - 1)), int(torch.searchsorted(ls, j - 1, right=True))
                if b > a:
                    base = self.base.get(f"blocks.{j - 1}.hook_resid_post")
                    rows_ab = (s[a:b] % self.base.batch).to(base.device)
                    new = base[rows_ab, self._start(p):].to(device) + self._as_resid_delta(j - 1, rows_ab, p, d[a:b], device)
                    state = new if state is None else torch.cat([state.to(new.device), new])
                    joined = torch.cat([joined, s[a:b]])
                if j < L:
                    state = self._block(j, state, joined, p)
            out[lo : lo + len(idx)] = self._finish(state).float().cpu()
        result = torch.empty_like(out)
        result[order] = out
        return result

    def _as_resid_delta(self, layer: int, rows: Tensor, p: int, delta: Tensor, device) -> Tensor:
        """A ``[R, T-p, d_model]`` delta as a change of ``layer``'s ``hook_resid_post`` from position
        ``self._start(p)``. With several residual streams (DeepSeek-V4) a ``d_model`` delta is a change
        of ``hook_mlp_out``, which the base run's ffn ``post`` weights spread over the streams (they do
        not depend on the MoE output); a ``[R, T-p, hc, d_model]`` delta is taken as is."""
        delta = delta.to(device, self._dtype)
        if getattr(self.model.cfg, "hc_mult", 1) > 1 and delta.ndim == 3:
            post = self.base.get(f"blocks.{layer}.ffn_hc.hook_post")[rows, p:].to(device)
            delta = post.to(delta.dtype).unsqueeze(-1) * delta.unsqueeze(-2)
        skip = p - self._start(p)
        if skip:
            delta = torch.cat([delta.new_zeros((delta.shape[0], skip, *delta.shape[2:])), delta], dim=1)
        return delta

    @property
    def _dtype(self):
        return self.model.W_E.dtype

    # -------------------------------------------------------------- layer x position grid
    def grid(
        self,
        kind: str,
        cells: Sequence[tuple[int, int, int]],
        source,
        n_samples: int,
        source_batch: int,
    ) -> Tensor:
        """Scores of cells ``(lo, hi, p)``: replace ``kind`` (``"mlp_out"``, ``"attn_out"``,
        ``"resid_post"``) at layers ``lo..hi-1``, position ``p``, with ``source``'s value; metric
        averaged over ``n_samples`` rows per cell. Returns ``[len(cells)]``."""
        check_no_hooks(self.model)
        scores = torch.empty(len(cells))
        by_p: dict[int, list[int]] = {}
        for i, (_, _, p) in enumerate(cells):
            by_p.setdefault(p, []).append(i)
        per_chunk = max(1, self.max_rows // n_samples)
        for p, idx in by_p.items():
            idx = sorted(idx, key=lambda i: cells[i][0])
            for c in range(0, len(idx), per_chunk):
                chunk = idx[c : c + per_chunk]
                vals = self._grid_at(kind, [cells[i] for i in chunk], source, p, n_samples, source_batch)
                scores[chunk] = vals.reshape(len(chunk), n_samples).mean(-1)
        return scores

    def _grid_at(self, kind, cells, source, p, n_samples, source_batch) -> Tensor:
        L = self.model.cfg.n_layers
        sample_ids = torch.arange(n_samples)
        state: Optional[Tensor] = None
        self._index_topk = None
        samples = torch.empty(0, dtype=torch.long)
        spans: list[tuple[int, int]] = []  # (lo, hi) per joined cell, in row-block order
        order = sorted(range(len(cells)), key=lambda i: cells[i][0])
        k = 0
        first = min(c[0] for c in cells)
        for j in range(first, L):
            # join the cells whose first patched layer is j
            while k < len(order) and cells[order[k]][0] == j:
                lo, hi, _ = cells[order[k]]
                base = self.base.get(f"blocks.{j}.hook_resid_pre")
                init = base[(sample_ids % self.base.batch).to(base.device), self._start(p):]
                init = init.to(self.model.blocks[j].device)
                state = init if state is None else torch.cat([state.to(init.device), init])
                samples = torch.cat([samples, sample_ids])
                spans.append((lo, hi))
                k += 1
            src = source[f"blocks.{j}.{'hook_' + kind}"][:, p]  # [source_batch, d]

            def edit(what, value, j=j, src=src):
                if what != kind:
                    return value
                value = value.clone()
                for b, (lo, hi) in enumerate(spans):
                    if lo <= j < hi:
                        rows = slice(b * n_samples, (b + 1) * n_samples)
                        s = src if source_batch == 1 else src[(sample_ids % source_batch).to(src.device)]
                        value[rows, p - self._start(p)] = s.to(value.device, value.dtype).expand(n_samples, *s.shape[1:])
                return value

            state = self._block(j, state, samples, p, edit)
        values = self._finish(state)
        # un-permute to the order the cells were given
        out = torch.empty_like(values)
        for b, i in enumerate(order):
            out[i * n_samples : (i + 1) * n_samples] = values[b * n_samples : (b + 1) * n_samples]
        return out


@contextmanager
def frozen_parameters(model):
    """Parameters without ``requires_grad`` for the duration (a backward then keeps no activation
    that only a weight gradient would need); restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def base_run(model, tokens: Tensor, fwd_hooks=(), names_filter=base_names_filter) -> tuple[Tensor, BaseRun]:
    """Run ``tokens`` (with ``fwd_hooks``, e.g. the corruption) caching what the engine needs."""
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=names_filter, fwd_hooks=list(fwd_hooks))
    return logits, BaseRun(cache=cache, batch=tokens.shape[0], n_pos=tokens.shape[1], tokens=tokens)


# restorable hook of each traced component kind: blocks.{l}.hook_<name>
KIND_HOOKS = {"mlp": "mlp_out", "resid": "resid_post", "attn": "attn_out"}


def corrupted_run_with_gradients(model, batch: Tensor, corrupt, metric, names_filter, kinds: Sequence[str],
                                 cache_device=None):
    """The corrupted run, cached as ``prepare`` caches it, and in the same forward (one backward more)
    the gradients of each row's metric with respect to the ``kinds`` hooks of every layer at every
    position: ``(logits, cache, {hook name: [n_samples, pos, d_model] fp32})``. See :func:`corrupted_gradients`."""
    from moelens import patching as P

    names = [f"blocks.{l}.hook_{KIND_HOOKS[k]}" for k in kinds for l in range(model.cfg.n_layers)]
    leaves: dict[str, Tensor] = {}

    def add_leaf(act, hook):
        z = torch.zeros_like(act, requires_grad=True)
        leaves[hook.name] = z
        return act + z

    hooks = P.to_hooks(model, [corrupt]) + [(n, add_leaf) for n in names]
    with frozen_parameters(model), torch.enable_grad():
        logits, cache = model.run_with_cache(batch, names_filter=names_filter, fwd_hooks=hooks, device=cache_device)
        value = metric(logits)  # [n_samples]; rows are independent, so d(sum)/d(row s) = g_s
        missing = [n for n in names if n not in leaves]
        if missing:
            raise RuntimeError(f"hooks {missing[:3]} did not fire: cannot take their gradients")
        grads = torch.autograd.grad(value.sum(), [leaves[n] for n in names], allow_unused=True)
    out = {n: (torch.zeros_like(leaves[n], dtype=torch.float32) if g is None else g.float())
           for n, g in zip(names, grads)}
    return logits.detach(), cache, out
