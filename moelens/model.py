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
from moelens.components.block import make_block
from moelens.components.norm import make_norm
from moelens.components.rope import longrope_mscale, rope_cos_sin, rope_frequencies
from moelens.components.tl_views import ModelViews
from moelens.config import MoEConfig
from moelens.hooks import ShapedHookPoint, unknown_hook_error
from moelens.tokenization import TokenizerMethods, _is_text

TextInput = Union[str, Sequence[str]]


class Embed(nn.Module):
    """``W_E[tokens]``, times ``cfg.embedding_multiplier`` where the architecture has one (Granite, a
    Python float), or ``cfg.embed_scale`` cast to the model dtype where it scales its embeddings
    (Gemma: ``sqrt(d_model)``); ``W_E`` itself is the checkpoint's matrix."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.multiplier = cfg.embedding_multiplier
        self.scale = cfg.embed_scale

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        x = F.embedding(tokens, self.W_E)
        if self.multiplier != 1.0:
            x = x * self.multiplier
        if self.scale is not None:
            x = x * torch.tensor(self.scale, dtype=x.dtype, device=x.device)
        return x


class Unembed(nn.Module):
    """``logits = cap(hook_out)``, ``hook_out = x @ W_U + b_U``; stored as ``w_u`` ``[d_vocab, d_model]`` (the hub's ``lm_head.weight``
    layout) and PhiMoE's ``b_u``; Granite divides the logits by ``cfg.logits_scaling``. ``W_U`` and
    ``b_U`` are the TransformerLens views ``[d_model, d_vocab]`` and ``[d_vocab]``, the scaling folded in."""

    def __init__(self, cfg: MoEConfig, tied_to: Optional[nn.Parameter] = None):
        super().__init__()
        self.w_u = tied_to if tied_to is not None else nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.b_u = nn.Parameter(torch.zeros(cfg.d_vocab)) if cfg.unembed_bias else None  # PhiMoE's lm_head.bias
        self.logits_scaling = cfg.logits_scaling
        self.softcap = cfg.final_logit_softcap
        self.hook_in = ShapedHookPoint("batch pos d_model")  # TransformerLens' unembed hooks
        self.hook_out = ShapedHookPoint("batch pos d_vocab")

    @property
    def W_U(self) -> Tensor:
        """``[d_model, d_vocab]``: ``W_U[:, t]`` is token ``t``'s unembedding direction. A view of
        ``w_u``; where the logits are divided by ``logits_scaling`` (Granite) the divided matrix (a
        computed tensor, so an in-place edit of it does not reach ``w_u``)."""
        w = self.w_u.T
        return w / self.logits_scaling if self.logits_scaling != 1.0 else w

    @property
    def b_U(self) -> Tensor:
        """``[d_vocab]``: the unembedding bias (PhiMoE's ``lm_head.bias``, divided like the logits),
        zeros where the architecture has none."""
        if self.b_u is None:
            return torch.zeros(self.w_u.shape[0], dtype=self.w_u.dtype, device=self.w_u.device)
        return self.b_u / self.logits_scaling if self.logits_scaling != 1.0 else self.b_u

    def cap(self, logits: Tensor) -> Tensor:
        """Gemma's final logit soft-cap ``c * tanh(logits / c)`` (identity without one;
        ``cfg.output_logits_soft_cap`` in TransformerLens' naming)."""
        if self.softcap is None:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        logits = F.linear(self.hook_in(x), self.w_u, self.b_u)
        logits = logits / self.logits_scaling if self.logits_scaling != 1.0 else logits
        # TransformerLens: hook_out is x @ W_U + b_U; HookedTransformer applies
        # cfg.output_logits_soft_cap after the unembed, so the soft-cap comes after the hook
        return self.cap(self.hook_out(logits))


class HookedMoETransformer(ModelViews, TokenizerMethods, HookedRootModule):
    """A sparse mixture-of-experts decoder with a hook point on every router, expert and combine step.

    Build with :meth:`from_pretrained` (hub-layout checkpoints, hub ids, bundled models) or
    :meth:`from_config` (random weights). ``model(tokens)`` returns logits ``[batch, pos, d_vocab]``.
    """

    def __init__(self, cfg: MoEConfig, tokenizer: Any = None):
        super().__init__()
        cfg = cfg.replace()  # this model's own copy: cfg.device / model_name describe this model
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed = Embed(cfg)
        self.hook_embed = ShapedHookPoint("batch pos d_model")
        self.blocks = nn.ModuleList([make_block(cfg, l) for l in range(cfg.n_layers)])
        if cfg.hc_mult > 1:  # DeepSeek-V4: several residual streams, collapsed before the final norm
            from moelens.components.hyper import HyperHead

            self.hc_head = HyperHead(cfg)
        self.ln_final = make_norm(cfg, cfg.d_model)
        self.unembed = Unembed(cfg, tied_to=self.embed.W_E if cfg.tie_word_embeddings else None)
        inv_freq, self._rope_factor = rope_frequencies(cfg.rope_dim, cfg.rope_theta, cfg.yarn)
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)
        if cfg.rope_theta_full is not None:  # Gemma 4's full-attention layers: their own (proportional) RoPE
            self.register_buffer("rope_inv_freq_full", self._full_rope_frequencies(), persistent=False)
        self.setup()
        self._sync_cfg_device()

    def _apply(self, fn, *args, **kwargs):
        """``to``/``cuda``/``cpu``/``to_empty`` all come here: keep ``cfg.device`` current."""
        out = super()._apply(fn, *args, **kwargs)
        self._sync_cfg_device()
        return out

    def _sync_cfg_device(self) -> None:
        """``cfg.device``: the embedding's device (where inputs go, as TransformerLens' ``cfg.device``);
        ``cfg.n_devices``: how many devices hold parameters (> 1 with a ``device_map``)."""
        if not hasattr(self, "embed"):  # during construction
            return
        devices = {p.device for p in self.parameters()}
        self.cfg._set_runtime(device=self.embed.W_E.device, n_devices=max(1, len(devices)))

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
        keep_quantized: bool = False,
    ) -> "HookedMoETransformer":
        """A randomly initialised model (``device="meta"``: the skeleton only, no memory).

        ``keep_quantized=True`` (meta device only) builds the skeleton that
        ``from_pretrained(..., keep_quantized=True)`` would, from the ``quantization_config`` of the
        preset or config dict (which parameters the format packs: :data:`moelens.quant.packed.PACKED_PATTERNS`),
        for planning memory and placement with the packed sizes.

        ``cfg`` is a :class:`MoEConfig`, a Hugging Face ``config.json`` dict or config object
        (e.g. ``transformers.MixtralConfig(...)``), or the name of a preset of :mod:`moelens.presets`
        (e.g. ``"Qwen/Qwen3-30B-A3B-Base"``).
        """
        hf_config = _hf_dict(cfg) if keep_quantized else None
        cfg = _as_config(cfg, dtype, expert_impl)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if keep_quantized and device.type != "meta":
            raise ValueError(
                "from_config(keep_quantized=True) builds meta skeletons only (for planning memory); random weights "
                "are not quantised. Save a quantised checkpoint and use from_pretrained(..., keep_quantized=True)."
            )
        with torch.device("meta"):
            model = cls(cfg, tokenizer=tokenizer)
        model = model.to(cfg.dtype)
        if keep_quantized:
            model._pack(hf_config)
        if device.type == "meta":
            return model
        model = model._materialize(device)
        model.init_weights(seed)
        return model.eval()

    def _pack(self, hf_config: Optional[dict]) -> None:
        """Pack the meta skeleton as the checkpoint format of ``hf_config`` would (planning only)."""
        from moelens.quant.packed import hf_format, pack_model, specs_for

        fmt = hf_format(hf_config or {})
        if fmt is None:
            raise ValueError(
                "keep_quantized=True: the config declares no FP8 or MXFP4 quantization_config (pass a preset or "
                "config.json dict that has one)"
            )
        pack_model(self, specs_for(self, *fmt))

    def _materialize(self, device: torch.device) -> "HookedMoETransformer":
        """Allocate the meta skeleton on ``device`` (uninitialised), keeping tied weights tied."""
        self.to_empty(device=device)
        if self.cfg.tie_word_embeddings:
            self.unembed.w_u = self.embed.W_E
        # RoPE frequencies stay fp32 whatever the model dtype (as in transformers)
        self._buffers["rope_inv_freq"] = rope_frequencies(self.cfg.rope_dim, self.cfg.rope_theta, self.cfg.yarn)[0].to(device)
        if self.cfg.rope_theta_full is not None:
            self._buffers["rope_inv_freq_full"] = self._full_rope_frequencies().to(device)
        return self

    def _full_rope_frequencies(self) -> Tensor:
        from moelens.components.rope import proportional_frequencies

        cfg = self.cfg
        return proportional_frequencies(cfg.full_attn_d_head or cfg.d_head, cfg.rope_theta_full, cfg.rope_proportion_full)

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """Gaussian weights with std ``1/sqrt(fan_in)`` (embeddings std 1), norm weights 1 (0 for
        zero-centred norms), biases 0; Gated DeltaNet ``A_log`` 0 and ``dt_bias`` 1."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else seed)
        for name, b in self.named_buffers():
            if name.endswith("router.b_correction"):  # transformers initialises the correction bias to 0
                b.zero_()
            elif name.endswith("layer_scalar"):
                b.fill_(1.0)
            elif name.endswith(".tid2eid"):  # DeepSeek-V4 hash routing: a random token -> experts table
                b.copy_(torch.stack([torch.randperm(self.cfg.n_experts, generator=gen)[: self.cfg.top_k]
                                     for _ in range(b.shape[0])]))
        for name, p in self.named_parameters():
            if name.endswith(".b"):  # LayerNorm bias
                p.zero_()
            elif name.endswith((".w", "norm_w")):
                zero = self.cfg.norm_zero_centered and not name.endswith("attn.norm_w")  # the gated norm is 1-based
                p.fill_(0.0 if zero else 1.0)
            elif name.endswith("per_expert_scale"):
                p.fill_(1.0)
            elif name.endswith(".A_log"):
                p.zero_()
            elif name.endswith(".dt_bias"):
                p.fill_(1.0)
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
        keep_quantized: bool = False,
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

        ``keep_quantized=True`` (FP8-block and MXFP4 checkpoints) keeps the quantised weights packed
        in memory, as the checkpoint stores them, and dequantises each routed expert (and each FP8
        projection) when it runs (:mod:`moelens.quant.packed`): bit-identical outputs with the
        memory of the checkpoint (bit-identical for the same ``expert_impl``: on CUDA the default
        ``"auto"`` runs grouped kernels for dequantised experts and one expert at a time for packed
        ones, so compare with ``expert_impl="sorted"`` there). Device maps are planned with the
        packed sizes.
        """
        meta = device is not None and torch.device(device).type == "meta"
        directory = loading.resolve(name_or_path, weights=not meta)
        hf_config = loading.read_config(directory)
        cfg = translate_config(hf_config, dtype=dtype or torch.float32, **config_overrides)
        if expert_impl:
            cfg = cfg.replace(expert_impl=expert_impl)
        tokenizer = loading.load_tokenizer(directory)
        if meta:
            model = cls.from_config(cfg, device="meta", tokenizer=tokenizer)
            if keep_quantized:
                model._pack(hf_config)
            return model
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
        if keep_quantized:  # on the meta skeleton: placement and allocation see the packed sizes
            from moelens.quant.packed import pack_model

            pack_model(model, loading.packed_specs(directory, arch, model, hf_config))
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
        model.cfg._set_runtime(model_name=str(name_or_path))
        model._sync_cfg_device()
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
        padding_side: Optional[str] = None,
        past_kv_cache: Any = None,
        position_ids: Optional[Tensor] = None,
    ):
        """Run the model.

        ``input``: text or a list of texts (padded on ``padding_side``, default
        ``tokenizer.padding_side``, with the attention mask built for you), tokens ``[batch, pos]``
        (or ``[pos]``), embeddings ``[batch, pos, d_model]`` (float; they pass through ``hook_embed``
        in place of ``W_E[tokens]``), or with ``start_at_layer`` a residual stream ``[batch, pos, d_model]``.
        ``attention_mask``: ``[batch, pos]`` 1 for real tokens; for token input without one, when
        ``tokenizer.padding_side == "left"`` leading pad tokens are masked, as TransformerLens does
        (:meth:`input_attention_mask`). ``return_type``: ``"logits"``,
        ``"loss"`` (mean next-token cross-entropy), ``"both"`` or ``None``.
        ``stop_at_layer=l`` returns the residual stream entering block ``l``.
        ``past_kv_cache``: a :class:`moelens.generation.GenerationCache` holding the earlier
        positions (``input`` is then only the new positions; the cache is extended in place);
        ``attention_mask`` then covers earlier and new positions. ``position_ids`` ``[batch, pos]``:
        RoPE positions of the new positions (default: their index in the sequence).
        """
        tokens, resid, attention_mask = self._resolve_input(
            input, attention_mask, prepend_bos, padding_side, start_at_layer is not None or past_kv_cache is not None
        )
        if start_at_layer is None:
            resid = self.hook_embed(self.embed(tokens) if tokens is not None else resid)
            start_at_layer = 0
        elif resid is None:
            raise TypeError("with start_at_layer, input is the residual stream [batch, pos, d_model] (float), not tokens")
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

    def _resolve_input(self, input, attention_mask, prepend_bos, padding_side, explicit_mask_only: bool):
        """``(tokens or None, embeddings/residual or None, attention_mask)`` for :meth:`forward`."""
        if _is_text(input):
            tokens, mask = self.tokenize(input, prepend_bos=prepend_bos, padding_side=self._padding_side(padding_side))
            return tokens, None, mask if attention_mask is None else attention_mask
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be text, tokens or embeddings (a tensor), got {type(input).__name__}")
        if input.is_floating_point():
            return None, input, attention_mask
        tokens = input[None] if input.ndim == 1 else input
        if attention_mask is None and not explicit_mask_only:
            attention_mask = self.input_attention_mask(tokens, prepend_bos)
        return tokens, None, attention_mask

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
        factor = longrope_mscale(self.cfg.yarn, positions, self._rope_factor)  # PhiMoE: short / long mscale
        cos, sin = rope_cos_sin(positions, inv_freq.to(device), factor, self.cfg.rope_arith)
        tables = {}
        if self.cfg.rope_theta_full is not None:
            full = self._buffers["rope_inv_freq_full"]
            if full.dtype != torch.float32:
                self._buffers["rope_inv_freq_full"] = full = self._full_rope_frequencies().to(device)
            tables["full"] = rope_cos_sin(positions, full.to(device), 1.0, self.cfg.rope_arith)
        key_mask = None
        if attention_mask is not None:
            if attention_mask.shape[-1] != q_offset + n_pos:
                raise ValueError(
                    f"attention_mask has {attention_mask.shape[-1]} positions, input has {q_offset + n_pos}"
                )
            if not bool(attention_mask.all()):
                key_mask = attention_mask.to(device).bool()
        return AttentionContext(cos=cos, sin=sin, key_mask=key_mask, q_offset=q_offset, rope_tables=tables,
                                positions=positions)

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

    def get_caching_hooks(self, names_filter=None, incl_bwd: bool = False, device=None,
                          remove_batch_dim: bool = False, cache: Optional[dict] = None, pos_slice=None):
        """As TransformerLens' ``get_caching_hooks``, except that ``pos_slice`` slices each hook's own
        position axis, read from its shape annotation (:func:`moelens.hooks.pos_dim`): ``pos`` (or
        ``query_pos`` for attention scores and patterns, as TransformerLens) wherever it sits, e.g.
        axis 1 of ``attn.hook_rot_q [batch, pos, head, d_head]`` and of ``mlp.hook_expert_out
        [batch, pos, top_k, d_model]``. An ``int`` keeps the axis (length 1), as in TransformerLens. A hook
        whose annotation has no position axis (DeepSeek-V4's compressed entries) is cached whole."""
        from transformer_lens.utilities import Slice

        from moelens.hooks import pos_dim

        cache, fwd, bwd = super().get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, cache)
        if pos_slice is None:
            return cache, fwd, bwd
        pos_slice = Slice.unwrap(pos_slice)

        def sliced(save, suffix):
            def hook(tensor, hook):
                save(tensor, hook=hook)
                key = hook.name + suffix
                dim = pos_dim(hook, cache[key].ndim)
                if dim is not None and cache[key].ndim >= -dim:  # hooks without a position axis: whole
                    cache[key] = pos_slice.apply(cache[key], dim=dim)
            hook.__name__ = hook.__qualname__ = "save_hook"
            return hook

        return (cache, [(n, sliced(f, "")) for n, f in fwd], [(n, sliced(f, "_grad")) for n, f in bwd])

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
        if _is_text(first) or isinstance(first, Tensor):
            explicit = kwargs.get("start_at_layer") is not None or kwargs.get("past_kv_cache") is not None
            first, _, mask = self._resolve_input(first, mask, kwargs.get("prepend_bos"), kwargs.get("padding_side"), explicit)
        cache.tokens = first if isinstance(first, Tensor) and not first.is_floating_point() else None
        cache.attention_mask = mask if isinstance(mask, Tensor) else None
        if kwargs.get("pos_slice") is not None:
            cache.set_pos_slice(kwargs["pos_slice"], n_pos=None if cache.tokens is None else cache.tokens.shape[-1])
        return out, cache

    # ------------------------------------------------------------------ misc
    @property
    def W_E(self) -> Tensor:
        return self.embed.W_E

    def generate(self, input="", max_new_tokens: int = 10, **kwargs):
        """Generate text or tokens, as TransformerLens' ``HookedTransformer.generate``; hooks apply
        at every step. See :func:`moelens.generation.generate` for every argument."""
        from moelens.generation import generate

        return generate(self, input, max_new_tokens, **kwargs)

    # ------------------------------------------------------------------ TransformerLens analysis surface
    def tokens_to_residual_directions(self, tokens: Union[str, int, Tensor]) -> Tensor:
        """The residual-stream direction whose dot product with ``resid / ln_final.hook_scale`` is the
        logit of each token: ``ln_final.w * W_U[token]`` (the final norm's weight folded in, as in a
        TransformerLens model with folded norms). Shape ``tokens.shape + (d_model,)``, except that one
        token (an int, a string, or a tensor of one element of any shape) gives ``[d_model]``, as in
        TransformerLens. What
        ``cache.logit_attrs`` projects onto."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        W_U = self.unembed.w_u
        if isinstance(tokens, int):
            tokens = torch.tensor(tokens)
        tokens = torch.as_tensor(tokens, device=W_U.device)
        if tokens.is_floating_point():
            raise TypeError(f"tokens must be integer token ids, got {tokens.dtype}")
        if tokens.numel() == 1:  # one token, whatever its shape: [d_model], as TransformerLens
            tokens = tokens.reshape(())
        direction = W_U[tokens] * self.ln_final.scale_weight.to(W_U.device, W_U.dtype)
        return direction / self.cfg.logits_scaling if self.cfg.logits_scaling != 1.0 else direction

    def logit_bias(self) -> Tensor:
        """``[d_vocab]``: the constant part of every logit that no residual-stream component carries: the
        final LayerNorm's bias through the unembedding plus the unembedding bias (PhiMoE), divided by
        ``logits_scaling`` where the architecture has one; zero for RMSNorm models without ``lm_head``
        bias. What TransformerLens' ``b_U`` holds after folding the final norm: ``cache.logit_attrs``
        components sum to the logits minus this."""
        W_U = self.unembed.w_u
        out = torch.zeros(W_U.shape[0], device=W_U.device, dtype=W_U.dtype)
        b = getattr(self.ln_final, "b", None)
        if b is not None:
            out = out + F.linear(b.to(W_U.device, W_U.dtype), W_U)
        if self.unembed.b_u is not None:
            out = out + self.unembed.b_u
        return out / self.cfg.logits_scaling if self.cfg.logits_scaling != 1.0 else out

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Tensor:
        """Sum of the output biases written into the residual stream before ``layer`` (attention
        ``b_O`` and MLP ``b_out`` where an architecture has them; zero for every architecture so far),
        as TransformerLens' ``accumulated_bias``."""
        out = torch.zeros(self.cfg.d_model, device=self.unembed.w_u.device, dtype=self.unembed.w_u.dtype)
        last = layer + 1 if mlp_input else layer
        for l, block in enumerate(self.blocks[:last]):
            b = getattr(block.attn, "b_O", None)
            if b is not None:
                out = out + b.to(out.device)  # the view: Granite's residual multiplier folded in
            if include_mlp_biases and l < layer:
                b = getattr(block.mlp, "b_out", None)
                if b is not None:
                    out = out + b.to(out.device)
        return out

    def n_params(self, active: bool = False, include_embeddings: bool = True) -> int:
        """Parameter count (total, or active per token: only ``top_k`` of the routed experts, their
        weights and, where they have them, biases)."""
        from moelens.quant.packed import packed_tensors

        total = 0
        weights = list(self.named_parameters()) + list(packed_tensors(self).items())  # packed: logical sizes
        for name, p in weights:
            if not include_embeddings and name in ("embed.W_E", "unembed.w_u"):
                continue
            n = p.numel()
            if active and (".experts.w_" in name or ".experts.b_" in name):  # per-expert weights and biases
                n = n // self.cfg.n_experts * self.cfg.top_k
            total += n
        return total


def _hf_dict(cfg) -> Optional[dict]:
    """The ``config.json`` dict behind a preset name, dict or transformers config (None for a MoEConfig)."""
    if isinstance(cfg, str):
        from moelens.presets import get_preset

        return get_preset(cfg)
    if isinstance(cfg, dict):
        return cfg
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return None


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
