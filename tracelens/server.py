"""A persistent model server: load a model once, then generate, steer and capture from other processes.

``ModelServer(backend, experiment)`` serves one `LocalBackend` over HTTP (standard library only) with JSON
``POST`` endpoints mirroring the backend's methods, and ``GET /health``:

- ``GET /health`` -> ``{status: "ok", experiment, variant, model: {name, n_layers, hidden_dim, d_vocab, dtype,
  device}, use_chat_template}``
- ``POST /generate`` ``{prompts, config?, steering?, system_prompts?}`` -> ``{responses: [str], results: [result]}``
  (results as below, without activations)
- ``POST /generate_with_capture`` ``{prompts, config?, capture?, steering?, system_prompts?}`` -> ``{results: [result]}``
  where a result has the `CaptureResult` fields, with ``prompt_activations``/``response_activations`` encoded
  as an activation blob (below)
- ``POST /stream`` ``{prompt, config?, capture?, steering?}`` -> JSON lines (``application/x-ndjson``), one per token
  as it is generated: ``{token, token_id, activations}``; a failure after the first line is sent as a final line
  ``{error, status}`` (status: the HTTP code it would have had). The connection closes at the end (HTTP/1.0).
- ``POST /forward_with_capture`` ``{input_ids, attention_mask?, capture}`` -> ``{activations}``

Encodings (no pickle anywhere): a tensor is ``{"safetensors": base64}`` (one tensor under the key ``"t"``) or, for
``input_ids``/``attention_mask`` and steering vectors, a plain nested JSON list of numbers. An activation blob
``{layer: {component: tensor}}`` is ``{"safetensors": base64}`` of one safetensors file with keys
``"{layer}/{component}"``. ``config`` has the `GenerationConfig` fields, ``capture`` is ``{layers?, components?}``,
a steering entry is ``{layer, vector, coefficient?, component?, positions?}``.

Security: binds 127.0.0.1 by default and then checks the Host header (against DNS rebinding); a non-loopback
host is refused unless a token is set. With a token every request (``/health`` included) must send
``Authorization: Bearer <token>``, else 401. Malformed requests get 4xx ``{"error": reason}`` (a prompt that does
not fit the model's context with its ``max_new_tokens`` included); other failures 500 ``{"error": message}``,
never a traceback. One lock serialises all model access, so concurrent requests never share a forward pass (or
hooks).

Reliability (settings of `ModelServer`): ``config.max_new_tokens`` must be in [1, ``max_new_tokens_limit``]
(default when absent: the smaller of 256 and the limit). Each request has a deadline of ``request_timeout``
seconds for waiting on the model plus generating; past it the answer is 503 (a stream ends with an ``{error}``
line with status 503). Every socket read or write may block at most ``io_timeout`` seconds: a body shorter than its
Content-Length gets 408, and a client that stops reading is dropped. Generation stops (between tokens) when
its client disconnects. A stream generates into a per-request buffer of at most ``stream_buffer`` tokens on a
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
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tracelens.backends import CaptureResult, CaptureSpec, GenerationConfig, LocalBackend, SteeringSpec, TokenResult
from tracelens.generation import GenerationCancelled
from tracelens.local_http import (
    LOCAL_HOSTS,
    check_token,
    host_header_ok,
    loopback_host_headers,
    threading_server,
    token_ok,
)
from tracelens.sites import COMPONENTS

DEFAULT_PORT = 8765
MAX_BODY_BYTES = 256 * 1024 * 1024
TOKEN_ENV = "TRACELENS_SERVER_TOKEN"


class RequestError(Exception):
    """An error answered as ``{"error": message}`` with an HTTP status (4xx, or 503 for a busy model)."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


class _ClientGone(Exception):
    """The client closed its connection (or stopped reading): there is no one to answer."""


# --- encodings (shared with tracelens.client) -------------------------------------------------------


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
             "component": s.component, "positions": s.positions} for s in steering]


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


