"""A persistent model server: load a model once, then generate, steer and capture from other processes.

``ModelServer(backend, experiment)`` serves one `LocalBackend` over HTTP (standard library only) with JSON
``POST`` endpoints mirroring the backend's methods, ``GET /health``, and an OpenAI-compatible API under ``/v1``:

- ``GET /health`` -> ``{status: "ok", experiment, variant, model: {name, n_layers, hidden_dim, d_vocab, dtype,
  device}, use_chat_template, limits, batching}``
- ``POST /generate`` ``{prompts, config?, steering?, system_prompts?}`` -> ``{responses: [str], results: [result]}``
  (results as below, without activations)
- ``POST /generate_with_capture`` ``{prompts, config?, capture?, steering?, system_prompts?}`` -> ``{results: [result]}``
  where a result has the `CaptureResult` fields, with ``prompt_activations``/``response_activations`` encoded
  as an activation blob (below)
- ``POST /stream`` ``{prompt, config?, capture?, steering?}`` -> JSON lines (``application/x-ndjson``), one per token
  as it is generated: ``{token, token_id, activations}``; a failure after the first line is sent as a final line
  ``{error, status}`` (status: the HTTP code it would have had). The connection closes at the end (HTTP/1.0).
- ``POST /forward_with_capture`` ``{input_ids, attention_mask?, capture}`` -> ``{activations}``
- ``POST /response_logprobs`` ``{prompt_ids, response_ids, steering?, kl?}`` (lists of token-id lists) ->
  ``{logprobs: [[float]], kl: [[float]] | null}``: teacher-forced log-probabilities of each response token under
  the steering (positions ``all``), and with ``kl: true`` the per-token KL divergence from the unsteered model
- ``POST /prompt_token_ids`` ``{prompts, system_prompts?}`` -> ``{token_ids}`` (the ids generation feeds the model);
  ``POST /token_texts`` ``{token_ids}`` -> ``{tokens}`` (each id decoded alone)
- ``GET /v1/models``; ``POST /v1/completions`` and ``POST /v1/chat/completions`` as OpenAI's, ``stream`` (server-sent
  events) included, for the model id ``experiment``. Supported: ``max_tokens`` (completions default 16; chat
  default as ``config.max_new_tokens``; ``max_completion_tokens`` too), ``temperature`` (default 1.0; 0 is greedy),
  ``seed``, ``stop`` (strings: the text is cut before the first, generation runs on to the end of the batch),
  ``logprobs`` (completions: 0-20 alternatives; chat: ``logprobs`` + ``top_logprobs`` 0-20; not with ``stream``),
  ``stream_options.include_usage``, ``user``; ``n``, ``top_p``, ``best_of`` only at 1, penalties at 0, no ``echo``,
  ``suffix`` or ``logit_bias``. Steering is the extra field ``steering`` (the same entries as ``/generate``). A
  chat of one user message (and an optional system message first) is formatted as ``/generate`` formats a
  prompt; longer conversations go through the tokenizer's chat template. Completion prompts are used as given.
  Errors have OpenAI's shape ``{"error": {message, type, param, code}}`` (an unknown model: 404
  ``model_not_found``).

Encodings (no pickle anywhere): a tensor is ``{"safetensors": base64}`` (one tensor under the key ``"t"``) or, for
``input_ids``/``attention_mask`` and steering vectors, a plain nested JSON list of numbers. An activation blob
``{layer: {component: tensor}}`` is ``{"safetensors": base64}`` of one safetensors file with keys
``"{layer}/{component}"``. ``config`` has the `GenerationConfig` fields, ``capture`` is ``{layers?, components?}``,
a steering entry is ``{layer, vector, coefficient?, component?, positions?, rows?}`` (``rows`` ``[start, end]``: only
those prompts of a ``/generate`` or ``/generate_with_capture`` request), or names an extracted vector:
``{trait, layer?, method?, position?, coefficient?, component?, positions?}`` steers with the best vector of
the experiment's selection (`tracelens.pipeline.selection`) that matches the given fields (position default
``response[:]``).

Batching: ``/generate``, ``/generate_with_capture`` and the unstreamed ``/v1`` requests queue for one worker
thread, which gathers requests for ``batch_window_ms`` after the oldest arrived (or until ``max_batch_size``
prompts wait) and runs those with equal ``max_new_tokens``, temperature, ``stop_token_ids`` and capture as one
left-padded generation, each request's steering limited to its own rows (`SteeringSpec.rows`); requests with other
settings wait for a later batch, and seeded sampling runs alone (its random draws would depend on the batch).
A greedy request gets the same tokens as alone (tests/test_server.py). At most ``max_queue`` requests wait; more
get 503 with the reason. Streams (``/stream``, ``stream: true``) and ``/forward_with_capture`` run one at a time
between batches. One lock serialises all model access, so hooks of different calls never mix.

Security: binds 127.0.0.1 by default and then checks the Host header (against DNS rebinding); a non-loopback
host is refused unless a token is set. With a token every request (``/health`` and ``/v1`` included) must send
``Authorization: Bearer <token>``, else 401. Malformed requests get 4xx ``{"error": reason}`` (a prompt that does
not fit the model's context with its ``max_new_tokens`` included); other failures 500 ``{"error": message}``,
never a traceback.

Reliability (settings of `ModelServer`): ``config.max_new_tokens`` must be in [1, ``max_new_tokens_limit``]
(default when absent: the smaller of 256 and the limit). Each request has a deadline of ``request_timeout``
seconds for waiting on the model plus generating; past it the answer is 503 (a stream ends with an ``{error}``
line with status 503). Every socket read or write may block at most ``io_timeout`` seconds: a body shorter than its
Content-Length gets 408, and a client that stops reading is dropped. Generation stops (between tokens) when
its client disconnects (a batch: when all of its clients have gone or passed their deadlines; one that leaves
early is answered at once). A stream generates into a per-request buffer of at most ``stream_buffer`` tokens on a
worker thread, so the model lock is never held while waiting on a reader; a reader that falls that far behind is
dropped and its generation stops.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import os
import queue
import select
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tracelens.serving.backends import (
    CaptureResult,
    CaptureSpec,
    GenerationConfig,
    LocalBackend,
    SteeringSpec,
    TokenResult,
)
from tracelens.errors import ConfigError, RequestError
from tracelens.pipeline.experiments import Experiment, get_model_variant
from tracelens.pipeline.extraction import load_vector
from tracelens.model.generation import GenerationCancelled, HookedGenerator
from tracelens.serving.local_http import (
    LOCAL_HOSTS,
    check_token,
    host_header_ok,
    loopback_host_headers,
    threading_server,
    token_ok,
)
from tracelens.model.prompts import encode
from tracelens.pipeline.selection import select_vector
from tracelens.model.sites import COMPONENTS

DEFAULT_PORT = 8765
MAX_BODY_BYTES = 256 * 1024 * 1024
TOKEN_ENV = "TRACELENS_SERVER_TOKEN"


class _ClientGone(Exception):
    """The client closed its connection (or stopped reading): there is no one to answer."""


# --- encodings (shared with tracelens.serving.client) -------------------------------------------------------


def encode_tensor(t: torch.Tensor) -> dict:
    return {"safetensors": base64.b64encode(st_save({"t": t.detach().contiguous().cpu()})).decode("ascii")}


def _safetensors_blob(obj, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or set(obj) != {"safetensors"} or not isinstance(obj["safetensors"], str):
        raise RequestError(f"{what} must be {{\"safetensors\": base64 string}} or a JSON list")
    try:
        return st_load(base64.b64decode(obj["safetensors"], validate=True))
    except (binascii.Error, ValueError, SafetensorError) as err:
        raise RequestError(f"{what}: not a base64 safetensors blob ({err})") from None


def decode_tensor(obj, what: str = "tensor", dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor from ``{"safetensors": b64}`` or a nested list of numbers; RequestError if malformed."""
    if isinstance(obj, list):
        try:
            t = torch.tensor(obj, dtype=dtype)
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            raise RequestError(f"{what}: not a rectangular list of numbers ({err})") from None
        return t
    tensors = _safetensors_blob(obj, what)
    if set(tensors) != {"t"}:
        raise RequestError(f"{what}: the safetensors blob must hold one tensor named 't'")
    return tensors["t"] if dtype is None else tensors["t"].to(dtype)


