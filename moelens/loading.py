"""Resolving checkpoints (local hub-layout directories or hub ids) and streaming safetensors weights.

Weights are read tensor by tensor with ``safetensors.safe_open`` and copied straight into the
model's parameters (already allocated in the target dtype and device), so peak host memory is the
model plus one tensor. Pickle checkpoints (``.bin``/``.pt``) are refused: never unpickle.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import safe_open
from torch import nn

from moelens.architectures.base import Architecture

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")


class CheckpointError(ValueError):
    """The checkpoint does not fit the model: missing/unexpected keys, shapes, formats."""


def bundled_models() -> dict[str, Path]:
    """Short names of the models shipped inside the package."""
    root = Path(__file__).parent / "bundled"
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / CONFIG).is_file()}


def resolve(name_or_path: str | os.PathLike, weights: bool = True) -> Path:
    """A local directory holding the checkpoint: a path, a bundled model's short name, or a hub id
    fetched through ``huggingface_hub`` (honours ``HF_HUB_OFFLINE`` and the local cache).
    ``weights=False`` fetches only config and tokenizer files (for ``device="meta"``)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / CONFIG).is_file():
            raise FileNotFoundError(
                f"{path} has no config.json: expected a directory laid out as on the Hugging Face hub "
                f"(config.json, model.safetensors or model.safetensors.index.json + shards, tokenizer files)."
            )
        return path
    bundled = bundled_models()
    if str(name_or_path) in bundled:
        return bundled[str(name_or_path)]
    if path.exists():
        raise FileNotFoundError(f"{path} is a file, not a checkpoint directory")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path)) or str(name_or_path).startswith((".", "/")):
        raise FileNotFoundError(
            f"No such checkpoint directory: {path} (and not a hub id 'org/name' nor a bundled model: "
            f"{', '.join(bundled) or 'none'})"
        )
    from huggingface_hub import snapshot_download

    try:
        patterns = ["*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]
        local = snapshot_download(str(name_or_path), allow_patterns=patterns + (["*.safetensors"] if weights else []))
    except Exception as exc:  # network errors, offline misses, unknown repos
        raise FileNotFoundError(
            f"Could not resolve {str(name_or_path)!r}: not a local directory, not a bundled model "
            f"({', '.join(bundled) or 'none'}), and the hub lookup failed ({type(exc).__name__}: {exc}). "
            f"With HF_HUB_OFFLINE=1 the model must already be in the local hub cache."
        ) from exc
    return Path(local)


def read_config(directory: Path) -> dict:
    with open(directory / CONFIG) as f:
        return json.load(f)


def checkpoint_files(directory: Path) -> dict[str, list[str]]:
    """``{shard file: [keys]}`` from the index, or the single ``model.safetensors``."""
    if (directory / INDEX).is_file():
        with open(directory / INDEX) as f:
            weight_map = json.load(f)["weight_map"]
        files: dict[str, list[str]] = defaultdict(list)
        for key, fname in weight_map.items():
            files[fname].append(key)
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise CheckpointError(f"{directory}: shards named in {INDEX} are missing: {', '.join(missing)}")
        return dict(files)
    if (directory / SINGLE).is_file():
        with safe_open(directory / SINGLE, framework="pt") as f:
            return {SINGLE: list(f.keys())}
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    if shards:
        out = {}
        for s in shards:
            with safe_open(directory / s, framework="pt") as f:
                out[s] = list(f.keys())
        return out
    pickles = [n for n in PICKLE_NAMES if (directory / n).exists()] + [p.name for p in directory.glob("*.bin")]
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle weights ({', '.join(sorted(set(pickles)))}). moelens never "
            f"unpickles checkpoints: convert them to safetensors first, e.g. "
            f"`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)` "
            f"in a trusted environment."
        )
    raise CheckpointError(f"{directory} has no model.safetensors, no {INDEX} and no *.safetensors shards")


class _Plan:
    """Which moelens parameter (slice) each checkpoint key fills."""

    def __init__(self, arch: Architecture, params: dict[str, nn.Parameter], tied: bool):
        self.arch = arch
        self.params = params
        self.tied = tied
        self.rules = [(r, r.regex()) for r in arch.key_rules]
        self.ignored = [re.compile(p) for p in arch.ignored_keys]
        self.skip = [re.compile(p) for p in getattr(arch, "skip_keys", ())]
        self.prefixes = tuple(getattr(arch, "key_prefixes", ()))
        self.skipped: list[str] = []
        self.filled: dict[str, set] = defaultdict(set)

    def is_skipped(self, key: str) -> bool:
        """Keys of the architecture's ``skip_keys`` (full match): not part of the model built."""
        if any(p.fullmatch(key) for p in self.skip):
            self.skipped.append(key)
            return True
        return False

    def rename(self, key: str) -> str:
        for old, new in self.prefixes:
            if key.startswith(old):
                return new + key[len(old):]
        return key

    def targets(self, key: str) -> Optional[list[tuple[str, Optional[int], Optional[tuple[int, int]]]]]:
        """[(param name, expert index or None, (half, of) split or None)], [] if ignored, None if unknown."""
        if any(p.match(key) for p in self.ignored) or (self.tied and key == "lm_head.weight"):
            return []
        for rule, rx in self.rules:
            m = rx.match(key)
            if not m:
                continue
            fmt = lambda s: s.replace("{L}", m.groupdict().get("L") or "")
            if rule.op == "copy":
                return [(fmt(rule.dst), None, None)]
            if rule.op == "expert":
                return [(fmt(rule.dst), int(m.group("E")), None)]
            if rule.op == "split":
                return [(fmt(rule.dst[0]), None, (0, 2)), (fmt(rule.dst[1]), None, (1, 2))]
            if rule.op == "convert":
                return [(fmt(d), None, ("convert", rule.convert, i)) for i, d in enumerate(rule.dst)]
        return None


