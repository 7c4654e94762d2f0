"""Gated DeltaNet: the linear-attention mixer of Qwen3.5 / Qwen3.6-MoE and Qwen3-Next.

Per token ``t`` (one set of weights per layer; ``H`` key heads, ``Hv`` value heads, ``Hv/H``
value heads share each key head)::

    c_t        = W_qkv x_t                                   hook_conv_in   [batch, pos, d_conv]
    [q; k; v]  = silu(causal depthwise conv over c_{t-K+1..t})  hook_conv_out  [batch, pos, d_conv]
    q, k       = l2norm(q), l2norm(k)     (fp32)             hook_q, hook_k [batch, pos, k_head, d_k]
                                                             hook_v         [batch, pos, v_head, d_v]
    beta_t     = sigmoid(W_b x_t)          write strength    hook_beta      [batch, pos, v_head]
    g_t        = -exp(A_log) softplus(W_a x_t + dt_bias)     hook_decay     [batch, pos, v_head] (log space, <= 0)
    S_t        = exp(g_t) S_{t-1}                            (decay)
    S_t       += k_t (beta_t (v_t - S_t^T k_t))^T            (delta rule: write the correction)
                                                             hook_state     [batch, pos, v_head, d_k, d_v]
    o_t        = S_t^T q_t / sqrt(d_k)                       hook_delta_out [batch, pos, v_head, d_v]
    y_t        = RMSNorm_w(o_t) * silu(W_z x_t)  per head    hook_gate (= W_z x) , hook_gated_out
    out_t      = w_o y_t                                     (the block hooks it as hook_attn_out)

``S`` is ``[v_head, d_k, d_v]`` per sequence and carries every earlier token forward.
:func:`delta_rule_recurrent` runs it token by token (the definition; transformers'
``torch_recurrent_gated_delta_rule``); :func:`delta_rule_chunked` is the chunked (UT-transform)
form transformers uses for prompts (``torch_chunk_gated_delta_rule``), tested equal to it. The two
differ only by float rounding (see docs/models.md).

``hook_state`` is large, so it is computed only when something is attached to it (a hook or a
cache); the forward then runs the token-by-token recurrence. Editing ``hook_state`` at
``(batch, pos)`` replaces the state there: the read-out at that position and the recurrence for all
later positions use the edited state, and the states recomputed after the edit are written back into
the tensor the hook returned (so a cache of it holds the states the layer used). A hooked
``hook_decay`` below ``-1000`` (e.g. ``-inf``: forget everything) also takes the token-by-token path.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn

from moelens.components.tl_views import DeltaNetViews
from moelens.config import MoEConfig
from moelens.hooks import ShapedHookPoint, has_hooks


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x * rsqrt(sum(x^2) + eps)`` over the last axis (as FLA and transformers).

    The sum runs over a contiguous copy: transformers normalises contiguous ``[batch, head, pos, d]``
    rows, and torch's CPU sum rounds differently when the reduced axis is strided (as it is in a
    slice of the transposed convolution output): one fp32 ulp in a few percent of the rows, enough
    to move a bf16 model's output by an ulp now and then."""
    x = x.contiguous()
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def causal_conv(
    x: Float[Tensor, "batch pos channel"],
    weight: Float[Tensor, "channel kernel"],
    window: Optional[Float[Tensor, "batch w channel"]] = None,
) -> Float[Tensor, "batch pos channel"]:
    """Depthwise causal convolution then SiLU. ``window``: the (up to ``kernel - 1``) inputs just
    before position 0 (a resumed suffix); zeros are used where there are none."""
    n, kernel = x.shape[1], weight.shape[-1]
    xt = x.transpose(1, 2).to(weight.dtype)
    if window is not None and window.shape[1] > 0:
        window = window[:, -(kernel - 1):]
        xt = torch.cat([window.transpose(1, 2).to(xt), xt], dim=-1)
    xt = F.pad(xt, (kernel - 1 - (xt.shape[-1] - n), 0))
    out = F.conv1d(xt, weight.unsqueeze(1), groups=xt.shape[1])[..., -n:]
    return F.silu(out).to(x.dtype).transpose(1, 2)


