"""VLLMBackend against a stand-in for vLLM's public `LLM.generate` contract (vLLM is optional).

The last test runs a real engine and is skipped unless both vLLM and a CUDA GPU are present."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from types import SimpleNamespace

import pytest
import torch

from tracelens.errors import BackendError
from tracelens.serving.backends import CaptureSpec, GenerationConfig, SteeringSpec
from tracelens.model.prompts import encode, format_prompt
from tracelens.testing import make_tokenizer
from tracelens.serving.vllm_backend import VLLMBackend, detect_quantization


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeLLM:
    """`vllm.LLM`'s public surface: `generate(prompts, sampling_params)` -> RequestOutput-likes with
    `request_id`, `prompt`, `prompt_token_ids` and `outputs=[CompletionOutput(text, token_ids)]`.
    Completions come back in a shuffled order (as if finished out of order); request ids keep
    counting across calls like vLLM's."""

    instances: list["FakeLLM"] = []

    def __init__(self, shuffle: bool = True, **kwargs):
        self.kwargs = kwargs
        self.shuffle = shuffle
        self.calls: list[tuple[list, FakeSamplingParams]] = []
        self.counter = 100  # not zero: request ids of later calls are not positions
        self.llm_engine = SimpleNamespace(shutdown_calls=0)
        self.llm_engine.shutdown = lambda: setattr(self.llm_engine, "shutdown_calls", self.llm_engine.shutdown_calls + 1)
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params):
        self.calls.append((list(prompts), sampling_params))
        outs = []
        for p in prompts:
            ids = list(p["prompt_token_ids"]) if isinstance(p, dict) else [ord(c) for c in p]
            n = sampling_params.kwargs["max_tokens"]
            response_ids = [(sum(ids) + k) % 50 + 1 for k in range(min(n, 3))]
            outs.append(SimpleNamespace(
                request_id=str(self.counter), prompt=None if isinstance(p, dict) else p, prompt_token_ids=ids,
                outputs=[SimpleNamespace(text=f" reply to {len(ids)} tokens ", token_ids=response_ids)],
            ))
            self.counter += 1
        if self.shuffle:
            random.Random(0).shuffle(outs)
        return outs


@pytest.fixture
def tok():
    return make_tokenizer()


def backend(tok, model_id="org/tiny-model", **kwargs) -> VLLMBackend:
    return VLLMBackend(model_id, tokenizer=tok, llm_factory=FakeLLM, sampling_params_cls=FakeSamplingParams, **kwargs)


PROMPTS = ["a", "a much longer prompt than the first", "mid length", "x y z", "the last one here"]


def test_results_come_back_in_input_order(tok):
    b = backend(tok)
    results = b.generate_results(PROMPTS, GenerationConfig(max_new_tokens=3))
    assert len(results) == len(PROMPTS)
    for p, r in zip(PROMPTS, results):
        formatted = format_prompt(tok, p)
        assert r.prompt_text == formatted
        assert r.prompt_token_ids == encode(tok, formatted)
        assert r.response_text == f"reply to {len(r.prompt_token_ids)} tokens"  # stripped, and its own
        assert r.response_token_ids == [(sum(r.prompt_token_ids) + k) % 50 + 1 for k in range(3)]
        assert r.prompt_tokens == tok.convert_ids_to_tokens(r.prompt_token_ids)
        assert r.prompt_activations == {} and r.response_activations == {}


def test_order_holds_on_a_second_call_and_for_generate(tok):
    b = backend(tok)
    b.generate(["warm up"])
    texts = [format_prompt(tok, p) for p in PROMPTS]
    out = b.generate(texts, GenerationConfig(max_new_tokens=2, temperature=0.0), formatted=True)
    assert out == [f"reply to {len(encode(tok, t))} tokens" for t in texts]


def test_prompts_are_sent_as_token_ids_without_a_second_bos(tok):
    b = backend(tok)
    b.generate_results(["hi"])
    (sent, _), = b.llm.calls
    ids = sent[0]["prompt_token_ids"]
    assert ids == encode(tok, format_prompt(tok, "hi"))
    assert ids.count(tok.bos_token_id) == 1


def test_sampling_params_mapping(tok):
    b = backend(tok, seed=7)
    b.generate(["p"], GenerationConfig(max_new_tokens=11, temperature=0.3))
    assert b.llm.calls[-1][1].kwargs == {"max_tokens": 11, "temperature": 0.3, "seed": 7}
    b.generate_results(["p"], GenerationConfig(max_new_tokens=5, temperature=0.0, seed=0, stop_token_ids=[3, 4]))
    assert b.llm.calls[-1][1].kwargs == {"max_tokens": 5, "temperature": 0.0, "seed": 0, "stop_token_ids": [3, 4]}


def test_system_prompts_go_through_the_template(tok):
    b = backend(tok)
    r = b.generate_results(["q1", "q2"], system_prompts=["be terse", None])
    assert r[0].prompt_text == format_prompt(tok, "q1", "be terse")
    assert r[1].prompt_text == format_prompt(tok, "q2")
    with pytest.raises(ValueError, match="system prompts"):
        b.generate_results(["q1", "q2"], system_prompts=["only one"])


def test_use_chat_template_false_sends_raw_text(tok):
    b = backend(tok, use_chat_template=False)
    assert b.generate_results(["plain"])[0].prompt_text == "plain"


def test_engine_gets_seed_and_passes_kwargs_through(tok):
    b = backend(tok, seed=3, tensor_parallel_size=4, gpu_memory_utilization=0.5, max_model_len=2048)
    assert b.llm.kwargs == {"model": "org/tiny-model", "seed": 3, "tensor_parallel_size": 4,
                            "gpu_memory_utilization": 0.5, "max_model_len": 2048}


