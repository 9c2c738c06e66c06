"""A persistent model server: load a model once, then generate, steer and capture from other processes.

``ModelServer(backend, experiment=None)`` serves one `LocalBackend` over HTTP (standard library only) with JSON
``POST`` endpoints mirroring the backend's methods, ``GET /health``, and an OpenAI-compatible API under ``/v1``:

- ``GET /health`` -> ``{status: "ok", model_id, experiment, variant, model: {name, n_layers, hidden_dim, d_vocab, dtype,
  device}, use_chat_template, limits, batching}``
- ``POST /generate`` ``{prompts, config?, steering?, system_prompts?}`` -> ``{responses: [str], results: [result]}``
  (results as below, without activations)
- ``POST /generate_with_capture`` ``{prompts, config?, capture?, steering?, system_prompts?}`` -> ``{results: [result]}``
  where a result has the `CaptureResult` fields, with ``prompt_activations``/``response_activations`` encoded
  as an activation blob (below)
- ``POST /stream`` ``{prompt, config?, capture?, steering?}`` -> JSON lines (``application/x-ndjson``), one per token
  as it is generated: ``{token, token_id, step, activations}`` (a `TokenOutput`); a failure after the first line is
  sent as a final line ``{error, status}`` (status: the HTTP code it would have had). The connection closes at
  the end (HTTP/1.0).
- ``POST /forward_with_capture`` ``{input_ids, attention_mask?, capture}`` -> ``{activations}``
- ``POST /response_logprobs`` ``{prompt_ids, response_ids, steering?, kl?}`` (lists of token-id lists) ->
  ``{logprobs: [[float]], kl: [[float]] | null}``: teacher-forced log-probabilities of each response token under
  the steering (positions ``all``), and with ``kl: true`` the per-token KL divergence from the unsteered model
- ``POST /prompt_token_ids`` ``{prompts, system_prompts?}`` -> ``{token_ids}`` (the ids generation feeds the model);
  ``POST /token_texts`` ``{token_ids}`` -> ``{tokens}`` (each id decoded alone); ``POST /text_token_ids``
  ``{texts}`` -> ``{token_ids}`` (each text tokenized alone, no special tokens: a response's ids)
- ``GET /v1/models``; ``POST /v1/completions`` and ``POST /v1/chat/completions`` as OpenAI's, ``stream`` (server-sent
  events) included, for the model id (``GET /v1/models``; the experiment's name is accepted too). Supported: ``max_tokens`` (completions default 16; chat
  default as ``config.max_new_tokens``; ``max_completion_tokens`` too), ``temperature`` (default 1.0; 0 is greedy),
  ``seed``, ``stop`` (strings: the text is cut before the first; the row generates on to ``max_tokens`` or EOS,
  a stream stops there),
  ``logprobs`` (completions: 0-20 alternatives; chat: ``logprobs`` + ``top_logprobs`` 0-20; not with ``stream``),
  ``stream_options.include_usage``, ``user``, completions' ``echo`` (the prompt's text and, with ``logprobs``, its
  tokens' teacher-forced log-probabilities lead the answer, the first null; ``max_tokens: 0`` scores the prompt
  only; not with ``stream``); ``n``, ``top_p``, ``best_of`` only at 1, penalties at 0, no ``suffix`` or
  ``logit_bias``. Steering is the extra field ``steering`` (the same entries as ``/generate``). A
  chat of one user message (and an optional system message first) is formatted as ``/generate`` formats a
  prompt; longer conversations go through the tokenizer's chat template. Completion prompts are used as given:
  text, or token ids (a list of ids, or a list of id lists, as lm-eval sends them).
  Errors have OpenAI's shape ``{"error": {message, type, param, code}}`` (an unknown model: 404
  ``model_not_found``).

Requests become the types of `tracelens.model.requests` (`tracelens.serving.parsing`: one parser per type, the
dataclasses' own checks as the rules; the OpenAI translation in `tracelens.serving.openai_api`); tensors, results
and tokens travel in the wire format of `tracelens.serving.codec` (no pickle anywhere). ``config`` has the
`GenerationConfig` fields, ``capture`` the `CaptureSpec` fields ``{layers?, components?}``, a steering entry is
``{layer, vector, coefficient?, component?, positions?, rows?}`` (`SteeringSpec`; ``rows`` ``[start, end]``: only
those prompts of a ``/generate`` or ``/generate_with_capture`` request), or names an extracted vector:
``{trait, layer?, method?, position?, coefficient?, component?, positions?, rows?}`` steers with the best vector of
the experiment's selection (`tracelens.pipeline.selection`) that matches the given fields (position default
``response[:]``; a server without an experiment refuses it with a 400).

Bounds: every validation error is a 400 naming the field (``config: max_new_tokens must be an integer >= 1; got
0``). ``config.max_new_tokens`` (``max_tokens`` under ``/v1``) is in [1, ``max_new_tokens_limit``]; a request has
at most ``max_prompts`` prompts (default 256) and `tracelens.serving.parsing.MAX_STEERING` (64) steering entries;
steering and capture layers lie inside the model and vectors have their site's width; ``stop_token_ids`` lie
inside the vocabulary; ``top_logprobs`` (``logprobs`` for completions) is at most 20; ``temperature`` under
``/v1`` is in [0, 2] (OpenAI's range); a prompt plus its ``max_new_tokens`` fits the model's context; a body is at
most 256 MiB (tests/test_server.py, tests/test_reliability_server.py).

Batching (``batching="continuous"``, the default): every generation (``/generate``, ``/generate_with_capture``,
``/stream`` and ``/v1`` with or without ``stream``) is a job for one worker thread that runs a
`tracelens.model.continuous.ContinuousBatch`. Between two decode steps a waiting job's prompts join the running
batch (their prompt pass runs then, with the job's own steering), and a row that finishes leaves it at once, so its
client is answered without waiting for the others. Rows of any settings share the batch: each keeps its steering,
temperature, ``max_new_tokens``, stop ids, capture and logprobs. At most ``max_batch_size`` rows run at once (a
larger request starts in slices as rows free); a greedy request gets the same tokens as alone
(tests/test_server.py, tests/test_continuous.py). Seeded sampling waits for an empty batch and runs alone (its
random draws would depend on the batch). ``batching="window"`` is the earlier window batcher's policy on the same
engine: jobs start only into an empty batch, ``batch_window_ms`` after the oldest arrived (or once
``max_batch_size`` prompts wait). At most ``max_queue`` requests wait; more get 503 with the reason and
``Retry-After: 1`` (as every 503 has). One lock serialises all model access; the worker holds it for one step at a
time and lets ``/forward_with_capture``, ``/response_logprobs``, ``echo`` and the checks of new requests go
between steps, so hooks of different calls never mix.

Security: binds 127.0.0.1 by default and then checks the Host header (against DNS rebinding); a non-loopback
host is refused unless a token is set. With a token every request (``/health`` and ``/v1`` included) must send
``Authorization: Bearer <token>``, else 401. Malformed requests get 4xx ``{"error": reason}`` (a prompt that does
not fit the model's context with its ``max_new_tokens`` included); other failures 500 ``{"error": message}``,
never a traceback.

Reliability (settings of `ModelServer`): ``config.max_new_tokens`` defaults, when absent, to the smaller of 256
and ``max_new_tokens_limit``. Each request has a deadline of ``request_timeout``
seconds for waiting on the model plus generating; past it the answer is 503 (a stream ends with an ``{error}``
line with status 503). Every socket read or write may block at most ``io_timeout`` seconds: a body shorter than its
Content-Length gets 408, and a client that stops reading is dropped. A request's rows leave the batch at the
next step when its client disconnects or its deadline passes. A stream's tokens go into a per-request buffer of at
most ``stream_buffer`` tokens, so the worker never waits on a reader; a reader that falls that far behind is dropped
and its row leaves the batch.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit

import torch

from tracelens.errors import ConfigError, GenerationCancelled, RequestError
from tracelens.model.continuous import BatchRow, ContinuousBatch
from tracelens.model.generation import HookedGenerator, check_capture
from tracelens.model.requests import (CaptureResult, CaptureSpec, GenerationConfig, SteeringSpec, TokenOutput,
                                      check_every_position)
from tracelens.store import Experiment, get_model_variant
from tracelens.pipeline.selection import select_vector
from tracelens.model.prompts import encode, left_pad, pad_id
from tracelens.serving.backends import LocalBackend, token_logprobs
from tracelens.serving.codec import encode_activations, result_to_json, token_to_json
from tracelens.app.local_http import (
    LOCAL_HOSTS,
    check_token,
    host_header_ok,
    http_url,
    loopback_host_headers,
    serve_until_interrupted,
    threading_server,
    token_ok,
)
from tracelens.serving.openai_api import Echo, OpenAIAPI, OpenAIRequest, openai_error, sse_error
from tracelens.serving.prompting import rows_within
from tracelens.serving.protocol import DEFAULT_PORT, TOKEN_ENV
from tracelens.serving.parsing import (
    bad_request,
    check_fields,
    parse_capture,
    parse_config,
    parse_ids,
    parse_prompts,
    parse_id_rows,
    parse_steering,
)

MAX_BODY_BYTES = 256 * 1024 * 1024
BATCHING = ("continuous", "window")
"""`ModelServer`'s batching policies (module docstring, "Batching")."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _ClientGone(Exception):
    """The client closed its connection (or stopped reading): there is no one to answer."""