def delta_rule_recurrent(
    q: Float[Tensor, "batch pos head d_k"],
    k: Float[Tensor, "batch pos head d_k"],
    v: Float[Tensor, "batch pos head d_v"],
    g: Float[Tensor, "batch pos head"],
    beta: Float[Tensor, "batch pos head"],
    initial_state: Optional[Float[Tensor, "batch head d_k d_v"]] = None,
    return_states: bool = False,
    overrides: Optional[tuple[Bool[Tensor, "batch pos"], Tensor]] = None,
) -> tuple[Tensor, Tensor]:
    """The gated delta rule token by token (the definition), in fp32.

    ``q``/``k`` are already L2-normalised, with as many heads as ``v``. Returns the read-out
    ``[batch, pos, head, d_v]`` (fp32) and the final state ``[batch, head, d_k, d_v]``, or with
    ``return_states`` the state after every position ``[batch, pos, head, d_k, d_v]``.
    ``overrides=(mask, states)`` replaces the state after position ``t`` of row ``b`` by
    ``states[b, t]`` wherever ``mask[b, t]`` (a patched state), before the read-out.
    """
    b, n, h, dk = k.shape
    dv = v.shape[-1]
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    q = q / (dk**0.5)
    state = (torch.zeros(b, h, dk, dv, dtype=torch.float32, device=v.device) if initial_state is None
             else initial_state.float())
    out = torch.empty(b, n, h, dv, dtype=torch.float32, device=v.device)
    states = torch.empty(b, n, h, dk, dv, dtype=torch.float32, device=v.device) if return_states else None
    for t in range(n):
        state = state * g[:, t].exp()[..., None, None]
        kv_mem = (state * k[:, t, :, :, None]).sum(dim=-2)
        delta = (v[:, t] - kv_mem) * beta[:, t, :, None]
        state = state + k[:, t, :, :, None] * delta[:, :, None, :]
        if overrides is not None:
            mask, values = overrides
            state = torch.where(mask[:, t, None, None, None], values[:, t].to(state), state)
        out[:, t] = (state * q[:, t, :, :, None]).sum(dim=-2)
        if states is not None:
            states[:, t] = state
    return out, (states if return_states else state)


