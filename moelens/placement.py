"""Placing one :class:`~moelens.HookedMoETransformer` across several devices (pipeline style).

The model is cut at block granularity: the *placement units* are ``embed``, every
``blocks.{i}``, ``ln_final`` and ``unembed`` (parameter-free modules such as ``hook_embed``
run wherever their input is). A *device map* ``{unit name: device}`` says where each unit's
weights live; each unit computes on its own device, and forward pre-hooks move the unit's
inputs (the residual stream, the :class:`~moelens.components.attention.AttentionContext`
with its ``cos`` / ``sin`` / ``key_mask`` tensors, an optional ``kv_prefix`` tuple, token ids)
to that device first. Only one block runs at a time, so this saves memory, not time.

Typical use (random weights; :meth:`HookedMoETransformer.from_pretrained` does the same steps
with ``device_map=`` once wired in, then streams the checkpoint into the placed parameters)::

    model = HookedMoETransformer.from_config("mixtral-8x7b", device="meta", dtype=torch.bfloat16)
    device_map = infer_device_map(model, {0: "70GiB", 1: "70GiB"})
    materialize(model, device_map)            # allocates each unit on its device (uninitialised)
    attach_device_hooks(model, device_map)    # moves activations between devices

``hook_*`` points, ``run_with_cache`` and hook-based patching work unchanged; cached
activations stay on the device that produced them (pass ``device="cpu"`` to ``run_with_cache``
to gather them in one place before stacking across layers).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

DeviceLike = Union[str, int, torch.device]

__all__ = [
    "placement_units", "unit_sizes", "infer_device_map", "resolve_device_map", "materialize",
    "attach_device_hooks", "remove_device_hooks", "dispatch", "move_to_device", "smallest_gpu_set", "card_budget",
    "GPU_CARDS", "GPU_SETS",
]

_HANDLES_ATTR = "_moelens_device_hook_handles"
_MOVED_ATTR = "_moelens_moved"


# ---------------------------------------------------------------------------------------------- units
def _device(d: DeviceLike) -> torch.device:
    """accelerate-style device names: an int ``i`` means ``cuda:i``."""
    if isinstance(d, torch.device):
        return d
    if isinstance(d, int):
        return torch.device("cuda", d)
    return torch.device(d)


def _device_str(d: DeviceLike) -> str:
    return str(_device(d))


def placement_units(model: nn.Module, no_split: Iterable[str] = ("blocks",)) -> list[str]:
    """Names of the placement units in execution (registration) order.

    A top-level child whose name is in ``no_split`` (a container such as the ``blocks``
    ModuleList) contributes each of its items as a unit, never split further; any other
    top-level child that holds parameters or buffers is one unit. Parameter-free children
    (hook points) are not units.
    """
    no_split = set(no_split)
    units = []
    for name, child in model.named_children():
        if name in no_split:
            units.extend(f"{name}.{sub}" for sub, _ in child.named_children())
        elif any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
            units.append(name)
    return units


def _tied_units(model: nn.Module) -> dict[str, str]:
    """``{unit: unit it must share a device with}`` (tied embeddings: unembed follows embed)."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
        return {"unembed": "embed"}
    return {}


def unit_sizes(
    model: nn.Module, no_split: Iterable[str] = ("blocks",), dtype: Optional[torch.dtype] = None
) -> "OrderedDict[str, int]":
    """Bytes of parameters + buffers of each unit (works on the meta device). A parameter shared
    by two units (tied embeddings) is counted once, in the first; tensors of the root module
    (the RoPE frequency buffer) are counted with the first unit, where :func:`materialize` puts
    them. ``dtype``: size floating point
    tensors as if they were in this dtype (e.g. the dtype the weights will be loaded in)."""
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model, dtype=dtype)
    out = OrderedDict((u, int(sizes.get(u, 0))) for u in placement_units(model, no_split))
    # tensors owned by the root module itself (the RoPE buffer) travel with the first unit
    root = [n for n, _ in model.named_parameters(recurse=False)] + [n for n, _ in model.named_buffers(recurse=False)]
    if out and root:
        first = next(iter(out))
        out[first] += sum(int(sizes.get(n, 0)) for n in root)
    return out