def encode_activations(acts: dict[int, dict[str, torch.Tensor]]) -> dict:
    """One safetensors blob; components that are one tensor (Llama's attn_out and attn_contribution) are copied,
    as safetensors refuses shared memory."""
    flat = {f"{l}/{c}": a.detach().cpu().clone() for l, comps in acts.items() for c, a in comps.items()}
    return {"safetensors": base64.b64encode(st_save(flat)).decode("ascii")}


def decode_activations(obj) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in _safetensors_blob(obj, "activations").items():
        layer, _, comp = key.partition("/")
        out.setdefault(int(layer), {})[comp] = t
    return {l: out[l] for l in sorted(out)}


def result_to_json(r: CaptureResult, activations: bool = True) -> dict:
    out = {
        "prompt_text": r.prompt_text, "response_text": r.response_text,
        "prompt_tokens": list(r.prompt_tokens), "response_tokens": list(r.response_tokens),
        "prompt_token_ids": list(r.prompt_token_ids), "response_token_ids": list(r.response_token_ids),
    }
    if activations:
        out["prompt_activations"] = encode_activations(r.prompt_activations)
        out["response_activations"] = encode_activations(r.response_activations)
    return out


def result_from_json(d: dict) -> CaptureResult:
    return CaptureResult(
        d["prompt_text"], d["response_text"], d["prompt_tokens"], d["response_tokens"],
        d["prompt_token_ids"], d["response_token_ids"],
        decode_activations(d["prompt_activations"]) if "prompt_activations" in d else {},
        decode_activations(d["response_activations"]) if "response_activations" in d else {},
    )


def config_to_json(c: GenerationConfig | None) -> dict | None:
    return None if c is None else {"max_new_tokens": c.max_new_tokens, "temperature": c.temperature,
                                   "stop_token_ids": c.stop_token_ids, "seed": c.seed}


def capture_to_json(c: CaptureSpec | None) -> dict | None:
    return None if c is None else {"layers": None if c.layers is None else [int(l) for l in c.layers],
                                   "components": list(c.components)}


def steering_to_json(steering) -> list[dict] | None:
    if not steering:
        return None
    return [{"layer": s.layer, "vector": encode_tensor(torch.as_tensor(s.vector)), "coefficient": float(s.coefficient),
             "component": s.component, "positions": s.positions, **({} if s.rows is None else {"rows": list(s.rows)})}
            for s in steering]


# --- request parsing --------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _fields(body: dict, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    missing = [k for k in required if k not in body]
    if missing:
        raise RequestError(f"missing field(s): {', '.join(missing)}")
    unknown = sorted(set(body) - set(required) - set(optional))
    if unknown:
        raise RequestError(f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(required + optional)}")


def _str_list(v, what: str, allow_none_items: bool = False) -> list:
    if not isinstance(v, list) or not all(isinstance(x, str) or (allow_none_items and x is None) for x in v):
        raise RequestError(f"{what} must be a list of strings{' (or nulls)' if allow_none_items else ''}")
    return v


def parse_config(v, max_new_tokens_limit: int) -> GenerationConfig:
    """A `GenerationConfig` from a request's ``config`` (None: defaults); ``max_new_tokens`` must be an integer
    in [1, max_new_tokens_limit] and defaults to the smaller of `GenerationConfig`'s default and the limit."""
    v = {} if v is None else v
    if not isinstance(v, dict):
        raise RequestError("config must be an object")
    _fields(v, (), ("max_new_tokens", "temperature", "stop_token_ids", "seed"))
    n = v.get("max_new_tokens", min(GenerationConfig.max_new_tokens, max_new_tokens_limit))
    if not _is_int(n) or not 1 <= n <= max_new_tokens_limit:
        raise RequestError(f"config.max_new_tokens must be an integer in [1, {max_new_tokens_limit}]; got {n!r}")
    temperature = v.get("temperature", 0.0)
    if not _is_num(temperature) or temperature < 0:
        raise RequestError(f"config.temperature must be a finite number >= 0; got {temperature!r}")
    stops = v.get("stop_token_ids")
    if stops is not None and (not isinstance(stops, list) or not all(_is_int(x) for x in stops)):
        raise RequestError(f"config.stop_token_ids must be a list of integers or null; got {stops!r}")
    seed = v.get("seed")
    if seed is not None and not _is_int(seed):
        raise RequestError(f"config.seed must be an integer or null; got {seed!r}")
    return GenerationConfig(n, float(temperature), stops, seed)


def parse_capture(v, n_layers: int, required: bool = False) -> CaptureSpec | None:
    if v is None:
        if required:
            raise RequestError("missing field: capture")
        return None
    if not isinstance(v, dict):
        raise RequestError("capture must be an object {layers?, components?}")
    _fields(v, (), ("layers", "components"))
    layers = v.get("layers")
    if layers is not None:
        if not isinstance(layers, list) or not all(_is_int(l) for l in layers):
            raise RequestError("capture.layers must be a list of integers or null")
        bad = [l for l in layers if not -n_layers <= l < n_layers]
        if bad:
            raise RequestError(f"capture.layers {bad} out of range for a model with {n_layers} layers")
    comps = v.get("components", ["residual"])
    _str_list(comps, "capture.components")
    _check_components(comps, "capture.components")
    return CaptureSpec(layers, tuple(comps))


