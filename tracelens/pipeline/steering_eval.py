"""Steering evaluation: a coefficient search judged on search questions, judge-free metrics for every
run, and the selected configuration reported on disjoint report questions beside a random control.

Questions come from the trait's `steering.json` in file order: the first `n_search` drive the search,
the rest (up to `n_report`) are only used to report the configuration the search selected.

Each search step asks the backend (any `tracelens.serving.protocol.Backend`: the model here or a running
`tracelens server`) for every candidate layer's answers to the search questions in one call, one block of
rows per layer (`SteeringSpec.rows`).
The starting coefficient of a layer is `mean ||h_L|| / ||v|| * 0.7` (times -1 to steer against the
trait); after each step it is multiplied by 1.3 when that layer's mean coherence is at least
`search_coherence` (80), else by 0.85.

Every run also gets judge-free metrics (teacher forcing, no sampling, see `judge_free_metrics`), for the
vector and for a random control direction of the same norm and coefficient:
  trait_effect   mean over the extraction's *test* pairs of the change under steering of the per-token
                 log-likelihood ratio log p(pos response | question) - log p(neg response | question);
  nll_cost       mean change in per-token NLL of the unsteered model's own answers to neutral prompts;
  kl             mean KL(unsteered || steered) of the next-token distributions over those answers.
Each is a mean over items with a 95% bootstrap interval. Every baseline, run and report is one line
of `results.jsonl`; a re-run skips what is there (matching configuration) and never writes a line twice.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from tracelens.serving.backends import GenerationConfig, LocalBackend, SteeringSpec
from tracelens.model.edits import unit
from tracelens.errors import ConfigError
from tracelens.store import Experiment, get_model_variant
from tracelens.pipeline.extraction import parse_layers
from tracelens.judges.base import summarize_judge_scores
from tracelens.metrics import bootstrap_mean, paired_separation
from tracelens.datasets.prompt_sets import load_prompt_set
from tracelens.datasets.traits import load_trait
from tracelens.serving.protocol import Backend
from tracelens.types import (MIN_COHERENCE, NeutralReference, ProjectionConfig, SteeringHeader, SteeringResults,
                             SteeringRunRecord, VectorSpec)

START_MULT, UP_MULT, DOWN_MULT = 0.7, 1.3, 0.85
N_EXAMPLES = 3  # steered answers kept in the report line


@dataclass
class SteeringEvalConfig:
    layers: str | Sequence[int] = "30%-60%"
    method: str = "probe"
    position: str = "response[:]"
    component: str = "residual"
    coefficients: Sequence[float] | None = None  # explicit coefficients for every layer: no search
    search_steps: int = 5
    n_search: int = 8  # the first n_search steering questions drive the search ...
    n_report: int | None = None  # ... the next n_report (None: all the rest) report the selected configuration
    max_new_tokens: int = 64
    direction: str | None = None  # default: the trait's steering.json
    search_coherence: float = 80.0
    n_neutral: int = 16  # neutral prompts whose unsteered answers measure the coherence cost
    min_coherence: float = MIN_COHERENCE  # a run must reach this to be selected for the report

    def __post_init__(self) -> None:
        for name in ("search_steps", "n_search", "max_new_tokens", "n_neutral"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer; got {value!r}")
        if self.n_report is not None and (not isinstance(self.n_report, int) or self.n_report < 1):
            raise ConfigError(f"n_report must be a positive integer or None; got {self.n_report!r}")
        if self.coefficients is not None:
            if not len(self.coefficients) or not all(math.isfinite(float(c)) for c in self.coefficients):
                raise ConfigError(f"coefficients must be a non-empty list of finite numbers; got {list(self.coefficients)}")
        for name in ("search_coherence", "min_coherence"):
            if not 0 <= float(getattr(self, name)) <= 100:
                raise ConfigError(f"{name} must be in [0, 100]; got {getattr(self, name)!r}")
        if self.direction not in (None, "positive", "negative"):
            raise ConfigError(f"direction must be 'positive', 'negative' or None; got {self.direction!r}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _score(judge, trait: str, definition: str, questions: Sequence[str], answers: Sequence[str]) -> list[dict]:
    return judge.score([{"question": q, "response": a, "trait_name": trait, "definition": definition}
                        for q, a in zip(questions, answers)])


def _generate(backend: Backend, questions: Sequence[str], rows: list[tuple[int, torch.Tensor, float]],
              config: SteeringEvalConfig) -> list[list[str]]:
    """Answers to `questions` under each (layer, vector, coef) of `rows`, all in one call (one block of rows
    per entry; no entry: unsteered)."""
    q = len(questions)
    steering = [SteeringSpec(layer=layer, vector=v, coefficient=coef, component=config.component,
                             rows=(i * q, (i + 1) * q)) for i, (layer, v, coef) in enumerate(rows)]
    answers = backend.generate(list(questions) * max(1, len(rows)), GenerationConfig(config.max_new_tokens),
                               steering or None)
    return [answers[i * q : (i + 1) * q] for i in range(max(1, len(rows)))]


def random_control(vector: torch.Tensor, seed: int) -> torch.Tensor:
    """A random direction with the norm of `vector` (seeded): the control every steering run stands beside."""
    g = torch.Generator().manual_seed(seed)
    return unit(torch.randn(vector.shape[-1], generator=g)) * vector.float().norm()


# --- judge-free metrics ----------------------------------------------------------------------------


@dataclass
class ReferenceTexts:
    """Token ids the judge-free metrics score: the extraction's test pairs (question without its system
    prompt + the positive / negative answer) and the unsteered model's answers to neutral prompts."""

    pair_prompts: list[list[int]]
    pos: list[list[int]]
    neg: list[list[int]]
    neutral_prompts: list[list[int]]
    neutral: list[list[int]]