def _parse_memory(max_memory: Mapping[DeviceLike, Union[int, str]]) -> "OrderedDict[str, int]":
    from accelerate.utils import convert_file_size_to_int

    out: "OrderedDict[str, int]" = OrderedDict()
    for dev, mem in max_memory.items():
        name = _device_str(dev)
        if name in out:
            raise ValueError(f"max_memory names device {name!r} twice")
        out[name] = int(convert_file_size_to_int(mem)) if isinstance(mem, str) else int(mem)
    if not out:
        raise ValueError("max_memory is empty: give at least one device, e.g. {0: '70GiB', 1: '70GiB'}")
    return out


# ---------------------------------------------------------------------------------------------- planning
def infer_device_map(
    model: nn.Module,
    max_memory: Mapping[DeviceLike, Union[int, str]],
    no_split: Iterable[str] = ("blocks",),
    *,
    strategy: str = "sequential",
    dtype: Optional[torch.dtype] = None,
) -> "OrderedDict[str, str]":
    """Assign every placement unit to a device, keeping the units' order (a pipeline).

    ``max_memory``: ``{device: budget}`` in the order the devices should be used; devices are
    ints (``0`` = ``"cuda:0"``) or names (``"cuda:1"``, ``"cpu"``, ``"mps"``, ``"meta"``) and
    budgets are bytes or strings (``"70GiB"``, ``"75GB"``). The budget covers the **weights
    only**: leave room for activations yourself (see docs/gpu.md).

    ``strategy``:

    * ``"sequential"`` - fill the first device until the next unit no longer fits, then the next
      (as accelerate's ``infer_auto_device_map``; later devices may stay empty);
    * ``"balanced"`` - cut the pipeline so that each device holds a share of the weights
      proportional to its budget (falls back to ``"sequential"`` if the block granularity makes
      a share overflow its budget).

    Units never move backwards in the device order, tied embeddings put ``unembed`` with
    ``embed``, and a unit larger than every remaining budget raises ``ValueError`` (nothing is
    offloaded to disk). The model may live on the meta device. Sizes are computed with
    ``accelerate.utils.compute_module_sizes`` (in ``dtype`` if given, else each tensor's dtype).
    Returns an ordered ``{unit: device string}``.
    """
    budgets = _parse_memory(max_memory)
    sizes = unit_sizes(model, no_split, dtype=dtype)
    if strategy == "balanced":
        plan = _balanced(sizes, budgets, _tied_units(model))
        if plan is not None:
            return plan
    elif strategy != "sequential":
        raise ValueError(f"strategy must be 'sequential' or 'balanced', got {strategy!r}")
    return _sequential(sizes, budgets, _tied_units(model))


def _sequential(sizes, budgets, tied) -> "OrderedDict[str, str]":
    devices = list(budgets)
    used = dict.fromkeys(devices, 0)
    plan: "OrderedDict[str, str]" = OrderedDict()
    i = 0
    for unit, size in sizes.items():
        if unit in tied and tied[unit] in plan:
            dev = plan[tied[unit]]
            used[dev] += size
            plan[unit] = dev
            continue
        while i < len(devices) and used[devices[i]] + size > budgets[devices[i]]:
            i += 1
        if i == len(devices):
            raise ValueError(_no_fit_message(unit, size, sizes, budgets, used))
        used[devices[i]] += size
        plan[unit] = devices[i]
    return plan


def _balanced(sizes, budgets, tied) -> Optional["OrderedDict[str, str]"]:
    devices = list(budgets)
    total = sum(sizes.values())
    capacity = sum(budgets.values())
    if total > capacity or capacity == 0:
        return None
    # device j owns the slice [bounds[j-1], bounds[j]) of the cumulative weight; a unit goes to the
    # device that owns the midpoint of its own slice
    bounds, acc = [], 0.0
    for dev in devices:
        acc += total * budgets[dev] / capacity
        bounds.append(acc)
    plan: "OrderedDict[str, str]" = OrderedDict()
    used = dict.fromkeys(devices, 0)
    start, j = 0, 0
    for unit, size in sizes.items():
        if unit in tied and tied[unit] in plan:
            dev = plan[tied[unit]]
        else:
            mid = start + size / 2
            while j < len(devices) - 1 and mid >= bounds[j]:
                j += 1
            dev = devices[j]
        start += size
        used[dev] += size
        plan[unit] = dev
    if any(used[d] > budgets[d] for d in devices):
        return None
    return plan


