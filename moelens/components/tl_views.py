"""TransformerLens' weight names, as views in TransformerLens' layout.

moelens stores every weight in the hub's ``[out, in]`` layout under lowercase names (``attn.w_q``,
``mlp.experts.w_gate``, ``unembed.w_u``). The upper-case names TransformerLens' ``HookedTransformer``
uses are properties here that return the same numbers in TransformerLens' orientation (views: an
in-place edit of ``attn.W_Q`` edits ``attn.w_q``), so TransformerLens code runs unchanged:

=====================================  ==========================================  =============================
name                                   shape                                       meaning
=====================================  ==========================================  =============================
``model.W_E``                          ``[d_vocab, d_model]``                      token embeddings
``model.W_U`` / ``unembed.W_U``        ``[d_model, d_vocab]``                      ``hook_out = ln_final(x) @ W_U`` (1)
``model.b_U`` / ``unembed.b_U``        ``[d_vocab]``                               zeros (no architecture has one)
``attn.W_Q``                           ``[head, d_model, d_head]``                 ``q_h = x @ W_Q[h] + b_Q[h]``
``attn.W_K`` / ``attn.W_V``            ``[head, d_model, d_head]``                 GQA: ``_W_K [kv_head, ..]`` repeated
``attn.W_O``                           ``[head, d_head_v, d_model]``               ``attn_out = sum_h z_h @ W_O[h] + b_O``
``attn.b_Q`` / ``b_K`` / ``b_V``       ``[head, d_head]``                          None where the checkpoint has none
``attn.QK`` / ``attn.OV``              ``FactoredMatrix``                          ``W_Q W_K^T`` / ``W_V W_O`` per head
``mlp.W_in`` / ``W_gate`` (dense)      ``[d_model, d_mlp]``                        up / gate projections
``mlp.W_out`` (dense)                  ``[d_mlp, d_model]``                        down projection
``mlp.experts.W_in`` / ``W_gate``      ``[n_experts, d_model, d_expert]``          per expert, expert axis first
``mlp.experts.W_out``                  ``[n_experts, d_expert, d_model]``
``mlp.experts.b_out``                  ``[n_experts, d_model]``                    gpt-oss only (None otherwise)
``mlp.b_in`` / ``mlp.experts.b_in``    None                                        no architecture has one
=====================================  ==========================================  =============================

(1) ``unembed.hook_out`` is ``ln_final(x) @ W_U + b_U``; the logits are that after the final soft-cap
``cfg.output_logits_soft_cap`` (Gemma 4; ``-1.0``: none), as in TransformerLens' ``HookedTransformer``.
On post-norm blocks (FlexOlmo, Gemma 4) ``W_O`` and ``W_out`` map into the post-norm's input, not
into ``hook_attn_out``/``hook_mlp_out`` (docs/transformer_lens.md).

Grouped-query attention follows TransformerLens' ``GroupedQueryAttention``: ``_W_K``/``_W_V``/``_b_K``/``_b_V``
hold the ``n_kv_heads`` key/value heads, and ``W_K``/``W_V``/``b_K``/``b_V`` repeat them with
``repeat_interleave`` to ``n_heads`` (query head ``h`` reads key head ``h // (n_heads // n_kv_heads)``).

A name whose TransformerLens meaning does not exist in a layer is absent (``AttributeError`` with the
reason, ``hasattr`` False): e.g. ``W_K``/``W_V`` of multi-head latent attention (keys and values come
from a normalised latent, not a linear map of the residual stream), every attention name of a Gated
DeltaNet layer, and ``W_in`` of a sparse MoE block (its experts have them: ``mlp.experts.W_in``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class TLAbsent:
    """``__getattr__`` that explains why a TransformerLens name is absent (``_tl_absent`` maps a
    name to the reason). A property that raises ``AttributeError`` lands here too, so its own
    message is replaced by the reason when there is one."""

    _tl_absent: dict = {}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # nn.Module: parameters, buffers, submodules
        except AttributeError:
            reason = self._absent_reason(name)
            if reason is None:
                raise
            raise AttributeError(f"{type(self).__name__}.{name} is absent: {reason}") from None

    def _absent_reason(self, name: str) -> Optional[str]:
        return type(self)._tl_absent.get(name)


def _factored(A: Tensor, B: Tensor):
    from transformer_lens import FactoredMatrix

    return FactoredMatrix(A, B)


def _heads_in(w: Tensor, n_heads: int) -> Tensor:
    """``[n_heads * d, d_model]`` (hub ``[out, in]``) -> ``[n_heads, d_model, d]`` (a view)."""
    return w.view(n_heads, -1, w.shape[-1]).transpose(-1, -2)


def _heads_out(w: Tensor, n_heads: int) -> Tensor:
    """``[d_model, n_heads * d]`` (hub ``o_proj``) -> ``[n_heads, d, d_model]`` (a view)."""
    return w.view(w.shape[0], n_heads, -1).permute(1, 2, 0)


def _bias_heads(b: Optional[Tensor], n_heads: int) -> Optional[Tensor]:
    return None if b is None else b.view(n_heads, -1)


class GQAViews:
    """TransformerLens names of :class:`moelens.components.attention.Attention`.

    Shapes are the layer's own: ``d_head`` and the key/value heads are ``attn.d_head`` /
    ``attn.n_kv_heads`` (Gemma 4's full-attention layers are wider and have fewer kv heads than its
    sliding layers). Where the value is the key projection (Gemma 4's full-attention layers,
    ``attention_k_eq_v``: no ``v_proj``), ``_W_V``/``W_V`` are views of the key weight ``w_k`` (an edit of
    one edits both): ``v = x @ W_V`` is the raw key projection, before the key's RMSNorm and RoPE;
    ``hook_v`` holds it after Gemma 4's weightless value RMSNorm (``cfg.v_norm``)."""

    @property
    def _n_kv(self) -> int:
        return getattr(self, "n_kv_heads", None) or self.cfg.n_kv_heads

    @property
    def _kv_repeats(self) -> int:
        return self.cfg.n_heads // self._n_kv

    @property
    def _value_weight(self) -> Tensor:
        return self.w_k if getattr(self, "k_eq_v", False) else self.w_v

    @property
    def W_Q(self) -> Tensor:
        return _heads_in(self.w_q, self.cfg.n_heads)

    @property
    def _W_K(self) -> Tensor:
        return _heads_in(self.w_k, self._n_kv)

    @property
    def _W_V(self) -> Tensor:
        return _heads_in(self._value_weight, self._n_kv)

    @property
    def W_K(self) -> Tensor:
        return torch.repeat_interleave(self._W_K, self._kv_repeats, dim=0)

    @property
    def W_V(self) -> Tensor:
        return torch.repeat_interleave(self._W_V, self._kv_repeats, dim=0)

    @property
    def W_O(self) -> Tensor:
        """``[head, d_head, d_model]``; Granite's residual multiplier (which scales the attention
        update) folded in, so ``sum_h z_h @ W_O[h] + b_O`` is ``hook_attn_out``.

        On a block with an attention post-norm (FlexOlmo, Gemma 4: ``ln1_post``) that sum is the
        *input* of the post-norm: ``hook_attn_out = ln1_post(sum_h z_h @ W_O[h] + b_O)``, i.e.
        ``(sum_h z_h @ W_O[h] + b_O) / ln1_post.hook_scale * ln1_post.w``. The norm is not folded into
        ``W_O`` (its scale depends on the whole sum); with the run's scale fixed each head's update is
        ``z_h @ W_O[h] / scale * w`` (``cache.stack_head_results``)."""
        w = _heads_out(self.w_o, self.cfg.n_heads)
        rm = getattr(self.cfg, "residual_multiplier", 1.0)
        return w * rm if rm != 1.0 else w

    @property
    def b_O(self) -> Optional[Tensor]:
        """``[d_model]``: the output projection's bias (stored as ``b_o``), Granite's residual
        multiplier folded in as in :attr:`W_O`; None where the attention has none."""
        if self.b_o is None:
            return None
        rm = getattr(self.cfg, "residual_multiplier", 1.0)
        return self.b_o * rm if rm != 1.0 else self.b_o

    @property
    def b_Q(self) -> Optional[Tensor]:
        return _bias_heads(self.b_q, self.cfg.n_heads)

    @property
    def _b_K(self) -> Optional[Tensor]:
        return _bias_heads(self.b_k, self._n_kv)

    @property
    def _b_V(self) -> Optional[Tensor]:
        return _bias_heads(self.b_k if getattr(self, "k_eq_v", False) else self.b_v, self._n_kv)

    @property
    def b_K(self) -> Optional[Tensor]:
        b = self._b_K
        return None if b is None else torch.repeat_interleave(b, self._kv_repeats, dim=0)

    @property
    def b_V(self) -> Optional[Tensor]:
        b = self._b_V
        return None if b is None else torch.repeat_interleave(b, self._kv_repeats, dim=0)

    @property
    def QK(self):
        """``W_Q[h] W_K[h]^T`` per head (``[head, d_model, d_model]``, factored). With QK-norm
        (Qwen3, OLMoE, GLM-4.x) a norm sits between the projections and the dot product, so the
        scores are not ``x W_Q W_K^T x'``: the circuit is that of the projections."""
        return _factored(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self):
        """``W_V[h] W_O[h]`` per head (``[head, d_model, d_model]``, factored)."""
        return _factored(self.W_V, self.W_O)


