"""Steering evaluation: a coefficient grid judged on search questions, judge-free damage for every run, the
selection under a KL budget, and the selected run reported on disjoint questions beside prompting and random
controls.

Questions come from the trait's `steering.json` in file order: the first `n_search` drive the search,
the rest (up to `n_report`) are only used to report the configuration the search selected.

The grid. Each layer is steered at `n_coefficients` coefficients log-spaced from `GRID_LOW` to `GRID_HIGH`
times `mean ||h_L|| / ||v||` (times -1 to steer against the trait), so the low-damage end is always measured;
coefficient 0 is the unsteered baseline. One backend call per grid step answers the search questions for
every layer (one block of rows per layer, `SteeringSpec.rows`); then each layer whose grid turns from
selectable (within the budget, coherent) to not gets one more coefficient between the two. The backend is any
`tracelens.serving.protocol.Backend` (the model here or a running `tracelens server`).

Judge-free metrics (teacher forcing, no sampling, see `judge_free_metrics`) for every run:
  trait_effect   mean over the extraction's *test* pairs of the change under steering of the per-token
                 log-likelihood ratio log p(pos response | question) - log p(neg response | question);
  nll_cost       mean change in per-token NLL of the unsteered model's own answers to neutral prompts;
  kl             mean KL(unsteered || steered) of the next-token distributions over those answers.
Each is a mean over items with a 95% bootstrap interval.

Selection (`SteeringResults.selected_run`): the run that moves the judge's trait score furthest in the
trait's direction among those with `kl <= max_kl` and, when the judge's coherence is shown valid, coherence
>= `min_coherence`. A new results file first measures the judge's coherence, the degeneracy guard and the
NLL under the unsteered model on the variant's coherence validation set (`coherence_validity`; held-out
questions disjoint from the steering ones) and keeps the record in its header: a coherence threshold whose
AUROC interval does not clear 0.5 is not applied. KL, not the NLL cost, is the budget: on the model's own
answers the NLL cost is a one-sample estimate of the same divergence, and KL averages the whole next-token
distribution at every position. Runs over budget are stored and shown, never selected.

The report re-answers the report questions unsteered, prompted (the unsteered model with the trait's own
instruction: the system prompts of the extraction's positive scenarios, or negative ones when steering
against the trait), steered, prompted + steered and under random control directions (`N_CONTROLS` seeded
directions with the steered vector's norm and coefficient, question q under direction q mod N), all judged
by the same judge, with per-question deltas. The controls' judge-free metrics are measured for every
direction at the selected coefficient (the band at matched norm) and, when needed to reach the selected run's
KL, at the next grid coefficient (the band at matched KL, interpolated). Every baseline, run and report is one line of `results.jsonl`; a
re-run skips what is there (matching configuration) and never writes a line twice.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tracelens.serving.backends import GenerationConfig, LocalBackend, SteeringSpec
from tracelens.model.edits import unit
from tracelens.errors import ConfigError, MissingArtifactError
from tracelens.store import Experiment, get_model_variant
from tracelens.pipeline.extraction import parse_layers, vetting_hash
from tracelens.judges.base import summarize_judge_scores
from tracelens.pipeline.coherence_validation import coherence_set, coherence_signals, measure_coherence_validity
from tracelens.metrics import bootstrap_mean, paired_separation
from tracelens.datasets.prompt_sets import load_prompt_set
from tracelens.datasets.traits import TraitDataset, load_trait
from tracelens.serving.protocol import Backend
from tracelens.types import (DEFAULT_MAX_KL, MIN_COHERENCE, N_CONTROLS, CoherenceValidation, ModelVariant, NeutralReference, ProjectionConfig, SteeringHeader,
                             SteeringResults, SteeringRunRecord, VectorSpec)

GRID_LOW, GRID_HIGH = 0.02, 1.0  # the coefficient grid's ends, in units of mean ||h_L|| / ||v||
CONTROL_SEED = 7_340_033  # their generator's seed: shared with no other draw (layer-seeded ones included)
CONTROL_BAND = (5.0, 95.0)  # percentiles of a metric over the control directions
N_EXAMPLES = 3  # answers kept in the report line
CONDITIONS = ("unsteered", "prompted", "steered", "prompted_steered", "control")


@dataclass
class SteeringEvalConfig:
    layers: str | Sequence[int] = "30%-60%"
    method: str = "probe"
    position: str = "response[:]"
    component: str = "residual"
    coefficients: Sequence[float] | None = None  # explicit coefficients for every layer instead of the grid
    n_coefficients: int = 6  # grid coefficients per layer (besides 0, the baseline)
    n_search: int = 8  # the first n_search steering questions drive the search ...
    n_report: int | None = None  # ... the next n_report (None: all the rest) report the selected configuration
    max_new_tokens: int = 64
    direction: str | None = None  # default: the trait's steering.json
    n_neutral: int = 16  # neutral prompts whose unsteered answers measure the damage (NLL cost, KL)
    min_coherence: float = MIN_COHERENCE  # a run's judge coherence must reach this to be selected ...
    max_kl: float = DEFAULT_MAX_KL  # ... and its KL (nats/token) on the neutral answers stay at or below this
    n_controls: int = N_CONTROLS

    def __post_init__(self) -> None:
        for name in ("n_coefficients", "n_search", "max_new_tokens", "n_neutral"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer; got {value!r}")
        if not isinstance(self.n_controls, int) or self.n_controls < N_CONTROLS:
            raise ConfigError(f"n_controls must be an integer >= {N_CONTROLS} (a band needs many random "
                              f"directions); got {self.n_controls!r}")
        if self.n_report is not None and (not isinstance(self.n_report, int) or self.n_report < 1):
            raise ConfigError(f"n_report must be a positive integer or None; got {self.n_report!r}")
        if self.coefficients is not None:
            if not len(self.coefficients) or not all(math.isfinite(float(c)) for c in self.coefficients):
                raise ConfigError(f"coefficients must be a non-empty list of finite numbers; got {list(self.coefficients)}")
        if not 0 <= float(self.min_coherence) <= 100:
            raise ConfigError(f"min_coherence must be in [0, 100]; got {self.min_coherence!r}")
        if not (isinstance(self.max_kl, (int, float)) and self.max_kl > 0 and math.isfinite(self.max_kl)):
            raise ConfigError(f"max_kl must be a positive number of nats/token; got {self.max_kl!r}")
        if self.direction not in (None, "positive", "negative"):
            raise ConfigError(f"direction must be 'positive', 'negative' or None; got {self.direction!r}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _score(judge, trait: str, definition: str, questions: Sequence[str], answers: Sequence[str]) -> list[dict]:
    return judge.score([{"question": q, "response": a, "trait_name": trait, "definition": definition}
                        for q, a in zip(questions, answers)])


def coefficient_grid(scale: float, n: int) -> list[float]:
    """`n` coefficients log-spaced from `GRID_LOW * scale` to `GRID_HIGH * scale` (`scale`: mean ||h_L|| / ||v||;
    n = 1: the low end only)."""
    if n == 1:
        return [GRID_LOW * scale]
    return [GRID_LOW * scale * (GRID_HIGH / GRID_LOW) ** (i / (n - 1)) for i in range(n)]


def control_directions(d: int, n: int = N_CONTROLS, seed: int = CONTROL_SEED) -> Float[Tensor, "n d"]:
    """`n` random unit directions of width `d` from their own seeded generator (never layer-seeded, so they are
    not the `random_baseline` method's nor the chance band's draws)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([unit(torch.randn(d, generator=g)) for _ in range(n)])