@torch.no_grad()
def load_weights(model: nn.Module, directory: Path, arch: Architecture, tied: bool, progress: bool = False) -> None:
    """Stream every tensor of the checkpoint into ``model``; raise on any mismatch."""
    params = dict(model.named_parameters())
    plan = _Plan(arch, params, tied)
    files = checkpoint_files(directory)
    unexpected, shape_errors = [], []
    iterator: Iterable = files.items()
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(list(iterator), desc="loading shards", unit="shard")
    for fname, keys in iterator:
        with safe_open(directory / fname, framework="pt", device="cpu") as f:
            for key in keys:
                if plan.is_skipped(key):
                    continue
                targets = plan.targets(plan.rename(key))
                if targets is None or any(t[0] not in params for t in targets):
                    unexpected.append(key)
                    continue
                for name, expert, split in targets:
                    if split is not None and split[0] == "convert":
                        _convert_into(params[name], f.get_slice(key), key, name, split, shape_errors, plan,
                                      getattr(model, "cfg", None))
                        continue
                    _copy_into(params[name], f.get_slice(key), key, name, expert, split, shape_errors, plan)
    if plan.skipped:
        print(f"moelens: skipped {len(plan.skipped)} checkpoint tensors that are not part of the {arch.name} "
              f"model built ({_skip_summary(plan.skipped)})", file=sys.stderr)
    if shape_errors:
        raise CheckpointError("Shape mismatch between checkpoint and config:\n  " + "\n  ".join(shape_errors))
    missing = _missing(params, plan)
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing (no checkpoint key fills these moelens parameters): {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected checkpoint keys (nothing in the {arch.name} key map takes them): {_short(unexpected)}")
        raise CheckpointError(
            f"{directory}: checkpoint does not match the config.\n  " + "\n  ".join(parts)
            + "\n  Check that config.json belongs to these weights (layers, experts, tied embeddings)."
        )


def _copy_into(param, tensor_slice, key, name, expert, split, errors, plan) -> None:
    shape = tuple(tensor_slice.get_shape())
    if split is not None:
        half, of = split
        want = (param.shape[0], param.shape[1] * of, *param.shape[2:])
        if shape != want:
            errors.append(f"{key}: checkpoint shape {shape}, expected {want} (fused gate|up for {name})")
            return
        n = param.shape[1]
        src = tensor_slice[:, half * n : (half + 1) * n]
        dest, tag = param, "all"
    elif expert is not None:
        if expert >= param.shape[0]:
            errors.append(f"{key}: expert index {expert} >= n_experts {param.shape[0]}")
            return
        dest, tag, src = param[expert], expert, None
        if shape != tuple(dest.shape):
            errors.append(f"{key}: checkpoint shape {shape}, expected {tuple(dest.shape)} (for {name}[{expert}])")
            return
    else:
        dest, tag, src = param, "all", None
        if shape != tuple(param.shape):
            errors.append(f"{key}: checkpoint shape {shape}, expected {tuple(param.shape)} (for {name})")
            return
    if src is None:
        src = tensor_slice[:]
    if tag in plan.filled[name]:
        raise CheckpointError(f"{key}: {name}{'' if tag == 'all' else f'[{tag}]'} is filled twice by the checkpoint")
    dest.copy_(src.to(device=dest.device, dtype=dest.dtype))
    plan.filled[name].add(tag)


def _skip_summary(keys: list[str]) -> str:
    """``mtp.* x12, model.visual.* x40``: the skipped keys grouped by their first two name parts."""
    groups: dict[str, int] = defaultdict(int)
    for k in keys:
        parts = k.split(".")
        groups[".".join(parts[:2 if parts[0] == "model" else 1]) + ".*"] += 1
    return ", ".join(f"{g} x{n}" for g, n in groups.items())


def _convert_into(param, tensor_slice, key, name, split, errors, plan, cfg) -> None:
    _, convert, index = split
    try:
        value = convert(tensor_slice[:], cfg)[index]
    except RuntimeError as exc:  # a reshape that does not fit the config
        errors.append(f"{key}: shape {tuple(tensor_slice.get_shape())} does not fit the config ({exc}) (for {name})")
        return
    if tuple(value.shape) != tuple(param.shape):
        errors.append(f"{key}: converted shape {tuple(value.shape)}, expected {tuple(param.shape)} (for {name})")
        return
    if "all" in plan.filled[name]:
        raise CheckpointError(f"{key}: {name} is filled twice by the checkpoint")
    param.copy_(value.to(device=param.device, dtype=param.dtype))
    plan.filled[name].add("all")


def _missing(params: dict, plan: _Plan) -> list[str]:
    out = []
    for name, p in params.items():
        got = plan.filled.get(name, set())
        if "all" in got:
            continue
        if name.split(".")[-1] in ("W_gate", "W_up", "W_down") and ".experts." in name and got:
            lacking = sorted(set(range(p.shape[0])) - got)
            if lacking:
                out.append(f"{name}[experts {lacking[:8]}{'...' if len(lacking) > 8 else ''}]")
            continue
        out.append(name)
    return out


def _short(items: list[str], n: int = 12) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_tokenizer(directory: Path):
    """The checkpoint's transformers tokenizer, or None when the directory has no tokenizer files."""
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any((directory / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))