def _no_fit_message(unit, size, sizes, budgets, used) -> str:
    gib = 2**30
    total = sum(sizes.values())
    return (
        f"Cannot place {unit!r} ({size / gib:.2f} GiB): no remaining device has room. The model needs "
        f"{total / gib:.2f} GiB of weights, max_memory offers "
        + ", ".join(f"{d}: {b / gib:.2f} GiB (used {used[d] / gib:.2f})" for d, b in budgets.items())
        + ". Give more memory or more devices, or load in a smaller dtype (moelens does not offload to disk)."
    )


def resolve_device_map(
    model: nn.Module,
    device_map: Union[str, Mapping[str, DeviceLike], DeviceLike],
    max_memory: Optional[Mapping[DeviceLike, Union[int, str]]] = None,
    no_split: Iterable[str] = ("blocks",),
    dtype: Optional[torch.dtype] = None,
) -> "OrderedDict[str, str]":
    """Turn what a user passes as ``device_map`` into a complete ``{unit: device}``.

    * ``"auto"`` / ``"balanced"``: :func:`infer_device_map` with ``strategy="balanced"``;
      ``"sequential"``: with ``strategy="sequential"``. Without ``max_memory``, the budgets are
      accelerate's ``get_max_memory()`` for the visible accelerators (free memory of each GPU);
      if there are none, or the weights do not fit on them, the CPU is added last.
    * a single device (``"cuda:0"``, ``0``, ``torch.device``): every unit there;
    * a dict ``{unit or prefix: device}``: checked to cover every unit; a key may name a whole
      container (``"blocks": 0``) or ``""`` for the whole model.
    """
    units = placement_units(model, no_split)
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "sequential"):
        strategy = "sequential" if device_map == "sequential" else "balanced"
        if max_memory is not None:
            return infer_device_map(model, max_memory, no_split, strategy=strategy, dtype=dtype)
        from accelerate.utils import get_max_memory

        available = get_max_memory()
        accel = OrderedDict((k, v) for k, v in available.items() if k not in ("cpu", "disk"))
        if accel:
            try:
                return infer_device_map(model, accel, no_split, strategy=strategy, dtype=dtype)
            except ValueError:
                pass
        everything = OrderedDict(list(accel.items()) + [("cpu", available.get("cpu", 0))])
        return infer_device_map(model, everything, no_split, strategy="sequential", dtype=dtype)
    if isinstance(device_map, (str, int, torch.device)):
        dev = _device_str(device_map)
        return OrderedDict((u, dev) for u in units)
    if not isinstance(device_map, Mapping):
        raise TypeError(f"device_map must be 'auto', a device or a dict, got {type(device_map).__name__}")
    plan: "OrderedDict[str, str]" = OrderedDict()
    missing = []
    for unit in units:
        match = _longest_prefix(unit, device_map)
        if match is None:
            missing.append(unit)
        else:
            plan[unit] = _device_str(device_map[match])
    if missing:
        raise ValueError(f"device_map does not place {missing} (units: {units})")
    unknown = [k for k in device_map if k != "" and not any(u == k or u.startswith(k + ".") for u in units)]
    if unknown:
        raise ValueError(f"device_map names modules that are not placement units: {unknown} (units: {units})")
    for unit, anchor in _tied_units(model).items():
        if unit in plan and anchor in plan and plan[unit] != plan[anchor]:
            raise ValueError(f"{unit!r} shares its weight with {anchor!r} (tied embeddings): put both on one device")
    return plan


def _unit_of(name: str, plan: Mapping[str, Any]) -> Optional[str]:
    """The unit of ``plan`` that owns parameter/module ``name`` (longest matching prefix)."""
    best = None
    for unit in plan:
        if name == unit or name.startswith(unit + "."):
            if best is None or len(unit) > len(best):
                best = unit
    return best