def random_control(vector: torch.Tensor, seed: int) -> torch.Tensor:
    """One `control_directions` draw (seeded) with the norm of `vector`; A/B propensity curves use it as their
    control."""
    return control_directions(vector.shape[-1], 1, seed)[0] * vector.float().norm()


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


# --- judge-free metrics ----------------------------------------------------------------------------


@dataclass
class ReferenceTexts:
    """Token ids the judge-free metrics score: the extraction's test pairs (question without its system
    prompt + the positive / negative answer) and the unsteered model's answers to neutral prompts, with the
    questions as text (to score them again under an instruction)."""

    pair_prompts: list[list[int]]
    pos: list[list[int]]
    neg: list[list[int]]
    neutral_prompts: list[list[int]]
    neutral: list[list[int]]
    pair_questions: list[str]
    neutral_questions: list[str]


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
    questions = [pos[i].prompt for i in test]
    return ReferenceTexts(
        pair_prompts=backend.prompt_token_ids(questions),
        pos=[pos[i].response_token_ids for i in test], neg=[neg[i].response_token_ids for i in test],
        neutral_prompts=[cached.prompt_token_ids[i] for i in keep],
        neutral=[cached.response_token_ids[i] for i in keep],
        pair_questions=questions, neutral_questions=[cached.prompts[i] for i in keep],
    )


