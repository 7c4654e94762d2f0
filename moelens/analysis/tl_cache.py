"""What makes TransformerLens' ``ActivationCache`` analysis methods work on a moelens cache.

Mixed into :class:`moelens.MoEActivationCache`. The inherited methods (``accumulated_resid``,
``decompose_resid``, ``stack_head_results``, ``apply_ln_to_stack``, ``logit_attrs``,
``stack_activation``) read ``cfg.normalization_type`` / ``attn_only``, the norms' ``hook_scale``,
``model.tokens_to_residual_directions`` and ``model.accumulated_bias``, all of which moelens
provides. Overridden here, with TransformerLens' signatures:

* ``__getitem__``: short keys for the MoE hooks (``cache["expert_indices", 2]``);
* ``compute_head_results``: per-head results ``z_h @ W_O[h]`` from ``hook_z`` and ``attn.W_O``
  (``[head, d_head_v, d_model]``), times the output gate where the attention has one;
* ``decompose_resid(..., expert_level=True)``: one component per (layer, expert), plus shared experts;
* ``get_full_resid_decomposition``: heads, then per layer dense neurons (``L{l}N{n}``) or, for a
  sparse layer, its experts (``L{l}E{e}``, ``L{l}_shared``), then ``embed`` and ``bias``.

The final norm's weight: ``apply_ln_to_stack`` divides by the cached scale only (TransformerLens'
convention), and ``model.tokens_to_residual_directions`` folds ``ln_final.w`` into the unembedding
direction, so ``logit_attrs`` components sum to the logits. ``accumulated_resid(apply_ln=True)``
at the final layer calls ``model.ln_final`` itself (weight included), so its last entry times
``model.W_U`` (``[d_model, d_vocab]``, as in TransformerLens) is the logits.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from transformer_lens.utilities import Slice, get_act_name

# short name -> path inside a block (TransformerLens' get_act_name would put these at blocks.{l}.hook_*)
MOE_SHORT_KEYS = {
    "router_logits": "mlp.hook_router_logits",
    "router_scores": "mlp.hook_router_scores",
    "expert_indices": "mlp.hook_expert_indices",
    "expert_weights": "mlp.hook_expert_weights",
    "expert_out": "mlp.hook_expert_out",
    "routed_out": "mlp.hook_routed_out",
    "shared_out": "mlp.hook_shared_out",
    "shared_gate": "mlp.hook_shared_gate",
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
}


def _as_slice(s) -> Slice:
    return s if isinstance(s, Slice) else Slice(s)


class TLAnalysisMixin:
    """TransformerLens analysis methods made to work (and extended with an expert axis)."""

    # ------------------------------------------------------------------ keys
    def __getitem__(self, key) -> Tensor:
        if isinstance(key, tuple) and key and isinstance(key[0], str) and key[0] in MOE_SHORT_KEYS:
            name, layer = key[0], key[1] if len(key) > 1 else None
            if layer is None:
                raise KeyError(f"cache[{key!r}]: give a layer, e.g. cache[{name!r}, 0]")
            n = self.model.cfg.n_layers
            layer = n + layer if layer < 0 else layer
            full = f"blocks.{layer}.{MOE_SHORT_KEYS[name]}"
            if full not in self.cache_dict:
                raise KeyError(f"{full} is not in this cache (short key {key!r})")
            return self.cache_dict[full]
        try:
            return super().__getitem__(key)
        except KeyError:
            found = self._find_short_key(key)
            if found is None:
                raise
            return self.cache_dict[found]

    def _find_short_key(self, key) -> Optional[str]:
        """``(name, layer)`` -> the one cached ``blocks.{layer}.….hook_{name}`` (e.g. MLA's
        ``("kv_latent", 1)`` -> ``blocks.1.attn.hook_kv_latent``); None when absent or ambiguous."""
        if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str) and isinstance(key[1], int)):
            return None
        name, layer = key
        layer = self.model.cfg.n_layers + layer if layer < 0 else layer
        prefix, suffix = f"blocks.{layer}.", f"hook_{name}"
        if get_act_name(name, layer) != prefix + suffix:  # TransformerLens placed it (attn./mlp.): no guessing
            return None
        hits = [k for k in self.cache_dict if k.startswith(prefix) and (k == prefix + suffix or k.endswith("." + suffix))]
        return hits[0] if len(hits) == 1 else None

    # ------------------------------------------------------------------ heads
    def _head_results(self, layer: int) -> Optional[Tensor]:
        """``[batch, pos, head, d_model]``: each head's output ``z_h @ W_O[h]`` (times the output
        gate where the attention has one), without ``b_O``; None where the layer has no per-head
        split (linear-attention mixers, or a gate that was not cached)."""
        key = f"blocks.{layer}.attn.hook_result"
        if key in self.cache_dict:
            return self.cache_dict[key]
        attn = self.model.blocks[layer].attn
        z = self.cache_dict.get(f"blocks.{layer}.attn.hook_z")
        W_O = getattr(attn, "W_O", None)  # [head, d_head_v, d_model]; absent for linear-attention mixers
        if z is None or W_O is None or z.shape[-2:] != W_O.shape[:2]:
            return None
        gate = self.cache_dict.get(f"blocks.{layer}.attn.hook_attn_gate")
        if gate is not None:
            z = z * gate
        elif getattr(attn, "W_G", None) is not None:
            return None
        # W_O has Granite's residual multiplier folded in (it scales the attention update)
        result = torch.einsum("...hd,hdm->...hm", z, W_O.to(z.device, z.dtype))
        post = self.model.blocks[layer].ln1_post
        if post is not None:  # post-norm (FlexOlmo): each head through the norm at the run's scale
            scale = self.cache_dict.get(f"blocks.{layer}.ln1_post.hook_scale")
            if scale is None or getattr(attn, "b_O", None) is not None:
                return None
            result = (result.float() / scale.float().unsqueeze(-2) * post.scale_weight.float()).to(result.dtype)
        self.cache_dict[key] = result
        return self.cache_dict[key]

    def _ensure_head_results(self) -> bool:
        """Per-head results ``blocks.{l}.attn.hook_result`` ``[batch, pos, head, d_model]`` from
        ``hook_z`` and ``attn.W_O`` ``[head, d_head_v, d_model]``."""
        cached = all(f"blocks.{l}.attn.hook_result" in self.cache_dict for l in range(self.model.cfg.n_layers))
        for l in range(self.model.cfg.n_layers):
            self._head_results(l)
        return cached

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice=None, apply_ln: bool = False, _target: Optional[int] = None):
        """TransformerLens' ``stack_head_results``: every head (``L{l}H{h}``) of the layers before
        ``layer``. A layer without a per-head split (a linear-attention mixer) contributes its whole
        ``hook_attn_out`` (less ``b_O``) as one component ``"{l}_attn_out"``."""
        pos_slice = _as_slice(pos_slice)
        cfg = self.model.cfg
        if layer is None or layer == -1:
            layer = cfg.n_layers
        pieces, labels = [], []
        for l in range(layer):
            r = self._head_results(l)
            if r is not None:
                pieces.append(pos_slice.apply(r, dim=-3).movedim(-2, 0))
                labels += [f"L{l}H{h}" for h in range(cfg.n_heads)]
            else:
                out = pos_slice.apply(self[f"blocks.{l}.hook_attn_out"], dim=-2)
                b_O = getattr(self.model.blocks[l].attn, "b_O", None)
                if b_O is not None:
                    out = out - b_O.to(out.device, out.dtype)
                pieces.append(out[None])
                labels.append(f"{l}_attn_out")
        ref = pos_slice.apply(self["hook_embed"], dim=-2)
        if pieces:
            components = torch.cat([p.to(ref.device) for p in pieces])
            components = self._scale_components(components, labels, layer if _target is None else _target)
        else:
            components = torch.zeros(0, *ref.shape, dtype=ref.dtype, device=ref.device)
        if incl_remainder:
            total = ref if layer == 0 else pos_slice.apply(self[f"blocks.{layer - 1}.hook_resid_post"], dim=-2)
            components = torch.cat([components, (total.to(components.device) - components.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            components = self.apply_ln_to_stack(components, layer, pos_slice=pos_slice)
        return (components, labels) if return_labels else components

    # ------------------------------------------------------------------ expert pieces
    def _expert_stack(self, layer: int, pos_slice: Slice) -> Tensor:
        """``[n_experts, *batch_pos, d_model]``: each expert's weighted update (0 where not routed)."""
        idx = pos_slice.apply(self[f"blocks.{layer}.mlp.hook_expert_indices"], dim=-2)
        from moelens.components.moe import combine_weights

        w = combine_weights(self.model.cfg, pos_slice.apply(self[f"blocks.{layer}.mlp.hook_expert_weights"], dim=-2))
        out = pos_slice.apply(self[f"blocks.{layer}.mlp.hook_expert_out"], dim=-3)
        weighted = (out * w.unsqueeze(-1)).to(out.dtype)
        n_exp = self.model.cfg.n_experts
        dense = torch.zeros(*idx.shape[:-1], n_exp, out.shape[-1], dtype=out.dtype, device=out.device)
        dense.scatter_add_(-2, idx.unsqueeze(-1).expand(*idx.shape, out.shape[-1]), weighted)
        return self._through_post_norm(layer, dense, pos_slice, -2).movedim(-2, 0)

    def _through_post_norm(self, layer: int, x: Tensor, pos_slice: Slice, axis: int, moe: bool = True) -> Tensor:
        """A part of block ``layer``'s FFN output carried through its post-norm(s) at the run's scale
        (what it adds to the residual stream); unchanged without a post-norm. In a parallel block
        (Gemma 4) a part of the MoE output (``moe=True``) first goes through the MoE branch's own
        post-norm ``ln2_post_moe``. ``axis``: where the component axis of ``x`` sits (the scales have none)."""
        block = self.model.blocks[layer]
        if getattr(block, "parallel", False) and moe:
            s2 = pos_slice.apply(self[f"blocks.{layer}.ln2_post_moe.hook_scale"], dim=-2).unsqueeze(axis)
            w2 = block.ln2_post_moe.scale_weight.float().to(x.device)
            x = (x.float() / s2.float().to(x.device) * w2).to(x.dtype)
        if block.ln2_post is None:
            return x
        scale = pos_slice.apply(self[f"blocks.{layer}.ln2_post.hook_scale"], dim=-2).unsqueeze(axis)
        return block.post_mlp_linear(x, scale)

    def _downstream_factors(self, target: int) -> Optional[Tensor]:
        """``f[l] = prod_{k=l}^{target-1} s_k`` (``[target + 1]``, fp32, CPU) for the layer scalars
        ``s_k`` of Gemma 4 (each block's output is ``s_k (resid_mid + mlp_out)``), so that a component
        written by layer ``l`` (the embedding: ``l = 0``) reaches the residual stream entering
        ``target`` times ``f[l]``; None where no block has a layer scalar."""
        blocks = self.model.blocks
        if getattr(blocks[0], "layer_scalar", None) is None:
            return None
        f = torch.ones(target + 1)
        for k in reversed(range(target)):
            f[k] = f[k + 1] * float(blocks[k].layer_scalar.detach().float().reshape(()))
        return f

    def _scale_components(self, stack: Tensor, labels: list, target: int) -> Tensor:
        """Each component times the layer scalars between its layer and ``target`` (identity without)."""
        f = self._downstream_factors(target)
        if f is None:
            return stack
        import re

        def layer_of(lab: str) -> int:
            m = re.match(r"^L?(\d+)", lab)
            return min(int(m.group(1)), target) if m else (0 if lab in ("embed", "pos_embed") else target)

        factors = torch.tensor([float(f[layer_of(lab)]) for lab in labels], dtype=torch.float32)
        shape = (-1,) + (1,) * (stack.ndim - 1)
        return (stack.float() * factors.to(stack.device).view(shape)).to(stack.dtype)

    def _mlp_pieces(self, layer: int, pos_slice: Slice, expert_level: bool):
        """(stack ``[n, *batch_pos, d_model]``, labels) for block ``layer``'s MLP output."""
        cfg = self.model.cfg
        if not expert_level or layer not in cfg.moe_layers:
            return pos_slice.apply(self[f"blocks.{layer}.hook_mlp_out"], dim=-2)[None], [f"{layer}_mlp_out"]
        stack = self._expert_stack(layer, pos_slice)
        labels = [f"L{layer}E{e}" for e in range(cfg.n_experts)]
        if getattr(self.model.blocks[layer], "parallel", False):  # Gemma 4: the dense branch, after its norms
            dense = self._through_post_norm(
                layer, pos_slice.apply(self[f"blocks.{layer}.hook_dense_out"], dim=-2)[None], pos_slice, 0, moe=False)
            stack = torch.cat([stack, dense.to(stack.device, stack.dtype)])
            labels.append(f"L{layer}_dense")
        if cfg.has_shared_experts:
            shared = self._through_post_norm(
                layer, pos_slice.apply(self[f"blocks.{layer}.mlp.hook_shared_out"], dim=-2)[None], pos_slice, 0)
            stack = torch.cat([stack, shared.to(stack.device, stack.dtype)])
            labels.append(f"L{layer}_shared")
        return stack, labels

    # ------------------------------------------------------------------ decompositions
    def accumulated_resid(self, layer=None, incl_mid=False, apply_ln=False, pos_slice=None, mlp_input=False,
                          return_labels=False):
        """TransformerLens' ``accumulated_resid``. On a model with several residual streams
        (DeepSeek-V4) the states are ``[*, hc, d_model]`` and ``apply_ln=True`` raises: the final norm
        reads the streams collapsed by ``hc_head`` with weights computed from the final streams, so
        there is no normalised single residual per layer (use ``decompose_resid()`` for the final one)."""
        if apply_ln and getattr(self.model.cfg, "hc_mult", 1) > 1:
            raise ValueError(
                "accumulated_resid(apply_ln=True) on a model with several residual streams (DeepSeek-V4): each "
                "layer's state is hc streams, which only the final hc_head collapses; use decompose_resid() "
                "(contributions to the final collapsed residual, with apply_ln) or apply_ln=False (stream states)"
            )
        return super().accumulated_resid(layer=layer, incl_mid=incl_mid, apply_ln=apply_ln, pos_slice=pos_slice,
                                         mlp_input=mlp_input, return_labels=return_labels)

    def decompose_resid(
        self,
        layer: Optional[int] = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice=None,
        incl_embeds: bool = True,
        return_labels: bool = False,
        expert_level: bool = False,
    ):
        """TransformerLens' ``decompose_resid``; with ``expert_level=True`` each sparse layer's
        ``mlp_out`` is split into one component per routed expert (``"L{l}E{e}"``, its
        ``expert_contribution``) plus ``"L{l}_shared"`` (shared experts, where the architecture has
        them); dense layers stay ``"{l}_mlp_out"``. The components sum to the residual stream
        entering ``layer`` (``hook_resid_mid`` of ``layer`` with ``mlp_input``; the final residual
        stream when ``layer`` is None). A cache without ``hook_embed`` (left out by a ``names_filter``)
        raises unless ``incl_embeds=False`` (TransformerLens would leave the embedding out silently,
        and the components would no longer sum to the residual stream)."""
        if incl_embeds and "hook_embed" not in self.cache_dict:
            raise KeyError(
                "decompose_resid(incl_embeds=True) needs 'hook_embed', which is not in this cache (a names_filter "
                "left it out); cache it, or pass incl_embeds=False to leave the embedding out of the components"
            )
        if getattr(self.model.cfg, "hc_mult", 1) > 1:  # DeepSeek-V4: several residual streams
            return self._decompose_streams(layer, mlp_input, mode, apply_ln, pos_slice, incl_embeds, return_labels,
                                           expert_level)
        if not expert_level:
            target = self.model.cfg.n_layers if layer is None or layer == -1 else layer
            if self._downstream_factors(target) is None:
                return super().decompose_resid(
                    layer=layer, mlp_input=mlp_input, mode=mode, apply_ln=apply_ln, pos_slice=pos_slice,
                    incl_embeds=incl_embeds, return_labels=return_labels,
                )
            components, labels = super().decompose_resid(
                layer=layer, mlp_input=mlp_input, mode=mode, apply_ln=False, pos_slice=pos_slice,
                incl_embeds=incl_embeds, return_labels=True,
            )
            components = self._scale_components(components, labels, target)
            if apply_ln:
                components = self.apply_ln_to_stack(components, layer, pos_slice=pos_slice, mlp_input=mlp_input)
            return (components, labels) if return_labels else components
        pos_slice = _as_slice(pos_slice)
        cfg = self.model.cfg
        if layer is None or layer == -1:
            layer = cfg.n_layers
        if mode not in ("all", "mlp", "attn"):
            raise ValueError(f"mode must be 'all', 'mlp' or 'attn', got {mode!r}")
        pieces, labels = [], []
        if incl_embeds and self.has_embed:
            pieces.append(pos_slice.apply(self["hook_embed"], dim=-2)[None])
            labels.append("embed")
        for l in range(layer):
            if mode != "mlp":
                pieces.append(pos_slice.apply(self[f"blocks.{l}.hook_attn_out"], dim=-2)[None])
                labels.append(f"{l}_attn_out")
            if mode != "attn":
                stack, lab = self._mlp_pieces(l, pos_slice, expert_level=True)
                pieces.append(stack)
                labels += lab
        if mlp_input and mode != "mlp":
            pieces.append(pos_slice.apply(self[f"blocks.{layer}.hook_attn_out"], dim=-2)[None])
            labels.append(f"{layer}_attn_out")
        device = pieces[0].device
        components = self._scale_components(torch.cat([p.to(device) for p in pieces]), labels, layer)
        if apply_ln:
            components = self.apply_ln_to_stack(components, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (components, labels) if return_labels else components

    def _decompose_streams(self, layer, mlp_input, mode, apply_ln, pos_slice, incl_embeds, return_labels,
                           expert_level):
        """DeepSeek-V4 (:mod:`moelens.analysis.hyper_decompose`): ``layer=None`` gives each component's
        contribution to the final collapsed residual (``[n, *batch_pos, d_model]``, summing to
        ``hc_head.hook_collapsed``; ``apply_ln`` divides by ``ln_final.hook_scale``, so logit
        attributions sum to the logits); ``layer=l`` the stream-resolved contributions
        ``[n, *batch_pos, hc, d_model]`` to the streams entering block ``l``."""
        from moelens.analysis.hyper_decompose import stream_components

        final = layer is None or layer == -1
        if apply_ln and not final:
            raise ValueError(
                "decompose_resid(layer=l, apply_ln=True) on a model with several residual streams: block l's norm reads "
                "the streams collapsed by its own hyper-connection, not one residual; use layer=None (the final "
                "collapsed residual) for normalised components"
            )
        components, labels = stream_components(self, layer, mlp_input, mode, pos_slice, incl_embeds, expert_level)
        if apply_ln:
            components = self.apply_ln_to_stack(components, None, pos_slice=pos_slice)
        return (components, labels) if return_labels else components

    def get_full_resid_decomposition(
        self,
        layer: Optional[int] = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice=None,
        return_labels: bool = False,
        project_output_onto: Optional[Tensor] = None,
    ):
        """TransformerLens' full decomposition of the residual stream entering ``layer``: every
        attention head (``L{l}H{h}``), then per block either the dense MLP's neurons (``L{l}N{n}``)
        or a sparse layer's experts (``L{l}E{e}`` and ``L{l}_shared``) when ``expand_neurons``, else
        ``{l}_mlp_out``; then ``embed`` and ``bias`` (accumulated output biases). With
        ``mlp_input`` the heads of ``layer`` itself are included. ``project_output_onto``
        (``[d_model]`` or ``[d_model, k]``) projects each component (before stacking, so the
        ``d_model`` stack is never built)."""
        cfg = self.model.cfg
        if getattr(cfg, "hc_mult", 1) > 1:
            raise ValueError(
                "get_full_resid_decomposition on DeepSeek-V4 (several residual streams, grouped output projection): "
                "use decompose_resid(expert_level=True), whose components are carried through the cached mixing weights"
            )
        if layer is None or layer == -1:
            layer = cfg.n_layers
        pos_slice = _as_slice(pos_slice)
        proj = project_output_onto
        squeeze = proj is not None and proj.ndim == 1
        if squeeze:
            proj = proj[:, None]

        def finish(stack: Tensor) -> Tensor:
            if apply_ln:
                stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
            if proj is not None:
                stack = stack @ proj.to(stack.device, torch.promote_types(stack.dtype, proj.dtype))
            return stack

        pieces, labels = [], []
        heads, head_labels = self.stack_head_results(
            layer + (1 if mlp_input else 0), pos_slice=pos_slice, return_labels=True, _target=layer
        )
        factors = self._downstream_factors(layer)

        def scaled(stack: Tensor, l: int) -> Tensor:  # Gemma 4's layer scalars between layer l and `layer`
            return stack if factors is None else (stack.float() * float(factors[l])).to(stack.dtype)
        pieces.append(finish(heads))
        labels += head_labels
        for l in range(layer):
            if expand_neurons and l not in cfg.moe_layers:
                post = pos_slice.apply(self[f"blocks.{l}.mlp.hook_post"], dim=-2)
                w_down = self.model.blocks[l].mlp.w_down.to(post.device, post.dtype)  # [d_model, d_mlp]
                if proj is not None and not apply_ln:
                    wp = w_down.T @ proj.to(post.device, post.dtype)  # [d_mlp, k]
                    neur = scaled((post[..., None] * wp).movedim(-2, 0), l)
                else:
                    neur = finish(scaled((post[..., None] * w_down.T).movedim(-2, 0), l))
                pieces.append(neur)
                labels += [f"L{l}N{n}" for n in range(post.shape[-1])]
            else:
                stack, lab = self._mlp_pieces(l, pos_slice, expert_level=expand_neurons)
                pieces.append(finish(scaled(stack, l)))
                labels += lab
        if self.has_embed:
            pieces.append(finish(scaled(pos_slice.apply(self["hook_embed"], dim=-2)[None], 0)))
            labels.append("embed")
        bias = self.model.accumulated_bias(layer, mlp_input, include_mlp_biases=True)
        ref = pos_slice.apply(self["hook_embed"], dim=-2)
        bias_stack = bias.to(ref.device, ref.dtype).expand(*ref.shape)[None]
        pieces.append(finish(bias_stack))
        labels.append("bias")
        device = pieces[0].device
        out = torch.cat([p.to(device) for p in pieces])
        if squeeze:
            out = out.squeeze(-1)
        return (out, labels) if return_labels else out

    def stack_neuron_results(self, layer: int, *args, **kwargs):
        """TransformerLens' per-neuron stack; defined for dense layers only (a sparse layer has no
        single hidden layer: use ``decompose_resid(expert_level=True)`` or
        ``get_full_resid_decomposition()``, whose sparse-layer components are experts)."""
        n = self.model.cfg.n_layers
        upto = n if layer is None or layer == -1 else layer
        sparse = [l for l in self.model.cfg.moe_layers if l < upto]
        if sparse:
            raise ValueError(
                f"stack_neuron_results(layer={layer}) would include sparse layers {sparse}, which have no single "
                "MLP hidden layer; use cache.get_full_resid_decomposition() (experts as components) or "
                "cache.decompose_resid(expert_level=True)"
            )
        return super().stack_neuron_results(layer, *args, **kwargs)

    def _get_cached_ln_scale(self, layer, mlp_input, pos_slice, batch_slice=None):
        """TransformerLens' lookup of the norm scale ``apply_ln_to_stack`` divides by; a scale that is
        not cached raises a ``KeyError`` naming the hook (TransformerLens' own error path indexes
        ``model.blocks[n_layers]`` for the final norm and raises an ``IndexError``)."""
        n = self.model.cfg.n_layers
        if layer is None or layer == n:
            key = "ln_final.hook_scale"
        else:
            key = f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
            if getattr(self.model.blocks[layer], "ln2" if mlp_input else "ln1") is None:
                # a post-norm block (FlexOlmo) reads the residual stream unnormalised: scale 1
                return torch.ones(1, device=self["hook_embed"].device)
        if key not in self.cache_dict:
            raise KeyError(
                f"{key} is not in this cache: apply_ln_to_stack / logit_attrs / apply_ln=True divide by the "
                f"cached norm scale; keep it in the run_with_cache names_filter"
            )
        return super()._get_cached_ln_scale(layer, mlp_input, pos_slice, batch_slice)

    def apply_slice_to_batch_dim(self, batch_slice):
        sliced = super().apply_slice_to_batch_dim(batch_slice)
        new = type(self)(sliced.cache_dict, self.model, has_batch_dim=sliced.has_batch_dim)
        tokens = getattr(self, "tokens", None)
        if tokens is not None:
            bs = _as_slice(batch_slice)
            new.tokens = bs.apply(tokens, dim=0)
            if new.tokens.ndim == 1:
                new.tokens = new.tokens[None]
        mask = getattr(self, "attention_mask", None)
        if mask is not None:
            new.attention_mask = _as_slice(batch_slice).apply(mask, dim=0)
            if new.attention_mask.ndim == 1:
                new.attention_mask = new.attention_mask[None]
        new.pos_slice, new.positions = getattr(self, "pos_slice", None), getattr(self, "positions", None)
        return new


def final_scale(cache, pos_slice=None) -> Tensor:
    """``ln_final.hook_scale`` with ``pos_slice`` applied."""
    return _as_slice(pos_slice).apply(cache["ln_final.hook_scale"], dim=-2)


__all__ = ["TLAnalysisMixin", "MOE_SHORT_KEYS", "final_scale"]