# --- the server -------------------------------------------------------------------------------------


class _Request:
    """One request's deadline (``timeout`` seconds from its start) and its client's connection."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock, self.timeout = sock, timeout
        self.deadline = time.monotonic() + timeout
        self.gone = threading.Event()  # set once the client is known to be gone, or has been dropped

    def remaining(self) -> float:
        """Seconds left before the deadline (negative once it has passed)."""
        return self.deadline - time.monotonic()

    def client_gone(self) -> bool:
        if not self.gone.is_set() and _peer_closed(self.sock):
            self.gone.set()
        return self.gone.is_set()

    def cancelled(self) -> bool:
        """Whether generation should stop: the deadline passed or the client has gone."""
        return self.remaining() <= 0 or self.client_gone()

    def cancelled_error(self, err: GenerationCancelled) -> Exception:
        """What to raise for a generation `cancelled` stopped."""
        if self.gone.is_set():
            return _ClientGone(str(err))
        return RequestError(f"request deadline of {self.timeout:g} s passed ({err})", HTTPStatus.SERVICE_UNAVAILABLE)


def _peer_closed(sock: socket.socket) -> bool:
    """True when the client has closed or reset its connection (its end reads as end-of-file)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # reset, or closed here
        return True


class _End:
    """The last item of a `_TokenStream`'s buffer: how generation ended (``error`` None: normally)."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class _TokenStream:
    """The tokens of one streamed job, put by the scheduler as they are generated into a buffer of at most
    ``limit`` tokens (the scheduler never waits for the reader), then one `_End`. A reader that falls ``limit``
    tokens behind is dropped: its row leaves the batch at the next step."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: queue.Queue = queue.Queue()
        self.overflowed = False

    def put(self, token: TokenOutput) -> bool:
        """Buffer ``token``; False (and nothing buffered) when the reader is ``limit`` tokens behind."""
        if self.items.qsize() >= self.limit:
            self.overflowed = True
            return False
        self.items.put(token)
        return True

    def end(self, error: BaseException | None) -> None:
        self.items.put(_End(error))

    def overflow_error(self) -> "_ClientGone":
        return _ClientGone(f"the reader fell {self.limit} tokens behind")

    def __iter__(self) -> Iterator[TokenOutput]:
        """The tokens in order, then raises the error that ended generation, if any."""
        while not isinstance(item := self.items.get(), _End):
            yield item
        if item.error is not None:
            raise item.error