@dataclass
class _Scored:
    llr: Float[Tensor, " n_pairs"]  # per-token log-likelihood ratio pos - neg
    nll: Float[Tensor, " n_neutral"]  # per-token NLL of the neutral answers
    kl: list[torch.Tensor] | None  # per neutral answer [n_tokens]: KL(unsteered || steered); None unsteered


def _round_robin(instructions: Sequence[str], n: int) -> list[str]:
    return [instructions[i % len(instructions)] for i in range(n)]


def _score_texts(backend: Backend, refs: ReferenceTexts, steering: SteeringSpec | None = None,
                 instructions: Sequence[str] | None = None) -> _Scored:
    """Score the reference texts under `steering` and, given `instructions`, with them as system prompts (one
    per question, in turn; KL is then not measured: the context differs from the unsteered one)."""
    spec = None if steering is None else [steering]
    pair_prompts, neutral_prompts = refs.pair_prompts, refs.neutral_prompts
    if instructions:
        pair_prompts = backend.prompt_token_ids(refs.pair_questions,
                                                _round_robin(instructions, len(refs.pair_questions)))
        neutral_prompts = backend.prompt_token_ids(refs.neutral_questions,
                                                   _round_robin(instructions, len(refs.neutral_questions)))
    both = backend.response_logprobs(pair_prompts * 2, refs.pos + refs.neg, spec).logprobs
    n = len(refs.pos)
    llr = torch.stack([both[i].mean() - both[n + i].mean() for i in range(n)])
    with_kl = spec is not None and not instructions
    neutral = backend.response_logprobs(neutral_prompts, refs.neutral, spec, kl=with_kl)
    return _Scored(llr, torch.stack([-x.mean() for x in neutral.logprobs]), neutral.kl)


def judge_free_metrics(backend: Backend, refs: ReferenceTexts, unsteered: _Scored,
                       steering: SteeringSpec | None, instructions: Sequence[str] | None = None) -> dict[str, dict]:
    """`trait_effect`, `nll_cost` (nats/token) and, without `instructions`, `kl` (nats/token) of `steering`
    (every position; None: no steering, e.g. instructions alone), each `{"value", "lo", "hi"}` over items
    (test pairs, neutral answers) against `unsteered`."""
    scored = _score_texts(backend, refs, steering, instructions)
    out = {"trait_effect": bootstrap_mean(scored.llr - unsteered.llr).to_dict(),
           "nll_cost": bootstrap_mean(scored.nll - unsteered.nll).to_dict()}
    if scored.kl is not None:
        out["kl"] = bootstrap_mean(torch.stack([k.mean() for k in scored.kl])).to_dict()
    return out


def _band(values: Sequence[float]) -> dict[str, float]:
    """The mean of `values` (one per control direction) and their `CONTROL_BAND` percentiles."""
    lo, hi = np.percentile(values, CONTROL_BAND)
    return {"value": round(float(np.mean(values)), 4), "lo": round(float(lo), 4), "hi": round(float(hi), 4)}


