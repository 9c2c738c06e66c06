"""The extraction pipeline: responses -> activations -> vectors -> held-out evaluation.

Each stage is a function that reads the previous stage's files and writes its own atomically, with
an `input_hash` of everything it depends on; a stage whose outputs carry the current hash is skipped
(unless `force`), so an interrupted run resumes at the first unfinished stage.

What each stage stores (through the artifact store, `tracelens.store`, which knows the files):
  responses: the answers to the positive and negative scenarios (`ScenarioResponse` rows)
  vetting (only with a vetting judge): pairs kept where pos >= 60 and neg <= 40
  activations: per split, cat(pos, neg) on dim 0 for the pairs of that split (see `tracelens.datasets.splits`:
      by question); float16 (bfloat16 if float16 would overflow); metadata lists each split's pair indices
  vectors: a unit float32 vector per method and layer; metadata per layer: norm and `baseline`, the decision
      threshold (the projection of the midpoint of the training class means)
  evaluation: per method x layer, select-split AUROC / accuracy and test-split AUROC / accuracy / Cohen's d
      with bootstrap intervals over test questions; the chance band of `n_random` random directions per layer
      (drawn from their own seed stream, never `random_baseline`'s); the layer and method chosen on the select
      split; the command that produced it
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import sys
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tracelens.serving.backends import GenerationConfig, LocalBackend
from tracelens.model.capture import capture_sequences
from tracelens.errors import ConfigError
from tracelens.store import Experiment
from tracelens.methods import get_method
from tracelens.metrics import N_RESAMPLES, accuracy, auroc, effect_size, paired_separation
from tracelens.model.positions import parse_position, tokens_needed
from tracelens.model.sites import COMPONENTS
from tracelens.datasets.splits import DEFAULT_FRACTIONS, SPLITS, check_fractions, split_by_question
from tracelens.datasets.traits import load_trait
from tracelens.types import (ALWAYS_EVALUATED, ActivationMetadata, Evaluation, EvaluationRow, ModelVariant,
                             ResponsesMetadata, ScenarioResponse, VectorLayer, VectorMetadata, Vetting)

CHANCE_PERCENTILES = (5.0, 95.0)
MIN_RANDOM = 100  # the fewest chance-band directions: fewer give a noisy 95th percentile
CHANCE_STREAM = "chance band"  # the chance band's seed stream (see `derived_seed`)


@dataclass
class ExtractionConfig:
    """Settings of one extraction run; `None` defaults depend on whether the model is a chat model
    (position `response[:]`, 64 new tokens) or a base model (`response[:5]`, 16 new tokens)."""

    methods: Sequence[str] = ("probe", "mean_diff", "gradient")
    position: str | None = None
    layers: str | Sequence[int] = "all"
    component: str = "residual"
    splits: Sequence[float] = DEFAULT_FRACTIONS  # train, select, test (by question)
    split_seed: int = 0
    n_random: int = MIN_RANDOM  # random directions per layer for the chance band (at least MIN_RANDOM)
    n_resamples: int = N_RESAMPLES  # bootstrap resamples of test questions
    max_new_tokens: int | None = None
    temperature: float = 0.0
    limit: int | None = None  # use only the first `limit` pairs (quick runs)
    batch_size: int | None = None
    force: bool = False
    method_kwargs: dict[str, dict] = field(default_factory=dict)


LAYER_GRAMMAR = "'all', 'P%-Q%' (of depth), 'A-B' or 'A-B:step' (inclusive), ints (negative from the end), 'best', \
'best+N' or 'best-N', comma-separated (e.g. '3,5,-1', 'best,best+5', '0-20:5,30')"


def parse_layers(spec: str | Sequence[int], n_layers: int, best: int | None = None) -> list[int]:
    """The sorted, distinct layers (0..n_layers-1) a layer spec names: the one layer grammar of tracelens.

    `spec` is a list of ints or a string in `LAYER_GRAMMAR`; "30%-60%" of 10 layers is [3, 4, 5] (round(0.3 * 9)
    to round(0.6 * 9)). "best" needs `best`, the selected layer (as `tracelens monitor` has); best+N / best-N are
    clamped to the model's layers, since the best layer moves with the data. Anything else out of range, or an
    empty result, is a ConfigError.
    """
    parts = [spec] if not isinstance(spec, str) else [p.strip() for p in spec.split(",")]
    layers = []
    for part in parts:
        if not isinstance(part, str):
            layers += [int(x) for x in part]
        elif part == "all":
            layers += range(n_layers)
        elif m := re.fullmatch(r"(\d+(?:\.\d+)?)%-(\d+(?:\.\d+)?)%", part):
            lo, hi = (round(float(x) / 100 * (n_layers - 1)) for x in m.groups())
            layers += range(lo, hi + 1)
        elif m := re.fullmatch(r"(\d+)-(\d+)(?::(\d+))?", part):
            layers += range(int(m[1]), int(m[2]) + 1, int(m[3] or 1))
        elif re.fullmatch(r"-?\d+", part):
            layers.append(int(part))
        elif m := re.fullmatch(r"best(?:([+-])(\d+))?", part):
            if best is None:
                raise ConfigError(f"layer spec {spec!r} uses {part!r}, but no best layer is known here (only "
                                  "`tracelens monitor` selects one); give ints, ranges or 'all'")
            offset = int(m[2] or 0) * (-1 if m[1] == "-" else 1)
            layers.append(min(max(best + offset, 0), n_layers - 1))
        else:
            raise ConfigError(f"layer spec must be {LAYER_GRAMMAR}; got {spec!r} (bad part {part!r})")
    bad = [l for l in layers if not -n_layers <= l < n_layers]
    if bad or not layers:
        raise ConfigError(f"layer spec {spec!r} gives layers {bad or layers} outside 0..{n_layers - 1}")
    return sorted({l % n_layers for l in layers})


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def derived_seed(stream: str, seed: int, key: int) -> int:
    """A torch seed in [0, 2**63) for draw `key` (e.g. a layer) of the named `stream`: SHA-256 of all three, so
    streams never share draws with each other or with seeds such as `layer` itself (`random_baseline`)."""
    return int(_hash(stream, seed, key), 16) >> 1


def check_config(config: ExtractionConfig, n_layers: int | None = None) -> None:
    """ValueError naming the first setting of `config` that cannot work (checked before any model work;
    the layer range only when `n_layers` is known)."""
    if isinstance(config.methods, str) or not config.methods:
        raise ConfigError(f"methods must be a non-empty list of method names; got {config.methods!r}")
    for name in config.methods:
        get_method(name)
    if config.component not in COMPONENTS:
        raise ConfigError(f"component must be one of {', '.join(COMPONENTS)}; got {config.component!r}")
    if config.position is not None:
        parse_position(config.position)
    for name in ("max_new_tokens", "limit", "batch_size"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive integer or None; got {value!r}")
    if not math.isfinite(config.temperature) or config.temperature < 0:
        raise ConfigError(f"temperature must be a finite number >= 0; got {config.temperature!r}")
    parse_layers(config.layers, n_layers or 10**6)
    check_fractions(config.splits)
    if config.n_random < MIN_RANDOM:
        raise ConfigError(f"n_random must be at least {MIN_RANDOM} for a chance band; got {config.n_random}")
    if config.n_resamples < 100:
        raise ConfigError(f"n_resamples must be at least 100 for a 95% interval; got {config.n_resamples}")


def resolve_defaults(backend: LocalBackend, config: ExtractionConfig) -> ExtractionConfig:
    """Fill position / max_new_tokens from the model type (chat template or not)."""
    chat = backend.use_chat_template
    if chat is None:
        chat = getattr(backend.tokenizer, "chat_template", None) is not None
    position = config.position or ("response[:]" if chat else "response[:5]")
    parse_position(position)
    needed = tokens_needed(position)
    max_new = config.max_new_tokens or (64 if chat else 16)
    if needed and max_new < needed:
        raise ConfigError(f"position {position!r} needs {needed} response tokens but max_new_tokens is {max_new}")
    return ExtractionConfig(**{**asdict(config), "position": position, "max_new_tokens": max_new})


# --- stage 1: responses ---------------------------------------------------------------------------


def generate_responses(exp: Experiment, trait: str, variant: str, backend: LocalBackend,
                       config: ExtractionConfig, model_id: str) -> str:
    """Generate answers under the positive and negative scenarios; returns the stage's input hash."""
    data = load_trait(trait)
    input_hash = _hash("responses", data.input_hash, model_id, config.max_new_tokens, config.temperature,
                       backend.use_chat_template, config.limit)
    if exp.stage_current("responses", input_hash, config.force, trait, variant):
        return input_hash
    gen = GenerationConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=0)
    if config.batch_size:
        backend.batch_size = config.batch_size
    answers = {}
    for polarity, scenarios in (("pos", data.positive[: config.limit]), ("neg", data.negative[: config.limit])):
        results = backend.generate_results([s.prompt for s in scenarios], gen,
                                           system_prompts=[s.system_prompt for s in scenarios])
        answers[polarity] = [ScenarioResponse(s.prompt, s.system_prompt, r.response_text, r.prompt_token_ids,
                                              r.response_token_ids) for s, r in zip(scenarios, results)]
    exp.write_responses(trait, variant, answers["pos"], answers["neg"], ResponsesMetadata(
        model=model_id, trait=trait, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
        chat_template=backend.use_chat_template, input_hashes={"scenarios": data.input_hash}, input_hash=input_hash,
    ))
    return input_hash


