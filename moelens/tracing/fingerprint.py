"""Fingerprints that keep a resumed or merged `moelens trace` run from mixing results.

* :func:`case_fingerprint`: a content hash of one selected fact record (every field of its
  :class:`~moelens.tracing.cases.FactCase`), stored in each of the case's result lines.
* :func:`model_fingerprint`: the model's identity by content, so that the same checkpoint named by
  path, by bundled name or by hub id is the same model, and another checkpoint in the same place is
  not: a hash of ``config.json`` and of the safetensors files (names, sizes and contents; files over
  256 MiB by 64 evenly spaced 64 KiB samples, which keeps a 60 GB checkpoint to seconds), plus the
  dtype the model runs in and :func:`parameter_checksum` of the weights as loaded (an edit made in
  memory after loading is another model).
* :func:`facts_identity`: where the cases come from (an absolute path, or a dataset id).

:class:`ResumeError` (a ``ValueError``) says in one line what differs and both values.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

SAMPLES, CHUNK, WHOLE = 64, 1 << 16, 256 << 20


class ResumeError(ValueError):
    """An output directory holds results that do not belong to this run (other settings or cases)."""


def case_fingerprint(case) -> str:
    """Content hash of a case's record (all :class:`FactCase` fields)."""
    data = json.dumps(case.to_dict(), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def settings_fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _hash_file(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        if size <= WHOLE:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
            return
        for i in range(SAMPLES):
            f.seek((size - CHUNK) * i // (SAMPLES - 1))
            h.update(f.read(CHUNK))


def checkpoint_fingerprint(directory) -> str:
    """Hash of a checkpoint directory's config.json and safetensors files (large files sampled; see module doc)."""
    directory = Path(directory)
    h = hashlib.sha256()
    h.update((directory / "config.json").read_bytes())
    for path in sorted(directory.glob("*.safetensors")):
        _hash_file(h, path)
    return h.hexdigest()[:16]


def parameter_checksum(model, chunk: int = 1 << 24) -> str:
    """A checksum of every parameter's (and persistent buffer's) values, computed where each parameter lives (no copy of the
    model to the CPU): per parameter, in float64, the plain sum and a sum weighted by a fixed
    pseudo-random function of each element's index, printed to 9 significant digits (so the same
    weights give the same checksum on another device or in another reduction order) and hashed
    with the parameter's name, shape and dtype. Any edit that moves a weight by more than the
    rounding - a knowledge edit of one expert, a steering vector folded into a bias - changes it,
    wherever in the tensor it is (a file hash of the checkpoint does not see an edit made in
    memory)."""
    import torch

    from moelens.loading import weight_tensors

    h = hashlib.sha256()
    with torch.no_grad():
        from moelens.quant.packed import packed_tensors

        # parameters and persistent buffers (the V3 family's correction bias decides the routing), and
        # packed weights (keep_quantized=True): their bytes
        weights = list(weight_tensors(model).items()) + [
            (f"{name}.{b}", t) for name, m in packed_tensors(model).items() for b, t in m._buffers.items()]
        for key, p in sorted(weights, key=lambda kv: kv[0]):
            flat = p.detach().reshape(-1)
            s1 = s2 = 0.0
            for lo in range(0, flat.numel(), chunk):
                x = flat[lo : lo + chunk].double()
                idx = torch.arange(lo, lo + x.numel(), device=x.device, dtype=torch.int64)
                w = ((idx * 2654435761) % 65521).double() / 65521.0 - 0.5
                s1 += float(x.sum())
                s2 += float((x * w).sum())
            h.update(f"{key}{tuple(p.shape)}{p.dtype}:{s1:.9e}:{s2:.9e}".encode())
    return h.hexdigest()[:16]


def model_fingerprint(model, name: Optional[str] = None) -> tuple[str, str]:
    """``(display name, fingerprint)`` of a loaded model. The display name is the bundled model's
    short name when the checkpoint is a bundled one, else ``name`` (or how the model was loaded).
    A model not loaded from a checkpoint directory is fingerprinted by its parameters' values."""
    from moelens import loading

    source = getattr(model, "name_or_path", None)
    dtype = str(next(model.parameters()).dtype)
    display = str(name or source or "")
    directory = None
    if source is not None:
        try:
            directory = Path(os.path.realpath(loading.resolve(source)))
        except (FileNotFoundError, OSError):
            directory = None
    if directory is not None and (directory / "config.json").is_file():
        for short, path in loading.bundled_models().items():
            if Path(os.path.realpath(path)) == directory:
                display = short
        # the files say which checkpoint; the values say whether it was edited in memory since
        return display, f"{checkpoint_fingerprint(directory)}-{dtype}-{parameter_checksum(model)[:8]}"
    return display or "(in-memory model)", f"params:{parameter_checksum(model)}-{dtype}"


def facts_identity(source) -> str:
    """An existing path as its absolute resolved path; anything else (a dataset id) as given."""
    if source is None:
        return ""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)
