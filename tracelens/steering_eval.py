"""Steering evaluation: an unsteered baseline, then an adaptive coefficient search per layer, judged.

Each search step generates, in ONE batch, every candidate layer's answers to the steering questions,
one batch slice per layer under `PerSampleSteering` (the batch is never split, so slices stay put).
The starting coefficient of a layer is `mean ||h_L|| / ||v|| * 0.7` (times -1 to steer against the
trait); after each step it is multiplied by 1.3 when that layer's mean coherence is at least
`search_coherence` (80), else by 0.85. Every baseline and run is one line appended to `results.jsonl`;
a re-run reads the file, skips what is there (matching configuration), and never writes a line twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from tracelens.backends import LocalBackend
from tracelens.experiments import Experiment, get_model_variant
from tracelens.extraction import load_activation_metadata, load_vector, parse_layers
from tracelens.generation import HookedGenerator
from tracelens.hooks import PerSampleSteering
from tracelens.io import append_jsonl, read_json, read_jsonl
from tracelens.judge import summarize_judge_scores
from tracelens.prompts import tokenize_batch
from tracelens.traits import load_trait
from tracelens.types import JudgeResult, ProjectionConfig, SteeringHeader, SteeringResults, SteeringRunRecord, VectorSpec

START_MULT, UP_MULT, DOWN_MULT = 0.7, 1.3, 0.85


@dataclass
class SteeringEvalConfig:
    layers: str | Sequence[int] = "30%-60%"
    method: str = "probe"
    position: str = "response[:]"
    component: str = "residual"
    coefficients: Sequence[float] | None = None  # explicit coefficients for every layer: no search
    search_steps: int = 5
    subset: int = 5
    max_new_tokens: int = 64
    direction: str | None = None  # default: the trait's steering.json
    search_coherence: float = 80.0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _judge(judge, trait: str, definition: str, questions: Sequence[str], answers: Sequence[str]) -> JudgeResult:
    scores = judge.score([
        {"question": q, "response": a, "trait_name": trait, "definition": definition} for q, a in zip(questions, answers)
    ])
    return summarize_judge_scores(scores)


def _generate(backend: LocalBackend, questions: Sequence[str], rows: list[tuple[int, torch.Tensor, float]],
              config: SteeringEvalConfig) -> list[list[str]]:
    """Answers to `questions` under each (layer, vector, coef) of `rows`, all in one batch."""
    q = len(questions)
    texts = [backend.format(question) for _ in (rows or [None]) for question in questions]
    ids, mask = tokenize_batch(backend.tokenizer, texts)
    steer = [(layer, v, coef, (i * q, (i + 1) * q)) for i, (layer, v, coef) in enumerate(rows)]
    with PerSampleSteering(backend.model, steer, config.component):
        outs = HookedGenerator(backend.model).generate(ids, mask, config.max_new_tokens)
    answers = [backend.tokenizer.decode(o.token_ids, skip_special_tokens=True).strip() for o in outs]
    return [answers[i * q : (i + 1) * q] for i in range(max(1, len(rows)))]


def run_steering_eval(experiment: str | Experiment, trait: str, judge, config: SteeringEvalConfig | None = None,
                      variant: str | None = None, backend: LocalBackend | None = None) -> SteeringResults:
    """Baseline + coefficient search for one trait; returns everything in its `results.jsonl`."""
    from tracelens.loading import load_model

    config = config or SteeringEvalConfig()
    exp = experiment if isinstance(experiment, Experiment) else Experiment.named(experiment)
    mv = get_model_variant(exp, variant, mode="application")
    extraction_variant = get_model_variant(exp, variant, mode="extraction").name
    if backend is None:
        backend = LocalBackend.from_model(load_model(mv.model), use_chat_template=exp.config().get("use_chat_template"))
    data = load_trait(trait)
    questions = data.steering.questions[: config.subset]
    direction = config.direction or data.steering.direction
    sign = 1.0 if direction == "positive" else -1.0
    path = exp.steering_results_path(trait, mv.name, config.position)
    judge_name = getattr(judge, "name", type(judge).__name__)
    header = SteeringHeader(
        trait=trait, direction=direction, steering_model=mv.model, steering_experiment=exp.name,
        vector_source={"model": mv.model, "experiment": exp.name, "trait": trait, "method": config.method,
                       "component": config.component,
                       "input_hash": vectors_hash(exp, trait, extraction_variant, config.position, config.component,
                                                  config.method)},
        eval={"model": judge_name, "method": "judge"}, prompts_hash=data.input_hash, n_questions=len(questions),
    )
    lines = read_jsonl(path)
    if lines and not _same_setup(lines[0], header):
        # Other vectors, judge or questions: those runs are not comparable with new ones. Keep them aside.
        path.rename(path.with_name(f"results.{datetime.now(timezone.utc):%Y%m%dT%H%M%S}.stale.jsonl"))
        lines = []
    if not lines:
        append_jsonl(path, header.to_dict())
        lines.append(header.to_dict())
    if not any(line.get("type") == "baseline" for line in lines):
        [answers] = _generate(backend, questions, [], config)
        line = {"type": "baseline", "result": _judge(judge, trait, data.definition, questions, answers).to_dict(),
                "timestamp": _now()}
        append_jsonl(path, line)
        lines.append(line)

    meta = load_activation_metadata(exp, trait, extraction_variant, config.position, config.component)
    layers = parse_layers(config.layers, backend.n_layers)
    vectors = {l: load_vector(exp, trait, extraction_variant, config.position, config.component, config.method, l)
               for l in layers}
    done = {_key(r): r for r in (SteeringRunRecord.from_dict(x) for x in lines if x.get("type") == "run")}
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
            for (l, _, c), answers in zip(missing, _generate(backend, questions, missing, config)):
                run = SteeringRunRecord(_judge(judge, trait, data.definition, questions, answers), specs[l],
                                        eval_judge=getattr(judge, "name", type(judge).__name__), timestamp=_now())
                append_jsonl(path, run.to_dict())
                done[_key(run)] = run
        for l, _ in todo:
            coherence = done[_spec_key(specs[l])].result.coherence_mean
            coefs[l] *= UP_MULT if coherence is not None and coherence >= config.search_coherence else DOWN_MULT
    return SteeringResults.from_jsonl_lines(read_jsonl(path))


def vectors_hash(exp: Experiment, trait: str, variant: str, position: str, component: str, method: str) -> str:
    """The input hash of the vectors on disk for one method (changes whenever they are re-fitted)."""
    return read_json(exp.vectors_dir(trait, variant, position, component, method) / "metadata.json")["input_hash"]


def _same_setup(first_line: dict, header: SteeringHeader) -> bool:
    keys = ("trait", "direction", "vector_source", "eval", "prompts_hash", "n_questions")
    return first_line.get("type") == "header" and all(first_line.get(k) == getattr(header, k) for k in keys)


def fit_offline_judge(experiment: str | Experiment, trait: str, variant: str, val_split: float = 0.1):
    """An `EmbeddingJudge` fitted on the trait's training responses, and its validity (AUROC) on the
    held-out responses of the same extraction split."""
    from tracelens.extraction import load_responses, split_point
    from tracelens.judge import EmbeddingJudge

    exp = experiment if isinstance(experiment, Experiment) else Experiment.named(experiment)
    pos, neg = load_responses(exp, trait, variant)
    kp, kn = split_point(len(pos), val_split), split_point(len(neg), val_split)
    texts = lambda rows: [r["response"] for r in rows]  # noqa: E731
    judge = EmbeddingJudge().fit(texts(pos[:kp]), texts(neg[:kn]))
    responses_hash = read_json(exp.responses_dir(trait, variant) / "metadata.json")["input_hash"]
    judge.name = f"embedding-judge:{trait}:{responses_hash}:val{val_split}"
    return judge, judge.validity(texts(pos[kp:]), texts(neg[kn:]))


def _spec_key(config: ProjectionConfig) -> tuple:
    v = config.vectors[0]
    return (v.layer, v.method, v.component, v.position, round(v.weight, 4))


def _key(run: SteeringRunRecord) -> tuple:
    return _spec_key(run.config)
