"""Resolving checkpoints (local hub-layout directories or hub ids) and streaming safetensors weights.

Weights are read tensor by tensor with ``safetensors.safe_open`` and copied straight into the
model's parameters (already allocated in the target dtype and device), so peak host memory is the
model plus one tensor. Pickle checkpoints (``.bin``/``.pt``) are refused: never unpickle.
"""

from __future__ import annotations

import contextlib

import json
import logging
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from moelens.architectures.base import Architecture
from moelens.errors import CheckpointError  # noqa: F401  (defined there: moelens.quant.packed raises it too)
from moelens.quant import mxfp4
from moelens.quant.packed import PackSpec, packed_tensors

logger = logging.getLogger("moelens")

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")




@contextlib.contextmanager
def _safe_open(path: Path, **kwargs):
    """``safe_open`` whose errors (a truncated or corrupt file) name the file."""
    try:
        with safe_open(path, **kwargs) as f:
            yield f
    except SafetensorError as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}); it is probably truncated (an interrupted "
            f"download or save) or corrupt: download or save it again"
        ) from exc


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
        for fname, keys in files.items():  # headers only: cheap
            with _safe_open(directory / fname, framework="pt") as f:
                held = set(f.keys())
            absent = [k for k in keys if k not in held]
            if absent:
                raise CheckpointError(
                    f"{directory}: {INDEX} maps {_short(absent, 4)} to {fname}, which does not hold "
                    f"{'it' if len(absent) == 1 else 'them'}: the index does not belong to these shards "
                    f"(download or save the checkpoint again)"
                )
        return dict(files)
    if (directory / SINGLE).is_file():
        with _safe_open(directory / SINGLE, framework="pt") as f:
            return {SINGLE: list(f.keys())}
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    if shards:
        out = {}
        for s in shards:
            with _safe_open(directory / s, framework="pt") as f:
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

    def __init__(self, arch: Architecture, params: dict[str, nn.Parameter], tied: bool, n_layers: Optional[int] = None):
        self.arch = arch
        self.params = params
        self.tied = tied
        self.rules = [(r, r.regex()) for r in arch.key_rules]
        self.ignored = [re.compile(p) for p in arch.ignored_keys]
        self.prefixes = tuple(getattr(arch, "key_prefixes", ()))
        self.filled: dict[str, set] = defaultdict(set)
        self.skip = [(p, re.compile(p.replace("{MTP_LAYER}", r"(?P<mtp_layer>\d+)"))) for p in arch.skip_keys]
        self.n_layers = n_layers
        self.skipped: dict[str, int] = defaultdict(int)

    def describe(self, pattern: str) -> str:
        return pattern.replace("\\..*", ".*").replace("\\.", ".").replace("{MTP_LAYER}", f"{{>={self.n_layers}}}")

    def skipped_by(self, key: str) -> Optional[str]:
        """The ``skip_keys`` pattern that drops ``key`` (counted), or None."""
        for pattern, rx in self.skip:
            m = rx.fullmatch(key)
            if m is None:
                continue
            layer = m.groupdict().get("mtp_layer")
            if layer is not None and (self.n_layers is None or int(layer) < self.n_layers):
                continue
            self.skipped[pattern] += 1
            return pattern
        return None

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
            if rule.op in ("interleaved", "interleaved_t"):  # gpt-oss: gate = even columns, up = odd
                return [(fmt(rule.dst[0]), None, (rule.op, 0)), (fmt(rule.dst[1]), None, (rule.op, 1))]
            if rule.op == "split_t":  # Llama 4: [E, d_model, 2I] bank, gate | up halves -> [E, I, d_model]
                return [(fmt(rule.dst[0]), None, ("split_t", 0)), (fmt(rule.dst[1]), None, ("split_t", 1))]
            if rule.op == "transpose":  # gpt-oss: [E, in, out] bank -> moelens' [E, out, in]
                return [(fmt(rule.dst), None, ("transpose", 0))]
            if rule.op == "convert":
                return [(fmt(d), None, ("convert", rule.convert, i)) for i, d in enumerate(rule.dst)]
        return None


