"""Exceptions that mean "the user asked for something that cannot be done", not "moelens is broken".

The command line prints these as one line and exits with status 2 (``--debug`` shows the
traceback); library callers can catch :class:`MoelensUserError`.
"""

from __future__ import annotations


class MoelensUserError(ValueError):
    """Bad input or settings: a missing file, a layer out of range, a settings mismatch, a
    device that is not available. The message says what to do."""


class CheckpointError(ValueError):
    """The checkpoint does not fit the model: missing/unexpected keys, shapes, formats."""