def matched_kl(curve: Sequence[dict], kl: float) -> dict | None:
    """The controls' trait effect at KL = `kl` (nats/token): per direction, interpolated linearly in sqrt(KL)
    (to which the coefficient is about proportional) between its measured points, coefficient 0 at (0, 0);
    the band over the directions whose measured KL reaches `kl`, with their count. None when none does.
    `curve`: `control_curve` points."""
    n = len(curve[0]["per_direction"]["kl"])
    values = []
    for i in range(n):
        points = sorted([(0.0, 0.0)] + [(p["per_direction"]["kl"][i], p["per_direction"]["trait_effect"][i])
                                        for p in curve])
        if points[-1][0] >= kl:
            values.append(float(np.interp(math.sqrt(kl), [math.sqrt(max(x, 0.0)) for x, _ in points],
                                          [y for _, y in points])))
    return None if not values else {"kl": round(kl, 4), "trait_effect": _band(values), "n_directions": len(values),
                                    "of": n}


def judge_validity(judge, experiment: str | Experiment, trait: str, variant: str, position: str = "response[:]",
                   component: str = "residual") -> dict:
    """How well `judge`'s trait score separates the positive from the negative answers of the extraction's
    test questions, which neither the vectors nor (for `offline_judge`) the judge were fitted on: AUROC with a
    95% bootstrap interval over test questions. When `judge` vetted this extraction, the pairs it kept would
    separate by construction: every generated pair of the test questions is scored instead, kept or not."""
    exp = Experiment.of(experiment)
    data = load_trait(trait)
    pos, neg = exp.responses(trait, variant)
    test = exp.activation_metadata(trait, variant, position, component).splits["test"]
    data_note = "extraction test split (unseen by the vectors and the judge)"
    if _vetted_by(exp, trait, variant, judge):
        questions = {pos[i].prompt for i in test}
        test = [i for i, r in enumerate(pos) if r.prompt in questions]
        data_note = ("every pair of the extraction's test questions, unvetted (this judge vetted the extraction: "
                     "the pairs it kept separate by construction)")
    scores = {side: [s["trait_score"] for s in _score(judge, trait, data.definition, [r.prompt for r in rows],
                                                      [r.response for r in rows])]
              for side, rows in (("pos", [pos[i] for i in test]), ("neg", [neg[i] for i in test]))}
    pairs = [(p, n) for p, n in zip(scores["pos"], scores["neg"]) if p is not None and n is not None]
    if len(pairs) < 2:
        raise ConfigError(f"the judge scored fewer than 2 test pairs of {trait}; its validity cannot be measured")
    p, n = zip(*pairs)
    return {"auroc": paired_separation(p, n, 50.0)["auroc"].to_dict(), "n_pairs": len(pairs), "data": data_note}


def _vetted_by(exp: Experiment, trait: str, variant: str, judge) -> bool:
    """Whether `judge` (by name) vetted the stored responses of `trait`."""
    try:
        vetting, responses = exp.vetting(trait, variant), exp.responses_metadata(trait, variant)
    except MissingArtifactError:
        return False
    return vetting.input_hash == vetting_hash(responses.input_hash, getattr(judge, "name", type(judge).__name__))


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

    @property
    def instructions(self) -> list[str]:
        """The trait's own instruction: the distinct system prompts of its scenarios on the steered side."""
        side = self.data.positive if self.sign > 0 else self.data.negative
        return list(dict.fromkeys(s.system_prompt for s in side if s.system_prompt))

    def score(self, questions: Sequence[str], answers: Sequence[str]) -> list[dict]:
        return _score(self.judge, self.trait, self.data.definition, questions, answers)

    def spec(self, layer: int, vector: torch.Tensor, coefficient: float, rows=None) -> SteeringSpec:
        return SteeringSpec(layer=layer, vector=vector, coefficient=coefficient, component=self.config.component,
                            rows=rows)


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


