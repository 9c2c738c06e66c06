"""Steering evaluation on a tiny model: search arithmetic, results.jsonl lines, resume without duplicates."""

import pytest
import torch

from tracelens.serving.backends import LocalBackend
import tracelens.store as store
from tracelens.store import Experiment
from tracelens.pipeline.extraction import ExtractionConfig, load_activation_metadata, run_extraction
from tracelens.io import read_jsonl
from tracelens.pipeline.selection import select_vector, select_vectors
from tracelens.methods import get_method
from tracelens.model.edits import unit
from tracelens.pipeline.extraction import chance_directions, vet_responses
from tracelens.pipeline.report import reported_run
from tracelens.pipeline import steering_eval
from tracelens.pipeline.steering_eval import (CONDITIONS, SteeringEvalConfig, coefficient_grid, control_directions,
                                              judge_validity, matched_kl, run_steering_eval)
from tracelens.serving.backends import GenerationConfig
from tracelens.types import (DEFAULT_MAX_KL, JUDGE_COHERENCE, CoherenceValidation, JudgeResult, ProjectionConfig, SteeringHeader, SteeringResults,
                             SteeringRunRecord)
from tracelens.datasets.traits import load_trait
from tracelens.testing import tiny_model

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


def _extracted(tmp_path, model):
    exp = Experiment.named("steer-exp", tmp_path)
    exp.write_config({"base": {"model": "tiny"}}, {"extraction": "base", "application": "base"})
    backend = LocalBackend.from_model(model)
    run_extraction(exp, [TRAIT], ExtractionConfig(methods=("probe",), max_new_tokens=3), backend=backend)
    return exp, backend


@pytest.fixture
def extracted(tmp_path, tiny):
    """An extraction on each tiny architecture."""
    return _extracted(tmp_path, tiny.model)


@pytest.fixture
def extracted_llama(tmp_path):
    """An extraction on the tiny llama only: for the selection and report logic, which no architecture changes."""
    return _extracted(tmp_path, tiny_model("llama").model)


CONFIG = SteeringEvalConfig(layers=[0, 1], n_coefficients=3, n_search=2, n_report=2, max_new_tokens=3, n_neutral=2,
                            max_kl=100.0)


def _runs(exp):
    return [l for l in read_jsonl(exp.steering_results_path(TRAIT, "base", "response[:]")) if l["type"] == "run"]


def test_the_grid_is_log_spaced_from_near_zero(extracted):
    exp, backend = extracted
    results = run_steering_eval(exp, TRAIT, FixedJudge(), CONFIG, backend=backend)
    norms = load_activation_metadata(exp, TRAIT, "base").activation_norms
    for layer in (0, 1):
        coefs = [r.coefficient for r in results.runs if r.layer == layer]
        scale = norms[layer]  # vectors are unit-norm
        assert coefs == pytest.approx(coefficient_grid(scale, 3), rel=1e-3)
        assert coefs == pytest.approx([0.02 * scale, 0.02 * scale * 50 ** 0.5, scale], rel=1e-3)
        assert min(coefs) <= 0.2 * scale
    assert results.header.trait == TRAIT and results.baseline is not None
    kinds = [l["type"] for l in read_jsonl(exp.steering_results_path(TRAIT, "base", "response[:]"))]
    assert kinds == ["header", "baseline"] + ["run"] * 6 + ["report"]


def _shown_valid(setup):
    """A coherence validation in which the judge's coherence is shown valid (interval above 0.5)."""
    est = {"value": 0.9, "lo": 0.8, "hi": 0.95}
    return CoherenceValidation(model=None, prompt_set="general", seed=0, max_new_tokens=3, layer=1, coefficients={},
                               n_items={"held_out": {"items": 4, "intact": 2}}, n_questions={"held_out": 2},
                               tune_questions=[], held_out_questions=[], auroc={JUDGE_COHERENCE: est}, per_kind={})