def _check_components(comps, what: str) -> None:
    bad = [c for c in comps if c not in COMPONENTS]
    if bad:
        raise RequestError(f"{what}: unknown component(s) {bad}; valid: {', '.join(COMPONENTS)}")


NamedVector = Callable[[dict, str], tuple[int, torch.Tensor]]
"""Resolves a steering entry that names its vector (``trait``...) to ``(layer, vector)``; RequestError if none."""


def parse_steering(v, n_layers: int, hidden_dim: int, named: NamedVector | None = None,
                   n_rows: int | None = None) -> list[SteeringSpec] | None:
    """Steering entries ``{layer, vector, coefficient?, component?, positions?, rows?}``; with ``named``, an entry
    may give ``trait`` (and ``layer?``, ``method?``, ``position?``) instead of ``vector``, resolved by ``named``.
    ``rows`` ``[start, end]`` (0 <= start < end <= ``n_rows``) limits an entry to those prompts of the request;
    refused where ``n_rows`` is None (requests without a list of prompts)."""
    if v is None:
        return None
    if not isinstance(v, list):
        raise RequestError("steering must be a list of {layer, vector, coefficient?, component?, positions?}")
    out = []
    for i, s in enumerate(v):
        what = f"steering[{i}]"
        if not isinstance(s, dict):
            raise RequestError(f"{what} must be an object")
        by_name = named is not None and "trait" in s
        try:
            if by_name:
                _fields(s, ("trait",), ("layer", "method", "position", "coefficient", "component", "positions", "rows"))
            else:
                _fields(s, ("layer", "vector"), ("coefficient", "component", "positions", "rows"))
        except RequestError as err:
            raise RequestError(f"{what}: {err}") from None
        if (not by_name or "layer" in s) and (not _is_int(s["layer"]) or not -n_layers <= s["layer"] < n_layers):
            raise RequestError(f"{what}.layer must be an integer in [-{n_layers}, {n_layers})")
        comp = s.get("component", "residual")
        if not isinstance(comp, str):
            raise RequestError(f"{what}.component must be a string")
        _check_components([comp], f"{what}.component")
        if by_name:
            layer, vec = named(s, what)
        else:
            layer, vec = s["layer"], decode_tensor(s["vector"], f"{what}.vector", torch.float32)
        if vec.shape != (hidden_dim,):
            raise RequestError(f"{what}.vector has shape {list(vec.shape)}; the model needs [{hidden_dim}]")
        if not torch.isfinite(vec).all():
            raise RequestError(f"{what}.vector has non-finite values")
        coef = s.get("coefficient", 1.0)
        if not _is_num(coef):
            raise RequestError(f"{what}.coefficient must be a finite number; got {coef!r}")
        pos = s.get("positions", "all")
        if pos not in ("all", "response"):
            raise RequestError(f"{what}.positions must be 'all' or 'response'")
        rows = s.get("rows")
        if rows is not None:
            if n_rows is None:
                raise RequestError(f"{what}.rows: this request has no list of prompts to limit steering to")
            if not (isinstance(rows, list) and len(rows) == 2 and all(_is_int(r) for r in rows)
                    and 0 <= rows[0] < rows[1] <= n_rows):
                raise RequestError(f"{what}.rows must be [start, end] integers with 0 <= start < end <= {n_rows} "
                                   f"(the number of prompts); got {rows!r}")
            rows = (rows[0], rows[1])
        out.append(SteeringSpec(layer, vec.float(), float(coef), comp, pos, rows=rows))
    return out


def _ids_tensor(v, what: str, d_vocab: int | None) -> torch.Tensor:
    t = decode_tensor(v, what)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.dim() != 2 or t.numel() == 0:
        raise RequestError(f"{what} must be a non-empty 2-D integer tensor [batch, pos], got {t.dtype} {list(t.shape)}")
    t = t.long()
    if d_vocab is not None and (t.min() < 0 or t.max() >= d_vocab):
        raise RequestError(f"{what} has token ids outside [0, {d_vocab})")
    return t


def _prompts_and_system(body: dict) -> tuple[list[str], list[str | None] | None]:
    """A request's ``prompts`` and its optional ``system_prompts`` (one per prompt, nulls allowed); 400 otherwise."""
    prompts = _str_list(body["prompts"], "prompts")
    system = body.get("system_prompts")
    if system is not None:
        _str_list(system, "system_prompts", allow_none_items=True)
        if len(system) != len(prompts):
            raise RequestError(f"got {len(prompts)} prompts but {len(system)} system_prompts")
    return prompts, system


def _id_rows(v, what: str, d_vocab: int | None) -> list[list[int]]:
    """A list of non-empty token-id lists (ids in [0, d_vocab)); 400 otherwise."""
    if not isinstance(v, list) or not all(isinstance(row, list) and all(_is_int(i) for i in row) for row in v):
        raise RequestError(f"{what} must be a list of lists of integer token ids")
    for i, row in enumerate(v):
        if not row:
            raise RequestError(f"{what}[{i}] must hold at least one token id; got []")
        if d_vocab is not None and any(not 0 <= t < d_vocab for t in row):
            raise RequestError(f"{what}[{i}] has token ids outside [0, {d_vocab})")
    return v


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
    """One /stream generation on a worker thread: it takes the model lock, puts tokens into a buffer of at most
    ``app.stream_buffer`` tokens without ever waiting for the reader, and releases the lock when generation
    ends, so a slow reader never holds the model. Generation stops between tokens when the request's deadline
    passes, its client has gone, or the buffer is full (the reader is that far behind: it is dropped)."""

    def __init__(self, app: "ModelServer", req: _Request, start: Callable[..., Iterator[TokenResult]]) -> None:
        self.app, self.req, self.start = app, req, start
        self.items: queue.Queue = queue.Queue()  # tokens, then one _End
        threading.Thread(target=self._produce, daemon=True, name="tracelens-stream").start()

    def _produce(self) -> None:
        error: BaseException | None = None
        try:
            with self.app.model_lock(self.req):
                tokens = self.start(cancel=self.req.cancelled)
                try:
                    for t in tokens:
                        if self.items.qsize() >= self.app.stream_buffer:
                            self.req.gone.set()
                            raise _ClientGone(f"the reader fell {self.app.stream_buffer} tokens behind")
                        self.items.put(t)
                finally:
                    tokens.close()  # removes its hooks before the lock is released
        except GenerationCancelled as err:
            error = self.req.cancelled_error(err)
        except BaseException as err:  # handed to the reader
            error = err
        self.items.put(_End(error))

    def __iter__(self) -> Iterator[TokenResult]:
        """The tokens in order, then raises the error that ended generation, if any."""
        while not isinstance(item := self.items.get(), _End):
            yield item
        if item.error is not None:
            raise item.error


