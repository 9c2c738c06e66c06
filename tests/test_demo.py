"""`tracelens demo` (the README's first command) end to end on a tiny model, run twice: the second run reads
every stage back from the experiment folder, the path a returning user takes. Then once more after the stored
selection is changed: the demo steers what the selection says, and its closing lines are the stored numbers."""

import pytest

from tracelens.errors import ConfigError
from tracelens.io import read_json, write_json
from tracelens.pipeline.demo import VARIANT, DemoSettings, run_demo, steering_plan
from tracelens.pipeline.report import coherence_lines, fmt_ci, reported_run, steering_verdicts
from tracelens.store import Experiment
from tracelens.testing import tiny_model
from tracelens.types import Evaluation, EvaluationRow, SteeringResults

def _steering(exp: Experiment, trait: str) -> SteeringResults:
    return exp.steering_results(trait, VARIANT, "response[:]")


def _check_closing_lines(log: list[str], results: SteeringResults) -> None:
    """The lines after "[4/4] report" name the reported run with its KL and the budget, the coherence validation,
    then give the report's
    rows (unsteered, prompted, steered, control) with the stored numbers, then the report's verdicts."""
    tail = [line.strip() for line in log[log.index("[4/4] report") + 1:]]
    report = results.report
    v = report["config"]["vectors"][0]
    run = reported_run(results)
    assert tail[0] == (f"selected run: {v['method']} layer {v['layer']}, coefficient {v['weight']:g}; KL "
                       f"{fmt_ci(run.judge_free['kl'])} nats/token within the budget of "
                       f"{report['selection']['max_kl']}")
    n = len(coherence_lines(results))
    assert n == 2 and tail[1 : 1 + n] == coherence_lines(results)  # the coherence validation and its use
    assert tail[1 + n].startswith(f"on {report['n_questions']} report questions")
    for cond in ("unsteered", "prompted", "steered", "control"):
        [line] = [l for l in tail if l.split()[0] == cond]
        assert f"{cond} {fmt_ci(report['trait'][cond], '.1f')}" in " ".join(line.split())
        for key, name in (("trait_effect", "trait effect"), ("nll_cost", "NLL cost"), ("kl", "KL")):
            est = (report["judge_free"].get(cond) or {}).get(key)
            assert (f"{name} {fmt_ci(est)}" in line) == (est is not None), (cond, key, line)
    verdicts = steering_verdicts(results)
    assert tail[-len(verdicts) - 1 : -1] == verdicts and tail[-1].startswith("wrote ")


@pytest.mark.slow
def test_the_demo_runs_and_runs_again_from_its_stored_stages(tmp_path, monkeypatch):
    # A random tiny model never steers coherently; count every run as valid, as the real model's are, so the
    # second run finds steering evidence on disk (it once made the demo report a steering-sourced vector's
    # missing test-split AUROC and crash)
    monkeypatch.setattr(SteeringResults, "valid_runs", lambda self, min_coherence=0.0, max_kl=None: list(self.runs))
    model = tiny_model("llama").model
    settings = DemoSettings(max_new_tokens=3, steer_layers=1, n_coefficients=1, n_search=2, steer_tokens=3, n_neutral=2)
    logs: list[list[str]] = [[], [], []]
    first = run_demo(model, settings, root=tmp_path, log=logs[0].append, command="tracelens demo --trait x")
    report = tmp_path / "smollm2-demo" / "report.md"
    assert report.read_text().splitlines()[0] == "- Command: `tracelens demo --trait x`"
    again = run_demo(model, settings, root=tmp_path, log=logs[1].append)
    assert report.read_text().splitlines()[0] == "- Command: `python API (run_demo)`"
    selected = [line for line in logs[1] if "selected on the select split" in line]
    assert selected and selected[0] in logs[0]  # the stored stages give the same choice
    assert first.keys() == again.keys()
    exp = Experiment.named("smollm2-demo", tmp_path)
    trait = settings.trait
    sel = first["evaluation"]["selected"]
    # the demo steers the selected method at the selected layer (steer_layers=1), not probe at mid-depth
    assert first["steered"] == {"method": sel["method"], "layers": [sel["layer"]]}
    results = _steering(exp, trait)
    assert results.header.vector_source["method"] == sel["method"]
    assert {(r.method, r.layer) for r in results.runs} == {(sel["method"], sel["layer"])}
    _check_closing_lines(logs[1], results)

    # Another selection on disk (another fitted method, the other layer): the next run steers that one
    [path] = exp.evaluation_paths(trait, VARIANT)
    evaluation = read_json(path)
    other = next(m for m in ("mean_diff", "gradient") if m != sel["method"])
    layer = 1 - int(sel["layer"])  # the tiny model has 2 layers
    evaluation["selected"] = {**evaluation["selected"], "method": other, "layer": layer}
    write_json(path, evaluation)
    third = run_demo(model, settings, root=tmp_path, log=logs[2].append)
    assert f"      selected on the select split: {other} layer {layer};" in "\n".join(logs[2])
    assert third["steered"] == {"method": other, "layers": [layer]}
    results = _steering(exp, trait)
    assert results.header.vector_source["method"] == other
    assert {(r.method, r.layer) for r in results.runs} == {(other, layer)}
    _check_closing_lines(logs[2], results)


def _evaluation(method: str, layer: int, n_layers: int) -> Evaluation:
    rows = [EvaluationRow(m, l, 0.0, {"auroc": 0.5, "accuracy": 0.5, "effect_size": 0.0}, {}, False)
            for m in ("probe", "gradient", "random_baseline") for l in range(n_layers)]
    return Evaluation(trait="t", position="response[:]", component="residual", splits={}, bootstrap={}, chance={},
                      results=rows, selected={"method": method, "layer": layer, "by": "select auroc"})


@pytest.mark.parametrize(("layer", "k", "layers"), [(19, 3, [18, 19, 20]), (29, 3, [27, 28, 29]), (0, 3, [0, 1, 2]),
                                                    (7, 1, [7]), (7, 4, [6, 7, 8, 9]), (0, 30, list(range(30)))])
def test_steering_plan_centres_the_selected_layer_inside_the_model(layer, k, layers):
    assert steering_plan(_evaluation("gradient", layer, 30), 30, k) == ("gradient", layers)


def test_steering_plan_refuses_the_control_and_impossible_layer_counts():
    with pytest.raises(ConfigError, match="control 'random_baseline'"):
        steering_plan(_evaluation("random_baseline", 3, 30), 30, 3)
    for k in (0, 31):
        with pytest.raises(ConfigError, match="steer_layers must be in 1..30"):
            steering_plan(_evaluation("probe", 3, 30), 30, k)
