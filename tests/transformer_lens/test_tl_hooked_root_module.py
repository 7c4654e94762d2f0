"""Port of TransformerLens' ``tests/unit/test_hooked_root_module.py`` (TransformerLensOrg/
TransformerLens, branch ``dev-4.x`` at commit 596e584846982c940b1418bc165d61d7c58e9eca; the 4.3.0
release has no such file).

The ``_enable_hook*`` tests run on a moelens model (a ``HookedRootModule`` subclass that checks
hook names before passing them on) instead of a bare ``HookedRootModule``: a skeleton of the
bundled model's architecture (``device="meta"``: no weights), whose hook points are replaced by
mocks as in the original. Changed: the hook names (``"linear"`` becomes ``"hook_embed"`` where the
name is looked up, since moelens refuses names its model does not have). Not ported:
``test_legacy_hook_points_import_still_works`` and ``..._attribute_error_for_unknown_names`` (they
test TransformerLens' own import shim ``transformer_lens.hook_points.HookedRootModule``, not a
model).
"""

from unittest.mock import Mock

import pytest

from moelens import HookedMoETransformer
from transformer_lens.hook_points import HookPoint


@pytest.fixture()
def skeleton(bundled_tl):
    return HookedMoETransformer.from_config(bundled_tl.cfg, device="meta")


def test_enable_hook_with_name(skeleton):
    model = skeleton
    model.mod_dict = {"hook_embed": Mock(HookPoint)}
    model.context_level = 5

    hook = lambda x: False
    dir = "fwd"

    model._enable_hook_with_name("hook_embed", hook=hook, dir=dir)

    model.mod_dict["hook_embed"].add_hook.assert_called_with(hook, dir="fwd", level=5)


def test_enable_hooks_for_points(skeleton):
    model = skeleton
    model.mod_dict = {}
    model.context_level = 5

    hook_points = {
        "linear": Mock(HookPoint),
        "attn": Mock(HookPoint),
    }

    enabled = lambda x: x == "attn"

    hook = lambda x: False
    dir = "bwd"

    model._enable_hooks_for_points(hook_points=hook_points.items(), enabled=enabled, hook=hook, dir=dir)

    hook_points["attn"].add_hook.assert_called_with(hook, dir="bwd", level=5)
    hook_points["linear"].add_hook.assert_not_called()


def test_enable_hook_with_string_param(skeleton):
    model = skeleton
    model.mod_dict = {"hook_embed": Mock(HookPoint)}
    model.context_level = 5

    hook = lambda x: False
    dir = "fwd"

    model._enable_hook("hook_embed", hook=hook, dir=dir)

    model.mod_dict["hook_embed"].add_hook.assert_called_with(hook, dir="fwd", level=5)


def test_enable_hook_with_callable_param(skeleton):
    model = skeleton
    model.mod_dict = {"linear": Mock(HookPoint)}
    model.hook_dict = {
        "linear": Mock(HookPoint),
        "attn": Mock(HookPoint),
    }
    model.context_level = 5

    enabled = lambda x: x == "attn"

    hook = lambda x: False
    dir = "fwd"

    model._enable_hook(enabled, hook=hook, dir=dir)

    model.mod_dict["linear"].add_hook.assert_not_called()
    model.hook_dict["attn"].add_hook.assert_called_with(hook, dir="fwd", level=5)
    model.hook_dict["linear"].add_hook.assert_not_called()
