"""Rotary position embeddings: half-split (NeoX) and interleaved layouts, default and YaRN frequencies.

``cos``/``sin`` are computed in fp32. The half-split layout casts them to the model dtype before
rotating (as transformers does); the interleaved layout (DeepSeek-V2) rotates in fp32 and casts
the result back.

Two arithmetics (``cfg.rope_arith``) for the same rotation:

* ``"real"``: ``cos``/``sin`` from ``torch.cos``/``torch.sin``, the rotation written with real
  products (:func:`apply_rope_interleaved`; the readable reference).
* ``"complex"`` (DeepSeek-V2, as transformers' ``DeepseekV2RotaryEmbedding`` / ``apply_rotary_emb``):
  ``cos + i sin = torch.polar(1, angle)``, which calls the C library's ``cosf``/``sinf`` (torch's
  vectorised ``cos``/``sin`` differ from them in the last fp32 bit for some angles), and the pairs
  rotated by an fp32 complex multiply (:func:`apply_rope_complex`). Mathematically the same as
  ``"real"``; the last fp32 bit can differ, which a bf16 cast turns into one bf16 ulp now and then.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(dim: int, theta: float, yarn: Optional[dict] = None) -> tuple[Tensor, float]:
    """Inverse frequencies ``[dim/2]`` and the cos/sin ``attention_factor`` (1.0 without YaRN).
    ``yarn``: the scaling parameters, YaRN unless ``rope_type`` is ``"llama3"`` (Llama 3 / 4)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (theta**exponents)
    if not yarn:
        return inv_freq, 1.0
    if yarn.get("rope_type") == "longrope":
        # transformers' PhiMoE rotary embedding always divides by the short factors (its init function is
        # called without a sequence length); only the cos/sin scale switches, see longrope_mscale
        ext = torch.tensor(yarn["short_factor"], dtype=torch.float32)
        return 1.0 / (ext * theta**exponents), float(yarn["short_mscale"])
    if yarn.get("rope_type") == "llama3":
        return llama3_frequencies(inv_freq, yarn), 1.0
    factor = float(yarn["factor"])
    orig = float(yarn["original_max_position_embeddings"])
    beta_fast = float(yarn.get("beta_fast") or 32)
    beta_slow = float(yarn.get("beta_slow") or 1)
    mscale, mscale_all = yarn.get("mscale"), yarn.get("mscale_all_dim")
    if yarn.get("attention_factor") is not None:
        attention_factor = float(yarn["attention_factor"])
    elif mscale and mscale_all:
        attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
    else:
        attention_factor = _yarn_mscale(factor)

    def corr_dim(n_rot: float) -> float:
        return (dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    inv_interp = 1.0 / (factor * theta**exponents)
    inv_freq = inv_interp * (1 - keep) + inv_freq * keep
    return inv_freq, attention_factor


def longrope_mscale(rope: Optional[dict], positions: Tensor, default: float) -> float:
    """PhiMoE's cos/sin scale: ``long_mscale`` once the forward's largest position + 1 exceeds
    ``original_max_position_embeddings``, else ``short_mscale`` (``default`` without LongRoPE)."""
    if not rope or rope.get("rope_type") != "longrope":
        return default
    long = int(positions.max()) + 1 > rope["original_max_position_embeddings"]
    return float(rope["long_mscale"] if long else rope["short_mscale"])


def llama3_frequencies(inv_freq: Tensor, params: dict) -> Tensor:
    """transformers' ``_compute_llama3_parameters``: long wavelengths divided by ``factor``, short ones
    kept, the band between smoothly interpolated."""
    factor, low, high = float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_context = float(params["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def proportional_frequencies(head_dim: int, theta: float, proportion: float) -> Tensor:
    """transformers' "proportional" RoPE (Gemma 4's full-attention layers): ``head_dim / 2``
    frequencies, the leading ``int(proportion * head_dim // 2)`` being ``theta ** (-2i / head_dim)``
    (exponents over the whole head) and the rest 0 (those pairs do not rotate); used with the
    half-split rotation over the whole head."""
    n_rot = int(proportion * head_dim // 2)
    rotated = 1.0 / (theta ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.int64).float() / head_dim))
    return torch.cat([rotated, torch.zeros(head_dim // 2 - n_rot)])


def yarn_softmax_scale(yarn: Optional[dict]) -> float:
    """DeepSeek's extra softmax-scale multiplier ``mscale(factor, mscale_all_dim)**2`` (1.0 if none)."""
    if not yarn or not yarn.get("mscale_all_dim"):
        return 1.0
    m = _yarn_mscale(float(yarn["factor"]), float(yarn["mscale_all_dim"]))
    return m * m


def rope_cos_sin(
    positions: Tensor, inv_freq: Tensor, attention_factor: float, arith: str = "real"
) -> tuple[Tensor, Tensor]:
    """fp32 angles ``[.., pos, dim/2]`` -> (cos, sin) each scaled by ``attention_factor``.

    ``arith="complex"``: the real and imaginary parts of ``torch.polar(1, angles) * attention_factor``
    (transformers' DeepSeek-V2 ``freqs_cis``), bit for bit."""
    angles = positions.float()[..., None] * inv_freq.to(positions.device)
    if arith == "complex":
        freqs_cis = torch.polar(torch.ones_like(angles), angles) * attention_factor
        return freqs_cis.real.contiguous(), freqs_cis.imag.contiguous()
    if arith != "real":
        raise ValueError(f"unknown rope_arith {arith!r} (real, complex)")
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Half-split rotation of ``x [batch, pos, head, d]``: dim ``j`` pairs with ``j + d/2``."""
    cos = torch.cat([cos, cos], -1).to(x.dtype)[:, :, None, :]
    sin = torch.cat([sin, sin], -1).to(x.dtype)[:, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def apply_rope_half_fp32(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """:func:`apply_rope_half` with fp32 cos/sin (``x`` promoted), cast back to ``x``'s dtype after the
    rotation (OLMo-2 / FlexOlmo: transformers keeps their cos/sin in fp32)."""
    cos = torch.cat([cos, cos], -1)[:, :, None, :]
    sin = torch.cat([sin, sin], -1)[:, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def apply_rope_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Interleaved rotation (pairs ``2i, 2i+1``) of ``x [batch, pos, head, d]`` in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
    return out.to(x.dtype)


def apply_rope_complex(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """:func:`apply_rope_interleaved` as transformers' DeepSeek-V2 ``apply_rotary_emb`` computes it:
    pairs ``(2i, 2i+1)`` of ``x [batch, pos, head, d]`` viewed as complex numbers in fp32 and
    multiplied by ``cos + i sin``, in the ``[batch, head, pos, d/2]`` layout transformers uses (the
    CPU kernel's vectorised body and its scalar tail round ``a c - b s`` differently, so the layout
    decides which elements get which rounding), cast back to ``x``'s dtype."""
    xh = x.transpose(1, 2).float()  # [batch, head, pos, d]: transformers' q_pe / k_pe layout
    pairs = xh.reshape(*xh.shape[:-1], -1, 2)
    if pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1]):
        pairs = pairs.contiguous()  # a complex view needs even offsets (transformers would fail here)
    xc = torch.view_as_complex(pairs)
    freqs_cis = torch.complex(cos, sin)[:, None]  # [batch, 1, pos, d/2]
    out = torch.view_as_real(xc * freqs_cis).flatten(3).to(x.dtype)
    return out.transpose(1, 2)


def apply_rope_deinterleave(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """DeepSeek-V3's interleaved rotation (transformers ``apply_rotary_pos_emb_interleave``): pairs
    ``(2i, 2i+1)`` rotated **in x's dtype** with cos/sin cast to it, the output written de-interleaved,
    ``[a cos - b sin (all i) || b cos + a sin (all i)]``. ``q . k`` equals the interleaved result's; the
    layout of the rotated dims differs (both q and k get it)."""
    c = cos.to(x.dtype)[:, :, None, :]
    s = sin.to(x.dtype)[:, :, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def rope_fn(cfg):
    """The rotation ``cfg`` selects (``rope_deinterleave``, ``rope_interleaved``, ``rope_arith``)."""
    if cfg.rope_deinterleave:
        return apply_rope_deinterleave
    if cfg.rope_interleaved:
        return apply_rope_complex if cfg.rope_arith == "complex" else apply_rope_interleaved
    return apply_rope_half_fp32 if getattr(cfg, "rope_fp32", False) else apply_rope_half


def apply_rope_partial(x: Tensor, cos: Tensor, sin: Tensor, rope) -> Tensor:
    """``rope`` on the leading ``2 * cos.shape[-1]`` dims of each head; the rest passes through."""
    d = 2 * cos.shape[-1]
    if d == x.shape[-1]:
        return rope(x, cos, sin)
    return torch.cat([rope(x[..., :d], cos, sin), x[..., d:]], dim=-1)