@pytest.mark.parametrize("validated", [True, False])
def test_a_report_needs_a_valid_run_and_coherence_counts_only_where_it_is_shown_valid(extracted_llama, monkeypatch,
                                                                                       validated):
    exp, backend = extracted_llama
    if validated:
        monkeypatch.setattr(steering_eval, "coherence_validity", _shown_valid)
    results = run_steering_eval(exp, TRAIT, FixedJudge(50.0), CONFIG, backend=backend)  # coherence 50 < 77
    assert results.selection_rule() == ((77.0 if validated else None), CONFIG.max_kl)
    assert (results.report is None) == validated
    if not validated:  # measured on the stored set: a constant coherence tells nothing
        validity = results.header.coherence_validity
        assert validity["sources"][JUDGE_COHERENCE] == "fixed" and validity["auroc"][JUDGE_COHERENCE]["value"] == 0.5
        assert {"degeneracy", "nll"} <= set(validity["auroc"]) and results.report["selection"]["min_coherence"] is None
        assert exp.coherence_set("base", "general", CONFIG.max_new_tokens) is not None


def test_negative_direction_flips_the_sign(extracted):
    exp, backend = extracted
    cfg = SteeringEvalConfig(**{**CONFIG.__dict__, "direction": "negative", "n_coefficients": 1})
    results = run_steering_eval(exp, TRAIT, FixedJudge(), cfg, backend=backend)
    assert all(r.coefficient < 0 for r in results.runs)


def test_a_steering_run_reads_the_experiment_config_once(extracted, monkeypatch):
    exp, backend = extracted
    reads = []
    real = store._load_config
    monkeypatch.setattr(store, "_load_config", lambda path: reads.append(path) or real(path))
    monkeypatch.setenv("TRACELENS_EXPERIMENTS", str(exp.root))
    cfg = SteeringEvalConfig(**{**CONFIG.__dict__, "n_coefficients": 1})
    run_steering_eval(exp.name, TRAIT, FixedJudge(), cfg, backend=backend)  # by name: a fresh Experiment
    assert reads == [exp.config_path]


def test_interrupted_search_resumes_without_duplicates_and_reruns_add_nothing(extracted, tmp_path):
    exp, backend = extracted
    with pytest.raises(KeyboardInterrupt):  # validity (2 calls), coherence validity, baseline, one run, then dies
        run_steering_eval(exp, TRAIT, FixedJudge(fail_after=5), CONFIG, backend=backend)
    assert len(_runs(exp)) == 1
    run_steering_eval(exp, TRAIT, FixedJudge(), CONFIG, backend=backend)
    first = _runs(exp)
    assert len(first) == 6
    keys = [(r["config"]["vectors"][0]["layer"], r["config"]["vectors"][0]["weight"]) for r in first]
    assert len(set(keys)) == 6
    judge = FixedJudge()
    run_steering_eval(exp, TRAIT, judge, CONFIG, backend=backend)
    assert _runs(exp) == first and judge.calls == 0


def test_selection_prefers_valid_steering_runs_over_held_out_accuracy(extracted, monkeypatch):
    exp, backend = extracted
    assert select_vector(exp, TRAIT).source == "evaluation"
    with monkeypatch.context() as m:
        m.setattr(steering_eval, "coherence_validity", _shown_valid)
        run_steering_eval(exp, TRAIT, FixedJudge(coherence=50.0), CONFIG, backend=backend)
    assert select_vector(exp, TRAIT).source == "evaluation"  # no run reached the validated coherence 77
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


def test_every_run_stores_judge_free_metrics_and_the_report_uses_other_questions_and_ten_controls(extracted):
    exp, backend = extracted
    results = run_steering_eval(exp, TRAIT, FixedJudge(), CONFIG, backend=backend)
    for run in results.runs:
        assert set(run.judge_free) == {"trait_effect", "nll_cost", "kl"}
        assert all(m["lo"] <= m["value"] <= m["hi"] for m in run.judge_free.values())
    assert set(results.baseline_judge_free) == {"llr", "nll"}
    report = results.report
    assert report["config"] == results.best_run(max_kl=100.0).config.to_dict()
    questions = load_trait(TRAIT).steering.questions
    assert [e["question"] for e in report["examples"]] == questions[2:4]  # after the 2 search questions
    assert set(report["trait_delta"]) == {"prompted", "steered", "prompted_steered", "control"}
    assert report["n_questions"] == 2
    for cond in ("unsteered", "prompted", "steered", "prompted_steered", "control"):
        assert report["results"][cond]["n"] == 2
    for point in report["control_curve"]:
        assert all(len(v) >= 10 for v in point["per_direction"].values())
        trait = point["judged"]["trait"]  # judged on the search questions, comparable with the search runs
        assert trait["lo"] <= trait["value"] <= trait["hi"] and point["judged"]["coherence"]["value"] == 90.0
    assert report["judge_free"]["control"] == report["control_curve"][0]["band"]
    assert set(report["judge_free"]["prompted"]) == {"trait_effect", "nll_cost"}