def reference_texts(exp: Experiment, trait: str, extraction_variant: str, variant: str, model_id: str,
                    backend: Backend, config: SteeringEvalConfig) -> ReferenceTexts:
    """Load the test pairs and the (cached) unsteered neutral answers; generates the latter once."""
    pos, neg = exp.responses(trait, extraction_variant)
    test = exp.activation_metadata(trait, extraction_variant, config.position, config.component).splits["test"]
    prompts = [p.text for p in load_prompt_set("neutral").prompts][: config.n_neutral]
    cached = exp.neutral_reference(variant, config.max_new_tokens)
    if cached is None or cached.prompts != prompts or cached.model != model_id:
        results = backend.generate_results(prompts, GenerationConfig(max_new_tokens=config.max_new_tokens))
        cached = NeutralReference(model_id, prompts, [r.prompt_token_ids for r in results],
                                  [r.response_token_ids for r in results])
        exp.write_neutral_reference(variant, config.max_new_tokens, cached)
    keep = [i for i, r in enumerate(cached.response_token_ids) if r]
    return ReferenceTexts(
        pair_prompts=backend.prompt_token_ids([pos[i].prompt for i in test]),
        pos=[pos[i].response_token_ids for i in test], neg=[neg[i].response_token_ids for i in test],
        neutral_prompts=[cached.prompt_token_ids[i] for i in keep],
        neutral=[cached.response_token_ids[i] for i in keep],
    )


@dataclass
class _Scored:
    llr: torch.Tensor  # [n_pairs] per-token log-likelihood ratio pos - neg
    nll: torch.Tensor  # [n_neutral] per-token NLL
    kl: list[torch.Tensor] | None  # per neutral answer [n_tokens]: KL(unsteered || steered), None unsteered


def _score_texts(backend: Backend, refs: ReferenceTexts, steering: SteeringSpec | None = None) -> _Scored:
    spec = None if steering is None else [steering]
    both = backend.response_logprobs(refs.pair_prompts * 2, refs.pos + refs.neg, spec).logprobs
    n = len(refs.pos)
    llr = torch.stack([both[i].mean() - both[n + i].mean() for i in range(n)])
    neutral = backend.response_logprobs(refs.neutral_prompts, refs.neutral, spec, kl=spec is not None)
    return _Scored(llr, torch.stack([-x.mean() for x in neutral.logprobs]), neutral.kl)


def judge_free_metrics(backend: Backend, refs: ReferenceTexts, unsteered: _Scored,
                       steering: SteeringSpec) -> dict[str, dict]:
    """`trait_effect`, `nll_cost` (nats/token) and `kl` (nats/token) of `steering` (every position), each
    `{"value", "lo", "hi"}` over items (test pairs, neutral answers) against `unsteered`."""
    steered = _score_texts(backend, refs, steering)
    kl = torch.stack([k.mean() for k in steered.kl])
    return {"trait_effect": bootstrap_mean(steered.llr - unsteered.llr).to_dict(),
            "nll_cost": bootstrap_mean(steered.nll - unsteered.nll).to_dict(),
            "kl": bootstrap_mean(kl).to_dict()}