_MLA_KV = ("multi-head latent attention computes keys and values from an RMS-normalised latent "
           "(W_kv_b norm(W_kv_a x)), not a linear map of the residual stream; use W_kv_a / W_kv_b and the "
           "hooks hook_kv_latent, hook_k, hook_v")


class MLAViews(TLAbsent):
    """TransformerLens names of :class:`moelens.components.mla.MLAttention`: ``W_Q`` (only without a
    query low-rank path) and ``W_O``; no ``W_K``/``W_V``/``QK``/``OV`` (see ``_tl_absent``)."""

    _tl_absent = {
        **{n: _MLA_KV for n in ("W_K", "W_V", "_W_K", "_W_V", "QK", "OV")},
        "W_Q": "this MLA layer has a query low-rank path with an RMSNorm inside (W_q_b norm(W_q_a x)), "
               "so no linear W_Q exists; use W_q_a / W_q_b and hook_q_latent, hook_q",
    }

    @property
    def W_Q(self) -> Tensor:
        if "w_q" not in self._parameters:
            raise AttributeError("W_Q")
        return _heads_in(self.w_q, self.cfg.n_heads)

    @property
    def W_O(self) -> Tensor:
        return _heads_out(self.w_o, self.cfg.n_heads)

    b_Q = b_K = b_V = b_O = None  # no attention biases in any MLA checkpoint