def _open_results(s: _Setup, judge_info: dict | None, command: str) -> SteeringResults:
    """The stored results of this setup; results of another setup (other vectors, judge, questions or selection
    rule: not comparable) are set aside under a new name first. A new results file's header gets the judge's
    validity, measured here (so a finished re-run asks the judge nothing)."""
    c = s.config
    header = SteeringHeader(
        trait=s.trait, direction="positive" if s.sign > 0 else "negative", steering_model=s.variant.label,
        steering_experiment=s.exp.name,
        vector_source={"model": s.source.label, "experiment": s.exp.name, "trait": s.trait, "method": c.method,
                       "component": c.component,
                       "input_hash": s.exp.vector_metadata(*s.source_at, c.method).input_hash},
        eval={"model": s.judge_name, "method": "judge", **(judge_info or {})},
        prompts_hash=s.data.input_hash, n_questions=len(s.search), n_report=len(s.report_qs),
        max_new_tokens=c.max_new_tokens, n_neutral=c.n_neutral,
        selection={"max_kl": c.max_kl, "min_coherence": c.min_coherence, "n_controls": c.n_controls,
                   "control_seed": CONTROL_SEED, "grid": {"low": GRID_LOW, "high": GRID_HIGH, "n": c.n_coefficients,
                                                          "unit": "mean ||h_L|| / ||v||"}},
        command=command,
    )
    stored = s.exp.steering_results(*s.results_at)
    if stored is not None and _same_setup(stored.header, header):
        return stored
    if stored is not None:
        s.exp.set_aside_steering_results(*s.results_at)
    header.eval["validity"] = judge_validity(s.judge, s.exp, *s.source_at)
    header.coherence_validity = coherence_validity(s).to_dict()
    s.exp.append_steering(*s.results_at, header)
    return SteeringResults(header)


def coherence_validity(s: _Setup) -> CoherenceValidation:
    """The judge's coherence, the degeneracy guard and the NLL under the unsteered model, validated on the
    variant's coherence set of answers as long as the steered ones (`coherence_set`)."""
    cset = coherence_set(s.exp, s.variant.name, s.backend, s.data.steering.questions, s.config.max_new_tokens)
    return measure_coherence_validity(cset, *coherence_signals(s.judge, s.trait, s.data.definition, s.backend))


def _grids(s: _Setup) -> dict[int, list[float]]:
    """Per layer, the signed coefficients searched: the explicit ones, or `coefficient_grid` of its scale."""
    if s.config.coefficients is not None:
        return {l: [s.sign * float(k) for k in s.config.coefficients if k != 0] for l in s.vectors}
    norms = s.exp.activation_metadata(*s.source_at).activation_norms
    return {l: [s.sign * k for k in coefficient_grid(norms[l] / float(v.norm()), s.config.n_coefficients)]
            for l, v in s.vectors.items()}


def _step(s: _Setup, done: dict[tuple, SteeringRunRecord], todo: list[tuple[int, float]], reference) -> None:
    """Judge each (layer, coefficient) of `todo` not in `done` on the search questions (one backend call) and
    add its run line, with its judge-free metrics."""
    c = s.config
    specs = {l: ProjectionConfig([VectorSpec(l, c.component, c.position, c.method, k)]) for l, k in todo}
    missing = [(l, s.vectors[l], k) for l, k in todo if _spec_key(specs[l]) not in done]
    for (l, v, k), answers in zip(missing, _generate(s.backend, s.search, missing, c) if missing else []):
        run = SteeringRunRecord(
            summarize_judge_scores(s.score(s.search, answers)), specs[l], eval_judge=s.judge_name,
            timestamp=_now(), judge_free=judge_free_metrics(s.backend, *reference(), s.spec(l, v, k)))
        s.exp.append_steering(*s.results_at, run)
        done[_key(run)] = run


def _refinements(s: _Setup, done: dict[tuple, SteeringRunRecord], grids: dict[int, list[float]],
                 rule: tuple[float | None, float | None]) -> list[tuple]:
    """Per layer whose grid turns from selectable to not (`is_valid` under the selection `rule`), the geometric
    mean of the last selectable coefficient and the next one: where the best run within the rule lies."""
    c, todo = s.config, []
    for l, grid in grids.items():
        runs = [done.get((l, c.method, c.component, c.position, _sig(k))) for k in grid]
        ok = [r is not None and r.is_valid(*rule) for r in runs]
        edges = [i for i in range(len(ok) - 1) if ok[i] and not ok[i + 1]]
        if edges:
            i = edges[-1]
            todo.append((l, _sig(math.copysign(math.sqrt(grid[i] * grid[i + 1]), grid[i]))))
    return todo


