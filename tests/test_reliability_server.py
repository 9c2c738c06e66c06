"""Reliability of the model server and the generation entry points, as a hostile or careless client would test it:
a stalled stream reader, disconnecting clients, a body shorter than its Content-Length, deadlines, and oversized,
empty, NaN, negative or too-long inputs. Every network call goes to 127.0.0.1 and has a timeout."""

import http.client
import json
import math
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from conftest import _active_hooks

from tracelens.serving.backends import GenerationConfig, LocalBackend, SteeringSpec
from tracelens.serving.client import RemoteBackend, ServerError
from tracelens.model.generation import HookedGenerator, SteeringConfig
from tracelens.model.hooks import ActivationCappingHook, PerSampleSteering, SteeringHook
from tracelens.model.prompts import encode
from tracelens.serving.codec import decode_activations
from tracelens.app.server import ModelServer
from tracelens.model.sites import COMPONENTS
from tracelens.testing import tiny_model

N_CTX = 256  # tiny_model's context (max_position_embeddings)
LONG = 240  # max_new_tokens of a long generation: far more tokens than any test waits for
LIMIT = 250  # the test server's max_new_tokens_limit
BIG = {"layers": None, "components": ["residual", "attn_out", "mlp_out"]}  # a capture with large stream lines


class _Forwards:
    """A forward pre-hook on the HF model: counts forward passes by batch size, and sleeps ``delay`` s in each
    so that a generation lasts long enough to be interrupted."""

    def __init__(self, model) -> None:
        self.delay = 0.0
        self.by_batch: dict[int, int] = {}
        self.handle = model.original_model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs) -> None:
        batch = kwargs["input_ids"].shape[0]
        self.by_batch[batch] = self.by_batch.get(batch, 0) + 1
        time.sleep(self.delay)

    def reset(self, delay: float = 0.0) -> None:
        self.delay, self.by_batch = delay, {}