@dataclass(eq=False)
class _Job:
    """One /generate, /generate_with_capture or /v1 request waiting for (or in) a batch: its prompts as the
    model sees them, its settings and its steering (over its own prompts)."""

    texts: list[str]
    config: GenerationConfig
    steering: list[SteeringSpec] | None
    capture: CaptureSpec | None
    top_logprobs: int | None
    req: _Request
    queued_at: float = 0.0
    results: list[CaptureResult] | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple | None:
        """Jobs with equal keys share a batch; None: this job runs alone (seeded sampling, whose random draws
        would change with the batch)."""
        c = self.config
        if c.temperature > 0 and c.seed is not None:
            return None
        capture = None if self.capture is None else (
            None if self.capture.layers is None else tuple(self.capture.layers), tuple(self.capture.components))
        return c.max_new_tokens, c.temperature, tuple(c.stop_token_ids or ()), capture


class _Batcher:
    """Gathers jobs into batches on one worker thread and runs each batch as one left-padded generation.

    The oldest waiting job opens a batch; the worker waits until ``window`` seconds after it arrived (or until
    ``max_rows`` prompts with its key wait), then takes, in arrival order, every waiting job with that key that
    still fits in ``max_rows`` (the oldest always). Each job's steering is limited to its own rows
    (`SteeringSpec.rows`), so every prompt gets what it would get alone. At most ``max_queue`` jobs wait
    (503 beyond). Jobs that arrive while a batch runs form the next one.
    """

    def __init__(self, app: "ModelServer", window: float, max_rows: int, max_queue: int) -> None:
        self.app, self.window, self.max_rows, self.max_queue = app, window, max_rows, max_queue
        self.cond = threading.Condition()
        self.pending: list[_Job] = []
        self.closed = False
        self.thread = threading.Thread(target=self._loop, daemon=True, name="tracelens-batcher")
        self.thread.start()

    def run(self, job: _Job) -> list[CaptureResult]:
        """Queue ``job`` and wait for its results; 503 when the queue is full or the job's deadline passes
        first (it then leaves the queue, or its batch, whose generation stops once all its jobs have left)."""
        with self.cond:
            if len(self.pending) >= self.max_queue:
                raise RequestError(f"the model server's queue is full ({len(self.pending)} requests waiting, "
                                   f"max_queue={self.max_queue}); retry later", HTTPStatus.SERVICE_UNAVAILABLE)
            job.queued_at = time.monotonic()
            self.pending.append(job)
            self.cond.notify_all()
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
            for job in self.pending:
                job.error = RequestError("the model server is shutting down", HTTPStatus.SERVICE_UNAVAILABLE)
                job.done.set()
            self.pending.clear()
            self.cond.notify_all()
        self.thread.join()

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _next_batch(self) -> list[_Job] | None:
        with self.cond:
            while True:
                while not self.pending and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return None
                first = self.pending[0]
                key = first.key
                while key is not None and first in self.pending and not self.closed:
                    rows = sum(len(j.texts) for j in self.pending if j.key == key)
                    left = first.queued_at + self.window - time.monotonic()
                    if rows >= self.max_rows or left <= 0:
                        break
                    self.cond.wait(left)
                if first in self.pending and not self.closed:
                    break
            batch, rows = [], 0
            for job in list(self.pending):
                if job is first or (key is not None and job.key == key and rows + len(job.texts) <= self.max_rows):
                    batch.append(job)
                    rows += len(job.texts)
                    self.pending.remove(job)
            return batch

    def _run(self, jobs: list[_Job]) -> None:
        """Generate for ``jobs`` as one call under the model lock; each job gets its rows of the results."""
        lock = self.app.lock
        while not lock.acquire(timeout=0.05):  # a /stream or /forward_with_capture holds the model
            jobs = [j for j in jobs if not j.req.cancelled()]  # their handlers have answered already
            if not jobs:
                return
        try:
            texts, steering = [], []
            for job in jobs:
                rows = (len(texts), len(texts) + len(job.texts))
                steering += [replace(spec, rows=rows if spec.rows is None else (rows[0] + spec.rows[0],
                                                                                rows[0] + spec.rows[1]))
                             for spec in job.steering or ()]
                texts += job.texts
            asked = [j.top_logprobs for j in jobs if j.top_logprobs is not None]
            kwargs = {"steering": steering or None, "formatted": True, "top_logprobs": max(asked) if asked else None,
                      "cancel": lambda: all(j.req.cancelled() for j in jobs)}
            b = self.app.backend
            if jobs[0].capture is not None:
                results = b.generate_with_capture(texts, jobs[0].config, jobs[0].capture, **kwargs)
            else:
                results = b.generate_results(texts, jobs[0].config, **kwargs)
            start = 0
            for job in jobs:
                job.results = [_keep_logprobs(r, job.top_logprobs) for r in results[start:start + len(job.texts)]]
                start += len(job.texts)
        except GenerationCancelled as err:
            for job in jobs:
                job.error = job.req.cancelled_error(err)
        except Exception as err:  # answered to every job of the batch (500)
            for job in jobs:
                job.error = err
        finally:
            lock.release()
            for job in jobs:
                job.done.set()


def _keep_logprobs(r: CaptureResult, k: int | None) -> CaptureResult:
    """``r`` with the top ``k`` alternatives per token (the batch may have asked for more), none for None."""
    if k is None:
        return replace(r, response_logprobs=None, response_top_logprobs=None)
    if r.response_top_logprobs is None:
        return r
    return replace(r, response_top_logprobs=[top[:k] for top in r.response_top_logprobs])


@dataclass
class _Stream:
    """A streamed answer: ``body(tokens)`` turns the generated tokens into the pieces written as they come;
    ``error(message, status)`` is the last piece when generation fails after the first."""

    tokens: _TokenStream
    body: Callable[[Iterator[TokenResult]], Iterator[bytes]]
    error: Callable[[str, int], bytes]
    content_type: str


def _ndjson_tokens(tokens: Iterator[TokenResult]) -> Iterator[bytes]:
    for t in tokens:
        item = {"token": t.token, "token_id": t.token_id, "activations": encode_activations(t.activations)}
        yield (json.dumps(item) + "\n").encode()


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
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        if self.app.verbose:
            super().log_message(format, *args)