def _search(s: _Setup, done: dict[tuple, SteeringRunRecord], reference, rule: tuple[float | None, float | None]
            ) -> None:
    """The grid, one step (all layers) per backend call, then, without explicit `coefficients`, one refining
    coefficient per layer between its last selectable grid run and the next (`_refinements` under `rule`)."""
    grids = _grids(s)
    for step in range(max(len(g) for g in grids.values())):
        _step(s, done, [(l, _sig(g[step])) for l, g in grids.items() if step < len(g)], reference)
    if s.config.coefficients is None:
        _step(s, done, _refinements(s, done, grids, rule), reference)


def run_steering_eval(experiment: str | Experiment, trait: str, judge, config: SteeringEvalConfig | None = None,
                      variant: str | None = None, backend: Backend | None = None,
                      judge_info: dict | None = None, command: str | None = None) -> SteeringResults:
    """Baseline + coefficient grid on search questions, then the best run within the budget reported on report
    questions beside prompting and random controls; returns everything in its `results.jsonl`.

    The header records the judge's name and its validity (`judge_validity`, measured here on the extraction's
    test split), the selection rule (budget, coherence threshold, grid, controls), plus `judge_info` (any
    further facts about the judge) when given, and `command` (default "python API (run_steering_eval)"; the
    CLI passes its command line).
    """
    s = _setup(experiment, trait, judge, config or SteeringEvalConfig(), variant, backend)
    stored = _open_results(s, judge_info, command or "python API (run_steering_eval)")

    @functools.cache
    def reference() -> tuple[ReferenceTexts, _Scored]:
        """The judge-free reference, computed only when a baseline, run or report is missing."""
        refs = reference_texts(s.exp, trait, s.source_at[1], s.variant.name, s.variant.label, s.backend, s.config)
        return refs, _score_texts(s.backend, refs)

    if stored.baseline is None:
        [answers] = _generate(s.backend, s.search, [], s.config)
        s.exp.append_steering(*s.results_at, {
            "type": "baseline", "result": summarize_judge_scores(s.score(s.search, answers)).to_dict(),
            "judge_free": {"llr": bootstrap_mean(reference()[1].llr).to_dict(),
                           "nll": bootstrap_mean(reference()[1].nll).to_dict()},
            "timestamp": _now()})
    _search(s, {_key(r): r for r in stored.runs}, reference, stored.selection_rule())
    results = s.exp.steering_results(*s.results_at)
    best = results.selected_run()
    if best is not None and (results.report is None or results.report["config"] != best.config.to_dict()):
        # The best run may come from an earlier call with other layers: load its vector by layer.
        vector = s.exp.vector(*s.source_at, best.method, best.layer)
        s.exp.append_steering(*s.results_at, _report(s, results, best, vector, reference))
        results = s.exp.steering_results(*s.results_at)
    return results


# --- the report ------------------------------------------------------------------------------------


def _deltas(scores: Sequence[dict], base: Sequence[dict], field: str) -> list[float | None]:
    """Per question, `scores[q][field] - base[q][field]` (None where either is unscored)."""
    return [None if a[field] is None or b[field] is None else a[field] - b[field] for a, b in zip(scores, base)]


def _mean_of(values: Sequence[float | None]) -> dict | None:
    kept = [v for v in values if v is not None]
    return bootstrap_mean(kept).to_dict() if kept else None


def _report_answers(s: _Setup, best: SteeringRunRecord, vector: torch.Tensor) -> dict[str, list[str]]:
    """The report questions answered under every condition in one backend call: unsteered, prompted (the
    trait's instructions in turn; skipped when its scenarios have none), steered, prompted + steered, and
    control (question q steered by control direction q mod n_controls, the vector's norm and coefficient)."""
    qs, n, k = s.report_qs, len(s.report_qs), best.coefficient
    conditions = [c for c in CONDITIONS if s.instructions or not c.startswith("prompted")]
    controls = _controls(s, vector)
    systems, specs = [], []
    for b, cond in enumerate(conditions):
        systems += _round_robin(s.instructions, n) if cond.startswith("prompted") else [None] * n
        if cond in ("steered", "prompted_steered"):
            specs.append(s.spec(best.layer, vector, k, (b * n, (b + 1) * n)))
        elif cond == "control":
            specs += [s.spec(best.layer, controls[q % len(controls)], k, (b * n + q, b * n + q + 1)) for q in range(n)]
    answers = s.backend.generate(list(qs) * len(conditions), GenerationConfig(s.config.max_new_tokens), specs,
                                 systems)
    return {cond: answers[b * n : (b + 1) * n] for b, cond in enumerate(conditions)}