# --- optional stage: vetting ---------------------------------------------------------------------

POS_THRESHOLD, NEG_THRESHOLD, MIN_KEPT = 60.0, 40.0, 10


def vetting_hash(responses_hash: str, judge_name: str) -> str:
    """The input hash of the vetting of responses `responses_hash` by the judge named `judge_name`."""
    return _hash("vetting", responses_hash, judge_name)


def vet_responses(exp: Experiment, trait: str, variant: str, judge, responses_hash: str, force: bool = False) -> str:
    """Judge every response's trait score and keep the pairs whose positive side scores >= 60 and negative
    side <= 40 (pairs stay matched). Use a judge independent of these responses (e.g. `OpenAIJudge`)."""
    input_hash = vetting_hash(responses_hash, getattr(judge, "name", type(judge).__name__))
    if exp.stage_current("vetting", input_hash, force, trait, variant):
        return input_hash
    data = load_trait(trait)
    pos, neg = exp.responses(trait, variant)
    scores = {}
    for polarity, rows in (("pos", pos), ("neg", neg)):
        items = [{"question": r.prompt, "response": r.response} for r in rows]
        scores[polarity] = [s["trait_score"] for s in judge.score(items, trait, data.definition)]
    kept = [i for i, (p, n) in enumerate(zip(scores["pos"], scores["neg"]))
            if p is not None and n is not None and p >= POS_THRESHOLD and n <= NEG_THRESHOLD]
    exp.write_vetting(trait, variant, Vetting(
        results=[{"idx": i, "polarity": pol, "score": s} for pol in ("pos", "neg") for i, s in enumerate(scores[pol])],
        thresholds={"pos": POS_THRESHOLD, "neg": NEG_THRESHOLD}, kept_indices=kept,
        failed_indices=[i for i in range(len(pos)) if i not in set(kept)],
        summary={"n_pairs": len(pos), "n_kept": len(kept)}, input_hash=input_hash,
    ))
    return input_hash


