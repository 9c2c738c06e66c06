"""Monitoring: per-token projections of a prompt set's responses onto selected trait vectors.

Everything goes through a `tracelens.serving.protocol.Backend`, so the model here (`LocalBackend`) and a
running `tracelens server` (`RemoteBackend`) monitor alike. Stage 1 generates one `ResponseRecord` per
prompt; stage 2 reads the activations of prompt + response at the monitored layers in one forward
(`forward_with_capture`), projects them onto each trait's unit vectors and writes one `ProjectionRecord`
per prompt and trait. Finished prompts are skipped on re-runs. The first run also calibrates massive dims
from the residuals of every layer at the prompts' tokens (`MassiveDimStats`, until `target_tokens`) and,
once a calibration exists, each record carries the activations at the candidate dims so a viewer can
clean projections. `one_pass=True` instead takes the activations in the generating call (steering
allowed; `generate_with_capture` reads them under the generation's steering), so a steered generation is
monitored in the same call: projections and the massive-dim activations kept for cleaning are both read
after the steering.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from tracelens.serving.backends import CaptureSpec, GenerationConfig, LocalBackend, SteeringSpec
from tracelens.serving.protocol import Backend
from tracelens.model.edits import project, unit
from tracelens.errors import ConfigError
from tracelens.store import Experiment, get_model_variant
from tracelens.pipeline.extraction import parse_layers
from tracelens.model.hooks import CaptureHook
from tracelens.model.massive import MassiveDimCollector, MassiveDimStats, candidate_dims
from tracelens.datasets.prompt_sets import PromptSet, load_prompt_set
from tracelens.model.prompts import token_strings, tokenize_batch
from tracelens.pipeline.selection import select_vector
from tracelens.model.sites import get_hook_path
from tracelens.types import ModelVariant, ProjectionEntry, ProjectionRecord, ResponseRecord


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
                   variant: str | None = None, backend: Backend | None = None,
                   steering: Sequence[SteeringSpec] | None = None,
                   response_backend: Backend | None = None) -> dict[str, int]:
    """Responses and projections for every prompt of `prompt_set`; returns counts of what was written.

    `response_backend` (e.g. a `VLLMBackend`, text generation only) writes the missing response records first
    and is then shut down; projections run on `backend`. Calibration reads the prompts of the responses stage 1
    generates, so it does not happen for records written that way (run `tracelens massive` instead).
    """
    config = config or MonitorConfig()
    exp = Experiment.of(experiment)
    mv = get_model_variant(exp, variant, mode="application")
    if response_backend is not None:
        _responses_from(response_backend, exp, mv, load_prompt_set(prompt_set), config)
    if backend is None:
        backend = LocalBackend.from_experiment(exp, mv.name)
    if steering and not config.one_pass:
        raise ConfigError("steering while monitoring needs one_pass=True (projections recorded during generation)")
    ps = load_prompt_set(prompt_set)
    written = {"responses": 0, "projections": 0}
    targets = {t: _vector_targets(exp, t, backend.n_layers, config.layers) for t in traits}
    stats = MassiveDimStats(backend.n_layers, backend.hidden_dim, exp.massive_activations_path(mv.name),
                            config.target_tokens,
                            info={"experiment": exp.name, "model": mv.label, "model_variant": mv.name})
    calibrating = config.calibrate and not stats.should_skip()
    records, one_pass_acts = {}, {}
    try:  # stage 1: responses (their prompts' residuals calibrate the massive dims)
        for prompt in ps.prompts:
            pending = [t for t in traits if not exp.has_projection(mv.name, t, ps.name, prompt.id)]
            # One pass: a projection comes from the pass that generated its response, so a prompt with a
            # missing projection is generated again (its response record rewritten).
            if exp.has_response_record(mv.name, ps.name, prompt.id) and not (config.one_pass and pending):
                if pending:
                    records[prompt.id] = exp.response_record(mv.name, ps.name, prompt.id)
                continue
            calibrate_now = calibrating and not stats.should_skip()
            capture = _capture_spec(targets.values(), all_layers=calibrate_now) if (
                config.one_pass or calibrate_now) else None
            record, acts = _generate(backend, prompt.text, ps.system_prompt, config, mv.label,
                                     steering if config.one_pass else None, capture)
            if calibrate_now:
                stats.observe({l: acts[(l, "residual")][:record.prompt_end] for l in range(backend.n_layers)})
            if config.one_pass:
                one_pass_acts[prompt.id] = acts
            exp.write_response_record(mv.name, ps.name, prompt.id, record)
            written["responses"] += 1
            records[prompt.id] = record
    finally:
        if calibrating:
            stats.finalize()
    written["projections"] = _write_projections(exp, mv, ps.name, backend, records, targets, one_pass_acts)
    return written


def _responses_from(response_backend: Backend, exp: Experiment, mv: ModelVariant, ps: PromptSet,
                    config: MonitorConfig) -> None:
    """Write the prompt set's missing response records with `response_backend` (text only), then shut it down."""
    if config.one_pass:
        raise ConfigError("one_pass monitoring records projections while generating; it needs the local model")
    todo = [p for p in ps.prompts if not exp.has_response_record(mv.name, ps.name, p.id)]
    if todo:
        results = response_backend.generate_results(
            [p.text for p in todo], GenerationConfig(max_new_tokens=config.max_new_tokens),
            system_prompts=[ps.system_prompt] * len(todo))
        for p, r in zip(todo, results):
            record = _record(response_backend, p.text, ps.system_prompt, r.prompt_token_ids, r.response_token_ids,
                             r.response_text, mv.label)
            exp.write_response_record(mv.name, ps.name, p.id, record)
    if hasattr(response_backend, "shutdown"):
        response_backend.shutdown()