def _controls(s: _Setup, vector: torch.Tensor) -> Float[Tensor, "n d"]:
    """The `n_controls` control directions at the norm of `vector`."""
    return control_directions(vector.shape[-1], s.config.n_controls) * vector.float().norm()


def _control_curve(s: _Setup, results: SteeringResults, best: SteeringRunRecord, vector: torch.Tensor,
                   reference) -> list[dict]:
    """Every control direction's judge-free metrics at the selected coefficient and, when some direction's KL
    stays below the selected run's there, also at the next larger coefficient searched at that layer:
    `{"coefficient", "per_direction": {metric: [one per direction]}, "band", "judged"}` per coefficient, where
    `judged` is the judge's trait and coherence on the search questions (question q steered by direction q mod
    n_controls), comparable with the search runs."""
    larger = sorted((r.coefficient for r in results.runs if r.layer == best.layer and r.method == best.method
                     and abs(r.coefficient) > abs(best.coefficient)), key=abs)
    controls = _controls(s, vector)
    target = ((best.judge_free or {}).get("kl") or {}).get("value", 0.0)
    curve = []
    for coef in [best.coefficient, *larger[:1]]:
        if curve and min(curve[-1]["per_direction"]["kl"]) >= target:
            break  # every direction already reaches the selected run's KL
        per = {"trait_effect": [], "nll_cost": [], "kl": []}
        for direction in controls:
            metrics = judge_free_metrics(s.backend, *reference(), s.spec(best.layer, direction, coef))
            for key in per:
                per[key].append(metrics[key]["value"])
        curve.append({"coefficient": coef, "per_direction": per, "band": {k: _band(v) for k, v in per.items()}})
    qs, n = s.search, len(s.search)
    specs = [s.spec(best.layer, controls[q % len(controls)], p["coefficient"], (b * n + q, b * n + q + 1))
             for b, p in enumerate(curve) for q in range(n)]
    answers = s.backend.generate(list(qs) * len(curve), GenerationConfig(s.config.max_new_tokens), specs)
    for b, point in enumerate(curve):
        scores = s.score(qs, answers[b * n : (b + 1) * n])
        point["judged"] = {k: _mean_of([x[f"{k}_score"] for x in scores]) for k in ("trait", "coherence")}
    return curve


def _steerability(per_question: dict[str, list[float | None]], sign: float, questions: Sequence[str]) -> dict:
    """Per condition, the fraction of report questions moved in the intended direction (with an interval);
    the anti-steerable questions: steered the wrong way beyond the control's 5-95% spread of deltas."""
    moved = {cond: _mean_of([None if d is None else float(sign * d > 0) for d in deltas])
             for cond, deltas in per_question.items()}
    control = [d for d in per_question["control"] if d is not None]
    lo, hi = (np.percentile(control, CONTROL_BAND) if control else (0.0, 0.0))
    wrong = (lambda d: d < min(lo, 0.0)) if sign > 0 else (lambda d: d > max(hi, 0.0))
    anti = [q for q, d in zip(questions, per_question["steered"]) if d is not None and wrong(d)]
    return {"moved": moved, "control_spread": [round(float(lo), 4), round(float(hi), 4)], "anti_steerable": anti}


def _selection(results: SteeringResults, best: SteeringRunRecord) -> dict:
    """The selection rule and what it chose, beside the run the search would pick without the KL budget."""
    def brief(run: SteeringRunRecord) -> dict:
        jf = run.judge_free or {}
        return {"config": run.config.to_dict(), "trait_mean": run.result.trait_mean,
                "coherence_mean": run.result.coherence_mean, "kl": jf.get("kl"), "trait_effect": jf.get("trait_effect")}

    min_coherence, max_kl = results.selection_rule()
    unconstrained = results.best_run(min_coherence)
    return {"max_kl": max_kl, "min_coherence": min_coherence, "selected": brief(best),
            "unconstrained": None if unconstrained is None or unconstrained is best else brief(unconstrained),
            "n_runs": len(results.runs), "n_over_budget": sum(not r.within_budget(max_kl) for r in results.runs)}


