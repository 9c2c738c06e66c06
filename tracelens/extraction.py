"""The extraction pipeline: responses -> activations -> vectors -> held-out evaluation.

Each stage is a function that reads the previous stage's files and writes its own atomically, with
an `input_hash` of everything it depends on; a stage whose outputs carry the current hash is skipped
(unless `force`), so an interrupted run resumes at the first unfinished stage.

Layout (under `experiments/{exp}/extraction/{trait}/{variant}/`, see `tracelens.experiments`):
  responses/pos.json, neg.json, metadata.json
  vetting/response_scores.json (only with a vetting judge: pairs kept where pos >= 60 and neg <= 40)
  activations/{position}/{component}/train_all_layers.safetensors, val_all_layers.safetensors, metadata.json
      train = cat(pos, neg) on dim 0, split at n_examples_pos; float16 (bfloat16 if float16 would overflow)
  vectors/{position}/{component}/{method}/layer{N}.safetensors (unit float32 "vector"), metadata.json
  evaluation/{position}/{component}.json
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from tracelens.backends import GenerationConfig, LocalBackend
from tracelens.capture import capture_sequences
from tracelens.experiments import Experiment
from tracelens.io import load_tensors, read_json, save_tensors, write_json
from tracelens.methods import get_method
from tracelens.metrics import accuracy, auroc, effect_size, polarity_correct
from tracelens.positions import parse_position, tokens_needed
from tracelens.traits import load_trait
from tracelens.types import ActivationMetadata

ALWAYS_EVALUATED = "random_baseline"


@dataclass
class ExtractionConfig:
    """Settings of one extraction run; `None` defaults depend on whether the model is a chat model
    (position `response[:]`, 64 new tokens) or a base model (`response[:5]`, 16 new tokens)."""

    methods: Sequence[str] = ("probe", "mean_diff", "gradient")
    position: str | None = None
    layers: str | Sequence[int] = "all"
    component: str = "residual"
    val_split: float = 0.1
    max_new_tokens: int | None = None
    temperature: float = 0.0
    limit: int | None = None  # use only the first `limit` pairs (quick runs)
    batch_size: int | None = None
    force: bool = False
    method_kwargs: dict[str, dict] = field(default_factory=dict)


def parse_layers(spec: str | Sequence[int], n_layers: int) -> list[int]:
    """Layers from "all", "30%-60%" (of depth, inclusive), "0-20:5" (start-end:step, inclusive), "3,5,7" or a list."""
    if not isinstance(spec, str):
        layers = [int(x) for x in spec]
    elif spec == "all":
        layers = list(range(n_layers))
    elif m := re.fullmatch(r"(\d+(?:\.\d+)?)%-(\d+(?:\.\d+)?)%", spec):
        lo, hi = (round(float(x) / 100 * (n_layers - 1)) for x in m.groups())
        layers = list(range(lo, hi + 1))
    elif m := re.fullmatch(r"(\d+)-(\d+)(?::(\d+))?", spec):
        lo, hi, step = int(m[1]), int(m[2]), int(m[3] or 1)
        layers = list(range(lo, hi + 1, step))
    elif re.fullmatch(r"-?\d+(,-?\d+)*", spec):
        layers = [int(x) for x in spec.split(",")]
    else:
        raise ValueError(f"bad layer spec {spec!r}: use 'all', '30%-60%', '0-20:5', '3,5,7' or a list")
    bad = [l for l in layers if not -n_layers <= l < n_layers]
    if bad or not layers:
        raise ValueError(f"layer spec {spec!r} gives layers {bad or layers} outside 0..{n_layers - 1}")
    return sorted({l % n_layers for l in layers})


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _up_to_date(path, input_hash: str, force: bool) -> bool:
    return not force and path.is_file() and read_json(path).get("input_hash") == input_hash


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
        raise ValueError(f"position {position!r} needs {needed} response tokens but max_new_tokens is {max_new}")
    return ExtractionConfig(**{**asdict(config), "position": position, "max_new_tokens": max_new})


# --- stage 1: responses ---------------------------------------------------------------------------


def generate_responses(exp: Experiment, trait: str, variant: str, backend: LocalBackend,
                       config: ExtractionConfig, model_id: str) -> str:
    """Generate answers under the positive and negative scenarios; returns the stage's input hash."""
    data = load_trait(trait)
    out = exp.responses_dir(trait, variant)
    input_hash = _hash("responses", data.input_hash, model_id, config.max_new_tokens, config.temperature,
                       backend.use_chat_template, config.limit)
    if _up_to_date(out / "metadata.json", input_hash, config.force):
        return input_hash
    gen = GenerationConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=0)
    if config.batch_size:
        backend.batch_size = config.batch_size
    for polarity, scenarios in (("pos", data.positive[: config.limit]), ("neg", data.negative[: config.limit])):
        results = backend.generate_results([s.prompt for s in scenarios], gen,
                                           system_prompts=[s.system_prompt for s in scenarios])
        rows = [
            {"prompt": s.prompt, "system_prompt": s.system_prompt, "response": r.response_text,
             "prompt_token_ids": r.prompt_token_ids, "response_token_ids": r.response_token_ids}
            for s, r in zip(scenarios, results)
        ]
        write_json(out / f"{polarity}.json", rows)
    write_json(out / "metadata.json", {
        "model": model_id, "trait": trait, "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature, "chat_template": backend.use_chat_template,
        "input_hashes": {"scenarios": data.input_hash}, "input_hash": input_hash,
    })
    return input_hash