@pytest.fixture(scope="module")
def tiny():
    """6 layers x d_model 256, so a token's activations at three components (`BIG`) are ~25 kB of JSON: a stream
    of ~120 tokens fills the loopback socket buffers (~3 MB) of a client that does not read. No EOS ids, so a
    generation always runs to max_new_tokens unless stopped. One torch thread: steady speed on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t = tiny_model("llama", n_layers=6, d_model=256, d_mlp=256)
    for source in (t.model.original_model.generation_config, t.model.original_model.config):
        source.eos_token_id = None
    yield t
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def forwards(tiny):
    f = _Forwards(tiny.model)
    yield f
    f.handle.remove()
    assert not _active_hooks(tiny.model), "a test left hooks on the model"


@pytest.fixture(scope="module")
def server(tiny, forwards):
    srv = ModelServer(LocalBackend.from_model(tiny.model), "exp", port=0, verbose=False, max_new_tokens_limit=LIMIT,
                      io_timeout=1.0, stream_buffer=16, request_timeout=120.0).start()
    yield srv
    srv.close()


def _post(url, body, timeout=60.0):
    """(status, first JSON line of the answer) of a POST; ``body`` is a dict or raw bytes. Fails when the whole
    answer has not arrived within ``timeout`` seconds (an endless stream included)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", urlsplit(url).port, timeout=timeout)
    end = time.monotonic() + timeout
    try:
        conn.request("POST", urlsplit(url).path, raw, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = b""
        while chunk := resp.read1(65536):
            data += chunk
            if time.monotonic() > end:
                raise AssertionError(f"the answer was still coming after {timeout} s ({len(data)} bytes)")
    finally:
        conn.close()
    return resp.status, json.loads(data.split(b"\n", 1)[0])  # a JSON answer is one line; a stream's first line


def _raw_request(server, path: str, body: dict, rcvbuf: int | None = None) -> socket.socket:
    """A connected socket that has sent ``POST path`` with ``body`` and read nothing."""
    s = socket.socket()
    s.settimeout(30)
    if rcvbuf is not None:  # before connect, so the window stays small
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", server.port))
    raw = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    return s


def _wait_for(condition, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def _model_idle(server, timeout: float = 60.0) -> None:
    """Wait until no request holds the model."""
    _wait_for(lambda: not server.lock.locked(), timeout, "the model lock to be released")


def _read_lines(s: socket.socket, n: int) -> list[bytes]:
    """The first ``n`` body lines of a streamed answer (after the headers)."""
    with s.makefile("rb") as f:
        while f.readline() not in (b"\r\n", b"\n", b""):
            pass
        return [f.readline() for _ in range(n)]


# --- the server: a slow or vanished client never holds the model --------------------------------------------------


def test_a_stalled_stream_reader_does_not_block_other_clients_and_is_dropped(server, forwards):
    """A opens a stream of large lines and never reads; B must still be served within a bounded time, and A's
    generation must stop (dropped once it is 16 tokens behind, or its socket write blocks for 1 s) instead of
    running to max_new_tokens."""
    _model_idle(server)
    forwards.reset()
    stalled = _raw_request(server, "/stream", {"prompt": "Hi", "capture": BIG,
                                               "config": {"max_new_tokens": LONG}}, rcvbuf=4096)
    try:
        _wait_for(lambda: forwards.by_batch.get(1, 0) > 0, 30, "the stalled stream to start")
        start = time.monotonic()
        status, body = _post(server.url + "/generate", {"prompts": ["a", "b"], "config": {"max_new_tokens": 2}},
                             timeout=45)
        waited = time.monotonic() - start
        assert status == 200 and len(body["responses"]) == 2
        assert waited < 30, f"another client waited {waited:.1f} s behind a stalled reader"
        _model_idle(server)
        assert forwards.by_batch[1] < LONG, "the stalled reader's generation ran to max_new_tokens"
        assert stalled.recv(16).startswith(b"HTTP/1.0 200 OK"), "the stalled stream was never streaming"
    finally:
        stalled.close()


@pytest.mark.parametrize("path", ["/generate", "/stream"])
def test_a_client_that_disconnects_stops_its_generation(server, forwards, path):
    """The client goes away after a few tokens: generation stops between tokens, far short of max_new_tokens
    (forward passes counted; each sleeps 10 ms so the generation would otherwise last > 2 s)."""
    _model_idle(server)
    forwards.reset(delay=0.01)
    body = {"prompt": "Hi"} if path == "/stream" else {"prompts": ["Hi"]}
    s = _raw_request(server, path, {**body, "config": {"max_new_tokens": LONG}})
    try:
        if path == "/stream":
            assert all(json.loads(line)["token_id"] >= 0 for line in _read_lines(s, 2))
        else:
            _wait_for(lambda: forwards.by_batch.get(1, 0) >= 3, 30, "generation to start")
    finally:
        s.close()
    _model_idle(server)
    assert forwards.by_batch[1] < LONG // 4, f"{forwards.by_batch[1]} forward passes after the client left"


def test_a_client_that_disconnects_frees_its_row_at_the_next_step_and_the_batch_goes_on(server, forwards):
    """A stream joins a running generation's batch and its client leaves after two tokens: its row leaves the
    batch while the other row still generates, and that answer equals the same request alone."""
    _model_idle(server)
    body = {"prompts": ["Hello there"], "config": {"max_new_tokens": 60, "stop_token_ids": []}}
    alone = _post(server.url + "/generate", body)
    forwards.reset(delay=0.01)
    with ThreadPoolExecutor(max_workers=1) as pool:
        kept = pool.submit(_post, server.url + "/generate", body)
        _wait_for(lambda: server.batcher.rows == 1, 30, "the kept request to generate")
        s = _raw_request(server, "/stream", {"prompt": "Hi", "config": {"max_new_tokens": LONG}})
        try:
            assert all(json.loads(line)["token_id"] >= 0 for line in _read_lines(s, 2))
            assert server.batcher.rows == 2
        finally:
            s.close()
        _wait_for(lambda: server.batcher.rows <= 1, 10, "the dropped row to leave")
        assert not kept.done()  # the dropped row left while the kept one still generated
        assert kept.result() == alone


def test_a_stream_may_capture_components_that_are_one_tensor(server):
    """Llama's attn_out and attn_contribution are the same tensor; the stream must still encode both."""
    capture = {"layers": [0], "components": list(COMPONENTS)}
    status, first = _post(server.url + "/stream", {"prompt": "Hi", "capture": capture, "config": {"max_new_tokens": 2}})
    assert status == 200 and "token_id" in first, first
    assert set(decode_activations(first["activations"])[0]) == set(COMPONENTS)


def test_a_body_shorter_than_its_content_length_gets_408_not_a_hang(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Length: 100\r\n\r\n"
                  '{"prompts": ['.encode())
        answer = b""
        while chunk := s.recv(65536):  # the server answers and closes within io_timeout (1 s)
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split()[1] == b"408"
    assert "Content-Length: 100" in json.loads(body)["error"]
    assert _post(server.url + "/generate", {"prompts": ["a"], "config": {"max_new_tokens": 1}})[0] == 200


def test_a_request_past_its_deadline_gets_503_and_frees_the_model(tiny, forwards):
    forwards.reset(delay=0.01)
    with ModelServer(LocalBackend.from_model(tiny.model), "exp", port=0, verbose=False,
                     request_timeout=0.5).start() as srv:
        start = time.monotonic()
        status, body = _post(srv.url + "/generate", {"prompts": ["Hi"], "config": {"max_new_tokens": LONG}})
        assert status == 503 and "deadline of 0.5 s" in body["error"]
        assert time.monotonic() - start < 10 and forwards.by_batch[1] < LONG
        with pytest.raises(ServerError, match="deadline of 0.5 s") as err:  # mid-stream: a final error line
            list(RemoteBackend(srv.url, timeout=30).stream("Hi", GenerationConfig(max_new_tokens=LONG)))
        assert err.value.status == 503
        forwards.reset()
        assert _post(srv.url + "/generate", {"prompts": ["Hi"], "config": {"max_new_tokens": 1}})[0] == 200


@pytest.mark.unchecked_types
def test_server_settings_are_checked(tiny):
    backend = LocalBackend.from_model(tiny.model)
    for kw, msg in [({"max_new_tokens_limit": 0}, "max_new_tokens_limit must be an integer >= 1; got 0"),
                    ({"stream_buffer": 1.5}, "stream_buffer must be an integer >= 1; got 1.5"),
                    ({"io_timeout": math.nan}, "io_timeout must be a finite number of seconds > 0; got nan"),
                    ({"request_timeout": -1}, "request_timeout must be a finite number of seconds > 0; got -1")]:
        with pytest.raises(ValueError, match=msg):
            ModelServer(backend, "exp", port=0, **kw)


# --- the server: every malformed request is a 4xx with a clear reason -------------------------------------------

_TOO_LONG = "word " * 300  # ~300 tokens, over the 256-token context
_NAN_BODY = b'{"prompts": ["hi"], "config": {"temperature": NaN}}'  # Python's json accepts NaN; the server must not

BAD = [
    ("/generate", {"prompts": ["hi"], "config": {"max_new_tokens": LIMIT + 1}},
     f"config.max_new_tokens must be an integer in [1, {LIMIT}] (the server's max_new_tokens_limit); got {LIMIT + 1}"),
    ("/generate", {"prompts": ["hi"], "config": {"max_new_tokens": 0}}, "config: max_new_tokens must be an integer >= 1; got 0"),
    ("/generate", {"prompts": ["hi"], "config": {"max_new_tokens": -3}}, "got -3"),
    ("/generate", {"prompts": ["hi"], "config": {"max_new_tokens": 2.5}}, "got 2.5"),
    ("/stream", {"prompt": "hi", "config": {"max_new_tokens": 10**9}}, f"got {10**9}"),
    ("/generate", {"prompts": []}, "prompts must be a list of 1 to 256 strings; got a list of 0"),
    ("/generate_with_capture", {"prompts": []}, "got a list of 0"),
    ("/generate", _NAN_BODY, "config: temperature must be a finite number; got nan"),
    ("/generate", {"prompts": ["hi"], "config": {"temperature": -1.0}}, "config: temperature must be >= 0; got -1.0"),
    ("/generate", b'{"prompts": ["hi"], "steering": [{"layer": 0, "vector": %s, "coefficient": Infinity}]}'
     % json.dumps([0.0] * 256).encode(), "steering[0]: coefficient must be a finite number; got inf"),
    ("/generate", {"prompts": [_TOO_LONG], "config": {"max_new_tokens": 4}}, "over the model's context of 256"),
    ("/generate_with_capture", {"prompts": ["hi", _TOO_LONG], "config": {"max_new_tokens": 4}}, "context of 256"),
    ("/stream", {"prompt": _TOO_LONG, "config": {"max_new_tokens": 4}}, "context of 256"),
    ("/stream", {"prompt": "word " * 20, "config": {"max_new_tokens": LIMIT}}, f"max_new_tokens={LIMIT}"),
    ("/forward_with_capture", {"input_ids": [[5] * (N_CTX + 1)], "capture": {}},
     f"input_ids must have at most the model's context of {N_CTX} positions; got {N_CTX + 1}"),
]


@pytest.mark.unchecked_types  # wrong JSON types reach the request types' own checks
@pytest.mark.parametrize(("path", "body", "reason"), BAD, ids=[f"{p}:{r[:40]}" for p, _, r in BAD])
def test_malformed_requests_get_400_with_a_clear_reason_and_no_model_work(server, forwards, path, body, reason):
    _model_idle(server)
    forwards.reset()
    status, answer = _post(server.url + path, body, timeout=30)
    assert (status, reason in answer["error"]) == (400, True), answer
    assert forwards.by_batch == {}, "the model ran for a request it refused"


def test_a_too_long_prompt_names_both_numbers(server):
    n = len(encode(server.backend.tokenizer, server.backend.format(_TOO_LONG)))  # as the chat template formats it
    status, answer = _post(server.url + "/generate", {"prompts": [_TOO_LONG], "config": {"max_new_tokens": 4}})
    assert status == 400
    assert answer["error"].startswith(f"prompt of {n} tokens plus max_new_tokens=4 is {n + 4} tokens, "
                                      f"over the model's context of {N_CTX}")


# --- the Python entry points refuse the same inputs before any model work --------------------------------------


def test_generation_entry_points_check_the_context_length_first(tiny, forwards):
    forwards.reset()
    backend, gen = LocalBackend.from_model(tiny.model), HookedGenerator(tiny.model)
    ids = torch.full((1, 250), 5)
    msg = rf"prompt of 250 tokens plus max_new_tokens=7 is 257 tokens, over the model's context of {N_CTX}"
    with pytest.raises(ValueError, match=msg):
        gen.generate(ids, max_new_tokens=7)
    with pytest.raises(ValueError, match=msg):
        gen.stream(ids, max_new_tokens=7)  # at the call, not at the first token
    with pytest.raises(ValueError, match=f"over the model's context of {N_CTX}"):
        backend.generate(["hi", _TOO_LONG], GenerationConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match=f"over the model's context of {N_CTX}"):
        backend.stream(_TOO_LONG, GenerationConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="prompts must be a non-empty list of strings; got an empty list"):
        backend.generate([])
    assert forwards.by_batch == {}
    assert len(gen.generate(torch.full((1, 250), 5), max_new_tokens=6)[0].token_ids) == 6  # exactly fits


@pytest.mark.unchecked_types
def test_negative_or_non_finite_temperature_and_coefficients_are_errors(tiny, forwards):
    forwards.reset()
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(ValueError, match=r"temperature must be >= 0; got -1\.0"):
        HookedGenerator(tiny.model).generate(ids, max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match=r"temperature must be >= 0; got -1\.0"):
        GenerationConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="temperature must be a finite number; got nan"):
        GenerationConfig(temperature=math.nan)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1; got 0"):
        GenerationConfig(max_new_tokens=0)
    assert forwards.by_batch == {}
    v = torch.ones(256)
    path = "blocks.0.hook_resid_post"
    for make in (lambda c: SteeringHook(tiny.model, v, path, coefficient=c),
                 lambda c: SteeringSpec(layer=0, vector=v, coefficient=c),
                 lambda c: SteeringConfig(vector=v, layer=0, coefficient=c),
                 lambda c: PerSampleSteering(tiny.model, [(0, v, c, (0, 1))]),
                 lambda c: ActivationCappingHook(tiny.model, v, path, threshold=c)):
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ValueError, match="must be a finite number; got"):
                make(bad)
    with pytest.raises(TypeError, match="coefficient must be a number; got str"):
        SteeringHook(tiny.model, v, path, coefficient="2")
    assert SteeringHook(tiny.model, v, path, coefficient=torch.tensor(2.0)).coefficient == 2.0


def test_the_soak_script_checks_every_answer_and_leaves_the_batch_empty():
    """scripts/bench/server_soak.py on the tiny model for 12 s: staggered clients, every way of asking, dropped
    streams; it exits 1 on a mismatch, an error or rows left behind."""
    script = Path(__file__).parents[1] / "scripts" / "bench" / "server_soak.py"
    done = subprocess.run([sys.executable, str(script), "--model", "tiny", "--minutes", "0.2", "--clients", "4",
                           "--sample-s", "2"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "mismatches 0, errors 0" in done.stdout and "left at the end: 0, 0" in done.stdout