def test_a_different_max_new_tokens_starts_a_fresh_results_file(extracted):
    exp, backend = extracted
    run_steering_eval(exp, TRAIT, FixedJudge(), SteeringEvalConfig(**{**CONFIG.__dict__, "n_coefficients": 1}),
                      backend=backend)
    judge = FixedJudge()
    run_steering_eval(exp, TRAIT, judge, SteeringEvalConfig(**{**CONFIG.__dict__, "n_coefficients": 1,
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
    one = SteeringEvalConfig(**{**CONFIG.__dict__, "n_coefficients": 1})
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
    one = {**CONFIG.__dict__, "n_coefficients": 1}
    run_steering_eval(exp, TRAIT, FixedJudge(), SteeringEvalConfig(**{**one, "layers": [0]}), backend=backend)
    results = run_steering_eval(exp, TRAIT, FixedJudge(), SteeringEvalConfig(**{**one, "layers": [1]}),
                                backend=backend)
    assert {r.layer for r in results.runs} == {0, 1}
    assert results.report["config"] == results.best_run().config.to_dict()


def _run(trait, coherence, kl, coefficient):
    est = {"value": kl, "lo": kl * 0.9, "hi": kl * 1.1}
    return SteeringRunRecord(JudgeResult(trait_mean=trait, coherence_mean=coherence, n=8),
                             ProjectionConfig.single(15, "residual", "response[:]", "probe", coefficient),
                             judge_free={"trait_effect": {"value": 1.0, "lo": 0.5, "hi": 1.5}, "nll_cost": est, "kl": est})


def test_selection_keeps_the_budget_a_higher_trait_score_over_it_is_never_selected():
    over, within = _run(91.0, 93.0, 1.77, 93.0), _run(76.0, 98.0, 0.39, 45.0)
    results = SteeringResults(SteeringHeader(TRAIT), JudgeResult(trait_mean=57.0, coherence_mean=92.0, n=8),
                              [over, within])
    assert results.best_run(max_kl=DEFAULT_MAX_KL) is within
    assert results.best_run() is over  # what selection by judge coherence alone returns
    assert results.best_run(max_kl=0.1) is None


def test_the_selected_run_is_within_the_budget_and_runs_over_it_are_kept(extracted_llama):
    exp, backend = extracted_llama
    loose = run_steering_eval(exp, TRAIT, FixedJudge(), CONFIG, backend=backend)
    kls = sorted(r.judge_free["kl"]["value"] for r in loose.runs)
    budget = (kls[1] + kls[2]) / 2  # two runs within, four over
    results = run_steering_eval(exp, TRAIT, FixedJudge(), SteeringEvalConfig(**{**CONFIG.__dict__, "max_kl": budget}),
                                backend=backend)
    assert results.header.selection["max_kl"] == budget
    chosen = reported_run(results)
    assert chosen.judge_free["kl"]["value"] <= budget
    within = [r for r in results.runs if r.judge_free["kl"]["value"] <= budget]
    assert chosen.result.trait_mean == max(r.result.trait_mean for r in within)
    over = sum(r.judge_free["kl"]["value"] > budget for r in results.runs)
    assert results.report["selection"]["n_over_budget"] == over >= 4 and results.report["selection"]["max_kl"] == budget
    # each layer whose grid crosses the budget gets one more coefficient, between the two grid runs around it
    grid = {(r.layer, r.coefficient) for r in loose.runs}
    extra = [r for r in results.runs if (r.layer, r.coefficient) not in grid]
    assert 1 <= len(extra) == len(results.runs) - 6
    for run in extra:
        layer_grid = sorted(k for l, k in grid if l == run.layer)
        assert any(a < run.coefficient < b for a, b in zip(layer_grid, layer_grid[1:]))


class RecordingBackend:
    """The tiny model's backend, recording every generate call's prompts and system prompts."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, prompts, config=None, steering=None, system_prompts=None):
        self.calls.append((list(prompts), system_prompts))
        return self.inner.generate(prompts, config, steering, system_prompts)


class RecordingJudge(FixedJudge):
    def __init__(self):
        super().__init__()
        self.items = []

    def score(self, items, trait_name=None, definition=None):
        self.items += [i["response"] for i in items]
        return super().score(items, trait_name, definition)


def test_the_prompting_baseline_uses_the_traits_instruction_and_the_same_judge(extracted_llama):
    exp, backend = extracted_llama
    recording, judge = RecordingBackend(backend), RecordingJudge()
    results = run_steering_eval(exp, TRAIT, judge, CONFIG, backend=recording)
    instructions = list(dict.fromkeys(s.system_prompt for s in load_trait(TRAIT).positive if s.system_prompt))
    assert instructions and results.report["instructions"] == instructions
    # the report's call: one block of 2 questions per condition
    prompts, systems = next(c for c in recording.calls if len(c[0]) == 2 * len(CONDITIONS))
    blocks = {c: systems[2 * b : 2 * b + 2] for b, c in enumerate(CONDITIONS)}
    assert blocks["prompted"] == blocks["prompted_steered"] == instructions[:2]
    assert blocks["unsteered"] == blocks["steered"] == blocks["control"] == [None, None]
    assert results.report["results"]["prompted"]["n"] == 2
    assert set(results.report["judge_free"]["prompted"]) == {"trait_effect", "nll_cost"}
    answers = recording.inner.generate(prompts[2:4], GenerationConfig(CONFIG.max_new_tokens), None, systems[2:4])
    assert set(answers) <= set(judge.items)  # the prompted answers were judged by the steering judge


def test_per_question_deltas_average_to_the_reported_deltas_and_steerability_is_stored(extracted_llama):
    exp, backend = extracted_llama
    report = run_steering_eval(exp, TRAIT, FixedJudge(), CONFIG, backend=backend).report
    per_q = report["per_question"]
    assert per_q["questions"] == load_trait(TRAIT).steering.questions[2:4]
    for cond in ("prompted", "steered", "prompted_steered", "control"):
        deltas = [d for d in per_q[cond] if d is not None]
        assert round(sum(deltas) / len(deltas), 4) == report["trait_delta"][cond]["value"]
    moved = report["steerability"]["moved"]["steered"]
    assert moved["value"] == sum(d > 0 for d in per_q["steered"]) / 2
    assert set(report["steerability"]["anti_steerable"]) <= set(per_q["questions"])


def test_control_directions_are_their_own_draws():
    controls = control_directions(64, 10)
    assert controls.shape == (10, 64) and torch.equal(controls, control_directions(64, 10))
    assert torch.allclose(controls.norm(dim=-1), torch.ones(10))
    for layer in range(4):
        others = torch.cat([chance_directions(64, layer, 100),
                            unit(get_method("random_baseline").extract(
                                torch.randn(4, 64), torch.randn(4, 64), seed=layer)["vector"])[None]])
        assert (controls @ others.T).abs().max() < 0.9  # no control is the chance band's or random_baseline's draw


def test_judge_validity_scores_unvetted_pairs_when_the_judge_vetted_the_extraction(extracted_llama):
    exp, _ = extracted_llama
    judge = FixedJudge()
    before = judge_validity(judge, exp, TRAIT, "base")
    assert before["data"].startswith("extraction test split")
    vet_responses(exp, TRAIT, "base", judge, exp.responses_metadata(TRAIT, "base").input_hash)
    after = judge_validity(judge, exp, TRAIT, "base")
    assert "unvetted" in after["data"] and after["n_pairs"] >= before["n_pairs"]
    other = FixedJudge()
    other.name = "another"
    assert judge_validity(other, exp, TRAIT, "base")["data"] == before["data"]


def test_matched_kl_interpolates_each_control_direction_and_leaves_out_those_that_never_reach_it():
    curve = [{"per_direction": {"kl": [0.25, 1.0], "trait_effect": [0.5, 2.0]}},
             {"per_direction": {"kl": [1.0, 4.0], "trait_effect": [1.0, 4.0]}}]
    # in sqrt(KL): direction 0 sits on its first point, direction 1 half-way from (0, 0) to (1.0, 2.0)
    assert matched_kl(curve, 0.25)["trait_effect"]["value"] == pytest.approx(0.75)
    at_two = matched_kl(curve, 2.0)
    assert (at_two["n_directions"], at_two["of"]) == (1, 2)  # direction 0 never gets past KL 1.0
    assert at_two["trait_effect"]["value"] == pytest.approx(2 + 2 * (2 ** 0.5 - 1), abs=1e-4)
    assert matched_kl(curve, 9.0) is None
