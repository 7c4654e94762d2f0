"""Port of TransformerLens' ``tests/unit/test_generate_no_tokenizer.py`` (TransformerLensOrg/
TransformerLens, branch ``dev-4.x`` at commit 596e584846982c940b1418bc165d61d7c58e9eca; 4.3.0 runs
the same tests on a native ``TransformerBridge``): ``generate`` on a model without a tokenizer
(TransformerLens issue #483).

Changed: the model, a randomly initialised ``HookedMoETransformer`` of the bundled model's
architecture built from its config (no tokenizer, and no EOS id in the config, as TransformerLens'
``HookedTransformerConfig`` has none); and the error type of the two error tests: TransformerLens
validates with ``assert`` (an ``AssertionError``, gone under ``python -O``), moelens raises a
``ValueError`` whose message says what to pass (docs/transformer_lens.md, "TransformerLens' own tests").
"""

import pytest
import torch

from moelens import HookedMoETransformer


@pytest.fixture(scope="module")
def tokenizer_free_cfg(bundled_tl):
    return bundled_tl.cfg.replace(eos_token_id=None)


def _make_tokenizer_free_model(cfg, device=None) -> HookedMoETransformer:
    """A model with no tokenizer (algorithmic task setup)."""
    return HookedMoETransformer.from_config(cfg, device=device, seed=0)


def test_generate_without_tokenizer_stop_at_eos_false_kv_cache(tokenizer_free_cfg):
    model = _make_tokenizer_free_model(tokenizer_free_cfg)
    assert model.tokenizer is None
    tokens = torch.zeros((1, 5), dtype=torch.long)
    output = model.generate(tokens, max_new_tokens=3, stop_at_eos=False, use_past_kv_cache=True,
                            return_type="tokens", verbose=False)
    assert output.shape == (1, 8), f"Expected shape (1, 8), got {output.shape}"


def test_generate_without_tokenizer_stop_at_eos_false_no_kv_cache(tokenizer_free_cfg):
    model = _make_tokenizer_free_model(tokenizer_free_cfg)
    assert model.tokenizer is None
    tokens = torch.zeros((1, 5), dtype=torch.long)
    output = model.generate(tokens, max_new_tokens=3, stop_at_eos=False, use_past_kv_cache=False,
                            return_type="tokens", verbose=False)
    assert output.shape == (1, 8), f"Expected shape (1, 8), got {output.shape}"


def test_generate_without_tokenizer_explicit_eos_kv_cache(tokenizer_free_cfg):
    model = _make_tokenizer_free_model(tokenizer_free_cfg)
    assert model.tokenizer is None
    tokens = torch.zeros((1, 5), dtype=torch.long)
    output = model.generate(tokens, max_new_tokens=5, stop_at_eos=True, eos_token_id=0, use_past_kv_cache=True,
                            return_type="tokens", verbose=False)
    assert output.shape[0] == 1 and output.shape[1] >= 5


def test_generate_without_tokenizer_explicit_eos_no_kv_cache(tokenizer_free_cfg):
    model = _make_tokenizer_free_model(tokenizer_free_cfg)
    assert model.tokenizer is None
    tokens = torch.zeros((1, 5), dtype=torch.long)
    output = model.generate(tokens, max_new_tokens=5, stop_at_eos=True, eos_token_id=0, use_past_kv_cache=False,
                            return_type="tokens", verbose=False)
    assert output.shape[0] == 1 and output.shape[1] >= 5


def test_generate_without_tokenizer_stop_at_eos_requires_eos_id(tokenizer_free_cfg):
    """generate() must still error when stop_at_eos=True, no eos_token_id, no tokenizer."""
    model = _make_tokenizer_free_model(tokenizer_free_cfg)
    assert model.tokenizer is None
    tokens = torch.zeros((1, 5), dtype=torch.long)
    with pytest.raises(ValueError) as e:  # TransformerLens: AssertionError
        model.generate(tokens, max_new_tokens=3, stop_at_eos=True, return_type="tokens", verbose=False)
    assert "eos_token_id" in str(e.value), f"Unexpected error message: {e.value}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Requires a CUDA device")
def test_generate_cpu_tokens_cuda_model(tokenizer_free_cfg):
    """CPU token input and the model on CUDA must not mix devices (TransformerLens issue #1508)."""
    model = _make_tokenizer_free_model(tokenizer_free_cfg, device="cuda")
    tokens = torch.zeros((1, 5), dtype=torch.long)  # deliberately left on CPU
    output = model.generate(tokens, max_new_tokens=3, stop_at_eos=False, return_type="tokens", verbose=False)
    assert output.shape == (1, 8), f"Expected shape (1, 8), got {output.shape}"
    output = model.generate(tokens, max_new_tokens=3, do_sample=False, stop_at_eos=False, return_type="tokens",
                            verbose=False)
    assert output.shape == (1, 8), f"Expected shape (1, 8), got {output.shape}"


def test_generate_string_input_without_tokenizer_errors(tokenizer_free_cfg):
    """generate() must still error when string input is used without a tokenizer."""
    model = _make_tokenizer_free_model(tokenizer_free_cfg)
    assert model.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):  # TransformerLens: AssertionError
        model.generate("hello", max_new_tokens=3, verbose=False)
