"""Fixtures for the ports of TransformerLens' own tests (``tests/transformer_lens/test_tl_*.py``).

TransformerLens' tests load GPT-2 or ``solu-1l`` at module import; the ports load the bundled model
(``HookedMoETransformer.from_pretrained("moelens-tiny-facts")``) once per session instead. Tests
change the tokenizer's padding side, the config and hooks as TransformerLens' tests do; the
``model`` fixture puts all of them back after each test, so test order never matters.

This directory has no ``__init__.py`` on purpose: as a package it would be importable as
``transformer_lens`` and shadow the real one.
"""

import pytest

BUNDLED = "moelens-tiny-facts"


@pytest.fixture(scope="session")
def bundled_tl():
    from moelens import HookedMoETransformer

    return HookedMoETransformer.from_pretrained(BUNDLED)


@pytest.fixture()
def model(bundled_tl):
    """The session's bundled model, restored after the test (config, tokenizer and its padding
    side, hooks, gradients)."""
    m = bundled_tl
    cfg, tok = m.cfg, m.tokenizer
    side, pad = tok.padding_side, tok.pad_token
    yield m
    m.reset_hooks(including_permanent=True)
    m.cfg, m.tokenizer = cfg, tok
    tok.padding_side, tok.pad_token = side, pad
    m.zero_grad(set_to_none=True)
