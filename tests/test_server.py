"""The model server and RemoteBackend: remote results equal local ones, validation, auth, concurrency, get_backend."""

import json
import socket
import threading
import urllib.error
import urllib.request

import pytest
import torch
from conftest import _active_hooks, cached_tiny

from tracelens.backends import CaptureSpec, GenerationConfig, LocalBackend, SteeringSpec
from tracelens.client import RemoteBackend, ServerError, get_backend
from tracelens.experiments import Experiment
from tracelens.prompts import tokenize_batch
from tracelens.server import ModelServer, encode_tensor
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
    steering = [SteeringSpec(1, _unit(64, 0), 4.0), SteeringSpec(0, _unit(64, 1), 2.0, "attn_out", "response")]
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
    steering = [SteeringSpec(1, _unit(64, 2), 3.0)]
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
    ("/generate", json.dumps({"prompts": "hi"}).encode(), "prompts must be a list of strings"),
    ("/generate", json.dumps({"prompts": ["hi"], "temperature": 1}).encode(), "unknown field(s): temperature"),
    ("/generate", json.dumps({"prompts": ["hi"], "config": {"max_new_tokens": "5"}}).encode(), "max_new_tokens"),
    ("/generate", json.dumps({"prompts": ["hi"], "system_prompts": ["a", "b"]}).encode(), "system_prompts"),
    ("/generate", json.dumps({"prompts": ["hi"], "steering": [{"layer": 0, "vector": [1.0] * 63}]}).encode(),
     "the model needs [64]"),
    ("/generate", json.dumps({"prompts": ["hi"], "steering": [{"layer": 9, "vector": [0.0] * 64}]}).encode(),
     "steering[0].layer"),
    ("/generate", json.dumps({"prompts": ["hi"], "steering": [{"vector": [0.0] * 64}]}).encode(), "missing field"),
    ("/generate", json.dumps({"prompts": ["hi"], "steering": [{"layer": 0, "vector": {"safetensors": "!!"}}]}).encode(),
     "base64 safetensors"),
    ("/generate", json.dumps({"prompts": ["hi"], "steering": [{"layer": 0, "vector": [[0.0]] * 64}]}).encode(),
     "the model needs [64]"),
    ("/generate_with_capture", json.dumps({"prompts": ["hi"], "capture": {"components": ["bogus"]}}).encode(),
     "unknown component"),
    ("/generate_with_capture", json.dumps({"prompts": ["hi"], "capture": {"layers": [5]}}).encode(), "out of range"),
    ("/stream", json.dumps({"prompt": ["hi"]}).encode(), "prompt must be a string"),
    ("/forward_with_capture", json.dumps({"input_ids": [[1, 2]]}).encode(), "missing field(s): capture"),
    ("/forward_with_capture", json.dumps({"input_ids": [[1.5, 2.0]], "capture": {}}).encode(), "integer tensor"),
    ("/forward_with_capture", json.dumps({"input_ids": [[1, 99999]], "capture": {}}).encode(), "outside [0, 512)"),
    ("/forward_with_capture", json.dumps({"input_ids": [[1, 2], [3]], "capture": {}}).encode(), "rectangular"),
    ("/forward_with_capture", json.dumps({"input_ids": [[1, 2]], "attention_mask": [[1]], "capture": {}}).encode(),
     "attention_mask shape"),
]


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