class ModelServer:
    """Serve ``backend`` (a `LocalBackend`) for ``experiment`` over HTTP; see the module docstring for the API.

    The socket is bound on construction (``port=0`` picks a free one; see ``.port``/``.url``); call
    ``serve_forever()`` or ``start()`` (a daemon thread), and ``close()`` when done. Raises ValueError for a
    non-loopback ``host`` without a ``token``, and for settings out of range. Settings (see the module docstring):
    ``max_new_tokens_limit`` (tokens, default 1024), ``request_timeout`` (seconds, default 600), ``io_timeout``
    (seconds, default 30), ``stream_buffer`` (tokens, default 256), ``batch_window_ms`` (milliseconds, default
    10), ``max_batch_size`` (prompts, default 16), ``max_queue`` (requests, default 64). ``experiments_root``
    is where steering vectors named by trait are read (default: `tracelens.pipeline.experiments.experiments_root()`).
    """

    def __init__(self, backend: LocalBackend, experiment: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 token: str | None = None, *, variant: str | None = None, verbose: bool = True,
                 max_new_tokens_limit: int = 1024, request_timeout: float = 600.0, io_timeout: float = 30.0,
                 stream_buffer: int = 256, batch_window_ms: int | float = 10.0, max_batch_size: int = 16,
                 max_queue: int = 64, experiments_root: str | os.PathLike | None = None) -> None:
        check_token(token)
        if host not in LOCAL_HOSTS and token is None:
            raise ConfigError(f"host {host!r} would let anyone on the network run the model; bind 127.0.0.1, "
                             "or set a token (every request must then send 'Authorization: Bearer <token>')")
        for name, value in (("max_new_tokens_limit", max_new_tokens_limit), ("stream_buffer", stream_buffer),
                            ("max_batch_size", max_batch_size), ("max_queue", max_queue)):
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1; got {value!r}")
        for name, value in (("request_timeout", request_timeout), ("io_timeout", io_timeout)):
            if not _is_num(value) or value <= 0:
                raise ConfigError(f"{name} must be a finite number of seconds > 0; got {value!r}")
        if not _is_num(batch_window_ms) or batch_window_ms < 0:
            raise ConfigError(f"batch_window_ms must be a finite number of milliseconds >= 0; got {batch_window_ms!r}")
        self.backend, self.experiment, self.variant = backend, experiment, variant
        self.exp = Experiment.named(experiment, None if experiments_root is None else Path(experiments_root))
        self.token, self.verbose = token, verbose
        self.max_new_tokens_limit, self.stream_buffer = max_new_tokens_limit, stream_buffer
        self.request_timeout, self.io_timeout = float(request_timeout), float(io_timeout)
        self.eos_ids = frozenset(HookedGenerator(backend.model).stop_ids().tolist())
        self.created = int(time.time())
        self.lock = threading.Lock()
        self.routes = {"/generate": self.generate, "/generate_with_capture": self.generate_with_capture,
                       "/stream": self.stream, "/forward_with_capture": self.forward_with_capture,
                       "/prompt_token_ids": self.prompt_token_ids, "/token_texts": self.token_texts,
                       "/response_logprobs": self.response_logprobs,
                       "/v1/completions": self.completions, "/v1/chat/completions": self.chat_completions}
        self.get_routes = {"/health": self.health, "/v1/models": self.models}
        handler = type("_BoundHandler", (_Handler,), {"app": self, "timeout": self.io_timeout})
        self.httpd = threading_server(host, port, handler)
        self.host = host
        self.port = self.httpd.server_address[1]
        self.allowed_hosts = None if host not in LOCAL_HOSTS else loopback_host_headers(self.port)
        self._thread: threading.Thread | None = None
        self.batcher = _Batcher(self, batch_window_ms / 1000, max_batch_size, max_queue)

    @property
    def url(self) -> str:
        return f"http://{'[' + self.host + ']' if ':' in self.host else self.host}:{self.port}"

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
        """Hold the model lock; 503 when it is not free before ``req``'s deadline."""
        if not self.lock.acquire(timeout=max(req.remaining(), 0.0)):
            raise RequestError(f"the model stayed busy past this request's deadline of {self.request_timeout:g} s; "
                               "retry later", HTTPStatus.SERVICE_UNAVAILABLE)
        try:
            yield
        finally:
            self.lock.release()

    def _check_fits(self, prompts: list[str], config: GenerationConfig, formatted: bool = False) -> None:
        """400 for an empty prompt list or a prompt that does not fit the model's context (no model work)."""
        try:
            self.backend.check_generation(prompts, config, formatted=formatted)
        except ValueError as err:
            raise RequestError(str(err)) from None

    def _batched(self, texts: list[str], config: GenerationConfig, steering: list[SteeringSpec] | None,
                 capture: CaptureSpec | None, req: _Request, top_logprobs: int | None = None) -> list[CaptureResult]:
        """Results for the formatted ``texts``, generated in a batch with other requests (see `_Batcher`)."""
        self._check_fits(texts, config, formatted=True)
        return self.batcher.run(_Job(texts, config, steering, capture, top_logprobs, req))

    def _named_vector(self, entry: dict, what: str) -> tuple[int, torch.Tensor]:
        """``(layer, vector)`` of a steering entry that names a trait: the best vector of the experiment's
        selection (`tracelens.pipeline.selection`) matching its ``layer``, ``method``, ``position`` (default
        ``response[:]``) and ``component``; 400 when there is none."""
        args = {k: entry.get(k) for k in ("trait", "method")}
        args["position"] = entry.get("position", "response[:]")
        for k, v in args.items():
            if v is not None and not isinstance(v, str):
                raise RequestError(f"{what}.{k} must be a string; got {v!r}")
        layer = entry.get("layer")  # checked by parse_steering
        layer = layer + self.backend.n_layers if layer is not None and layer < 0 else layer
        try:
            variant = get_model_variant(self.exp, None, "extraction").name
            best = select_vector(self.exp, args["trait"], variant=variant, position=args["position"],
                                 component=entry.get("component", "residual"), layer=layer,
                                 method=args["method"], allow_unscored=True)
            return best.layer, load_vector(self.exp, args["trait"], variant, best.position, best.component,
                                           best.method, best.layer)
        except (FileNotFoundError, KeyError, ValueError) as err:
            raise RequestError(f"{what}: no steering vector for trait {args['trait']!r} in experiment "
                               f"{self.exp.name!r} ({err})") from None

    def _steering(self, v, n_rows: int | None = None) -> list[SteeringSpec] | None:
        return parse_steering(v, self.backend.n_layers, self.backend.hidden_dim, self._named_vector, n_rows)

    # --- endpoints (each takes the parsed JSON body and the request) ---

    def health(self) -> dict:
        b = self.backend
        cfg = b.model.cfg
        return {"status": "ok", "experiment": self.experiment, "variant": self.variant,
                "model": {"name": getattr(cfg, "model_name", None), "n_layers": b.n_layers, "hidden_dim": b.hidden_dim,
                          "d_vocab": getattr(cfg, "d_vocab", None), "n_ctx": getattr(cfg, "n_ctx", None),
                          "dtype": str(getattr(cfg, "dtype", "")), "device": str(b.device)},
                "use_chat_template": b.use_chat_template,
                "limits": {"max_new_tokens": self.max_new_tokens_limit, "request_timeout_s": self.request_timeout},
                "batching": {"window_ms": self.batcher.window * 1000, "max_batch_size": self.batcher.max_rows,
                             "max_queue": self.batcher.max_queue, "waiting": len(self.batcher.pending)}}

    def _generation_args(self, body: dict, with_capture: bool):
        b = self.backend
        _fields(body, ("prompts",), ("config", "steering", "system_prompts") + (("capture",) if with_capture else ()))
        prompts, system = _prompts_and_system(body)
        config = parse_config(body.get("config"), self.max_new_tokens_limit)
        steering = self._steering(body.get("steering"), len(prompts))
        capture = parse_capture(body.get("capture"), b.n_layers) if with_capture else None
        texts = [b.format(p, s) for p, s in zip(prompts, system or [None] * len(prompts))]
        return texts, config, steering, capture

    def generate(self, body: dict, req: _Request) -> dict:
        texts, config, steering, _ = self._generation_args(body, False)
        results = self._batched(texts, config, steering, None, req)
        return {"responses": [r.response_text for r in results],
                "results": [result_to_json(r, activations=False) for r in results]}

    def generate_with_capture(self, body: dict, req: _Request) -> dict:
        texts, config, steering, capture = self._generation_args(body, True)
        return {"results": [result_to_json(r) for r in self._batched(texts, config, steering, capture, req)]}

    def stream(self, body: dict, req: _Request) -> _Stream:
        """Validate now; then generate on a worker thread (see `_TokenStream`)."""
        b = self.backend
        _fields(body, ("prompt",), ("config", "capture", "steering"))
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string")
        config = parse_config(body.get("config"), self.max_new_tokens_limit)
        capture = parse_capture(body.get("capture"), b.n_layers)
        steering = self._steering(body.get("steering"))
        self._check_fits([prompt], config)
        tokens = _TokenStream(self, req, lambda cancel: b.stream(prompt, config, capture, steering, cancel=cancel))
        return _Stream(tokens, _ndjson_tokens, _ndjson_error, "application/x-ndjson")

    def forward_with_capture(self, body: dict, req: _Request) -> dict:
        b = self.backend
        _fields(body, ("input_ids", "capture"), ("attention_mask",))
        ids = _ids_tensor(body["input_ids"], "input_ids", getattr(b.model.cfg, "d_vocab", None))
        n_ctx = getattr(b.model.cfg, "n_ctx", None)
        if n_ctx is not None and ids.shape[1] > n_ctx:
            raise RequestError(f"input_ids has {ids.shape[1]} positions, over the model's context of {n_ctx}")
        mask = None
        if body.get("attention_mask") is not None:
            mask = _ids_tensor(body["attention_mask"], "attention_mask", None)
            if mask.shape != ids.shape:
                raise RequestError(f"attention_mask shape {list(mask.shape)} != input_ids shape {list(ids.shape)}")
            if ((mask != 0) & (mask != 1)).any():
                raise RequestError("attention_mask must hold only 0 and 1")
        capture = parse_capture(body["capture"], b.n_layers, required=True)
        with self.model_lock(req):
            acts = b.forward_with_capture(ids, mask, capture)
            encoded = encode_activations(acts)
        return {"activations": encoded}

    def prompt_token_ids(self, body: dict, req: _Request) -> dict:
        _fields(body, ("prompts",), ("system_prompts",))
        prompts, system = _prompts_and_system(body)
        return {"token_ids": self.backend.prompt_token_ids(prompts, system)}

    def token_texts(self, body: dict, req: _Request) -> dict:
        _fields(body, ("token_ids",), ())
        ids, d_vocab = body["token_ids"], self._d_vocab()
        if not isinstance(ids, list) or not all(_is_int(i) and (d_vocab is None or 0 <= i < d_vocab) for i in ids):
            raise RequestError(f"token_ids must be a list of integer token ids in [0, {d_vocab})")
        return {"tokens": self.backend.token_texts(ids)}

    def response_logprobs(self, body: dict, req: _Request) -> dict:
        _fields(body, ("prompt_ids", "response_ids"), ("steering", "kl"))
        prompts = _id_rows(body["prompt_ids"], "prompt_ids", self._d_vocab())
        responses = _id_rows(body["response_ids"], "response_ids", self._d_vocab())
        if len(prompts) != len(responses) or not prompts:
            raise RequestError(f"prompt_ids and response_ids must be equally long non-empty lists; got "
                               f"{len(prompts)} and {len(responses)}")
        n_ctx = getattr(self.backend.model.cfg, "n_ctx", None)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            if n_ctx is not None and len(p) + len(r) > n_ctx:
                raise RequestError(f"row {i} has {len(p) + len(r)} tokens, over the model's context of {n_ctx}")
        steering = self._steering(body.get("steering"))
        if any(s.positions != "all" for s in steering or ()):
            raise RequestError("steering of response_logprobs covers every position: positions must be 'all'")
        kl = body.get("kl", False)
        if not isinstance(kl, bool):
            raise RequestError(f"kl must be true or false; got {kl!r}")
        with self.model_lock(req):
            out = self.backend.response_logprobs(prompts, responses, steering, kl=kl)
        return {"logprobs": [t.tolist() for t in out.logprobs],
                "kl": None if out.kl is None else [t.tolist() for t in out.kl]}

    def _d_vocab(self) -> int | None:
        return getattr(self.backend.model.cfg, "d_vocab", None)

    # --- OpenAI-compatible endpoints (see the module docstring) ---

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.experiment, "object": "model", "created": self.created,
                                            "owned_by": "tracelens"}]}

    def completions(self, body: dict, req: _Request) -> dict | _Stream:
        return self._openai(_OpenAIRequest.parse(body, False, self), req)

    def chat_completions(self, body: dict, req: _Request) -> dict | _Stream:
        return self._openai(_OpenAIRequest.parse(body, True, self), req)

    def _openai(self, r: "_OpenAIRequest", req: _Request) -> dict | _Stream:
        if r.stream:
            self._check_fits(r.texts, r.config, formatted=True)
            b = self.backend
            tokens = _TokenStream(self, req, lambda cancel: b.stream(r.texts[0], r.config, None, r.steering,
                                                                     cancel=cancel, formatted=True))
            return _Stream(tokens, lambda items: self._sse(r, items), _sse_error, "text/event-stream")
        results = self._batched(r.texts, r.config, r.steering, None, req, r.logprobs)
        choices, used = [], 0
        for i, res in enumerate(results):
            text, n, finish = self._finish(res.response_token_ids, r)
            logprobs = None if r.logprobs is None else self._logprobs_json(res, n, r.chat)
            if r.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": finish})
            else:
                choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish})
            used += n
        prompt_tokens = sum(len(res.prompt_token_ids) for res in results)
        return {**r.head(self.experiment), "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used, "total_tokens": prompt_tokens + used}}

    def _finish(self, ids: list[int], r: "_OpenAIRequest") -> tuple[str, int, str]:
        """The answer's text (cut before the first stop string), how many tokens it used, and why it ended."""
        tok = self.backend.tokenizer
        text = tok.decode(ids, skip_special_tokens=True)
        cut = _stop_index(text, r.stop)
        if cut is not None:  # the tokens that start before the cut
            n = sum(len(tok.decode(ids[:i], skip_special_tokens=True)) < cut for i in range(len(ids)))
            return text[:cut], n, "stop"
        stopped = len(ids) < r.config.max_new_tokens or (ids and ids[-1] in self.eos_ids)
        return text, len(ids), "stop" if stopped else "length"

    def _logprobs_json(self, res: CaptureResult, n: int, chat: bool) -> dict:
        """OpenAI's logprobs object of the first ``n`` response tokens (chat: ``content``; completions: the
        legacy ``tokens``/``token_logprobs``/``top_logprobs``/``text_offset``)."""
        tok = self.backend.tokenizer
        ids, chosen, tops = res.response_token_ids[:n], res.response_logprobs[:n], res.response_top_logprobs[:n]
        strings = [tok.decode([i]) for i in ids]
        if chat:
            def entry(i: int, lp: float) -> dict:
                s = tok.decode([i])
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**entry(i, lp), "top_logprobs": [entry(j, l) for j, l in top]}
                                for i, lp, top in zip(ids, chosen, tops)]}
        offsets = [sum(len(s) for s in strings[:k]) for k in range(len(strings))]
        return {"tokens": strings, "token_logprobs": chosen, "text_offset": offsets,
                "top_logprobs": [{tok.decode([j]): l for j, l in top} for top in tops]}

    def _sse(self, r: "_OpenAIRequest", tokens: Iterator[TokenResult]) -> Iterator[bytes]:
        """Server-sent events of one streamed answer: a chunk per piece of text, the finish reason in the last,
        usage when asked (``stream_options.include_usage``), then ``[DONE]``. Text within the longest stop string
        of the end is held back until it cannot start a stop string, so the pieces join to the unstreamed text."""
        tok, head = self.backend.tokenizer, r.head(self.experiment)
        ids: list[int] = []
        sent, hold = 0, max((len(s) - 1 for s in r.stop), default=0)

        def chunk(text: str | None, finish: str | None) -> bytes:
            if r.chat:
                delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return _sse_data({**head, "choices": [choice]})

        finish = None
        for t in tokens:
            if not ids and r.chat:
                yield chunk(None, None)  # the role, once the first token exists
            ids.append(t.token_id)
            text = tok.decode(ids, skip_special_tokens=True)
            cut = _stop_index(text, r.stop)
            if cut is not None:
                yield chunk(text[sent:cut], "stop")
                finish = "stop"
                break
            safe = len(text) - hold - text.endswith("\ufffd")  # an unfinished UTF-8 character waits too
            if safe > sent:
                yield chunk(text[sent:safe], None)
                sent = safe
        if finish is None:
            if not ids and r.chat:
                yield chunk(None, None)
            text, _, finish = self._finish(ids, r)
            yield chunk(text[sent:], finish)
        if r.include_usage:
            prompt_tokens = len(encode(tok, r.texts[0]))
            n = self._finish(ids, r)[1]
            yield _sse_data({**head, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                                              "total_tokens": prompt_tokens + n}})
        yield b"data: [DONE]\n\n"

    def chat_text(self, messages: list[dict]) -> str:
        """The model's text for chat ``messages`` (``role``, ``content``): one user turn, with an optional system
        turn first, is formatted as ``/generate`` formats a prompt; longer conversations need a chat template."""
        roles = [m["role"] for m in messages]
        contents = [m["content"] for m in messages]
        if roles == ["user"]:
            return self.backend.format(contents[0])
        if roles == ["system", "user"]:
            return self.backend.format(contents[1], contents[0])
        tok = self.backend.tokenizer
        use = self.backend.use_chat_template
        if use is False or getattr(tok, "chat_template", None) is None:
            raise RequestError(f"messages with roles {roles} need the model's chat template, and this server "
                               "formats prompts without one; send one user message (and an optional system one first)")
        try:
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        except Exception as err:  # jinja raises TemplateError; templates also raise ValueError/KeyError
            raise RequestError(f"the model's chat template refused these messages: {err}") from None


