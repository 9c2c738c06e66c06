"""Record types shared by the pipeline stages, each a small dataclass with a JSON round trip.

Every type has ``to_dict()``, which returns plain JSON-serialisable data (``json.loads(json.dumps(d)) == d``:
integer layer keys are written as strings, tuples as lists), and ``from_dict(d)``, which rebuilds the record,
ignores keys it does not know (files written by newer versions still load) and accepts layer keys as strings
or ints. Nested records round-trip too. Both come from one codec (`tracelens.records.record`), which reads a record's
fields and their type hints; a field stored another way says how in ``field(metadata=stored(...))``.
The on-disk formats follow the upstream files:

- ``results.jsonl`` of a steering run: one ``SteeringResults.to_jsonl_lines()`` object per line
  (``{"type": "header", ...}``, ``{"type": "baseline", ...}``, ``{"type": "run", ...}``).
- ``responses/{prompt_set}/{id}.json``: ``ResponseRecord``; ``projections/{trait}/{prompt_set}/{id}.json``:
  ``ProjectionRecord`` holding one ``ProjectionEntry`` per projected vector.
- ``activations/.../metadata.json``: ``ActivationMetadata``; ``vectors/.../metadata.json``: ``VectorMetadata``;
  ``evaluation/{position}/{component}.json``: ``Evaluation``; the extraction's answers: ``ScenarioResponse``.
  The artifact store (``tracelens.store``) maps every file to its record.

Example::

    >>> config = ProjectionConfig.single(9, "residual", "response[:]", "probe", weight=0.9)
    >>> ProjectionConfig.from_dict(config.to_dict()) == config
    True
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from tracelens.errors import ConfigError, DataError, ShapeError, UnknownKeyError
from tracelens.records import record, stored

SOURCES = ("steering", "evaluation", "unscored")
DIRECTIONS = ("positive", "negative")
MIN_COHERENCE = 77.0  # a steering run is valid when its mean coherence reaches this (upstream MIN_COHERENCE)
DEFAULT_MAX_KL = 0.5  # nats/token: the steering damage budget (see tracelens.pipeline.steering_eval)
N_CONTROLS = 10  # random control directions a steering report stands beside, at least
JUDGE_COHERENCE = "judge_coherence"  # the coherence validation's name for the judge's coherence signal
ALWAYS_EVALUATED = "random_baseline"  # the control method every evaluation holds and no selection picks


# --------------------------------------------------------------------------------------------------- vectors


@record
@dataclass
class VectorSpec:
    """One trait vector: where it was extracted (``layer``, ``component``, ``position``) and by which ``method``.

    ``weight`` is the steering coefficient when steering, and the relative weight in an ensemble projection.
    """

    layer: int = field(metadata=stored(read=int))
    component: str
    position: str
    method: str
    weight: float = 1.0


@record
@dataclass
class ProjectionConfig:
    """One or more weighted vectors, projected (or steered) together. Needs at least one vector."""

    vectors: list[VectorSpec]

    def __post_init__(self) -> None:
        if not self.vectors:
            raise ConfigError("ProjectionConfig needs at least one VectorSpec; got an empty list.")

    @classmethod
    def single(cls, layer: int, component: str, position: str, method: str, weight: float = 1.0) -> ProjectionConfig:
        """A one-vector config."""
        return cls(vectors=[VectorSpec(layer, component, position, method, weight)])

    @property
    def is_ensemble(self) -> bool:
        """True when the config has more than one vector."""
        return len(self.vectors) > 1

    @property
    def normalized_weights(self) -> list[float]:
        """The weights divided by their sum; uniform ``1/n`` when they sum to 0."""
        weights = [float(v.weight) for v in self.vectors]
        total = sum(weights)
        if total == 0:
            return [1.0 / len(weights)] * len(weights)
        return [w / total for w in weights]


@record
@dataclass
class VectorResult:
    """A candidate vector with the evidence that ranked it, as returned by vector selection.

    ``source`` says what the evidence is: ``"steering"`` (an LLM-judged steering run: ``score`` is the
    steering delta, and ``delta``/``coherence``/``coefficient`` are that run's), ``"evaluation"`` (held-out
    separation only: ``score`` is the ranking metric, the select-split AUROC) or ``"unscored"`` (no evidence).
    ``val_*`` are select-split numbers (upstream's "val"); ``test`` holds the test-split estimates
    (``{"auroc", "accuracy", "effect_size": {"value", "lo", "hi"}, "above_chance"}``), reported, never ranked on.
    ``delta`` and ``coherence`` may only be set when ``source == "steering"`` (ValueError otherwise).
    ``direction`` is ``"positive"``, ``"negative"`` or None; ``naturalness`` is 0-100 or None.
    """

    layer: int = field(metadata=stored(read=int))
    method: str
    position: str
    component: str = "residual"
    score: float | None = None
    direction: str | None = None
    source: str = "unscored"
    coefficient: float | None = None
    naturalness: float | None = None
    delta: float | None = None
    coherence: float | None = None
    val_accuracy: float | None = None
    val_auroc: float | None = None
    val_effect_size: float | None = None
    test: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"VectorResult.source must be one of {SOURCES}; got {self.source!r}.")
        if self.direction is not None and self.direction not in DIRECTIONS:
            raise ConfigError(f"VectorResult.direction must be one of {DIRECTIONS} or None; got {self.direction!r}.")
        if self.source != "steering" and (self.delta is not None or self.coherence is not None):
            raise ConfigError(
                f"VectorResult.delta and .coherence come from steering runs, but source={self.source!r}; "
                "set source='steering' or leave them None."
            )

    def to_vector_spec(self, weight: float = 1.0) -> VectorSpec:
        """This vector as a ``VectorSpec`` with the given weight (a steering coefficient or ensemble weight)."""
        return VectorSpec(self.layer, self.component, self.position, self.method, weight)


# --------------------------------------------------------------------------------------------------- judging


@record
@dataclass
class JudgeResult:
    """Judge scores of one condition (baseline or steered) over its questions, on the 0-100 scale.

    ``n`` counts the responses with a trait score; ``trait_std`` is the population std; ``success_rate`` is
    the fraction of trait scores above 50; ``min_score``/``max_score`` are over trait scores; ``n_degenerate``
    counts the responses the degeneracy guard flagged (their coherence is 0). Means are None when nothing could
    be scored. Built by ``tracelens.judges.summarize_judge_scores``.
    """

    trait_mean: float | None
    coherence_mean: float | None
    n: int
    trait_std: float = 0.0
    success_rate: float = 0.0
    min_score: float | None = None
    max_score: float | None = None
    n_degenerate: int = 0

    @classmethod
    def empty(cls) -> JudgeResult:
        """The result of judging nothing: means None, n 0."""
        return cls(trait_mean=None, coherence_mean=None, n=0)


@record
class ModelVariant(NamedTuple):
    """A named model of an experiment: ``name`` (e.g. "instruct"), the ``model`` id, an optional ``lora``
    adapter (a peft folder or cached id, merged into the model when it loads)."""

    name: str
    model: str
    lora: str | None = None

    @property
    def label(self) -> str:
        """What runs, as recorded in results: ``model``, or ``"{model} + LoRA {lora}"`` with an adapter."""
        return self.model if self.lora is None else f"{self.model} + LoRA {self.lora}"


@record
@dataclass
class ModelConfig:
    """A model's description, as in the original's ``config/models/*.yaml``: id, family, size and quirks.

    ``model_type`` is the HF config's (``llama``, ``gemma3_text``...), ``variant`` a label such as ``base`` or ``it``.
    ``sae``, ``moe``, ``mla`` and ``notes`` are free-form dicts; ``to_dict`` leaves out fields that are None.
    ``from_model`` reads the sizes of a loaded model (a tracelens model or an HF ``PreTrainedModel``).
    """

    huggingface_id: str
    model_type: str
    variant: str
    supports_system_prompt: bool
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_context_length: int = 4096
    vocab_size: int | None = field(default=None, metadata=stored(omit_none=True))
    sae: dict[str, Any] | None = field(default=None, metadata=stored(omit_none=True))
    moe: dict[str, Any] | None = field(default=None, metadata=stored(omit_none=True))
    mla: dict[str, Any] | None = field(default=None, metadata=stored(omit_none=True))
    notes: dict[str, Any] | None = field(default=None, metadata=stored(omit_none=True))

    @classmethod
    def from_model(cls, model: Any, variant: str, supports_system_prompt: bool,
                   huggingface_id: str | None = None) -> ModelConfig:
        """The config of a loaded model; ``huggingface_id`` defaults to the HF config's ``_name_or_path``."""
        hf = getattr(model, "original_model", model).config
        text = getattr(hf, "text_config", None) or hf  # multimodal configs keep the language model's sizes here
        return cls(
            huggingface_id=huggingface_id or hf._name_or_path,
            model_type=text.model_type,
            variant=variant,
            supports_system_prompt=supports_system_prompt,
            num_hidden_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            intermediate_size=text.intermediate_size,
            max_context_length=getattr(text, "max_position_embeddings", None) or 4096,
            vocab_size=text.vocab_size,
        )


# --------------------------------------------------------------------------------------------------- extraction


@record
@dataclass
class ActivationMetadata:
    """What ``activations/{position}/{component}/metadata.json`` records about captured activations.

    Each split's tensor is ``cat(pos, neg)`` on dim 0, so rows ``[:n_examples_pos]`` of the training tensor
    are positive; ``n_val_*`` count the select split (upstream's "val": used to choose layer and method)
    and ``n_test_*`` the test split (only ever scored). ``activation_norms[layer]`` is the mean ``||h||`` of the
    captured (position-pooled) training activations at that layer (it sets the starting steering
    coefficient). Layer keys are ints here and strings in the JSON file. ``splits`` maps each split to its
    pair indices (into the responses stage's pairs); ``input_hash`` ties the file to the run that wrote it.
    """

    n_layers: int
    hidden_dim: int
    captured_layers: list[int]
    activation_norms: dict[int, float] = field(metadata=stored(missing=dict))
    n_examples_pos: int
    n_examples_neg: int
    n_val_pos: int = 0
    n_val_neg: int = 0
    n_test_pos: int = 0
    n_test_neg: int = 0
    model: str | None = None
    position: str | None = None
    component: str = "residual"
    dtype: str | None = None  # of the stored tensors: "float16", or "bfloat16" where float16 would overflow
    splits: dict[str, list[int]] = field(default_factory=dict)  # train / select / test -> pair indices
    split_fractions: list[float] | None = None
    split_seed: int | None = None
    input_hash: str | None = None

    def __post_init__(self) -> None:
        self.captured_layers = [int(layer) for layer in self.captured_layers]
        self.activation_norms = {int(k): float(v) for k, v in self.activation_norms.items()}

    @property
    def n_train(self) -> int:
        return self.n_examples_pos + self.n_examples_neg

    @property
    def n_val(self) -> int:
        return self.n_val_pos + self.n_val_neg


@record
@dataclass
class ScenarioResponse:
    """One answer of the extraction's responses stage (a row of ``responses/pos.json`` or ``neg.json``):
    the scenario's question and system prompt, the answer's text and the token ids of both parts."""

    prompt: str
    system_prompt: str | None
    response: str
    prompt_token_ids: list[int]
    response_token_ids: list[int]


@record
@dataclass
class ResponsesMetadata:
    """``responses/metadata.json``: how the answers were generated (``chat_template`` None: the tokenizer's
    choice) and ``input_hash``, the hash of everything they depend on."""

    model: str | None = None
    trait: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    chat_template: bool | None = None
    input_hashes: dict[str, str] = field(default_factory=dict)
    input_hash: str | None = None


@record
@dataclass
class Vetting:
    """``vetting/response_scores.json``: a judge's trait score (0-100, None when unscored) per answer
    (``results``: ``{"idx", "polarity", "score"}``), the pair thresholds and the pairs kept."""

    results: list[dict[str, Any]]
    thresholds: dict[str, float]
    kept_indices: list[int]
    failed_indices: list[int]
    summary: dict[str, int]
    input_hash: str | None = None


@record
@dataclass
class VectorLayer:
    """What a vector set's metadata records per layer: the stored vector's norm, its ``baseline`` (the
    decision threshold: the projection of the midpoint of the training class means) and, where the method
    reports them, its training accuracy and bias (absent from the file when None)."""

    norm: float
    baseline: float
    train_acc: float | None = field(default=None, metadata=stored(omit_none=True))
    bias: float | None = field(default=None, metadata=stored(omit_none=True))


@record
@dataclass
class VectorMetadata:
    """``vectors/{position}/{component}/{method}/metadata.json``: one method's vectors, per layer (int keys
    here, strings in the file), and the ``input_hash`` that changes whenever they are re-fitted."""

    model: str | None = None
    trait: str | None = None
    method: str | None = None
    component: str = "residual"
    position: str | None = None
    layers: dict[int, VectorLayer] = field(default_factory=dict, metadata=stored(missing=dict))
    input_hash: str | None = None

    def threshold(self, layer: int) -> float:
        """The decision threshold of the layer's vector (fitted on the train split); KeyError naming the
        stored layers when the layer has none."""
        if layer not in self.layers:
            raise UnknownKeyError(f"no vector metadata for layer {layer}; stored layers: {sorted(self.layers)}")
        return self.layers[layer].baseline


@record
@dataclass
class EvaluationRow:
    """One method x layer of a held-out evaluation: the train-fitted ``threshold``, select-split
    ``{"auroc", "accuracy", "effect_size"}`` (floats), test-split estimates (each ``{"value", "lo", "hi"}``)
    and whether the test AUROC interval clears the random-direction band."""

    method: str
    layer: int = field(metadata=stored(read=int))
    threshold: float
    select: dict[str, float]
    test: dict[str, dict[str, float]]
    above_chance: bool


@record
@dataclass
class Evaluation:
    """``evaluation/{position}/{component}.json``: every method x layer scored on the select and test splits
    (``results``), the random-direction chance band per layer (``chance``: ``{"n_directions", "percentiles",
    "layers": {str(layer): {metric: {"lo", "median", "hi"}}}}``), the pairs per split, the row
    ``selected`` on the select split (``{"method", "layer", "by"}``) and the ``command`` that produced the file
    (None in files from before it was recorded)."""

    trait: str
    position: str
    component: str
    splits: dict[str, int]
    bootstrap: dict[str, Any] = field(metadata=stored(missing=dict))  # absent from files before bootstrap intervals
    chance: dict[str, Any]
    results: list[EvaluationRow] = field(metadata=stored(missing=list))
    selected: dict[str, Any]
    input_hash: str | None = None
    command: str | None = None

    def row(self, method: str, layer: int) -> EvaluationRow:
        """The row of ``method`` at ``layer``; KeyError when the evaluation has none."""
        for r in self.results:
            if r.method == method and r.layer == int(layer):
                return r
        raise UnknownKeyError(f"the evaluation has no row for method {method!r} at layer {layer}")

    @property
    def selected_row(self) -> EvaluationRow:
        return self.row(self.selected["method"], self.selected["layer"])


# --------------------------------------------------------------------------------------------------- inference


@record
@dataclass
class ResponseRecord:
    """One generated response of a monitoring prompt set, with its tokens.

    ``tokens``/``token_ids`` cover prompt then response; ``prompt_end`` is the index of the first response
    token, so ``tokens[:prompt_end]`` is the prompt. ``tags`` is a list of labels; the ``None`` fields are
    optional annotations (``turn_boundaries`` and ``sentence_boundaries`` are token indices).
    """

    prompt: str
    response: str
    tokens: list[str]
    token_ids: list[int]
    prompt_end: int
    inference_model: str | None = None
    capture_date: str | None = None
    system_prompt: str | None = None
    prompt_note: str | None = None
    tags: list[str] = field(default_factory=list)
    turn_boundaries: list[Any] | None = None
    source: str | None = None
    sentence_boundaries: list[Any] | None = None

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.token_ids):
            raise ShapeError(
                f"ResponseRecord has {len(self.tokens)} tokens but {len(self.token_ids)} token_ids; "
                "they must describe the same sequence."
            )
        if not 0 <= self.prompt_end <= len(self.tokens):
            raise ConfigError(f"ResponseRecord.prompt_end must be in [0, {len(self.tokens)}]; got {self.prompt_end}.")

    @property
    def prompt_tokens(self) -> list[str]:
        return self.tokens[: self.prompt_end]

    @property
    def response_tokens(self) -> list[str]:
        return self.tokens[self.prompt_end :]


_SCORES = stored(digits=4)  # as the projection files store them


@record
@dataclass
class ProjectionEntry:
    """Per-token projections of one response onto one vector.

    ``prompt``/``response`` are the raw projections per token; ``token_norms`` holds ``||h||`` per token
    (``{"prompt": [...], "response": [...]}``); ``normalized_*`` are the raw scores divided by the mean
    ``||h||`` of that segment (see ``build``). ``baseline`` is the vector's ``((mu_pos + mu_neg) / 2) . v``;
    ``selection_source`` is the ``VectorResult.source`` that picked the vector. ``to_dict`` rounds every
    score to 4 decimals, as the files store them.
    """

    method: str
    layer: int = field(metadata=stored(read=int))
    selection_source: str
    baseline: float = field(metadata=_SCORES)
    prompt: list[float] = field(metadata=_SCORES)
    response: list[float] = field(metadata=_SCORES)
    token_norms: dict[str, list[float]] = field(default_factory=lambda: {"prompt": [], "response": []},
                                                metadata=_SCORES)
    normalized_prompt: list[float] = field(default_factory=list, metadata=_SCORES)
    normalized_response: list[float] = field(default_factory=list, metadata=_SCORES)

    @classmethod
    def build(
        cls,
        method: str,
        layer: int,
        selection_source: str,
        baseline: float,
        prompt: Sequence[float],
        response: Sequence[float],
        prompt_norms: Sequence[float],
        response_norms: Sequence[float],
    ) -> ProjectionEntry:
        """An entry whose normalized scores are ``raw / mean(norms of that segment)``.

        A segment whose mean norm is 0 (or that is empty) keeps its raw scores as the normalized ones.
        Raises ValueError when a segment has not exactly one norm per score.
        """
        if len(prompt) != len(prompt_norms) or len(response) != len(response_norms):
            raise ShapeError(
                f"each segment needs one norm per score: prompt {len(prompt)} scores vs {len(prompt_norms)} "
                f"norms, response {len(response)} scores vs {len(response_norms)} norms."
            )

        def normalize(scores: Sequence[float], norms: Sequence[float]) -> list[float]:
            mean = sum(norms) / len(norms) if norms else 0.0
            return [float(s) / (mean if mean > 0 else 1.0) for s in scores]

        return cls(
            method=method,
            layer=int(layer),
            selection_source=selection_source,
            baseline=float(baseline),
            prompt=[float(x) for x in prompt],
            response=[float(x) for x in response],
            token_norms={"prompt": [float(x) for x in prompt_norms], "response": [float(x) for x in response_norms]},
            normalized_prompt=normalize(prompt, prompt_norms),
            normalized_response=normalize(response, response_norms),
        )


_IN_METADATA = stored(under="metadata")


@record
@dataclass
class ProjectionRecord:
    """The projections of one response onto one or more vectors, stored as
    ``{"metadata": {...}, "projections": [ProjectionEntry, ...]}``.

    The metadata fields are flattened onto the record; ``n_vectors`` (the number of entries),
    ``multi_vector`` (always true) and ``score_mode`` ("raw+normalized") are derived when writing.
    """

    prompt_id: int | str = field(metadata=_IN_METADATA)
    prompt_set: str = field(metadata=_IN_METADATA)
    n_prompt_tokens: int = field(metadata=_IN_METADATA)
    n_response_tokens: int = field(metadata=_IN_METADATA)
    projections: list[ProjectionEntry] = field(metadata=stored(missing=list))
    component: str = field(default="residual", metadata=_IN_METADATA)
    position: str | None = field(default=None, metadata=_IN_METADATA)
    centered: bool = field(default=False, metadata=_IN_METADATA)
    projection_date: str | None = field(default=None, metadata=_IN_METADATA)
    # activations at massive dims, for cleaning in a viewer
    massive_dim_data: dict[str, Any] | None = field(default=None, metadata=stored(omit_none=True))

    @property
    def n_vectors(self) -> int:
        return len(self.projections)

    def _on_disk(self, d: dict[str, Any]) -> dict[str, Any]:
        d["metadata"].update(multi_vector=True, n_vectors=self.n_vectors, score_mode="raw+normalized")
        return d


# --------------------------------------------------------------------------------------------------- steering


@record
@dataclass
class SteeringEntry:
    """One steering result file found on disk: ``full_path`` is the ``results.jsonl`` of ``trait`` steered on
    ``model_variant`` with vectors from ``position``, judged on ``prompt_set``."""

    trait: str
    model_variant: str
    position: str
    prompt_set: str
    full_path: str


@record
@dataclass
class SteeringRunRecord:
    """One steered condition: its ``JudgeResult`` under the vectors and coefficients of ``config``.

    A ``results.jsonl`` run line: ``{"type": "run", "result", "config", "eval": {"trait_judge"},
    "timestamp", "input_hashes"?, "judge_free"?, "control"?}``. ``layer``/``method``/``component`` are
    those of the first vector and ``coefficient`` is its weight. ``judge_free`` holds ``{"trait_effect",
    "nll_cost", "kl"}``, each ``{"value", "lo", "hi"}`` (see ``tracelens.pipeline.steering_eval``). ``control``
    is the same for one random direction, in files written before the report line held a band of controls;
    new runs leave it None.
    """

    result: JudgeResult
    config: ProjectionConfig
    eval_judge: str | None = field(default=None, metadata=stored(key="trait_judge", under="eval", legacy="eval_judge"))
    timestamp: str | None = None
    input_hashes: dict[str, str] | None = field(default=None, metadata=stored(omit_none=True))
    judge_free: dict[str, Any] | None = field(default=None, metadata=stored(omit_none=True))
    control: dict[str, Any] | None = field(default=None, metadata=stored(omit_none=True))

    @property
    def layer(self) -> int:
        return self.config.vectors[0].layer

    @property
    def coefficient(self) -> float:
        return self.config.vectors[0].weight

    @property
    def method(self) -> str:
        return self.config.vectors[0].method

    @property
    def component(self) -> str:
        return self.config.vectors[0].component

    def within_budget(self, max_kl: float | None) -> bool:
        """True when ``max_kl`` is None or the run's KL (nats/token, ``judge_free["kl"]["value"]``) is at most it;
        a run without a measured KL is never within a budget."""
        kl = (self.judge_free or {}).get("kl")
        return max_kl is None or (kl is not None and kl["value"] <= max_kl)

    def is_valid(self, min_coherence: float | None = MIN_COHERENCE, max_kl: float | None = None) -> bool:
        """True when the run has a trait mean, its mean coherence is at least ``min_coherence`` (None: coherence
        not used) and it is ``within_budget(max_kl)``."""
        c = self.result.coherence_mean
        coherent = min_coherence is None or (c is not None and c >= min_coherence)
        return self.result.trait_mean is not None and coherent and self.within_budget(max_kl)

    def _on_disk(self, d: dict[str, Any]) -> dict[str, Any]:
        return {"type": "run", **d}


@record
@dataclass
class NeutralReference:
    """``steering/_reference/{variant}/neutral-{max_new_tokens}.json``: the unsteered model's answers to
    neutral prompts (token ids per prompt), on which steering's coherence cost is measured."""

    model: str | None
    prompts: list[str]
    prompt_token_ids: list[list[int]]
    response_token_ids: list[list[int]]


@record
@dataclass
class SteeringHeader:
    """The first line of ``results.jsonl``: what was steered, with which vectors, judged how.

    ``direction`` is "positive" (steer towards the trait) or "negative"; ``vector_source`` is
    ``{"model", "experiment", "trait"}``; ``eval`` is ``{"model", "method", "trait_judge"}`` plus, when
    measured, the judge's ``validity``. ``n_questions`` search and ``n_report`` report questions. ``selection``
    is the rule that picks the reported run: ``{"max_kl", "min_coherence", "n_controls", "control_seed",
    "grid"}`` (empty in files written before the KL budget); ``coherence_validity`` the `CoherenceValidation`
    of the judge's coherence and the other signals, measured when the file was started (empty before it);
    ``command`` what wrote the file.
    """

    trait: str
    direction: str = "positive"
    steering_model: str | None = None
    steering_experiment: str | None = None
    vector_source: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    prompts_file: str | None = None
    prompts_hash: str | None = None
    n_questions: int | None = None
    n_report: int | None = None
    max_new_tokens: int | None = None
    n_neutral: int | None = None
    selection: dict[str, Any] = field(default_factory=dict)
    coherence_validity: dict[str, Any] = field(default_factory=dict)
    command: str | None = None

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"SteeringHeader.direction must be one of {DIRECTIONS}; got {self.direction!r}.")

    def _on_disk(self, d: dict[str, Any]) -> dict[str, Any]:
        return {"type": "header", **d}


@record
@dataclass
class SteeringResults:
    """A whole ``results.jsonl``: the header, the unsteered baseline and every steered run, in file order.

    ``delta(run)`` is the run's trait mean minus the baseline's; ``best_run()`` is the valid run
    (coherence >= ``min_coherence``) with the largest delta in the header's direction. ``report`` is the
    last ``{"type": "report"}`` line: the selected run re-judged on the report questions.
    """

    header: SteeringHeader
    baseline: JudgeResult | None = None
    runs: list[SteeringRunRecord] = field(default_factory=list)
    baseline_timestamp: str | None = None
    baseline_judge_free: dict[str, Any] | None = None
    report: dict[str, Any] | None = None

    def delta(self, run: SteeringRunRecord) -> float | None:
        """``run.trait_mean - baseline.trait_mean``; None without a baseline or a trait mean."""
        if self.baseline is None or self.baseline.trait_mean is None or run.result.trait_mean is None:
            return None
        return run.result.trait_mean - self.baseline.trait_mean

    def valid_runs(self, min_coherence: float | None = MIN_COHERENCE, max_kl: float | None = None
                   ) -> list[SteeringRunRecord]:
        return [r for r in self.runs if r.is_valid(min_coherence, max_kl)]

    def best_run(
        self, min_coherence: float | None = MIN_COHERENCE, layer: int | None = None, method: str | None = None,
        max_kl: float | None = None,
    ) -> SteeringRunRecord | None:
        """The valid run (``is_valid(min_coherence, max_kl)``) that moves the trait furthest in
        ``header.direction``, optionally restricted to one ``layer``/``method``; None when no run qualifies.
        Ties keep the earliest run."""
        sign = 1.0 if self.header.direction == "positive" else -1.0
        best, best_key = None, -math.inf
        for run in self.valid_runs(min_coherence, max_kl):
            if (layer is not None and run.layer != layer) or (method is not None and run.method != method):
                continue
            key = sign * run.result.trait_mean
            if key > best_key:
                best, best_key = run, key
        return best

    def selection_rule(self) -> tuple[float | None, float | None]:
        """``(min_coherence, max_kl)`` of the header's rule: the coherence threshold only where the judge's
        coherence was shown valid (``JUDGE_COHERENCE`` in the header's `CoherenceValidation.shown`; None, not
        used, otherwise and in files without a validation), and the KL budget (None in files before it)."""
        validity = self.header.coherence_validity
        shown = bool(validity) and JUDGE_COHERENCE in CoherenceValidation.from_dict(validity).shown()
        return (self.header.selection.get("min_coherence") if shown else None), self.header.selection.get("max_kl")

    def selected_run(self, layer: int | None = None, method: str | None = None) -> SteeringRunRecord | None:
        """`best_run` under the header's `selection_rule`: the run a report shows."""
        min_coherence, max_kl = self.selection_rule()
        return self.best_run(min_coherence, layer, method, max_kl)

    def to_jsonl_lines(self) -> list[dict[str, Any]]:
        """The objects of ``results.jsonl``, one per line: header, baseline (if any), runs."""
        lines = [self.header.to_dict()]
        if self.baseline is not None:
            lines.append({"type": "baseline", "result": self.baseline.to_dict(), "timestamp": self.baseline_timestamp,
                          **({"judge_free": self.baseline_judge_free} if self.baseline_judge_free else {})})
        lines += [run.to_dict() for run in self.runs]
        return lines + ([self.report] if self.report is not None else [])

    @classmethod
    def from_jsonl_lines(cls, lines: Iterable[Mapping[str, Any]]) -> SteeringResults:
        """Rebuild from parsed lines. Lines of unknown type are skipped; a later baseline replaces an earlier
        one. Raises ValueError when there is no header."""
        header, baseline, baseline_ts, baseline_jf, runs, report = None, None, None, None, [], None
        for line in lines:
            kind = line.get("type")
            if kind == "header":
                header = SteeringHeader.from_dict(line)
            elif kind == "baseline":
                baseline, baseline_ts = JudgeResult.from_dict(line["result"]), line.get("timestamp")
                baseline_jf = line.get("judge_free")
            elif kind == "run":
                runs.append(SteeringRunRecord.from_dict(line))
            elif kind == "report":
                report = dict(line)
        if header is None:
            raise DataError('results.jsonl has no {"type": "header"} line; it is not a steering results file.')
        return cls(header=header, baseline=baseline, runs=runs, baseline_timestamp=baseline_ts,
                   baseline_judge_free=baseline_jf, report=report)

    def save(self, path: str | Path) -> None:
        """Write ``results.jsonl`` (one JSON object per line) atomically, creating parent folders."""
        from tracelens.io import write_bytes  # not at import: `tracelens.io` loads torch (safetensors)

        write_bytes(Path(path), "".join(json.dumps(line) + "\n" for line in self.to_jsonl_lines()).encode())

    @classmethod
    def load(cls, path: str | Path) -> SteeringResults:
        """Read a ``results.jsonl``; blank lines are skipped, a malformed line is a DataError naming it."""
        from tracelens.io import read_json_lines

        return cls.from_jsonl_lines(value for _, value in read_json_lines(Path(path)))

    def _on_disk(self, d: dict[str, Any]) -> dict[str, Any]:
        return {k: d[k] for k in ("header", "baseline", "baseline_timestamp", "baseline_judge_free", "runs", "report")}


# --------------------------------------------------------------------------------------------------- coherence


@record
@dataclass(frozen=True)
class CoherenceItem:
    """One answer of a coherence validation set: ``intact`` (label 1) or damaged (label 0) in the way ``kind``
    names (``"intact"``, a random-steering kind, a text damage)."""

    question: str
    response: str
    intact: bool
    kind: str


@record
@dataclass
class CoherenceSet:
    """``steering/_reference/{variant}/coherence-{prompt_set}-{max_new_tokens}.json``: the model's own answers
    to ``prompt_set`` and their damaged versions (`tracelens.pipeline.coherence_validation`), ``items`` in
    question order; the ``tune`` / ``held_out`` questions; the random-steering ``layer`` and ``coefficients``
    (per steering kind); the ``model``'s name and the split's ``seed``."""

    items: list[CoherenceItem]
    tune: list[str]
    held_out: list[str]
    layer: int
    coefficients: dict[str, float]
    prompt_set: str
    model: str | None
    seed: int
    max_new_tokens: int

    def split(self, name: str) -> list[CoherenceItem]:
        """The items of the ``"tune"`` or ``"held_out"`` questions."""
        if name not in ("tune", "held_out"):
            raise ConfigError(f"split must be 'tune' or 'held_out'; got {name!r}")
        questions = set(self.tune if name == "tune" else self.held_out)
        return [item for item in self.items if item.question in questions]


@record
@dataclass
class CoherenceValidation:
    """How well each coherence signal tells the model's own intact answers from damaged ones, on held-out
    questions (`tracelens.pipeline.coherence_validation`): ``auroc[signal]`` and ``per_kind[signal][kind]`` are
    ``{"value", "lo", "hi"}`` (95% bootstrap over held-out questions; 0.5 is chance); ``n_items[split]`` is
    ``{"items", "intact"}`` and ``n_questions[split]`` the questions of ``"tune"`` and ``"held_out"``;
    ``coefficients`` the random-steering coefficient of each steering kind at ``layer``; ``sources[signal]``
    what the signal is (a judge's name)."""

    model: str | None
    prompt_set: str
    seed: int
    max_new_tokens: int
    layer: int
    coefficients: dict[str, float]
    n_items: dict[str, dict[str, int]]
    n_questions: dict[str, int]
    tune_questions: list[str]
    held_out_questions: list[str]
    auroc: dict[str, dict[str, float]]
    per_kind: dict[str, dict[str, dict[str, float]]]
    sources: dict[str, str] = field(default_factory=dict)

    def shown(self) -> list[str]:
        """The signals whose validity is shown: the lower end of their AUROC interval is above 0.5."""
        return [name for name, est in self.auroc.items() if est["lo"] > 0.5]

