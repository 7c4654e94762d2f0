"""HookedMoETransformer: a TransformerLens-style hooked reimplementation of sparse MoE decoders.

The forward reads like the equations of ``../docs/concepts.md``::

    h = hook_embed(W_E[tokens])
    for each block:  h += Attn(LN1(h));  h += FFN(LN2(h))      (FFN = MoE or dense SwiGLU)
    logits = LN_final(h) W_U^T

Every activation is a named, shape-annotated hook point (see ``model.hook_dict`` and
docs/concepts.md). Loading streams hub-layout safetensors checkpoints straight into the model.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedRootModule

from moelens import loading
from moelens.architectures import get_architecture, translate_config
from moelens.components.attention import AttentionContext
from moelens.components.block import TransformerBlock, make_block
from moelens.components.norm import RMSNorm
from moelens.components.rope import rope_cos_sin, rope_frequencies
from moelens.config import MoEConfig
from moelens.hooks import ShapedHookPoint, unknown_hook_error

TextInput = Union[str, Sequence[str]]


class Embed(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return F.embedding(tokens, self.W_E)


class Unembed(nn.Module):
    """``logits = x W_U^T``; ``w_u`` is ``[d_vocab, d_model]`` (the hub's ``lm_head.weight`` layout)."""

    def __init__(self, cfg: MoEConfig, tied_to: Optional[nn.Parameter] = None):
        super().__init__()
        self.w_u = tied_to if tied_to is not None else nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return F.linear(x, self.w_u)


class HookedMoETransformer(HookedRootModule):
    """A sparse mixture-of-experts decoder with a hook point on every router, expert and combine step.

    Build with :meth:`from_pretrained` (hub-layout checkpoints, hub ids, bundled models) or
    :meth:`from_config` (random weights). ``model(tokens)`` returns logits ``[batch, pos, d_vocab]``.
    """

    def __init__(self, cfg: MoEConfig, tokenizer: Any = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed = Embed(cfg)
        self.hook_embed = ShapedHookPoint("batch pos d_model")
        self.blocks = nn.ModuleList([make_block(cfg, l) for l in range(cfg.n_layers)])
        if cfg.hc_mult > 1:  # DeepSeek-V4: several residual streams, collapsed before the final norm
            from moelens.components.hyper import HyperHead

            self.hc_head = HyperHead(cfg)
        self.ln_final = RMSNorm(cfg.d_model, cfg.rms_norm_eps, zero_centered=cfg.norm_zero_centered,
                                weight_fp32=cfg.norm_weight_fp32, keep_fp32=cfg.norm_keep_fp32)
        self.unembed = Unembed(cfg, tied_to=self.embed.W_E if cfg.tie_word_embeddings else None)
        inv_freq, self._rope_factor = rope_frequencies(cfg.rope_dim, cfg.rope_theta, cfg.yarn)
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)
        self.setup()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        cfg: Union[MoEConfig, dict, str],
        *,
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
        seed: Optional[int] = None,
        tokenizer: Any = None,
        expert_impl: Optional[str] = None,
    ) -> "HookedMoETransformer":
        """A randomly initialised model (``device="meta"``: the skeleton only, no memory).

        ``cfg`` is a :class:`MoEConfig`, a Hugging Face ``config.json`` dict or config object
        (e.g. ``transformers.MixtralConfig(...)``), or the name of a preset of :mod:`moelens.presets`
        (e.g. ``"Qwen/Qwen3-30B-A3B-Base"``).
        """
        cfg = _as_config(cfg, dtype, expert_impl)
        device = torch.device(device) if device is not None else torch.device("cpu")
        with torch.device("meta"):
            model = cls(cfg, tokenizer=tokenizer)
        model = model.to(cfg.dtype)
        if device.type == "meta":
            return model
        model = model._materialize(device)
        model.init_weights(seed)
        return model.eval()

    def _materialize(self, device: torch.device) -> "HookedMoETransformer":
        """Allocate the meta skeleton on ``device`` (uninitialised), keeping tied weights tied."""
        self.to_empty(device=device)
        if self.cfg.tie_word_embeddings:
            self.unembed.w_u = self.embed.W_E
        # RoPE frequencies stay fp32 whatever the model dtype (as in transformers)
        self._buffers["rope_inv_freq"] = rope_frequencies(self.cfg.rope_dim, self.cfg.rope_theta, self.cfg.yarn)[0].to(device)
        return self

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """Gaussian weights with std ``1/sqrt(fan_in)`` (embeddings std 1), norm weights 1 (0 for
        zero-centred norms), biases 0; Gated DeltaNet ``A_log`` 0 and ``dt_bias`` 1."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else seed)
        for name, p in self.named_parameters():
            if name.endswith((".w", "norm_w")):
                zero = self.cfg.norm_zero_centered and not name.endswith("attn.norm_w")  # the gated norm is 1-based
                p.fill_(0.0 if zero else 1.0)
            elif name.endswith(".A_log"):
                p.zero_()
            elif name.endswith(".dt_bias"):
                p.fill_(1.0)
            elif name.endswith(".tid2eid"):  # DeepSeek-V4 hash routing: a random token -> experts table
                p.copy_(torch.stack([torch.randperm(self.cfg.n_experts, generator=gen)[: self.cfg.top_k]
                                     for _ in range(p.shape[0])]))
            elif name.split(".")[-1].startswith("b_"):
                p.zero_()
            else:
                std = 1.0 if name == "embed.W_E" else 1.0 / math.sqrt(p.shape[-1])
                p.copy_(torch.randn(p.shape, generator=gen).mul_(std).to(p.dtype))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: Union[str, os.PathLike],
        dtype: Optional[torch.dtype] = None,
        device: Union[str, torch.device, None] = None,
        *,
        expert_impl: Optional[str] = None,
        progress: bool = False,
        device_map: Union[None, str, dict] = None,
        max_memory: Optional[dict] = None,
        **config_overrides: Any,
    ) -> "HookedMoETransformer":
        """Load a hub-layout checkpoint: a local directory, a bundled model's short name
        (e.g. ``"moelens-tiny-facts"``), or a hub id resolved through ``huggingface_hub``.

        ``dtype`` defaults to float32; ``device`` to CPU. With ``device="meta"`` only ``config.json``
        is read. Weights stream tensor by tensor into the allocated model. ``device_map``
        (``"auto"``, ``"balanced"``, ``"sequential"`` or ``{module: device}``, with ``max_memory``)
        places blocks across devices (see :mod:`moelens.placement` and docs/gpu.md); activations move
        between devices inside the forward, so hooks and caches keep working.
        """
        meta = device is not None and torch.device(device).type == "meta"
        directory = loading.resolve(name_or_path, weights=not meta)
        hf_config = loading.read_config(directory)
        cfg = translate_config(hf_config, dtype=dtype or torch.float32, **config_overrides)
        if expert_impl:
            cfg = cfg.replace(expert_impl=expert_impl)
        tokenizer = loading.load_tokenizer(directory)
        if meta:
            return cls.from_config(cfg, device="meta", tokenizer=tokenizer)
        arch = get_architecture(hf_config)
        if (cfg.tie_word_embeddings and "tie_word_embeddings" not in config_overrides
                and loading.lm_head_differs_from_embedding(directory, arch, cfg.dtype)):
            # transformers keeps such a pair untied (with a warning): lm_head.weight is the unembedding
            loading.logger.warning(
                "moelens: config.json says tie_word_embeddings=true, but the checkpoint's lm_head.weight "
                "differs from its input embedding; loading them untied, as transformers does (pass "
                "tie_word_embeddings=True to tie them anyway, or fix config.json)"
            )
            cfg = cfg.replace(tie_word_embeddings=False)
        if device_map is not None and device is not None:
            raise ValueError("pass `device` or `device_map`, not both")
        if max_memory is not None and device_map is None:
            raise ValueError("max_memory is only used with device_map (e.g. device_map='auto')")
        with torch.device("meta"):
            model = cls(cfg, tokenizer=tokenizer)
        model = model.to(cfg.dtype)
        if device_map is not None:
            from moelens import placement

            plan = placement.resolve_device_map(model, device_map, max_memory)
            placement.materialize(model, plan)
        else:
            model = model._materialize(torch.device(device) if device is not None else torch.device("cpu"))
        loading.load_weights(model, directory, arch, cfg.tie_word_embeddings, progress)
        if device_map is not None:
            placement.attach_device_hooks(model, plan)
        model.name_or_path = str(name_or_path)
        return model.eval()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input: Union[TextInput, Int[Tensor, "batch pos"], Float[Tensor, "batch pos d_model"]],
        attention_mask: Optional[Tensor] = None,
        return_type: Optional[str] = "logits",
        *,
        start_at_layer: Optional[int] = None,
        stop_at_layer: Optional[int] = None,
        prepend_bos: Optional[bool] = None,
        past_kv_cache: Any = None,
        position_ids: Optional[Tensor] = None,
    ):
        """Run the model.

        ``input``: text, a list of texts (left-padded, with the attention mask built for you),
        tokens ``[batch, pos]``, or with ``start_at_layer`` a residual stream ``[batch, pos, d_model]``.
        ``attention_mask``: ``[batch, pos]`` 1 for real tokens. ``return_type``: ``"logits"``,
        ``"loss"`` (mean next-token cross-entropy), ``"both"`` or ``None``.
        ``stop_at_layer=l`` returns the residual stream entering block ``l``.
        ``past_kv_cache``: a :class:`moelens.generation.GenerationCache` holding the earlier
        positions (``input`` is then only the new positions; the cache is extended in place);
        ``attention_mask`` then covers earlier and new positions. ``position_ids`` ``[batch, pos]``:
        RoPE positions of the new positions (default: their index in the sequence).
        """
        tokens = None
        if isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str)):
            tokens, mask = self.tokenize(input, prepend_bos=prepend_bos)
            attention_mask = mask if attention_mask is None else attention_mask
            input = tokens
        if start_at_layer is None:
            tokens = input
            resid = self.hook_embed(self.embed(tokens))
            start_at_layer = 0
        else:
            resid = input
        batch, n_pos = resid.shape[:2]
        q_offset = 0 if past_kv_cache is None else past_kv_cache.seq_len
        ctx = self.attention_context(n_pos, attention_mask, q_offset=q_offset, device=resid.device,
                                     position_ids=position_ids)
        ctx.tokens = tokens if start_at_layer == 0 else None
        if self.cfg.hc_mult > 1 and start_at_layer == 0 and resid.ndim == 3:  # DeepSeek-V4: the embedding copied into every stream
            resid = resid.unsqueeze(2).expand(-1, -1, self.cfg.hc_mult, -1).contiguous()
        for i, block in enumerate(self.blocks[start_at_layer:stop_at_layer], start_at_layer):
            resid = block(resid, ctx) if past_kv_cache is None else block(resid, ctx, past_kv_cache[i])
        if past_kv_cache is not None:
            past_kv_cache.seq_len += n_pos
        if stop_at_layer is not None:
            return resid
        if self.cfg.hc_mult > 1:  # DeepSeek-V4: collapse the residual streams before the final norm
            resid = self.hc_head(resid)
        logits = self.unembed(self.ln_final(resid))
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        if tokens is None:
            raise ValueError("return_type='loss' needs token input (not a residual stream)")
        mask = None if attention_mask is None else attention_mask.to(logits.device)
        loss = self.loss(logits, tokens.to(logits.device), mask)
        return loss if return_type == "loss" else (logits, loss)

    def attention_context(
        self, n_pos: int, attention_mask: Optional[Tensor] = None, q_offset: int = 0, device=None,
        position_ids: Optional[Tensor] = None,
    ) -> AttentionContext:
        """RoPE tables and the padding mask shared by all layers of one forward. ``position_ids``
        ``[batch, pos]`` (default ``q_offset .. q_offset + n_pos - 1``) are the RoPE positions."""
        device = device or self.rope_inv_freq.device
        if position_ids is None:
            positions = torch.arange(q_offset, q_offset + n_pos, device=device)[None]
        else:
            positions = position_ids.to(device)
        inv_freq = self.rope_inv_freq
        if inv_freq.dtype != torch.float32:  # e.g. after model.to(torch.bfloat16): recompute in fp32
            inv_freq = rope_frequencies(self.cfg.rope_dim, self.cfg.rope_theta, self.cfg.yarn)[0]
            self._buffers["rope_inv_freq"] = inv_freq = inv_freq.to(device)
        cos, sin = rope_cos_sin(positions, inv_freq.to(device), self._rope_factor, self.cfg.rope_arith)
        key_mask = None
        if attention_mask is not None:
            if attention_mask.shape[-1] != q_offset + n_pos:
                raise ValueError(
                    f"attention_mask has {attention_mask.shape[-1]} positions, input has {q_offset + n_pos}"
                )
            if not bool(attention_mask.all()):
                key_mask = attention_mask.to(device).bool()
        return AttentionContext(cos=cos, sin=sin, key_mask=key_mask, q_offset=q_offset, positions=positions)

    @staticmethod
    def loss(logits: Tensor, tokens: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        logprobs = logits[:, :-1].float().log_softmax(-1)
        nll = -logprobs.gather(-1, tokens[:, 1:, None])[..., 0]
        if attention_mask is None:
            return nll.mean()
        m = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(nll.dtype)
        return (nll * m).sum() / m.sum()

    # ------------------------------------------------------------------ hooks: friendly names
    def _check_name(self, name) -> None:
        if isinstance(name, str) and name not in self.hook_dict:
            raise unknown_hook_error(name, self.hook_dict)

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:
        self._check_name(name)
        super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def _enable_hook_with_name(self, name, hook, dir):
        self._check_name(name)
        return super()._enable_hook_with_name(name, hook, dir)

    def run_with_cache(
        self, *model_args, names_filter=None, return_cache_object: bool = True, fwd_hooks=(), **kwargs
    ):
        """As TransformerLens: ``(output, cache)``; the cache is a :class:`moelens.MoEActivationCache`
        that knows about experts. ``names_filter`` may be a name, a list of names or a predicate.
        ``fwd_hooks`` run during the cached forward (e.g. to cache a corrupted or patched run);
        the cache records the activations as the hooks left them."""
        for name in [names_filter] if isinstance(names_filter, str) else (
            names_filter if isinstance(names_filter, (list, tuple)) else []
        ):
            self._check_name(name)
        with self.hooks(fwd_hooks=list(fwd_hooks)):
            out, cache_dict = super().run_with_cache(*model_args, names_filter=names_filter, **kwargs)
        if not return_cache_object:
            return out, cache_dict
        from moelens.cache import MoEActivationCache

        cache = MoEActivationCache(cache_dict, self, has_batch_dim=not kwargs.get("remove_batch_dim", False))
        first = model_args[0] if model_args else kwargs.get("input")
        mask = model_args[1] if len(model_args) > 1 else kwargs.get("attention_mask")
        if isinstance(first, str) or (isinstance(first, (list, tuple)) and first and isinstance(first[0], str)):
            first, built = self.tokenize(first, prepend_bos=kwargs.get("prepend_bos"))
            mask = built if mask is None else mask
        cache.tokens = first if isinstance(first, Tensor) and not first.is_floating_point() else None
        cache.attention_mask = mask if isinstance(mask, Tensor) else None
        return out, cache

    # ------------------------------------------------------------------ tokens
    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(
                "This model has no tokenizer (the checkpoint directory had no tokenizer files). "
                "Pass token ids, or set `model.tokenizer = AutoTokenizer.from_pretrained(...)`."
            )
        return self.tokenizer

    def default_prepend_bos(self) -> bool:
        tok = self.tokenizer
        return bool(self.cfg.default_prepend_bos and tok is not None and tok.bos_token_id is not None)

    def tokenize(
        self, text: TextInput, prepend_bos: Optional[bool] = None, padding_side: str = "left"
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """``(tokens, attention_mask)``; batches are padded (left by default, so the last position
        is every prompt's last token). BOS is prepended explicitly when ``prepend_bos``
        (default: when the tokenizer has a BOS token)."""
        tok = self._require_tokenizer()
        texts = [text] if isinstance(text, str) else list(text)
        bos = self.default_prepend_bos() if prepend_bos is None else prepend_bos
        if bos and tok.bos_token_id is None:
            raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
        ids = [([tok.bos_token_id] if bos else []) + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        n = max(len(i) for i in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (self.cfg.pad_token_id or 0)
        tokens = torch.full((len(ids), n), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), n), dtype=torch.long)
        for row, seq in enumerate(ids):
            sl = slice(n - len(seq), n) if padding_side == "left" else slice(0, len(seq))
            tokens[row, sl] = torch.tensor(seq, dtype=torch.long)
            mask[row, sl] = 1
        device = self.rope_inv_freq.device
        return tokens.to(device), mask.to(device)

    def to_tokens(
        self, input: TextInput, prepend_bos: Optional[bool] = None, padding_side: Optional[str] = "left",
        move_to_device: bool = True, truncate: bool = True,
    ) -> Int[Tensor, "batch pos"]:
        """Tokens ``[batch, pos]`` (int64). Use :meth:`tokenize` to also get the attention mask.

        As TransformerLens (and what SAELens' activation store passes): ``move_to_device=False`` keeps
        the tokens on the CPU; ``truncate=True`` keeps the first ``cfg.n_ctx`` tokens (the checkpoint's
        ``max_position_embeddings``; no limit when the config has none)."""
        tokens = self.tokenize(input, prepend_bos=prepend_bos, padding_side=padding_side or "left")[0]
        if truncate and self.cfg.n_ctx is not None and tokens.shape[-1] > self.cfg.n_ctx:
            tokens = tokens[:, : self.cfg.n_ctx]
        return tokens if move_to_device else tokens.cpu()

    def to_string(self, tokens: Union[Tensor, Sequence[int]]) -> Union[str, list[str]]:
        tok = self._require_tokenizer()
        if isinstance(tokens, Tensor) and tokens.ndim == 2:
            return [tok.decode(t.tolist()) for t in tokens]
        return tok.decode(tokens.tolist() if isinstance(tokens, Tensor) else list(tokens))

    def to_str_tokens(self, input: Union[str, Tensor, Sequence[int]], prepend_bos: Optional[bool] = None) -> list[str]:
        """Each token decoded on its own (one sequence)."""
        tok = self._require_tokenizer()
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos=prepend_bos)[0]
        ids = input.reshape(-1).tolist() if isinstance(input, Tensor) else list(input)
        return [tok.decode([i]) for i in ids]

    def to_single_token(self, text: str) -> int:
        ids = self._require_tokenizer()(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{text!r} is {len(ids)} tokens, not one: {ids}")
        return ids[0]

    # ------------------------------------------------------------------ misc
    @property
    def W_E(self) -> Tensor:
        return self.embed.W_E

    @property
    def W_U(self) -> Tensor:
        return self.unembed.w_u

    def generate(self, input="", max_new_tokens: int = 10, **kwargs):
        """Generate text or tokens, as TransformerLens' ``HookedTransformer.generate``; hooks apply
        at every step. See :func:`moelens.generation.generate` for every argument."""
        from moelens.generation import generate

        return generate(self, input, max_new_tokens, **kwargs)

    # ------------------------------------------------------------------ TransformerLens analysis surface
    def tokens_to_residual_directions(self, tokens: Union[str, int, Tensor]) -> Tensor:
        """The residual-stream direction whose dot product with ``resid / ln_final.hook_scale`` is the
        logit of each token: ``ln_final.w * W_U[token]`` (the final norm's weight folded in, as in a
        TransformerLens model with folded norms). Shape ``tokens.shape + (d_model,)``. What
        ``cache.logit_attrs`` projects onto."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        W_U = self.unembed.w_u
        if isinstance(tokens, int):
            tokens = torch.tensor(tokens)
        tokens = torch.as_tensor(tokens, device=W_U.device)
        if tokens.is_floating_point():
            raise TypeError(f"tokens must be integer token ids, got {tokens.dtype}")
        return W_U[tokens] * self.ln_final.scale_weight.to(W_U.device, W_U.dtype)

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Tensor:
        """Sum of the output biases written into the residual stream before ``layer`` (attention
        ``b_O`` and MLP ``b_out`` where an architecture has them; zero for every architecture so far),
        as TransformerLens' ``accumulated_bias``."""
        out = torch.zeros(self.cfg.d_model, device=self.unembed.w_u.device, dtype=self.unembed.w_u.dtype)
        last = layer + 1 if mlp_input else layer
        for l, block in enumerate(self.blocks[:last]):
            b = getattr(block.attn, "b_O", None)
            if b is not None:
                out = out + b.to(out.device)
            if include_mlp_biases and l < layer:
                b = getattr(block.mlp, "b_out", None)
                if b is not None:
                    out = out + b.to(out.device)
        return out

    def n_params(self, active: bool = False, include_embeddings: bool = True) -> int:
        """Parameter count (total, or active per token: only ``top_k`` of the routed experts, their
        weights and, where they have them, biases)."""
        total = 0
        for name, p in self.named_parameters():
            if not include_embeddings and name in ("embed.W_E", "unembed.w_u"):
                continue
            if name.endswith(("router.b_correction", "router.tid2eid")):  # buffers in transformers: not counted there
                continue
            n = p.numel()
            if active and (".experts.w_" in name or ".experts.b_" in name):  # per-expert weights and biases
                n = n // self.cfg.n_experts * self.cfg.top_k
            total += n
        return total


def _as_config(cfg, dtype, expert_impl) -> MoEConfig:
    if isinstance(cfg, str):
        from moelens.presets import get_preset

        cfg = get_preset(cfg)
    if not isinstance(cfg, (MoEConfig, dict)) and hasattr(cfg, "to_dict"):  # a transformers config object
        cfg = cfg.to_dict()
    if isinstance(cfg, dict):
        cfg = translate_config(cfg, dtype=dtype or torch.float32)
    elif dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    if expert_impl:
        cfg = cfg.replace(expert_impl=expert_impl)
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"from_config needs a MoEConfig, a config.json dict or a preset name, got {type(cfg).__name__}")
    return cfg