def parse_steering(v, n_layers: int, hidden_dim: int) -> list[SteeringSpec] | None:
    if v is None:
        return None
    if not isinstance(v, list):
        raise RequestError("steering must be a list of {layer, vector, coefficient?, component?, positions?}")
    out = []
    for i, s in enumerate(v):
        what = f"steering[{i}]"
        if not isinstance(s, dict):
            raise RequestError(f"{what} must be an object")
        try:
            _fields(s, ("layer", "vector"), ("coefficient", "component", "positions"))
        except RequestError as err:
            raise RequestError(f"{what}: {err}") from None
        if not _is_int(s["layer"]) or not -n_layers <= s["layer"] < n_layers:
            raise RequestError(f"{what}.layer must be an integer in [-{n_layers}, {n_layers})")
        vec = decode_tensor(s["vector"], f"{what}.vector", torch.float32)
        if vec.shape != (hidden_dim,):
            raise RequestError(f"{what}.vector has shape {list(vec.shape)}; the model needs [{hidden_dim}]")
        if not torch.isfinite(vec).all():
            raise RequestError(f"{what}.vector has non-finite values")
        coef = s.get("coefficient", 1.0)
        if not _is_num(coef):
            raise RequestError(f"{what}.coefficient must be a finite number; got {coef!r}")
        comp = s.get("component", "residual")
        if not isinstance(comp, str):
            raise RequestError(f"{what}.component must be a string")
        _check_components([comp], f"{what}.component")
        pos = s.get("positions", "all")
        if pos not in ("all", "response"):
            raise RequestError(f"{what}.positions must be 'all' or 'response'")
        out.append(SteeringSpec(s["layer"], vec, float(coef), comp, pos))
    return out


def _ids_tensor(v, what: str, d_vocab: int | None) -> torch.Tensor:
    t = decode_tensor(v, what)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.dim() != 2 or t.numel() == 0:
        raise RequestError(f"{what} must be a non-empty 2-D integer tensor [batch, pos], got {t.dtype} {list(t.shape)}")
    t = t.long()
    if d_vocab is not None and (t.min() < 0 or t.max() >= d_vocab):
        raise RequestError(f"{what} has token ids outside [0, {d_vocab})")
    return t


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


