"""The `Backend` protocol: every backend states all of it; the steering evaluation and monitoring give exactly the
same results through a `tracelens server` (RemoteBackend on loopback) as through LocalBackend on the same model;
the wire's new requests (rows, teacher-forced log-probabilities, token ids and texts) are validated with 400s."""

import inspect
import json
import shutil
import urllib.error
import urllib.request

import pytest
import torch
from test_steering_eval import FixedJudge

from tracelens.errors import BackendError
from tracelens.store import Experiment
from tracelens.pipeline.extraction import ExtractionConfig, run_extraction
from tracelens.pipeline.monitoring import MonitorConfig, run_monitoring
from tracelens.pipeline.steering_eval import SteeringEvalConfig, run_steering_eval
from tracelens.serving.backends import GenerationConfig, LocalBackend, SteeringSpec
from tracelens.serving.client import RemoteBackend
from tracelens.serving.protocol import Backend
from tracelens.serving.codec import encode_tensor
from tracelens.app.server import ModelServer
from tracelens.serving.tl_vllm_backend import TLVLLMBackend
from tracelens.serving.vllm_backend import VLLMBackend

TRAIT = "starter/optimism"
MEMBERS = sorted(n for n in vars(Backend) if not n.startswith("_"))


def missing_members(cls) -> list[str]:
    """Protocol members `cls` lacks, or whose method does not take the protocol method's parameters."""
    out = []
    for name in MEMBERS:
        if not hasattr(cls, name):
            out.append(name)
            continue
        want = getattr(Backend, name)
        if inspect.isfunction(want):
            have = inspect.signature(getattr(cls, name)).parameters
            if any(p not in have for p in inspect.signature(want).parameters):
                out.append(name)
    return out


@pytest.mark.parametrize("cls", [LocalBackend, RemoteBackend, VLLMBackend, TLVLLMBackend])
def test_every_backend_states_the_whole_protocol(cls):
    assert MEMBERS and missing_members(cls) == []


def test_the_conformance_check_catches_a_missing_or_narrower_method():
    class Narrow(LocalBackend):
        def response_logprobs(self, prompt_ids, response_ids):
            raise NotImplementedError

    assert missing_members(type("Bare", (), {})) == MEMBERS
    assert missing_members(Narrow) == ["response_logprobs"]


@pytest.fixture(scope="module")
def experiments(tmp_path_factory, tiny_llama):
    """Two copies of one extracted experiment (one per backend), and a server on loopback for the model."""
    roots = [tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("remote")]
    exp = Experiment.named("proto", roots[0])
    exp.write_config({"base": {"model": "tiny"}}, {"extraction": "base", "application": "base"})
    local = LocalBackend.from_model(tiny_llama.model)
    run_extraction(exp, [TRAIT], ExtractionConfig(methods=("probe",), max_new_tokens=3, limit=12), backend=local)
    shutil.copytree(roots[0] / "proto", roots[1] / "proto")
    server = ModelServer(LocalBackend.from_model(tiny_llama.model), "proto", port=0, verbose=False,
                         experiments_root=roots[1]).start()
    yield (Experiment.named("proto", roots[0]), local), (Experiment.named("proto", roots[1]), RemoteBackend(server.url))
    server.close()


def _undated(obj):
    """`obj` without its timestamps (keys naming a date or time), which differ between runs."""
    if isinstance(obj, dict):
        return {k: _undated(v) for k, v in obj.items() if "date" not in k and "timestamp" not in k}
    if isinstance(obj, list):
        return [_undated(v) for v in obj]
    return obj


def _files(root, pattern):
    return {str(p.relative_to(root)): _undated([json.loads(line) for line in p.read_text().splitlines()]
                                               if p.suffix == ".jsonl" else json.loads(p.read_text()))
            for p in sorted(root.rglob(pattern))}


def test_the_steering_evaluation_through_a_server_equals_it_on_the_local_model(experiments):
    config = SteeringEvalConfig(layers=[0, 1], n_coefficients=2, n_search=2, n_report=2, max_new_tokens=3, n_neutral=2)
    results = [run_steering_eval(exp, TRAIT, FixedJudge(), config, backend=b) for exp, b in experiments]
    assert results[0].runs and results[0].report is not None
    written = [_files(exp.root / "proto", "results.jsonl") for exp, _ in experiments]
    assert written[0] and written[0] == written[1]
    for run in results[0].runs:
        assert run.judge_free["kl"]["value"] >= 0
    assert max(run.judge_free["kl"]["value"] for run in results[0].runs) > 0  # the grid's top end moves the model


def test_monitoring_through_a_server_equals_it_on_the_local_model(experiments, tmp_path):
    prompts = tmp_path / "long.json"
    text = "Please describe, in a few careful sentences, what you would pack for a long weekend trip to the sea."
    prompts.write_text(json.dumps({"name": "long", "description": "d",
                                   "prompts": [{"id": i, "text": f"{i}. {text}"} for i in range(6)]}))
    v = torch.randn(experiments[0][1].hidden_dim, generator=torch.Generator().manual_seed(5))
    for exp, b in experiments:  # calibrates on the first prompts, then records carry massive-dim data
        assert run_monitoring(exp, str(prompts), [TRAIT], MonitorConfig(layers="best,best+1", max_new_tokens=4,
                                                                         target_tokens=100), backend=b)["projections"] == 6
        run_monitoring(exp, str(prompts), [TRAIT], MonitorConfig(layers="best", max_new_tokens=4, calibrate=False,
                                                                 one_pass=True), variant=None, backend=b,
                       steering=[SteeringSpec(layer=0, vector=v, coefficient=3.0)])
    written = [_files(exp.root / "proto", "*.json") for exp, _ in experiments]
    assert any("massive_dim_data" in d for d in written[0].values() if isinstance(d, dict))
    assert written[0] == written[1]