def kept_indices(exp: Experiment, trait: str, variant: str, vetted: bool) -> list[int]:
    """The pair indices the activations stage uses: every pair, or the pairs that passed vetting."""
    n = len(exp.responses(trait, variant)[0])
    if not vetted:
        return list(range(n))
    kept = exp.vetting(trait, variant).kept_indices
    if len(kept) < MIN_KEPT:
        raise ConfigError(f"only {len(kept)} of {n} pairs of {trait} passed vetting (need {MIN_KEPT}); "
                         "check the scenarios or the judge, or extract without vetting")
    return kept


# --- stage 2: activations -------------------------------------------------------------------------


def capture_activations(exp: Experiment, trait: str, variant: str, model, config: ExtractionConfig,
                        responses_hash: str, model_id: str, vetted: bool = False) -> str:
    """Capture every layer at the position for each (kept) response, split by question; float16 on disk."""
    input_hash = _hash("activations", responses_hash, config.position, config.component, list(config.splits),
                       config.split_seed)
    if exp.stage_current("activations", input_hash, config.force, trait, variant, config.position, config.component):
        return input_hash
    pos, neg = exp.responses(trait, variant)
    kept = set(kept_indices(exp, trait, variant, vetted))
    # Split every pair by its question first, then drop unkept pairs: vetting never moves a question.
    splits = {name: [i for i in idx if i in kept]
              for name, idx in split_by_question([r.prompt for r in pos], config.splits, config.split_seed).items()}
    too_small = {name: len(idx) for name, idx in splits.items() if len(idx) < 2}
    if too_small:
        raise ConfigError(f"{trait}: every split needs at least 2 pairs after vetting; got {too_small}")
    layers = list(range(model.cfg.n_layers))

    def acts(rows):
        return capture_sequences(model, [r.prompt_token_ids + r.response_token_ids for r in rows],
                                 [len(r.prompt_token_ids) for r in rows], layers, config.position,
                                 "mean", config.component, config.batch_size)

    order = sorted(kept)
    a_pos, a_neg = acts([pos[i] for i in order]), acts([neg[i] for i in order])  # [n, n_layers, d] float32
    row = {i: k for k, i in enumerate(order)}
    tensors = {name: torch.cat([a_pos[[row[i] for i in idx]], a_neg[[row[i] for i in idx]]])
               for name, idx in splits.items()}
    dtype = torch.float16 if max(float(t.abs().max()) for t in tensors.values()) < 6.5e4 else torch.bfloat16
    train = tensors["train"]
    n = {name: len(idx) for name, idx in splits.items()}
    meta = ActivationMetadata(
        n_layers=len(layers), hidden_dim=model.cfg.d_model, captured_layers=layers,
        activation_norms={l: float(train[:, l].norm(dim=-1).mean()) for l in layers},
        n_examples_pos=n["train"], n_examples_neg=n["train"], n_val_pos=n["select"], n_val_neg=n["select"],
        n_test_pos=n["test"], n_test_neg=n["test"], model=model_id, position=config.position,
        component=config.component, dtype=str(dtype).removeprefix("torch."), splits=splits,
        split_fractions=list(config.splits), split_seed=config.split_seed, input_hash=input_hash,
    )
    exp.write_activations(trait, variant, meta, {name: t.to(dtype) for name, t in tensors.items()})
    return input_hash