# --- the OpenAI-compatible protocol ----------------------------------------------------------------------

_OPENAI_COMMON = ("model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                  "presence_penalty", "frequency_penalty", "logit_bias", "user", "steering")
_MAX_TOP_LOGPROBS = 20


def openai_error(message: str, status: int, code: str | None = None) -> dict:
    """OpenAI's error body: ``type`` is ``invalid_request_error`` for 4xx, else ``server_error``."""
    kind = {401: "authentication_error", 404: "not_found_error"}.get(
        int(status), "invalid_request_error" if 400 <= status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _sse_data(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def _sse_error(message: str, status: int) -> bytes:
    return _sse_data(openai_error(message, status)) + b"data: [DONE]\n\n"


def _stop_index(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string starts in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _only(body: dict, name: str, allowed: tuple, why: str) -> None:
    if body.get(name) not in allowed:
        raise RequestError(f"{name} must be {' or '.join(map(json.dumps, allowed))} ({why}); got {body[name]!r}")


@dataclass
class _OpenAIRequest:
    """A parsed ``/v1/completions`` or ``/v1/chat/completions`` body (``texts``: the model's text per choice)."""

    chat: bool
    texts: list[str]
    config: GenerationConfig
    steering: list[SteeringSpec] | None
    stop: list[str]
    logprobs: int | None  # top alternatives per token; None: no logprobs
    stream: bool
    include_usage: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def head(self, model: str) -> dict:
        kind = ("chatcmpl", "chat.completion") if self.chat else ("cmpl", "text_completion")
        obj = kind[1] + (".chunk" if self.stream and self.chat else "")
        return {"id": f"{kind[0]}-{self.id}", "object": obj, "created": self.created, "model": model}

    @classmethod
    def parse(cls, body: dict, chat: bool, app: ModelServer) -> "_OpenAIRequest":
        if chat:
            _fields(body, ("model", "messages"), _OPENAI_COMMON + ("max_completion_tokens", "logprobs", "top_logprobs"))
        else:
            _fields(body, ("model", "prompt"), _OPENAI_COMMON + ("logprobs", "echo", "suffix", "best_of"))
        if body["model"] != app.experiment:
            raise RequestError(f"model {body['model']!r} is not served here; this server serves {app.experiment!r} "
                               "(GET /v1/models)", HTTPStatus.NOT_FOUND, "model_not_found")
        for name, allowed, why in (("n", (None, 1), "one choice per request"),
                                   ("top_p", (None, 1, 1.0), "nucleus sampling is not supported"),
                                   ("presence_penalty", (None, 0, 0.0), "penalties are not supported"),
                                   ("frequency_penalty", (None, 0, 0.0), "penalties are not supported"),
                                   ("best_of", (None, 1), "one candidate per prompt"),
                                   ("echo", (None, False), "prompt logprobs are not supported"),
                                   ("suffix", (None,), "insertion is not supported")):
            if name in body:
                _only(body, name, allowed, why)
        if body.get("logit_bias") not in (None, {}):
            raise RequestError(f"logit_bias must be null or {{}} (biasing is not supported); got {body['logit_bias']!r}")
        if body.get("user") is not None and not isinstance(body["user"], str):
            raise RequestError(f"user must be a string; got {body['user']!r}")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(f"stream must be true or false; got {stream!r}")
        options = body.get("stream_options")
        if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}
                                    or not isinstance(options.get("include_usage", False), bool)):
            raise RequestError(f"stream_options must be {{include_usage: bool}} with stream=true; got {options!r}")
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not 0 <= len(stop) <= 4 or not all(isinstance(s, str) and s for s in stop):
            raise RequestError(f"stop must be a non-empty string or a list of up to 4 of them; got {body['stop']!r}")
        logprobs = cls._logprobs(body, chat)
        if stream and logprobs is not None:
            raise RequestError("logprobs with stream=true is not supported; ask without streaming")
        texts = cls._chat_texts(body["messages"], app) if chat else cls._prompts(body["prompt"])
        if stream and len(texts) != 1:
            raise RequestError(f"stream=true takes one prompt; got {len(texts)}")
        config = cls._config(body, chat, app.max_new_tokens_limit)
        return cls(chat, texts, config, app._steering(body.get("steering")), stop, logprobs, stream,
                   bool((options or {}).get("include_usage", False)))

    @staticmethod
    def _config(body: dict, chat: bool, limit: int) -> GenerationConfig:
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        n = body.get(name)
        if n is None:  # OpenAI's default for completions; for chat, the server's own default
            n = min(16 if not chat else GenerationConfig.max_new_tokens, limit)
        if not _is_int(n) or not 1 <= n <= limit:
            raise RequestError(f"{name} must be an integer in [1, {limit}]; got {n!r}")
        temperature = body.get("temperature", 1.0)
        temperature = 1.0 if temperature is None else temperature
        if not _is_num(temperature) or not 0 <= temperature <= 2:
            raise RequestError(f"temperature must be a number in [0, 2]; got {temperature!r}")
        seed = body.get("seed")
        if seed is not None and not _is_int(seed):
            raise RequestError(f"seed must be an integer or null; got {seed!r}")
        return GenerationConfig(n, float(temperature), None, seed)

    @staticmethod
    def _logprobs(body: dict, chat: bool) -> int | None:
        if chat:
            wanted, top = body.get("logprobs"), body.get("top_logprobs")
            if wanted not in (None, True, False):
                raise RequestError(f"logprobs must be true or false; got {wanted!r}")
            if top is not None and (not _is_int(top) or not 0 <= top <= _MAX_TOP_LOGPROBS):
                raise RequestError(f"top_logprobs must be an integer in [0, {_MAX_TOP_LOGPROBS}]; got {top!r}")
            if top is not None and not wanted:
                raise RequestError("top_logprobs needs logprobs=true")
            return (top or 0) if wanted else None
        n = body.get("logprobs")
        if n is not None and (not _is_int(n) or not 0 <= n <= _MAX_TOP_LOGPROBS):
            raise RequestError(f"logprobs must be an integer in [0, {_MAX_TOP_LOGPROBS}] or null; got {n!r}")
        return n

    @staticmethod
    def _prompts(prompt) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError("prompt must be a string or a non-empty list of strings (token-id prompts are not "
                               f"supported); got {json.dumps(prompt)[:80]}")
        return prompts

    @staticmethod
    def _chat_texts(messages, app: ModelServer) -> list[str]:
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list of {role, content}")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise RequestError(f"messages[{i}] must be an object with role and content")
            unknown = sorted(set(m) - {"role", "content", "name"})
            if unknown:
                raise RequestError(f"messages[{i}]: unknown field(s): {', '.join(unknown)}; allowed: role, content, name")
            role = {"developer": "system"}.get(m["role"], m["role"])
            if role not in ("system", "user", "assistant"):
                raise RequestError(f"messages[{i}].role must be system, developer, user or assistant; got {m['role']!r}")
            content = m["content"]
            if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                                 and isinstance(p.get("text"), str) for p in content):
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise RequestError(f"messages[{i}].content must be a string or a list of text parts")
            turns.append({"role": role, "content": content})
        return [app.chat_text(turns)]


def serve(experiment: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None,
          variant: str | None = None, use_chat_template: bool | None = None, **settings) -> None:
    """Load ``experiment``'s model once and serve it until interrupted (Ctrl-C); ``settings`` are `ModelServer`'s
    (``max_new_tokens_limit``, ``request_timeout``, ``io_timeout``, ``stream_buffer``, ``batch_window_ms``,
    ``max_batch_size``, ``max_queue``)."""
    if host not in LOCAL_HOSTS and token is None:  # fail before the (slow) model load
        raise ConfigError(f"host {host!r} needs a token (--token or ${TOKEN_ENV})")
    backend = LocalBackend.from_experiment(experiment, variant, use_chat_template=use_chat_template)
    server = ModelServer(backend, experiment, host, port, token, variant=backend.variant, **settings)
    print(f"tracelens model server for {experiment!r}: {server.url}  (Ctrl-C to stop)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def main_server(args) -> int:
    """CLI glue for ``tracelens server --experiment E [--port 8765] [--host H] [--token T] [--variant V]``.
    The token falls back to ``$TRACELENS_SERVER_TOKEN``. Returns 0 after Ctrl-C."""
    serve(args.experiment, host=getattr(args, "host", None) or "127.0.0.1",
          port=getattr(args, "port", None) or DEFAULT_PORT,
          token=getattr(args, "token", None) or os.environ.get(TOKEN_ENV) or None,
          variant=getattr(args, "variant", None),
          **{k: getattr(args, k) for k in ("max_new_tokens_limit", "request_timeout", "io_timeout", "stream_buffer",
                                           "batch_window_ms", "max_batch_size", "max_queue")
             if getattr(args, k, None) is not None})
    return 0