_DELTANET = ("a Gated DeltaNet layer is a linear-attention mixer with a recurrent state, not softmax "
             "attention: it has no per-head query/key/value/output maps in TransformerLens' sense. Its "
             "weights are W_qkv, W_z, W_a, W_b, W_conv and w_o; see docs/linear_attention.md")


class DeltaNetViews(TLAbsent):
    _tl_absent = {n: _DELTANET for n in ("W_Q", "W_K", "W_V", "W_O", "_W_K", "_W_V", "b_Q", "b_K", "b_V",
                                         "_b_K", "_b_V", "QK", "OV")}
    b_O = None


_COMPRESSED = ("DeepSeek-V4's compressed attention has no per-head query/key/value/output maps in "
               "TransformerLens' sense: queries come through a low-rank path (w_q_a, w_q_b), keys and values are "
               "one shared head over window and compressed entries (w_kv, the compressor), and the output is a "
               "grouped low-rank projection (w_o_a, w_o_b); see docs/models.md (DeepSeek-V4)")


class CompressedViews(TLAbsent):
    _tl_absent = {n: _COMPRESSED for n in ("W_Q", "W_K", "W_V", "W_O", "_W_K", "_W_V", "b_Q", "b_K", "b_V",
                                           "_b_K", "_b_V", "QK", "OV")}
    b_O = None


# The views of the hot modules (attention, experts, dense MLPs) define no ``__getattr__``: parameter
# lookups in the forward stay nn.Module's. ``b_in`` is None everywhere: TransformerLens' gated MLP adds
# it after the product (act(x W_gate) * x W_in + b_in) and no supported architecture has one (gpt-oss's
# expert biases act before the activation: ``experts.b_gate``, ``b_up``).


class GatedMLPViews:
    """TransformerLens' ``GatedMLP`` names of :class:`moelens.components.mlp.GatedMLP`."""

    @property
    def W_in(self) -> Tensor:
        return self.w_up.T

    @property
    def W_gate(self) -> Tensor:
        return self.w_gate.T

    @property
    def W_out(self) -> Tensor:
        return self.w_down.T

    b_in = b_out = None


