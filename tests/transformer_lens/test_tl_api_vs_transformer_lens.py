"""moelens' tokenizer and generate API against TransformerLens' own implementation (not a port).

TransformerLens 4.3 has no ``HookedTransformer``; its ``TransformerBridge.boot_native`` builds a
small native TransformerLens model offline. Given the bundled model's tokenizer, its
``to_tokens``, ``to_str_tokens``, ``to_string``, ``to_single_token``, ``get_token_position``,
``tokens_to_residual_directions`` (shapes) and ``generate`` (output types and shapes) are the
reference for moelens' methods of the same names, input by input.
"""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from moelens import loading

TEXT = "Tel Mor plays the saxophone"
TEXTS = ["Tel Mor plays the saxophone", "Jor Sar is", "The favourite colour of Jor Sar is green"]


@pytest.fixture(scope="module")
def tl_model():
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(n_layers=1, d_model=16, d_head=4, n_heads=4, n_ctx=256, d_vocab=727, attn_only=True)
    bridge = TransformerBridge.boot_native(cfg)
    bridge.tokenizer = AutoTokenizer.from_pretrained(str(loading.resolve("moelens-tiny-facts")))
    return bridge


@pytest.fixture()
def both(model, tl_model):
    side = tl_model.tokenizer.padding_side
    yield model, tl_model
    tl_model.tokenizer.padding_side = side


@pytest.mark.parametrize("prepend_bos", [True, False])
@pytest.mark.parametrize("padding_side", ["left", "right", None])
def test_to_tokens_and_to_str_tokens(both, prepend_bos, padding_side):
    ours, tl = both
    for inp in (TEXT, TEXTS):
        assert torch.equal(ours.to_tokens(inp, prepend_bos=prepend_bos, padding_side=padding_side),
                           tl.to_tokens(inp, prepend_bos=prepend_bos, padding_side=padding_side)), inp
        assert ours.to_str_tokens(inp, prepend_bos=prepend_bos) == tl.to_str_tokens(inp, prepend_bos=prepend_bos)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_of_the_tokenizer_is_honoured(both, side):
    ours, tl = both
    ours.tokenizer.padding_side = tl.tokenizer.padding_side = side
    assert torch.equal(ours.to_tokens(TEXTS), tl.to_tokens(TEXTS))
    tokens = ours.to_tokens(TEXTS)
    pad = ours.tokenizer.pad_token_id
    assert (tokens[:, 0 if side == "left" else -1] == pad).any() and not (tokens[:, -1 if side == "left" else 0] == pad).any()


def test_to_str_tokens_of_tokens(both):
    ours, tl = both
    ids = ours.to_tokens(TEXT)
    for inp in (ids, ids[0], ids.numpy(), ids[0].numpy(), torch.tensor([703]), torch.tensor(703), np.array([[703]]),
                [ids[0], ids[0, :3]], [TEXT, "Jor Sar"]):
        assert ours.to_str_tokens(inp) == tl.to_str_tokens(inp), inp


def test_to_string_and_single_tokens(both):
    ours, tl = both
    ids = ours.to_tokens(TEXTS, padding_side="right")
    for inp in (ids, ids[0], ids[0].tolist(), ids.tolist(), ids.numpy()):
        assert ours.to_string(inp) == tl.to_string(inp)
    for s in (" saxophone", " the", "Tel"):
        assert ours.to_single_token(s) == tl.to_single_token(s)
    for t in (703, 1, 5, 416):
        assert ours.to_single_str_token(t) == tl.to_single_str_token(t)


@pytest.mark.parametrize("mode", ["first", "last"])
@pytest.mark.parametrize("prepend_bos", [True, False])
def test_get_token_position(both, mode, prepend_bos):
    ours, tl = both
    text = "Jor Sar is from Lisbon and Jor Sar is"
    for single in (" Sar", " is", 642, torch.tensor(642)):
        assert ours.get_token_position(single, text, mode=mode, prepend_bos=prepend_bos) == \
            tl.get_token_position(single, text, mode=mode, prepend_bos=prepend_bos)
    ids = ours.to_tokens(text)
    assert ours.get_token_position(642, ids, mode=mode) == tl.get_token_position(642, ids, mode=mode)
    assert ours.get_token_position(642, ids[0], mode=mode) == tl.get_token_position(642, ids[0], mode=mode)
    with pytest.raises(AssertionError):
        ours.get_token_position(" saxophone", text)
    with pytest.raises(AssertionError):
        tl.get_token_position(" saxophone", text)


def test_tokens_to_residual_directions_shapes(both):
    ours, tl = both
    for t in (703, " saxophone", torch.tensor(703), torch.tensor([703]), torch.tensor([[703]]),
              torch.tensor([703, 715, 1]), torch.tensor([[703, 715], [1, 2]])):
        a, b = ours.tokens_to_residual_directions(t), tl.tokens_to_residual_directions(t)
        assert a.shape[:-1] == b.shape[:-1] and a.shape[-1] == ours.cfg.d_model and b.shape[-1] == tl.cfg.d_model, t


def test_generate_output_logits_structure(both):
    ours, tl = both
    kw = dict(max_new_tokens=3, do_sample=False, verbose=False, stop_at_eos=False, output_logits=True)
    for inp in ("Tel Mor", ours.to_tokens("Tel Mor")):
        a, b = ours.generate(inp, **kw), tl.generate(inp, **kw)
        assert type(a) is type(b)
        assert a.sequences.shape == b.sequences.shape and a.sequences.dtype == b.sequences.dtype
        assert len(a.logits) == len(b.logits) == 3
        assert [x.shape[0] for x in a.logits] == [x.shape[0] for x in b.logits]
        assert all(x.shape[-1] == ours.cfg.d_vocab for x in a.logits)
        for step, x in enumerate(a.logits):  # the logits each greedy token was chosen from
            assert int(x[0].argmax()) == int(a.sequences[0, -3 + step])


def test_generate_str_from_tokens_drops_bos_as_transformer_lens(both):
    ours, tl = both
    tokens = ours.to_tokens("Tel Mor plays the")
    text = ours.generate(tokens, max_new_tokens=2, do_sample=False, verbose=False, return_type="str")
    full = ours.generate(tokens, max_new_tokens=2, do_sample=False, verbose=False, return_type="tokens")
    assert isinstance(text, str) and not text.startswith(ours.tokenizer.bos_token)
    # TransformerLens' rule for the same tokens: decode without special tokens
    assert text == tl.tokenizer.decode(full[0], skip_special_tokens=True)
    tl_text = tl.generate(tokens, max_new_tokens=2, do_sample=False, verbose=False, return_type="str")
    assert isinstance(tl_text, str) and not tl_text.startswith(tl.tokenizer.bos_token)