def _write_projections(exp: Experiment, mv: ModelVariant, prompt_set: str, backend: Backend,
                       records: dict, targets: dict, one_pass_acts: dict) -> int:
    """Each record's missing projections, from its one-pass activations or else a prefill of the record;
    returns how many were written."""
    calibration = exp.massive_activations(mv.name)
    written = 0
    for prompt_id, record in records.items():
        todo = [t for t in targets if not exp.has_projection(mv.name, t, prompt_set, prompt_id)]
        if not todo:
            continue
        acts = one_pass_acts.get(prompt_id)
        if acts is None:
            capture = _capture_spec([targets[t] for t in todo])
            by_layer = backend.forward_with_capture(torch.tensor([record.token_ids]), None, capture)
            acts = {(l, c): a[0] for l, comps in by_layer.items() for c, a in comps.items()}
        for trait in todo:
            rec = _project(record, targets[trait], acts)
            rec.prompt_id, rec.prompt_set = prompt_id, prompt_set
            if calibration is not None:
                rec.massive_dim_data = _massive_dim_data(record, targets[trait], calibration, acts)
            exp.write_projection(mv.name, trait, rec)
            written += 1
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
    where = (trait, variant, best.position, best.component, best.method)
    meta = exp.vector_metadata(*where)
    return _Target(best.method, best.source, best.position, best.component,
                   {l: exp.vector(*where, l) for l in layers}, {l: meta.threshold(l) for l in layers})


def _capture_spec(targets, all_layers: bool = False) -> CaptureSpec:
    """What to read for `targets`: their layers (every layer with `all_layers`, residual included, for a
    calibration) at their components."""
    targets = list(targets)
    components = sorted({t.component for t in targets} | ({"residual"} if all_layers else set()))
    layers = None if all_layers else sorted({l for t in targets for l in t.vectors})
    return CaptureSpec(layers, tuple(components))


def _generate(backend: Backend, text: str, system_prompt, config: MonitorConfig, model_id: str,
              steering: Sequence[SteeringSpec] | None, capture: CaptureSpec | None
              ) -> tuple[ResponseRecord, dict[tuple[int, str], torch.Tensor] | None]:
    """The response record of one prompt and, with `capture`, its activations `{(layer, component): [n_tokens, d]}`
    over prompt + response, read after `steering` (a teacher-forced pass under the generation's steering)."""
    gen = GenerationConfig(max_new_tokens=config.max_new_tokens)
    if capture is None:
        [r] = backend.generate_results([text], gen, steering, [system_prompt])
        acts = None
    else:
        [r] = backend.generate_with_capture([text], gen, capture, steering, [system_prompt])
        acts = {(l, c): torch.cat([a, r.response_activations[l][c]]) for l, comps in r.prompt_activations.items()
                for c, a in comps.items()}
    return _record(backend, text, system_prompt, r.prompt_token_ids, r.response_token_ids, r.response_text,
                   model_id), acts


def _record(backend: Backend, text, system_prompt, prompt_ids, response_ids, response_text, model_id) -> ResponseRecord:
    ids = list(prompt_ids) + list(response_ids)
    return ResponseRecord(prompt=text, response=response_text, tokens=backend.token_texts(ids),
                          token_ids=ids, prompt_end=len(prompt_ids), inference_model=model_id,
                          capture_date=_now(), system_prompt=system_prompt)


def _project(record: ResponseRecord, target: _Target, acts: dict[tuple[int, str], torch.Tensor]) -> ProjectionRecord:
    """Per-token projections of one record onto the target's unit vectors, from `acts`
    (`{(layer, component): [n_tokens, d]}`, the record's tokens in order)."""
    n = record.prompt_end
    entries = []
    for l, v in target.vectors.items():
        h = acts[(l, target.component)]
        s = project(h, unit(v, f"the vector of layer {l}").to(h.device)).cpu()
        norms = h.float().norm(dim=-1).cpu()
        entries.append(ProjectionEntry.build(target.method, l, target.source, target.baselines[l], s[:n].tolist(),
                                             s[n:].tolist(), norms[:n].tolist(), norms[n:].tolist()))
    return ProjectionRecord(prompt_id=0, prompt_set="", n_prompt_tokens=n, n_response_tokens=len(entries[0].response),
                            projections=entries, component=target.component, position=target.position,
                            projection_date=_now())


def _massive_dim_data(record: ResponseRecord, target: _Target, calibration: dict,
                      acts: dict[tuple[int, str], torch.Tensor]) -> dict:
    """Activations at the candidate massive dims per projected layer, for cleaning in a viewer, from the
    activations the projections came from (`{(layer, component): [n_tokens, d]}`, steered in a one-pass run)."""
    dims = candidate_dims(calibration, "all")
    n = record.prompt_end
    top = calibration["aggregate"]["top_dims_by_layer"]
    data = {"dims": {str(l): top[str(l)] for l in target.vectors}, "all_candidates": dims,
            "top5_3layers": candidate_dims(calibration, "top5-3layers"), "prompt": {}, "response": {}, "vector": {}}
    for l in target.vectors:
        at_dims = acts[(l, target.component)][:, dims].float().cpu()
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
    exp = Experiment.of(experiment)
    mv = get_model_variant(exp, variant, mode="application")
    if backend is None:
        backend = LocalBackend.from_experiment(exp, mv.name)
    ps = load_prompt_set(prompt_set)
    exp.remove_massive_activations(mv.name, ps.name)  # a deliberate run starts over
    path = exp.massive_activations_path(mv.name, ps.name)  # where the collector writes
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
        exp.write_massive_activations(mv.name, ps.name, report)
    return report
