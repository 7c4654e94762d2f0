"""docs/getting_started.md: every python snippet runs, and prints exactly the output shown under it."""

import contextlib
import io
import os
import re
from pathlib import Path

import pytest
import torch

from moelens.loading import bundled_models

DOC = Path(__file__).parent.parent / "docs" / "getting_started.md"


@pytest.mark.skipif("moelens-tiny-facts" not in bundled_models(), reason="bundled model absent")
def test_getting_started_snippets_print_what_the_page_shows(tmp_path):
    text = DOC.read_text()
    blocks = re.findall(r"```(python|text|bash)\n(.*?)```", text, re.S)
    pairs = [(code, blocks[i + 1][1] if i + 1 < len(blocks) and blocks[i + 1][0] == "text" else None)
             for i, (lang, code) in enumerate(blocks) if lang == "python"]
    assert len(pairs) >= 3
    ns: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    grad = torch.is_grad_enabled()  # the page turns gradients off globally: restore for the next tests
    try:
        for code, expected in pairs:
            if "write_image(" in code:  # needs kaleido + Chromium: tests/test_reports.py covers it
                continue
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                exec(compile(code, str(DOC), "exec"), ns)
            if expected is not None:
                assert buf.getvalue().split() == expected.split(), f"\n{code}\nprinted:\n{buf.getvalue()}"
    finally:
        os.chdir(cwd)
        torch.set_grad_enabled(grad)
