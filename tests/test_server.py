"""The model server and RemoteBackend: remote results equal local ones, validation, auth, concurrency, get_backend,
batching (each request's answer equals the request alone), and the OpenAI-compatible API through the real `openai`
client (answers equal local generation, streams join to the unstreamed answer, logprobs, OpenAI's error shape,
`OpenAIJudge` using the server as its judge)."""

import json
import math
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from conftest import _active_hooks, cached_tiny

from tracelens.serving.backends import CaptureSpec, GenerationConfig, LocalBackend, SteeringSpec
from tracelens.serving.client import RemoteBackend, ServerError, get_backend
from tracelens.store import Experiment
from tracelens.io import save_tensors
from tracelens.judges.openai import COHERENCE_SYSTEM, SCORE_USER, OpenAIJudge
from tracelens.model.prompts import encode, tokenize_batch
from tracelens.serving.codec import encode_tensor
from tracelens.app.server import ModelServer, serve
from tracelens.errors import ConfigError
from tracelens.model.generation import HookedGenerator
from tracelens.testing import make_tokenizer, tiny_hf_model

PROMPTS = ["What is the capital of France?", "Hi there", "Tell me something happy."]
CFG = GenerationConfig(max_new_tokens=5)
CAPTURE = CaptureSpec([0, 1], ["residual", "mlp_out"])


def _unit(d, seed):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


@pytest.fixture(scope="module")
def tiny():
    t = cached_tiny("llama")
    yield t
    assert not _active_hooks(t.model), "a test left hooks on the model"


@pytest.fixture(scope="module")
def local(tiny):
    return LocalBackend.from_model(tiny.model)


@pytest.fixture(scope="module")
def server(tiny):
    srv = ModelServer(LocalBackend.from_model(tiny.model), "exp", port=0, variant="instruct", verbose=False).start()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def remote(server):
    return RemoteBackend(server.url)