def load_activation_metadata(experiment: str | Experiment, trait: str, variant: str | ModelVariant,
                             position: str = "response[:]", component: str = "residual") -> ActivationMetadata:
    """The `ActivationMetadata` written by the activations stage (`variant` by name or as a `ModelVariant`)."""
    exp = Experiment.of(experiment)
    return exp.activation_metadata(trait, variant.name if isinstance(variant, ModelVariant) else variant,
                                   position, component)


# --- stage 3: vectors -----------------------------------------------------------------------------


def fit_vectors(exp: Experiment, trait: str, variant: str, config: ExtractionConfig, layers: list[int],
                activations_hash: str, model_id: str) -> dict[str, str]:
    """Fit every method at every layer; unit float32 vectors with per-layer metadata."""
    pos, neg = exp.activations(trait, variant, config.position, config.component, "train")
    methods = list(dict.fromkeys([*config.methods, ALWAYS_EVALUATED]))
    hashes = {}
    for name in methods:
        kwargs = config.method_kwargs.get(name, {})
        method = get_method(name)
        # The method's source is part of the key: a changed algorithm never reuses old vectors.
        hashes[name] = input_hash = _hash("vectors", activations_hash, name, kwargs, layers,
                                          inspect.getsource(sys.modules[type(method).__module__]))
        if exp.stage_current("vectors", input_hash, config.force, trait, variant, config.position, config.component,
                             name):
            continue
        per_layer, vectors = {}, {}
        for layer in tqdm(layers, desc=f"{trait} {name}", leave=False):
            # Only the train split is shown to a method (methods that tune hyper-parameters split their
            # training rows); `baseline` (the train midpoint's projection) is the decision threshold.
            extra = {"seed": layer} if name == ALWAYS_EVALUATED else {}
            result = method.extract(pos[:, layer], neg[:, layer], **extra, **kwargs)
            vectors[layer] = v = result["vector"].float()
            midpoint = (pos[:, layer].mean(0) + neg[:, layer].mean(0)) / 2
            per_layer[layer] = VectorLayer(norm=float(v.norm()), baseline=float(midpoint @ v),
                                           **{k: float(result[k]) for k in ("train_acc", "bias") if k in result})
        exp.write_vectors(trait, variant, VectorMetadata(
            model=model_id, trait=trait, method=name, component=config.component, position=config.position,
            layers=per_layer, input_hash=input_hash,
        ), vectors)
    return hashes