def _longest_prefix(unit: str, device_map: Mapping) -> Optional[str]:
    best = None
    for key in device_map:
        if key == "" or unit == key or unit.startswith(str(key) + "."):
            if best is None or len(str(key)) > len(str(best)):
                best = key
    return best


# ---------------------------------------------------------------------------------------------- allocation
def materialize(
    model: nn.Module,
    device_map: Mapping[str, DeviceLike],
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Allocate a meta-device model unit by unit on the devices of ``device_map`` (in place).

    Each unit gets ``to_empty(device=...)``: the memory is **uninitialised** (load a checkpoint
    into it, or call ``model.init_weights(seed)``). ``dtype`` first converts the floating point
    parameters and buffers (free on the meta device). Tied embeddings stay one tensor (on
    ``embed``'s device). Tensors owned by the root module (the RoPE frequency buffer) go with
    the first unit; the RoPE frequencies are recomputed in float32 whatever ``dtype`` is.
    ``model.device_map`` records the map. Returns ``model``.
    """
    plan = OrderedDict((k, _device_str(v)) for k, v in device_map.items())
    if not plan:
        raise ValueError("device_map is empty")
    unplaced = [n for n, _ in model.named_parameters() if "." in n and _unit_of(n, plan) is None]
    if unplaced:
        raise ValueError(f"device_map {list(plan)} does not cover parameters {unplaced[:8]}")
    if dtype is not None:
        model.to(dtype)
    tied = _tied_units(model)
    for unit, dev in plan.items():
        module = model.get_submodule(unit)
        if unit == "unembed" and "unembed" in tied and hasattr(model, "embed"):
            # tied embeddings: share embed's (already allocated) tensor instead of allocating a copy
            model.unembed.w_u = model.embed.W_E
            if all(not p.is_meta for p in module.parameters()) and not any(True for _ in module.buffers()):
                continue
        module.to_empty(device=dev, recurse=True)
    if "unembed" in tied and hasattr(model, "unembed") and hasattr(model, "embed"):
        model.unembed.w_u = model.embed.W_E
    first = next(iter(plan.values()))
    for name, p in list(model.named_parameters(recurse=False)):
        model._parameters[name] = nn.Parameter(torch.empty_like(p, device=first), p.requires_grad)
    for name, b in list(model.named_buffers(recurse=False)):
        model._buffers[name] = torch.empty_like(b, device=first)
    cfg = getattr(model, "cfg", None)
    if cfg is not None and "rope_inv_freq" in model._buffers and torch.device(first).type != "meta":
        from moelens.components.rope import rope_frequencies

        # always fp32 (as transformers): a bf16 copy of the frequencies would shift the angles
        model._buffers["rope_inv_freq"] = rope_frequencies(cfg.rope_dim, cfg.rope_theta, cfg.yarn)[0].to(first)
        if "rope_inv_freq_full" in model._buffers:  # Gemma 4's full-attention layers
            model._buffers["rope_inv_freq_full"] = model._full_rope_frequencies().to(first)
    model.device_map = dict(plan)
    return model


# ---------------------------------------------------------------------------------------------- GPU sets
MIB = 1 << 20
# cards by what nvidia-smi reports as total memory (an "80 GB" H100 is 79.6 GiB, a "141 GB" H200 140.4 GiB)
GPU_CARDS = {"H100 80GB": 81559 * MIB, "H200 141GB": 143771 * MIB}
# the sets :func:`smallest_gpu_set` tries, smallest total memory first (one node holds up to 8 cards)
GPU_SETS = (
    (1, "H100 80GB"), (1, "H200 141GB"), (2, "H100 80GB"), (2, "H200 141GB"), (4, "H100 80GB"),
    (4, "H200 141GB"), (8, "H100 80GB"), (8, "H200 141GB"), (16, "H200 141GB"), (32, "H200 141GB"),
)


def card_budget(card_bytes: int, reserve_fraction: float = 0.05, min_reserve: int = 2 << 30) -> int:
    """Weight budget of one card: its memory less a reserve for the CUDA context and activations
    (``reserve_fraction`` of it, at least ``min_reserve``)."""
    return int(card_bytes - max(min_reserve, reserve_fraction * card_bytes))


def smallest_gpu_set(model: nn.Module, sets=GPU_SETS, reserve_fraction: float = 0.05,
                     min_reserve: int = 2 << 30) -> Optional[dict]:
    """The first set of :data:`GPU_SETS` whose cards hold the weights of ``model`` (a meta skeleton
    is enough: packed skeletons count their packed bytes) under a balanced pipeline, each card
    keeping :func:`card_budget`'s reserve. Returns ``{"gpus": "8 x H200 141GB", "n_gpus", "card",
    "budget_per_gpu", "device_map", "bytes_per_gpu"}``, or None when no set fits."""
    sizes = unit_sizes(model)
    for n, card in sets:
        budget = card_budget(GPU_CARDS[card], reserve_fraction, min_reserve)
        try:
            plan = infer_device_map(model, {i: budget for i in range(n)}, strategy="balanced")
        except ValueError:
            continue
        per: "OrderedDict[str, int]" = OrderedDict()
        for unit, dev in plan.items():
            per[dev] = per.get(dev, 0) + sizes[unit]
        return {"gpus": f"{n} x {card}", "n_gpus": n, "card": card, "budget_per_gpu": budget,
                "device_map": dict(plan), "bytes_per_gpu": dict(per)}
    return None


# ---------------------------------------------------------------------------------------------- hooks
def move_to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor it contains on ``device``: tensors, tuples/lists/dicts of them,
    and dataclasses such as ``AttentionContext`` (a moved copy, cached on the original per
    device so that a context shared by all layers is copied once per device and forward)."""
    if isinstance(obj, Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, tuple):
        moved = [move_to_device(o, device) for o in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else tuple(moved)
    if isinstance(obj, list):
        return [move_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        tensors = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        if all(not isinstance(v, Tensor) or v.device == device for v in tensors.values()):
            return obj
        cache = obj.__dict__.setdefault(_MOVED_ATTR, {})
        key = str(device)
        if key not in cache:
            changes = {k: move_to_device(v, device) for k, v in tensors.items() if isinstance(v, (Tensor, tuple, list, dict))}
            cache[key] = dataclasses.replace(obj, **changes)
        return cache[key]
    return obj


def _make_pre_hook(device: torch.device):
    def pre_hook(module, args, kwargs):
        return move_to_device(args, device), move_to_device(kwargs, device)

    return pre_hook


def attach_device_hooks(model: nn.Module, device_map: Mapping[str, DeviceLike]) -> list:
    """Register a forward pre-hook on every unit of ``device_map`` that moves the unit's inputs
    (positional and keyword, including the ``AttentionContext`` and a ``kv_prefix`` tuple) to the
    unit's device. Idempotent: earlier device hooks are removed first. These are plain torch
    hooks, so ``model.reset_hooks()`` (TransformerLens) leaves them in place; remove them with
    :func:`remove_device_hooks`. Returns the handles."""
    remove_device_hooks(model)
    handles = []
    for unit, dev in device_map.items():
        module = model.get_submodule(unit)
        handles.append(module.register_forward_pre_hook(_make_pre_hook(_device(dev)), with_kwargs=True))
    object.__setattr__(model, _HANDLES_ATTR, handles)
    model.device_map = {u: _device_str(d) for u, d in device_map.items()}
    return handles


def remove_device_hooks(model: nn.Module) -> None:
    for h in getattr(model, _HANDLES_ATTR, []) or []:
        h.remove()
    object.__setattr__(model, _HANDLES_ATTR, [])


def dispatch(
    model: nn.Module,
    device_map: Union[str, Mapping[str, DeviceLike], DeviceLike] = "auto",
    max_memory: Optional[Mapping[DeviceLike, Union[int, str]]] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    init: bool = True,
    seed: Optional[int] = None,
) -> nn.Module:
    """Meta-device model -> placed model: :func:`resolve_device_map`, :func:`materialize`,
    ``model.init_weights(seed)`` if ``init`` (random weights; pass ``init=False`` when a
    checkpoint is loaded next), :func:`attach_device_hooks`. Returns the model in eval mode."""
    plan = resolve_device_map(model, device_map, max_memory, dtype=dtype)
    materialize(model, plan, dtype=dtype)
    if init:
        model.init_weights(seed)
    attach_device_hooks(model, plan)
    return model.eval()
