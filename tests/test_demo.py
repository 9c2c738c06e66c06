"""`tracelens demo` (the README's first command) end to end on a tiny model, run twice: the second run reads
every stage back from the experiment folder, the path a returning user takes."""

import pytest

from tracelens.pipeline.demo import DemoSettings, run_demo
from tracelens.testing import tiny_model
from tracelens.types import SteeringResults


@pytest.mark.slow
def test_the_demo_runs_and_runs_again_from_its_stored_stages(tmp_path, monkeypatch):
    # A random tiny model never steers coherently; count every run as valid, as the real model's are, so the
    # second run finds steering evidence on disk (it once made the demo report a steering-sourced vector's
    # missing test-split AUROC and crash)
    monkeypatch.setattr(SteeringResults, "valid_runs", lambda self, min_coherence=0.0: list(self.runs))
    model = tiny_model("llama").model
    settings = DemoSettings(max_new_tokens=3, steer_layers=1, search_steps=1, n_search=2, steer_tokens=3, n_neutral=2)
    logs: list[list[str]] = [[], []]
    first = run_demo(model, settings, root=tmp_path, log=logs[0].append)
    again = run_demo(model, settings, root=tmp_path, log=logs[1].append)
    assert (tmp_path / "smollm2-demo" / "report.md").is_file()
    selected = [line for line in logs[1] if "selected on the select split" in line]
    assert selected and selected[0] in logs[0]  # the stored stages give the same choice
    assert first.keys() == again.keys()
