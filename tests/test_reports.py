"""One self-contained HTML report per run (demo, trace, audit), opened in a real headless Chromium.

The browser checks need selenium (dev extras) and Debian's chromium + chromium-driver (`.ci/run`
installs them); without a browser they skip, saying what to install."""

import re
import shutil
from pathlib import Path

import pytest

from moelens.cli import main
from moelens.loading import bundled_models

pytestmark = pytest.mark.skipif("moelens-tiny-facts" not in bundled_models(), reason="bundled model absent")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    facts = bundled_models()["moelens-tiny-facts"] / "facts.jsonl"
    out = {}
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--out", str(root / "demo"), "--n-facts", "2", "--samples", "2"]) == 0
    out["demo"] = root / "demo"
    out["demo_stdout"] = printed.getvalue()
    assert main(["trace", "--model", "moelens-tiny-facts", "--facts", str(facts), "--limit", "8",
                 "--out", str(root / "trace"), "--bootstrap", "100", "--permutations", "100"]) == 0
    out["trace"] = root / "trace"
    audit = ["audit", "--model", "moelens-tiny-facts", "--out", str(root / "audit"), "--layers", "1,3",
             "--n-positions", "3", "--max-tokens", "120", "--no-progress"]
    if _can_export():  # the CLI's static export: every figure of the report as an SVG next to it
        audit += ["--image-format", "svg"]
    assert main(audit) == 0
    out["audit"] = root / "audit"
    return out


def _can_export() -> bool:
    from moelens.report import chromium_path

    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    return chromium_path() is not None


def test_cli_image_format_writes_every_figure(runs):
    if not _can_export():
        pytest.skip("static export needs kaleido (dev extras) and Chromium (apt-get install chromium)")
    text = (runs["audit"] / "report.html").read_text()
    names = re.findall(r'class="ml-plot" id="fig\d+" data-name="([^"]+)"', text)
    assert names and sorted(p.stem for p in runs["audit"].glob("*.svg")) == sorted(names)


def _plotly_js_count(text: str) -> int:
    from plotly.offline import get_plotlyjs

    return text.count(get_plotlyjs()[:300])


@pytest.mark.parametrize("run", ["demo", "trace", "audit"])
def test_one_self_contained_report_per_run(runs, run):
    d = runs[run]
    assert [p.name for p in d.glob("*.html")] == ["report.html"]
    text = (d / "report.html").read_text()
    assert _plotly_js_count(text) == 1  # plotly.js once per report, not once per figure
    # offline: no external scripts or stylesheets
    assert not re.search(r"<script[^>]*\bsrc=", text) and not re.search(r"<link[^>]*\bhref=", text)
    n_fig = text.count('class="ml-plot"')
    assert n_fig >= 3 and text.count("How to read this.") == n_fig
    assert "Settings" in text and "<table" in text


def test_demo_console_and_reports_say_the_run_time_and_cut_nothing(runs):
    import json

    printed = runs["demo_stdout"]
    lines = printed.splitlines()
    start = lines.index(next(l for l in lines if l.startswith("fact ")))
    facts = lines[start + 1:start + 3]
    assert all(re.match(r".+ -> .+ \(vs [^)]+\) +\S+ +\S+$", l) for l in facts), facts  # never cut
    assert re.search(r"the run took \d", printed) and "greedy (" in printed
    assert "Run time: " in (runs["demo"] / "report.html").read_text()
    assert json.loads((runs["trace"] / "summary.json").read_text())["run_seconds"] > 0
    assert "Run time: " in (runs["trace"] / "report.html").read_text()
    assert "Run time: " in (runs["audit"] / "report.html").read_text()


def test_demo_report_has_every_fact(runs, capsys):
    text = (runs["demo"] / "report.html").read_text()
    options = re.findall(r'<option value="\d+">', text)
    assert len(options) == 2  # --n-facts 2: both facts, not only the first
    assert text.count('class="ml-panel"') == 2


def _driver():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: pip install -e '.[dev]'")
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver") or (Path("/usr/bin/chromedriver") if Path("/usr/bin/chromedriver").exists() else None)
    if browser is None or driver is None:
        pytest.skip("no headless browser: apt-get install chromium chromium-driver (.ci/run installs them)")
    import tempfile

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
              f"--user-data-dir={tempfile.mkdtemp()}", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(driver)), options=opts)


