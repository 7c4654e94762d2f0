"""Alias of :mod:`moelens.plotting.trace_report` (the report of a ``moelens trace`` run), kept for
existing imports."""

from moelens.plotting.trace_report import MAX_CASES_IN_REPORT, build_trace_report, write_trace_report  # noqa: F401
