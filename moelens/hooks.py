"""Hook points that carry their jaxtyping shape.

Every activation a researcher may want is a :class:`transformer_lens.hook_points.HookPoint`
named by its module path. moelens' hook points additionally declare their shape as a jaxtyping
annotation (``hp.annotation``, e.g. ``Float[Tensor, "batch pos n_experts"]``) using the axis
names of :mod:`moelens.config`. With :func:`check_shapes` enabled, every hooked activation is
checked against that annotation at run time (the test suite runs with it on).

Always (not only under :func:`check_shapes`): a forward hook added to a :class:`ShapedHookPoint`
that returns a tensor must return one of exactly the activation's shape and dtype kind (float stays
float, integer stays integer); otherwise :class:`HookEditError` names the hook, the expected and the
returned shape. A hook's return value replaces the activation, so a ``[b, p, 1]`` edit of
``[b, p, top_k]`` weights would otherwise be broadcast silently by the computation downstream. The
comparison is a tuple compare per hooked call: it costs nothing measurable.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from typing import Iterable, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

_CHECK = {"on": False, "dims": None}


class ShapedHookPoint(HookPoint):
    """An identity :class:`HookPoint` that knows the shape and kind of what flows through it."""

    def __init__(self, dims: str, kind: str = "float"):
        super().__init__()
        self.dims = dims
        self.kind = kind
        self.annotation = (Int if kind == "int" else Float)[Tensor, dims]

    def forward(self, x: Tensor) -> Tensor:
        if _CHECK["on"]:
            _check(self, x)
        return x

    def add_hook(self, hook, dir="fwd", *args, **kwargs):
        """As :meth:`HookPoint.add_hook`; forward hooks' returned tensors are checked (:class:`HookEditError`)."""
        if dir != "fwd":
            return super().add_hook(hook, dir, *args, **kwargs)
        handle = super().add_hook(_checked_hook(self, hook), dir, *args, **kwargs)
        if hasattr(handle, "user_hook"):  # TransformerLens keeps the caller's callable: keep it theirs
            handle.user_hook = hook
        return handle

    def extra_repr(self) -> str:
        return f"{self.kind}[{self.dims}]"


POS_AXES = ("pos", "query_pos")  # the position axis of a hook (attention scores: the query, as TransformerLens)


def pos_dim(hook, ndim: int) -> Optional[int]:
    """The position axis of ``hook``'s activation as a negative index (valid with or without the batch
    axis): from its annotation for a :class:`ShapedHookPoint` (None where the annotation has no
    ``pos`` / ``query_pos`` axis), else TransformerLens' rule (``-3`` for ``hook_q/k/v/z/result``,
    ``-2`` otherwise)."""
    dims = getattr(hook, "dims", None)
    if dims is not None:
        names = dims.split()
        for axis in POS_AXES:
            if axis in names:
                return names.index(axis) - len(names)
        return None  # no position axis (DeepSeek-V4's compressed entries [batch, csa_pos, ...]): kept whole
    if hook.name.endswith(("hook_q", "hook_k", "hook_v", "hook_z", "hook_result")):
        return -3
    return -2


class HookEditError(ValueError):
    """A hook returned a tensor whose shape or dtype kind differs from the activation it replaces."""


