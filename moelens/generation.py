"""Text generation with hooks: ``model.generate(...)`` as TransformerLens' ``HookedTransformer.generate``.

Every step is a plain ``model(...)`` forward, so hooks (``model.hooks(...)``, permanent hooks,
interventions of :mod:`moelens.patching`) fire on every step. With ``use_past_kv_cache=True``
the prompt is run once and each later step runs only the newest token, attending to the keys
and values stored in a :class:`GenerationCache` (one small object per layer, passed to each
attention layer through its ``kv_prefix`` argument). Hooks then see ``[batch, 1, ...]``
activations; :func:`hook_position_offset` (and ``hook.pos_offset``) give the absolute position
of that token, and interventions of :mod:`moelens.patching` interpret ``positions=`` as
absolute positions in the growing sequence in both modes.

Left-padded batches: RoPE positions are ``cumsum(attention_mask) - 1`` (pads 0), exactly as
transformers' ``generate`` builds ``position_ids``, and the attention mask grows by one column of
ones per step; so each row generates what it would alone, and greedy output equals
``transformers``' ``generate(do_sample=False)`` token for token (tested on every architecture,
with and without the cache).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["KVCacheLayer", "GenerationCache", "RoutingTrace", "generate", "sample_logits", "hook_position_offset"]


# ---------------------------------------------------------------------------------------------- cache
class KVCacheLayer:
    """Keys and values of one attention layer for the positions seen so far.

    Passed to ``block.attn(x, ctx, kv_prefix=layer_cache)``: the attention calls
    :meth:`update` with the new positions' post-RoPE keys ``[batch, new, kv_head, d_head]`` and
    values, and attends to what it returns (earlier + new). A layer kind with other state (a
    sliding window, a recurrent state) subclasses this and overrides :meth:`update` (and
    :meth:`select` for dropping batch rows). Deliberately not a dataclass: device placement copies
    dataclass arguments, and the cache must be updated in place.
    """

    def __init__(self) -> None:
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is not None:
            k = torch.cat([self.k.to(k.device), k], dim=1)
            v = torch.cat([self.v.to(v.device), v], dim=1)
        self.k, self.v = k, v
        return k, v

    @property
    def seq_len(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    def select(self, rows: Tensor) -> None:
        """Keep only batch ``rows`` (e.g. after dropping finished sequences)."""
        if self.k is not None:
            self.k, self.v = self.k[rows.to(self.k.device)], self.v[rows.to(self.v.device)]


class GenerationCache:
    """Per-layer caches of a model for incremental decoding: ``cache[l]`` is layer ``l``'s
    :class:`KVCacheLayer` (or the object its attention's ``new_cache_layer()`` returns, for layer
    kinds that need other state); ``seq_len`` counts the positions already processed (the
    absolute position of the next token). ``model(new_tokens, past_kv_cache=cache, ...)`` extends
    it in place."""

    @staticmethod
    def unsupported_layers(model) -> list[str]:
        """Kinds of layers this cache cannot serve (no ``update`` path and no ``new_cache_layer``)."""
        from moelens.components.attention import Attention
        from moelens.components.mla import MLAttention

        return sorted({
            type(block.attn).__name__ for block in model.blocks
            if not isinstance(block.attn, (Attention, MLAttention)) and not hasattr(block.attn, "new_cache_layer")
        })

    def __init__(self, model) -> None:
        self.layers = [
            block.attn.new_cache_layer() if hasattr(block.attn, "new_cache_layer") else KVCacheLayer()
            for block in model.blocks
        ]
        self.seq_len = 0

    def __getitem__(self, layer: int):
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    def select(self, rows: Tensor) -> None:
        for layer in self.layers:
            layer.select(rows)


# ---------------------------------------------------------------------------------------------- sampling
def sample_logits(
    final_logits: Tensor,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    tokens: Optional[Tensor] = None,
    token_mask: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """One token per row from ``final_logits [batch, d_vocab]``, as TransformerLens'
    ``utils.sample_logits``: temperature 0 is greedy; otherwise ``logits / temperature``, minus
    ``freq_penalty`` x the count of each token in ``tokens`` (only where ``token_mask`` is 1:
    padding is not counted), restricted to the ``top_k`` largest or to the smallest set whose
    probability reaches ``top_p``, then sampled (with ``generator`` when given)."""
    if temperature == 0.0:
        return final_logits.argmax(dim=-1)
    logits = final_logits.float() / temperature
    if freq_penalty > 0:
        if tokens is None:
            raise ValueError("freq_penalty needs the tokens generated so far")
        weights = None if token_mask is None else token_mask.to(logits.dtype)
        counts = torch.zeros_like(logits).scatter_add_(
            -1, tokens.to(logits.device), torch.ones_like(tokens, dtype=logits.dtype) if weights is None else weights
        )
        logits = logits - freq_penalty * counts
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    elif top_p is not None:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), -float("inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ---------------------------------------------------------------------------------------------- routing trace
@dataclass
class RoutingTrace:
    """Routing of every generated token (what :func:`generate` returns with ``return_routing=True``).

    Step ``s`` is the forward that produced generated token ``s``; its routing is that of the
    forward's last position (absolute position ``positions[b, s]``, holding ``input_tokens[b, s]``):
    the experts that computed the prediction. ``indices``/``weights`` are
    ``[batch, n_steps, n_layers, top_k]`` over ``layers`` (the sparse layers traced);
    ``finished[b, s]`` is True where row ``b`` had already stopped (EOS) before step ``s``.
    """

    layers: list[int]
    indices: Tensor
    weights: Tensor
    generated_tokens: Tensor  # [batch, n_steps]
    input_tokens: Tensor  # [batch, n_steps]
    positions: Tensor  # [batch, n_steps] absolute column in the padded sequence
    finished: Tensor  # [batch, n_steps] bool
    tokenizer: Any = None
    n_experts: Optional[int] = None

    def _decode(self, t: int) -> Optional[str]:
        return None if self.tokenizer is None else self.tokenizer.decode([t])

    def to_dataframe(self, include_finished: bool = False):
        """Tidy table, one row per (batch, step, layer, slot): batch, step, position, input_token,
        generated_token (ids and, with a tokenizer, strings), layer, slot, expert, weight."""
        import pandas as pd

        b, n, nl, k = self.indices.shape
        grid = torch.stack(torch.meshgrid(
            torch.arange(b), torch.arange(n), torch.arange(nl), torch.arange(k), indexing="ij"), -1).reshape(-1, 4)
        df = pd.DataFrame({
            "batch": grid[:, 0].numpy(),
            "step": grid[:, 1].numpy(),
            "position": self.positions.cpu()[grid[:, 0], grid[:, 1]].numpy(),
            "input_token_id": self.input_tokens.cpu()[grid[:, 0], grid[:, 1]].numpy(),
            "generated_token_id": self.generated_tokens.cpu()[grid[:, 0], grid[:, 1]].numpy(),
            "layer": torch.as_tensor(self.layers)[grid[:, 2]].numpy(),
            "slot": grid[:, 3].numpy(),
            "expert": self.indices.cpu().reshape(-1).numpy(),
            "weight": self.weights.cpu().float().reshape(-1).numpy(),
            "finished": self.finished.cpu()[grid[:, 0], grid[:, 1]].numpy(),
        })
        if self.tokenizer is not None:
            vocab = {t: self._decode(t) for t in set(df["input_token_id"]) | set(df["generated_token_id"])}
            df.insert(4, "input_token", df["input_token_id"].map(vocab))
            df.insert(6, "generated_token", df["generated_token_id"].map(vocab))
        if not include_finished:
            df = df[~df["finished"]].reset_index(drop=True)
        return df.drop(columns="finished")

    def top_expert(self) -> Tensor:
        """``[batch, n_steps, n_layers]``: the expert of the slot with the largest weight."""
        best = self.weights.float().argmax(-1, keepdim=True)
        return self.indices.gather(-1, best)[..., 0]

    def plot(self, batch: int = 0, title: Optional[str] = None):
        """Heatmap: generated tokens (x) x sparse layers (y), each cell coloured by the top-weight
        expert; hovering shows every chosen expert with its weight."""
        keep = ~self.finished[batch].cpu()
        labels = [
            f"{s}: {self._decode(int(t)) if self.tokenizer is not None else int(t)}"
            for s, t in enumerate(self.generated_tokens[batch].tolist())
        ]
        labels = [l for l, m in zip(labels, keep.tolist()) if m]
        from moelens.plotting.routing import generation_routing_map

        return generation_routing_map(
            self.indices[batch][keep], self.weights[batch][keep], self.layers, labels, n_experts=self.n_experts, title=title
        )


# ---------------------------------------------------------------------------------------------- helpers
def hook_position_offset(hook) -> int:
    """Absolute position of the first position a hook sees (0 outside cached generation)."""
    return getattr(hook, "pos_offset", 0)


def _set_pos_offset(model, offset: Optional[int], hook_points: Optional[list] = None) -> None:
    for hp in model.hook_dict.values() if hook_points is None else hook_points:
        if offset is None:
            hp.__dict__.pop("pos_offset", None)
        elif hp._forward_hooks or "pos_offset" in hp.__dict__:
            hp.__dict__["pos_offset"] = offset


def _present(interventions: list, n: int) -> list:
    """The interventions as they apply to a sequence of ``n`` positions: absolute positions not
    reached yet are dropped (they apply once generation gets there); negative positions count
    from the newest token."""
    import dataclasses

    out = []
    for iv in interventions:
        pos = getattr(iv, "positions", None)
        if pos is None or isinstance(pos, Tensor) and pos.ndim == 0 and int(pos) < 0:
            out.append(iv)
            continue
        pos = [int(p) for p in (pos.reshape(-1).tolist() if isinstance(pos, Tensor) else [pos] if isinstance(pos, int) else pos)]
        keep = [p for p in pos if p < n]
        if keep:
            out.append(iv if len(keep) == len(pos) else dataclasses.replace(iv, positions=keep))
    return out


def _is_text(x) -> bool:
    return isinstance(x, str) or (isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], str))


def longrope_restart(cfg, n_tokens: int, n_cached: int) -> bool:
    """transformers' PhiMoE generation drops its KV cache and recomputes the whole sequence (so every
    key gets the long mscale) once the sequence holds ``original_max_position_embeddings + 1`` tokens
    while the cache holds at most ``original_max_position_embeddings`` (``prepare_inputs_for_generation``)."""
    rope = cfg.yarn
    if not rope or rope.get("rope_type") != "longrope":
        return False
    original = rope["original_max_position_embeddings"]
    return n_tokens >= original + 1 and n_cached <= original


_IGNORED_SILENTLY = {"return_dict_in_generate"}  # TransformerLens ignores it; output_logits returns a dict anyway


def _hf_kwargs(kwargs: dict) -> None:
    """Transformers' generation flags that TransformerLens' ``generate`` accepts but ignores:
    ``return_dict_in_generate`` silently, the others (``output_scores``, ``output_attentions``, ...)
    with a ``UserWarning``. Anything else is a ``TypeError`` (a typo must not pass unnoticed)."""
    from transformers import GenerationConfig

    known = set(GenerationConfig().to_dict()) | {"output_attentions", "output_hidden_states", "output_scores",
                                                  "output_logits", "return_dict_in_generate"}
    unknown = sorted(k for k in kwargs if k not in known)
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments {unknown}")
    ignored = sorted(k for k in kwargs if k not in _IGNORED_SILENTLY)
    if ignored:
        import warnings

        warnings.warn(f"moelens generate received unsupported generation kwargs; ignoring: {ignored}", UserWarning,
                      stacklevel=3)


def _position_ids(mask: Tensor) -> Tensor:
    """transformers' rule: ``cumsum(mask) - 1``, padding at 0."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


