"""Fingerprints that keep a resumed or merged `moelens trace` run from mixing results.

* :func:`case_fingerprint`: a content hash of one selected fact record (every field of its
  :class:`~moelens.tracing.cases.FactCase`), stored in each of the case's result lines.
* :func:`model_fingerprint`: the model's identity by content, so that the same checkpoint named by
  path, by bundled name or by hub id is the same model, and another checkpoint in the same place is
  not: a hash of ``config.json`` and of the safetensors files (names, sizes and contents; files over
  256 MiB by 64 evenly spaced 64 KiB samples, which keeps a 60 GB checkpoint to seconds), plus the
  dtype the model runs in.
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
        return display, f"{checkpoint_fingerprint(directory)}-{dtype}"
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return display or "(in-memory model)", f"params:{h.hexdigest()[:16]}-{dtype}"


def facts_identity(source) -> str:
    """An existing path as its absolute resolved path; anything else (a dataset id) as given."""
    if source is None:
        return ""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)
