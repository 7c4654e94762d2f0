"""docs/attribution.md's first snippet runs as written, and its claim holds: with the same noise,
screen + verify of the top 10 finds the exact grid's top 5."""

import re
from pathlib import Path


def test_attribution_page_snippet():
    src = (Path(__file__).parent.parent / "docs" / "attribution.md").read_text()
    code = re.findall(r"```python\n(.*?)```", src, re.S)[0]
    ns: dict = {}
    exec(compile(code, "docs/attribution.md", "exec"), ns)
    a, s, g = ns["a"], ns["s"], ns["g"]
    assert a.scores.shape == g.scores.shape == s.scores.shape
    assert [(l, e) for l, e, _ in s.top(5)] == [(l, e) for l, e, _ in g.top(5)]
    assert max(abs(x[2] - y[2]) for x, y in zip(s.top(5), g.top(5))) < 1e-5
