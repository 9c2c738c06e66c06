"""The A/B, interchange and conditional-steering examples of docs/ab_interchange_conditional.md run on the default model."""

import runpy
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).parents[1] / "docs"
EXAMPLES = DOCS / "examples"


def test_the_docs_show_the_example_files_verbatim():
    text = (DOCS / "ab_interchange_conditional.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert [b.splitlines()[0] for b in blocks] == [f"# docs/examples/{n}.py" for n in ("ab_propensity", "interchange", "conditional")]
    for block in blocks:
        source = (DOCS.parent / block.splitlines()[0][2:]).read_text()
        body = source.split('"""', 2)[2].lstrip("\n")  # after the module docstring
        assert block.split("\n", 1)[1] == body


@pytest.mark.slow
def test_ab_propensity_example(capsys):
    ns = runpy.run_path(str(EXAMPLES / "ab_propensity.py"))
    curve = ns["entry"]["curve"]
    assert [p["multiplier"] for p in curve] == [-2.0, 0.0, 2.0]
    assert curve[0]["p_match"] != curve[2]["p_match"]
    assert "80 questions, matching letters {'A': 40, 'B': 40}" in capsys.readouterr().out


@pytest.mark.slow
def test_interchange_example(capsys):
    ns = runpy.run_path(str(EXAMPLES / "interchange.py"))
    assert all(torch.equal(ns["from_gguf"][l], ns["vectors"][l]) for l in ns["layers"])
    assert "GGUF round trip exact: True" in capsys.readouterr().out


@pytest.mark.slow
def test_conditional_example():
    ns = runpy.run_path(str(EXAMPLES / "conditional.py"))
    assert ns["fit"].accuracy == 1.0
    assert ns["gate"].tolist() == [True, False]  # the food question is steered, the other is not


def test_docs_ab_is_what_the_command_the_docs_show_writes():
    import json
    import re

    from tracelens.pipeline.ab_plot import propensity_markdown

    text = (DOCS / "ab_interchange_conditional.md").read_text()
    [command] = re.findall(r"`(tracelens ab [^`]*--out docs/ab)`", text)
    report = json.loads((DOCS / "ab" / "report.json").read_text())
    assert report["command"] == command and report["model"] == "default"
    assert report["dataset"] == "tracelens/data/ab/optimism.jsonl"  # relative: no path of the machine it ran on
    md = (DOCS / "ab" / "propensity.md").read_text()
    assert md.splitlines()[0] == f"- Command: `{command}`"
    # everything after the version and commit lines is rendered from the stored numbers, the result included
    assert md.split("\n", 3)[3] == propensity_markdown(report).split("\n", 3)[3]
    assert "**Result: null.**" in md  # what the stored numbers say on the default model
