"""Fact cases for causal tracing and their tokenisation.

A :class:`FactCase` is one factual prompt (subject already filled in) with the
true target and, optionally, a foil. The tracing metric is the true-vs-foil
logit contrast at the last prompt position, ``logit[t_true] - logit[t_foil]``,
where each target's token is the *first token of the target text as it
continues the prompt* (so word-initial tokens carry their leading space:
``"▁French"`` for sentencepiece, ``"ĠFrench"`` for byte-level BPE).

:func:`tokenize_case` turns a case into a :class:`TokenizedCase` with explicit
BOS handling, the subject's token positions and the target token ids.

Supported record layouts:

* ROME CounterFact (also the Hugging Face dataset ``azhx/counterfact``):
  ``{"case_id", "requested_rewrite": {"prompt": "... {} ...", "subject",
  "target_true": {"str"}, "target_new": {"str"}, "relation_id"}}``; the foil
  is ``target_new``.
* ``NeelNanda/counterfact-tracing`` (flat): ``prompt`` (filled in, equal to
  ``relation_prefix + subject + relation_suffix``), ``subject``,
  ``target_true``, ``target_false``, ``relation_id``; the subject and targets
  carry a leading space there, which is stripped so the same fact gives the
  same :class:`FactCase` as in the ROME layout. It has no case id.
* ROME ``known_1000.json``: ``known_id``, ``subject``, ``attribute`` (the
  target), ``prompt``, ``relation_id``; no foil.
* moelens' own :meth:`FactCase.to_dict` form.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

import torch

__all__ = [
    "FactCase",
    "TokenizedCase",
    "tokenize_case",
    "FactCaseWarning",
    "MultiTokenTargetWarning",
    "SameTargetTokenWarning",
    "TokenBoundaryWarning",
]


class FactCaseWarning(UserWarning):
    """Base class of the warnings raised while tokenising a fact case."""


class MultiTokenTargetWarning(FactCaseWarning):
    """A target is more than one token; only its first token enters the metric."""


class SameTargetTokenWarning(FactCaseWarning):
    """The true and foil targets start with the same token: the contrast is 0."""


class TokenBoundaryWarning(FactCaseWarning):
    """The prompt's tokens change when the target is appended (see :func:`tokenize_case`)."""


