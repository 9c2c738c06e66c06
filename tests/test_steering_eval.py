"""Steering evaluation on a tiny model: search arithmetic, results.jsonl lines, resume without duplicates."""

import pytest

from tracelens.serving.backends import LocalBackend
import tracelens.store as store
from tracelens.store import Experiment
from tracelens.pipeline.extraction import ExtractionConfig, load_activation_metadata, run_extraction
from tracelens.io import read_jsonl
from tracelens.pipeline.selection import select_vector, select_vectors
from tracelens.pipeline.steering_eval import SteeringEvalConfig, run_steering_eval
from tracelens.datasets.traits import load_trait

TRAIT = "starter/optimism"


class FixedJudge:
    """A test double with the Judge interface: constant coherence, trait score from the answer's length."""

    name = "fixed"

    def __init__(self, coherence=90.0, fail_after=None):
        self.coherence, self.calls, self.fail_after = coherence, 0, fail_after

    def score(self, items, trait_name=None, definition=None):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        return [{"trait_score": float(len(i["response"]) % 100), "coherence_score": self.coherence} for i in items]


@pytest.fixture
def extracted(tmp_path, tiny):
    exp = Experiment.named("steer-exp", tmp_path)
    exp.write_config({"base": {"model": "tiny"}}, {"extraction": "base", "application": "base"})
    backend = LocalBackend.from_model(tiny.model)
    run_extraction(exp, [TRAIT], ExtractionConfig(methods=("probe",), max_new_tokens=3), backend=backend)
    return exp, backend


CONFIG = SteeringEvalConfig(layers=[0, 1], search_steps=3, n_search=2, n_report=2, max_new_tokens=3, n_neutral=2)


def _runs(exp):
    return [l for l in read_jsonl(exp.steering_results_path(TRAIT, "base", "response[:]")) if l["type"] == "run"]


@pytest.mark.parametrize("coherence, mult", [(90.0, 1.3), (50.0, 0.85)])
def test_search_starts_at_0_7_mean_norm_and_multiplies_by_coherence(extracted, coherence, mult):
    exp, backend = extracted
    results = run_steering_eval(exp, TRAIT, FixedJudge(coherence), CONFIG, backend=backend)
    norms = load_activation_metadata(exp, TRAIT, "base").activation_norms
    for layer in (0, 1):
        coefs = [r.coefficient for r in results.runs if r.layer == layer]
        start = 0.7 * norms[layer]  # vectors are unit-norm
        assert coefs == pytest.approx([start, start * mult, start * mult**2], rel=1e-3)
    assert results.header.trait == TRAIT and results.baseline is not None
    kinds = [l["type"] for l in read_jsonl(exp.steering_results_path(TRAIT, "base", "response[:]"))]
    # a report line only when some run is valid (coherence >= 77)
    assert kinds == ["header", "baseline"] + ["run"] * 6 + ["report"] * (coherence >= 77)


def test_negative_direction_flips_the_sign(extracted):
    exp, backend = extracted
    cfg = SteeringEvalConfig(**{**CONFIG.__dict__, "direction": "negative", "search_steps": 1})
    results = run_steering_eval(exp, TRAIT, FixedJudge(), cfg, backend=backend)
    assert all(r.coefficient < 0 for r in results.runs)


def test_a_steering_run_reads_the_experiment_config_once(extracted, monkeypatch):
    exp, backend = extracted
    reads = []
    real = store._load_config
    monkeypatch.setattr(store, "_load_config", lambda path: reads.append(path) or real(path))
    monkeypatch.setenv("TRACELENS_EXPERIMENTS", str(exp.root))
    cfg = SteeringEvalConfig(**{**CONFIG.__dict__, "search_steps": 1})
    run_steering_eval(exp.name, TRAIT, FixedJudge(), cfg, backend=backend)  # by name: a fresh Experiment
    assert reads == [exp.config_path]


def test_interrupted_search_resumes_without_duplicates_and_reruns_add_nothing(extracted, tmp_path):
    exp, backend = extracted
    with pytest.raises(KeyboardInterrupt):  # validity (2 calls), baseline, one run, then dies at the next
        run_steering_eval(exp, TRAIT, FixedJudge(fail_after=4), CONFIG, backend=backend)
    assert len(_runs(exp)) == 1
    run_steering_eval(exp, TRAIT, FixedJudge(), CONFIG, backend=backend)
    first = _runs(exp)
    assert len(first) == 6
    keys = [(r["config"]["vectors"][0]["layer"], r["config"]["vectors"][0]["weight"]) for r in first]
    assert len(set(keys)) == 6
    judge = FixedJudge()
    run_steering_eval(exp, TRAIT, judge, CONFIG, backend=backend)
    assert _runs(exp) == first and judge.calls == 0


def test_selection_prefers_valid_steering_runs_over_held_out_accuracy(extracted):
    exp, backend = extracted
    assert select_vector(exp, TRAIT).source == "evaluation"
    run_steering_eval(exp, TRAIT, FixedJudge(coherence=50.0), CONFIG, backend=backend)
    assert select_vector(exp, TRAIT).source == "evaluation"  # no run reached coherence 77
    run_steering_eval(exp, TRAIT, FixedJudge(coherence=90.0), SteeringEvalConfig(**{**CONFIG.__dict__, "coefficients": [1.0, 2.0]}),
                      backend=backend)
    ranked = select_vectors(exp, TRAIT, n=5)
    assert ranked[0].source == "steering" and ranked[0].coherence == 90.0
    deltas = [r.delta for r in ranked]
    assert deltas == sorted(deltas, reverse=True)


