"""A hook that returns the wrong shape or dtype kind is an error, always (not only in check_shapes)."""

import pytest
import torch

import moelens
from moelens import HookEditError, HookedMoETransformer


@pytest.fixture(scope="module")
def model():
    return HookedMoETransformer.from_pretrained("moelens-tiny-facts")


@pytest.mark.parametrize("hook,edit", [
    ("blocks.2.mlp.hook_expert_weights", lambda a: a[..., :1]),           # one slot's weight for all slots
    ("blocks.2.mlp.hook_expert_out", lambda a: a[:, :, :1]),              # [b, p, 1, d]
    ("blocks.2.mlp.hook_router_scores", lambda a: a[..., :4]),            # [b, p, 4]
    ("blocks.2.mlp.hook_router_logits", lambda a: a[:, -1:]),             # one position for all
    ("blocks.2.mlp.hook_expert_indices", lambda a: a[..., :1]),
    ("blocks.1.hook_mlp_out", lambda a: a[:1, :1]),
    ("hook_embed", lambda a: a.mean(0, keepdim=True)[:, :1]),
])
def test_wrong_shape_raises_naming_hook_and_shapes(model, hook, edit):
    tokens = model.to_tokens("Tel Mor plays the")
    act = {}

    def grab(a, hook):
        act["shape"] = tuple(a.shape)

    model.run_with_hooks(tokens, fwd_hooks=[(hook, grab)])
    returned = tuple(edit(torch.zeros(act["shape"])).shape)
    with pytest.raises(HookEditError) as err:
        model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda a, hook: edit(a))])
    msg = str(err.value)
    assert hook in msg and str(act["shape"]) in msg and str(returned) in msg
    assert isinstance(err.value, ValueError)


def test_wrong_dtype_kind_raises(model):
    tokens = model.to_tokens("Tel Mor plays the")
    with pytest.raises(HookEditError, match="hook_expert_indices.*expected int"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.2.mlp.hook_expert_indices", lambda a, hook: a.float())])
    with pytest.raises(HookEditError, match="hook_expert_weights.*expected float"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.2.mlp.hook_expert_weights", lambda a, hook: a.long())])


def test_correct_edits_and_observers_still_work(model):
    tokens = model.to_tokens("Tel Mor plays the")
    clean = model(tokens)

    def halve(a, hook):
        return a * 0.5

    def observe(a, hook):
        return None

    edited = model.run_with_hooks(tokens, fwd_hooks=[("blocks.2.mlp.hook_expert_weights", halve),
                                                     ("blocks.2.mlp.hook_expert_out", observe)])
    assert (edited - clean).abs().max() > 1e-3
    # a same-kind dtype change is allowed (e.g. bf16 edits in an fp32 model are cast downstream)
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out", lambda a, hook: a.double().float())])
    # caching and the patching API go through the checked path and keep working
    _, cache = model.run_with_cache(tokens)
    assert cache["blocks.2.mlp.hook_expert_weights"].shape[-1] == model.cfg.top_k
    # also permanent hooks and hooks added with add_hook directly are checked
    model.blocks[2].mlp.hook_expert_weights.add_hook(lambda a, hook: a[..., :1])
    try:
        with pytest.raises(HookEditError):
            model(tokens)
    finally:
        model.reset_hooks()
    with moelens.check_shapes(model):
        with pytest.raises(HookEditError):
            model.run_with_hooks(tokens, fwd_hooks=[("blocks.2.mlp.hook_expert_weights", lambda a, hook: a[..., :1])])