class ExpertViews:
    """TransformerLens' gated-MLP names of :class:`moelens.components.experts.Experts`, with the
    expert axis first."""

    b_in = None

    @property
    def W_in(self) -> Tensor:
        return self.w_up.transpose(-1, -2)

    @property
    def W_gate(self) -> Tensor:
        return self.w_gate.transpose(-1, -2)

    @property
    def W_out(self) -> Tensor:
        return self.w_down.transpose(-1, -2)

    @property
    def b_out(self) -> Optional[Tensor]:
        return self.b_down


_MOE_MLP = ("a sparse MoE block has no single MLP; its experts have TransformerLens' names with the expert "
            "axis first: mlp.experts.W_in / W_gate [n_experts, d_model, d_expert], W_out [n_experts, d_expert, "
            "d_model] (shared experts: mlp.shared_experts.W_in ...). The router (TransformerLens 2.x's MoE called it "
            "mlp.W_gate [d_model, n_experts]) is mlp.router.W_router [n_experts, d_model]")


class MoEViews(TLAbsent):
    _tl_absent = {n: _MOE_MLP for n in ("W_in", "W_gate", "W_out", "b_in", "b_out")}

    def _absent_reason(self, name: str) -> Optional[str]:
        reason = super()._absent_reason(name)
        if reason is not None and getattr(self.cfg, "parallel_dense_mlp", False):
            reason += (". This block also has a dense MLP in parallel with the MoE (Gemma 4): its TransformerLens "
                       "names are blocks[l].dense_mlp.W_in / W_gate [d_model, d_mlp], W_out [d_mlp, d_model]")
        return reason


_STACKED = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "QK", "OV", "W_in", "W_gate", "W_out", "b_in",
            "b_out")
_ROTARY = "every supported architecture uses rotary position embeddings: there is no positional embedding matrix"


