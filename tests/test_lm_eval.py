"""lm-evaluation-harness's `local-completions` model class against the model server on loopback, on tasks built
from local files: its log-likelihoods equal the plain HF model's, and its generations the same prompt's greedy
answer. lm-eval sends token-id prompts (batched lists of id lists, echo, logprobs) and, for generation, stop
strings, concurrently."""

import json

import lm_eval
import lm_eval.tasks
import pytest
import torch

from tracelens.app.server import ModelServer
from tracelens.model.generation import HookedGenerator
from tracelens.serving.backends import LocalBackend

DOCS = [{"question": "The weather is", "choices": ["warm", "cold and wet"], "label": 0},
        {"question": "Cats like to", "choices": ["sleep", "run", "eat fish"], "label": 2},
        {"question": "The moon is", "choices": ["bright", "far away"], "label": 1}]

TASKS = {
    "tiny_choice": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                    "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]},
    "tiny_generate": {"output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{choices[0]}}",
                      "generation_kwargs": {"until": ["."], "max_gen_toks": 6, "do_sample": False},
                      "metric_list": [{"metric": "exact_match"}]},
}


@pytest.fixture()
def task_dir(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, spec in TASKS.items():
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", **spec}
        (tmp_path / f"{name}.yaml").write_text(json.dumps(task))  # JSON is YAML
    return tmp_path


def test_lm_eval_local_completions_scores_and_generates_as_the_model_does(tiny_llama, task_dir, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tok_dir = tmp_path / "tokenizer"
    tiny_llama.tokenizer.save_pretrained(tok_dir)
    with ModelServer(LocalBackend.from_model(tiny_llama.model), port=0, verbose=False, model_id="tiny").start() as srv:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"model": "tiny", "base_url": srv.url + "/v1/completions", "tokenizer_backend": "huggingface",
                        "tokenizer": str(tok_dir), "batch_size": 2, "num_concurrent": 2, "max_retries": 1,
                        "max_length": 200},
            tasks=list(TASKS), task_manager=lm_eval.tasks.TaskManager(include_path=str(task_dir)),
            log_samples=True, bootstrap_iters=0)
    tok, ref = tiny_llama.tokenizer, tiny_llama.reference
    scored = out["samples"]["tiny_choice"]
    assert len(scored) == len(DOCS)
    for sample in scored:
        doc = sample["doc"]
        for choice, (ll, _greedy) in zip(doc["choices"], [r[0] for r in sample["resps"]]):
            context = tok(doc["question"], add_special_tokens=False).input_ids
            continuation = tok(" " + choice, add_special_tokens=False).input_ids
            ids = context + continuation
            with torch.no_grad():
                logp = ref(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            want = sum(float(logp[k - 1, ids[k]]) for k in range(len(context), len(ids)))
            assert ll == pytest.approx(want, abs=1e-4)
    generated = out["samples"]["tiny_generate"]
    assert len(generated) == len(DOCS)
    for sample in generated:
        ids = tok(sample["doc"]["question"], add_special_tokens=False).input_ids
        answer = HookedGenerator(tiny_llama.model).generate(torch.tensor([ids]), None, 6)[0]
        text = tok.decode(answer.token_ids, skip_special_tokens=True)
        assert sample["resps"][0][0] == text.split(".")[0]
