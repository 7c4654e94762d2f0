"""Port of TransformerLens' ``tests/integration/test_left_padding.py`` (TransformerLensOrg/
TransformerLens, branch ``dev-4.x`` at commit 596e584846982c940b1418bc165d61d7c58e9eca).

``tokenizer.padding_side`` decides how ``run_with_cache(list_of_prompts)`` pads, and left- or
right-padded, every prompt's activations equal those of the prompt run alone.

Changed: the model (the bundled ``moelens-tiny-facts`` instead of GPT-2 and OPT), the prompts, and
the cached activations compared: TransformerLens' short names for GPT-2's layers 2..6 and its
``mlp.hook_pre`` become the bundled model's layers 0..3 and its router logits / expert outputs.
Not ported: ``test_pos_embed`` and ``test_pos_embed_with_cache`` (they test the learned positional
embedding ``pos_embed`` under padding; moelens' architectures use RoPE and have none).
"""

import torch


class TestLeftPadding:
    prompts = [
        "Tel Mor plays the",
        "The favourite colour of Jor Sar is",
        "Jor Sar is from",
        "Tel Mor",
    ]

    def check_outputs_identity(self, i, single_outputs, left_outputs, right_outputs, left_token_start,
                               left_token_end, right_token_start, right_token_end):
        atol = 1e-4
        assert torch.allclose(
            left_outputs[i, left_token_start:left_token_end], right_outputs[i, right_token_start:right_token_end],
            atol=atol,
        )
        assert torch.allclose(left_outputs[i, left_token_start:left_token_end], single_outputs[0], atol=atol)
        assert torch.allclose(right_outputs[i, right_token_start:right_token_end], single_outputs[0], atol=atol)

    def test_left_padding_by_comparing_outputs(self, model):
        prompts = self.prompts

        num_str_tokens_list = [len(t) for t in model.to_str_tokens(prompts)]
        assert len(set(num_str_tokens_list)) > 1  # the batch is padded

        # left padding output
        model.tokenizer.padding_side = "left"
        left_logits, left_cache = model.run_with_cache(prompts)
        left_last_logits = left_logits[:, -1, :]
        left_first_token_positions = left_logits.shape[1] - torch.tensor(num_str_tokens_list)
        left_first_logits = left_logits[torch.arange(len(prompts)), left_first_token_positions, :].squeeze(1)

        # right padding output
        model.tokenizer.padding_side = "right"
        right_logits, right_cache = model.run_with_cache(prompts)
        right_last_token_positions = torch.tensor(num_str_tokens_list) - 1
        right_last_logits = right_logits[torch.arange(len(prompts)), right_last_token_positions, :].squeeze(1)
        right_first_logits = right_logits[:, 0, :]

        # left and right padding outputs agree for the first and last tokens
        assert torch.allclose(left_last_logits, right_last_logits, atol=1e-4)
        assert torch.allclose(left_first_logits, right_first_logits, atol=1e-4)

        # ... and for all tokens, and the batched padded outputs equal the single prompt outputs
        right_token_start = 0
        left_token_end = left_logits.shape[1]
        for i, (prompt, left_token_start, right_token_end) in enumerate(
            zip(prompts, left_first_token_positions.tolist(), (right_last_token_positions + 1).tolist())
        ):
            single_logits, single_cache = model.run_with_cache(prompt)

            assert right_token_end - right_token_start == left_token_end - left_token_start == single_logits.shape[1]

            self.check_outputs_identity(i, single_logits, left_logits, right_logits, left_token_start,
                                        left_token_end, right_token_start, right_token_end)

            # check cache
            for name in ["k3a", "embed", "k1", "scale2ln1", ("router_logits", 2), ("expert_weights", 1),
                         ("expert_out", 3)]:
                self.check_outputs_identity(i, single_cache[name], left_cache[name], right_cache[name],
                                            left_token_start, left_token_end, right_token_start, right_token_end)
