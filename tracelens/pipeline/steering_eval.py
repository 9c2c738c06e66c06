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
from tracelens.datasets.traits import TraitDataset, load_trait
from tracelens.serving.protocol import Backend
from tracelens.types import (MIN_COHERENCE, ModelVariant, NeutralReference, ProjectionConfig, SteeringHeader,
                             SteeringResults, SteeringRunRecord, VectorSpec)

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


@dataclass
class _Setup:
    """What one `run_steering_eval` call works with, resolved and checked before anything runs."""

    exp: Experiment
    trait: str
    judge: object
    config: SteeringEvalConfig
    data: TraitDataset
    search: list[str]  # search questions
    report_qs: list[str]  # report questions
    backend: Backend
    variant: ModelVariant  # the variant steered
    source: ModelVariant  # the variant the vectors were extracted from
    vectors: dict[int, torch.Tensor]  # layer -> unit vector
    sign: float  # +1 toward the trait, -1 against it

    @property
    def source_at(self) -> tuple[str, str, str, str]:
        """(trait, extraction variant, position, component): where the vectors are stored."""
        return self.trait, self.source.name, self.config.position, self.config.component

    @property
    def results_at(self) -> tuple[str, str, str]:
        return self.trait, self.variant.name, self.config.position

    @property
    def judge_name(self) -> str:
        return getattr(self.judge, "name", type(self.judge).__name__)

    def score(self, questions: Sequence[str], answers: Sequence[str]) -> list[dict]:
        return _score(self.judge, self.trait, self.data.definition, questions, answers)


def _setup(experiment: str | Experiment, trait: str, judge, config: SteeringEvalConfig, variant: str | None,
           backend: Backend | None) -> _Setup:
    exp = Experiment.of(experiment)
    mv = get_model_variant(exp, variant, mode="application")
    source = get_model_variant(exp, variant, mode="extraction")
    data = load_trait(trait)
    questions = data.steering.questions
    search, report_qs = questions[: config.n_search], questions[config.n_search :][: config.n_report]
    if not search or not report_qs:
        raise ConfigError(f"{trait} has {len(questions)} steering questions: n_search={config.n_search} leaves "
                         f"{len(report_qs)} for the report; each side needs at least one")
    backend = backend if backend is not None else LocalBackend.from_experiment(exp, mv.name)
    vectors = {l: exp.vector(trait, source.name, config.position, config.component, config.method, l)
               for l in parse_layers(config.layers, backend.n_layers)}
    sign = 1.0 if (config.direction or data.steering.direction) == "positive" else -1.0
    return _Setup(exp, trait, judge, config, data, search, report_qs, backend, mv, source, vectors, sign)


def _open_results(s: _Setup, judge_info: dict | None) -> SteeringResults:
    """The stored results of this setup; results of another setup (other vectors, judge or questions: not
    comparable) are set aside under a new name first. A new results file's header gets the judge's validity,
    measured here (so a finished re-run asks the judge nothing)."""
    header = SteeringHeader(
        trait=s.trait, direction="positive" if s.sign > 0 else "negative", steering_model=s.variant.label,
        steering_experiment=s.exp.name,
        vector_source={"model": s.source.label, "experiment": s.exp.name, "trait": s.trait, "method": s.config.method,
                       "component": s.config.component,
                       "input_hash": s.exp.vector_metadata(*s.source_at, s.config.method).input_hash},
        eval={"model": s.judge_name, "method": "judge", **(judge_info or {})},
        prompts_hash=s.data.input_hash, n_questions=len(s.search), n_report=len(s.report_qs),
        max_new_tokens=s.config.max_new_tokens, n_neutral=s.config.n_neutral,
    )
    stored = s.exp.steering_results(*s.results_at)
    if stored is not None and _same_setup(stored.header, header):
        return stored
    if stored is not None:
        s.exp.set_aside_steering_results(*s.results_at)
    header.eval["validity"] = judge_validity(s.judge, s.exp, *s.source_at)
    s.exp.append_steering(*s.results_at, header)
    return SteeringResults(header)


