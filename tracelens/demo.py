"""`tracelens demo`: extract -> evaluate -> steer -> select for one starter trait on the default model."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tracelens.backends import GenerationConfig, LocalBackend, SteeringSpec
from tracelens.experiments import Experiment
from tracelens.extraction import ExtractionConfig, load_vector, run_extraction
from tracelens.selection import select_vector
from tracelens.steering_eval import SteeringEvalConfig, fit_offline_judge, run_steering_eval

DEMO_EXPERIMENT = "smollm2-demo"
VARIANT = "instruct"


@dataclass
class DemoSettings:
    trait: str = "starter/enthusiasm"
    max_new_tokens: int = 48
    val_split: float = 0.2
    steer_layers: int = 3  # how many of the best probe layers (within 30%-60% of depth) to steer
    search_steps: int = 3
    subset: int = 5
    steer_tokens: int = 40


def ensure_demo_experiment(root=None) -> Experiment:
    """The demo experiment, its config written on first use."""
    exp = Experiment.named(DEMO_EXPERIMENT, root)
    if not exp.config_path.is_file():
        exp.write_config({VARIANT: {"model": "default", "lora": None}},
                         {"extraction": VARIANT, "application": VARIANT}, use_chat_template=True)
    return exp


def run_demo(model, settings: DemoSettings | None = None, root=None, log=print) -> dict:
    """Run every stage on `model` (the loaded default model); returns the numbers it printed."""
    s = settings or DemoSettings()
    start = time.perf_counter()
    exp = ensure_demo_experiment(root)
    backend = LocalBackend.from_model(model, use_chat_template=True)
    n = model.cfg.n_layers

    log(f"[1/4] extract {s.trait}: responses, activations at every layer, probe / mean_diff / gradient vectors")
    config = ExtractionConfig(max_new_tokens=s.max_new_tokens, val_split=s.val_split)
    report = run_extraction(exp, [s.trait], config, backend=backend)[s.trait]
    best = report["best"]
    log(f"      best held-out: {best['method']} at layer {best['layer']}, accuracy {best['val_accuracy']:.2f}, "
        f"AUROC {best['val_auroc']:.2f}")

    log("[2/4] judge: offline embedding judge fitted on the training responses")
    judge, validity = fit_offline_judge(exp, s.trait, VARIANT, s.val_split)
    log(f"      judge validity (AUROC on held-out responses): {validity:.2f}")

    lo, hi = round(0.3 * (n - 1)), round(0.6 * (n - 1))
    probe = [r for r in report["results"] if r["method"] == "probe" and lo <= r["layer"] <= hi]
    layers = sorted(r["layer"] for r in sorted(probe, key=lambda r: -r["val_accuracy"])[: s.steer_layers])
    log(f"[3/4] steer: coefficient search on probe vectors at layers {layers}, {s.search_steps} steps")
    results = run_steering_eval(exp, s.trait, judge, SteeringEvalConfig(
        layers=layers, search_steps=s.search_steps, subset=s.subset, max_new_tokens=s.steer_tokens), backend=backend)

    log("[4/4] select")
    chosen = select_vector(exp, s.trait)
    baseline = results.baseline
    summary = {
        "trait": s.trait, "best_heldout": best, "judge_validity": validity,
        "baseline_trait": baseline.trait_mean, "baseline_coherence": baseline.coherence_mean,
        "selected": chosen.to_dict(),
    }
    log(f"      selected: {chosen.method} layer {chosen.layer} ({chosen.source})")
    if chosen.source == "steering":
        steered = next(r for r in results.runs if r.layer == chosen.layer and r.coefficient == chosen.coefficient)
        summary.update(steered_trait=steered.result.trait_mean, steered_coherence=steered.result.coherence_mean,
                       coefficient=chosen.coefficient, delta=chosen.delta)
        question = _first_question(s.trait)
        v = load_vector(exp, s.trait, VARIANT, chosen.position, chosen.component, chosen.method, chosen.layer)
        cfg = GenerationConfig(max_new_tokens=s.steer_tokens)
        plain = backend.generate([question], cfg)[0]
        pushed = backend.generate([question], cfg, [SteeringSpec(chosen.layer, v, chosen.coefficient)])[0]
        summary.update(example_question=question, example_plain=plain, example_steered=pushed)
    summary["seconds"] = time.perf_counter() - start
    _print_summary(summary, log)
    return summary


def _first_question(trait: str) -> str:
    from tracelens.traits import load_trait

    return load_trait(trait).steering.questions[0]


def _print_summary(r: dict, log) -> None:
    log("")
    log(f"trait            {r['trait']}")
    b = r["best_heldout"]
    log(f"best vector      {b['method']} at layer {b['layer']}: held-out accuracy {b['val_accuracy']:.2f}, AUROC {b['val_auroc']:.2f}")
    log(f"judge validity   AUROC {r['judge_validity']:.2f} (offline embedding judge, held-out responses)")
    log(f"baseline         trait {r['baseline_trait']}, coherence {r['baseline_coherence']}")
    if "steered_trait" in r:
        log(f"steered          trait {r['steered_trait']} (delta {r['delta']:+.1f}), coherence {r['steered_coherence']}, "
            f"coefficient {r['coefficient']:.1f}")
        log(f"question         {r['example_question']}")
        log(f"  unsteered      {r['example_plain']}")
        log(f"  steered        {r['example_steered']}")
    else:
        log("steered          no run kept coherence above the threshold; selection fell back to held-out accuracy")
    log(f"time             {r['seconds']:.0f}s")