def load_responses(exp: Experiment, trait: str, variant: str) -> tuple[list[dict], list[dict]]:
    d = exp.responses_dir(trait, variant)
    return read_json(d / "pos.json"), read_json(d / "neg.json")


# --- optional stage: vetting ---------------------------------------------------------------------

POS_THRESHOLD, NEG_THRESHOLD, MIN_KEPT = 60.0, 40.0, 10


def vet_responses(exp: Experiment, trait: str, variant: str, judge, responses_hash: str, force: bool = False) -> str:
    """Judge every response's trait score and keep the pairs whose positive side scores >= 60 and negative
    side <= 40 (pairs stay matched). Use a judge independent of these responses (e.g. `OpenAIJudge`)."""
    path = exp.vetting_path(trait, variant)
    input_hash = _hash("vetting", responses_hash, getattr(judge, "name", type(judge).__name__))
    if _up_to_date(path, input_hash, force):
        return input_hash
    data = load_trait(trait)
    pos, neg = load_responses(exp, trait, variant)
    scores = {}
    for polarity, rows in (("pos", pos), ("neg", neg)):
        items = [{"question": r["prompt"], "response": r["response"]} for r in rows]
        scores[polarity] = [s["trait_score"] for s in judge.score(items, trait, data.definition)]
    kept = [i for i, (p, n) in enumerate(zip(scores["pos"], scores["neg"]))
            if p is not None and n is not None and p >= POS_THRESHOLD and n <= NEG_THRESHOLD]
    write_json(path, {
        "results": [{"idx": i, "polarity": pol, "score": s} for pol in ("pos", "neg") for i, s in enumerate(scores[pol])],
        "thresholds": {"pos": POS_THRESHOLD, "neg": NEG_THRESHOLD}, "kept_indices": kept,
        "failed_indices": [i for i in range(len(pos)) if i not in set(kept)],
        "summary": {"n_pairs": len(pos), "n_kept": len(kept)}, "input_hash": input_hash,
    })
    return input_hash


def kept_pairs(exp: Experiment, trait: str, variant: str, vetted: bool) -> tuple[list[dict], list[dict]]:
    """The responses the activations stage uses: every pair, or the pairs that passed vetting."""
    pos, neg = load_responses(exp, trait, variant)
    if not vetted:
        return pos, neg
    kept = read_json(exp.vetting_path(trait, variant))["kept_indices"]
    if len(kept) < MIN_KEPT:
        raise ValueError(f"only {len(kept)} of {len(pos)} pairs of {trait} passed vetting (need {MIN_KEPT}); "
                         "check the scenarios or the judge, or extract without vetting")
    return [pos[i] for i in kept], [neg[i] for i in kept]


# --- stage 2: activations -------------------------------------------------------------------------


def split_point(n: int, val_split: float) -> int:
    """Index where the held-out tail of a polarity list starts (the last `val_split` of it, file order)."""
    if not 0 <= val_split < 1:
        raise ValueError(f"val_split must be in [0, 1), got {val_split}")
    return n - int(round(n * val_split))