def judge_validity(judge, experiment: str | Experiment, trait: str, variant: str, position: str = "response[:]",
                   component: str = "residual") -> dict:
    """How well `judge`'s trait score separates the positive from the negative answers of the extraction's
    test split, which neither the vectors nor (for `offline_judge`) the judge were fitted on: AUROC with a
    95% bootstrap interval over test questions."""
    exp = Experiment.of(experiment)
    data = load_trait(trait)
    pos, neg = exp.responses(trait, variant)
    test = exp.activation_metadata(trait, variant, position, component).splits["test"]
    scores = {side: [s["trait_score"] for s in _score(judge, trait, data.definition, [r.prompt for r in rows],
                                                      [r.response for r in rows])]
              for side, rows in (("pos", [pos[i] for i in test]), ("neg", [neg[i] for i in test]))}
    pairs = [(p, n) for p, n in zip(scores["pos"], scores["neg"]) if p is not None and n is not None]
    if len(pairs) < 2:
        raise ConfigError(f"the judge scored fewer than 2 test pairs of {trait}; its validity cannot be measured")
    p, n = zip(*pairs)
    return {"auroc": paired_separation(p, n, 50.0)["auroc"].to_dict(), "n_pairs": len(pairs),
            "data": "extraction test split (unseen by the vectors and the judge)"}


# --- the evaluation --------------------------------------------------------------------------------


def run_steering_eval(experiment: str | Experiment, trait: str, judge, config: SteeringEvalConfig | None = None,
                      variant: str | None = None, backend: Backend | None = None,
                      judge_info: dict | None = None) -> SteeringResults:
    """Baseline + coefficient search on search questions, then the best valid run reported on report
    questions with a random control; returns everything in its `results.jsonl`.

    `judge_info` (e.g. `{"validity": judge_validity(...)}`) is stored with the judge's name in the header.
    """
    config = config or SteeringEvalConfig()
    exp = Experiment.of(experiment)
    mv = get_model_variant(exp, variant, mode="application")
    source = get_model_variant(exp, variant, mode="extraction")
    extraction_variant = source.name
    data = load_trait(trait)
    questions = data.steering.questions
    search = questions[: config.n_search]
    report_qs = questions[config.n_search :][: config.n_report]
    if not search or not report_qs:
        raise ConfigError(f"{trait} has {len(questions)} steering questions: n_search={config.n_search} leaves "
                         f"{len(report_qs)} for the report; each side needs at least one")
    if backend is None:
        backend = LocalBackend.from_experiment(exp, mv.name)
    layers = parse_layers(config.layers, backend.n_layers)
    source_at = (trait, extraction_variant, config.position, config.component)
    meta = exp.activation_metadata(*source_at)
    vectors = {l: exp.vector(*source_at, config.method, l) for l in layers}
    direction = config.direction or data.steering.direction
    sign = 1.0 if direction == "positive" else -1.0
    results_at = (trait, mv.name, config.position)
    judge_name = getattr(judge, "name", type(judge).__name__)
    header = SteeringHeader(
        trait=trait, direction=direction, steering_model=mv.label, steering_experiment=exp.name,
        vector_source={"model": source.label, "experiment": exp.name, "trait": trait, "method": config.method,
                       "component": config.component,
                       "input_hash": exp.vector_metadata(*source_at, config.method).input_hash},
        eval={"model": judge_name, "method": "judge", **(judge_info or {})}, prompts_hash=data.input_hash,
        n_questions=len(search), n_report=len(report_qs), max_new_tokens=config.max_new_tokens,
        n_neutral=config.n_neutral,
    )
    stored = exp.steering_results(*results_at)
    if stored is not None and not _same_setup(stored.header, header):
        # Other vectors, judge or questions: those runs are not comparable with new ones. Keep them aside
        # under a new name (everything above has been checked, so the new run can start).
        exp.set_aside_steering_results(*results_at)
        stored = None
    if stored is None:
        exp.append_steering(*results_at, header)
        stored = SteeringResults(header)

    @functools.cache
    def reference() -> tuple[ReferenceTexts, _Scored]:
        """The judge-free reference, computed only when a baseline or run is missing."""
        refs = reference_texts(exp, trait, extraction_variant, mv.name, mv.label, backend, config)
        return refs, _score_texts(backend, refs)

    if stored.baseline is None:
        [answers] = _generate(backend, search, [], config)
        exp.append_steering(*results_at, {
            "type": "baseline",
            "result": summarize_judge_scores(_score(judge, trait, data.definition, search, answers)).to_dict(),
            "judge_free": {"llr": bootstrap_mean(reference()[1].llr).to_dict(),
                           "nll": bootstrap_mean(reference()[1].nll).to_dict()},
            "timestamp": _now()})

    done = {_key(r): r for r in stored.runs}
    if config.coefficients is not None:
        schedule = [[(l, sign * c) for l in layers] for c in config.coefficients]
    else:
        schedule = None
    coefs = {l: sign * START_MULT * meta.activation_norms[l] / float(vectors[l].norm()) for l in layers}
    for step in range(len(schedule) if schedule is not None else config.search_steps):
        todo = schedule[step] if schedule is not None else [(l, coefs[l]) for l in layers]
        specs = {l: ProjectionConfig([VectorSpec(l, config.component, config.position, config.method, round(c, 4))])
                 for l, c in todo}
        missing = [(l, vectors[l], round(c, 4)) for l, c in todo if _spec_key(specs[l]) not in done]
        if missing:
            for (l, v, c), answers in zip(missing, _generate(backend, search, missing, config)):
                run = SteeringRunRecord(
                    summarize_judge_scores(_score(judge, trait, data.definition, search, answers)), specs[l],
                    eval_judge=judge_name, timestamp=_now(),
                    judge_free=judge_free_metrics(backend, *reference(), SteeringSpec(
                        layer=l, vector=v, coefficient=c, component=config.component)),
                    control=judge_free_metrics(backend, *reference(), SteeringSpec(
                        layer=l, vector=random_control(v, l), coefficient=c, component=config.component)),
                )
                exp.append_steering(*results_at, run)
                done[_key(run)] = run
        for l, _ in todo:
            coherence = done[_spec_key(specs[l])].result.coherence_mean
            coefs[l] *= UP_MULT if coherence is not None and coherence >= config.search_coherence else DOWN_MULT

    results = exp.steering_results(*results_at)
    best = results.best_run(config.min_coherence)
    if best is not None and (results.report is None or results.report["config"] != best.config.to_dict()):
        # The best run may come from an earlier call with other layers: load its vector by layer.
        vector = exp.vector(*source_at, best.method, best.layer)
        exp.append_steering(*results_at, _report(backend, judge, trait, data.definition, report_qs, best, vector, config))
        results = exp.steering_results(*results_at)
    return results


