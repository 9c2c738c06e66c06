"""Monitoring: per-token projections of a prompt set's responses onto selected trait vectors.

Stage 1 generates one `ResponseRecord` per prompt; stage 2 prefills prompt + response with
`MultiLayerProjection` (scores and norms computed inside the hook; no activations leave the device)
and writes one `ProjectionRecord` per prompt and trait. Finished prompts are skipped on re-runs. The
first run also calibrates massive dims passively (`MassiveDimCollector`, prefill passes only) and,
once a calibration exists, each record carries the activations at the candidate dims so a viewer can
clean projections. `one_pass=True` instead records projections while generating (steering allowed),
so a steered or capped generation is monitored in the same call: projections and the massive-dim
activations kept for cleaning are both read after the steering (reads run after edits at a hook point,
see `tracelens.model.hooks`), from the pass that produced the response.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from tracelens.serving.backends import GenerationConfig, LocalBackend, SteeringSpec
from tracelens.model.edits import unit
from tracelens.errors import ConfigError
from tracelens.pipeline.experiments import Experiment, get_model_variant
from tracelens.pipeline.extraction import load_vector, parse_layers
from tracelens.model.generation import HookedGenerator
from tracelens.model.hooks import CaptureHook, MultiLayerProjection
from tracelens.io import read_json, write_json
from tracelens.model.massive import MassiveDimCollector, candidate_dims
from tracelens.pipeline.prompt_sets import load_prompt_set
from tracelens.model.prompts import token_strings, tokenize_batch
from tracelens.pipeline.selection import select_vector
from tracelens.model.sites import get_hook_path
from tracelens.types import ProjectionEntry, ProjectionRecord, ResponseRecord


@dataclass
class MonitorConfig:
    layers: str = "best,best+5"
    max_new_tokens: int = 64
    calibrate: bool = True
    target_tokens: int = 5000
    one_pass: bool = False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_monitoring(experiment: str | Experiment, prompt_set: str, traits: Sequence[str], config: MonitorConfig | None = None,
                   variant: str | None = None, backend: LocalBackend | None = None,
                   steering: Sequence[SteeringSpec] | None = None, response_backend=None) -> dict[str, int]:
    """Responses and projections for every prompt of `prompt_set`; returns counts of what was written.

    `response_backend` (e.g. a `VLLMBackend`) writes the missing response records first and is then shut
    down; projections run on the local model. Passive calibration needs local prefill passes, so it does
    not happen on that path (run `tracelens massive` instead).
    """
    config = config or MonitorConfig()
    exp = experiment if isinstance(experiment, Experiment) else Experiment.named(experiment)
    mv = get_model_variant(exp, variant, mode="application")
    if response_backend is not None:
        if config.one_pass:
            raise ConfigError("one_pass monitoring records projections while generating; it needs the local model")
        ps = load_prompt_set(prompt_set)
        todo = [p for p in ps.prompts if not exp.inference_response_path(mv.name, ps.name, p.id).is_file()]
        if todo:
            results = response_backend.generate_results(
                [p.text for p in todo], GenerationConfig(max_new_tokens=config.max_new_tokens),
                system_prompts=[ps.system_prompt] * len(todo))
            for p, r in zip(todo, results):
                record = _record(response_backend, p.text, ps.system_prompt, r.prompt_token_ids, r.response_token_ids,
                                 r.response_text, mv.label)
                write_json(exp.inference_response_path(mv.name, ps.name, p.id), record.to_dict())
        if hasattr(response_backend, "shutdown"):
            response_backend.shutdown()
    if backend is None:
        backend = LocalBackend.from_experiment(exp, mv.name)
    if steering and not config.one_pass:
        raise ConfigError("steering while monitoring needs one_pass=True (projections recorded during generation)")
    ps = load_prompt_set(prompt_set)
    written = {"responses": 0, "projections": 0}
    targets = {t: _vector_targets(exp, t, backend.n_layers, config.layers) for t in traits}
    calib_path = exp.massive_activations_path(mv.name)
    collector = MassiveDimCollector(backend.model, calib_path, config.target_tokens,
                                    info={"experiment": exp.name, "model": mv.label, "model_variant": mv.name})
    calibrating = config.calibrate and not collector.should_skip()
    if calibrating:
        collector.register()
    records, one_pass_scores, one_pass_acts = {}, {}, {}
    try:  # stage 1: responses (their prefill passes calibrate the massive dims)
        for prompt in ps.prompts:
            rpath = exp.inference_response_path(mv.name, ps.name, prompt.id)
            pending = [t for t in traits if not exp.projection_path(mv.name, t, ps.name, prompt.id).is_file()]
            # One pass: a projection comes from the pass that generated its response, so a prompt with a
            # missing projection is generated again (its response record rewritten).
            if rpath.is_file() and not (config.one_pass and pending):
                if pending:
                    records[prompt.id] = ResponseRecord.from_dict(read_json(rpath))
                continue
            if config.one_pass:
                record, one_pass_scores[prompt.id], one_pass_acts[prompt.id] = _generate_and_project(
                    backend, prompt.text, ps.system_prompt, targets, config, steering, mv.label)
            else:
                record = _generate(backend, prompt.text, ps.system_prompt, config, mv.label)
            write_json(rpath, record.to_dict())
            written["responses"] += 1
            records[prompt.id] = record
    finally:
        if calibrating:
            collector.finalize()
    calibration = read_json(calib_path) if calib_path.is_file() else None
    for prompt_id, record in records.items():  # stage 2: projections
        for trait in traits:
            path = exp.projection_path(mv.name, trait, ps.name, prompt_id)
            if path.is_file():
                continue
            scores = one_pass_scores.get(prompt_id, {}).get(trait)
            rec = _project(backend, record, targets[trait], scores)
            rec.prompt_id, rec.prompt_set = prompt_id, ps.name
            out = rec.to_dict()
            if calibration is not None:
                out["massive_dim_data"] = _massive_dim_data(backend, record, targets[trait], calibration,
                                                            one_pass_acts.get(prompt_id))
            write_json(path, out)
            written["projections"] += 1
    return written


@dataclass
class _Target:
    method: str
    source: str
    position: str
    component: str
    vectors: dict[int, torch.Tensor]
    baselines: dict[int, float]


def _vector_targets(exp: Experiment, trait: str, n_layers: int, spec: str) -> _Target:
    best = select_vector(exp, trait)
    variant = get_model_variant(exp, mode="extraction").name
    layers = parse_layers(spec, n_layers, best=best.layer)
    meta = read_json(exp.vectors_dir(trait, variant, best.position, best.component, best.method) / "metadata.json")
    return _Target(best.method, best.source, best.position, best.component,
                   {l: load_vector(exp, trait, variant, best.position, best.component, best.method, l) for l in layers},
                   {l: meta["layers"][str(l)]["baseline"] for l in layers})


def _generate(backend: LocalBackend, text: str, system_prompt, config: MonitorConfig, model_id: str) -> ResponseRecord:
    [r] = backend.generate_results([text], GenerationConfig(max_new_tokens=config.max_new_tokens),
                                    system_prompts=[system_prompt])
    return _record(backend, text, system_prompt, r.prompt_token_ids, r.response_token_ids, r.response_text, model_id)


def _record(backend, text, system_prompt, prompt_ids, response_ids, response_text, model_id) -> ResponseRecord:
    ids = list(prompt_ids) + list(response_ids)
    tokens = [backend.tokenizer.decode([i]) for i in ids]  # readable text of each token (no BPE markers)
    return ResponseRecord(prompt=text, response=response_text, tokens=tokens,
                          token_ids=ids, prompt_end=len(prompt_ids), inference_model=model_id,
                          capture_date=_now(), system_prompt=system_prompt)


def _project(backend, record: ResponseRecord, target: _Target, scores=None) -> ProjectionRecord:
    """Per-token projections of one record (prefill), or from `scores` recorded during generation."""
    if scores is None:
        ids = torch.tensor([record.token_ids], device=backend.device)
        with MultiLayerProjection(backend.model, target.vectors, target.component) as proj, torch.inference_mode():
            backend.model(ids)
        scores = {l: (proj.get(l)[0], proj.get_norms(l)[0]) for l in target.vectors}
    n = record.prompt_end
    entries = [ProjectionEntry.build(target.method, l, target.source, target.baselines[l], s[:n].tolist(),
                                     s[n:].tolist(), norms[:n].tolist(), norms[n:].tolist())
               for l, (s, norms) in scores.items()]
    return ProjectionRecord(prompt_id=0, prompt_set="", n_prompt_tokens=n, n_response_tokens=len(entries[0].response),
                            projections=entries, component=target.component, position=target.position,
                            projection_date=_now())


def _generate_and_project(backend, text, system_prompt, targets, config, steering, model_id):
    """One pass: generate while every trait's projections and the monitored layers' activations are recorded,
    after any steering at their sites. The final token is never fed back, so response scores cover all
    response tokens but the last; the record is trimmed to match. Returns the record,
    `{trait: {layer: (scores, norms)}}` and `{(layer, component): [n_tokens, d]}` (on CPU, kept for cleaning)."""
    ids, mask = tokenize_batch(backend.tokenizer, [backend.format(text, system_prompt)])
    with ExitStack() as stack:
        projs = {t: stack.enter_context(MultiLayerProjection(backend.model, tg.vectors, tg.component))
                 for t, tg in targets.items()}
        caps = {(l, tg.component): CaptureHook(backend.model, get_hook_path(l, tg.component))
                for tg in targets.values() for l in tg.vectors}
        for cap in caps.values():
            stack.enter_context(cap)
        [out] = HookedGenerator(backend.model).generate(
            ids, mask, config.max_new_tokens, steering=[s.to_config() for s in steering or ()] or None)
    fed = out.token_ids[:-1]
    scores = {t: {l: (torch.cat(p.get(l, concat=False), dim=1)[0], torch.cat(p.get_norms(l, concat=False), dim=1)[0])
                  for l in tg.vectors} for (t, tg), p in zip(targets.items(), projs.values())}
    acts = {key: torch.cat(cap.get(concat=False), dim=1)[0] for key, cap in caps.items()}
    prompt_ids = ids[0].tolist()
    text_out = backend.tokenizer.decode(fed, skip_special_tokens=True).strip()
    record = _record(backend, text, system_prompt, prompt_ids, fed, text_out, model_id)
    return record, scores, acts


def _massive_dim_data(backend, record: ResponseRecord, target: _Target, calibration: dict,
                      acts: dict[tuple[int, str], torch.Tensor] | None = None) -> dict:
    """Activations at the candidate massive dims per projected layer, for cleaning in a viewer: from `acts`
    (`{(layer, component): [n_tokens, d]}`, those a one-pass run projected, steered or not), else from a
    prefill of the record."""
    dims = candidate_dims(calibration, "all")
    n = record.prompt_end
    if acts is None:
        ids = torch.tensor([record.token_ids], device=backend.device)
        caps = {l: CaptureHook(backend.model, get_hook_path(l, target.component)) for l in target.vectors}
        with ExitStack() as stack, torch.inference_mode():
            for c in caps.values():
                stack.enter_context(c)
            backend.model(ids)
        acts = {(l, target.component): c.get()[0] for l, c in caps.items()}
    top = calibration["aggregate"]["top_dims_by_layer"]
    data = {"dims": {str(l): top[str(l)] for l in target.vectors}, "all_candidates": dims,
            "top5_3layers": candidate_dims(calibration, "top5-3layers"), "prompt": {}, "response": {}, "vector": {}}
    for l in target.vectors:
        at_dims = acts[(l, target.component)][:, dims].float()
        data["prompt"][str(l)] = {str(d): [round(float(x), 4) for x in at_dims[:n, i]] for i, d in enumerate(dims)}
        data["response"][str(l)] = {str(d): [round(float(x), 4) for x in at_dims[n:, i]] for i, d in enumerate(dims)}
        v = unit(target.vectors[l], f"the vector of layer {l}")
        data["vector"][str(l)] = {str(d): round(float(v[d]), 6) for d in dims}
    return data


def run_massive(experiment: str | Experiment, prompt_set: str = "neutral", per_token: bool = False,
                variant: str | None = None, backend: LocalBackend | None = None) -> dict:
    """A deliberate massive-dim calibration: prefill every prompt of `prompt_set` (default: the 50 shipped
    neutral prompts) and write `massive_activations/{prompt_set}.json`; `per_token` adds each prompt's
    per-token values at the candidate dims, for every layer."""
    exp = experiment if isinstance(experiment, Experiment) else Experiment.named(experiment)
    mv = get_model_variant(exp, variant, mode="application")
    if backend is None:
        backend = LocalBackend.from_experiment(exp, mv.name)
    ps = load_prompt_set(prompt_set)
    path = exp.massive_activations_path(mv.name, ps.name)
    path.unlink(missing_ok=True)  # a deliberate run starts over
    collector = MassiveDimCollector(backend.model, path, target_tokens=10**12, info={
        "experiment": exp.name, "model": mv.label, "model_variant": mv.name, "prompt_set": ps.name,
        "source": "deliberate"})
    texts = [backend.format(p.text, ps.system_prompt) for p in ps.prompts]
    collector.register()
    try:
        for text in texts:
            ids, mask = tokenize_batch(backend.tokenizer, [text])
            with torch.inference_mode():
                backend.model(ids.to(backend.device), attention_mask=mask.to(backend.device))
    finally:
        report = collector.finalize()
    if report is None:
        raise ConfigError(f"prompt set {ps.name!r} has under 100 tokens; too few to calibrate")
    if per_token:
        dims = candidate_dims(report, "all")
        layers = list(range(backend.n_layers))
        rows = []
        for prompt, text in zip(ps.prompts, texts):
            ids, _ = tokenize_batch(backend.tokenizer, [text])
            caps = [CaptureHook(backend.model, get_hook_path(l)) for l in layers]
            with ExitStack() as stack, torch.inference_mode():
                for c in caps:
                    stack.enter_context(c)
                backend.model(ids.to(backend.device))
            rows.append({"prompt_id": prompt.id, "tokens": token_strings(backend.tokenizer, ids[0].tolist()),
                         "values": {str(l): {str(d): [round(float(x), 2) for x in c.get()[0][:, d]] for d in dims}
                                    for l, c in zip(layers, caps)}})
        report["per_token"] = rows
        write_json(path, report)
    return report
