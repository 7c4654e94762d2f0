"""Port of TransformerLens' ``tests/integration/test_tokenization_methods.py`` (TransformerLensOrg/
TransformerLens, branch ``dev-4.x`` at commit 596e584846982c940b1418bc165d61d7c58e9eca; 4.3.0
has only a TransformerBridge version of it, ``tests/integration/model_bridge/test_tokenization_methods.py``,
on the same methods).

Changed: the model (the bundled ``moelens-tiny-facts`` and its 727-token BPE tokenizer instead of
``solu-1l``'s 48262-token one), hence the expected token ids and strings, the context length
(256 instead of 1024), and the lazily set tokenizer (the bundled one on a model built from its
config, instead of GPT-2's on a random ``HookedTransformer``). Every assertion is TransformerLens'.
``get_token_position``'s error is an ``AssertionError`` as in TransformerLens (also a
``ValueError``); its message starts with TransformerLens' text and then names the token and the
prompt's tokens, so the exact-equality check on the message became ``startswith``.
"""

import pytest
import torch
from torch import Size, equal, tensor
from transformers import AutoTokenizer

from moelens import HookedMoETransformer, loading


def test_set_tokenizer_during_initialization(model):
    assert (
        model.tokenizer is not None and model.tokenizer.name_or_path.endswith("moelens-tiny-facts")
    ), "initialized with expected tokenizer"
    assert model.cfg.d_vocab == 727, "expected d_vocab"


def test_set_tokenizer_lazy(model):
    model2 = HookedMoETransformer.from_config(model.cfg)
    original_tokenizer = model2.tokenizer
    assert original_tokenizer is None, "initialize without tokenizer"
    directory = loading.resolve("moelens-tiny-facts")
    model2.set_tokenizer(AutoTokenizer.from_pretrained(str(directory)))
    tokenizer = model2.tokenizer
    assert tokenizer is not None and tokenizer.name_or_path == str(directory), "set tokenizer"
    assert model2.to_single_token(" saxophone") == 703, "single token didn't tokenize properly"
    assert model2.to_string([703]) == " saxophone", "single token didn't detokenize properly"


def test_to_tokens_default(model):
    s = "Hello, world!"
    tokens = model.to_tokens(s)
    assert equal(
        tokens, tensor([[1, 75, 349, 47, 272, 259, 111, 103, 36]])
    ), "creates a tensor of tokens with BOS"


def test_to_tokens_without_bos(model):
    s = "Hello, world!"
    tokens = model.to_tokens(s, prepend_bos=False)
    assert equal(tokens, tensor([[75, 349, 47, 272, 259, 111, 103, 36]])), "creates a tensor without BOS"


@pytest.mark.skipif(torch.cuda.is_available(), reason="Test not relevant when running on GPU")
def test_to_tokens_device(model):
    s = "Hello, world!"
    tokens1 = model.to_tokens(s, move_to_device=False)
    tokens2 = model.to_tokens(s, move_to_device=True)
    assert equal(tokens1, tokens2), "move to device has no effect when running tests on CPU"


def test_to_tokens_truncate(model):
    assert model.cfg.n_ctx == 256, "verify assumed context length"
    s = "@ " * 257  # "@" and " " are one token each here
    tokens1 = model.to_tokens(s)
    tokens2 = model.to_tokens(s, truncate=False)
    assert len(tokens1[0]) == 256, "truncated by default"
    assert len(tokens2[0]) == 515, "not truncated"


def test_to_string_from_to_tokens_without_bos(model):
    s = "Hello, world!"
    tokens = model.to_tokens(s, prepend_bos=False)
    s2 = model.to_string(tokens[0])
    assert s == s2, "same string when converted back to string"


def test_to_string_multiple(model):
    s_list = model.to_string(tensor([[1, 75, 349], [416, 638, 701]]))
    assert s_list == ["<|bos|>Hello", "Tel Mor plays"], "can handle list of lists"


def test_to_str_tokens_default(model):
    s_list = model.to_str_tokens("Tel Mor plays the saxophone")
    assert s_list == ["<|bos|>", "Tel", " Mor", " plays", " the", " saxophone"], "tokens as strings"


def test_to_str_tokens_without_bos(model):
    s_list = model.to_str_tokens("Tel Mor plays the saxophone", prepend_bos=False)
    assert s_list == ["Tel", " Mor", " plays", " the", " saxophone"], "without BOS"


def test_to_single_token(model):
    token = model.to_single_token(" saxophone")
    assert token == 703, "single token"


def test_to_single_str_tokent(model):
    s = model.to_single_str_token(703)
    assert s == " saxophone"


def test_get_token_position_not_found(model):
    single = " saxophone"
    input = "Tel Mor plays the piano"
    with pytest.raises(AssertionError) as exc_info:
        model.get_token_position(single, input)
    assert str(exc_info.value).startswith("The token does not occur in the prompt"), "assertion error"


def test_get_token_position_str(model):
    single = " plays"
    input = "Tel Mor plays the saxophone"
    pos = model.get_token_position(single, input)
    assert pos == 3, "first position"


def test_get_token_position_str_without_bos(model):
    single = " plays"
    input = "Tel Mor plays the saxophone"
    pos = model.get_token_position(single, input, prepend_bos=False)
    assert pos == 2, "without BOS"


def test_get_token_position_int_pos(model):
    single = 2
    input = tensor([2.0, 3, 4])
    pos1 = model.get_token_position(single, input)
    pos2 = model.get_token_position(single, input, prepend_bos=False)
    assert pos1 == 0, "first position"
    assert pos2 == 0, "no effect from BOS when using tensor as input"


def test_get_token_position_int_pos_last(model):
    single = 2
    input = tensor([2.0, 3, 4, 2, 5])
    pos1 = model.get_token_position(single, input, mode="last")
    assert pos1 == 3, "last position"


def test_get_token_position_int_1_pos(model):
    single = 2
    input = tensor([[2.0, 3, 4]])
    pos = model.get_token_position(single, input)
    assert pos == 0, "first position"


def test_tokens_to_residual_directions(model):
    res_dir = model.tokens_to_residual_directions(model.to_tokens(""))
    assert res_dir.shape == Size([96]), ""