def _search(s: _Setup, done: dict[tuple, SteeringRunRecord], reference) -> None:
    """Each step judges every layer's current coefficient on the search questions (one backend call), adds a
    run line per new (layer, coefficient), then moves each layer's coefficient up while its coherence holds
    (explicit `coefficients`: those, in order, instead)."""
    c = s.config
    meta = s.exp.activation_metadata(*s.source_at)
    coefs = {l: s.sign * START_MULT * meta.activation_norms[l] / float(v.norm()) for l, v in s.vectors.items()}
    steps = len(c.coefficients) if c.coefficients is not None else c.search_steps
    for step in range(steps):
        todo = ([(l, s.sign * c.coefficients[step]) for l in s.vectors] if c.coefficients is not None
                else list(coefs.items()))
        specs = {l: ProjectionConfig([VectorSpec(l, c.component, c.position, c.method, round(k, 4))]) for l, k in todo}
        missing = [(l, s.vectors[l], round(k, 4)) for l, k in todo if _spec_key(specs[l]) not in done]
        for (l, v, k), answers in zip(missing, _generate(s.backend, s.search, missing, c) if missing else []):
            run = SteeringRunRecord(
                summarize_judge_scores(s.score(s.search, answers)), specs[l], eval_judge=s.judge_name,
                timestamp=_now(),
                judge_free=judge_free_metrics(s.backend, *reference(), SteeringSpec(
                    layer=l, vector=v, coefficient=k, component=c.component)),
                control=judge_free_metrics(s.backend, *reference(), SteeringSpec(
                    layer=l, vector=random_control(v, l), coefficient=k, component=c.component)),
            )
            s.exp.append_steering(*s.results_at, run)
            done[_key(run)] = run
        for l, _ in todo:
            coherence = done[_spec_key(specs[l])].result.coherence_mean
            coefs[l] *= UP_MULT if coherence is not None and coherence >= c.search_coherence else DOWN_MULT


def run_steering_eval(experiment: str | Experiment, trait: str, judge, config: SteeringEvalConfig | None = None,
                      variant: str | None = None, backend: Backend | None = None,
                      judge_info: dict | None = None) -> SteeringResults:
    """Baseline + coefficient search on search questions, then the best valid run reported on report
    questions with a random control; returns everything in its `results.jsonl`.

    The header records the judge's name and its validity (`judge_validity`, measured here on the extraction's
    test split), plus `judge_info` (any further facts about the judge) when given.
    """
    s = _setup(experiment, trait, judge, config or SteeringEvalConfig(), variant, backend)
    stored = _open_results(s, judge_info)

    @functools.cache
    def reference() -> tuple[ReferenceTexts, _Scored]:
        """The judge-free reference, computed only when a baseline or run is missing."""
        refs = reference_texts(s.exp, trait, s.source_at[1], s.variant.name, s.variant.label, s.backend, s.config)
        return refs, _score_texts(s.backend, refs)

    if stored.baseline is None:
        [answers] = _generate(s.backend, s.search, [], s.config)
        s.exp.append_steering(*s.results_at, {
            "type": "baseline", "result": summarize_judge_scores(s.score(s.search, answers)).to_dict(),
            "judge_free": {"llr": bootstrap_mean(reference()[1].llr).to_dict(),
                           "nll": bootstrap_mean(reference()[1].nll).to_dict()},
            "timestamp": _now()})
    _search(s, {_key(r): r for r in stored.runs}, reference)
    results = s.exp.steering_results(*s.results_at)
    best = results.best_run(s.config.min_coherence)
    if best is not None and (results.report is None or results.report["config"] != best.config.to_dict()):
        # The best run may come from an earlier call with other layers: load its vector by layer.
        s.exp.append_steering(*s.results_at, _report(s, best, s.exp.vector(*s.source_at, best.method, best.layer)))
        results = s.exp.steering_results(*s.results_at)
    return results


def _report(s: _Setup, best: SteeringRunRecord, vector: torch.Tensor) -> dict:
    """The selected run on the report questions: unsteered, steered and random control in one batch,
    judged; deltas are per-question paired differences with 95% bootstrap intervals."""
    layer, coef, questions = best.layer, best.coefficient, s.report_qs
    rows = [(layer, vector, 0.0), (layer, vector, coef), (layer, random_control(vector, layer), coef)]
    answers = dict(zip(("unsteered", "steered", "control"), _generate(s.backend, questions, rows, s.config)))
    scores = {k: s.score(questions, a) for k, a in answers.items()}

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
        d["vector_source"] = {**d["vector_source"], "experiment": None}
        d["eval"] = {k: v for k, v in d["eval"].items() if k != "validity"}  # measured, not chosen
        return {k: d[k] for k in _SETUP_KEYS}

    return setup(stored) == setup(header)


def _spec_key(config: ProjectionConfig) -> tuple:
    v = config.vectors[0]
    return (v.layer, v.method, v.component, v.position, round(v.weight, 4))


def _key(run: SteeringRunRecord) -> tuple:
    return _spec_key(run.config)