def _check_args(model, max_new_tokens, do_sample, top_k, top_p, temperature, freq_penalty, padding_side, return_type):
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if return_type not in ("input", "str", "tokens", "embeds"):
        raise ValueError(f"return_type={return_type!r}: use 'input', 'str', 'tokens' or 'embeds'")
    if padding_side not in (None, "left"):
        raise ValueError(
            f"padding_side={padding_side!r}: generation needs left padding (every row's last "
            "position must be its newest token); pass padding_side='left' or None"
        )
    if not do_sample:
        given = [n for n, v, d in (("top_k", top_k, None), ("top_p", top_p, None), ("temperature", temperature, 1.0),
                                   ("freq_penalty", freq_penalty, 0.0)) if v != d]
        if given:
            raise ValueError(
                f"do_sample=False (greedy) contradicts the sampling options {', '.join(given)}: "
                "pass do_sample=True to sample, or drop them"
            )
        return
    if top_k is not None and top_p is not None:
        raise ValueError("give top_k or top_p, not both (TransformerLens would silently ignore top_p)")
    if top_k is not None and (not isinstance(top_k, int) or not 0 < top_k <= model.cfg.d_vocab):
        raise ValueError(f"top_k must be an integer in [1, {model.cfg.d_vocab}], got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if freq_penalty < 0:
        raise ValueError(f"freq_penalty must be >= 0, got {freq_penalty!r}")


# ---------------------------------------------------------------------------------------------- generate
@torch.no_grad()
def generate(
    model,
    input: Union[str, Sequence[str], Tensor] = "",
    max_new_tokens: int = 10,
    stop_at_eos: bool = True,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    do_sample: bool = True,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    use_past_kv_cache: bool = True,
    prepend_bos: Optional[bool] = None,
    padding_side: Optional[str] = None,
    return_type: Optional[str] = "input",
    verbose: bool = True,
    *,
    attention_mask: Optional[Tensor] = None,
    seed: Optional[int] = None,
    interventions: Sequence = (),
    return_routing: bool = False,
    routing_layers: Optional[Sequence[int]] = None,
    output_logits: bool = False,
    **generation_kwargs,
):
    """Generate ``max_new_tokens`` tokens after ``input`` (TransformerLens' ``generate``).

    ``input``: a string (returns the prompt + continuation as a string), a list of
    strings (left-padded; returns a list of strings), tokens ``[batch, pos]`` (returns tokens
    ``[batch, pos + new]``; pass ``attention_mask`` if they are left-padded, or set
    ``tokenizer.padding_side = "left"`` to have leading pad tokens masked as TransformerLens does),
    or embeddings ``[batch, pos, d_model]`` (float; returns embeddings ``[batch, pos + new, d_model]``,
    the generated tokens' rows being ``W_E[token]``). ``return_type`` ``"str"``, ``"tokens"`` or
    ``"embeds"`` overrides that; from embeddings, ``"tokens"`` and ``"str"`` give the generated tokens
    only. Text is decoded with ``skip_special_tokens=True`` (no BOS, EOS padding or pads), one string
    for one prompt or one row of tokens, a list otherwise (a list of texts always gives a list).
    ``output_logits=True`` returns transformers' ``GenerateDecoderOnlyOutput`` with ``sequences``
    (the tokens) and ``logits``, a tuple of ``[batch, d_vocab]`` logits, one per step (before
    sampling), as TransformerLens. ``return_dict_in_generate`` is accepted and ignored; other
    transformers generation flags (``output_scores``, ``output_attentions``, ...) are ignored with a
    ``UserWarning`` (TransformerLens' behaviour); any other keyword is a ``TypeError``.
    ``stop_at_eos``: rows that emit ``eos_token_id``
    (default: the config's, else the tokenizer's; an int or a list) are finished and padded with
    it; generation stops when all rows are. ``do_sample=False`` is greedy (the sampling options
    must then stay at their defaults); otherwise ``temperature``, ``top_k`` or ``top_p`` (not
    both), ``freq_penalty`` as TransformerLens, drawn from ``torch.Generator(device).manual_seed(seed)``
    (on the unembedding's device) when ``seed`` is given. ``use_past_kv_cache``: run only the new token per step (equal
    results). ``verbose``: a progress bar.

    moelens extras: ``interventions`` (patching API objects, applied to every row at every step,
    positions absolute: columns of the left-padded batch, the same for every row; negative ones
    count from the newest token); ``return_routing=True`` returns ``(output, RoutingTrace)`` with the chosen
    experts and weights of every generated token at ``routing_layers`` (default all sparse layers),
    caching nothing else.
    """
    from tqdm.auto import tqdm

    from moelens import patching

    _check_args(model, max_new_tokens, do_sample, top_k, top_p, temperature, freq_penalty, padding_side, return_type)
    _hf_kwargs(generation_kwargs)
    device = model.W_E.device
    embeds = None  # embeddings given as input: [batch, pos, d_model]
    if _is_text(input):
        input_type = "str" if isinstance(input, str) else "list"
        if attention_mask is not None:
            raise ValueError("attention_mask is only for token input (text is padded for you)")
        tokens, mask = model.tokenize(input, prepend_bos=prepend_bos, padding_side="left")
    elif isinstance(input, Tensor):
        input_type = "embeds" if input.is_floating_point() else "tokens"
        if input_type == "embeds":
            embeds = input[None] if input.ndim == 2 else input
            if embeds.ndim != 3 or embeds.shape[1] == 0 or embeds.shape[2] != model.cfg.d_model:
                raise ValueError(f"embeddings input must be [batch, pos, d_model={model.cfg.d_model}], got {tuple(input.shape)}")
            embeds = embeds.to(device, model.W_E.dtype)
            tokens = torch.zeros(embeds.shape[:2], dtype=torch.long, device=device)  # placeholders: never embedded
        else:
            tokens = input[None] if input.ndim == 1 else input
            if tokens.ndim != 2 or tokens.shape[1] == 0:
                raise ValueError(f"token input must be [batch, pos] with pos >= 1, got shape {tuple(input.shape)}")
        mask = attention_mask
        if mask is None and input_type == "tokens":
            mask = model.input_attention_mask(tokens.to(device), prepend_bos)  # tokenizer.padding_side == "left"
        if mask is not None:
            mask = mask[None] if mask.ndim == 1 else mask
            if mask.shape != tokens.shape:
                raise ValueError(f"attention_mask shape {tuple(mask.shape)} must equal the input's {tuple(tokens.shape)}")
            if not bool(mask[:, -1].all()):
                raise ValueError("attention_mask: generation needs left padding (every row's last token real)")
    else:
        raise TypeError(
            "input must be a string, a list of strings, int tokens [batch, pos] or embeddings [batch, pos, d_model], "
            f"got {type(input).__name__}"
        )
    tokens = tokens.to(device).long()
    if bool((tokens < 0).any()) or bool((tokens >= model.cfg.d_vocab).any()):
        raise ValueError(f"token ids must be in [0, {model.cfg.d_vocab})")
    n_ctx = model.cfg.n_ctx
    if n_ctx is not None and tokens.shape[1] + max_new_tokens > n_ctx:
        what = "the prompt" if tokens.shape[1] > n_ctx else "the prompt + max_new_tokens"
        raise ValueError(
            f"{what} ({tokens.shape[1]} + {max_new_tokens} tokens) exceeds the model's context of {n_ctx} "
            "positions (max_position_embeddings): shorten the prompt or lower max_new_tokens"
        )
    padded = mask is not None and not bool(mask.all())
    mask = mask.to(device).long() if padded else None
    if return_type == "input":
        return_type = {"tokens": "tokens", "embeds": "embeds"}.get(input_type, "str")

    stop_tokens: list[int] = []
    if stop_at_eos:
        if eos_token_id is None:
            eos_token_id = model.cfg.eos_token_id
        if eos_token_id is None and model.tokenizer is not None:
            eos_token_id = model.tokenizer.eos_token_id
        if eos_token_id is None:
            raise ValueError("stop_at_eos=True needs an EOS token: pass eos_token_id=... or stop_at_eos=False")
        stop_tokens = [eos_token_id] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]
    stop = torch.tensor(stop_tokens, device=device, dtype=torch.long)

    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.W_U.device).manual_seed(int(seed))

    interventions = list(interventions)
    for iv in interventions:
        iv.validate(model)
    hooks: list = []  # routing capture, after the interventions' hooks at every step
    trace_layers: list[int] = []
    captured: dict[str, list[Tensor]] = {}
    if return_routing:
        trace_layers = list(model.cfg.moe_layers) if routing_layers is None else [int(l) for l in routing_layers]
        bad = [l for l in trace_layers if l not in model.cfg.moe_layers]
        if bad:
            raise ValueError(f"routing_layers {bad} are not sparse layers; sparse layers: {list(model.cfg.moe_layers)}")
        for l in trace_layers:
            for what in ("expert_indices", "expert_weights"):
                name = f"blocks.{l}.mlp.hook_{what}"
                captured[name] = []

                def grab(act, hook, store=captured[name]):
                    store.append(act[:, -1].detach())

                hooks.append((name, grab))

    batch = tokens.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    finished_before: list[Tensor] = []
    new_tokens: list[Tensor] = []
    cache = model_cache = None
    if use_past_kv_cache and GenerationCache.unsupported_layers(model):
        import warnings

        warnings.warn(
            f"use_past_kv_cache: layers of kind {', '.join(GenerationCache.unsupported_layers(model))} have no "
            "generation cache yet; generating without the cache (same tokens, every step recomputes the sequence)",
            stacklevel=3,
        )
        use_past_kv_cache = False
    if use_past_kv_cache:
        cache = model_cache = GenerationCache(model)
    positions = _position_ids(mask) if padded else None
    n_prompt = tokens.shape[1]
    step_logits: list[Tensor] = []
    try:
        for step in tqdm(range(max_new_tokens), disable=not verbose, desc="generate", unit="token"):
            step_hooks = patching.to_hooks(model, _present(interventions, tokens.shape[1])) if interventions else []
            # a hooks context only when there are hooks to add (entering and leaving one costs a pass over all hook points)
            with model.hooks(fwd_hooks=step_hooks + hooks) if step_hooks or hooks else contextlib.nullcontext():
                if cache is not None and step > 0 and longrope_restart(model.cfg, tokens.shape[1], cache.seq_len):
                    cache = model_cache = GenerationCache(model)  # PhiMoE: recompute with the long mscale
                first = cache is None or step == 0 or cache.seq_len == 0
                inp = tokens if first else tokens[:, -1:]
                if embeds is not None and first:  # embeddings in: the prompt's embeddings, then the generated tokens'
                    inp = embeds if step == 0 else torch.cat([embeds, model.embed(tokens[:, n_prompt:])], dim=1)
                pos = None if positions is None else (positions if first else positions[:, -1:])
                _set_pos_offset(model, 0 if first else tokens.shape[1] - 1)
                logits = model(inp, attention_mask=mask, past_kv_cache=model_cache, position_ids=pos)
                if output_logits:
                    step_logits.append(logits[:, -1, :].clone())
                final = logits[:, -1, :].float()
                if do_sample:
                    # embeddings in: only generated tokens count for the frequency penalty
                    seen, seen_mask = (tokens[:, n_prompt:], None) if embeds is not None else (tokens, mask)
                    nxt = sample_logits(final, top_k=top_k, top_p=top_p, temperature=temperature,
                                        freq_penalty=freq_penalty, tokens=seen, token_mask=seen_mask, generator=generator)
                else:
                    nxt = final.argmax(dim=-1)
                nxt = nxt.to(device)
                finished_before.append(finished.clone())
                if stop_at_eos:
                    nxt = torch.where(finished, stop[0], nxt)
                    finished = finished | torch.isin(nxt, stop)
                new_tokens.append(nxt)
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                if padded:
                    mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                    positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
                if stop_at_eos and bool(finished.all()):
                    break
    finally:
        _set_pos_offset(model, None)

    # as TransformerLens: embeddings in -> tokens and text of the generated tokens only
    sequences = tokens[:, n_prompt:] if embeds is not None else tokens
    if return_type == "tokens":
        out: Any = sequences
    elif return_type == "embeds":
        prompt = embeds if embeds is not None else model.embed(tokens[:, :n_prompt])
        out = torch.cat([prompt, model.embed(tokens[:, n_prompt:])], dim=1)
    else:
        tok = model._require_tokenizer()
        rows = []
        for b in range(batch):
            ids = sequences[b] if mask is None or embeds is not None else sequences[b][mask[b].bool()]
            rows.append(tok.decode(ids.tolist(), skip_special_tokens=True))  # BOS, EOS padding, pads dropped
        # a list of texts gives a list; one text, or one row of tokens / embeddings, a string (as TransformerLens)
        out = rows if input_type == "list" or len(rows) > 1 else rows[0]
    if output_logits:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        out = GenerateDecoderOnlyOutput(sequences=sequences, logits=tuple(step_logits))
    if not return_routing:
        return out
    n = len(new_tokens)
    idx = torch.stack([torch.stack([captured[f"blocks.{l}.mlp.hook_expert_indices"][s].cpu() for l in trace_layers], 1)
                       for s in range(n)], 1)
    w = torch.stack([torch.stack([captured[f"blocks.{l}.mlp.hook_expert_weights"][s].cpu() for l in trace_layers], 1)
                     for s in range(n)], 1)
    trace = RoutingTrace(
        layers=trace_layers, indices=idx, weights=w,
        generated_tokens=tokens[:, n_prompt:].cpu(),
        input_tokens=tokens[:, n_prompt - 1 : n_prompt - 1 + n].cpu(),
        positions=torch.arange(n_prompt - 1, n_prompt - 1 + n).expand(batch, n).clone(),
        finished=torch.stack(finished_before, 1).cpu(),
        tokenizer=model.tokenizer,
        n_experts=model.cfg.n_experts,
    )
    return out, trace
