"""Monitoring on a tiny model: records, exact normalized scores, equality with capture-then-project, skips."""

import json

import pytest
import torch

from tracelens import get_hook_path
from tracelens.serving.backends import LocalBackend, SteeringSpec
from tracelens.store import Experiment
from tracelens.pipeline.extraction import ExtractionConfig, run_extraction
from tracelens.model.hooks import CaptureHook
from tracelens.pipeline.monitoring import MonitorConfig, run_monitoring
from tracelens.types import ProjectionRecord, ResponseRecord

TRAIT = "starter/optimism"


@pytest.fixture
def setup(tmp_path, tiny):
    exp = Experiment.named("mon", tmp_path)
    exp.write_config({"base": {"model": "tiny"}}, {"extraction": "base", "application": "base"})
    backend = LocalBackend.from_model(tiny.model)
    run_extraction(exp, [TRAIT], ExtractionConfig(methods=("probe",), max_new_tokens=3, limit=12),
                   backend=backend)
    prompts = tmp_path / "mini.json"
    prompts.write_text(json.dumps({"name": "mini", "description": "three prompts",
                                   "prompts": [{"id": i, "text": t} for i, t in enumerate(
                                       ["How are you?", "Tell me about the sea.", "What is two plus two?"])]}))
    return exp, backend, str(prompts)


def test_projection_records_equal_capture_then_project_and_reruns_skip(setup):
    exp, backend, prompt_set = setup
    config = MonitorConfig(layers="best", max_new_tokens=4, calibrate=False)
    assert run_monitoring(exp, prompt_set, [TRAIT], config, backend=backend) == {"responses": 3, "projections": 3}
    assert run_monitoring(exp, prompt_set, [TRAIT], config, backend=backend) == {"responses": 0, "projections": 0}
    rec = ResponseRecord.from_dict(json.loads(exp.inference_response_path("base", "mini", 1).read_text()))
    proj = ProjectionRecord.from_dict(json.loads(exp.projection_path("base", TRAIT, "mini", 1).read_text()))
    entry = proj.projections[0]
    v = exp.vector(TRAIT, "base", "response[:]", "residual", entry.method, entry.layer)
    with CaptureHook(backend.model, get_hook_path(entry.layer)) as cap, torch.no_grad():
        backend.model(torch.tensor([rec.token_ids]))
    h = cap.get()[0]
    by_hand = h @ (v / v.norm())
    n = rec.prompt_end
    assert proj.n_prompt_tokens == n and proj.n_response_tokens == len(rec.token_ids) - n
    assert entry.prompt == pytest.approx(by_hand[:n].tolist(), abs=1e-4)
    assert entry.response == pytest.approx(by_hand[n:].tolist(), abs=1e-4)
    norms = h.norm(dim=-1)
    assert entry.normalized_response == pytest.approx((by_hand[n:] / norms[n:].mean()).tolist(), abs=1e-4)


def test_first_run_calibrates_and_later_records_carry_massive_dim_data(setup, tmp_path):
    exp, backend, _ = setup
    long_set = tmp_path / "long.json"
    text = "Please describe, in a few careful sentences, what you would pack for a long weekend trip to the sea."
    long_set.write_text(json.dumps({"name": "long", "description": "d",
                                    "prompts": [{"id": i, "text": f"{i}. {text}"} for i in range(6)]}))
    config = MonitorConfig(layers="best", max_new_tokens=3, target_tokens=100)
    run_monitoring(exp, str(long_set), [TRAIT], config, backend=backend)
    calibration = json.loads(exp.massive_activations_path("base").read_text())
    assert 100 <= calibration["aggregate"]["tokens_seen"]
    record = json.loads(exp.projection_path("base", TRAIT, "long", 0).read_text())
    data = record["massive_dim_data"]
    layer = str(record["projections"][0]["layer"])
    assert set(data["prompt"][layer]) == {str(d) for d in data["all_candidates"]}
    assert len(data["response"][layer][str(data["all_candidates"][0])]) == record["metadata"]["n_response_tokens"]


def test_one_pass_monitors_a_steered_generation(setup):
    exp, backend, prompt_set = setup
    v = torch.ones(backend.hidden_dim) / backend.hidden_dim**0.5
    config = MonitorConfig(layers="best", max_new_tokens=5, calibrate=False, one_pass=True)
    run_monitoring(exp, prompt_set, [TRAIT], config, backend=backend, steering=[SteeringSpec(layer=0, vector=v, coefficient=2.0)])
    rec = ResponseRecord.from_dict(json.loads(exp.inference_response_path("base", "mini", 0).read_text()))
    proj = ProjectionRecord.from_dict(json.loads(exp.projection_path("base", TRAIT, "mini", 0).read_text()))
    assert proj.n_response_tokens == len(rec.token_ids) - rec.prompt_end
    with pytest.raises(ValueError, match="needs one_pass=True"):
        run_monitoring(exp, prompt_set, [TRAIT], MonitorConfig(), backend=backend, steering=[SteeringSpec(layer=0, vector=v, coefficient=2.0)])