def _report(backend: Backend, judge, trait: str, definition: str, questions: Sequence[str],
            best: SteeringRunRecord, vector: torch.Tensor, config: SteeringEvalConfig) -> dict:
    """The selected run on the report questions: unsteered, steered and random control in one batch,
    judged; deltas are per-question paired differences with 95% bootstrap intervals."""
    layer, coef = best.layer, best.coefficient
    rows = [(layer, vector, 0.0), (layer, vector, coef), (layer, random_control(vector, layer), coef)]
    answers = dict(zip(("unsteered", "steered", "control"), _generate(backend, questions, rows, config)))
    scores = {k: _score(judge, trait, definition, questions, a) for k, a in answers.items()}

    def paired(cond: str, field: str) -> dict | None:
        d = [s[field] - u[field] for s, u in zip(scores[cond], scores["unsteered"])
             if s[field] is not None and u[field] is not None]
        return bootstrap_mean(d).to_dict() if d else None

    def mean(cond: str, field: str) -> dict | None:
        x = [s[field] for s in scores[cond] if s[field] is not None]
        return bootstrap_mean(x).to_dict() if x else None

    return {
        "type": "report", "config": best.config.to_dict(), "n_questions": len(questions),
        "results": {k: summarize_judge_scores(v).to_dict() for k, v in scores.items()},
        "trait": {k: mean(k, "trait_score") for k in scores}, "coherence": {k: mean(k, "coherence_score") for k in scores},
        "trait_delta": {k: paired(k, "trait_score") for k in ("steered", "control")},
        "coherence_delta": {k: paired(k, "coherence_score") for k in ("steered", "control")},
        "examples": [{"question": q, **{k: answers[k][i] for k in answers}} for i, q in enumerate(questions[:N_EXAMPLES])],
        "timestamp": _now(),
    }


_SETUP_KEYS = ("trait", "direction", "vector_source", "eval", "prompts_hash", "n_questions", "n_report",
               "max_new_tokens", "n_neutral")


def _same_setup(stored: SteeringHeader, header: SteeringHeader) -> bool:
    """Whether a results file's header describes the same setup (an experiment's name is not part of it:
    renaming the folder keeps its results)."""
    def setup(h: SteeringHeader) -> dict:
        d = h.to_dict()
        return {k: ({**d[k], "experiment": None} if k == "vector_source" else d[k]) for k in _SETUP_KEYS}

    return setup(stored) == setup(header)


def _spec_key(config: ProjectionConfig) -> tuple:
    v = config.vectors[0]
    return (v.layer, v.method, v.component, v.position, round(v.weight, 4))


def _key(run: SteeringRunRecord) -> tuple:
    return _spec_key(run.config)