def _post(url, raw: bytes, headers=None):
    """(status, parsed JSON body) of a raw POST."""
    req = urllib.request.Request(url, data=raw, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def _get(url, headers=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def _assert_acts_equal(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    for layer in a:
        assert a[layer].keys() == b[layer].keys()
        for comp in a[layer]:
            assert a[layer][comp].shape == b[layer][comp].shape
            assert a[layer][comp].dtype == b[layer][comp].dtype
            assert (a[layer][comp].cpu().float() - b[layer][comp].cpu().float()).abs().max() <= tol


def _assert_results_equal(remote_results, local_results):
    assert len(remote_results) == len(local_results)
    for r, l in zip(remote_results, local_results):
        for f in ("prompt_text", "response_text", "prompt_tokens", "response_tokens", "prompt_token_ids",
                  "response_token_ids"):
            assert getattr(r, f) == getattr(l, f), f
        _assert_acts_equal(r.prompt_activations, l.prompt_activations)
        _assert_acts_equal(r.response_activations, l.response_activations)


def test_health_and_properties(server, remote, local):
    info = remote.health()
    assert info["experiment"] == "exp" and info["variant"] == "instruct" and info["status"] == "ok"
    assert (remote.n_layers, remote.hidden_dim) == (local.n_layers, local.hidden_dim) == (2, 64)
    assert remote.device == torch.device("cpu")
    with pytest.raises(AttributeError, match="no local model"):
        remote.model  # noqa: B018


def test_remote_results_equal_local(remote, local, tiny):
    steering = [SteeringSpec(layer=1, vector=_unit(64, 0), coefficient=4.0), SteeringSpec(layer=0, vector=_unit(64, 1), coefficient=2.0, component="attn_out", positions="response")]
    systems = ["Be brief.", None, "Be kind."]
    assert remote.generate(PROMPTS, CFG) == local.generate(PROMPTS, CFG)
    steered = remote.generate(PROMPTS, CFG, steering, systems)
    assert steered == local.generate(PROMPTS, CFG, steering, systems)
    assert steered != remote.generate(PROMPTS, CFG, None, systems)  # steering is applied remotely
    _assert_results_equal(remote.generate_results(PROMPTS, CFG), local.generate_results(PROMPTS, CFG))
    _assert_results_equal(remote.generate_with_capture(PROMPTS, CFG, CAPTURE, steering),
                          local.generate_with_capture(PROMPTS, CFG, CAPTURE, steering))
    sampled = GenerationConfig(max_new_tokens=6, temperature=1.0, seed=7)
    assert remote.generate(PROMPTS, sampled) == local.generate(PROMPTS, sampled)

    ids, mask = tokenize_batch(tiny.tokenizer, PROMPTS)
    _assert_acts_equal(remote.forward_with_capture(ids, mask, CAPTURE), local.forward_with_capture(ids, mask, CAPTURE))
    _assert_acts_equal(remote.forward_with_capture(ids[:1], None, CaptureSpec()),
                       local.forward_with_capture(ids[:1], None, CaptureSpec()))


def test_stream_equals_local(remote, local):
    steering = [SteeringSpec(layer=1, vector=_unit(64, 2), coefficient=3.0)]
    got = list(remote.stream(PROMPTS[0], CFG, CaptureSpec([1]), steering))
    want = list(local.stream(PROMPTS[0], CFG, CaptureSpec([1]), steering))
    assert [(t.token, t.token_id) for t in got] == [(t.token, t.token_id) for t in want] and len(got) == 5
    for g, w in zip(got, want):
        _assert_acts_equal(g.activations, w.activations)
    assert [t.token_id for t in remote.stream(PROMPTS[1], CFG)] == [t.token_id for t in local.stream(PROMPTS[1], CFG)]


def test_parallel_requests_each_get_their_own_results(remote, local):
    prompts = [f"Prompt number {i}: tell me about {w}" for i, w in enumerate("cats dogs rain sun moon trees".split())]
    cfg = GenerationConfig(max_new_tokens=4)
    want = [local.generate_with_capture([p], cfg, CAPTURE)[0] for p in prompts]
    got: dict[int, object] = {}
    errors = []

    def worker(i):
        try:
            got[i] = remote.generate_with_capture([prompts[i]], cfg, CAPTURE)[0]
        except Exception as err:  # surfaced below
            errors.append(err)

    for _ in range(2):
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        _assert_results_equal([got[i] for i in range(len(prompts))], want)


BAD_REQUESTS = [
    ("/generate", b"{not json", "not valid JSON"),
    ("/generate", b"[1, 2]", "JSON object"),
    ("/generate", b"{}", "missing field(s): prompts"),
    ("/generate", json.dumps({"prompts": "hi"}).encode(), "prompts must be a list of 1 to 256 strings"),
    ("/generate", json.dumps({"prompts": ["hi"], "temperature": 1}).encode(), "unknown field(s): temperature"),
    ("/generate", json.dumps({"prompts": ["hi"], "config": {"max_new_tokens": "5"}}).encode(), "max_new_tokens"),
    ("/generate", json.dumps({"prompts": ["hi"], "system_prompts": ["a", "b"]}).encode(), "system_prompts"),
    ("/generate", json.dumps({"prompts": ["hi"], "steering": [{"layer": 0, "vector": [1.0] * 63}]}).encode(),
     "steering[0]: vector has 63 elements but blocks.0.hook_resid_post has width 64"),
    ("/generate", json.dumps({"prompts": ["hi"], "steering": [{"layer": 9, "vector": [0.0] * 64}]}).encode(),
     "steering[0]: layer 9 is out of range for a model with 2 layers"),
    ("/generate", json.dumps({"prompts": ["hi"], "steering": [{"vector": [0.0] * 64}]}).encode(), "missing field"),
    ("/generate", json.dumps({"prompts": ["hi"], "steering": [{"layer": 0, "vector": {"safetensors": "!!"}}]}).encode(),
     "base64 safetensors"),
    ("/generate", json.dumps({"prompts": ["hi"], "steering": [{"layer": 0, "vector": [[0.0]] * 64}]}).encode(),
     "steering[0]: vector must be 1-D [d_model]; got shape (64, 1)"),
    ("/generate_with_capture", json.dumps({"prompts": ["hi"], "capture": {"components": ["bogus"]}}).encode(),
     "capture: each component must be one of residual,"),
    ("/generate_with_capture", json.dumps({"prompts": ["hi"], "capture": {"layers": [5]}}).encode(), "out of range"),
    ("/stream", json.dumps({"prompt": ["hi"]}).encode(), "prompt must be a string"),
    ("/forward_with_capture", json.dumps({"input_ids": [[1, 2]]}).encode(), "missing field(s): capture"),
    ("/forward_with_capture", json.dumps({"input_ids": [[1.5, 2.0]], "capture": {}}).encode(), "integer tensor"),
    ("/forward_with_capture", json.dumps({"input_ids": [[1, 99999]], "capture": {}}).encode(), "must hold token ids inside [0, 512); got ids from 1 to 99999"),
    ("/forward_with_capture", json.dumps({"input_ids": [[1, 2], [3]], "capture": {}}).encode(), "rectangular"),
    ("/forward_with_capture", json.dumps({"input_ids": [[1, 2]], "attention_mask": [[1]], "capture": {}}).encode(),
     "attention_mask shape"),
]


@pytest.mark.unchecked_types  # wrong JSON types reach the request types' own checks
@pytest.mark.parametrize(("path", "raw", "reason"), BAD_REQUESTS)
def test_malformed_requests_get_400_with_the_reason(server, path, raw, reason):
    status, body = _post(server.url + path, raw)
    assert status == 400 and reason in body["error"]


def test_unknown_routes_and_wrong_host(server):
    assert _post(server.url + "/nope", b"{}")[0] == 404
    assert _get(server.url + "/generate")[0] == 404
    status, body = _get(server.url + "/health", {"Host": "evil.example:80"})
    assert status == 403 and "Host" in body["error"]


def test_tensor_encoding_round_trip_in_requests(server, local, tiny):
    ids, mask = tokenize_batch(tiny.tokenizer, PROMPTS[:1])
    status, body = _post(server.url + "/forward_with_capture", json.dumps(
        {"input_ids": ids.tolist(), "attention_mask": encode_tensor(mask), "capture": {"layers": [1]}}).encode())
    assert status == 200 and set(body) == {"activations"}


def test_token_is_required_when_set(tiny):
    with ModelServer(LocalBackend.from_model(tiny.model), "exp", port=0, token="s3cret", verbose=False).start() as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, body = _get(srv.url + "/health", headers)
            assert status == 401 and "token" in body["error"]
            assert _post(srv.url + "/generate", json.dumps({"prompts": ["hi"]}).encode(), headers)[0] == 401
        assert _get(srv.url + "/health", {"Authorization": "Bearer s3cret"})[0] == 200
        with pytest.raises(ServerError, match="401"):
            RemoteBackend(srv.url).generate(["hi"], CFG)
        assert RemoteBackend(srv.url, token="s3cret").generate(["hi"], CFG) == LocalBackend.from_model(tiny.model).generate(["hi"], CFG)


def test_refuses_a_non_loopback_host_without_a_token(tiny):
    with pytest.raises(ValueError, match="token"):
        ModelServer(LocalBackend.from_model(tiny.model), "exp", host="0.0.0.0", port=0)


@pytest.fixture(scope="module")
def experiments_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    folder = root.parent / "tiny-llama"
    tiny_hf_model("llama").save_pretrained(folder)
    make_tokenizer(bos=True).save_pretrained(folder)
    for name in ("exp", "other"):
        Experiment.named(name, root).write_config({"instruct": {"model": str(folder), "lora": None}})
    return root


def test_get_backend_prefers_the_server_of_that_experiment(server, experiments_root):
    kw = {"root": experiments_root, "device": "cpu"}
    assert isinstance(get_backend("exp", port=server.port, **kw), RemoteBackend)
    assert isinstance(get_backend("exp", port=server.port, variant="instruct", **kw), RemoteBackend)
    assert isinstance(get_backend("exp", prefer_server=False, port=server.port, **kw), LocalBackend)
    other = get_backend("other", port=server.port, **kw)  # the server is for "exp"
    assert isinstance(other, LocalBackend) and (other.experiment, other.variant) == ("other", "instruct")
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert isinstance(get_backend("exp", port=port, **kw), LocalBackend)


# --- batching ---------------------------------------------------------------------------------------------------


class _BatchSizes:
    """Counts forward passes of the HF model by batch size (a forward pre-hook)."""

    def __init__(self, model) -> None:
        self.seen: dict[int, int] = {}
        self.handle = model.original_model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs) -> None:
        batch = (kwargs["input_ids"] if "input_ids" in kwargs else args[0]).shape[0]  # generation; capture forward
        self.seen[batch] = self.seen.get(batch, 0) + 1


@pytest.fixture()
def batch_sizes(tiny):
    counter = _BatchSizes(tiny.model)
    yield counter
    counter.handle.remove()


def _in_parallel(calls) -> list:
    """Run the callables on one thread each, all at once; their results in order (an exception is re-raised)."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


def _wait_for(condition, what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


# six requests: one or two prompts each, steering of every kind (or none), some with system prompts
BATCH_REQUESTS = [
    (["Tell me about cats"], [SteeringSpec(layer=1, vector=_unit(64, 10), coefficient=4.0)], None),
    (["Rain today?", "Sun tomorrow?"], [SteeringSpec(layer=0, vector=_unit(64, 11), coefficient=3.0, component="attn_out", positions="response")], ["Be brief.", None]),
    (["What is the capital of France?"], None, None),
    (["Hi"], [SteeringSpec(layer=1, vector=_unit(64, 12), coefficient=-5.0), SteeringSpec(layer=0, vector=_unit(64, 13), coefficient=2.0, component="mlp_out")], None),
    (["A longer prompt about the moon and the trees and the rain"], [SteeringSpec(layer=1, vector=_unit(64, 12), coefficient=5.0)], ["Be kind."]),
    (["Hi"], [SteeringSpec(layer=1, vector=_unit(64, 14), coefficient=6.0, positions="response")], None),
]


def test_concurrent_requests_run_as_one_batch_and_each_equals_its_request_alone(tiny, local, batch_sizes):
    """Under the window policy all six requests (8 prompts) start together (the window is long and max_batch_size
    is 8, so they start exactly when the last one arrives) and decode as one batch of 8; every result equals the
    same request run alone: the same tokens, and activations to float rounding."""
    cfg = GenerationConfig(max_new_tokens=5)
    want = [local.generate_with_capture(p, cfg, CAPTURE, s, sys) for p, s, sys in BATCH_REQUESTS]
    rows = sum(len(p) for p, _, _ in BATCH_REQUESTS)
    with ModelServer(LocalBackend.from_model(tiny.model), "exp", port=0, verbose=False, batching="window",
                     batch_window_ms=60_000, max_batch_size=rows).start() as srv:
        remote = RemoteBackend(srv.url, timeout=60.0)
        batch_sizes.seen.clear()
        got = _in_parallel([lambda p=p, s=s, sys=sys: remote.generate_with_capture(p, cfg, CAPTURE, s, sys)
                            for p, s, sys in BATCH_REQUESTS])
    assert max(batch_sizes.seen) == rows, batch_sizes.seen  # each request's prompt pass, then decode steps of all 8
    for g, w in zip(got, want):
        _assert_results_equal(g, w)
    unsteered = [local.generate([p[0]], cfg)[0] for p, _, _ in BATCH_REQUESTS]
    assert [g[0].response_text for g in got] != unsteered  # steering reached its rows


def test_requests_join_the_running_batch_and_leave_it_as_they_finish(tiny, local, batch_sizes):
    """Continuous batching: B (3 tokens, steered) arrives while A (40 tokens) is generating and joins A's batch
    at its next step; B is answered while A still generates; C (6 tokens) comes after; every answer equals the
    same request alone."""
    spec = [SteeringSpec(layer=1, vector=_unit(64, 40), coefficient=5.0)]
    bodies = [(["Alpha and more"], GenerationConfig(max_new_tokens=40, stop_token_ids=[]), None),
              (["Beta"], GenerationConfig(max_new_tokens=3), spec),
              (["Gamma gamma"], GenerationConfig(max_new_tokens=6), None)]
    want = [local.generate(p, c, s) for p, c, s in bodies]
    finished: dict[int, float] = {}
    with ModelServer(LocalBackend.from_model(tiny.model), "exp", port=0, verbose=False,
                     max_batch_size=4).start() as srv:
        remote = RemoteBackend(srv.url, timeout=60.0)
        batch_sizes.seen.clear()

        def call(i: int):
            out = remote.generate(*bodies[i])
            finished[i] = time.monotonic()
            return out

        first = ThreadPoolExecutor(max_workers=1).submit(call, 0)
        _wait_for(lambda: srv.batcher.rows == 1, "A to be generating")
        second = ThreadPoolExecutor(max_workers=1).submit(call, 1)
        _wait_for(lambda: srv.batcher.rows == 2 or 1 in finished, "B to join")
        got = [first.result(), second.result(), call(2)]
    assert got == want and want[1] != local.generate(bodies[1][0], bodies[1][1])  # B's steering reached it
    assert finished[1] < finished[0]  # B did not wait for A
    assert 2 in batch_sizes.seen  # decode steps of A and B together


def test_a_full_queue_answers_503_with_the_reason(tiny):
    with ModelServer(LocalBackend.from_model(tiny.model), "exp", port=0, verbose=False, batching="window",
                     batch_window_ms=60_000, max_queue=1).start() as srv:
        first: list = []
        waiting = threading.Thread(target=lambda: first.append(_post(srv.url + "/generate", json.dumps(
            {"prompts": ["hi"], "config": {"max_new_tokens": 2}}).encode())))
        waiting.start()
        _wait_for(lambda: len(srv.batcher.pending) == 1, "the first request to be queued")
        req = urllib.request.Request(srv.url + "/generate", data=json.dumps(
            {"prompts": ["hi"], "config": {"max_new_tokens": 2}}).encode(), headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=30)
        with refused.value as err:
            assert err.code == 503 and err.headers["Retry-After"] == "1"
            assert json.loads(err.read())["error"] == ("the model server's queue is full (1 requests waiting, "
                                                       "max_queue=1); retry later")
        assert _get(srv.url + "/health")[1]["batching"]["waiting"] == 1
    waiting.join()
    assert first == [(503, {"error": "the model server is shutting down"})]  # close() answers the waiting one


def test_batching_settings_are_checked(tiny):
    backend = LocalBackend.from_model(tiny.model)
    for kw, msg in [({"max_batch_size": 0}, "max_batch_size must be an integer >= 1; got 0"),
                    ({"max_queue": -1}, "max_queue must be an integer >= 1; got -1"),
                    ({"batch_window_ms": -1}, "batch_window_ms must be a finite number of milliseconds >= 0; got -1"),
                    ({"batching": "static"}, "batching must be one of continuous, window; got 'static'")]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            ModelServer(backend, "exp", port=0, **kw)


def test_steering_by_trait_name_uses_the_experiments_vector(tiny, local, tmp_path):
    """``{trait, layer}`` steers with the vector file of the experiment's extraction variant; the answer equals
    steering with that vector sent as numbers. A trait without vectors is a 400 naming it."""
    exp = Experiment.named("exp", tmp_path)
    exp.write_config({"instruct": {"model": "unused", "lora": None}})
    v = _unit(64, 20)
    save_tensors(exp.vector_path("mood/happy", "instruct", "response[:]", "residual", "mean_diff", 1), {"vector": v})
    cfg = GenerationConfig(max_new_tokens=5)
    with ModelServer(LocalBackend.from_model(tiny.model), "exp", port=0, verbose=False,
                     experiments_root=tmp_path).start() as srv:
        status, body = _post(srv.url + "/generate", json.dumps(
            {"prompts": PROMPTS, "config": {"max_new_tokens": 5},
             "steering": [{"trait": "mood/happy", "layer": -1, "coefficient": 6.0}]}).encode())
        assert status == 200
        assert body["responses"] == local.generate(PROMPTS, cfg, [SteeringSpec(layer=1, vector=v, coefficient=6.0)])
        assert body["responses"] != local.generate(PROMPTS, cfg)
        status, body = _post(srv.url + "/generate", json.dumps(
            {"prompts": ["hi"], "steering": [{"trait": "mood/sad", "coefficient": 6.0}]}).encode())
        assert status == 400 and "steering[0]: no steering vector for trait 'mood/sad' in experiment 'exp'" in body["error"]


# --- the OpenAI-compatible API, driven by the real `openai` client ------------------------------------------------

OPENAI_QUESTIONS = ["What is the capital of France?", "Hi there", "Tell me something happy.", "Rain today?",
                    "Name a colour", "Count to three"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _text(local, results) -> list[str]:
    """What the OpenAI API answers for these results: the response decoded without stripping."""
    return [local.tokenizer.decode(r.response_token_ids, skip_special_tokens=True) for r in results]


def test_models_names_the_model_and_the_experiments_name_is_accepted_too(client, server, tiny):
    model_id = Path(tiny.model.cfg.model_name).name
    assert [(m.id, m.owned_by) for m in client.models.list().data] == [(model_id, "tracelens")]
    for name in (model_id, "exp"):
        answer = client.completions.create(model=name, prompt="hi", max_tokens=2, temperature=0)
        assert answer.model == model_id
    assert json.loads(urllib.request.urlopen(server.url + "/health").read())["model_id"] == model_id


def test_a_server_without_an_experiment_steers_by_vector_and_refuses_trait_names(tiny, local):
    srv = ModelServer(LocalBackend.from_model(tiny.model), port=0, model_id="tiny-llama-folder", verbose=False).start()
    try:
        models = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0).models.list()
        assert [m.id for m in models.data] == ["tiny-llama-folder"]
        health = json.loads(urllib.request.urlopen(srv.url + "/health").read())
        assert health["experiment"] is None and health["model_id"] == "tiny-llama-folder"
        vector = [{"layer": 0, "vector": encode_tensor(torch.ones(local.hidden_dim)), "coefficient": 4.0}]
        body = {"prompts": ["hi"], "config": {"max_new_tokens": 4}, "steering": vector}
        status, answer = _post(srv.url + "/generate", json.dumps(body).encode())
        spec = [SteeringSpec(layer=0, vector=torch.ones(local.hidden_dim), coefficient=4.0)]
        assert status == 200 and answer["responses"] == local.generate(["hi"], GenerationConfig(4), spec)
        status, answer = _post(srv.url + "/generate",
                               json.dumps({"prompts": ["hi"], "steering": [{"trait": "starter/optimism"}]}).encode())
        assert status == 400 and "needs an experiment" in answer["error"]
    finally:
        srv.close()


@pytest.mark.parametrize("kwargs, match", [
    ({}, "not both or neither"), ({"experiment": "e", "model": "default"}, "not both or neither"),
    ({"model": "default", "variant": "instruct"}, "--variant names a variant"),
    ({"experiment": "e", "lora": "adapter"}, "--lora goes with --model"),
])
def test_serve_needs_one_model_source_before_loading_anything(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        serve(port=0, **kwargs)


def test_chat_answer_equals_local_generation_with_and_without_steering(client, local):
    cfg = GenerationConfig(max_new_tokens=6)
    steering = [{"layer": 1, "vector": _unit(64, 3).tolist(), "coefficient": 5.0},
                {"layer": 0, "vector": _unit(64, 4).tolist(), "coefficient": 2.0, "component": "mlp_out",
                 "positions": "response"}]
    specs = [SteeringSpec(layer=1, vector=_unit(64, 3), coefficient=5.0), SteeringSpec(layer=0, vector=_unit(64, 4), coefficient=2.0, component="mlp_out", positions="response")]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": OPENAI_QUESTIONS[0]}]
    plain = client.chat.completions.create(model="exp", messages=messages, max_tokens=6, temperature=0)
    steered = client.chat.completions.create(model="exp", messages=messages, max_tokens=6, temperature=0,
                                             extra_body={"steering": steering})
    [want_plain] = local.generate_results([OPENAI_QUESTIONS[0]], cfg, None, ["Be brief."])
    [want_steered] = local.generate_results([OPENAI_QUESTIONS[0]], cfg, specs, ["Be brief."])
    assert plain.choices[0].message.content == _text(local, [want_plain])[0]
    assert steered.choices[0].message.content == _text(local, [want_steered])[0]
    assert steered.choices[0].message.content != plain.choices[0].message.content
    assert plain.usage.prompt_tokens == len(want_plain.prompt_token_ids)
    assert plain.usage.completion_tokens == len(want_plain.response_token_ids)
    n = len(want_plain.response_token_ids)
    assert plain.choices[0].finish_reason == ("length" if n == 6 else "stop")


def test_completions_use_the_prompt_as_given_one_choice_per_prompt(client, local):
    prompts = ["Once upon a time", "The weather is"]
    answer = client.completions.create(model="exp", prompt=prompts, max_tokens=5, temperature=0)
    want = local.generate_results(prompts, GenerationConfig(max_new_tokens=5), formatted=True)
    assert [c.text for c in sorted(answer.choices, key=lambda c: c.index)] == _text(local, want)


def test_multi_turn_chat_goes_through_the_chat_template(client, local):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": OPENAI_QUESTIONS[2]}]
    answer = client.chat.completions.create(model="exp", messages=messages, max_tokens=5, temperature=0)
    text = local.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = local.generate_results([text], GenerationConfig(max_new_tokens=5), formatted=True)
    assert answer.choices[0].message.content == _text(local, want)[0]


@pytest.mark.parametrize("chat", [True, False])
def test_a_stream_joins_to_the_unstreamed_answer_also_with_a_stop_string(client, chat):
    def ask(**kw):
        if chat:
            messages = [{"role": "user", "content": OPENAI_QUESTIONS[1]}]
            return client.chat.completions.create(model="exp", messages=messages, max_tokens=12, temperature=0, **kw)
        return client.completions.create(model="exp", prompt=OPENAI_QUESTIONS[1], max_tokens=12, temperature=0, **kw)

    def content(choice):
        return choice.message.content if chat else choice.text

    def streamed(**kw):
        pieces, finish = [], None
        for chunk in ask(stream=True, **kw):
            if chunk.choices:
                piece = chunk.choices[0].delta.content if chat else chunk.choices[0].text
                pieces.append(piece or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(pieces), finish

    whole = ask().choices[0]
    assert streamed() == (content(whole), whole.finish_reason)
    full = content(whole)
    stop = full[len(full) // 2:len(full) // 2 + 2]  # a stop string inside the answer
    assert len(stop) == 2
    cut = ask(stop=[stop]).choices[0]
    assert (content(cut), cut.finish_reason) == (full[:full.find(stop)], "stop")
    assert streamed(stop=[stop]) == (full[:full.find(stop)], "stop")


def test_logprobs_equal_the_models(client, local):
    messages = [{"role": "user", "content": OPENAI_QUESTIONS[3]}]
    answer = client.chat.completions.create(model="exp", messages=messages, max_tokens=4, temperature=0,
                                            logprobs=True, top_logprobs=5)
    [want] = local.generate_results([OPENAI_QUESTIONS[3]], GenerationConfig(max_new_tokens=4), top_logprobs=5)
    content = answer.choices[0].logprobs.content
    assert len(content) == len(want.response_token_ids)
    for entry, token, lp, top in zip(content, want.response_token_ids, want.response_logprobs,
                                     want.response_top_logprobs):
        assert entry.token == local.tokenizer.decode([token]) and math.isclose(entry.logprob, lp, abs_tol=1e-5)
        assert [t.token for t in entry.top_logprobs] == [local.tokenizer.decode([i]) for i, _ in top]
        assert all(math.isclose(t.logprob, l, abs_tol=1e-5) for t, (_, l) in zip(entry.top_logprobs, top))
    legacy = client.completions.create(model="exp", prompt="The weather is", max_tokens=3, temperature=0, logprobs=2)
    [want] = local.generate_results(["The weather is"], GenerationConfig(max_new_tokens=3), formatted=True,
                                    top_logprobs=2)
    assert legacy.choices[0].logprobs.tokens == [local.tokenizer.decode([i]) for i in want.response_token_ids]
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(legacy.choices[0].logprobs.token_logprobs,
                                                                 want.response_logprobs))


def test_echo_scores_the_prompt_as_the_hf_model_does(client, local, tiny):
    """lm-eval's log-likelihood request: echo, max_tokens 0, logprobs: each prompt token's log-probability given
    the ones before it (the first null), with its top alternatives, as the plain HF model computes them."""
    prompt = "The weather is"
    ids = encode(local.tokenizer, prompt)
    answer = client.completions.create(model="exp", prompt=prompt, max_tokens=0, echo=True, logprobs=3,
                                       temperature=0)
    choice, lp = answer.choices[0], answer.choices[0].logprobs
    assert choice.text == prompt and lp.tokens == [local.tokenizer.decode([i]) for i in ids]
    with torch.no_grad():
        ref = tiny.reference(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([float(ref[k - 1, ids[k]]) for k in range(1, len(ids))], abs=1e-5)
    for k in range(1, len(ids)):
        assert 1 <= len(lp.top_logprobs[k]) <= 3
        assert max(lp.top_logprobs[k].values()) == pytest.approx(float(ref[k - 1].max()), abs=1e-5)
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), 0)
    # under steering: the backend's teacher forcing of the same tokens, steered
    v = _unit(64, 5)
    steered = client.completions.create(model="exp", prompt=prompt, max_tokens=0, echo=True, logprobs=0,
                                        extra_body={"steering": [{"layer": 1, "vector": v.tolist(),
                                                                  "coefficient": 6.0}]})
    want = local.response_logprobs([ids[:1]], [ids[1:]], [SteeringSpec(layer=1, vector=v, coefficient=6.0)])
    got = steered.choices[0].logprobs.token_logprobs[1:]
    assert got == pytest.approx(want.logprobs[0].tolist(), abs=1e-5) and got != pytest.approx(lp.token_logprobs[1:])


def test_echo_with_generation_leads_with_the_prompt_and_keeps_the_answer(client):
    prompt = "The weather is"
    plain = client.completions.create(model="exp", prompt=prompt, max_tokens=3, temperature=0, logprobs=1)
    echoed = client.completions.create(model="exp", prompt=prompt, max_tokens=3, temperature=0, logprobs=1,
                                       echo=True)
    a, b = plain.choices[0], echoed.choices[0]
    assert b.text == prompt + a.text and b.finish_reason == a.finish_reason
    n = len(b.logprobs.tokens) - len(a.logprobs.tokens)
    assert n == echoed.usage.prompt_tokens and b.logprobs.tokens[n:] == a.logprobs.tokens
    assert b.logprobs.token_logprobs[n:] == a.logprobs.token_logprobs
    assert b.logprobs.text_offset == sorted(b.logprobs.text_offset)
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens


def test_token_id_prompts_are_used_as_given(client, local, tiny):
    """OpenAI's token-id prompts (a list of ids, or a list of id lists), as lm-eval sends them: generation and
    echo scoring start from exactly those ids, even ids that no text encodes to (two pieces encoded apart)."""
    ids = encode(local.tokenizer, "The weather") + local.tokenizer("is", add_special_tokens=False).input_ids
    with torch.no_grad():
        ref = tiny.reference(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    scored = client.completions.create(model="exp", prompt=[ids, ids[:3]], max_tokens=0, echo=True, logprobs=1)
    a, b = scored.choices
    assert a.logprobs.token_logprobs[1:] == pytest.approx([float(ref[k - 1, ids[k]]) for k in range(1, len(ids))],
                                                          abs=1e-5)
    assert b.logprobs.token_logprobs[1:] == pytest.approx(a.logprobs.token_logprobs[1:3], abs=1e-5)
    assert scored.usage.prompt_tokens == len(ids) + 3
    one = client.completions.create(model="exp", prompt=ids, max_tokens=4, temperature=0, logprobs=0)
    out = HookedGenerator(tiny.model).generate(torch.tensor([ids]), None, 4, stop_at_eos=True)[0]
    assert one.choices[0].text == local.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert one.usage.prompt_tokens == len(ids)
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="exp", prompt=ids, max_tokens=4,
                                                                            temperature=0, stream=True))
    assert streamed == one.choices[0].text
    for bad, msg in (([[]], "prompt[0] must be a non-empty list of integer token ids"),
                     ([[1, 10**6]], "prompt[0] must hold token ids inside [0, 512)"),
                     ([1, "a"], "prompt[0] must be a non-empty list of integer token ids")):
        with pytest.raises(openai.BadRequestError, match=re.escape(msg)):
            client.completions.create(model="exp", prompt=bad, max_tokens=1)


def test_openai_judge_reads_its_top_logprobs_from_the_server(server, local):
    """`OpenAIJudge` asks for one token with logprobs=True, top_logprobs=20: it gets the model's 20 most likely
    first tokens. (A random tiny model puts no mass on the numbers 0-100, so its score is None.)"""
    judge = OpenAIJudge(server.url + "/v1", model="exp", retries=0)
    top = judge._top_logprobs(COHERENCE_SYSTEM, SCORE_USER, "Hi", "Hello!")
    user = SCORE_USER.format(question="Hi", response="Hello!")
    [want] = local.generate_results([user], GenerationConfig(max_new_tokens=1), None, [COHERENCE_SYSTEM],
                                    top_logprobs=20)
    assert [t["token"] for t in top] == [local.tokenizer.decode([i]) for i, _ in want.response_top_logprobs[0]]
    assert judge.score_coherence("Hi", "Hello!") is None


def test_parallel_openai_requests_share_a_batch_and_equal_the_sequential_answers(tiny):
    """Six chat requests with six different steerings, sent at once, decode as one batch of 6 (window policy) and
    each answer equals the same request sent alone."""
    bodies = [{"model": "exp", "messages": [{"role": "user", "content": q}], "max_tokens": 5, "temperature": 0,
               "extra_body": {"steering": [{"layer": i % 2, "vector": _unit(64, 30 + i).tolist(), "coefficient": 4.0}]}}
              for i, q in enumerate(OPENAI_QUESTIONS)]
    seen: dict[int, int] = {}
    handle = tiny.model.original_model.register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__(kw["input_ids"].shape[0], seen.get(kw["input_ids"].shape[0], 0) + 1),
        with_kwargs=True)
    try:
        with ModelServer(LocalBackend.from_model(tiny.model), "exp", port=0, verbose=False, batching="window",
                         batch_window_ms=60_000, max_batch_size=len(bodies)).start() as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            got = _in_parallel([lambda b=b: client.chat.completions.create(**b).choices[0].message.content
                                 for b in bodies])
            assert max(seen) == len(bodies), seen
            srv.batcher.window = 0.0  # one by one now
            alone = [client.chat.completions.create(**b).choices[0].message.content for b in bodies]
    finally:
        handle.remove()
    assert got == alone and len(set(alone)) > 1


# Every validation error of the request types is a 400 naming the field, on the own API and under /v1: the server's
# parsers build `tracelens.model.requests` objects and add only their upper bounds.
_V = [0.0] * 64
REQUEST_TYPE_ERRORS = [
    ({"config": {"max_new_tokens": 0}}, "config: max_new_tokens must be an integer >= 1; got 0"),
    ({"config": {"max_new_tokens": -3}}, "config: max_new_tokens must be an integer >= 1; got -3"),
    ({"config": {"max_new_tokens": 10**9}},
     "config.max_new_tokens must be an integer in [1, 1024] (the server's max_new_tokens_limit); got 1000000000"),
    ({"config": {"max_new_tokens": True}}, "config: max_new_tokens must be an integer >= 1; got True"),
    ({"config": {"max_new_tokens": "5"}}, "config: max_new_tokens must be an integer >= 1; got '5'"),
    ({"config": {"temperature": "hot"}}, "config: temperature must be a number; got str"),
    ({"config": {"seed": -1}}, "config: seed must be None or an integer in [0, 2**64); got -1"),
    ({"config": {"stop_token_ids": "x"}}, "config: stop_token_ids must be None or a list of integers >= 0; got 'x'"),
    ({"config": {"stop_token_ids": [600]}}, "config: stop_token_ids must be token ids below the vocabulary size 512"),
    ({"config": {"top_k": 5}}, "config: unknown field(s): top_k; allowed: max_new_tokens, temperature"),
    ({"config": [5]}, "config must be a JSON object; got list"),
    ({"prompts": ["hi"] * 257}, "prompts must be a list of 1 to 256 strings; got a list of 257"),
    ({"steering": [{"layer": "0", "vector": _V}]}, "steering[0]: layer must be an integer; got str '0'"),
    ({"steering": [{"layer": -3, "vector": _V}]}, "steering[0]: layer -3 is out of range for a model with 2 layers"),
    ({"steering": [{"layer": 0, "vector": _V, "rows": [0, 2]}]}, "steering[0]: rows must lie within the 1 prompts; got (0, 2)"),
    ({"steering": [{"layer": 0, "vector": _V, "rows": [1, 0]}]}, "steering[0]: rows must be (start, end) integers"),
    ({"steering": [{"layer": 0, "vector": _V, "coefficient": "big"}]}, "steering[0]: coefficient must be a number"),
    ({"steering": [{"layer": 0, "vector": _V, "positions": "prompt"}]},
     "steering[0]: positions must be one of all, response; got 'prompt'"),
    ({"steering": [{"layer": 0, "vector": _V, "component": "bogus"}]}, "steering[0]: component must be one of residual"),
    ({"steering": [{"layer": 0, "vector": [float("nan")] * 64}]}, "steering[0]: vector contains NaN or inf"),
    ({"steering": [{"layer": 0, "vector": _V}] * 65}, "steering must be a list of at most 64 entries"),
    ({"steering": {"layer": 0}}, "steering must be a list of at most 64 entries"),
    ({"capture": {"layers": "0"}}, "capture: layers must be None (every layer) or a list of integers; got '0'"),
    ({"capture": {"layers": [2]}}, "capture: layer 2 is out of range for a model with 2 layers"),
    ({"capture": {"components": []}}, "capture: components must be a non-empty list of component names; got []"),
]


@pytest.mark.unchecked_types
@pytest.mark.parametrize(("fields", "reason"), REQUEST_TYPE_ERRORS, ids=[r[:50] for _, r in REQUEST_TYPE_ERRORS])
def test_every_request_type_error_is_a_400_naming_the_field(server, fields, reason):
    body = {"prompts": ["hi"], **fields}
    status, answer = _post(server.url + "/generate_with_capture", json.dumps(body).encode())
    assert (status, answer["error"][:len(reason)]) == (400, reason), answer
    if "capture" not in fields:  # the same parsers serve /generate and /stream
        assert _post(server.url + "/generate", json.dumps(body).encode()) == (400, answer)
        stream = {"prompt": "hi", **{k: v for k, v in fields.items() if k != "prompts"}}
        if "prompts" not in fields:
            assert _post(server.url + "/stream", json.dumps(stream).encode()) == (400, answer)


OPENAI_TYPE_ERRORS = [
    ({"max_tokens": 0}, "max_tokens: max_new_tokens must be an integer >= 1; got 0"),
    ({"max_tokens": -1}, "max_tokens: max_new_tokens must be an integer >= 1; got -1"),
    ({"max_tokens": 10**9}, "max_tokens must be an integer in [1, 1024] (the server's max_new_tokens_limit); got 1000000000"),
    ({"max_tokens": "5"}, "max_tokens: max_new_tokens must be an integer >= 1; got '5'"),
    ({"max_completion_tokens": 0}, "max_completion_tokens: max_new_tokens must be an integer >= 1; got 0"),
    ({"temperature": "hot"}, "temperature must be a number; got str"),
    ({"temperature": -0.5}, "temperature must be >= 0; got -0.5"),
    ({"seed": "x"}, "seed must be None or an integer in [0, 2**64); got 'x'"),
    ({"bogus": 1}, "unknown field(s): bogus"),
    ({"steering": [{"layer": 9, "vector": _V}]}, "steering[0]: layer 9 is out of range for a model with 2 layers"),
    ({"steering": [{"layer": 0, "vector": _V, "bogus": 1}]}, "steering[0]: unknown field(s): bogus"),
]


@pytest.mark.unchecked_types
@pytest.mark.parametrize(("fields", "reason"), OPENAI_TYPE_ERRORS, ids=[r[:50] for _, r in OPENAI_TYPE_ERRORS])
def test_every_request_type_error_is_a_400_naming_the_field_under_v1(server, fields, reason):
    chat = {"model": "exp", "messages": [{"role": "user", "content": "hi"}], **fields}
    completion = {"model": "exp", "prompt": "hi", **{k: v for k, v in fields.items() if k != "max_completion_tokens"}}
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
        if path == "/v1/completions" and "max_completion_tokens" in fields:
            continue
        status, answer = _post(server.url + path, json.dumps(body).encode())
        assert status == 400 and answer["error"]["type"] == "invalid_request_error", answer
        assert answer["error"]["message"][:len(reason)] == reason, answer
    status, answer = _post(server.url + "/v1/completions", json.dumps({"model": "exp", "prompt": ["hi"] * 257}).encode())
    assert status == 400 and answer["error"]["message"].startswith("prompt must be a string, a list of 1 to 256 strings")


OPENAI_CHAT = {"model": "exp", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
OPENAI_BAD = [
    ({**OPENAI_CHAT, "n": 2}, "n must be null or 1 (one choice per request); got 2"),
    ({**OPENAI_CHAT, "top_p": 0.5}, "top_p must be null or 1 or 1.0 (nucleus sampling is not supported); got 0.5"),
    ({**OPENAI_CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop must be a non-empty string or a list of up to 4 of them"),
    ({**OPENAI_CHAT, "stream": True, "logprobs": True}, "logprobs with stream=true is not supported"),
    ({**OPENAI_CHAT, "top_logprobs": 3}, "top_logprobs needs logprobs=true"),
    ({**OPENAI_CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs must be an integer in [0, 20]; got 21"),
    ({**OPENAI_CHAT, "max_tokens": 0}, "max_tokens: max_new_tokens must be an integer >= 1; got 0"),
    ({**OPENAI_CHAT, "temperature": 3}, "temperature must be a number in [0, 2]; got 3"),
    ({**OPENAI_CHAT, "tools": []}, "unknown field(s): tools"),
    ({**OPENAI_CHAT, "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role must be system, developer"),
    ({**OPENAI_CHAT, "messages": []}, "messages must be a non-empty list"),
    ({**OPENAI_CHAT, "steering": [{"layer": 0, "vector": [1.0] * 3}]}, "steering[0]: vector has 3 elements but blocks.0.hook_resid_post has width 64"),
    ({"model": "exp"}, "missing field(s): messages"),
]


@pytest.mark.unchecked_types
@pytest.mark.parametrize(("body", "reason"), OPENAI_BAD, ids=[r[:40] for _, r in OPENAI_BAD])
def test_bad_requests_get_400_in_openais_error_shape(server, body, reason):
    status, answer = _post(server.url + "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "invalid_request_error" and reason in answer["error"]["message"]


def test_errors_reach_the_openai_client_as_its_exceptions(server, client):
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model="exp", prompt="hi", max_tokens=2, suffix="!")
    with pytest.raises(openai.BadRequestError, match="echo with stream=true is not supported"):
        client.completions.create(model="exp", prompt="hi", max_tokens=2, echo=True, stream=True)
    with pytest.raises(openai.BadRequestError, match="echo must be true or false"):
        client.completions.create(model="exp", prompt="hi", max_tokens=2, extra_body={"echo": "yes"})
    with pytest.raises(openai.NotFoundError, match=re.escape(f"this server serves {server.model_id!r}")) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"


def test_the_token_is_required_under_v1(tiny):
    with ModelServer(LocalBackend.from_model(tiny.model), "exp", port=0, token="s3cret", verbose=False).start() as srv:
        with pytest.raises(openai.AuthenticationError, match="token"):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="exp", prompt="hi", max_tokens=2, temperature=0).choices[0].index == 0


def test_seeded_sampling_runs_alone_and_draws_as_the_local_backend(server, local):
    """Seeded sampling waits for an empty batch and runs as one `HookedGenerator` call: a stream and a two-prompt
    generate draw the same tokens as the local backend with the same seed."""
    config = GenerationConfig(max_new_tokens=6, temperature=0.9, seed=7)
    remote = RemoteBackend(server.url, timeout=60.0)
    streamed = [t.token_id for t in remote.stream("Hi there", config)]
    assert streamed == [t.token_id for t in local.stream("Hi there", config)]
    got = remote.generate_results(["Hi", "Tell me more"], config)
    want = local.generate_results(["Hi", "Tell me more"], config)
    assert [r.response_token_ids for r in got] == [r.response_token_ids for r in want]
    greedy = local.generate_results(["Hi", "Tell me more"], GenerationConfig(max_new_tokens=6))
    assert [r.response_token_ids for r in want] != [r.response_token_ids for r in greedy]  # it sampled