def _require_text(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a string with a non-space character."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"FactCase.{name} must be a non-empty string, got {value!r}")


@dataclass(frozen=True)
class FactCase:
    """One factual prompt with its true target and an optional foil.

    Contract: ``prompt``, ``subject`` and ``target_true`` are non-empty strings,
    ``target_foil`` is ``None`` or a non-empty string, and ``subject`` occurs in
    ``prompt`` (its first occurrence is the one traced). ``case_id`` is an
    ``int``, a ``str`` or ``None`` (integral numbers such as numpy ints become
    ``int``); ``relation`` is the relation id (e.g. Wikidata ``"P103"``) or ``None``.
    Violations raise ``ValueError``.
    """

    prompt: str
    subject: str
    target_true: str
    target_foil: str | None = None
    case_id: int | str | None = None
    relation: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target_true"):
            _require_text(name, getattr(self, name))
        if self.target_foil is not None:
            _require_text("target_foil", self.target_foil)
        if self.target_foil is not None and self.target_foil.strip() == self.target_true.strip():
            raise ValueError(
                f"FactCase.target_foil {self.target_foil!r} is the true target: the true-vs-foil contrast would be 0 "
                f"and every rescue NaN; give a different foil (or target_foil=None to trace the true target's probability)"
            )
        if self.relation is not None and not isinstance(self.relation, str):
            raise ValueError(f"FactCase.relation must be a string or None, got {self.relation!r}")
        object.__setattr__(self, "case_id", _normalise_case_id(self.case_id))
        if self.subject not in self.prompt:
            raise ValueError(
                f"FactCase.subject {self.subject!r} does not occur in FactCase.prompt {self.prompt!r}"
            )

    @property
    def subject_span(self) -> tuple[int, int]:
        """Character span ``[start, end)`` of the subject's first occurrence in the prompt."""
        start = self.prompt.index(self.subject)
        return start, start + len(self.subject)

    @classmethod
    def from_counterfact(cls, record: Mapping[str, Any]) -> FactCase:
        """Build a case from a CounterFact record, nested (ROME) or flat (NeelNanda).

        Raises ``KeyError`` for a missing field and ``ValueError`` for a record
        that is not a CounterFact layout or fails validation.
        """
        if "requested_rewrite" in record:
            return cls._from_rome(record)
        if "target_false" in record:
            return cls._from_flat(record)
        raise ValueError(
            "not a CounterFact record: expected a 'requested_rewrite' field (ROME layout) "
            f"or 'target_false' (NeelNanda/counterfact-tracing layout); keys: {sorted(record)}"
        )

    @classmethod
    def _from_rome(cls, record: Mapping[str, Any]) -> FactCase:
        """ROME nested layout: the prompt template holds exactly one ``{}``."""
        rewrite = record["requested_rewrite"]
        template = rewrite["prompt"]
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"requested_rewrite.prompt must hold exactly one '{{}}', got {template!r}")
        subject = rewrite["subject"]
        return cls(
            prompt=template.replace("{}", subject),
            subject=subject,
            target_true=rewrite["target_true"]["str"],
            target_foil=rewrite["target_new"]["str"],
            case_id=record.get("case_id"),
            relation=rewrite.get("relation_id"),
        )

    @classmethod
    def _from_flat(cls, record: Mapping[str, Any]) -> FactCase:
        """NeelNanda flat layout; leading spaces of subject and targets are stripped."""
        return cls(
            prompt=record["prompt"],
            subject=record["subject"].strip(),
            target_true=record["target_true"].strip(),
            target_foil=record["target_false"].strip(),
            case_id=record.get("case_id"),
            relation=record.get("relation_id"),
        )

    @classmethod
    def from_known(cls, record: Mapping[str, Any]) -> FactCase:
        """Build a foil-less case from a ROME ``known_1000.json`` record.

        ``prompt`` is the record's filled-in prompt, the target is ``attribute``,
        ``case_id`` is ``known_id`` and ``relation`` is ``relation_id``.
        """
        return cls(
            prompt=record["prompt"],
            subject=record["subject"],
            target_true=record["attribute"],
            target_foil=None,
            case_id=record.get("known_id"),
            relation=record.get("relation_id"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of all fields; inverse of :meth:`from_dict`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FactCase:
        """Inverse of :meth:`to_dict`. Unknown keys raise ``ValueError`` (no silent typos)."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown FactCase field(s): {sorted(unknown)}")
        return cls(**data)


def case_key(case: FactCase, index: int) -> str:
    """The key of ``case`` (the ``index``-th of its dataset) in a run directory's files: its
    ``case_id``, or ``"#index"`` when it has none."""
    return str(case.case_id) if case.case_id is not None else f"#{index}"


def _normalise_case_id(case_id: Any) -> int | str | None:
    """Return ``case_id`` as ``int``/``str``/``None``; other types raise ``ValueError``."""
    if case_id is None or isinstance(case_id, str):
        return case_id
    if isinstance(case_id, numbers.Integral) and not isinstance(case_id, bool):
        return int(case_id)
    raise ValueError(f"FactCase.case_id must be an int, a str or None, got {case_id!r}")


@dataclass
class TokenizedCase:
    """A fact case tokenised for one model.

    ``tokens`` is a ``[1, pos]`` LongTensor (BOS first iff ``prepend_bos``);
    ``subject_positions`` are the contiguous positions in ``tokens`` of every
    token overlapping the subject's characters; ``target_*_id`` are the first
    tokens of the targets as continuations of the prompt (``target_foil_id`` is
    ``None`` when the case has no foil); ``warnings`` holds the messages of the
    warnings issued while tokenising.
    """

    tokens: torch.Tensor
    str_tokens: list[str]
    subject_positions: list[int]
    target_true_id: int
    target_foil_id: int | None
    prepend_bos: bool
    warnings: list[str] = field(default_factory=list)

    @property
    def last_position(self) -> int:
        """Index of the last prompt token (where the metric is read)."""
        return self.tokens.shape[1] - 1

    @property
    def subject_last(self) -> int:
        """Index of the subject's last token."""
        return self.subject_positions[-1]


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text``, without special tokens."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoding["input_ids"]), [tuple(span) for span in encoding["offset_mapping"]]


def _subject_positions(offsets: list[tuple[int, int]], span: tuple[int, int], shift: int) -> list[int]:
    """Positions (plus ``shift``) of the tokens overlapping the character ``span``."""
    start, end = span
    hits = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    if not hits:
        raise ValueError(f"no token overlaps the subject's characters {span}")
    return list(range(hits[0] + shift, hits[-1] + shift + 1))


def _target_tokens(tokenizer: Any, prompt: str, prompt_ids: list[int], target: str) -> tuple[list[int], bool]:
    """Token ids of ``target`` as it continues ``prompt``, and whether the boundary was clean.

    The text ``prompt + sep + target`` is tokenised, where ``sep`` is ``" "``
    unless the target starts or the prompt ends with whitespace. When the
    prompt's own tokens are a prefix of that tokenisation, the target's tokens
    are the rest. Otherwise (the tokenisation of the prompt changes at the
    boundary) the fallback takes every token whose character span reaches past
    the end of the prompt, i.e. every token holding some of ``sep + target``,
    and the boundary is reported as not clean.
    """
    sep = "" if target[0].isspace() or prompt[-1].isspace() else " "
    ids, offsets = _encode(tokenizer, prompt + sep + target)
    if ids[: len(prompt_ids)] == prompt_ids and len(ids) > len(prompt_ids):
        return ids[len(prompt_ids) :], True
    return [i for i, (_, end) in zip(ids, offsets) if end > len(prompt)], False


def _warn(category: type[FactCaseWarning], message: str, record: list[str]) -> None:
    """Issue ``message`` as a ``category`` warning and append it to ``record``."""
    warnings.warn(message, category, stacklevel=4)
    record.append(message)


def _first_target_id(
    tokenizer: Any, case: FactCase, prompt_ids: list[int], label: str, target: str, record: list[str]
) -> int:
    """First token id of ``target`` continuing the prompt, warning on boundary change or multi-token."""
    ids, clean = _target_tokens(tokenizer, case.prompt, prompt_ids, target)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    if not clean:
        _warn(
            TokenBoundaryWarning,
            f"case {case.case_id!r}: the prompt's tokens change when {label} {target!r} is appended; "
            f"using the first token holding target characters, {pieces[0]!r}",
            record,
        )
    if len(ids) > 1:
        _warn(
            MultiTokenTargetWarning,
            f"case {case.case_id!r}: {label} {target!r} is {len(ids)} tokens {pieces}; "
            f"the metric uses the first, {pieces[0]!r}",
            record,
        )
    return ids[0]


def _check_distinct(tokenizer: Any, case: FactCase, true_id: int, foil_id: int, record: list[str]) -> None:
    """Warn (:class:`SameTargetTokenWarning`) when the true and foil first tokens coincide."""
    if foil_id == true_id:
        piece = tokenizer.convert_ids_to_tokens(true_id)
        _warn(
            SameTargetTokenWarning,
            f"case {case.case_id!r}: target_true {case.target_true!r} and target_foil "
            f"{case.target_foil!r} share their first token {piece!r}; the contrast is 0",
            record,
        )


def _check_tokenizer(tokenizer: Any, prepend_bos: bool) -> None:
    """Raise unless ``tokenizer`` is a fast tokenizer (offsets needed) with a BOS if one is asked for."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenize_case needs a fast (Rust-backed) tokenizer for character offsets")
    if prepend_bos and tokenizer.bos_token_id is None:
        raise ValueError(
            f"prepend_bos=True but the tokenizer {type(tokenizer).__name__} has no BOS token; "
            "use prepend_bos=False"
        )


def tokenize_case(tokenizer: Any, case: FactCase, prepend_bos: bool) -> TokenizedCase:
    """Tokenise ``case`` for a Hugging Face fast tokenizer.

    The prompt is tokenised with ``add_special_tokens=False``; when
    ``prepend_bos`` is true, ``tokenizer.bos_token_id`` is put first (a
    ``ValueError`` if the tokenizer has none), and nothing else is ever added.
    Subject positions cover every token whose character offsets overlap the
    subject's first occurrence. Target ids follow :func:`_target_tokens`.

    Warnings, each issued with :func:`warnings.warn` and kept in
    ``.warnings``: :class:`MultiTokenTargetWarning` (a target is several
    tokens), :class:`SameTargetTokenWarning` (true and foil share their first
    token), :class:`TokenBoundaryWarning` (the fallback of
    :func:`_target_tokens` was used).
    """
    _check_tokenizer(tokenizer, prepend_bos)
    prompt_ids, offsets = _encode(tokenizer, case.prompt)
    record: list[str] = []
    true_id = _first_target_id(tokenizer, case, prompt_ids, "target_true", case.target_true, record)
    foil_id = None
    if case.target_foil is not None:
        foil_id = _first_target_id(tokenizer, case, prompt_ids, "target_foil", case.target_foil, record)
        _check_distinct(tokenizer, case, true_id, foil_id, record)
    bos = [tokenizer.bos_token_id] if prepend_bos else []
    ids = bos + prompt_ids
    return TokenizedCase(
        tokens=torch.tensor([ids], dtype=torch.long),
        str_tokens=tokenizer.convert_ids_to_tokens(ids),
        subject_positions=_subject_positions(offsets, case.subject_span, shift=len(bos)),
        target_true_id=true_id,
        target_foil_id=foil_id,
        prepend_bos=prepend_bos,
        warnings=record,
    )
