"""Port of TransformerLens' ``tests/integration/test_main_demo_pattern_hooks.py`` (TransformerLensOrg/
TransformerLens, branch ``dev-4.x`` at commit 596e584846982c940b1418bc165d61d7c58e9eca): the
induction-score workflow of TransformerLens' Main_Demo (a hook on every ``hook_pattern`` chosen by a
name filter, ``hook.layer()``, ``return_type=None``).

Changed: the model (the bundled ``moelens-tiny-facts`` instead of GPT-2; its 4 layers and 4 heads
come from ``model.cfg`` as in the original). Not ported: ``TestMainDemoPatternHooksWithBridge``
(the same test on a ``TransformerBridge``).
"""

import einops
import pytest
import torch


class TestMainDemoPatternHooks:
    """Main_Demo pattern hooks workflow."""

    @pytest.fixture
    def repeated_tokens(self, model):
        """[BOS, 1, 2, ..., seq_len-1, 1, 2, ..., seq_len-1], as in Main_Demo."""
        seq_len = 50
        return torch.tensor([[model.tokenizer.bos_token_id] + list(range(1, seq_len)) * 2])

    def test_pattern_filter_hook_works(self, model, repeated_tokens):
        seq_len = 50
        induction_score_store = torch.zeros((model.cfg.n_layers, model.cfg.n_heads))

        def induction_score_hook(pattern, hook):
            # the diagonal of attention paid from each destination position to source positions
            # seq_len-1 tokens back
            induction_stripe = pattern.diagonal(dim1=-2, dim2=-1, offset=1 - seq_len)
            induction_score = einops.reduce(induction_stripe, "batch head_index position -> head_index", "mean")
            induction_score_store[hook.layer(), :] = induction_score
            return pattern

        pattern_hook_names_filter = lambda name: name.endswith("pattern")
        model.run_with_hooks(
            repeated_tokens,
            return_type=None,  # For efficiency, don't calculate logits
            fwd_hooks=[(pattern_hook_names_filter, induction_score_hook)],
        )

        assert induction_score_store.shape == (model.cfg.n_layers, model.cfg.n_heads)
        non_zero_count = (induction_score_store != 0).sum().item()
        total_count = induction_score_store.numel()
        assert non_zero_count > 0, f"Expected some non-zero induction scores, got {non_zero_count}/{total_count}"
        assert non_zero_count == total_count, f"Expected all {total_count} scores to be computed, got {non_zero_count}"

    def test_pattern_hooks_called_once_per_layer(self, model):
        tokens = torch.tensor([[1, 2, 3, 4, 5]])
        hook_calls = {}

        def tracking_hook(pattern, hook):
            name = hook.name
            hook_calls[name] = hook_calls.get(name, 0) + 1
            return pattern

        pattern_filter = lambda name: name.endswith("pattern")
        model.run_with_hooks(tokens, return_type=None, fwd_hooks=[(pattern_filter, tracking_hook)])

        for name, count in hook_calls.items():
            assert count == 1, f"Hook {name} was called {count} times, expected 1 (possible duplicate hook registration)"
        expected_hooks = model.cfg.n_layers
        actual_hooks = len(hook_calls)
        assert actual_hooks == expected_hooks, f"Expected {expected_hooks} pattern hooks, got {actual_hooks}"

    def test_hook_layer_method_works(self, model):
        tokens = torch.tensor([[1, 2, 3, 4, 5]])
        layer_indices = []

        def layer_tracking_hook(pattern, hook):
            layer_indices.append(hook.layer())  # what Main_Demo does
            return pattern

        pattern_filter = lambda name: name.endswith("pattern")
        model.run_with_hooks(tokens, return_type=None, fwd_hooks=[(pattern_filter, layer_tracking_hook)])

        assert len(layer_indices) == model.cfg.n_layers
        assert sorted(layer_indices) == list(range(model.cfg.n_layers))
