"""Edits through the Gated DeltaNet hooks (Qwen3-Next) and gpt-oss's sink hook, checked against
independent computations: a hand-written token-by-token delta rule fed the edited inputs.

The model runs its default chunked rule (hook_state is not attached) unless a test says otherwise.
"""

import math

import pytest
import torch

from moelens import HookedMoETransformer

IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
T = 7  # the edited position


@pytest.fixture(scope="module")
def hybrid(tiny_dirs):
    d, _ = tiny_dirs("qwen3_next")
    model = HookedMoETransformer.from_pretrained(d)
    assert model.cfg.delta_rule_impl == "chunked"
    return model


def reference(q, k, v, g, beta, override=None):
    """S_t = e^{g_t} S_{t-1} + k_t beta_t (v_t - (e^{g_t} S_{t-1})^T k_t)^T, o_t = S_t^T q_t / sqrt(d_k);
    ``override=(t, state)`` replaces S_t. q, k: [b, pos, v_head, d_k] (repeated per value head)."""
    b, n, h, dk = k.shape
    S = torch.zeros(b, h, dk, v.shape[-1])
    outs, states = [], []
    for t in range(n):
        decayed = torch.exp(g[:, t])[..., None, None] * S
        decayed = torch.where(torch.isneginf(g[:, t])[..., None, None], torch.zeros_like(S), decayed)
        err = v[:, t] - torch.einsum("bhkv,bhk->bhv", decayed, k[:, t])
        S = decayed + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * err)
        if override is not None and t == override[0]:
            S = override[1][:, t].clone()
        states.append(S)
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]) / dk**0.5)
    return torch.stack(outs, 1), torch.stack(states, 1)


def edit_at(name, fn):
    def hook(x, hook):
        x = x.clone()
        x[:, T] = fn(x[:, T])
        return x

    return (name, hook)


EDITS = {
    "beta_zero": ("hook_beta", lambda x: torch.zeros_like(x)),
    "decay_scaled": ("hook_decay", lambda x: 3 * x),
    "decay_forget_inf": ("hook_decay", lambda x: torch.full_like(x, -math.inf)),  # was NaN (chunked)
    "decay_forget_huge": ("hook_decay", lambda x: torch.full_like(x, -1e30)),  # was off by 0.4 (chunked)
    "k_replaced": ("hook_k", lambda x: torch.flip(x, [-1])),
    "v_scaled": ("hook_v", lambda x: -2 * x),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edit_changes_the_read_out_as_the_token_by_token_rule(hybrid, edit):
    model = hybrid
    c = model.cfg
    layer = c.linear_attn_layers[0]
    pre = f"blocks.{layer}.attn."
    hook_name, fn = EDITS[edit]
    names = [pre + h for h in ("hook_q", "hook_k", "hook_v", "hook_beta", "hook_decay", "hook_delta_out")]
    with torch.no_grad():
        _, cache = model.run_with_cache(IDS, fwd_hooks=[edit_at(pre + hook_name, fn)], names_filter=names)
        _, clean = model.run_with_cache(IDS, names_filter=names)
    r = c.linear_n_v_heads // c.linear_n_k_heads
    q, k = (cache[pre + h].repeat_interleave(r, 2) for h in ("hook_q", "hook_k"))
    want, _ = reference(q, k, cache[pre + "hook_v"], cache[pre + "hook_decay"], cache[pre + "hook_beta"])
    got = cache[pre + "hook_delta_out"]
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() < 1e-5
    # nothing before the edit moves (a forgetting decay runs token by token: rounding only)
    assert (got[:, :T] - clean[pre + "hook_delta_out"][:, :T]).abs().max() < 1e-6
    assert (got[:, T:] - clean[pre + "hook_delta_out"][:, T:]).abs().max() > 1e-3  # the edit did something


def test_replacing_the_state_at_one_position(hybrid):
    """The read-out at T and later positions follow the edited state, and the cached hook_state holds
    the states the layer used (after T: those recomputed from the edited state, not the unedited ones)."""
    model = hybrid
    c = model.cfg
    layer = c.linear_attn_layers[0]
    pre = f"blocks.{layer}.attn."
    names = [pre + h for h in ("hook_q", "hook_k", "hook_v", "hook_beta", "hook_decay", "hook_delta_out", "hook_state")]
    with torch.no_grad():
        _, clean = model.run_with_cache(IDS, names_filter=names)
    new_state = 0.5 * clean[pre + "hook_state"][:, 2:3].expand_as(clean[pre + "hook_state"]).clone()
    with torch.no_grad():
        _, cache = model.run_with_cache(IDS, fwd_hooks=[edit_at(pre + "hook_state", lambda s: new_state[:, T])],
                                        names_filter=names)
    r = c.linear_n_v_heads // c.linear_n_k_heads
    q, k = (cache[pre + h].repeat_interleave(r, 2) for h in ("hook_q", "hook_k"))
    want, states = reference(q, k, cache[pre + "hook_v"], cache[pre + "hook_decay"], cache[pre + "hook_beta"],
                             override=(T, new_state))
    assert (cache[pre + "hook_delta_out"] - want).abs().max() < 1e-5
    assert (cache[pre + "hook_state"] - states).abs().max() < 1e-5  # was off by ~1 after T
    assert (cache[pre + "hook_state"][:, T + 1:] - clean[pre + "hook_state"][:, T + 1:]).abs().max() > 1e-2


def test_left_padding_writes_nothing_into_the_state(hybrid):
    """Padded positions feed zeros into the mixer: k = v = 0 there, so the state stays zero through
    the left padding and a padded row's states equal the unpadded row's (docs/linear_attention.md)."""
    model = hybrid
    layer = model.cfg.linear_attn_layers[0]
    name = f"blocks.{layer}.attn.hook_state"
    mask = torch.ones_like(IDS)
    mask[1, :6] = 0
    with torch.no_grad():
        _, padded = model.run_with_cache(IDS, attention_mask=mask, names_filter=name)
        _, alone = model.run_with_cache(IDS[1:, 6:], names_filter=name)
    assert padded[name][1, :6].abs().max() == 0
    assert (padded[name][1, 6:] - alone[name][0]).abs().max() < 1e-5
    assert padded[name][1, 6:].abs().max() > 1e-2


def test_an_in_place_sink_weight_edit_is_honoured(tiny_dirs):
    d, _ = tiny_dirs("gpt_oss")
    model = HookedMoETransformer.from_pretrained(d)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    sinks = lambda n: n.endswith("hook_sink_weight")

    def in_place(x, hook):
        x.zero_()

    with torch.no_grad():
        returned = model.run_with_hooks(ids, fwd_hooks=[(sinks, lambda x, hook: torch.zeros_like(x))])
        edited = model.run_with_hooks(ids, fwd_hooks=[(sinks, in_place)])
        plain = model(ids)
    assert (returned - plain).abs().max() > 1e-2
    assert torch.equal(edited, returned)  # was: the in-place edit was ignored (edited == plain)
