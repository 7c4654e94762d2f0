"""benchmarks/fidelity.py runs and measures what it says (one small config, not timed)."""

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def load():
    spec = importlib.util.spec_from_file_location("fidelity", ROOT / "benchmarks" / "fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fidelity"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_agreement_counts_sets_not_slots():
    f = load()
    a = {1: torch.tensor([[0, 1], [2, 3], [4, 5]])}
    b = {1: torch.tensor([[1, 0], [2, 4], [4, 5]])}
    assert f.agreement(a, b) == (2, 3)


def test_fidelity_row_and_table(capsys):
    f = load()
    assert f.main(["deepseek_v3", "--batch", "2", "--pos", "8"]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if "DeepseekV3ForCausalLM" in line]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].split("|")]
    assert float(cells[3]) < 1e-4  # fp32 max logit error
    assert cells[5].startswith("100.00 %")  # fp32 expert sets identical
    assert f.main(["no_such_config"]) == 2
