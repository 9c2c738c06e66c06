"""Vector selection: walk the validation hierarchy and say where each answer came from.

1. steering: the best valid steering run (KL within the results' budget; coherence >= `min_coherence` where
   the results' coherence validation shows the judge's coherence valid) per (layer, method, component),
   ranked by its trait delta over the baseline in the trait's direction;
2. evaluation: separation on the select split (AUROC, then Cohen's d) from the extraction stage; the
   test-split numbers (with intervals and the chance verdict) travel in `VectorResult.test`, unused for ranking;
3. unscored: vectors on disk with no evidence, only when `allow_unscored=True`.
A lower level is used only when no higher level has any candidate.
"""

from __future__ import annotations

from tracelens.errors import MissingArtifactError
from tracelens.store import Experiment, get_model_variant
from tracelens.pipeline.extraction import ALWAYS_EVALUATED, select_rank
from tracelens.types import MIN_COHERENCE, VectorResult


def select_vectors(experiment: str | Experiment, trait: str, n: int = 3, *, variant: str | None = None,
                   position: str = "response[:]", component: str = "residual", layer: int | None = None,
                   method: str | None = None, min_coherence: float = MIN_COHERENCE,
                   allow_unscored: bool = False) -> list[VectorResult]:
    """Up to `n` `VectorResult`s, best first, from the highest level of evidence available."""
    exp = Experiment.of(experiment)
    name = get_model_variant(exp, variant, mode="extraction").name

    def wanted(l: int, m: str) -> bool:
        return (layer is None or l == layer) and (method is None or m == method) and m != ALWAYS_EVALUATED

    for level in (_from_steering, _from_evaluation, _unscored):
        if level is _unscored and not allow_unscored:
            break
        found = [r for r in level(exp, trait, name, position, component, min_coherence) if wanted(r.layer, r.method)]
        if found:
            return found[:n]
    raise MissingArtifactError(
        f"no scored vectors for {trait!r} in experiment {exp.name!r} ({position}, {component}): run "
        "`tracelens extract` (and `tracelens steer`), or pass allow_unscored=True"
    )


def select_vector(experiment: str | Experiment, trait: str, **kwargs) -> VectorResult:
    """The single best vector (see `select_vectors`)."""
    return select_vectors(experiment, trait, n=1, **kwargs)[0]


def _from_steering(exp, trait, variant, position, component, min_coherence) -> list[VectorResult]:
    results = exp.steering_results(trait, variant, position)
    if results is None:
        return []
    source = results.header.vector_source
    try:
        current = exp.vector_metadata(trait, variant, position, component, source.get("method", "probe"))
    except MissingArtifactError:
        return []  # the vectors are gone (or being re-extracted)
    if current.input_hash != source.get("input_hash"):
        return []  # the vectors were re-extracted after this search: its runs no longer describe them
    sign = 1.0 if results.header.direction == "positive" else -1.0
    best: dict[tuple, VectorResult] = {}
    rule_coherence, max_kl = results.selection_rule()  # coherence counts only where the judge's was shown valid
    for run in results.valid_runs(None if rule_coherence is None else min_coherence, max_kl):
        delta = results.delta(run)
        if delta is None or run.component != component:
            continue
        key = (run.layer, run.method, run.component)
        if key not in best or sign * delta > sign * best[key].delta:
            best[key] = VectorResult(
                layer=run.layer, method=run.method, position=position, component=run.component, score=delta,
                direction=results.header.direction, source="steering", coefficient=run.coefficient,
                delta=delta, coherence=run.result.coherence_mean,
            )
    return sorted(best.values(), key=lambda r: -sign * r.delta)


def _from_evaluation(exp, trait, variant, position, component, min_coherence) -> list[VectorResult]:
    try:
        rows = exp.evaluation(trait, variant, position, component).results
    except MissingArtifactError:
        return []
    return [
        VectorResult(layer=r.layer, method=r.method, position=position, component=component,
                     score=r.select["auroc"], source="evaluation", val_accuracy=r.select["accuracy"],
                     val_auroc=r.select["auroc"], val_effect_size=r.select["effect_size"],
                     test={**r.test, "above_chance": r.above_chance})
        for r in sorted(rows, key=select_rank, reverse=True)
    ]


def _unscored(exp, trait, variant, position, component, min_coherence) -> list[VectorResult]:
    return [VectorResult(layer=layer, method=method, position=position, component=component, source="unscored")
            for method, layers in exp.stored_vectors(trait, variant, position, component).items() for layer in layers]