def _report(s: _Setup, results: SteeringResults, best: SteeringRunRecord, vector: torch.Tensor, reference) -> dict:
    """The selected run on the report questions beside unsteered, prompted, prompted + steered and control,
    judged; per-question deltas from unsteered (their means, with 95% bootstrap intervals, are the deltas
    reported), steerability, the judge-free metrics of each condition and the control band at matched norm
    and matched KL."""
    qs = s.report_qs
    answers = _report_answers(s, best, vector)
    scores = {k: s.score(qs, a) for k, a in answers.items()}
    others = [k for k in scores if k != "unsteered"]
    per_q = {k: _deltas(scores[k], scores["unsteered"], "trait_score") for k in others}
    judge_free = {"steered": best.judge_free}
    if s.instructions:
        judge_free["prompted"] = judge_free_metrics(s.backend, *reference(), None, s.instructions)
        judge_free["prompted_steered"] = judge_free_metrics(
            s.backend, *reference(), s.spec(best.layer, vector, best.coefficient), s.instructions)
    curve = _control_curve(s, results, best, vector, reference)
    judge_free["control"] = curve[0]["band"]
    versus = None
    if "prompted" in per_q:
        versus = _mean_of([None if a is None or b is None else s.sign * (a - b)
                           for a, b in zip(per_q["steered"], per_q["prompted"])])
    kl = (best.judge_free or {}).get("kl")
    return {
        "type": "report", "config": best.config.to_dict(), "n_questions": len(qs),
        "selection": _selection(results, best), "instructions": s.instructions,
        "results": {k: summarize_judge_scores(v).to_dict() for k, v in scores.items()},
        "trait": {k: _mean_of([x["trait_score"] for x in v]) for k, v in scores.items()},
        "coherence": {k: _mean_of([x["coherence_score"] for x in v]) for k, v in scores.items()},
        "trait_delta": {k: _mean_of(d) for k, d in per_q.items()},
        "coherence_delta": {k: _mean_of(_deltas(scores[k], scores["unsteered"], "coherence_score")) for k in others},
        "per_question": {"questions": list(qs), **per_q}, "steerability": _steerability(per_q, s.sign, qs),
        "steering_vs_prompting": versus, "judge_free": judge_free, "control_curve": curve,
        "matched_kl": None if kl is None else matched_kl(curve, kl["value"]),
        "examples": [{"question": q, **{k: answers[k][i] for k in answers}} for i, q in enumerate(qs[:N_EXAMPLES])],
        "timestamp": _now(),
    }


_SETUP_KEYS = ("trait", "direction", "vector_source", "eval", "prompts_hash", "n_questions", "n_report",
               "max_new_tokens", "n_neutral", "selection")


def _same_setup(stored: SteeringHeader, header: SteeringHeader) -> bool:
    """Whether a results file's header describes the same setup (an experiment's name is not part of it:
    renaming the folder keeps its results)."""
    def setup(h: SteeringHeader) -> dict:
        d = h.to_dict()
        d["vector_source"] = {**d["vector_source"], "experiment": None}
        d["eval"] = {k: v for k, v in d["eval"].items() if k != "validity"}  # measured, not chosen
        return {k: d.get(k) for k in _SETUP_KEYS}

    return setup(stored) == setup(header)


def _spec_key(config: ProjectionConfig) -> tuple:
    v = config.vectors[0]
    return (v.layer, v.method, v.component, v.position, _sig(v.weight))


def _sig(coefficient: float) -> float:
    """A coefficient as stored: 6 significant digits (small layers' coefficients stay distinct)."""
    return float(f"{coefficient:.6g}")


def _key(run: SteeringRunRecord) -> tuple:
    return _spec_key(run.config)
