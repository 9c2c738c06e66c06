"""What an experiments folder holds, read back from the store: `tracelens list` prints it.

`inventory(root)` walks every experiment with a config and returns plain dicts (JSON-ready): its model
variants, and per variant and trait the held-out selection, the stored vectors (position, component,
method, layers) and every steering results file with its selected run and report numbers.
"""

from __future__ import annotations

from pathlib import Path

from tracelens.store import Experiment, experiments_root
from tracelens.pipeline.report import judge_free_comparison
from tracelens.types import SteeringResults


def inventory(root: str | Path | None = None, names: list[str] | None = None) -> list[dict]:
    """One dict per experiment under `root` (default `$TRACELENS_EXPERIMENTS`, else `./experiments`) that has
    a config.json, sorted by name; `names` restricts it (a missing one raises MissingArtifactError)."""
    root = Path(root) if root is not None else experiments_root()
    if names is None:
        names = sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
    return [describe(Experiment.named(name, root)) for name in names]


def describe(exp: Experiment) -> dict:
    """`{"name", "dir", "variants": {name: {"model", "lora", "traits": {trait: {...}}}}}` of one experiment."""
    config = exp.config()
    variants = {}
    for variant, spec in config["model_variants"].items():
        traits = sorted(set(exp.traits("extraction", variant)) | set(exp.traits("steering", variant)))
        variants[variant] = {"model": spec.get("model"), "lora": spec.get("lora"),
                             "traits": {t: _trait(exp, t, variant) for t in traits}}
    return {"name": exp.name, "dir": str(exp.dir), "variants": variants}


def _trait(exp: Experiment, trait: str, variant: str) -> dict:
    selections = []
    for ev in exp.evaluations(trait, variant):
        row = ev.selected_row
        band = ev.chance["layers"][str(row.layer)]["auroc"]
        selections.append({"position": ev.position, "component": ev.component, "method": row.method,
                           "layer": row.layer, "test_auroc": row.test.get("auroc"),
                           "chance_auroc": {"lo": band["lo"], "hi": band["hi"]}, "above_chance": row.above_chance})
    vectors = [{"position": m.position, "component": m.component, "method": m.method, "layers": layers}
               for m, layers in exp.stored_vector_sets(trait, variant)]
    steering = []
    for entry in exp.steering_entries():
        if entry.trait != trait or entry.model_variant != variant:
            continue
        results = exp.all_steering_results(trait, variant, entry.prompt_set)[entry.position]
        steering.append({"position": entry.position, "prompt_set": entry.prompt_set, "n_runs": len(results.runs),
                         "selected": _selected(results)})
    return {"selections": selections, "vectors": vectors, "steering": steering}


def _selected(results: SteeringResults) -> dict | None:
    """The reported run's vector, its judge delta on the report questions beside the random control's, and its
    judge-free metrics (nats/token) beside the control's; None when nothing was reported."""
    report = results.report
    if report is None:
        return None
    v = report["config"]["vectors"][0]
    judge_free = {name: {"steered": est, "control": ctl}
                  for name, est, ctl, _ in judge_free_comparison(results) if est is not None}
    return {"method": v["method"], "layer": v["layer"], "coefficient": v["weight"],
            "n_questions": report["n_questions"], "trait_delta": report["trait_delta"], "judge_free": judge_free}