class ModelViews(TLAbsent):
    """Stacked TransformerLens weights of :class:`moelens.HookedMoETransformer`: one entry per layer.

    A stacked name exists when every block has it (the attention biases count as zeros where a
    layer has none, as in TransformerLens' ``HookedTransformer``); otherwise (hybrids: Gated DeltaNet
    layers; MLA: ``W_K``/``W_V``; MoE models: ``W_in``...) it raises ``AttributeError`` naming the
    layers that have it: read ``model.blocks[l].attn.W_Q`` per layer."""

    _tl_absent = {"W_pos": _ROTARY, "W_E_pos": _ROTARY}

    def _absent_reason(self, name: str) -> Optional[str]:
        reason = super()._absent_reason(name)
        if reason is None and name in _STACKED:
            return self.__dict__.pop("_tl_stack_reason", None)
        return reason

    @property
    def W_U(self) -> Tensor:
        return self.unembed.W_U

    def tl_named_parameters(self):
        """``(name, tensor)`` for every weight under its TransformerLens name (``blocks.0.attn.W_Q``,
        ``unembed.W_U``, ``blocks.1.mlp.experts.W_in``, ``blocks.0.ln1.w`` ...), in TransformerLens'
        layout, as TransformerLens 4's ``TransformerBridge.tl_named_parameters``: what
        ``transformer_lens.SVDInterpreter`` reads. Names absent in a layer are left out; biases that are
        None too."""
        yield "embed.W_E", self.W_E
        attn_names = ("W_Q", "W_K", "W_V", "W_O", "_W_K", "_W_V", "b_Q", "b_K", "b_V", "_b_K", "_b_V", "b_O")
        mlp_names = ("W_in", "W_gate", "W_out", "b_in", "b_out")
        def norms(block, names):  # the norms the block has (post-norm blocks: no ln1/ln2; Gemma: both)
            for n in names:
                norm = getattr(block, n, None)
                if norm is not None:
                    yield n, norm.w

        for l, block in enumerate(self.blocks):
            for n, w in norms(block, ("ln1",)):
                yield f"blocks.{l}.{n}.w", w
            for n in attn_names:
                t = getattr(block.attn, n, None)
                if t is not None:
                    yield f"blocks.{l}.attn.{n}", t
            for n, w in norms(block, ("ln1_post", "ln2", "ln2_post_dense", "ln2_moe", "ln2_post_moe", "ln2_post")):
                yield f"blocks.{l}.{n}.w", w
            mlps = [("mlp", block.mlp)]
            if hasattr(block.mlp, "experts"):
                mlps = [("mlp.experts", block.mlp.experts)]
                if hasattr(block.mlp, "shared_experts"):
                    mlps.append(("mlp.shared_experts", block.mlp.shared_experts))
            if getattr(block, "dense_mlp", None) is not None:  # Gemma 4: a dense MLP beside the MoE
                mlps.append(("dense_mlp", block.dense_mlp))
            for prefix, mod in mlps:
                for n in mlp_names:
                    t = getattr(mod, n, None)
                    if t is not None:
                        yield f"blocks.{l}.{prefix}.{n}", t
        yield "ln_final.w", self.ln_final.w
        yield "unembed.W_U", self.W_U
        yield "unembed.b_U", self.b_U

    def tl_parameters(self) -> dict:
        """``dict(tl_named_parameters())``."""
        return dict(self.tl_named_parameters())

    # -- TransformerLens' circuit helpers (also on hybrids: attention layers only) ----------------
    def all_head_labels(self) -> list[str]:
        """``["L0H0", "L0H1", ...]`` for every layer and head (TransformerLens' order)."""
        return [f"L{l}H{h}" for l in range(self.cfg.n_layers) for h in range(self.cfg.n_heads)]

    def _attn_stack(self, names: tuple) -> tuple[list[int], list[Tensor]]:
        """(layers whose attention has all of ``names``, one stacked tensor per name)."""
        layers = [l for l, b in enumerate(self.blocks) if all(hasattr(b.attn, n) for n in names)]
        if not layers:
            raise AttributeError(f"no layer's attention has {', '.join(names)} (see docs/transformer_lens.md)")
        dev = self.embed.W_E.device
        for n in names:
            shapes = {}
            for l in layers:
                shapes.setdefault(tuple(getattr(self.blocks[l].attn, n).shape), []).append(l)
            if len(shapes) > 1:
                by_shape = "; ".join(f"layers {ls}: {list(sh)}" for sh, ls in shapes.items())
                raise AttributeError(f"the layers' attn.{n} differ in shape ({by_shape}), so they cannot be stacked: "
                                     f"read model.blocks[l].attn.QK / OV per layer")
        return layers, [torch.stack([getattr(self.blocks[l].attn, n).to(dev) for l in layers]) for n in names]

    def QK_for_attn_layers(self):
        """``(layers, FactoredMatrix)``: the QK circuits of the layers that have one (TransformerLens 4's
        ``TransformerBridge.QK_for_attn_layers``; on hybrids the Gated DeltaNet layers are left out)."""
        layers, (W_Q, W_K) = self._attn_stack(("W_Q", "W_K"))
        return layers, _factored(W_Q, W_K.transpose(-2, -1))

    def OV_for_attn_layers(self):
        """``(layers, FactoredMatrix)``: the OV circuits of the layers that have one."""
        layers, (W_V, W_O) = self._attn_stack(("W_V", "W_O"))
        return layers, _factored(W_V, W_O)

    def all_composition_scores(self, mode: str):
        """TransformerLens' composition scores of every pair of heads (``mode`` ``"Q"``, ``"K"`` or
        ``"V"``): ``scores[l1, h1, l2, h2]`` is how much head ``(l1, h1)``'s OV output is read by the
        Q / K / V input of head ``(l2, h2)``, zero unless ``l1 < l2``. Returns TransformerLens'
        ``CompositionScores`` (a tensor with ``layer_indices`` and ``head_labels``); on hybrids only
        the attention layers take part (``layer_indices`` maps positions to layers)."""
        from transformer_lens import utilities
        from transformer_lens.model_bridge.composition_scores import CompositionScores

        if mode not in ("Q", "K", "V"):
            raise ValueError(f"mode must be one of ['Q', 'K', 'V'] not {mode}")
        layers, (W_Q, W_K, W_V, W_O) = self._attn_stack(("W_Q", "W_K", "W_V", "W_O"))
        left = _factored(W_V, W_O)
        qk = _factored(W_Q, W_K.transpose(-2, -1))
        right = {"Q": qk, "K": qk.T, "V": left}[mode]
        scores = utilities.composition_scores(left, right, broadcast_dims=True)
        idx = torch.arange(len(layers), device=scores.device)
        mask = idx[:, None, None, None] < idx[None, None, :, None]
        scores = torch.where(mask, scores, torch.zeros_like(scores))
        labels = [f"L{l}H{h}" for l in layers for h in range(self.cfg.n_heads)]
        return CompositionScores(scores=scores, layer_indices=layers, head_labels=labels)

    @property
    def b_U(self) -> Tensor:
        return self.unembed.b_U

    def _stack(self, module: str, name: str, zeros_shape: Optional[tuple] = None) -> Tensor:
        pieces, missing, why = [], [], ""
        for l, block in enumerate(self.blocks):
            try:
                t = getattr(getattr(block, module), name)
            except AttributeError as exc:
                missing.append(l)
                why = why or f" ({exc})"
                continue
            if t is None:
                if zeros_shape is None:
                    missing.append(l)
                    continue
                ref = self.embed.W_E
                shape = zeros_shape(block) if callable(zeros_shape) else zeros_shape
                t = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
            pieces.append(t)
        if not missing:
            shapes = {}
            for l, p in enumerate(pieces):
                shapes.setdefault(tuple(p.shape), []).append(l)
            if len(shapes) > 1:
                by_shape = "; ".join(f"layers {ls}: {list(sh)}" for sh, ls in shapes.items())
                self.__dict__["_tl_stack_reason"] = (
                    f"the layers' {module}.{name} differ in shape ({by_shape}; e.g. Gemma 4's full-attention layers "
                    f"have their own head width and kv heads), so there is no stacked [n_layers, ...] tensor: "
                    f"read model.blocks[l].{module}.{name} per layer"
                )
                raise AttributeError(name)
        if missing:
            have = [l for l in range(len(self.blocks)) if l not in missing]
            # Python replaces this message by __getattr__'s: keep it for _absent_reason
            self.__dict__["_tl_stack_reason"] = (
                f"blocks {missing} have no {module}.{name}{why}. TransformerLens stacks one per layer"
                + (f"; the layers that have it are {have}: read model.blocks[l].{module}.{name} for those" if have else "")
            )
            raise AttributeError(name)
        dev = pieces[0].device
        return torch.stack([p.to(dev) for p in pieces])

    def _head_bias(self, name: str) -> Tensor:
        # zeros of the layer's own head width where a layer has no bias (the weights' shapes agree, or
        # the caller has raised already)
        return self._stack("attn", name, zeros_shape=lambda b: (self.cfg.n_heads, getattr(b.attn, "d_head", self.cfg.d_head_qk)))

    @property
    def W_Q(self) -> Tensor:
        return self._stack("attn", "W_Q")

    @property
    def W_K(self) -> Tensor:
        return self._stack("attn", "W_K")

    @property
    def W_V(self) -> Tensor:
        return self._stack("attn", "W_V")

    @property
    def W_O(self) -> Tensor:
        return self._stack("attn", "W_O")

    @property
    def b_Q(self) -> Tensor:
        self._stack("attn", "W_Q")  # absent where W_Q is
        return self._head_bias("b_Q")

    @property
    def b_K(self) -> Tensor:
        self._stack("attn", "W_K")
        return self._head_bias("b_K")

    @property
    def b_V(self) -> Tensor:
        self._stack("attn", "W_V")
        return self._stack("attn", "b_V", zeros_shape=lambda b: (self.cfg.n_heads, getattr(b.attn, "d_head", self.cfg.d_head_v)))

    @property
    def b_O(self) -> Tensor:
        return self._stack("attn", "b_O", zeros_shape=(self.cfg.d_model,))

    def _keep_reason(self, exc: AttributeError) -> None:
        # a stacked name built from others (QK, OV): keep why its parts are absent for _absent_reason
        self.__dict__["_tl_stack_reason"] = str(exc)

    @property
    def QK(self):
        try:
            return _factored(self.W_Q, self.W_K.transpose(-2, -1))
        except AttributeError as exc:
            self._keep_reason(exc)
            raise

    @property
    def OV(self):
        try:
            return _factored(self.W_V, self.W_O)
        except AttributeError as exc:
            self._keep_reason(exc)
            raise

    @property
    def W_in(self) -> Tensor:
        return self._stack("mlp", "W_in")

    @property
    def W_gate(self) -> Tensor:
        return self._stack("mlp", "W_gate")

    @property
    def W_out(self) -> Tensor:
        return self._stack("mlp", "W_out")

    @property
    def b_in(self) -> Tensor:
        self._stack("mlp", "W_in")  # absent where W_in is
        return self._stack("mlp", "b_in", zeros_shape=(self.cfg.d_mlp,))

    @property
    def b_out(self) -> Tensor:
        self._stack("mlp", "W_out")  # absent where W_out is
        return self._stack("mlp", "b_out", zeros_shape=(self.cfg.d_model,))