def test_re_extracted_vectors_invalidate_old_steering_runs(extracted):
    exp, backend = extracted
    run_steering_eval(exp, TRAIT, FixedJudge(), CONFIG, backend=backend)
    assert select_vector(exp, TRAIT).source == "steering"
    run_extraction(exp, [TRAIT], ExtractionConfig(methods=("probe",), max_new_tokens=3, limit=30), backend=backend)
    assert select_vector(exp, TRAIT).source == "evaluation"  # old runs describe vectors that are gone
    run_steering_eval(exp, TRAIT, FixedJudge(), CONFIG, backend=backend)
    folder = exp.steering_results_path(TRAIT, "base", "response[:]").parent
    assert len(list(folder.glob("results.stale-*.jsonl"))) == 1 and len(_runs(exp)) == 6
    assert select_vector(exp, TRAIT).source == "steering"


def test_every_run_stores_judge_free_metrics_and_a_random_control_and_the_report_uses_other_questions(extracted):
    exp, backend = extracted
    results = run_steering_eval(exp, TRAIT, FixedJudge(), CONFIG, backend=backend)
    for run in results.runs:
        for block in (run.judge_free, run.control):
            assert set(block) == {"trait_effect", "nll_cost", "kl"}
            assert all(m["lo"] <= m["value"] <= m["hi"] for m in block.values())
        assert run.judge_free != run.control
    assert set(results.baseline_judge_free) == {"llr", "nll"}
    report = results.report
    assert report["config"] == results.best_run().config.to_dict()
    questions = load_trait(TRAIT).steering.questions
    assert [e["question"] for e in report["examples"]] == questions[2:4]  # after the 2 search questions
    assert set(report["trait_delta"]) == {"steered", "control"} and report["n_questions"] == 2
    for cond in ("unsteered", "steered", "control"):
        assert report["results"][cond]["n"] == 2


def test_a_different_max_new_tokens_starts_a_fresh_results_file(extracted):
    exp, backend = extracted
    run_steering_eval(exp, TRAIT, FixedJudge(), SteeringEvalConfig(**{**CONFIG.__dict__, "search_steps": 1}),
                      backend=backend)
    judge = FixedJudge()
    run_steering_eval(exp, TRAIT, judge, SteeringEvalConfig(**{**CONFIG.__dict__, "search_steps": 1,
                                                                "max_new_tokens": 4}), backend=backend)
    assert judge.calls > 0 and read_jsonl(exp.steering_results_path(TRAIT, "base", "response[:]"))[0]["max_new_tokens"] == 4


def test_too_few_questions_for_search_and_report_is_an_error(extracted):
    exp, backend = extracted
    with pytest.raises(ValueError, match="n_search=100 leaves 0 for the report"):
        run_steering_eval(exp, TRAIT, FixedJudge(), SteeringEvalConfig(**{**CONFIG.__dict__, "n_search": 100,
                                                                           "n_report": None}), backend=backend)


@pytest.mark.parametrize("bad, match", [
    ({"coefficients": [float("nan")]}, "coefficients must be a non-empty list of finite numbers"),
    ({"coefficients": []}, "coefficients must be a non-empty list"),
    ({"n_search": 0}, "n_search must be a positive integer; got 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer; got 0"),
    ({"n_report": 0}, "n_report must be a positive integer or None"),
    ({"direction": "up"}, "direction must be 'positive', 'negative' or None"),
])
def test_bad_settings_fail_at_construction(bad, match):
    with pytest.raises(ValueError, match=match):
        SteeringEvalConfig(**{**CONFIG.__dict__, **bad})


def test_stale_results_are_never_overwritten_and_a_bad_run_moves_nothing(extracted):
    exp, backend = extracted
    path = exp.steering_results_path(TRAIT, "base", "response[:]")
    one = SteeringEvalConfig(**{**CONFIG.__dict__, "search_steps": 1})
    for tokens in (3, 4, 3):  # two switches within the same second
        run_steering_eval(exp, TRAIT, FixedJudge(), SteeringEvalConfig(**{**one.__dict__, "max_new_tokens": tokens}),
                          backend=backend)
    assert len(list(path.parent.glob("results.stale-*.jsonl"))) == 2
    before = path.read_bytes()
    with pytest.raises(ValueError, match="outside"):  # a layer the model lacks: checked before any file moves
        run_steering_eval(exp, TRAIT, FixedJudge(), SteeringEvalConfig(**{**one.__dict__, "layers": [9],
                                                                          "max_new_tokens": 5}), backend=backend)
    assert path.read_bytes() == before and len(list(path.parent.glob("results.stale-*.jsonl"))) == 2


def test_a_renamed_experiment_keeps_its_steering_results(extracted):
    exp, backend = extracted
    run_steering_eval(exp, TRAIT, FixedJudge(), CONFIG, backend=backend)
    moved = Experiment.named("renamed", exp.root)
    exp.dir.rename(moved.dir)
    judge = FixedJudge()
    run_steering_eval(moved, TRAIT, judge, CONFIG, backend=backend)
    assert judge.calls == 0 and not list(moved.steering_results_path(TRAIT, "base", "response[:]").parent.glob("*stale*"))


def test_the_report_can_select_a_run_from_an_earlier_call_with_other_layers(extracted):
    exp, backend = extracted
    one = {**CONFIG.__dict__, "search_steps": 1}
    run_steering_eval(exp, TRAIT, FixedJudge(), SteeringEvalConfig(**{**one, "layers": [0]}), backend=backend)
    results = run_steering_eval(exp, TRAIT, FixedJudge(), SteeringEvalConfig(**{**one, "layers": [1]}),
                                backend=backend)
    assert {r.layer for r in results.runs} == {0, 1}
    assert results.report["config"] == results.best_run().config.to_dict()
