"""Splice sparse autoencoders (or any module with ``encode``/``decode``) into a moelens model.

At hook point ``name`` the activation ``x`` is replaced by the SAE's reconstruction plus (by
default) the reconstruction error, each step a hook point of its own::

    x -> hook_sae_input -> encode -> hook_sae_acts -> decode -> hook_sae_recon
    error  = x - decode(encode(x))        (the unedited reconstruction)     -> hook_sae_error
    output = recon + error                                                  -> hook_sae_output

With the error term (``use_error_term=True``, the default) the spliced model computes what the
plain one does, bitwise (the output is formed as ``x + (recon - clean recon) + (error - clean
error)``, which is ``recon + error`` up to rounding and exactly ``x`` unedited), and an edit of the features
(``hook_sae_acts``) changes the output by exactly ``decode(edited) - decode(clean)``: patching
stays exact. Without it the model runs on the reconstruction alone.

The hook points are named ``{name}.sae.hook_sae_acts`` etc. and appear in ``model.hook_dict``
while the SAE is spliced, so ``run_with_cache``, ``run_with_hooks`` and :mod:`moelens.patching`
reach them. Use :func:`splice_saes` (a context manager) or :func:`add_sae` / :func:`remove_saes`
(permanent until removed). Nothing here depends on SAELens; an SAELens ``SAE`` works as is.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from moelens.hooks import ShapedHookPoint


class SAESplice(nn.Module):
    """Wraps ``sae`` (``encode(x) -> acts``, ``decode(acts) -> x_hat``) with hook points."""

    def __init__(self, sae: Any, use_error_term: bool = True, dims: str = "batch pos d_model"):
        super().__init__()
        if not (callable(getattr(sae, "encode", None)) and callable(getattr(sae, "decode", None))):
            raise TypeError(f"an SAE needs encode() and decode() methods; {type(sae).__name__} has not both")
        self.sae = sae
        self.use_error_term = use_error_term
        sae_dims = " ".join(dims.split()[:-1] + ["d_sae"])
        self.hook_sae_input = ShapedHookPoint(dims)
        self.hook_sae_acts = ShapedHookPoint(sae_dims)
        self.hook_sae_recon = ShapedHookPoint(dims)
        self.hook_sae_error = ShapedHookPoint(dims)
        self.hook_sae_output = ShapedHookPoint(dims)

    def forward(self, x: Tensor) -> Tensor:
        x = self.hook_sae_input(x)
        clean = self.sae.encode(x)
        acts = self.hook_sae_acts(clean.clone() if self.use_error_term else clean)
        recon = self.hook_sae_recon(self.sae.decode(acts).to(x.dtype))
        if not self.use_error_term:
            return self.hook_sae_output(recon)
        with torch.no_grad():
            clean_recon = self.sae.decode(clean).to(x.dtype)
        error0 = x - clean_recon
        error = self.hook_sae_error(error0.clone())
        # recon + error, written as x plus the edits: (recon - clean_recon) and (error - error0) are
        # exactly 0 when neither the features nor the error were edited, so the output is x bitwise
        # (recon + (x - recon) rounds, by a bf16 ulp of recon); the gradient is the same as recon + error's
        return self.hook_sae_output(x + (recon - clean_recon) + (error - error0))


def _check(model, name: str) -> HookPoint:
    if name not in model.hook_dict:
        model._check_name(name)  # raises with suggestions
    hp = model.hook_dict[name]
    if isinstance(getattr(hp, "sae", None), SAESplice):
        raise ValueError(f"an SAE is already spliced at {name}; remove it first (moelens.sae.remove_saes)")
    return hp


def add_sae(model, name: str, sae: Any, use_error_term: bool = True) -> SAESplice:
    """Splice ``sae`` at hook point ``name`` permanently (until :func:`remove_saes`). Returns the
    :class:`SAESplice`, whose hook points are ``{name}.sae.hook_sae_*``."""
    hp = _check(model, name)
    splice = SAESplice(sae, use_error_term=use_error_term, dims=getattr(hp, "dims", "batch pos d_model"))
    hp.add_module("sae", splice)
    model.setup()  # names the new hook points and adds them to hook_dict

    def run(act, hook):
        return splice(act)

    run._moelens_sae = True  # type: ignore[attr-defined]
    hp.add_hook(run, dir="fwd", is_permanent=True)
    return splice


def _is_sae_hook(fn) -> bool:
    while fn is not None:  # ShapedHookPoint wraps user hooks (checked(...).__wrapped__)
        if getattr(fn, "_moelens_sae", False):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def remove_saes(model, names=None) -> None:
    """Remove the SAEs spliced at ``names`` (default: all)."""
    for name, hp in list(model.hook_dict.items()):
        splice = getattr(hp, "sae", None)
        if not isinstance(splice, SAESplice) or (names is not None and name not in names):
            continue
        keep = []
        for handle in hp.fwd_hooks:
            if _is_sae_hook(handle.user_hook):
                handle.hook.remove()
            else:
                keep.append(handle)
        hp.fwd_hooks = keep
        for sub in splice.modules():  # hooks a user left on the SAE's own hook points
            if isinstance(sub, HookPoint):
                sub.remove_hooks("both", including_permanent=True)
        del hp._modules["sae"]
    model.setup()


@contextlib.contextmanager
def splice_saes(model, saes: Mapping[str, Any], use_error_term: bool = True) -> Iterator[dict]:
    """``with splice_saes(model, {"blocks.1.hook_resid_post": sae}): ...`` splices each SAE for the
    duration of the block; yields ``{name: SAESplice}``."""
    added = []
    try:
        out = {}
        for name, sae in saes.items():
            out[name] = add_sae(model, name, sae, use_error_term=use_error_term)
            added.append(name)
        yield out
    finally:
        remove_saes(model, added)


class TinySAE(nn.Module):
    """A plain ReLU sparse autoencoder (``acts = relu((x - b_dec) W_enc + b_enc)``,
    ``x_hat = acts W_dec + b_dec``), enough to test splicing and for small experiments."""

    def __init__(self, d_in: int, d_sae: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(d_in, d_sae, generator=gen) / d_in**0.5
        self.W_enc = nn.Parameter(W.clone())
        self.W_dec = nn.Parameter(W.T.clone() / W.T.norm(dim=-1, keepdim=True))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, acts: Tensor) -> Tensor:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def train_sae(sae: nn.Module, acts: Tensor, steps: int = 300, lr: float = 3e-3, l1: float = 1e-3,
              batch_size: int = 256, seed: int = 0) -> list[float]:
    """Train ``sae`` on rows of ``acts`` ``[n, d]`` with MSE + ``l1`` x L1(features) (Adam).
    Returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    losses = []
    acts = acts.detach().reshape(-1, acts.shape[-1]).float()
    for _ in range(steps):
        batch = acts[torch.randint(0, acts.shape[0], (min(batch_size, acts.shape[0]),), generator=gen)]
        f = sae.encode(batch)
        loss = (sae.decode(f) - batch).pow(2).sum(-1).mean() + l1 * f.abs().sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


__all__ = ["SAESplice", "add_sae", "remove_saes", "splice_saes", "TinySAE", "train_sae"]