def _kind(t: Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    if t.dtype.is_floating_point:
        return "float"
    if t.dtype.is_complex:
        return "complex"
    return "int"


def _checked_hook(hp: "ShapedHookPoint", fn):
    """Wrap a forward hook so that what it returns must match the activation's shape and dtype kind."""

    def checked(act, hook):
        out = fn(act, hook=hook)
        if isinstance(out, Tensor) and isinstance(act, Tensor):
            if out.shape != act.shape:
                raise HookEditError(
                    f"hook {_short_repr(fn)} on {hp.name!r} returned shape {tuple(out.shape)}, "
                    f"expected {tuple(act.shape)} ([{hp.dims}]): a hook must return a tensor of the activation's "
                    f"shape (edit a clone of it; moelens does not broadcast edits)"
                )
            if _kind(out) != _kind(act):
                raise HookEditError(
                    f"hook {_short_repr(fn)} on {hp.name!r} returned a {out.dtype} tensor, expected "
                    f"{_kind(act)} like the activation ({act.dtype}, [{hp.dims}])"
                )
        return out

    # TransformerLens names the registered hook after repr(fn); keep that cheap and informative
    checked.__qualname__ = checked.__name__ = f"checked({_short_repr(fn)})"
    checked.__dict__.update(getattr(fn, "__dict__", {}))  # markers set on the caller's function
    checked.__wrapped__ = fn
    return checked


def _short_repr(fn) -> str:
    import functools

    if isinstance(fn, functools.partial):
        return f"partial({fn.func!r},...)"
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _check(hp: ShapedHookPoint, x: Tensor) -> None:
    dims = _CHECK["dims"] or {}
    names = hp.dims.split()
    if x.ndim != len(names):
        raise AssertionError(f"{hp.name}: expected [{hp.dims}], got shape {tuple(x.shape)}")
    if hp.kind == "int" and x.dtype.is_floating_point:
        raise AssertionError(f"{hp.name}: expected an integer tensor, got {x.dtype}")
    if hp.kind == "float" and not x.dtype.is_floating_point:
        raise AssertionError(f"{hp.name}: expected a float tensor, got {x.dtype}")
    bound = dims.setdefault("__bound__", {})
    for name, size in zip(names, x.shape):
        want = dims.get(name, bound.get(name))
        if name.isdigit():
            want = int(name)
        if want is None:
            bound[name] = size
        elif want != size:
            raise AssertionError(
                f"{hp.name}: axis '{name}' should be {want}, got {size} (shape {tuple(x.shape)}, "
                f"declared [{hp.dims}])"
            )


@contextlib.contextmanager
def check_shapes(model):
    """Within this context every hook point of ``model`` checks its activation's shape.

    Named axes are bound to the model's config (``d_model``, ``n_experts``, ``top_k`` ...);
    ``batch`` and ``pos`` are bound by the first hook that sees them in each forward.
    """
    cfg = model.cfg
    dims = {
        "d_model": cfg.d_model,
        "d_vocab": cfg.d_vocab,
        "head": cfg.n_heads,
        "kv_head": cfg.n_kv_heads if cfg.attention == "gqa" else cfg.n_heads,
        "d_head": cfg.d_head_qk,
        "d_head_full": getattr(cfg, "full_attn_d_head", None) or cfg.d_head_qk,
        "kv_head_full": getattr(cfg, "full_attn_n_kv_heads", None) or cfg.n_kv_heads,
        "d_head_v": cfg.d_head_v,
        "n_experts": cfg.n_experts,
        "top_k": cfg.top_k,
        "d_expert": cfg.d_expert,
        "d_mlp": cfg.d_mlp,
        "d_shared": cfg.d_shared,
        "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank or 0,
        "d_rope": cfg.qk_rope_head_dim,
        "k_head": getattr(cfg, "linear_n_k_heads", 0),
        "v_head": getattr(cfg, "linear_n_v_heads", 0),
        "d_k": getattr(cfg, "linear_d_k", 0),
        "d_v": getattr(cfg, "linear_d_v", 0),
        "d_conv": cfg.linear_d_conv if hasattr(cfg, "linear_d_conv") else 0,
        "index_head": getattr(cfg, "index_n_heads", 0),
        "d_index": getattr(cfg, "index_head_dim", 0),
        "index_topk": getattr(cfg, "index_topk", 0),
        "hc": getattr(cfg, "hc_mult", 1),
    }
    old = dict(_CHECK)
    _CHECK.update(on=True, dims=dims)

    def reset_binding(module, args):
        dims.pop("__bound__", None)

    handle = model.register_forward_pre_hook(reset_binding)
    try:
        yield
    finally:
        handle.remove()
        _CHECK.update(old)


def suggest_hook_names(name: str, names: Iterable[str], n: int = 3, layer: Optional[int] = None,
                       short_names: Optional[dict] = None) -> list[str]:
    """The hook names closest to ``name`` (for typo messages).

    ``name`` may be a full name (``blocks.2.mlp.hook_router_logit``), a tail (``mlp_outt``) or a short
    name; when it names a layer (or ``layer`` is given) only that layer's hooks are suggested.
    ``short_names`` (``{"router_logits": "blocks.{layer}.mlp.hook_router_logits", ...}``) are matched
    too and, with a layer, suggested as full names."""
    names = list(names)
    m = re.match(r"blocks\.(\d+)\.(.*)", name)
    if m:
        layer, tail = int(m.group(1)), m.group(2)
    else:
        tail = name
    # every way of writing each candidate -> the candidate
    aliases: dict[str, str] = {}
    for full in names:
        fm = re.match(r"blocks\.(\d+)\.(.*)", full)
        if fm and layer is not None and int(fm.group(1)) != layer:
            continue
        t = fm.group(2) if fm else full
        for a in (full, t, t.split(".")[-1], t.split(".")[-1].removeprefix("hook_")):
            aliases.setdefault(a, full)
    for short, template in (short_names or {}).items():
        if "{layer}" in template:
            full = template.format(layer=layer) if layer is not None else short
        else:
            full = template
        if full in names or full == short:
            aliases.setdefault(short, full)
    out: list[str] = []
    for a in difflib.get_close_matches(tail, list(aliases), n=4 * n, cutoff=0.6):
        if aliases[a] not in out:
            out.append(aliases[a])
    return out[:n]


def unknown_hook_error(name: str, names: Iterable[str], layer: Optional[int] = None,
                       short_names: Optional[dict] = None) -> KeyError:
    close = suggest_hook_names(name, names, layer=layer, short_names=short_names)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return KeyError(
        f"No hook point named {name!r}.{hint} List them with `model.hook_dict.keys()` "
        f"(hook names are documented in docs/concepts.md)."
    )


def has_hooks(hp: Optional[HookPoint]) -> bool:
    """Whether anything (a user hook or a caching hook) is attached to ``hp``."""
    return hp is not None and bool(hp._forward_hooks)