def capture_activations(exp: Experiment, trait: str, variant: str, model, config: ExtractionConfig,
                        responses_hash: str, model_id: str, vetted: bool = False) -> str:
    """Capture every layer at the position for each (kept) response; float16 on disk."""
    out = exp.activations_dir(trait, variant, config.position, config.component)
    input_hash = _hash("activations", responses_hash, config.position, config.component, config.val_split)
    if _up_to_date(out / "metadata.json", input_hash, config.force):
        return input_hash
    pos, neg = kept_pairs(exp, trait, variant, vetted)
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers))

    def acts(rows):
        return capture_sequences(model, [r["prompt_token_ids"] + r["response_token_ids"] for r in rows],
                                 [len(r["prompt_token_ids"]) for r in rows], layers, config.position,
                                 "mean", config.component, config.batch_size)

    a_pos, a_neg = acts(pos), acts(neg)  # [n, n_layers, d] float32
    kp, kn = split_point(len(pos), config.val_split), split_point(len(neg), config.val_split)
    train = torch.cat([a_pos[:kp], a_neg[:kn]])
    val = torch.cat([a_pos[kp:], a_neg[kn:]])
    dtype = torch.float16 if max(train.abs().max(), val.abs().max() if len(val) else 0) < 6.5e4 else torch.bfloat16
    save_tensors(out / "train_all_layers.safetensors", {"activations": train.to(dtype)})
    save_tensors(out / "val_all_layers.safetensors", {"activations": val.to(dtype)})
    meta = ActivationMetadata(
        n_layers=n_layers, hidden_dim=model.cfg.d_model, captured_layers=layers,
        activation_norms={l: float(train[:, l].norm(dim=-1).mean()) for l in layers},
        n_examples_pos=kp, n_examples_neg=kn, n_val_pos=len(pos) - kp, n_val_neg=len(neg) - kn,
        model=model_id, position=config.position, component=config.component,
    )
    write_json(out / "metadata.json", {**meta.to_dict(), "dtype": str(dtype).removeprefix("torch."),
                                       "input_hash": input_hash})
    return input_hash


def load_activation_metadata(experiment: str | Experiment, trait: str, variant: str,
                             position: str = "response[:]", component: str = "residual") -> ActivationMetadata:
    """The `ActivationMetadata` written by the activations stage."""
    exp = experiment if isinstance(experiment, Experiment) else Experiment.named(experiment)
    path = exp.activations_dir(trait, variant, position, component) / "metadata.json"
    if not path.is_file():
        raise FileNotFoundError(f"no activation metadata at {path}; run `tracelens extract` first")
    return ActivationMetadata.from_dict(read_json(path))


def load_activations(exp: Experiment, trait: str, variant: str, position: str, component: str):
    """(pos_train, neg_train, pos_val, neg_val), each `[n, n_layers, d]` float32."""
    d = exp.activations_dir(trait, variant, position, component)
    meta = load_activation_metadata(exp, trait, variant, position, component)
    train = load_tensors(d / "train_all_layers.safetensors")["activations"].float()
    val = load_tensors(d / "val_all_layers.safetensors")["activations"].float()
    kp, vp = meta.n_examples_pos, meta.n_val_pos
    return train[:kp], train[kp:], val[:vp], val[vp:]


# --- stage 3: vectors -----------------------------------------------------------------------------


def fit_vectors(exp: Experiment, trait: str, variant: str, config: ExtractionConfig, layers: list[int],
                activations_hash: str, model_id: str) -> dict[str, str]:
    """Fit every method at every layer; unit float32 vectors with per-layer metadata."""
    pos, neg, _, _ = load_activations(exp, trait, variant, config.position, config.component)
    methods = list(dict.fromkeys([*config.methods, ALWAYS_EVALUATED]))
    hashes = {}
    for name in methods:
        kwargs = config.method_kwargs.get(name, {})
        out = exp.vectors_dir(trait, variant, config.position, config.component, name)
        hashes[name] = input_hash = _hash("vectors", activations_hash, name, kwargs, layers)
        if _up_to_date(out / "metadata.json", input_hash, config.force):
            continue
        method = get_method(name)
        per_layer = {}
        for layer in tqdm(layers, desc=f"{trait} {name}", leave=False):
            # The held-out rows are never shown to a method (methods that tune hyper-parameters split
            # their training rows), so the evaluation stage measures generalisation honestly.
            extra = {"seed": layer} if name == ALWAYS_EVALUATED else {}
            result = method.extract(pos[:, layer], neg[:, layer], **extra, **kwargs)
            v = result["vector"].float()
            save_tensors(exp.vector_path(trait, variant, config.position, config.component, name, layer), {"vector": v})
            midpoint = (pos[:, layer].mean(0) + neg[:, layer].mean(0)) / 2
            per_layer[str(layer)] = {
                "norm": float(v.norm()), "baseline": float(midpoint @ v),
                **{k: float(result[k]) for k in ("train_acc", "bias") if k in result},
            }
        write_json(out / "metadata.json", {
            "model": model_id, "trait": trait, "method": name, "component": config.component,
            "position": config.position, "layers": per_layer, "input_hash": input_hash,
        })
    return hashes