# --- stage 4: held-out evaluation -----------------------------------------------------------------


def evaluate_vectors(exp: Experiment, trait: str, variant: str, config: ExtractionConfig, layers: list[int],
                     vector_hashes: dict[str, str], command: str | None = None) -> Evaluation:
    """Score every method x layer on the select and test splits, with the random-direction chance band.

    Accuracy uses the threshold fitted on train (the vector's `baseline`), never the scored split's
    labels. `selected` is the method and layer with the best select-split AUROC (ties: larger select
    effect size); its test numbers are what gets reported. A row is `above_chance` when the lower end
    of its test AUROC interval is above the 95th percentile of the random directions at its layer. `command`
    (default "python API (evaluate_vectors)") is stored as what produced the file; a current stage keeps its own.
    """
    where = (trait, variant, config.position, config.component)
    input_hash = _hash("evaluation", vector_hashes, config.n_random, config.n_resamples, CHANCE_STREAM)
    if exp.stage_current("evaluation", input_hash, config.force, *where):
        return exp.evaluation(*where)
    train, select, test = (exp.activations(*where, split) for split in SPLITS)
    chance = chance_band(train, test, layers, config.n_random)
    rows = []
    for name in vector_hashes:
        meta = exp.vector_metadata(*where, name)
        for layer in layers:
            v = exp.vector(*where, name, layer)
            threshold = meta.threshold(layer)
            sp, sn = select[0][:, layer] @ v, select[1][:, layer] @ v
            scored = paired_separation(test[0][:, layer] @ v, test[1][:, layer] @ v, threshold, config.n_resamples)
            rows.append(EvaluationRow(
                method=name, layer=layer, threshold=threshold,
                select={"auroc": auroc(sp, sn), "accuracy": accuracy(sp, sn, threshold),
                        "effect_size": effect_size(sp, sn, signed=True)},
                test={k: e.to_dict() for k, e in scored.items()},
                above_chance=scored["auroc"].lo > chance[str(layer)]["auroc"]["hi"],
            ))
    real = [r for r in rows if r.method != ALWAYS_EVALUATED] or rows
    best = max(real, key=select_rank)
    evaluation = Evaluation(
        trait=trait, position=config.position, component=config.component,
        splits={s: len(t[0]) for s, t in zip(SPLITS, (train, select, test))},
        bootstrap={"n_resamples": config.n_resamples, "level": 0.95, "unit": "test question", "seed": 0},
        chance={"n_directions": config.n_random, "percentiles": list(CHANCE_PERCENTILES), "layers": chance},
        results=rows, selected={"method": best.method, "layer": best.layer, "by": "select auroc"},
        input_hash=input_hash, command=command or "python API (evaluate_vectors)",
    )
    exp.write_evaluation(trait, variant, evaluation)
    return evaluation


def select_rank(row: EvaluationRow) -> tuple[float, float]:
    """How an evaluation row ranks on the select split (higher is better): AUROC, ties broken by Cohen's d."""
    return row.select["auroc"], row.select["effect_size"]