def test_response_logprobs_and_token_facts_agree_across_the_wire(experiments):
    (_, local), (_, remote) = experiments
    spec = [SteeringSpec(layer=1, vector=torch.ones(local.hidden_dim), coefficient=2.0)]
    prompts, responses = [[5, 6, 7], [9]], [[3, 4], [10, 11, 12]]
    for steering, kl in ((None, False), (spec, True)):
        a, b = local.response_logprobs(prompts, responses, steering, kl=kl), remote.response_logprobs(
            prompts, responses, steering, kl=kl)
        assert all(torch.equal(x, y) for x, y in zip(a.logprobs, b.logprobs))
        assert (a.kl is None and b.kl is None) if not kl else all(torch.equal(x, y) for x, y in zip(a.kl, b.kl))
    assert remote.prompt_token_ids(["hi", "yo"], ["be brief", None]) == local.prompt_token_ids(["hi", "yo"],
                                                                                               ["be brief", None])
    assert remote.token_texts([5, 6, 7]) == local.token_texts([5, 6, 7])
    texts = ["An answer.", " leading space", "x"]
    assert remote.text_token_ids(texts) == local.text_token_ids(texts) == [
        local.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    assert (remote.n_layers, remote.hidden_dim) == (local.n_layers, local.hidden_dim)
    with pytest.raises(ValueError, match="positions 'all', no rows"):
        local.response_logprobs(prompts, responses, [SteeringSpec(layer=1, vector=torch.ones(local.hidden_dim), rows=(0, 1))])


def test_rows_on_the_wire_steer_only_those_prompts(experiments):
    (_, local), (_, remote) = experiments
    v = torch.randn(local.hidden_dim, generator=torch.Generator().manual_seed(1)) * 8
    questions, cfg = ["Hi there", "Tell me a story.", "What is two plus two?"], GenerationConfig(max_new_tokens=4)
    steering = [SteeringSpec(layer=0, vector=v, coefficient=2.0, rows=(1, 3))]
    assert remote.generate(questions, cfg, steering) == local.generate(questions, cfg, steering)
    alone = local.generate(questions[:1], cfg)
    assert remote.generate(questions, cfg, steering)[0] == alone[0]  # row 0 unsteered


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize("path, body, reason", [
    ("/generate", {"prompts": ["a", "b"], "steering": [{"layer": 0, "vector": [0.0] * 64, "rows": [1, 3]}]},
     "rows must lie within"),
    ("/generate", {"prompts": ["a"], "steering": [{"layer": 0, "vector": [0.0] * 64, "rows": [0]}]}, "rows must be"),
    ("/response_logprobs", {"prompt_ids": [[1]], "response_ids": [[2]],
                            "steering": [{"layer": 0, "vector": [0.0] * 64, "rows": [0, 1]}]}, "unknown field(s): rows"),
    ("/response_logprobs", {"prompt_ids": [[1]], "response_ids": [[2]],
                            "steering": [{"layer": 0, "vector": [0.0] * 64, "positions": "response"}]},
     "steering must have positions 'all'"),
    ("/response_logprobs", {"prompt_ids": [[1], [2]], "response_ids": [[2]]}, "one row per prompt_ids row"),
    ("/response_logprobs", {"prompt_ids": [[]], "response_ids": [[2]]}, "non-empty list of integer token ids"),
    ("/response_logprobs", {"prompt_ids": [[1]], "response_ids": [[10**6]]}, "inside [0, "),
    ("/response_logprobs", {"prompt_ids": [[1]], "response_ids": [[2]], "kl": "yes"}, "kl must be"),
    ("/response_logprobs", {"prompt_ids": [1], "response_ids": [[2]]}, "non-empty list of integer token ids"),
    ("/token_texts", {"token_ids": ["a"]}, "non-empty list of integer token ids"),
    ("/text_token_ids", {"texts": "one string"}, "texts must be a list of 1 to"),
    ("/prompt_token_ids", {"prompts": ["a"], "system_prompts": []}, "system_prompts"),
])
def test_malformed_protocol_requests_get_400_with_the_reason(experiments, path, body, reason):
    url = experiments[1][1].url
    if body.get("steering"):
        for entry in body["steering"]:
            entry["vector"] = encode_tensor(torch.zeros(experiments[0][1].hidden_dim))
    status, answer = _post(url + path, body)
    assert status == 400 and reason in answer["error"]


def test_vllm_refuses_what_it_cannot_do_with_a_backend_error():
    b = VLLMBackend.__new__(VLLMBackend)  # no engine needed: these refuse before touching it
    with pytest.raises(BackendError, match="cannot report the model's layers"):
        b.n_layers
    with pytest.raises(BackendError, match="cannot score"):
        b.response_logprobs([[1]], [[2]])