class _Handler(BaseHTTPRequestHandler):
    server_version = "tracelens-model-server"
    app: "ModelServer"  # set on the subclass made by ModelServer, with `timeout` (socket timeout, seconds)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        req = _Request(self.connection, self.app.request_timeout)
        try:
            status, answer = HTTPStatus.OK, self._answer(method, req)
        except _ClientGone as err:
            return self._drop(err)
        except RequestError as err:
            status, answer = err.status, {"error": str(err)}
        except Exception as err:  # JSON, never a traceback
            self.log_error("model server error %s: %s", type(err).__name__, err)
            status, answer = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(err).__name__}: {err}"}
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
            if path != "/health":
                raise RequestError(f"no GET route {path!r}; GET /health only", HTTPStatus.NOT_FOUND)
            return self.app.health()
        route = self.app.routes.get(path)
        if route is None:
            raise RequestError(f"no POST route {path!r}; routes: {', '.join(self.app.routes)}", HTTPStatus.NOT_FOUND)
        answer = route(self._read_body(), req)
        if isinstance(answer, _TokenStream):
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

    def _stream(self, tokens: _TokenStream, req: _Request) -> None:
        try:
            items = iter(tokens)
            first = next(items, None)  # a failure before the first token is answered with its status
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            try:
                if first is not None:
                    self._write_line(first)
                for t in items:
                    self._write_line(t)
            except _ClientGone:
                raise
            except RequestError as err:
                self._write_line({"error": str(err), "status": err.status})
            except Exception as err:
                self.log_error("model server stream error %s: %s", type(err).__name__, err)
                self._write_line({"error": f"{type(err).__name__}: {err}", "status": HTTPStatus.INTERNAL_SERVER_ERROR})
        finally:
            req.gone.set()  # stops a generation that is still running
        self.close_connection = True

    def _write_line(self, item: TokenResult | dict) -> None:
        if isinstance(item, TokenResult):
            item = {"token": item.token, "token_id": item.token_id, "activations": encode_activations(item.activations)}
        try:
            self.wfile.write((json.dumps(item) + "\n").encode())
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
    (seconds, default 30), ``stream_buffer`` (tokens, default 256).
    """

    def __init__(self, backend: LocalBackend, experiment: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 token: str | None = None, *, variant: str | None = None, verbose: bool = True,
                 max_new_tokens_limit: int = 1024, request_timeout: float = 600.0, io_timeout: float = 30.0,
                 stream_buffer: int = 256) -> None:
        check_token(token)
        if host not in LOCAL_HOSTS and token is None:
            raise ValueError(f"host {host!r} would let anyone on the network run the model; bind 127.0.0.1, "
                             "or set a token (every request must then send 'Authorization: Bearer <token>')")
        for name, value in (("max_new_tokens_limit", max_new_tokens_limit), ("stream_buffer", stream_buffer)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        for name, value in (("request_timeout", request_timeout), ("io_timeout", io_timeout)):
            if not _is_num(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number of seconds > 0; got {value!r}")
        self.backend, self.experiment, self.variant = backend, experiment, variant
        self.token, self.verbose = token, verbose
        self.max_new_tokens_limit, self.stream_buffer = max_new_tokens_limit, stream_buffer
        self.request_timeout, self.io_timeout = float(request_timeout), float(io_timeout)
        self.lock = threading.Lock()
        self.routes = {"/generate": self.generate, "/generate_with_capture": self.generate_with_capture,
                       "/stream": self.stream, "/forward_with_capture": self.forward_with_capture}
        handler = type("_BoundHandler", (_Handler,), {"app": self, "timeout": self.io_timeout})
        self.httpd = threading_server(host, port, handler)
        self.host = host
        self.port = self.httpd.server_address[1]
        self.allowed_hosts = None if host not in LOCAL_HOSTS else loopback_host_headers(self.port)
        self._thread: threading.Thread | None = None

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

    def _generating(self, req: _Request, fn: Callable, *args):
        """``fn(*args)`` under the model lock, cancelled between tokens once ``req``'s deadline passes or its
        client has gone."""
        with self.model_lock(req):
            try:
                return fn(*args, cancel=req.cancelled)
            except GenerationCancelled as err:
                raise req.cancelled_error(err) from None

    def _check_fits(self, prompts: list[str], config: GenerationConfig, system: list | None = None) -> None:
        """400 for an empty prompt list or a prompt that does not fit the model's context (no model work)."""
        try:
            self.backend.check_generation(prompts, config, system)
        except ValueError as err:
            raise RequestError(str(err)) from None

    # --- endpoints (each takes the parsed JSON body and the request) ---

    def health(self) -> dict:
        b = self.backend
        cfg = b.model.cfg
        return {"status": "ok", "experiment": self.experiment, "variant": self.variant,
                "model": {"name": getattr(cfg, "model_name", None), "n_layers": b.n_layers, "hidden_dim": b.hidden_dim,
                          "d_vocab": getattr(cfg, "d_vocab", None), "n_ctx": getattr(cfg, "n_ctx", None),
                          "dtype": str(getattr(cfg, "dtype", "")), "device": str(b.device)},
                "use_chat_template": b.use_chat_template,
                "limits": {"max_new_tokens": self.max_new_tokens_limit, "request_timeout_s": self.request_timeout}}

    def _generation_args(self, body: dict, with_capture: bool):
        b = self.backend
        _fields(body, ("prompts",), ("config", "steering", "system_prompts") + (("capture",) if with_capture else ()))
        prompts = _str_list(body["prompts"], "prompts")
        system = body.get("system_prompts")
        if system is not None:
            _str_list(system, "system_prompts", allow_none_items=True)
            if len(system) != len(prompts):
                raise RequestError(f"got {len(prompts)} prompts but {len(system)} system_prompts")
        config = parse_config(body.get("config"), self.max_new_tokens_limit)
        steering = parse_steering(body.get("steering"), b.n_layers, b.hidden_dim)
        capture = parse_capture(body.get("capture"), b.n_layers) if with_capture else None
        self._check_fits(prompts, config, system)
        return prompts, config, steering, capture, system

    def generate(self, body: dict, req: _Request) -> dict:
        prompts, config, steering, _, system = self._generation_args(body, False)
        results = self._generating(req, self.backend.generate_results, prompts, config, steering, system)
        return {"responses": [r.response_text for r in results],
                "results": [result_to_json(r, activations=False) for r in results]}

    def generate_with_capture(self, body: dict, req: _Request) -> dict:
        prompts, config, steering, capture, system = self._generation_args(body, True)
        results = self._generating(req, self.backend.generate_with_capture, prompts, config, capture, steering, system)
        return {"results": [result_to_json(r) for r in results]}

    def stream(self, body: dict, req: _Request) -> _TokenStream:
        """Validate now; then generate on a worker thread (see `_TokenStream`)."""
        b = self.backend
        _fields(body, ("prompt",), ("config", "capture", "steering"))
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string")
        config = parse_config(body.get("config"), self.max_new_tokens_limit)
        capture = parse_capture(body.get("capture"), b.n_layers)
        steering = parse_steering(body.get("steering"), b.n_layers, b.hidden_dim)
        self._check_fits([prompt], config)
        return _TokenStream(self, req, lambda cancel: b.stream(prompt, config, capture, steering, cancel=cancel))

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


def serve(experiment: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None,
          variant: str | None = None, use_chat_template: bool | None = None, **settings) -> None:
    """Load ``experiment``'s model once and serve it until interrupted (Ctrl-C); ``settings`` are `ModelServer`'s
    (``max_new_tokens_limit``, ``request_timeout``, ``io_timeout``, ``stream_buffer``)."""
    if host not in LOCAL_HOSTS and token is None:  # fail before the (slow) model load
        raise ValueError(f"host {host!r} needs a token (--token or ${TOKEN_ENV})")
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
          **{k: getattr(args, k) for k in ("max_new_tokens_limit", "request_timeout", "io_timeout", "stream_buffer")
             if getattr(args, k, None) is not None})
    return 0
