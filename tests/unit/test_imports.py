"""Submodules import on their own, first thing in a fresh interpreter (as docs/models.md and docs/gpu.md
use them: `from moelens.preset_models import preset_summary`). `moelens/__init__.py` loads its public API
lazily; a submodule imported before it must not re-enter a module that is still initialising."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("code", [
    "import moelens.model; print(moelens.model.HookedMoETransformer.__name__)",
    "from moelens.preset_models import preset_summary; print(preset_summary('mixtral-8x7b')['architecture'])",
])
def test_submodule_first_in_a_fresh_interpreter(code):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] in ("HookedMoETransformer", "MixtralForCausalLM")


def test_submodule_attribute_does_not_shadow_the_api():
    import moelens
    import moelens.presets

    assert moelens.presets is sys.modules["moelens.presets"]
    assert moelens.HookedMoETransformer.__name__ == "HookedMoETransformer"
    assert "_importlib" not in moelens.__all__
