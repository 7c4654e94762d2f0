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


def format_number(v, digits: int = 3) -> str:
    """A number for people, to ``digits`` significant digits: ``9.444 -> "9.44"``,
    ``-0.02994 -> "-0.0299"``, ``0.13251777 -> "0.133"``, ``11.39 -> "11.4"``, ``1234.5 -> "1230"``;
    scientific only outside ``[1e-4, 1e6)`` (``"1.23e-05"``). Integers (and bools) print whole,
    NaN/None as ``"n/a"``, infinities as ``"inf"``/``"-inf"``. Used by every table, figure label,
    settings listing and console summary, so one run prints one precision."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:  # numpy / torch scalars
        v = v.item()
    if isinstance(v, int):
        return str(v)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    mag = math.floor(math.log10(abs(v)))
    rounded = round(v, digits - 1 - mag)
    if rounded != 0:
        mag = math.floor(math.log10(abs(rounded)))  # 9.996 rounds up to 10.0: one more integer digit
    if not -4 <= mag < 6:
        return f"{v:.{digits - 1}e}"
    decimals = max(0, digits - 1 - mag)
    out = f"{round(v, digits - 1 - mag):.{decimals}f}"
    return "0" if out in ("-0", "0") else out


def format_settings_value(v, digits: int = 3) -> str:
    """A settings value for a report or a console line: floats (also inside lists and dicts) to
    ``digits`` significant digits (:func:`format_number`), everything else as JSON-ish text."""
    if isinstance(v, float):
        return format_number(v, digits)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_settings_value(x, digits) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {format_settings_value(x, digits)}" for k, x in v.items()) + "}"
    if v is None:
        return "none"
    if isinstance(v, str):
        return v
    return str(v)
