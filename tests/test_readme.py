"""The README's quick tour runs as written."""

import contextlib
import io
import re
from pathlib import Path

import pytest

from moelens.loading import bundled_models


@pytest.mark.skipif("moelens-tiny-facts" not in bundled_models(), reason="bundled model absent")
def test_readme_quick_tour_runs():
    src = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"## Quick tour\n\n```python\n(.*?)```", src, re.S).group(1)
    expected = re.search(r"## Quick tour\n\n```python\n.*?```\n\nprints[^\n]*\n\n```text\n(.*?)```", src, re.S).group(1)
    ns = {}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "README.md", "exec"), ns)
    assert buf.getvalue().split() == expected.split(), buf.getvalue()
    assert ns["r"].scores.shape[0] == ns["model"].cfg.n_layers
    assert ns["e"].scores.shape == (ns["model"].cfg.n_experts,)