def delta_rule_chunked(
    q: Float[Tensor, "batch pos head d_k"],
    k: Float[Tensor, "batch pos head d_k"],
    v: Float[Tensor, "batch pos head d_v"],
    g: Float[Tensor, "batch pos head"],
    beta: Float[Tensor, "batch pos head"],
    initial_state: Optional[Float[Tensor, "batch head d_k d_v"]] = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """The same rule in chunks of ``chunk_size`` positions (fp32): within a chunk the delta-rule
    updates are folded into one unit lower-triangular solve (the UT transform), between chunks the
    state is carried as in the recurrence. Returns ``(read-out [batch, pos, head, d_v], final state)``."""
    b, n, h, dk = k.shape
    dv = v.shape[-1]
    q, k, v, g, beta = (x.float().transpose(1, 2).contiguous() for x in (q, k, v, g, beta))  # [b, h, n, ...]
    q = q * dk**-0.5
    pad = (chunk_size - n % chunk_size) % chunk_size
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = F.pad(beta, (0, pad)), F.pad(g, (0, pad))
    v_beta, k_beta = v * beta[..., None], k * beta[..., None]
    q, k, k_beta, v_beta = (x.reshape(b, h, -1, chunk_size, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    g = g.reshape(b, h, -1, chunk_size)
    n_chunks = g.shape[2]
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    cum = g.cumsum(dim=-1)  # log of the decay from the chunk start to each position
    pair = (cum[..., :, None] - cum[..., None, :]).masked_fill(upper, float("-inf")).exp()  # [i, j]: j -> i
    ut = (k_beta @ k.transpose(-1, -2)) * pair
    intra = (q @ k.transpose(-1, -2)) * pair
    new_v = torch.linalg.solve_triangular(ut, v_beta, upper=False, unitriangular=True)
    k_cum = torch.linalg.solve_triangular(ut, k_beta * cum.exp()[..., None], upper=False, unitriangular=True)
    state = (torch.zeros(b, h, dk, dv, dtype=torch.float32, device=v.device) if initial_state is None
             else initial_state.float())
    out = torch.zeros_like(new_v)
    q = q * cum.exp()[..., None]
    k = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]
    for i in range(n_chunks):
        v_new = new_v[:, :, i] - k_cum[:, :, i] @ state
        out[:, :, i] = q[:, :, i] @ state + intra[:, :, i] @ v_new
        state = state * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(b, h, -1, dv)[:, :, :n].transpose(1, 2)
    return out, state


def gated_rms_norm(o: Tensor, gate: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Per head ``(w * rms_normalised(o)) * silu(gate)`` (statistics and gate in fp32, as transformers'
    ``RMSNormGated``)."""
    dtype = o.dtype
    o32 = o.float()
    y = o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * y.to(dtype)
    return (y * F.silu(gate.float())).to(dtype)


_CHUNKED_MIN_DECAY = -1e3  # below this (or NaN), a hooked decay takes the token-by-token path


class DeltaNetCacheLayer:
    """What a Gated DeltaNet layer carries between generation steps (its "KV cache"): the last
    ``kernel - 1`` convolution inputs ``window [batch, w, d_conv]`` and the recurrent state
    ``state [batch, v_head, d_k, d_v]`` (fp32) after the positions seen so far.

    Pass it as the layer's ``prefix`` (the generation cache's per-layer object; see
    :meth:`GatedDeltaNet.new_cache_layer`): the layer resumes from it and updates it in place.
    """

    def __init__(self) -> None:
        self.window: Optional[Tensor] = None
        self.state: Optional[Tensor] = None
        self.n_seen = 0

    @property
    def seq_len(self) -> int:
        return self.n_seen

    def select(self, rows: Tensor) -> None:
        """Keep only batch ``rows`` (e.g. after dropping finished sequences)."""
        if self.state is not None:
            self.window = self.window[rows.to(self.window.device)]
            self.state = self.state[rows.to(self.state.device)]


class GatedDeltaNet(DeltaNetViews, nn.Module):
    """The Gated DeltaNet mixer (hooks and equations in the module docstring).

    Weights (``[out, in]``): ``W_qkv [d_conv, d_model]`` (rows ``[q; k; v]``), ``W_z``
    ``[v_head*d_v, d_model]``, ``W_b``/``W_a`` ``[v_head, d_model]``, ``W_conv [d_conv, kernel]``,
    ``dt_bias``/``A_log`` ``[v_head]``, ``norm_w [d_v]``, ``w_o [d_model, v_head*d_v]``.
    """

    is_recurrent = True

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        dm, nv, dv = cfg.d_model, cfg.linear_n_v_heads, cfg.linear_d_v
        self.W_qkv = nn.Parameter(torch.empty(cfg.linear_d_conv, dm))
        self.W_z = nn.Parameter(torch.empty(nv * dv, dm))
        self.W_b = nn.Parameter(torch.empty(nv, dm))
        self.W_a = nn.Parameter(torch.empty(nv, dm))
        self.W_conv = nn.Parameter(torch.empty(cfg.linear_d_conv, cfg.linear_conv_kernel))
        self.dt_bias = nn.Parameter(torch.ones(nv))
        self.A_log = nn.Parameter(torch.zeros(nv))
        self.norm_w = nn.Parameter(torch.ones(dv))
        self.w_o = nn.Parameter(torch.empty(dm, nv * dv))
        self.hook_conv_in = ShapedHookPoint("batch pos d_conv")
        self.hook_conv_out = ShapedHookPoint("batch pos d_conv")
        self.hook_q = ShapedHookPoint("batch pos k_head d_k")
        self.hook_k = ShapedHookPoint("batch pos k_head d_k")
        self.hook_v = ShapedHookPoint("batch pos v_head d_v")
        self.hook_beta = ShapedHookPoint("batch pos v_head")
        self.hook_decay = ShapedHookPoint("batch pos v_head")
        self.hook_state = ShapedHookPoint("batch pos v_head d_k d_v")
        self.hook_delta_out = ShapedHookPoint("batch pos v_head d_v")
        self.hook_gate = ShapedHookPoint("batch pos v_head d_v")
        self.hook_gated_out = ShapedHookPoint("batch pos v_head d_v")

    def new_cache_layer(self) -> DeltaNetCacheLayer:
        """An empty generation cache for this layer (conv window and recurrent state)."""
        return DeltaNetCacheLayer()

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        ctx=None,
        prefix=None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``prefix=(conv_window [batch, w, d_conv], state [batch, v_head, d_k, d_v])`` resumes the
        layer after earlier positions: the convolution inputs just before this input and the
        recurrent state after the last earlier position (what the suffix engine passes). A
        :class:`DeltaNetCacheLayer` does the same and is then updated in place (generation)."""
        cfg = self.cfg
        b, n, _ = x.shape
        nk, nv, dk, dv = cfg.linear_n_k_heads, cfg.linear_n_v_heads, cfg.linear_d_k, cfg.linear_d_v
        key_mask = getattr(ctx, "key_mask", None)
        if key_mask is not None:  # padded positions feed zeros into the mixer (as transformers)
            x = (x * key_mask[:, -n:, None].to(x.device)).to(x.dtype)
        conv_in = self.hook_conv_in(F.linear(x, self.W_qkv))
        cache = prefix if isinstance(prefix, DeltaNetCacheLayer) else None
        if cache is not None:
            window, state0 = cache.window, cache.state
        else:
            window, state0 = prefix if prefix is not None else (None, None)
        mixed = self.hook_conv_out(causal_conv(conv_in, self.W_conv, window))
        q, k, v = mixed.split([nk * dk, nk * dk, nv * dv], dim=-1)
        q = self.hook_q(l2norm(q.reshape(b, n, nk, dk).float()))
        k = self.hook_k(l2norm(k.reshape(b, n, nk, dk).float()))
        v = self.hook_v(v.reshape(b, n, nv, dv))
        z = F.linear(x, self.W_z).reshape(b, n, nv, dv)
        beta = self.hook_beta(torch.sigmoid(F.linear(x, self.W_b)))
        g = self.hook_decay(-self.A_log.float().exp() * F.softplus(F.linear(x, self.W_a).float() + self.dt_bias))
        if nv != nk:  # each key head serves nv/nk consecutive value heads
            q, k = q.repeat_interleave(nv // nk, dim=2), k.repeat_interleave(nv // nk, dim=2)
        if has_hooks(self.hook_state):
            o, final = self._with_state_hook(q, k, v, g, beta, state0)
        elif (cfg.delta_rule_impl == "recurrent" or (state0 is not None and n == 1)  # one decode step
              or (has_hooks(self.hook_decay) and not bool((g >= _CHUNKED_MIN_DECAY).all()))):
            # an edited decay far below any the model produces (e.g. -inf: "forget everything here")
            # turns the chunked form's cumulative log-decays into inf - inf = NaN or loses their
            # precision; the token-by-token rule multiplies by exp(g) = 0 exactly
            o, final = delta_rule_recurrent(q, k, v, g, beta, state0)
        else:
            o, final = delta_rule_chunked(q, k, v, g, beta, state0, cfg.delta_rule_chunk)
        if cache is not None:
            kernel = self.W_conv.shape[-1]
            seen = conv_in if window is None else torch.cat([window.to(conv_in), conv_in], dim=1)
            cache.window, cache.state = seen[:, -(kernel - 1):].detach(), final.detach()
            cache.n_seen += n
        o = self.hook_delta_out(o.to(x.dtype))
        y = self.hook_gated_out(gated_rms_norm(o, self.hook_gate(z), self.norm_w, cfg.rms_norm_eps))
        return F.linear(y.reshape(b, n, nv * dv), self.w_o)

    def _with_state_hook(self, q, k, v, g, beta, state0) -> tuple[Tensor, Tensor]:
        o, states = delta_rule_recurrent(q, k, v, g, beta, state0, return_states=True)
        original = states.clone()
        edited = self.hook_state(states)
        if edited.shape != original.shape:
            raise ValueError(
                f"{self.hook_state.name}: a hook returned shape {tuple(edited.shape)}, expected "
                f"{tuple(original.shape)} [batch, pos, v_head, d_k, d_v]"
            )
        changed = (edited != original).flatten(2).any(-1)  # [batch, pos]
        if bool(changed.any()):
            o, used = delta_rule_recurrent(q, k, v, g, beta, state0, return_states=True,
                                           overrides=(changed, edited))
            # The hook saw (and a cache recorded) the states of the unedited recurrence; after an
            # edit at t the layer's states at later, unedited positions differ. Write the states the
            # layer used there into the tensor the hooks returned, so that a cache of hook_state (and
            # any hook that kept it) holds what the read-outs were computed from.
            with torch.no_grad():
                stale = ~changed[..., None, None, None] & (used != edited.to(used.dtype))
                if bool(stale.any()):
                    try:
                        edited[stale] = used[stale].to(edited.dtype)
                    except RuntimeError:  # e.g. an expanded tensor (one element at several places)
                        pass
            return o, used[:, -1]
        return o, original[:, -1]