@dataclass(eq=False)
class _Job:
    """One generation request waiting for (or in) the running batch: its prompts as the model sees them, its
    settings, its steering (over its own prompts) and its capture: of each token as it is generated for a stream
    (``stream``: where its tokens go), of the whole answer by one teacher-forced forward otherwise."""

    texts: list[str]
    ids: list[list[int]]  # the prompts' tokens, as the model gets them
    config: GenerationConfig
    steering: list[SteeringSpec] | None
    capture: CaptureSpec | None
    top_logprobs: int | None
    req: _Request
    stream: _TokenStream | None = None
    queued_at: float = 0.0
    rows: list[BatchRow] = field(default_factory=list)  # the started rows, in prompt order
    results: list[CaptureResult] | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def alone(self) -> bool:
        """Seeded sampling runs alone: its random draws would depend on the batch."""
        return self.config.temperature > 0 and self.config.seed is not None

    def end(self, error: BaseException | None = None) -> None:
        """Answer the job: its results (already set) or ``error``."""
        self.error = error
        if self.stream is not None:
            self.stream.end(error)
        self.done.set()


class _Scheduler:
    """Runs every generation on one worker thread, as one `ContinuousBatch` (module docstring, "Batching").

    Each turn, under the model lock, the worker answers 503 or drops the jobs whose deadline passed or whose client
    has gone (their rows leave at once), starts waiting jobs in arrival order while the batch has fewer than
    ``max_rows`` rows (a job larger than the room starts in slices as rows free), runs one decode step, and answers
    every job whose rows have all finished. It keeps the lock (and the steps' hooks) from turn to turn until the
    batch is empty or a `ModelServer.model_lock` waits; it then removes the hooks and lets that call go first.
    ``policy="window"``: jobs start only into an empty batch, ``window`` seconds after the oldest arrived (or
    once ``max_rows`` rows wait). A seeded sampling job waits for an empty batch and runs alone through the
    backend. At most ``max_queue`` jobs wait (503 beyond).
    """

    def __init__(self, app: "ModelServer", policy: str, window: float, max_rows: int, max_queue: int) -> None:
        self.app, self.policy, self.window, self.max_rows, self.max_queue = app, policy, window, max_rows, max_queue
        self.batch = ContinuousBatch(app.backend.model)
        self.cond = threading.Condition()
        self.pending: list[_Job] = []
        self.running: list[_Job] = []
        self.closed = False
        self.thread = threading.Thread(target=self._loop, daemon=True, name="tracelens-batcher")
        self.thread.start()

    def submit(self, job: _Job) -> None:
        """Queue ``job``; 503 when ``max_queue`` jobs wait already."""
        with self.cond:
            if self.closed:
                raise RequestError("the model server is shutting down", HTTPStatus.SERVICE_UNAVAILABLE)
            if len(self.pending) >= self.max_queue:
                raise RequestError(f"the model server's queue is full ({len(self.pending)} requests waiting, "
                                   f"max_queue={self.max_queue}); retry later", HTTPStatus.SERVICE_UNAVAILABLE)
            job.queued_at = time.monotonic()
            self.pending.append(job)
            self.cond.notify_all()

    def run(self, job: _Job) -> list[CaptureResult]:
        """Queue ``job`` and wait for its results; 503 when the queue is full or the job's deadline passes first
        (it then leaves the queue, or the batch at the next step)."""
        self.submit(job)
        while not job.done.wait(0.02):
            if job.req.cancelled():
                with self.cond:
                    queued = job in self.pending
                    if queued:
                        self.pending.remove(job)
                raise job.req.cancelled_error(GenerationCancelled(
                    "while waiting for the model" if queued else "while its batch was generating"))
        if job.error is not None:
            raise job.error
        return job.results

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join()
        shutdown = RequestError("the model server is shutting down", HTTPStatus.SERVICE_UNAVAILABLE)
        for job in self.pending + self.running:
            job.end(shutdown)
        self.pending.clear()
        self.running.clear()

    @property
    def rows(self) -> int:
        """Rows in the running batch now."""
        return len(self.batch.rows)

    def _loop(self) -> None:
        lock = self.app.lock
        while True:
            with self.cond:
                while not self.closed and not self.running:
                    wait = self._wait()
                    if wait is not None and wait <= 0:
                        break
                    self.cond.wait(wait)
                if self.closed:
                    return
            with lock:  # held from step to step while no other model call waits for it
                try:
                    self._turn()
                    while self.running and not self.app.lock_waiters and not self.closed:
                        self._turn()
                finally:
                    self.batch.unhook()
            while self.app.lock_waiters and not self.closed:  # they go between two steps
                time.sleep(0.0005)

    def _wait(self) -> float | None:
        """Seconds until a waiting job may start into the empty batch (None: none waits)."""
        if not self.pending:
            return None
        if self.policy == "continuous" or sum(len(j.texts) for j in self.pending) >= self.max_rows:
            return 0.0
        return self.pending[0].queued_at + self.window - time.monotonic()

    def _turn(self) -> None:
        """One step of the batch, under the model lock."""
        try:
            self._leave_cancelled()
            for job, start, end in self._admit():
                self._start(job, start, end)
            if self.batch.rows:
                self.batch.step()
            self._answer_finished()
        except Exception as err:  # a failed step fails every running job (500); the batch starts afresh
            for job in self.running:
                job.end(err)
            self.running.clear()
            self.batch.unhook()
            self.batch = ContinuousBatch(self.app.backend.model)

    def _leave_cancelled(self) -> None:
        with self.cond:
            for job in [j for j in self.pending if j.req.cancelled()]:
                self.pending.remove(job)
                job.end(job.req.cancelled_error(GenerationCancelled("while waiting for the model")))
        for job in [j for j in self.running if j.req.cancelled() or (j.stream is not None and j.stream.overflowed)]:
            self.batch.remove(job.rows)
            self.running.remove(job)
            if job.stream is not None and job.stream.overflowed:
                job.req.gone.set()
                job.end(job.stream.overflow_error())
            else:
                job.end(job.req.cancelled_error(GenerationCancelled("while its batch was generating")))

    def _admit(self) -> list[tuple[_Job, int, int]]:
        """The slices ``(job, start, end)`` of prompts to start now: running jobs' unstarted prompts first, then
        waiting jobs in arrival order, while the batch has room (see the class docstring for the window policy)."""
        room = self.max_rows - len(self.batch.rows)
        todo = []
        for job in self.running:
            n = min(room, len(job.texts) - len(job.rows))
            if n > 0:
                todo.append((job, len(job.rows), len(job.rows) + n))
                room -= n
        with self.cond:
            empty = not self.batch.rows and not self.running
            if self.policy == "window" and not (empty and (wait := self._wait()) is not None and wait <= 0):
                return todo
            while self.pending and room > 0:
                job = self.pending[0]
                if job.alone and not (empty and not todo):
                    break
                self.pending.pop(0)
                self.running.append(job)
                n = len(job.texts) if job.alone else min(room, len(job.texts))
                todo.append((job, 0, n))
                room -= n
                if job.alone:
                    break
        return todo

    def _start(self, job: _Job, start: int, end: int) -> None:
        """Start prompts ``start..end-1`` of ``job`` in the batch (a seeded job: run it whole, alone)."""
        b = self.app.backend
        try:
            if job.alone:
                return self._run_alone(job)
            ids, mask = left_pad(job.ids[start:end], pad_id(b.tokenizer))
            on_token = None if job.stream is None else functools.partial(self._streamed, job)
            job.rows += self.batch.add(ids, mask, job.config, rows_within(job.steering, start, end),
                                       job.capture if job.stream is not None else None,
                                       top_logprobs=job.top_logprobs, on_token=on_token)
        except Exception as err:  # this job's failure only (500)
            self.batch.remove(job.rows)
            self.running.remove(job)
            job.end(err)

    def _streamed(self, job: _Job, row: BatchRow | None, token: TokenOutput) -> bool:
        """Put ``token`` (with its text, without logits) into the job's stream; False when its reader is too far
        behind (`_TokenStream.put`)."""
        return job.stream.put(replace(token, token=self.app.backend.tokenizer.decode([token.token_id]), logits=None))

    def _run_alone(self, job: _Job) -> None:
        """Generate a seeded job as one `HookedGenerator` call (its draws as alone), the batch being empty."""
        b, c = self.app.backend, job.config
        self.running.remove(job)
        ids, mask = left_pad(job.ids, pad_id(b.tokenizer))
        gen = HookedGenerator(b.model)
        try:
            if job.stream is not None:
                tokens = gen.stream(ids, mask, c.max_new_tokens, c.temperature, job.capture, job.steering,
                                    c.stop_token_ids, c.seed, cancel=job.req.cancelled)
                for t in tokens:
                    if not self._streamed(job, None, t):
                        tokens.close()
                        job.req.gone.set()
                        return job.end(job.stream.overflow_error())
            else:
                k = job.top_logprobs
                outs = gen.generate(ids, mask, c.max_new_tokens, c.temperature, None, job.steering, c.stop_token_ids,
                                    c.seed, output_logits=k is not None, cancel=job.req.cancelled)
                scored = None if k is None else [token_logprobs(o.logits, o.token_ids, k) for o in outs]
                job.results = b.results(job.texts, [o.token_ids for o in outs], scored, job.capture, job.steering,
                                        job.ids)
            job.end()
        except GenerationCancelled as err:
            job.end(job.req.cancelled_error(err))

    def _answer_finished(self) -> None:
        for job in [j for j in self.running if len(j.rows) == len(j.texts) and all(r.finished for r in j.rows)]:
            self.running.remove(job)
            try:
                if job.stream is None:
                    scored = None if job.top_logprobs is None else [(r.logprobs, r.top) for r in job.rows]
                    job.results = self.app.backend.results(job.texts, [r.token_ids for r in job.rows], scored,
                                                           job.capture, job.steering, job.ids)
                job.end()
            except Exception as err:  # the capture forward failed: this job's failure (500)
                job.end(err)


