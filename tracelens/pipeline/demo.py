"""`tracelens demo`: extract -> evaluate -> steer -> report for one starter trait on the default model.

Every choice is made on data the reported numbers never saw: vectors and thresholds on the train
split, layer and method on the select split, coefficients on the search questions; the test split,
the report questions and the judge's validity data are only scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tracelens.serving.backends import LocalBackend
from tracelens.pipeline.experiments import Experiment
from tracelens.pipeline.extraction import ExtractionConfig, parse_layers, run_extraction, select_rank
from tracelens.judges.offline import offline_judge
from tracelens.metrics import Estimate
from tracelens.pipeline.report import write_report
from tracelens.pipeline.steering_eval import SteeringEvalConfig, judge_validity, run_steering_eval
from tracelens.types import Evaluation

DEMO_EXPERIMENT = "smollm2-demo"
VARIANT = "instruct"


@dataclass
class DemoSettings:
    trait: str = "starter/enthusiasm"
    max_new_tokens: int = 48
    steer_layers: int = 3  # how many probe layers (best select-split AUROC within 30%-60% of depth) to steer
    search_steps: int = 3
    n_search: int = 8
    steer_tokens: int = 40
    n_neutral: int = 16


def ensure_demo_experiment(root=None) -> Experiment:
    """The demo experiment, its config written on first use."""
    exp = Experiment.named(DEMO_EXPERIMENT, root)
    if not exp.config_path.is_file():
        exp.write_config({VARIANT: {"model": "default", "lora": None}},
                         {"extraction": VARIANT, "application": VARIANT}, use_chat_template=True)
    return exp


def steering_layers(evaluation: Evaluation, n_layers: int, k: int, method: str = "probe") -> list[int]:
    """The `k` layers of `method` with the best select-split AUROC within 30%-60% of depth (never test)."""
    window = parse_layers("30%-60%", n_layers)
    rows = [r for r in evaluation.results if r.method == method and r.layer in window]
    ranked = sorted(rows, key=lambda r: (*(-x for x in select_rank(r)), r.layer))
    return sorted(r.layer for r in ranked[:k])


def run_demo(model, settings: DemoSettings | None = None, root=None, log=print) -> dict:
    """Run every stage on `model` (the loaded default model), write the experiment's report.md, and
    return the numbers it printed."""
    s = settings or DemoSettings()
    start = time.perf_counter()
    exp = ensure_demo_experiment(root)
    backend = LocalBackend.from_model(model, use_chat_template=True)

    log(f"[1/4] extract {s.trait}: responses, activations at every layer, probe / mean_diff / gradient vectors, "
        "train / select / test split by question")
    evaluation = run_extraction(exp, [s.trait], ExtractionConfig(max_new_tokens=s.max_new_tokens),
                                backend=backend)[s.trait]
    # the extraction's own choice on the select split (select_vector would prefer an earlier run's steering)
    chosen = evaluation.selected_row
    auroc = Estimate.from_dict(chosen.test["auroc"])
    log(f"      selected on the select split: {chosen.method} layer {chosen.layer}; test AUROC {auroc} "
        f"({'above' if chosen.above_chance else 'not above'} the random-direction band)")

    log("[2/4] judge: offline embedding judge fitted on the trait's independent labelled corpus")
    judge = offline_judge(s.trait)
    validity = judge_validity(judge, exp, s.trait, VARIANT)
    log(f"      judge validity on the unseen test-split answers: AUROC {Estimate.from_dict(validity['auroc'])}")

    layers = steering_layers(evaluation, model.cfg.n_layers, s.steer_layers)
    log(f"[3/4] steer: coefficient search on probe vectors at layers {layers}, {s.search_steps} steps, "
        f"{s.n_search} search questions; judge-free metrics and a random control for every run")
    results = run_steering_eval(exp, s.trait, judge, SteeringEvalConfig(
        layers=layers, search_steps=s.search_steps, n_search=s.n_search, max_new_tokens=s.steer_tokens,
        n_neutral=s.n_neutral), backend=backend, judge_info={"validity": validity})

    log("[4/4] report")
    if results.report is None:
        log("      no run kept coherence above the threshold: nothing to report on the report questions")
    else:
        r = results.report
        delta = r["trait_delta"]
        log(f"      selected run on {r['n_questions']} report questions: trait delta "
            f"{Estimate.from_dict(delta['steered'])} vs random control {Estimate.from_dict(delta['control'])}")
    path = write_report(exp, [s.trait], exp.report_path)
    log(f"      wrote {path}")
    return {"trait": s.trait, "evaluation": evaluation.to_dict(), "judge_validity": validity, "steering": results.to_dict(),
            "report": str(path), "seconds": time.perf_counter() - start}
