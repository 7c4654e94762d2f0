"""Port of TransformerLens' ``tests/integration/test_only_tokenizer.py`` (TransformerLensOrg/
TransformerLens, branch ``dev-4.x`` at commit 596e584846982c940b1418bc165d61d7c58e9eca): the
defaults of ``prepend_bos`` and ``padding_side`` in ``to_tokens`` / ``to_str_tokens``, as loaded,
as changed on the model, and as overridden per call.

Changed: the model. TransformerLens builds a ``TokenizerOnlyHookedTransformer`` (a subclass that
loads only the tokenizer) for GPT-2, OPT, Pythia and GPT-J; here it is the bundled
``moelens-tiny-facts`` (its weights are tiny). The prompts use its vocabulary; the prompt's length
without BOS is counted with ``add_special_tokens=False`` (see test_tl_prepend_bos.py), and the
default is changed with ``cfg.replace`` (moelens' config is frozen).
"""

import pytest

from moelens import HookedMoETransformer

BUNDLED = "moelens-tiny-facts"


def set_default_prepend_bos(model, value: bool) -> None:
    model.cfg = model.cfg.replace(default_prepend_bos=value)


class TestTokenizer:
    prompt = "Tel Mor plays the saxophone!"
    prompts = ["Jor Sar is from Lisbon.", "The favourite colour of Tel Mor is green."]

    # helper functions
    def get_num_tokens_in_prompt(self, model, prompt, intended_prepend_bos):
        tokens = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return len(tokens) + int(intended_prepend_bos)

    def check_first_token(self, model, str_tokens, tokens, intended_prepend_bos):
        if intended_prepend_bos:
            assert str_tokens[0] == model.tokenizer.bos_token
            assert tokens[0][0] == model.tokenizer.bos_token_id
        else:
            assert str_tokens[0] != model.tokenizer.bos_token
            assert tokens[0][0] != model.tokenizer.bos_token_id

    def check_tokens_length(self, model, str_tokens, tokens, intended_prepend_bos):
        expected_num_tokens = self.get_num_tokens_in_prompt(model, self.prompt, intended_prepend_bos)
        assert len(str_tokens) == tokens.shape[1] == expected_num_tokens

    def check_prompt(self, model, intended_prepend_bos, overriding_prepend_bos=None):
        str_tokens = model.to_str_tokens(self.prompt, prepend_bos=overriding_prepend_bos)
        tokens = model.to_tokens(self.prompt, prepend_bos=overriding_prepend_bos)
        self.check_first_token(model, str_tokens, tokens, intended_prepend_bos)
        self.check_tokens_length(model, str_tokens, tokens, intended_prepend_bos)

    def check_prompts(self, model, intended_prepend_bos, intended_padding_side, overriding_prepend_bos=None,
                      overriding_padding_side=None):
        tokens = model.to_tokens(self.prompts, prepend_bos=overriding_prepend_bos, padding_side=overriding_padding_side)
        if intended_padding_side == "left":
            if model.tokenizer.pad_token_id != model.tokenizer.bos_token_id:
                assert (tokens[:, 0] == model.tokenizer.pad_token_id).sum() == 1, tokens
                assert (tokens[:, 0] == model.tokenizer.bos_token_id).sum() == (1 if intended_prepend_bos else 0), tokens
            else:
                assert (tokens[:, 0] == model.tokenizer.pad_token_id).sum() == (
                    tokens.shape[0] if intended_prepend_bos else 1
                ), tokens
        else:
            assert (tokens[:, -1] == model.tokenizer.pad_token_id).sum() == 1, tokens
            if intended_prepend_bos:
                assert (tokens[:, 0] == model.tokenizer.bos_token_id).all(), tokens

        if model.tokenizer.pad_token_id != model.tokenizer.bos_token_id:
            if intended_prepend_bos:
                assert (tokens == model.tokenizer.bos_token_id).sum() == tokens.shape[0], tokens
            else:
                assert (tokens == model.tokenizer.bos_token_id).sum() == 0, tokens

    # tests
    def test_defaults(self):
        intended_prepend_bos, intended_padding_side = True, "right"
        model = HookedMoETransformer.from_pretrained(BUNDLED)
        assert model.cfg.default_prepend_bos == intended_prepend_bos, "Default prepend_bos should be True"
        assert model.tokenizer.padding_side == intended_padding_side, "Default padding_side should be right"
        self.check_prompt(model, intended_prepend_bos)
        self.check_prompts(model, intended_prepend_bos, intended_padding_side)

    def test_given_defaults(self):
        intended_prepend_bos, intended_padding_side = False, "left"
        model = HookedMoETransformer.from_pretrained(BUNDLED, default_prepend_bos=intended_prepend_bos)
        model.tokenizer.padding_side = intended_padding_side
        self.check_prompt(model, intended_prepend_bos)
        self.check_prompts(model, intended_prepend_bos, intended_padding_side)

    @pytest.mark.parametrize("intended_prepend_bos", [True, False])
    @pytest.mark.parametrize("intended_padding_side", ["left", "right"])
    def test_changing_defaults(self, model, intended_prepend_bos, intended_padding_side):
        model.tokenizer.padding_side = intended_padding_side
        set_default_prepend_bos(model, intended_prepend_bos)
        self.check_prompt(model, intended_prepend_bos)
        self.check_prompts(model, intended_prepend_bos, intended_padding_side)

    @pytest.mark.parametrize("intended_prepend_bos", [True, False])
    @pytest.mark.parametrize("intended_padding_side", ["left", "right"])
    def test_overriding_defaults(self, model, intended_prepend_bos, intended_padding_side):
        self.check_prompt(model, intended_prepend_bos, intended_prepend_bos)
        self.check_prompts(model, intended_prepend_bos, intended_padding_side, intended_prepend_bos,
                           intended_padding_side)
