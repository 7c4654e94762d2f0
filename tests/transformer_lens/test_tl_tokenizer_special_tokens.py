"""Port of TransformerLens' ``tests/acceptance/test_tokenizer_special_tokens.py`` (TransformerLensOrg/
TransformerLens, branch ``dev-4.x`` at commit 596e584846982c940b1418bc165d61d7c58e9eca): a model
built from a config with a tokenizer handed to it prepends BOS exactly when asked.

Changed: the tokenizers (the bundled model's byte-level BPE and, in ``tests/data/mixtral_tokenizer``,
Mixtral's SentencePiece-style one, instead of GPT-2's, OPT's and Pythia's from the hub) and the
model (the bundled model's config, its vocabulary widened to fit the tokenizer, instead of a
one-layer ``HookedTransformerConfig``).
"""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from moelens import HookedMoETransformer, loading

TOKENIZERS = {
    "moelens-tiny-facts": lambda: str(loading.resolve("moelens-tiny-facts")),
    "mixtral": lambda: str(Path(__file__).resolve().parent.parent / "data" / "mixtral_tokenizer"),
}


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_d_vocab_from_tokenizer(bundled_tl, name):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS[name]())
    cfg = bundled_tl.cfg.replace(d_vocab=max(bundled_tl.cfg.d_vocab, len(tokenizer)))
    model = HookedMoETransformer.from_config(cfg, tokenizer=tokenizer)
    test_string = "a fish."

    tokens_with_bos = model.to_tokens(test_string)
    tokens_without_bos = model.to_tokens(test_string, prepend_bos=False)

    # Check that the lengths are different by one
    assert tokens_with_bos.shape[-1] == tokens_without_bos.shape[-1] + 1, "BOS Token not added when expected"
    # Check that we don't have BOS when we disable the flag
    assert tokens_without_bos.squeeze()[0] != model.tokenizer.bos_token_id, "BOS token is present when it shouldn't be"