def load_vector(exp: Experiment, trait: str, variant: str, position: str, component: str, method: str,
                layer: int) -> torch.Tensor:
    return load_tensors(exp.vector_path(trait, variant, position, component, method, layer))["vector"]


# --- stage 4: held-out evaluation -----------------------------------------------------------------


def evaluate_vectors(exp: Experiment, trait: str, variant: str, config: ExtractionConfig, layers: list[int],
                     vector_hashes: dict[str, str]) -> dict:
    """Held-out accuracy, AUROC, effect size and polarity of every method x layer (random_baseline included)."""
    path = exp.evaluation_path(trait, variant, config.position, config.component)
    input_hash = _hash("evaluation", vector_hashes)
    if _up_to_date(path, input_hash, config.force):
        return read_json(path)
    _, _, vpos, vneg = load_activations(exp, trait, variant, config.position, config.component)
    if len(vpos) == 0 or len(vneg) == 0:
        raise ValueError(f"no held-out examples for {trait}: raise val_split (now {config.val_split})")
    rows = []
    for name in vector_hashes:
        for layer in layers:
            v = load_vector(exp, trait, variant, config.position, config.component, name, layer)
            p, n = vpos[:, layer] @ v, vneg[:, layer] @ v
            rows.append({"method": name, "layer": layer, "val_accuracy": float(accuracy(p, n)),
                         "val_auroc": float(auroc(p, n)), "effect_size": float(effect_size(p, n, signed=True)),
                         "polarity_correct": bool(polarity_correct(p, n))})
    real = [r for r in rows if r["method"] != ALWAYS_EVALUATED] or rows
    best = max(real, key=lambda r: (r["val_accuracy"], r["val_auroc"]))
    report = {"trait": trait, "position": config.position, "component": config.component,
              "n_val_pos": len(vpos), "n_val_neg": len(vneg), "results": rows, "best": best, "input_hash": input_hash}
    write_json(path, report)
    return report


# --- the whole pipeline ---------------------------------------------------------------------------


def run_extraction(experiment: str | Experiment, traits: Sequence[str], config: ExtractionConfig | None = None,
                   variant: str | None = None, backend: LocalBackend | None = None, vet_judge=None,
                   response_backend=None) -> dict[str, dict]:
    """Run every stage for each trait (vetting only with `vet_judge`); returns the evaluation report per trait.

    `response_backend` (e.g. a `VLLMBackend`) generates the responses of every trait first and is then
    shut down; capture and fitting always run on the local model (`backend`, loaded when not given).
    """
    from tracelens.experiments import get_model_variant
    from tracelens.loading import load_model

    exp = experiment if isinstance(experiment, Experiment) else Experiment.named(experiment)
    mv = get_model_variant(exp, variant, mode="extraction")
    chat = exp.config().get("use_chat_template")

    def local() -> LocalBackend:
        nonlocal backend
        if backend is None:
            backend = LocalBackend.from_model(load_model(mv.model), use_chat_template=chat)
        return backend

    config = resolve_defaults(response_backend or local(), config or ExtractionConfig())
    responses = {t: generate_responses(exp, t, mv.name, response_backend or local(), config, mv.model) for t in traits}
    if response_backend is not None and hasattr(response_backend, "shutdown"):
        response_backend.shutdown()  # free the GPU before the local model loads
    layers = parse_layers(config.layers, local().n_layers)
    reports = {}
    for trait in traits:
        h = responses[trait]
        if vet_judge is not None:
            h = vet_responses(exp, trait, mv.name, vet_judge, h, config.force)
        h = capture_activations(exp, trait, mv.name, backend.model, config, h, mv.model, vetted=vet_judge is not None)
        vh = fit_vectors(exp, trait, mv.name, config, layers, h, mv.model)
        reports[trait] = evaluate_vectors(exp, trait, mv.name, config, layers, vh)
    return reports