def test_a_response_backend_writes_the_records_then_projections_run_locally(setup):
    exp, backend, prompt_set = setup

    class Responder(LocalBackend):
        shut = 0

        def shutdown(self):
            Responder.shut += 1

    config = MonitorConfig(layers="best", max_new_tokens=4, calibrate=False)
    written = run_monitoring(exp, prompt_set, [TRAIT], config, backend=backend,
                             response_backend=Responder.from_model(backend.model))
    assert written == {"responses": 0, "projections": 3} and Responder.shut == 1  # records came from the responder
    assert exp.inference_response_path("base", "mini", 2).is_file()
    with pytest.raises(ValueError, match="needs the local model"):
        run_monitoring(exp, prompt_set, [TRAIT], MonitorConfig(one_pass=True), backend=backend,
                       response_backend=Responder.from_model(backend.model))


def test_one_pass_projections_and_cleaning_data_are_read_after_the_steering(setup):
    """Steering at the monitored layer: the recorded projections and the massive-dim activations kept for
    cleaning both equal those of the steered generation, not of an unsteered prefill."""
    from tracelens.model.cleaning import clean_scores
    from tracelens.model.hooks import SteeringHook
    from tracelens.model.massive import MassiveDimCollector
    from tracelens.model.prompts import tokenize_batch
    from tracelens.pipeline.selection import select_vector

    exp, backend, prompt_set = setup
    m = backend.model
    collector = MassiveDimCollector(m, exp.massive_activations_path("base"), target_tokens=100)
    collector.register()
    for text in ["Tell me a long story about the sea, the wind and the boats that sail on it."] * 8:
        ids, mask = tokenize_batch(backend.tokenizer, [backend.format(text)])
        with torch.no_grad():
            m(ids, attention_mask=mask)
    assert collector.finalize() is not None
    layer = select_vector(exp, TRAIT).layer
    steer = SteeringSpec(layer=layer, vector=torch.randn(backend.hidden_dim, generator=torch.Generator().manual_seed(3)), coefficient=4.0)
    config = MonitorConfig(layers="best", max_new_tokens=5, calibrate=False, one_pass=True)
    run_monitoring(exp, prompt_set, [TRAIT], config, backend=backend, steering=[steer])

    rec = ResponseRecord.from_dict(json.loads(exp.inference_response_path("base", "mini", 0).read_text()))
    out = json.loads(exp.projection_path("base", TRAIT, "mini", 0).read_text())
    [entry] = ProjectionRecord.from_dict(out).projections
    assert entry.layer == layer
    site, ids = get_hook_path(layer), torch.tensor([rec.token_ids])
    with SteeringHook(m, steer.vector, site, 4.0), CaptureHook(m, site) as cap, torch.no_grad():
        m(ids)  # a prefill under the same steering, the capture inside it
    steered = cap.get()[0]
    with CaptureHook(m, site) as cap, torch.no_grad():
        m(ids)
    unsteered = cap.get()[0]
    v = exp.vector(TRAIT, "base", "response[:]", "residual", entry.method, layer)
    n, unit = rec.prompt_end, v / v.norm()
    assert entry.response == pytest.approx((steered[n:] @ unit).tolist(), abs=1e-4)
    assert entry.response != pytest.approx((unsteered[n:] @ unit).tolist(), abs=1e-2)

    data = out["massive_dim_data"]
    dims = data["all_candidates"]
    kept = torch.tensor([data["response"][str(layer)][str(d)] for d in dims]).T  # [n_response, n_dims]
    assert torch.allclose(kept, steered[n:, dims], atol=1e-4)
    assert not torch.allclose(kept, unsteered[n:, dims], atol=1e-2)
    cleaned = clean_scores(entry.response, data["response"][str(layer)], data["vector"][str(layer)], dims)
    zeroed = steered[n:].clone()
    zeroed[:, dims] = 0
    assert cleaned == pytest.approx((zeroed @ unit).tolist(), abs=1e-3)


def test_a_lora_variant_runs_with_its_adapter_merged(tmp_path):
    """A pipeline stage loading the variant itself gets the adapted model, and records it as such."""
    from tracelens.model.loading import load_model
    from tracelens.pipeline.monitoring import run_massive
    from tracelens.testing import make_tokenizer, save_tiny_lora, tiny_hf_model

    folder = tmp_path / "tiny-llama"
    hf = tiny_hf_model("llama")
    hf.save_pretrained(folder)
    make_tokenizer(bos=True).save_pretrained(folder)
    adapter = save_tiny_lora(hf, tmp_path / "adapter")
    exp = Experiment.named("lora", tmp_path / "experiments")
    exp.write_config({"base": {"model": str(folder)}, "tuned": {"model": str(folder), "lora": str(adapter)}},
                     use_chat_template=False)
    prompts = tmp_path / "mini.json"  # over the 100 tokens a calibration needs
    prompts.write_text(json.dumps({"name": "mini", "description": "two long prompts", "prompts": [
        {"id": i, "text": " ".join([t] * 8)} for i, t in enumerate(["The sun is shining today.", "How are you?"])]}))
    base, tuned = run_massive(exp, str(prompts), variant="base"), run_massive(exp, str(prompts), variant="tuned")
    by_hand = run_massive(exp, str(prompts), variant="tuned", backend=LocalBackend.from_model(
        load_model(folder, lora=adapter, device="cpu"), use_chat_template=False))
    assert (base["model"], tuned["model"]) == (str(folder), f"{folder} + LoRA {adapter}")
    assert tuned["_state"] == by_hand["_state"] and tuned["_state"]["sums"] != base["_state"]["sums"]
