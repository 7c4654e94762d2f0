"""benchmarks/gpu_check.py runs with --small on the CPU and writes the JSON fields docs/gpu.md names."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMED = ("forward", "cache_all", "generate_per_token", "expert_sweep_per_expert", "trace_experts")
RUNNERS = ("transformers", "moelens", "moelens_packed")


def load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod
    spec.loader.exec_module(mod)
    return mod


def check_record(rec: dict, fmt: str) -> None:
    assert "error" not in rec, rec.get("traceback")
    assert rec["config"]["packed_format"] == fmt and rec["config"]["packed_tensors"] > 0
    p = rec["parity"]
    # bf16 parity with transformers: rounding-level logit differences, the same experts chosen
    assert 0 <= p["max_abs_logit_diff"] < 0.1 * max(p["max_abs_logit"], 1.0)
    assert p["expert_set_agreement"] >= 0.9 and isinstance(p["greedy_tokens_equal"], bool)
    assert rec["packed"]["bit_identical_same_impl"] is True
    assert rec["host_syncs_per_forward"]["count"] == 0  # the GPU code path, counted on the CPU
    rb = rec["resident_bytes"]
    assert rb["moelens_packed"] < 0.8 * rb["moelens_dequantised"]
    assert rb["moelens_packed"] <= 1.1 * rec["checkpoint_bytes"][fmt]
    for what in TIMED:
        row = rec["times_s"][what]
        assert set(row) == set(RUNNERS)
        assert all(row[r] is None or row[r] > 0 for r in RUNNERS) and row["moelens"] > 0
    assert set(rec["peak_memory"]) >= {"moelens_load", "moelens_packed_load", "moelens_forward", "transformers_forward"}


def test_small_run_on_cpu_writes_the_fields(tmp_path):
    g = load()
    out = tmp_path / "check.json"
    result = g.main(["--small", "--device", "cpu", "--out", str(out), "--models", "olmoe-1b-7b"])
    written = json.loads(out.read_text())
    assert written["models"].keys() == result["models"].keys() == {"olmoe-1b-7b"}
    assert written["device_type"] == "cpu" and written["small"] is True and written["dtype"] == "bfloat16"
    assert {"torch", "transformers", "started_utc", "elapsed_s", "workload"} <= set(written)
    check_record(written["models"]["olmoe-1b-7b"], "fp8")


def test_unknown_model_is_refused(tmp_path):
    g = load()
    with pytest.raises(SystemExit, match="unknown models"):
        g.main(["--small", "--device", "cpu", "--out", str(tmp_path / "x.json"), "--models", "mixtral"])


@pytest.mark.slow
def test_small_run_of_every_model(tmp_path):
    g = load()
    out = tmp_path / "check.json"
    g.main(["--small", "--device", "cpu", "--out", str(out)])
    written = json.loads(out.read_text())
    assert list(written["models"]) == list(g.MODELS)
    for name, rec in written["models"].items():
        check_record(rec, g.MODELS[name][3])


def test_real_width_configs_build_in_both_libraries():
    """The GPU run's configs (presets cut to 2-4 layers) build in transformers and moelens alike
    (on the meta device: same parameter count), so the first GPU run does not fail on a config."""
    import torch
    import transformers

    from moelens import HookedMoETransformer

    g = load()
    for name, (_, _, layers, _) in g.MODELS.items():
        cfg = g.hf_config_for(name, small=False)
        with torch.device("meta"):
            hf = transformers.AutoModelForCausalLM.from_config(cfg)
        ours = HookedMoETransformer.from_config(cfg.to_dict(), device="meta")
        assert ours.cfg.n_layers == layers and ours.cfg.d_model >= 1024, name
        assert ours.n_params() == sum(p.numel() for p in hf.parameters()), name