@pytest.fixture(scope="module")
def browser():
    d = _driver()
    yield d
    d.quit()


def _visible_plots(browser):
    from selenium.webdriver.common.by import By

    return [p for p in browser.find_elements(By.CSS_SELECTOR, ".ml-plot") if p.is_displayed()]


def _check_drawn_at_page_width(browser, plots):
    """Every plot is drawn (an SVG with data) and spans the page's content width; nothing overflows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 60).until(lambda b: all(p.get_attribute("data-drawn") == "1" for p in plots))
    content = browser.execute_script("return document.querySelector('h1').getBoundingClientRect().width")
    for p in plots:
        assert p.find_elements(By.CSS_SELECTOR, ".main-svg"), p.get_attribute("id")
        assert browser.execute_script("return arguments[0].data.length", p) > 0
        svg_width = browser.execute_script("return arguments[0].querySelector('.main-svg').getBoundingClientRect().width", p)
        assert svg_width >= 0.95 * content, (p.get_attribute("data-name"), svg_width, content)
        assert p.size["height"] > 100
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")


@pytest.mark.parametrize("width", [1400, 1000])
@pytest.mark.parametrize("run", ["demo", "trace", "audit"])
def test_report_draws_every_figure_in_chromium(runs, browser, run, width):
    """Each figure is drawn at the page's width (at 1400 px and a laptop's 1000 px), those behind a
    selector when their option is shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.set_window_size(width, 1000)
    browser.get((runs[run] / "report.html").resolve().as_uri())
    assert browser.find_elements(By.CSS_SELECTOR, ".ml-plot")
    _check_drawn_at_page_width(browser, _visible_plots(browser))
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors
    # every option of every selector shows its own panel, and its figures are drawn and visible
    for sel in browser.find_elements(By.TAG_NAME, "select"):
        group = sel.get_attribute("data-group")
        for opt in Select(sel).options:
            Select(sel).select_by_value(opt.get_attribute("value"))
            panels = browser.find_elements(By.CSS_SELECTOR, f'.ml-panel[data-group="{group}"]')
            shown = [p for p in panels if p.is_displayed()]
            assert len(shown) == 1 and shown[0].get_attribute("data-index") == opt.get_attribute("value")
            _check_drawn_at_page_width(browser, shown[0].find_elements(By.CSS_SELECTOR, ".ml-plot"))
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_static_export_with_system_chromium(tmp_path):
    pytest.importorskip("kaleido", reason="static export needs kaleido: pip install -e '.[dev]'")
    from moelens import plotting
    from moelens.report import Report, chromium_path

    if chromium_path() is None:
        pytest.skip("static export needs Chromium: apt-get install chromium")
    from moelens.plotting.style import EXPORT_WIDTH

    rep = Report("export")
    rep.add_figure(plotting.layer_curve([0.1, 0.5], layers=[0, 1]), "a curve", name="curve")
    heat = plotting.expert_rescue_heatmap([[0.1, 0.2], [0.3, -0.4]], layers=[0, 1])
    rep.add_figure(heat, "a heatmap", name="heat")
    rep.write(tmp_path / "report.html", image_format="svg")
    svg = (tmp_path / "curve.svg").read_text()
    assert svg.lstrip().startswith("<svg") and "layer" in svg
    # a page-wide figure is exported at EXPORT_WIDTH and at its own height (kaleido's default is 700 x 500)
    head = (tmp_path / "heat.svg").read_text()[:400]
    assert f'width="{EXPORT_WIDTH}"' in head and f'height="{heat.layout.height}"' in head, head


def test_trace_report_lists_every_case(runs):
    """Figures stop at MAX_CASES_IN_REPORT cases; the collapsed table lists every traced case."""
    import json

    d = runs["trace"]
    keys = {json.loads(line)["key"] for p in d.glob("experts*.jsonl") for line in p.read_text().splitlines() if line}
    text = (d / "report.html").read_text()
    m = re.search(r"<details><summary>Every traced case \((\d+)\)[^<]*</summary>(.*?)</details>", text, re.S)
    assert m and int(m.group(1)) == len(keys) > 0
    body = m.group(2).split("<tbody>")[1]
    assert body.count("<tr") == len(keys)
    assert "best expert rescue" in m.group(2) and "layer rescue" in m.group(2)