@dataclass
class _Stream:
    """A streamed answer: ``body(tokens)`` turns the generated tokens into the pieces written as they come;
    ``error(message, status)`` is the last piece when generation fails after the first."""

    tokens: _TokenStream
    body: Callable[[Iterator[TokenOutput]], Iterator[bytes]]
    error: Callable[[str, int], bytes]
    content_type: str


def _ndjson_tokens(tokens: Iterator[TokenOutput]) -> Iterator[bytes]:
    for t in tokens:
        yield (json.dumps(token_to_json(t)) + "\n").encode()


def _ndjson_error(message: str, status: int) -> bytes:
    return (json.dumps({"error": message, "status": int(status)}) + "\n").encode()


class _Handler(BaseHTTPRequestHandler):
    server_version = "tracelens-model-server"
    app: "ModelServer"  # set on the subclass made by ModelServer, with `timeout` (socket timeout, seconds)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        req = _Request(self.connection, self.app.request_timeout)
        openai = urlsplit(self.path).path.startswith("/v1/")
        try:
            status, answer = HTTPStatus.OK, self._answer(method, req)
        except _ClientGone as err:
            return self._drop(err)
        except RequestError as err:
            status, answer = err.status, openai_error(str(err), err.status, err.code) if openai else {"error": str(err)}
        except Exception as err:  # JSON, never a traceback
            self.log_error("model server error %s: %s", type(err).__name__, err)
            status, message = HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(err).__name__}: {err}"
            answer = openai_error(message, status) if openai else {"error": message}
        if answer is None:  # streamed
            return None
        try:
            self._send_json(status, answer, status == HTTPStatus.UNAUTHORIZED)
        except OSError as err:  # reset, or not read for io_timeout
            self._drop(err)

    def _answer(self, method: str, req: _Request) -> dict | None:
        """The JSON answer to the request, or None once a stream has been sent."""
        self.app._check_request(self)
        path = urlsplit(self.path).path
        if method == "GET":
            route = self.app.get_routes.get(path)
            if route is None:
                raise RequestError(f"no GET route {path!r}; GET routes: {', '.join(self.app.get_routes)}",
                                   HTTPStatus.NOT_FOUND)
            return route()
        route = self.app.routes.get(path)
        if route is None:
            raise RequestError(f"no POST route {path!r}; routes: {', '.join(self.app.routes)}", HTTPStatus.NOT_FOUND)
        answer = route(self._read_body(), req)
        if isinstance(answer, _Stream):
            return self._stream(answer, req)
        return answer

    def _drop(self, reason) -> None:
        self.close_connection = True
        self.log_error("client dropped: %s", reason)

    def _read_body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("a POST needs a Content-Length header", HTTPStatus.LENGTH_REQUIRED)
        n = int(length)
        if n > MAX_BODY_BYTES:
            raise RequestError(f"request body over {MAX_BODY_BYTES} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        self.close_connection = True  # a body cut short leaves the connection unusable
        try:
            raw = self.rfile.read(n)
        except TimeoutError:
            raise RequestError(f"request body (Content-Length: {n}) not received within {self.timeout:g} s",
                               HTTPStatus.REQUEST_TIMEOUT) from None
        if len(raw) != n:
            raise RequestError(f"request body has {len(raw)} bytes but Content-Length says {n}")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(f"body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise RequestError("body must be a JSON object")
        return body

    def _stream(self, stream: _Stream, req: _Request) -> None:
        items = stream.body(iter(stream.tokens))
        try:
            first = next(items, None)  # a failure before the first piece is answered with its status
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", stream.content_type)
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            try:
                if first is not None:
                    self._write(first)
                for piece in items:
                    self._write(piece)
            except _ClientGone:
                raise
            except RequestError as err:
                self._write(stream.error(str(err), err.status))
            except Exception as err:
                self.log_error("model server stream error %s: %s", type(err).__name__, err)
                self._write(stream.error(f"{type(err).__name__}: {err}", HTTPStatus.INTERNAL_SERVER_ERROR))
        finally:
            items.close()
            req.gone.set()  # stops a generation that is still running
        self.close_connection = True

    def _write(self, piece: bytes) -> None:
        try:
            self.wfile.write(piece)
            self.wfile.flush()
        except OSError as err:  # reset, or not read for io_timeout
            raise _ClientGone(f"{type(err).__name__}: {err}") from None

    def _send_json(self, status: int, obj, auth_challenge: bool = False) -> None:
        body = json.dumps(obj, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if auth_challenge:
            self.send_header("WWW-Authenticate", 'Bearer realm="tracelens"')
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        if self.app.verbose:
            super().log_message(format, *args)


class ModelServer:
    """Serve ``backend`` (a `LocalBackend`) over HTTP as ``model_id`` (default: the last part of the model's name),
    with steering by trait name from ``experiment`` (None: steering by vector only); see the module docstring.

    The socket is bound on construction (``port=0`` picks a free one; see ``.port``/``.url``); call
    ``serve_forever()`` or ``start()`` (a daemon thread), and ``close()`` when done. Raises ValueError for a
    non-loopback ``host`` without a ``token``, and for settings out of range. Settings (see the module docstring):
    ``max_new_tokens_limit`` (tokens, default 1024), ``max_prompts`` (prompts per request, default 256),
    ``request_timeout`` (seconds, default 600), ``io_timeout``
    (seconds, default 30), ``stream_buffer`` (tokens, default 256), ``batching`` ("continuous" or "window"),
    ``batch_window_ms`` (milliseconds, default 10; the window policy's), ``max_batch_size`` (rows decoding at
    once, default 16), ``max_queue`` (requests waiting, default 64). ``experiments_root``
    is where steering vectors named by trait are read (default: `tracelens.store.experiments_root()`).
    """

    def __init__(self, backend: LocalBackend, experiment: str | None = None, host: str = "127.0.0.1",
                 port: int = DEFAULT_PORT, token: str | None = None, *, model_id: str | None = None,
                 variant: str | None = None, verbose: bool = True,
                 max_new_tokens_limit: int = 1024, max_prompts: int = 256, request_timeout: float = 600.0,
                 io_timeout: float = 30.0,
                 stream_buffer: int = 256, batching: str = "continuous", batch_window_ms: int | float = 10.0,
                 max_batch_size: int = 16, max_queue: int = 64,
                 experiments_root: str | os.PathLike | None = None) -> None:
        check_token(token)
        if host not in LOCAL_HOSTS and token is None:
            raise ConfigError(f"host {host!r} would let anyone on the network run the model; bind 127.0.0.1, "
                             "or set a token (every request must then send 'Authorization: Bearer <token>')")
        for name, value in (("max_new_tokens_limit", max_new_tokens_limit), ("max_prompts", max_prompts),
                            ("stream_buffer", stream_buffer),
                            ("max_batch_size", max_batch_size), ("max_queue", max_queue)):
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1; got {value!r}")
        for name, value in (("request_timeout", request_timeout), ("io_timeout", io_timeout)):
            if not _is_num(value) or value <= 0:
                raise ConfigError(f"{name} must be a finite number of seconds > 0; got {value!r}")
        if batching not in BATCHING:
            raise ConfigError(f"batching must be one of {', '.join(BATCHING)}; got {batching!r}")
        if not _is_num(batch_window_ms) or batch_window_ms < 0:
            raise ConfigError(f"batch_window_ms must be a finite number of milliseconds >= 0; got {batch_window_ms!r}")
        self.backend, self.experiment, self.variant = backend, experiment, variant
        self.model_id = model_id or Path(str(backend.model_name or "model")).name
        self.exp = (None if experiment is None else
                    Experiment.named(experiment, None if experiments_root is None else Path(experiments_root)))
        self.token, self.verbose = token, verbose
        self.max_new_tokens_limit, self.max_prompts = max_new_tokens_limit, max_prompts
        self.stream_buffer = stream_buffer
        self.request_timeout, self.io_timeout = float(request_timeout), float(io_timeout)
        self.openai = OpenAIAPI(backend, self.model_id, frozenset(HookedGenerator(backend.model).stop_ids().tolist()),
                                max_new_tokens_limit, max_prompts, self._steering,
                                () if experiment is None else (experiment,))
        self.created = int(time.time())
        self.lock = threading.Lock()
        self.lock_waiters = 0  # model_lock calls waiting for the lock (the batcher lets them go first)
        self.routes = {"/generate": self.generate, "/generate_with_capture": self.generate_with_capture,
                       "/stream": self.stream, "/forward_with_capture": self.forward_with_capture,
                       "/prompt_token_ids": self.prompt_token_ids, "/token_texts": self.token_texts,
                       "/text_token_ids": self.text_token_ids,
                       "/response_logprobs": self.response_logprobs,
                       "/v1/completions": self.completions, "/v1/chat/completions": self.chat_completions}
        self.get_routes = {"/health": self.health, "/v1/models": self.models}
        handler = type("_BoundHandler", (_Handler,), {"app": self, "timeout": self.io_timeout})
        self.httpd = threading_server(host, port, handler)
        self.host = host
        self.port = self.httpd.server_address[1]
        self.allowed_hosts = None if host not in LOCAL_HOSTS else loopback_host_headers(self.port)
        self._thread: threading.Thread | None = None
        self.batcher = _Scheduler(self, batching, batch_window_ms / 1000, max_batch_size, max_queue)

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)

    # --- lifecycle ---

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.1)

    def start(self) -> "ModelServer":
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="tracelens-model-server")
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()
        self.batcher.close()

    def __enter__(self) -> "ModelServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- checks ---

    def _check_request(self, handler: BaseHTTPRequestHandler) -> None:
        if not token_ok(handler.headers, self.token):
            raise RequestError("missing or wrong token: send 'Authorization: Bearer <token>'", HTTPStatus.UNAUTHORIZED)
        if not host_header_ok(handler.headers, self.allowed_hosts):
            raise RequestError("unexpected Host header; use the server's 127.0.0.1 address", HTTPStatus.FORBIDDEN)

    @contextlib.contextmanager
    def model_lock(self, req: _Request) -> Iterator[None]:
        """Hold the model lock (between two decode steps of the batch); 503 when it is not free before ``req``'s
        deadline."""
        with self._counted_waiter():
            got = self.lock.acquire(timeout=max(req.remaining(), 0.0))
        if not got:
            raise RequestError(f"the model stayed busy past this request's deadline of {self.request_timeout:g} s; "
                               "retry later", HTTPStatus.SERVICE_UNAVAILABLE)
        try:
            yield
        finally:
            self.lock.release()

    @contextlib.contextmanager
    def _counted_waiter(self) -> Iterator[None]:
        with self.batcher.cond:
            self.lock_waiters += 1
        try:
            yield
        finally:
            with self.batcher.cond:
                self.lock_waiters -= 1

    def _prompt_ids(self, texts: list[str], config: GenerationConfig, steering: list[SteeringSpec] | None,
                    capture: CaptureSpec | None, req: _Request, ids: list[list[int]] | None = None) -> list[list[int]]:
        """The token ids of the formatted ``texts`` (or ``ids`` as given), after a 400 for what the model cannot run
        (`LocalBackend.check_token_prompts`: a prompt that does not fit the model's context, steering or capture
        layers outside it, vectors of another width), before any model work. The checks read the model's module
        tree, which a decode step's fast path rewires: they hold the model lock."""
        b = self.backend
        with self.model_lock(req), bad_request():
            ids = ids if ids is not None else [encode(b.tokenizer, t) for t in texts]
            b.check_token_prompts(ids, config, steering=steering, capture=capture)
        return ids

    def _batched(self, texts: list[str], config: GenerationConfig, steering: list[SteeringSpec] | None,
                 capture: CaptureSpec | None, req: _Request, top_logprobs: int | None = None,
                 ids: list[list[int]] | None = None) -> list[CaptureResult]:
        """Results for the formatted ``texts`` (tokens: ``ids``, None: the texts encoded), generated in the running
        batch with other requests (`_Scheduler`)."""
        ids = self._prompt_ids(texts, config, steering, capture, req, ids)
        return self.batcher.run(_Job(texts, ids, config, steering, capture, top_logprobs, req))

    def _named_vector(self, entry: dict, what: str) -> tuple[int, torch.Tensor]:
        """``(layer, vector)`` of a steering entry that names a trait: the best vector of the experiment's
        selection (`tracelens.pipeline.selection`) matching its ``layer`` (already counted from the front),
        ``method``, ``position`` (default ``response[:]``) and ``component``; 400 when there is none."""
        if self.exp is None:
            raise RequestError(f"{what}: steering by trait name needs an experiment; this server has none (start it "
                               "with --experiment, or send the vector itself)")
        args = {k: entry.get(k) for k in ("trait", "method")}
        args["position"] = entry.get("position", "response[:]")
        for k, v in args.items():
            if v is not None and not isinstance(v, str):
                raise RequestError(f"{what}.{k} must be a string; got {v!r}")
        try:
            variant = get_model_variant(self.exp, None, "extraction").name
            best = select_vector(self.exp, args["trait"], variant=variant, position=args["position"],
                                 component=entry.get("component", "residual"), layer=entry.get("layer"),
                                 method=args["method"], allow_unscored=True)
            return best.layer, self.exp.vector(args["trait"], variant, best.position, best.component, best.method,
                                               best.layer)
        except (FileNotFoundError, KeyError, ValueError) as err:
            raise RequestError(f"{what}: no steering vector for trait {args['trait']!r} in experiment "
                               f"{self.exp.name!r} ({err})") from None

    def _steering(self, v, n_rows: int | None = None) -> list[SteeringSpec] | None:
        return parse_steering(v, self.backend.n_layers, self._named_vector, n_rows)

    # --- endpoints (each takes the parsed JSON body and the request) ---

    def health(self) -> dict:
        b = self.backend
        cfg = b.model.cfg
        return {"status": "ok", "model_id": self.model_id, "experiment": self.experiment, "variant": self.variant,
                "model": {"name": getattr(cfg, "model_name", None), "n_layers": b.n_layers, "hidden_dim": b.hidden_dim,
                          "d_vocab": getattr(cfg, "d_vocab", None), "n_ctx": getattr(cfg, "n_ctx", None),
                          "dtype": str(getattr(cfg, "dtype", "")), "device": str(b.device)},
                "use_chat_template": b.use_chat_template,
                "limits": {"max_new_tokens": self.max_new_tokens_limit, "max_prompts": self.max_prompts,
                           "request_timeout_s": self.request_timeout},
                "batching": {"policy": self.batcher.policy, "window_ms": self.batcher.window * 1000,
                             "max_batch_size": self.batcher.max_rows, "max_queue": self.batcher.max_queue,
                             "waiting": len(self.batcher.pending), "running_rows": self.batcher.rows}}

    def _config(self, body: dict) -> GenerationConfig:
        d_vocab = getattr(self.backend.model.cfg, "d_vocab", None)
        return parse_config(body.get("config"), self.max_new_tokens_limit, d_vocab)

    def _generation_args(self, body: dict, with_capture: bool):
        b = self.backend
        optional = ("config", "steering", "system_prompts") + (("capture",) if with_capture else ())
        check_fields(body, ("prompts",), optional)
        prompts, system = self._prompts_and_system(body)
        config = self._config(body)
        steering = self._steering(body.get("steering"), len(prompts))
        capture = parse_capture(body.get("capture")) if with_capture else None
        texts = [b.format(p, s) for p, s in zip(prompts, system or [None] * len(prompts))]
        return texts, config, steering, capture

    def _prompts_and_system(self, body: dict) -> tuple[list[str], list[str | None] | None]:
        """A request's ``prompts`` and its optional ``system_prompts`` (one per prompt, nulls allowed)."""
        prompts = parse_prompts(body["prompts"], "prompts", self.max_prompts)
        system = body.get("system_prompts")
        if system is not None:
            parse_prompts(system, "system_prompts", self.max_prompts, allow_none_items=True)
            if len(system) != len(prompts):
                raise RequestError(f"system_prompts must have one entry per prompt ({len(prompts)}); got {len(system)}")
        return prompts, system

    def _d_vocab(self) -> int | None:
        return getattr(self.backend.model.cfg, "d_vocab", None)

    def generate(self, body: dict, req: _Request) -> dict:
        texts, config, steering, _ = self._generation_args(body, False)
        results = self._batched(texts, config, steering, None, req)
        return {"responses": [r.response_text for r in results],
                "results": [result_to_json(r, activations=False) for r in results]}

    def generate_with_capture(self, body: dict, req: _Request) -> dict:
        texts, config, steering, capture = self._generation_args(body, True)
        return {"results": [result_to_json(r) for r in self._batched(texts, config, steering, capture, req)]}

    def stream(self, body: dict, req: _Request) -> _Stream:
        """Validate now; then generate in the running batch, token by token (see `_TokenStream`)."""
        b = self.backend
        check_fields(body, ("prompt",), ("config", "capture", "steering"))
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise RequestError(f"prompt must be a string; got {type(prompt).__name__}")
        config = self._config(body)
        capture = parse_capture(body.get("capture"))
        steering = self._steering(body.get("steering"), 1)
        return _Stream(self._streamed(b.format(prompt), None, config, steering, capture, req), _ndjson_tokens,
                       _ndjson_error, "application/x-ndjson")

    def _streamed(self, text: str, ids: list[int] | None, config: GenerationConfig,
                  steering: list[SteeringSpec] | None, capture: CaptureSpec | None, req: _Request) -> _TokenStream:
        """The tokens of the formatted ``text`` (its tokens: ``ids``, None: encoded), generated in the running batch
        as a stream job (checked first)."""
        rows = self._prompt_ids([text], config, steering, capture, req, None if ids is None else [ids])
        tokens = _TokenStream(self.stream_buffer)
        self.batcher.submit(_Job([text], rows, config, steering, capture, None, req, tokens))
        return tokens

    def forward_with_capture(self, body: dict, req: _Request) -> dict:
        b = self.backend
        check_fields(body, ("input_ids", "capture"), ("attention_mask",))
        ids = parse_ids(body["input_ids"], "input_ids", getattr(b.model.cfg, "d_vocab", None))
        n_ctx = getattr(b.model.cfg, "n_ctx", None)
        if n_ctx is not None and ids.shape[1] > n_ctx:
            raise RequestError(f"input_ids must have at most the model's context of {n_ctx} positions; "
                               f"got {ids.shape[1]}")
        mask = None
        if body.get("attention_mask") is not None:
            mask = parse_ids(body["attention_mask"], "attention_mask", None)
            if mask.shape != ids.shape:
                raise RequestError(f"attention_mask shape must equal input_ids shape {list(ids.shape)}; "
                                   f"got {list(mask.shape)}")
            if ((mask != 0) & (mask != 1)).any():
                raise RequestError("attention_mask must hold only 0 and 1")
        capture = parse_capture(body["capture"], required=True)
        with bad_request("capture"):
            check_capture(b.model, capture)
        with self.model_lock(req):
            acts = b.forward_with_capture(ids, mask, capture)
            encoded = encode_activations(acts)
        return {"activations": encoded}

    def prompt_token_ids(self, body: dict, req: _Request) -> dict:
        check_fields(body, ("prompts",), ("system_prompts",))
        prompts, system = self._prompts_and_system(body)
        return {"token_ids": self.backend.prompt_token_ids(prompts, system)}

    def token_texts(self, body: dict, req: _Request) -> dict:
        check_fields(body, ("token_ids",), ())
        [ids] = parse_id_rows([body["token_ids"]], "token_ids", self._d_vocab())
        return {"tokens": self.backend.token_texts(ids)}

    def text_token_ids(self, body: dict, req: _Request) -> dict:
        check_fields(body, ("texts",), ())
        return {"token_ids": self.backend.text_token_ids(parse_prompts(body["texts"], "texts", self.max_prompts))}

    def response_logprobs(self, body: dict, req: _Request) -> dict:
        check_fields(body, ("prompt_ids", "response_ids"), ("steering", "kl"))
        prompts = parse_id_rows(body["prompt_ids"], "prompt_ids", self._d_vocab(), self.max_prompts)
        responses = parse_id_rows(body["response_ids"], "response_ids", self._d_vocab(), self.max_prompts)
        if len(prompts) != len(responses):
            raise RequestError(f"response_ids must have one row per prompt_ids row ({len(prompts)}); got {len(responses)}")
        n_ctx = getattr(self.backend.model.cfg, "n_ctx", None)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            if n_ctx is not None and len(p) + len(r) > n_ctx:
                raise RequestError(f"row {i} must fit the model's context of {n_ctx} tokens; got {len(p) + len(r)}")
        steering = self._steering(body.get("steering"))
        with bad_request():  # the backend's own rule, as a 400 here
            check_every_position(steering)
        kl = body.get("kl", False)
        if not isinstance(kl, bool):
            raise RequestError(f"kl must be true or false; got {kl!r}")
        with self.model_lock(req):
            out = self.backend.response_logprobs(prompts, responses, steering, kl=kl)
        return {"logprobs": [t.tolist() for t in out.logprobs],
                "kl": None if out.kl is None else [t.tolist() for t in out.kl]}

    # --- OpenAI-compatible endpoints (see the module docstring) ---

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": self.created,
                                            "owned_by": "tracelens"}]}

    def completions(self, body: dict, req: _Request) -> dict | _Stream:
        return self._openai(self.openai.parse(body, False), req)

    def chat_completions(self, body: dict, req: _Request) -> dict | _Stream:
        return self._openai(self.openai.parse(body, True), req)

    def _openai(self, r: OpenAIRequest, req: _Request) -> dict | _Stream:
        if r.stream:
            ids = None if r.token_ids is None else r.token_ids[0]
            return _Stream(self._streamed(r.texts[0], ids, r.config, r.steering, None, req),
                           lambda items: self.openai.sse(r, items), sse_error, "text/event-stream")
        echoed = self._echo(r, req) if r.echo else None
        results = self._batched(r.texts, r.config, r.steering, None, req, r.logprobs, r.token_ids) if r.generate else []
        return self.openai.answer(r, results, echoed)

    def _echo(self, r: OpenAIRequest, req: _Request) -> list[Echo]:
        """The prompts of an ``echo`` request scored under its steering (`LocalBackend.prompt_logprobs`), with
        ``r.logprobs`` alternatives per token; 400 for a prompt over the context or steering not at every
        position."""
        rows = r.token_ids or [encode(self.backend.tokenizer, t) for t in r.texts]
        n_ctx = getattr(self.backend.model.cfg, "n_ctx", None)
        for i, row in enumerate(rows):
            if n_ctx is not None and len(row) > n_ctx:
                raise RequestError(f"prompt {i} has {len(row)} tokens, over the model's context of {n_ctx}")
        with bad_request():  # echo scores the prompt: steering must reach every position
            check_every_position(r.steering)
        with self.model_lock(req):
            scored = self.backend.prompt_logprobs(rows, r.steering, r.logprobs or 0)
        return [Echo(row, logprobs, top) for row, (logprobs, top) in zip(rows, scored)]


