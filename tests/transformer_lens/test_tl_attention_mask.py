"""Port of TransformerLens' ``tests/integration/test_attention_mask.py`` (TransformerLensOrg/
TransformerLens, branch ``dev-4.x`` at commit 596e584846982c940b1418bc165d61d7c58e9eca).

Changed: the models (the bundled ``moelens-tiny-facts`` for both tests, instead of a random
one-layer attention-only ``HookedTransformer`` and ``solu-1l``) and the prompts. Masked attention
scores are the dtype's most negative finite value, as in transformers, where TransformerLens
writes ``-inf`` (a TransformerLens detail, not a behaviour: the pattern is exactly 0 either way,
which the test still checks, and no fully masked query turns into NaN). In
``test_masked_tokens`` the forward with a masked column gets ``position_ids = cumsum(mask) - 1``:
TransformerLens numbers positions by the mask internally, moelens' plain forward numbers them by
column as transformers' forward does (the reference its logits are tested against), so the
"same as if the token were removed" identity needs the positions said explicitly under RoPE
(docs/transformer_lens.md, "TransformerLens' own tests").
"""

import torch

from transformer_lens import utilities as utils


def test_attention_mask(model):
    # Verify the attention mask attends properly, including for low attention scores
    input_length = 5
    input = torch.ones((1, input_length), dtype=torch.int64)
    layer = 0
    low_attn_score = 1e-6
    ones_input_matrix = torch.ones((input_length, input_length))
    masked = torch.triu(ones_input_matrix, diagonal=1).bool()
    seen = []

    def attn_scores_hook(attn_scores, hook):
        # TransformerLens writes -inf; moelens writes the dtype's most negative finite value, as
        # transformers does (a query whose every key is masked, e.g. a left pad, gets no NaN).
        # Either way the pattern there is exactly 0 (attn_hook below).
        assert torch.all(
            attn_scores[:, :, masked] <= torch.finfo(attn_scores.dtype).min
        ), "Attention scores excluded by the mask are not being set to -inf (or the most negative float)"

        # Set low attention scores that are attended to by the mask
        attn_scores[:, :, ~masked] = low_attn_score
        seen.append(hook.name)
        return attn_scores

    def attn_hook(attn, hook):
        assert torch.all(attn[:, :, masked] == 0), "Attention pattern attends outside the mask"
        seen.append(hook.name)
        return attn

    fwd_hooks = [
        (utils.get_act_name("attn_scores", layer), attn_scores_hook),
        (utils.get_act_name("attn", layer), attn_hook),
    ]

    model.run_with_hooks(input, fwd_hooks=fwd_hooks)
    assert seen == ["blocks.0.attn.hook_attn_scores", "blocks.0.attn.hook_pattern"]  # both hooks ran


def test_masked_tokens(model):
    """Test that masking tokens works as expected."""
    prompts = [
        "Tel Mor plays the saxophone",
        "The favourite colour of Jor Sar is",
    ]
    tokens = model.to_tokens(prompts)

    # Part 1: If the mask is all ones, the output should be the same as if there was no mask.
    full_mask = torch.ones_like(tokens)
    no_mask_out = model(tokens)
    full_mask_out = model(tokens, attention_mask=full_mask)
    assert torch.allclose(no_mask_out, full_mask_out), "Full mask should be equivalent to no mask"

    # Part 2: If the mask has a column of zeros, the output should be the same as if that token
    # position was removed from the input.
    remove_tok_idx = 2
    edited_tokens = torch.cat([tokens[:, :remove_tok_idx], tokens[:, remove_tok_idx + 1 :]], dim=1)
    edited_mask = full_mask.clone()
    edited_mask[:, remove_tok_idx] = 0
    edited_no_mask_out = model(edited_tokens)
    positions = (edited_mask.cumsum(-1) - 1).clamp(min=0)  # TransformerLens' numbering (see above)
    edited_mask_out = model(tokens, attention_mask=edited_mask, position_ids=positions)
    edited_mask_out = torch.cat(
        [edited_mask_out[:, :remove_tok_idx], edited_mask_out[:, remove_tok_idx + 1 :]], dim=1
    )
    assert torch.allclose(edited_no_mask_out, edited_mask_out, atol=1e-4), "Edited mask should be equivalent to no mask"
