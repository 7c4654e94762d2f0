"""Port of TransformerLens' ``tests/unit/test_tokenizer_padding_side.py`` (TransformerLensOrg/
TransformerLens, branch ``dev-4.x`` at commit 596e584846982c940b1418bc165d61d7c58e9eca): a padding
side the user set on a tokenizer survives handing the tokenizer to the model (TransformerLens
issue #801: reloading the tokenizer reset it to "right").

Changed: TransformerLens tests its helper ``get_tokenizer_with_bos`` (which ``set_tokenizer`` calls)
on GPT-2's tokenizer; moelens' ``set_tokenizer`` never reloads the tokenizer (it prepends BOS
itself), so the port tests ``model.set_tokenizer`` with the bundled tokenizer directly: the
padding side is kept, the tokenizer object is the one given, and ``to_tokens`` pads on that side.
"""

import pytest
from transformers import AutoTokenizer

from moelens import loading


@pytest.fixture(scope="module")
def bundled_tokenizer_dir():
    return str(loading.resolve("moelens-tiny-facts"))


def test_padding_side_left_is_preserved(model, bundled_tokenizer_dir):
    """User-set padding_side='left' must be preserved through set_tokenizer()."""
    tokenizer = AutoTokenizer.from_pretrained(bundled_tokenizer_dir)
    tokenizer.padding_side = "left"
    model.set_tokenizer(tokenizer)
    result = model.tokenizer
    assert result.padding_side == "left", f"padding_side='left' was reset to '{result.padding_side}' after set_tokenizer"
    tokens = model.to_tokens(["Tel Mor plays the", "Tel"])
    assert tokens[1, 0] == tokenizer.pad_token_id and tokens[1, -1] != tokenizer.pad_token_id  # padded on the left


def test_padding_side_preserved_when_already_has_bos(model, bundled_tokenizer_dir):
    """A tokenizer that already adds BOS is used as given (no reload), so padding_side is kept."""
    tokenizer = AutoTokenizer.from_pretrained(bundled_tokenizer_dir)
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id  # this tokenizer adds BOS itself
    tokenizer.padding_side = "left"
    model.set_tokenizer(tokenizer)
    assert model.tokenizer is tokenizer
    assert model.tokenizer.padding_side == "left"
