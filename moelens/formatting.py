"""Small text formatters shared by the command line, the reports and the figures."""

from __future__ import annotations

import math


def format_p(p, floor: float = 1e-4) -> str:
    """A p-value for people: ``"0.032"``, ``"< 1e-4"`` below ``floor``, ``"n/a"`` if NaN/None.

    Permutation and bootstrap p-values cannot be smaller than about ``1 / n_resamples``, so a
    printed ``0.000`` would claim more than the test shows."""
    try:
        p = float(p)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(p):
        return "n/a"
    if p < floor:
        return f"< {floor:.0e}".replace("e-0", "e-")
    if p < 0.001:
        return f"{p:.1e}".replace("e-0", "e-")
    return f"{p:.3f}" if p < 0.1 else f"{p:.2f}"
