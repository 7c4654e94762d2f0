"""The bundled model: moelens equals transformers on it; the audit runs on it (the demo: tests/test_reports.py)."""

import json

import pytest
import torch

from moelens import HookedMoETransformer
from moelens.loading import bundled_models

pytestmark = pytest.mark.skipif("moelens-tiny-facts" not in bundled_models(), reason="bundled model absent")


def test_bundled_model_matches_transformers():
    from transformers import AutoModelForCausalLM

    d = bundled_models()["moelens-tiny-facts"]
    model = HookedMoETransformer.from_pretrained("moelens-tiny-facts")
    hf = AutoModelForCausalLM.from_pretrained(d).eval()
    facts = [json.loads(l) for l in (d / "facts.jsonl").read_text().splitlines()[:16]]
    prompts = [f["requested_rewrite"]["prompt"].format(f["requested_rewrite"]["subject"]) for f in facts]
    tokens, mask = model.tokenize(prompts)
    with torch.no_grad():
        ours = model(tokens, attention_mask=mask)
        theirs = hf(tokens, attention_mask=mask, output_router_logits=True)
    real = mask.bool()
    assert (ours - theirs.logits)[real].abs().max() < 1e-4
    # and the tokenizer agrees with transformers' own tokenizer (BOS added by the tokenizer itself)
    assert model.tokenizer(prompts[0])["input_ids"] == tokens[0][real[0]].tolist()


def test_audit_cli_on_the_bundled_model(tmp_path):
    from moelens.cli import main

    args = ["audit", "--model", "moelens-tiny-facts", "--out", str(tmp_path), "--layers", "1",
            "--n-positions", "3", "--max-tokens", "120", "--no-progress"]
    assert main(args) == 0
    assert (tmp_path / "summary.csv").exists() and (tmp_path / "effects.jsonl").exists()
    assert (tmp_path / "report.html").exists()
    assert main(args) == 0  # resumes: nothing left to do, same summary
