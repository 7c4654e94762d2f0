"""Port of TransformerLens' ``tests/integration/test_generation_compatibility.py`` (TransformerLensOrg/
TransformerLens, branch ``dev-4.x`` at commit 596e584846982c940b1418bc165d61d7c58e9eca): the
``HookedTransformer`` classes ``TestHookedTransformerGenerationModelOutput`` and the
``HookedTransformer`` tests of ``TestGenerationBackwardCompatibility``, plus TransformerLens'
``tests/acceptance/test_generate_batch.py`` (same commit).

Changed: the model (the bundled ``moelens-tiny-facts`` instead of GPT-2) and the prompts (words
its small vocabulary has). Not ported: the ``TransformerBridge`` classes (``hf_generate`` runs
transformers' own ``generate`` on the wrapped HF model; moelens has no wrapped HF model).
"""

import warnings

import pytest
import torch


class TestHookedTransformerGenerationModelOutput:
    """Generation with ModelOutput returns."""

    def test_generate_with_output_logits_returns_modeloutput(self, model):
        """output_logits=True returns a ModelOutput with sequences and logits."""
        prompt = "Tel Mor plays"
        max_new_tokens = 5

        result = model.generate(
            prompt, max_new_tokens=max_new_tokens, do_sample=False, verbose=False, output_logits=True,
            stop_at_eos=False,  # the bundled model says EOS after the fact; TL's GPT-2 prompt never stops
        )

        assert hasattr(result, "sequences"), "Result should have sequences attribute"
        assert hasattr(result, "logits"), "Result should have logits attribute"
        assert isinstance(result.sequences, torch.Tensor), "sequences should be a tensor"
        assert result.sequences.ndim == 2, "sequences should be 2D [batch, pos]"
        assert isinstance(result.logits, tuple), "logits should be a tuple"
        assert len(result.logits) == max_new_tokens, f"logits tuple should have {max_new_tokens} elements"
        for i, logit in enumerate(result.logits):
            assert isinstance(logit, torch.Tensor), f"logits[{i}] should be a tensor"
            assert logit.ndim == 2, f"logits[{i}] should be 2D [batch, vocab]"
            assert logit.shape[0] == result.sequences.shape[0], f"logits[{i}] batch size should match sequences"
            assert logit.shape[1] == model.cfg.d_vocab, f"logits[{i}] vocab size should match model config"

    def test_generate_without_output_logits_returns_normal(self, model):
        prompt = "Tel Mor plays"
        result = model.generate(prompt, max_new_tokens=5, do_sample=False, verbose=False)
        assert isinstance(result, str), "Result should be a string"
        assert len(result) > len(prompt), "Generated text should be longer than prompt"

    def test_generate_output_logits_with_return_type_tokens(self, model):
        prompt = "Jor Sar is"
        max_new_tokens = 3
        result = model.generate(
            prompt, max_new_tokens=max_new_tokens, return_type="tokens", do_sample=False, verbose=False,
            output_logits=True, stop_at_eos=False,
        )
        assert hasattr(result, "sequences"), "Result should have sequences"
        assert hasattr(result, "logits"), "Result should have logits"
        assert isinstance(result.sequences, torch.Tensor), "sequences should be a tensor"
        assert result.sequences.dtype in [torch.long, torch.int, torch.int64], "sequences should be integer tokens"
        assert len(result.logits) == max_new_tokens, "logits should match max_new_tokens"

    def test_return_dict_in_generate_silently_ignored(self, model):
        prompt = "Tel"
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            result = model.generate(prompt, max_new_tokens=2, verbose=False, return_dict_in_generate=True)
            assert len(w) == 0, "return_dict_in_generate should be silently ignored"
        assert isinstance(result, str), "Result should be a string"

    def test_unsupported_hf_flags_trigger_warning(self, model):
        prompt = "Tel"
        with pytest.warns(UserWarning, match="unsupported generation kwargs"):
            result = model.generate(
                prompt, max_new_tokens=2, verbose=False, output_scores=True, output_attentions=True,
            )
        assert isinstance(result, str), "Result should be a string despite warnings"

    def test_logits_consistency_with_forward_pass(self, model):
        """The logits from generate match the greedy choice."""
        prompt = "Tel Mor plays the"
        result = model.generate(prompt, max_new_tokens=1, do_sample=False, verbose=False, output_logits=True)
        first_new_token = result.sequences[0, -1]
        first_logits = result.logits[0][0]
        assert first_logits.argmax() == first_new_token, "Greedy token should match logits argmax"

    def test_output_logits_batch_generation(self, model):
        prompts = ["Tel", "Jor"]
        max_new_tokens = 3
        result = model.generate(prompts, max_new_tokens=max_new_tokens, do_sample=False, verbose=False,
                                output_logits=True)
        assert result.sequences.shape[0] == len(prompts), "Batch dimension should match number of prompts"
        for logit in result.logits:
            assert logit.shape[0] == len(prompts), "Logits batch dimension should match prompts"


class TestGenerationBackwardCompatibility:
    def test_hooked_transformer_basic_generation_unchanged(self, model):
        prompt = "Tel Mor"
        result = model.generate(prompt, max_new_tokens=5, do_sample=False, verbose=False)
        assert isinstance(result, str), "Basic generation should return string"
        assert len(result) > len(prompt), "Generated text should be longer"

    def test_hooked_transformer_return_types_unchanged(self, model):
        prompt = "Tel"
        result_str = model.generate(prompt, max_new_tokens=2, return_type="str", verbose=False, do_sample=False)
        assert isinstance(result_str, str), "return_type='str' should return string"
        result_tokens = model.generate(prompt, max_new_tokens=2, return_type="tokens", verbose=False, do_sample=False)
        assert isinstance(result_tokens, torch.Tensor), "return_type='tokens' should return tensor"
        result_embeds = model.generate(prompt, max_new_tokens=2, return_type="embeds", verbose=False, do_sample=False)
        assert isinstance(result_embeds, torch.Tensor), "return_type='embeds' should return tensor"
        assert result_embeds.ndim == 3, "Embeddings should be 3D"


# ---------------------------------------------------------------- tests/acceptance/test_generate_batch.py
PROMPTS = ["Tel Mor plays the", "The favourite colour of Jor Sar is"]


def test_ht_generate_batch_matches_individual(model):
    """Batched generate() matches one-by-one generate() for left-padded inputs."""
    individual_outputs = [model.generate(p, verbose=False, do_sample=False) for p in PROMPTS]
    batched_outputs = model.generate(PROMPTS, verbose=False, do_sample=False)
    for i, prompt in enumerate(PROMPTS):
        assert individual_outputs[i] == batched_outputs[i], f"Prompt {i} mismatch"


def test_ht_generate_batch_without_kv_cache(model):
    individual_outputs = [model.generate(p, verbose=False, do_sample=False, use_past_kv_cache=False) for p in PROMPTS]
    batched_outputs = model.generate(PROMPTS, verbose=False, do_sample=False, use_past_kv_cache=False)
    for i, prompt in enumerate(PROMPTS):
        assert individual_outputs[i] == batched_outputs[i], f"Prompt {i} mismatch"
