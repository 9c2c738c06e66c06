"""`tracelens demo`: extract -> evaluate -> steer -> report for one starter trait on the default model.

Every choice is made on data the reported numbers never saw: vectors and thresholds on the train
split, layer and method on the select split, coefficients on the search questions; the test split,
the report questions and the judge's validity data are only scored. The demo steers the method the
select split chose, at layers around the layer it chose (`steering_plan`), and ends by printing the
selected steering run's judge-free numbers beside its random control's, read from the stored results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tracelens.serving.backends import LocalBackend
from tracelens.store import Experiment
from tracelens.pipeline.extraction import ALWAYS_EVALUATED, ExtractionConfig, run_extraction
from tracelens.judges.fluency import Fluency
from tracelens.judges.offline import offline_judge
from tracelens.errors import ConfigError
from tracelens.metrics import Estimate
from tracelens.pipeline.report import (JUDGE_FREE, coherence_lines, fmt_ci, reported_run, steering_verdicts,
                                       write_report)
from tracelens.pipeline.steering_eval import SteeringEvalConfig, run_steering_eval
from tracelens.types import Evaluation, SteeringResults

DEMO_EXPERIMENT = "smollm2-demo"
VARIANT = "instruct"


@dataclass
class DemoSettings:
    trait: str = "starter/enthusiasm"
    max_new_tokens: int = 48
    steer_layers: int = 1  # how many layers, centred on the selected layer, to steer the selected method at
    n_coefficients: int = 6
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


def steering_plan(evaluation: Evaluation, n_layers: int, k: int) -> tuple[str, list[int]]:
    """The method and layers to steer: the select split's choice (`Evaluation.selected_row`, never the test
    split), at the `k` consecutive layers centred on its layer (shifted to stay within 0..n_layers-1; the
    selected layer itself when k is 1). ConfigError when the selection is the random-direction control, which
    it is only when no fitted method was evaluated: there is no trait vector to steer."""
    sel = evaluation.selected_row
    if sel.method == ALWAYS_EVALUATED:
        raise ConfigError(f"the selected method is the control {ALWAYS_EVALUATED!r} (no fitted method was "
                          "evaluated); extract probe, mean_diff or gradient vectors to steer")
    if not 1 <= k <= n_layers:
        raise ConfigError(f"steer_layers must be in 1..{n_layers}; got {k!r}")
    first = min(max(sel.layer - (k - 1) // 2, 0), n_layers - k)
    return sel.method, list(range(first, first + k))


def steering_summary(results: SteeringResults) -> list[str]:
    """The demo's closing lines, read from the stored `results`: the selected run and the budget, the coherence
    validation (`coherence_lines`), then the report's rows (unsteered, prompted, steered, random control) on the
    report questions: judge trait with its delta, and the judge-free trait effect, NLL cost and KL (nats/token),
    with intervals (the controls' judge-free numbers: mean and 5-95% band over directions); then the verdicts
    (steering against prompting, the budget's cost, matched KL, anti-steerable questions)."""
    report, run = results.report, reported_run(results)
    if report is None or run is None:
        return ["no run is within the KL budget with enough judge coherence: nothing was re-judged on the report "
                "questions"]
    sel = report.get("selection") or {}
    kl = (run.judge_free or {}).get("kl")
    lines = [f"selected run: {run.method} layer {run.layer}, coefficient {run.coefficient:g}; KL {fmt_ci(kl)} "
             f"nats/token within the budget of {sel.get('max_kl', 'n/a')}", *coherence_lines(results),
             f"on {report['n_questions']} report questions (judge trait [delta]; trait effect, NLL cost, KL in "
             "nats/token):"]
    jf = report.get("judge_free") or {}
    for cond in ("unsteered", "prompted", "steered", "control"):
        if cond not in report["results"]:
            continue
        m, delta = jf.get(cond) or {}, report["trait_delta"].get(cond)
        lines.append(f"  {cond:<10} {fmt_ci(report['trait'].get(cond), '.1f')}"
                     + (f" [{fmt_ci(delta, '.1f')}]" if delta else "")
                     + "".join(f"; {name} {fmt_ci(m[key])}" for key, name in JUDGE_FREE if key in m))
    return lines + steering_verdicts(results)


def run_demo(model, settings: DemoSettings | None = None, root=None, log=print, *,
             command: str | None = None) -> dict:
    """Run every stage on `model` (the loaded default model), write the experiment's report.md (opening with
    `command`; default: "python API (run_demo)"; the CLI passes its command line), and
    return the numbers it printed."""
    s = settings or DemoSettings()
    command = command or "python API (run_demo)"
    start = time.perf_counter()
    exp = ensure_demo_experiment(root)
    backend = LocalBackend.from_model(model, use_chat_template=True)

    log(f"[1/4] extract {s.trait}: responses, activations at every layer, probe / mean_diff / gradient vectors, "
        "train / select / test split by question")
    evaluation = run_extraction(exp, [s.trait], ExtractionConfig(max_new_tokens=s.max_new_tokens),
                                backend=backend, command=command)[s.trait]
    # the extraction's own choice on the select split (select_vector would prefer an earlier run's steering)
    chosen = evaluation.selected_row
    auroc = Estimate.from_dict(chosen.test["auroc"])
    log(f"      selected on the select split: {chosen.method} layer {chosen.layer}; test AUROC {auroc} "
        f"({'above' if chosen.above_chance else 'not above'} the random-direction band)")

    log("[2/4] judge: offline embedding judge fitted on the trait's independent labelled corpus; coherence from "
        "repetition and fluency (NLL under the unsteered model)")
    judge = offline_judge(s.trait, fluency=Fluency(model))

    method, layers = steering_plan(evaluation, model.cfg.n_layers, s.steer_layers)
    log(f"[3/4] steer: a grid of {s.n_coefficients} coefficients from near 0 on the selected {method} vectors at "
        f"layers {layers} (around layer {chosen.layer}), {s.n_search} search questions, judge-free damage (KL) "
        "for every run; the best run within the KL budget reported beside prompting and random controls")
    if not chosen.above_chance:
        log("      the selected vector is not above chance on the test split: expect its steering to look "
            "like the random control's")
    results = run_steering_eval(exp, s.trait, judge, SteeringEvalConfig(
        layers=layers, method=method, n_coefficients=s.n_coefficients, n_search=s.n_search,
        max_new_tokens=s.steer_tokens, n_neutral=s.n_neutral), backend=backend, command=command)
    validity = results.header.eval["validity"]
    log(f"      judge validity on the unseen test-split answers: AUROC {Estimate.from_dict(validity['auroc'])}")

    log("[4/4] report")
    for line in steering_summary(results):
        log(f"      {line}")
    path = write_report(exp, [s.trait], exp.report_path, command=command)
    log(f"      wrote {path}")
    return {"trait": s.trait, "evaluation": evaluation.to_dict(), "judge_validity": validity,
            "steered": {"method": method, "layers": layers}, "steering": results.to_dict(),
            "report": str(path), "seconds": time.perf_counter() - start}
