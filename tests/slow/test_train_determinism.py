"""Rerunning scripts/train_bundled_model.py reproduces the shipped bundled model bit for bit.

Takes about as long as the training itself (a few minutes on 2 CPU threads). Bit-identity is
expected on the kind of machine the shipped files were made on (same torch/transformers/tokenizers
versions, x86-64 CPU); other CPUs or library versions may legitimately change float rounding.
JSON files are compared as data without their ``transformers_version`` field, which
``save_pretrained`` sets to the installed version (every other field, and every other file, must
match exactly).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import moelens

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "train_bundled_model.py"
BUNDLED = Path(moelens.__file__).parent / "bundled" / "moelens-tiny-facts"


VERSION_FIELDS = ("transformers_version",)


def same_file(a: Path, b: Path) -> bool:
    """Byte equality, except that JSON files are compared as data without VERSION_FIELDS."""
    if a.read_bytes() == b.read_bytes():
        return True
    if a.suffix != ".json":
        return False
    da, db = json.loads(a.read_text()), json.loads(b.read_text())
    if not (isinstance(da, dict) and isinstance(db, dict)):
        return False
    return ({k: v for k, v in da.items() if k not in VERSION_FIELDS}
            == {k: v for k, v in db.items() if k not in VERSION_FIELDS})


def test_comparison_ignores_only_the_transformers_version(tmp_path):
    shipped = BUNDLED / "config.json"
    cfg = json.loads(shipped.read_text())
    other = tmp_path / "config.json"
    other.write_text(json.dumps({**cfg, "transformers_version": "99.0.0"}, indent=2))
    assert same_file(shipped, other)
    other.write_text(json.dumps({**cfg, "transformers_version": "99.0.0", "hidden_size": cfg["hidden_size"] + 1}))
    assert not same_file(shipped, other)
    weights = tmp_path / "model.safetensors"
    data = (BUNDLED / "model.safetensors").read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert not same_file(BUNDLED / "model.safetensors", weights)


@pytest.mark.slow
def test_rerun_gives_bit_identical_files(tmp_path):
    out = tmp_path / "moelens-tiny-facts"
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True, timeout=3600)
    shipped = sorted(p.name for p in BUNDLED.iterdir() if p.is_file())
    rebuilt = sorted(p.name for p in out.iterdir() if p.is_file())
    assert rebuilt == shipped
    differ = [name for name in shipped if not same_file(BUNDLED / name, out / name)]
    assert differ == []