def chance_directions(d_model: int, layer: int, n_random: int, seed: int = 0) -> Float[Tensor, "n_random d_model"]:
    """The chance band's `n_random` random unit directions at `layer` (float32), from the `CHANCE_STREAM` seed
    stream: the same for the same arguments, and never `random_baseline`'s draw (seeded by the layer)."""
    g = torch.Generator().manual_seed(derived_seed(CHANCE_STREAM, seed, layer))
    dirs = torch.randn(n_random, d_model, generator=g)
    return dirs / dirs.norm(dim=-1, keepdim=True)


def chance_band(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                layers: Sequence[int], n_random: int, seed: int = 0) -> dict[str, dict]:
    """Per layer, the 5th / 50th / 95th percentile of test AUROC and accuracy over `n_random` random unit
    directions (`chance_directions`; each thresholded at its train midpoint, like the fitted vectors), keyed by
    str(layer). `layers` index dim 1 of the `[n, n_layers, d]` activations."""
    out = {}
    q = torch.tensor([p / 100 for p in (CHANCE_PERCENTILES[0], 50.0, CHANCE_PERCENTILES[1])])
    for layer in layers:
        dirs = chance_directions(train[0].shape[-1], layer, n_random, seed)
        mid = ((train[0][:, layer].mean(0) + train[1][:, layer].mean(0)) / 2) @ dirs.T
        p, n = test[0][:, layer] @ dirs.T, test[1][:, layer] @ dirs.T  # [n_test, n_random]
        scores = {"auroc": torch.tensor([auroc(p[:, k], n[:, k]) for k in range(n_random)]),
                  "accuracy": torch.tensor([accuracy(p[:, k], n[:, k], float(mid[k])) for k in range(n_random)])}
        out[str(layer)] = {m: dict(zip(("lo", "median", "hi"), torch.quantile(x.double(), q.double()).tolist()))
                           for m, x in scores.items()}
    return out


# --- the whole pipeline ---------------------------------------------------------------------------


def run_extraction(experiment: str | Experiment, traits: Sequence[str], config: ExtractionConfig | None = None,
                   variant: str | None = None, backend: LocalBackend | None = None, vet_judge=None,
                   response_backend=None, command: str | None = None) -> dict[str, Evaluation]:
    """Run every stage for each trait (vetting only with `vet_judge`); returns the evaluation per trait.

    `response_backend` (e.g. a `VLLMBackend`) generates the responses of every trait first and is then
    shut down; capture and fitting always run on the local model (`backend`, loaded when not given).
    `command` (the CLI passes its command line; default "python API (run_extraction)") is recorded in each
    evaluation as what produced it.
    """
    from tracelens.store import get_model_variant

    config = config or ExtractionConfig()
    command = command or "python API (run_extraction)"
    check_config(config)
    if isinstance(traits, str) or not traits:
        raise ConfigError(f"traits must be a non-empty list of trait names; got {traits!r}")
    for trait in traits:
        load_trait(trait)
    exp = Experiment.of(experiment)
    mv = get_model_variant(exp, variant, mode="extraction")

    def local() -> LocalBackend:
        nonlocal backend
        if backend is None:
            backend = LocalBackend.from_experiment(exp, mv.name, mode="extraction")
        return backend

    if response_backend is None:
        check_config(config, local().n_layers)  # the layer range, before any generation
    config = resolve_defaults(response_backend or local(), config)
    responses = {t: generate_responses(exp, t, mv.name, response_backend or local(), config, mv.label) for t in traits}
    if response_backend is not None and hasattr(response_backend, "shutdown"):
        response_backend.shutdown()  # free the GPU before the local model loads
    layers = parse_layers(config.layers, local().n_layers)
    reports = {}
    for trait in traits:
        h = responses[trait]
        if vet_judge is not None:
            h = vet_responses(exp, trait, mv.name, vet_judge, h, config.force)
        h = capture_activations(exp, trait, mv.name, backend.model, config, h, mv.label, vetted=vet_judge is not None)
        vh = fit_vectors(exp, trait, mv.name, config, layers, h, mv.label)
        reports[trait] = evaluate_vectors(exp, trait, mv.name, config, layers, vh, command)
    return reports
