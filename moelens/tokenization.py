"""TransformerLens' tokenizer API on :class:`moelens.HookedMoETransformer`.

The methods of TransformerLens' ``HookedTransformer`` with its signatures and results
(``to_tokens``, ``to_string``, ``to_str_tokens``, ``to_single_token``, ``to_single_str_token``,
``get_token_position``, ``set_tokenizer``, ``input_to_embed``), plus moelens' :meth:`TokenizerMethods.tokenize`, which
also returns the attention mask. Differences from TransformerLens, all deliberate:

* BOS is prepended by moelens itself (``prepend_bos``, default ``cfg.default_prepend_bos`` when the
  tokenizer has a BOS token), never by the tokenizer, so ``prepend_bos=False`` never has to strip
  a token the tokenizer added.
* ``to_str_tokens`` of a ``[batch, pos]`` tensor or array with ``batch > 1`` returns one list per
  row (TransformerLens raises); a list of token ids is one sequence.
* ``get_token_position`` raises :class:`TokenNotFoundError` (an ``AssertionError``, as in
  TransformerLens, and a ``ValueError``) naming the token and the prompt's tokens.

Padding follows ``tokenizer.padding_side`` (as loaded from the checkpoint, or as you set it) in
``to_tokens``, ``to_str_tokens`` and the forward of a list of texts; ``padding_side=`` overrides it.
:meth:`TokenizerMethods.tokenize` (moelens' own batching, used by tracing and steering) pads left
unless told otherwise, so the last position is every prompt's last token.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

TextInput = Union[str, Sequence[str]]


class TokenNotFoundError(ValueError, AssertionError):
    """``get_token_position``: the token is not in the prompt (an AssertionError as in TransformerLens)."""


def _is_text(x: Any) -> bool:
    return isinstance(x, str) or (isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(s, str) for s in x))


class TokenizerMethods:
    """Mixed into :class:`moelens.HookedMoETransformer` (needs ``self.tokenizer``, ``self.cfg``)."""

    tokenizer: Any

    # ------------------------------------------------------------------ tokenizer
    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(
                "This model has no tokenizer (the checkpoint directory had no tokenizer files). "
                "Pass token ids, or call `model.set_tokenizer(AutoTokenizer.from_pretrained(...))`."
            )
        return self.tokenizer

    def set_tokenizer(self, tokenizer, default_padding_side: Optional[str] = None) -> None:
        """Use ``tokenizer`` (a transformers tokenizer) from now on, as TransformerLens'
        ``set_tokenizer``: ``default_padding_side`` (``"left"``/``"right"``) sets
        ``tokenizer.padding_side`` (else the tokenizer's own, else ``"right"``); a missing pad token
        becomes the EOS token. Its ids must fit the embedding (``len(tokenizer) <= cfg.d_vocab``)."""
        from transformers import PreTrainedTokenizerBase

        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"{type(tokenizer).__name__} is not a transformers tokenizer (PreTrainedTokenizerBase)")
        if default_padding_side not in ("left", "right", None):
            raise ValueError(f"default_padding_side must be 'left', 'right' or None, got {default_padding_side!r}")
        if len(tokenizer) > self.cfg.d_vocab:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {self.cfg.d_vocab}: "
                "its ids would index past the embedding; use the checkpoint's own tokenizer"
            )
        if default_padding_side is not None:
            tokenizer.padding_side = default_padding_side
        if tokenizer.padding_side is None:
            tokenizer.padding_side = "right"
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer

    def default_prepend_bos(self) -> bool:
        tok = self.tokenizer
        return bool(self.cfg.default_prepend_bos and tok is not None and tok.bos_token_id is not None)

    def _padding_side(self, padding_side: Optional[str]) -> str:
        side = padding_side if padding_side is not None else getattr(self.tokenizer, "padding_side", None) or "right"
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        return side

    # ------------------------------------------------------------------ text -> tokens
    def tokenize(
        self, text: TextInput, prepend_bos: Optional[bool] = None, padding_side: Optional[str] = "left"
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """``(tokens, attention_mask)``; batches are padded (left by default, so the last position
        is every prompt's last token; ``padding_side=None`` follows ``tokenizer.padding_side``).
        BOS is prepended explicitly when ``prepend_bos`` (default: ``cfg.default_prepend_bos``
        when the tokenizer has a BOS token)."""
        tok = self._require_tokenizer()
        side = self._padding_side(padding_side)
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("tokenize needs a string or a non-empty list of strings")
        bos = self.default_prepend_bos() if prepend_bos is None else prepend_bos
        if bos and tok.bos_token_id is None:
            raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
        ids = [([tok.bos_token_id] if bos else []) + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        n = max(len(i) for i in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (self.cfg.pad_token_id or 0)
        tokens = torch.full((len(ids), n), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), n), dtype=torch.long)
        for row, seq in enumerate(ids):
            sl = slice(n - len(seq), n) if side == "left" else slice(0, len(seq))
            tokens[row, sl] = torch.tensor(seq, dtype=torch.long)
            mask[row, sl] = 1
        device = self.rope_inv_freq.device
        return tokens.to(device), mask.to(device)

    def to_tokens(
        self, input: TextInput, prepend_bos: Optional[bool] = None, padding_side: Optional[str] = None,
        move_to_device: bool = True, truncate: bool = True,
    ) -> Int[Tensor, "batch pos"]:
        """Tokens ``[batch, pos]`` (int64), as TransformerLens: a list of texts is padded on
        ``padding_side`` (default ``tokenizer.padding_side``). Use :meth:`tokenize` to also get the
        attention mask. ``move_to_device=False`` keeps the tokens on the CPU; ``truncate=True`` keeps
        the first ``cfg.n_ctx`` tokens (the checkpoint's ``max_position_embeddings``; no limit when
        the config has none)."""
        tokens = self.tokenize(input, prepend_bos=prepend_bos, padding_side=self._padding_side(padding_side))[0]
        if truncate and self.cfg.n_ctx is not None and tokens.shape[-1] > self.cfg.n_ctx:
            tokens = tokens[:, : self.cfg.n_ctx]
        return tokens if move_to_device else tokens.cpu()

    def input_attention_mask(
        self, tokens: Int[Tensor, "batch pos"], prepend_bos: Optional[bool] = None
    ) -> Optional[Int[Tensor, "batch pos"]]:
        """The mask TransformerLens builds for token input when ``tokenizer.padding_side`` is
        ``"left"``: leading pad tokens are masked (a BOS that shares the pad id is kept when BOS
        is prepended). ``None`` when nothing is masked or the padding side is right (trailing
        pads cannot affect earlier positions)."""
        tok = self.tokenizer
        if tok is None or getattr(tok, "padding_side", "right") != "left" or tok.pad_token_id is None:
            return None
        if tokens.ndim != 2 or tokens.device.type == "meta" or not bool((tokens[:, 0] == tok.pad_token_id).any()):
            return None  # (a meta skeleton's tokens have no values to look at)
        from transformer_lens.utilities.tokenize_utils import get_attention_mask

        bos = self.default_prepend_bos() if prepend_bos is None else prepend_bos
        mask = get_attention_mask(tok, tokens, bos, padding_side="left")
        return None if bool(mask.all()) else mask

    def input_to_embed(self, input, prepend_bos: Optional[bool] = None, padding_side: Optional[str] = None,
                       attention_mask: Optional[Tensor] = None):
        """TransformerLens' ``input_to_embed``: ``(residual, tokens, None, attention_mask)``, the
        residual stream entering block 0 (``hook_embed`` applied; no separate positional stream,
        hence ``None``) and the mask TransformerLens would use (leading pads masked when the
        tokenizer pads left). ``model(residual, attention_mask=mask, start_at_layer=0)`` resumes the pass."""
        if _is_text(input):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        else:
            tokens = input[None] if input.ndim == 1 else input
        if attention_mask is None:
            attention_mask = self.input_attention_mask(tokens, prepend_bos)
        residual = self(tokens, attention_mask=attention_mask, stop_at_layer=0)
        return residual, tokens, None, attention_mask

    # ------------------------------------------------------------------ tokens -> text
    def to_string(self, tokens: Union[Tensor, np.ndarray, Sequence[int], Sequence[Sequence[int]]]) -> Union[str, list[str]]:
        """One string for a token sequence ``[pos]`` (or a single id), a list of strings for
        ``[batch, pos]``; lists and numpy arrays are accepted (TransformerLens)."""
        tok = self._require_tokenizer()
        t = tokens if isinstance(tokens, Tensor) else torch.as_tensor(np.asarray(tokens))
        if t.ndim == 2:
            return tok.batch_decode(t.tolist(), clean_up_tokenization_spaces=False)
        if t.ndim <= 1:
            return tok.decode(t.reshape(-1).tolist(), clean_up_tokenization_spaces=False)
        raise ValueError(f"to_string takes [pos] or [batch, pos] tokens, got shape {tuple(t.shape)}")

    def to_str_tokens(
        self, input: Union[str, Tensor, np.ndarray, list], prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
    ) -> Union[list[str], list[list[str]]]:
        """Each token decoded on its own. A string gives its tokens (BOS by ``prepend_bos``); tokens
        ``[pos]``, ``[1, pos]`` or a single id give one list; ``[batch, pos]`` (batch > 1) one list per
        row; a list of strings, tensors or arrays one list per item; a list of ints is one sequence."""
        tok = self._require_tokenizer()
        if isinstance(input, (list, tuple)):
            if all(isinstance(i, (int, np.integer)) for i in input) and len(input) > 0:
                ids = [int(i) for i in input]
            else:
                return [self.to_str_tokens(item, prepend_bos, padding_side) for item in input]
        elif isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)[0].tolist()
        elif isinstance(input, (Tensor, np.ndarray)):
            t = input if isinstance(input, Tensor) else torch.as_tensor(input)
            if t.is_floating_point() and not bool((t == t.round()).all()):
                raise TypeError("to_str_tokens: token ids must be integers")
            t = t.squeeze() if t.ndim > 1 else t
            if t.ndim == 2:
                return [self.to_str_tokens(row, prepend_bos, padding_side) for row in t]
            if t.ndim > 2:
                raise ValueError(f"to_str_tokens takes [pos] or [batch, pos] tokens, got shape {tuple(input.shape)}")
            ids = [int(i) for i in t.reshape(-1).tolist()]
        elif isinstance(input, (int, np.integer)):
            ids = [int(input)]
        else:
            raise TypeError(f"to_str_tokens takes a string, tokens or a list of them, got {type(input).__name__}")
        return tok.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (no BOS); ``ValueError`` otherwise."""
        ids = self._require_tokenizer()(string, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens, not one: {ids}")
        return ids[0]

    def to_single_str_token(self, int_token: int) -> str:
        """The string of one token id."""
        if not isinstance(int_token, (int, np.integer)) or isinstance(int_token, bool):
            raise TypeError(f"to_single_str_token takes one int token id, got {type(int_token).__name__}")
        return self.to_str_tokens(torch.tensor([int(int_token)]))[0]

    def get_token_position(
        self, single_token: Union[str, int, Tensor], input: Union[str, Tensor], mode: str = "first",
        prepend_bos: Optional[bool] = None, padding_side: Optional[str] = None,
    ) -> int:
        """Position of ``single_token`` (a token id, or a string of exactly one token) in ``input``
        (a string, tokenised with ``prepend_bos``, or tokens ``[pos]`` / ``[1, pos]``): the first or,
        with ``mode="last"``, the last occurrence. Raises :class:`TokenNotFoundError` if absent."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', not {mode!r}")
        tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side) if isinstance(input, str) else input
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"If tokens are rank two, they must have shape [1, seq_len], not {tuple(tokens.shape)}")
            tokens = tokens[0]
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        elif isinstance(single_token, Tensor):
            single_token = int(single_token.item())
        indices = torch.arange(len(tokens), device=tokens.device)[tokens == single_token]
        if len(indices) == 0:
            shown = self.to_str_tokens(tokens) if self.tokenizer is not None else tokens.tolist()
            raise TokenNotFoundError(
                f"The token does not occur in the prompt: token {single_token} is not among {shown}"
                + (" (prepend_bos decides whether BOS is there)" if isinstance(input, str) else "")
            )
        return int(indices[0 if mode == "first" else -1].item())
