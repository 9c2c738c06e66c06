"""The README's example runs on the default model and its interventions change the answer."""

import runpy
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).parents[1] / "docs" / "examples" / "steer_cap_project.py"


def test_steer_cap_project_example(capsys):
    ns = runpy.run_path(str(EXAMPLE))
    assert ns["plain"] and ns["steered"] != ns["plain"] and ns["capped"] != ns["steered"]
    assert ns["scores"].shape == (ns["ids"].shape[1],)
    assert "plain:" in capsys.readouterr().out