def serve(experiment: str | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None,
          variant: str | None = None, use_chat_template: bool | None = None, *, model: str | None = None,
          lora: str | None = None, **settings) -> None:
    """Load a model once and serve it until interrupted (Ctrl-C): ``model`` (a Hugging Face id or cached id, a
    folder, or "default"; ``lora``: an adapter merged into it) as ``vllm serve MODEL`` does, its id as given, or
    ``experiment``'s model (its ``variant``; id: the model the variant names), which adds steering by trait
    name. ConfigError for both or neither, and for ``lora`` or ``variant`` without their source. ``settings``
    are `ModelServer`'s (``max_new_tokens_limit``, ``max_prompts``, ``request_timeout``, ``io_timeout``,
    ``stream_buffer``, ``batching``, ``batch_window_ms``, ``max_batch_size``, ``max_queue``)."""
    if (model is None) == (experiment is None):
        raise ConfigError("serve a model (--model) or an experiment's model (--experiment), not both or neither")
    if lora is not None and model is None:
        raise ConfigError("--lora goes with --model (an experiment's variant names its own adapter)")
    if variant is not None and experiment is None:
        raise ConfigError("--variant names a variant of --experiment's config; got no experiment")
    if host not in LOCAL_HOSTS and token is None:  # fail before the (slow) model load
        raise ConfigError(f"host {host!r} needs a token (--token or ${TOKEN_ENV})")
    if model is not None:
        from tracelens.model.loading import load_model

        backend = LocalBackend(load_model(model, lora=lora, device="auto"), use_chat_template=use_chat_template)
    else:
        backend = LocalBackend.from_experiment(experiment, variant, use_chat_template=use_chat_template)
        model = get_model_variant(Experiment.named(experiment), backend.variant, "application").model
    server = ModelServer(backend, experiment, host, port, token, model_id=str(model), variant=backend.variant,
                         **settings)
    source = "" if experiment is None else f" (experiment {experiment!r})"
    serve_until_interrupted(server.serve_forever, server.close,
                            f"tracelens model server for {str(model)!r}{source}: {server.url}")