@pytest.mark.parametrize("model_id, expected", [
    ("hugging-quants/Meta-Llama-3.3-70B-Instruct-AWQ-INT4", "awq"),
    ("TheBloke/Llama-2-7B-GPTQ", "gptq"),
    ("someone/model-gptq-4bit", "gptq"),
    ("google/gemma-2-2b-it", None),
])
def test_quantization_detected_from_the_id(tok, model_id, expected):
    assert detect_quantization(model_id) == expected
    b = backend(tok, model_id=model_id)
    assert b.llm.kwargs.get("quantization") == expected


def test_quantization_detected_from_a_local_config(tok, tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "GPTQ", "bits": 4}}))
    assert backend(tok, model_id=str(folder)).llm.kwargs["quantization"] == "gptq"
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "quantization" not in backend(tok, model_id=str(folder)).llm.kwargs


def test_explicit_quantization_wins(tok):
    b = backend(tok, model_id="org/model-AWQ", quantization="awq_marlin")
    assert b.llm.kwargs["quantization"] == "awq_marlin"


def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'tracelens\[vllm\]'"):
        VLLMBackend("org/tiny-model")


def test_steering_is_rejected(tok):
    b = backend(tok)
    with pytest.raises(BackendError, match="cannot steer"):
        b.generate_results(["p"], steering=[SteeringSpec(layer=0, vector=torch.zeros(4))])
    for refused in (lambda: b.n_layers, lambda: b.hidden_dim, lambda: b.generate_with_capture(["p"]),
                    lambda: b.forward_with_capture(torch.zeros(1, 2, dtype=torch.long), None, CaptureSpec()),
                    lambda: b.response_logprobs([[1]], [[2]])):
        with pytest.raises(BackendError, match="VLLMBackend cannot"):
            refused()
    assert b.llm.calls == []


def test_one_string_is_rejected(tok):
    with pytest.raises(TypeError):
        backend(tok).generate("not a list")


def test_count_and_ownership_are_checked(tok):
    b = backend(tok)
    real = b.llm.generate
    b.llm.generate = lambda prompts, params: real(prompts, params)[:-1]
    with pytest.raises(RuntimeError, match="outputs for"):
        b.generate(["a", "b"])

    def wrong(prompts, params):
        outs = real(prompts, params)
        for o in outs:
            o.request_id = None
            o.prompt_token_ids = [0]
        return outs

    b.llm.generate = wrong
    with pytest.raises(RuntimeError, match="does not belong"):
        b.generate(["a"])


def test_order_kept_without_request_ids(tok):
    b = backend(tok)
    b._llm = FakeLLM(shuffle=False)
    real = b.llm.generate

    def no_ids(prompts, params):
        outs = real(prompts, params)
        for o in outs:
            del o.request_id
        return outs

    b.llm.generate = no_ids
    texts = [format_prompt(tok, p) for p in PROMPTS]
    assert b.generate(texts, formatted=True) == [f"reply to {len(encode(tok, t))} tokens" for t in texts]


def test_empty_input(tok):
    b = backend(tok)
    assert b.generate([]) == [] and b.generate_results([]) == []
    assert b.llm.calls == []


def test_shutdown_is_idempotent(tok):
    b = backend(tok)
    engine = b.llm.llm_engine
    b.shutdown()
    b.shutdown()
    assert engine.shutdown_calls == 1
    with pytest.raises(RuntimeError, match="shut down"):
        b.generate(["p"])
    with backend(tok) as b2:
        b2.generate(["p"])
    with pytest.raises(RuntimeError, match="shut down"):
        b2.generate(["p"])


def test_works_as_the_extraction_stage_backend(tok, tmp_path):
    """`generate_responses` reads `use_chat_template`, may set `batch_size`, and stores token ids."""
    b = backend(tok)
    b.batch_size = 8
    gen = GenerationConfig(max_new_tokens=4, temperature=0.0, seed=0)
    results = b.generate_results(["p1", "p2"], gen, system_prompts=["s", None])
    assert b.use_chat_template is None
    rows = [{"prompt_token_ids": r.prompt_token_ids, "response_token_ids": r.response_token_ids} for r in results]
    json.dumps(rows)  # plain ints, storable


_HAS_VLLM = importlib.util.find_spec("vllm") is not None
_HAS_CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not (_HAS_VLLM and _HAS_CUDA), reason="needs vLLM installed AND a CUDA GPU (real engine)")
def test_real_vllm_engine_generates_in_order():
    model_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    b = VLLMBackend(model_id, seed=0, gpu_memory_utilization=0.3, max_model_len=512, enforce_eager=True)
    try:
        prompts = ["Count to three.", "Name a colour.", "Say hello."]
        results = b.generate_results(prompts, GenerationConfig(max_new_tokens=8, temperature=0.0))
        assert len(results) == 3
        for p, r in zip(prompts, results):
            assert p in r.prompt_text
            assert r.prompt_token_ids == encode(b.tokenizer, r.prompt_text)
            assert 0 < len(r.response_token_ids) <= 8
        texts = b.generate([r.prompt_text for r in results], GenerationConfig(max_new_tokens=8, temperature=0.0),
                           formatted=True)
        assert texts == [r.response_text for r in results]  # greedy: same prompts, same answers
    finally:
        b.shutdown()


def test_every_backend_formats_and_tokenizes_prompts_with_one_prompt_side():
    from tracelens.serving.backends import LocalBackend
    from tracelens.serving.prompting import PromptSide
    from tracelens.serving.tl_vllm_backend import TLVLLMBackend

    for name in ("format", "prompt_token_ids", "token_texts", "text_token_ids", "_texts"):
        assert (getattr(LocalBackend, name) is getattr(VLLMBackend, name) is getattr(TLVLLMBackend, name)
                is getattr(PromptSide, name)), name
