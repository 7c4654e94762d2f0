"""What the `moelens` commands share (``moelens.cli`` and ``moelens.audit.cli`` both import it, so
neither imports the other): the help formatter. Light: argparse only."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default; keeps the descriptions' line breaks. Flags (``--bos``,
    ``--no-bos``), options without a default (None) and help texts that already say what the
    default is get no second, misleading ``(default: ...)``."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)