def weight_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint fills: the parameters (tied ones once) and the persistent buffers
    (the DeepSeek-V3 family's ``router.b_correction``, a buffer as in transformers); not the
    non-persistent buffers computed from the config (``rope_inv_freq``)."""
    from moelens.quant.packed import PackedTensor

    out = dict(model.named_parameters())
    for module_name, module in model.named_modules():
        if isinstance(module, PackedTensor):  # packed weights (keep_quantized=True): see packed_tensors
            continue
        for name, b in module.named_buffers(recurse=False):
            if b is not None and name not in module._non_persistent_buffers_set:
                out[f"{module_name}.{name}" if module_name else name] = b
    return out


@torch.no_grad()
def load_weights(model: nn.Module, directory: Path, arch: Architecture, tied: bool, progress: bool = False) -> None:
    """Stream every tensor of the checkpoint into ``model`` (parameters, persistent buffers and
    packed weights); raise on any mismatch."""
    params = weight_tensors(model)
    packed = packed_tensors(model)
    cfg = getattr(model, "cfg", None)
    plan = _Plan(arch, params, tied, n_layers=getattr(cfg, "n_layers", None))
    files = checkpoint_files(directory)
    quant = _quant_format(directory)
    key_file = {k: fname for fname, keys in files.items() for k in keys} if quant is not None else {}
    unexpected, shape_errors = [], []
    iterator: Iterable = files.items()
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(list(iterator), desc="loading shards", unit="shard")
    mx_quant = mxfp4.is_mxfp4(read_config(directory)) if (directory / CONFIG).is_file() else False
    file_of = {k: fname for fname, keys in files.items() for k in keys}
    for fname, keys in iterator:
        with _safe_open(directory / fname, framework="pt", device="cpu") as f:
            for key in keys:
                if plan.skipped_by(key) is not None:
                    continue
                if quant is not None and quant.is_scale(key):
                    if key[: -len("_scale_inv")] not in key_file:
                        unexpected.append(key)
                    continue  # consumed with its weight
                source = None
                base = key[: -len(mxfp4.BLOCKS)] if key.endswith((mxfp4.BLOCKS, mxfp4.SCALES)) else None
                pair = base is not None and base + mxfp4.BLOCKS in file_of and base + mxfp4.SCALES in file_of
                if base is not None and (pair or mx_quant):
                    if not mx_quant:
                        raise CheckpointError(
                            f"{directory}: {key} is an MXFP4-packed tensor but config.json has no "
                            f"quantization_config (quant_method 'mxfp4'); the checkpoint and its config do not match"
                        )
                    if not pair:
                        lacking = base + (mxfp4.SCALES if key.endswith(mxfp4.BLOCKS) else mxfp4.BLOCKS)
                        raise mxfp4.QuantizationError(f"{directory}: {key} has no partner {lacking} in the checkpoint")
                    if key.endswith(mxfp4.SCALES):
                        continue  # read together with its *_blocks partner
                    key = base
                    source = _mxfp4_source(directory, f, fname, key, file_of, plan, params)
                targets = plan.targets(plan.rename(key))
                if targets and any(t[0] in packed for t in targets):  # keep_quantized: copy the packed bytes
                    _fill_packed(packed, targets, key, f, directory, fname, file_of, quant)
                    continue
                if targets is None or any(t[0] not in params for t in targets):
                    unexpected.append(key)
                    continue
                tensor_slice = source
                if source is None:
                    tensor_slice = f.get_slice(key)
                    if quant is not None:
                        tensor_slice = _dequantized(quant, directory, f, key, key_file, params[targets[0][0]].dtype)
                for name, expert, split in targets:
                    if split is not None and split[0] == "convert":
                        _convert_into(params[name], tensor_slice, key, name, split, shape_errors, plan,
                                      getattr(model, "cfg", None))
                        continue
                    _copy_into(params[name], tensor_slice, key, name, expert, split, shape_errors, plan)
    if plan.skipped:
        n = sum(plan.skipped.values())
        what = getattr(arch, "skip_note", "") or "multi-token prediction layers"
        logger.warning(
            f"moelens: skipped {n} checkpoint tensors matching {', '.join(map(plan.describe, plan.skipped))} "
            f"(not part of the {arch.name} decoder: {what})"
        )
    if shape_errors:
        raise CheckpointError("Shape mismatch between checkpoint and config:\n  " + "\n  ".join(shape_errors))
    missing = _missing(params, plan) + [
        f"{name}{'' if lack == ['all'] else f'[experts {lack[:8]}]'} (kept packed)"
        for name, p in packed.items() if (lack := p.missing())
    ]
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


def lm_head_differs_from_embedding(directory: Path, arch: Architecture, dtype: torch.dtype) -> bool:
    """Whether the checkpoint holds both the input embedding and ``lm_head.weight`` and they differ
    (in ``dtype``, the model's). transformers 5 then does **not** tie them even when ``config.json``
    says ``tie_word_embeddings: true`` (``PreTrainedModel.tie_weights``: "both are present in the
    checkpoints with different values, so we will NOT tie them"); :meth:`from_pretrained` follows it."""
    plan = _Plan(arch, {}, tied=False)
    where: dict[str, tuple[str, str]] = {}
    for fname, keys in checkpoint_files(directory).items():
        for key in keys:
            targets = plan.targets(plan.rename(key)) or []
            if len(targets) == 1 and targets[0][0] in ("embed.W_E", "unembed.w_u"):
                where[targets[0][0]] = (fname, key)
    if len(where) < 2:
        return False
    tensors = []
    for name in ("embed.W_E", "unembed.w_u"):
        fname, key = where[name]
        with _safe_open(directory / fname, framework="pt", device="cpu") as f:
            tensors.append(f.get_tensor(key).to(dtype))
    return tensors[0].shape != tensors[1].shape or not torch.equal(tensors[0], tensors[1])


def _mxfp4_source(directory: Path, f, fname: str, key: str, file_of: dict, plan: "_Plan", params: dict):
    """The dequantising view of ``key``'s ``_blocks``/``_scales`` pair, in the target parameter's dtype."""
    scales_file = file_of[key + mxfp4.SCALES]
    targets = plan.targets(key) or []
    dtype = params[targets[0][0]].dtype if targets and targets[0][0] in params else torch.float32
    if scales_file == fname:
        scales = f.get_slice(key + mxfp4.SCALES)
    else:  # scales in another shard: read them whole (they are 1/16 of the blocks)
        with safe_open(directory / scales_file, framework="pt", device="cpu") as g:
            scales = g.get_tensor(key + mxfp4.SCALES)
    return mxfp4.DequantizedSlice(f.get_slice(key + mxfp4.BLOCKS), _AsSlice(scales), key, dtype)


class _AsSlice:
    """A tensor (or safetensors slice) with a safetensors slice's ``get_shape()``."""

    def __init__(self, t):
        self.t = t

    def get_shape(self):
        return list(self.t.get_shape() if hasattr(self.t, "get_shape") else self.t.shape)

    def __getitem__(self, index):
        return self.t[index]


def _copy_expert_ops(param, tensor_slice, key, name, split, errors, plan) -> None:
    """Transposed expert banks (gpt-oss, Llama 4), expert by expert (one expert's matrix in memory at a time)."""
    op, half = split
    shape = tuple(tensor_slice.get_shape())
    e = param.shape[0]
    if op in ("interleaved_t", "split_t"):  # [E, d_model, 2 I] -> w_gate / w_up [E, I, d_model]
        want = (e, param.shape[2], 2 * param.shape[1])
    elif op == "interleaved":  # [E, 2 I] -> b_gate / b_up [E, I]
        want = (e, 2 * param.shape[1])
    else:  # transpose: [E, I, d_model] -> w_down [E, d_model, I]
        want = (e, param.shape[2], param.shape[1])
    if shape != want:
        errors.append(f"{key}: checkpoint shape {shape}, expected {want} (for {name}, transposed {op} layout)")
        return
    if "all" in plan.filled[name]:
        raise CheckpointError(f"{key}: {name} is filled twice by the checkpoint")
    if op == "interleaved":
        param.copy_(tensor_slice[:][:, half::2].to(device=param.device, dtype=param.dtype))
    else:
        for i in range(e):
            src = tensor_slice[i]
            if op == "interleaved_t":
                src = src[:, half::2].T
            elif op == "split_t":
                n = param.shape[1]
                src = src[:, half * n:(half + 1) * n].T
            else:
                src = src.T
            param[i].copy_(src.to(device=param.device, dtype=param.dtype))
    plan.filled[name].add("all")
def packed_specs(directory: Path, arch: Architecture, model: nn.Module, hf_config: dict) -> dict[str, PackSpec]:
    """Which parameters of ``model`` a ``keep_quantized=True`` load keeps packed: every parameter that
    the checkpoint fills from FP8 ``weight`` + ``weight_scale_inv`` keys, or from MXFP4
    ``*_blocks`` / ``*_scales`` pairs (read from the safetensors headers only), except those that
    the key map reshapes or splits on load (e.g. Qwen3.5's gated ``q_proj``, a fused FP8
    ``gate_up_proj``): these are dequantised at load as without ``keep_quantized`` (a warning
    names them). Raises for a plain checkpoint."""
    from moelens.quant.packed import hf_format

    fmt = hf_format(hf_config)
    if fmt is None:
        raise CheckpointError(
            f"{directory}: keep_quantized=True, but config.json declares no FP8 or MXFP4 quantization_config: "
            f"there is nothing to keep packed (load it without keep_quantized)"
        )
    method, block = fmt
    params = dict(model.named_parameters())
    plan = _Plan(arch, params, tied=False, n_layers=getattr(getattr(model, "cfg", None), "n_layers", None))
    keys = {k for ks in checkpoint_files(directory).values() for k in ks}
    if method == "fp8":
        sources = [k[: -len("_scale_inv")] for k in keys if k.endswith("weight_scale_inv")]
        ok_ops = {None}
    else:
        sources = [k[: -len(mxfp4.BLOCKS)] for k in keys if k.endswith(mxfp4.BLOCKS)]
        ok_ops = {"interleaved_t", "transpose"}
    specs: dict[str, PackSpec] = {}
    unpacked: list[str] = []
    for key in sorted(sources):
        if plan.skipped_by(key) is not None:
            continue
        for name, _, split in plan.targets(plan.rename(key)) or []:
            op = split[0] if isinstance(split, tuple) and split and isinstance(split[0], str) else (
                None if split is None else "split")
            if op not in ok_ops:  # reshaped or split on load: this one is dequantised at load as usual
                unpacked.append(f"{name} ({op})")
                continue
            if name in params and params[name].ndim >= 2:
                specs[name] = PackSpec(method, block)
    if unpacked:
        logger.warning(
            f"moelens: keep_quantized=True keeps {len(specs)} tensors packed; {len(unpacked)} quantised tensors fill "
            f"their parameters through a reshaping key-map operation and are dequantised at load instead: "
            f"{_short(unpacked, 6)}"
        )
    return specs


def _fill_packed(packed: dict, targets, key: str, f, directory: Path, fname: str, file_of: dict, quant) -> None:
    """Copy the packed checkpoint tensors of ``key`` (FP8 weight + scales, or an MXFP4 pair) into the
    model's :class:`~moelens.quant.packed.PackedTensor` targets, unchanged."""

    def read(k):
        if file_of[k] == fname:
            return f.get_tensor(k)
        with _safe_open(directory / file_of[k], framework="pt", device="cpu") as g:
            return g.get_tensor(k)

    if key + mxfp4.BLOCKS in file_of:
        blocks, scales = read(key + mxfp4.BLOCKS), read(key + mxfp4.SCALES)
        mxfp4.check_pair(blocks, scales, key)
        for name, _, (op, half) in targets:
            if op == "interleaved_t":  # fused gate|up rows interleaved: gate = even output rows, up = odd
                packed[name].fill(key, blocks[:, half::2].contiguous(), scales[:, half::2].contiguous())
            else:  # transpose: the checkpoint's [E, out, in] blocks are already moelens' [E, out, in]
                packed[name].fill(key, blocks, scales)
        return
    scale_key = quant.scale_key(key) if quant is not None else None
    if scale_key is None or scale_key not in file_of:
        raise CheckpointError(f"{key}: kept packed (keep_quantized=True) but the checkpoint has no {key}_scale_inv")
    q, s = read(key), read(scale_key)
    if q.dtype != torch.float8_e4m3fn:
        from moelens.quant import QuantFormatError

        raise QuantFormatError(f"{key}: has a weight_scale_inv but dtype {q.dtype}, expected float8_e4m3fn")
    block = quant.block_shape(key, q.shape, s.shape)
    (name, expert, _), = targets
    packed[name].fill(key, q, s, index=expert, block=block)


def _quant_format(directory: Path):
    from moelens.quant import checkpoint_format

    return checkpoint_format(read_config(directory))


def _dequantized(quant, directory: Path, f, key: str, key_file: dict, dtype: torch.dtype):
    """The tensor ``key`` as the loader should copy it: FP8 weights with a ``weight_scale_inv``
    sibling dequantised (in ``dtype``), anything else the file's own slice."""
    from moelens.quant.fp8 import DenseSlice, QuantFormatError

    scale_key = quant.scale_key(key)
    if scale_key is None or scale_key not in key_file:
        tensor_slice = f.get_slice(key)
        if tensor_slice.get_dtype() in ("F8_E4M3", "F8_E5M2"):
            raise QuantFormatError(f"{key}: an FP8 tensor without a {key}_scale_inv in the checkpoint")
        return tensor_slice
    if key_file[scale_key] == key_file[key]:
        scales = f.get_tensor(scale_key)
    else:
        with _safe_open(directory / key_file[scale_key], framework="pt", device="cpu") as g:
            scales = g.get_tensor(scale_key)
    return DenseSlice(quant.dequantize(key, f.get_tensor(key), scales, dtype))


def _copy_into(param, tensor_slice, key, name, expert, split, errors, plan) -> None:
    if isinstance(split, tuple) and split and isinstance(split[0], str):
        return _copy_expert_ops(param, tensor_slice, key, name, split, errors, plan)
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


def _convert_into(param, tensor_slice, key, name, split, errors, plan, cfg) -> None:
    _, convert, index = split
    try:
        value = convert(tensor_slice[:], cfg)[index]
    except RuntimeError as exc:  # a reshape that does not fit the config
        shape = tuple(tensor_slice.get_shape()) if hasattr(tensor_slice, "get_shape") else tuple(tensor_slice.shape)
        errors.append(f"{key}: shape {shape} does not fit the config ({exc}) (for {name})")
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
        if name.split(".")[-1] in ("w_gate", "w_up", "w_down") and ".experts." in name and got:
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
