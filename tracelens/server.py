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
  ``{error}``. The connection closes at the end (HTTP/1.0).
- ``POST /forward_with_capture`` ``{input_ids, attention_mask?, capture}`` -> ``{activations}``

Encodings (no pickle anywhere): a tensor is ``{"safetensors": base64}`` (one tensor under the key ``"t"``) or, for
``input_ids``/``attention_mask`` and steering vectors, a plain nested JSON list of numbers. An activation blob
``{layer: {component: tensor}}`` is ``{"safetensors": base64}`` of one safetensors file with keys
``"{layer}/{component}"``. ``config`` has the `GenerationConfig` fields, ``capture`` is ``{layers?, components?}``,
a steering entry is ``{layer, vector, coefficient?, component?, positions?}``.

Security: binds 127.0.0.1 by default and then checks the Host header (against DNS rebinding); a non-loopback
host is refused unless a token is set. With a token every request (``/health`` included) must send
``Authorization: Bearer <token>``, else 401. Malformed requests get 4xx ``{"error": reason}``; other failures 500
``{"error": message}``, never a traceback. One lock serialises all model access, so concurrent requests never
share a forward pass (or hooks).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import os
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tracelens.backends import CaptureResult, CaptureSpec, GenerationConfig, LocalBackend, SteeringSpec
from tracelens.local_http import LOCAL_HOSTS, host_header_ok, loopback_host_headers, threading_server
from tracelens.sites import COMPONENTS

DEFAULT_PORT = 8765
MAX_BODY_BYTES = 256 * 1024 * 1024
TOKEN_ENV = "TRACELENS_SERVER_TOKEN"


class RequestError(Exception):
    """An error answered as ``{"error": message}`` with an HTTP status (4xx)."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


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
    flat = {f"{l}/{c}": a.detach().contiguous().cpu() for l, comps in acts.items() for c, a in comps.items()}
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


def parse_config(v) -> GenerationConfig:
    if v is None:
        return GenerationConfig()
    if not isinstance(v, dict):
        raise RequestError("config must be an object")
    _fields(v, (), ("max_new_tokens", "temperature", "stop_token_ids", "seed"))
    c = GenerationConfig()
    if "max_new_tokens" in v:
        if not _is_int(v["max_new_tokens"]) or v["max_new_tokens"] < 0:
            raise RequestError("config.max_new_tokens must be a non-negative integer")
        c.max_new_tokens = v["max_new_tokens"]
    if "temperature" in v:
        if not _is_num(v["temperature"]) or v["temperature"] < 0:
            raise RequestError("config.temperature must be a non-negative number")
        c.temperature = float(v["temperature"])
    if v.get("stop_token_ids") is not None:
        if not isinstance(v["stop_token_ids"], list) or not all(_is_int(x) for x in v["stop_token_ids"]):
            raise RequestError("config.stop_token_ids must be a list of integers or null")
        c.stop_token_ids = v["stop_token_ids"]
    if v.get("seed") is not None:
        if not _is_int(v["seed"]):
            raise RequestError("config.seed must be an integer or null")
        c.seed = v["seed"]
    return c


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
            raise RequestError(f"{what}.coefficient must be a finite number")
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


class _Handler(BaseHTTPRequestHandler):
    server_version = "tracelens-model-server"
    app: "ModelServer"  # set on the subclass made by ModelServer

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        try:
            self.app._check_request(self)
            path = urlsplit(self.path).path
            if method == "GET":
                if path != "/health":
                    raise RequestError(f"no GET route {path!r}; GET /health only", HTTPStatus.NOT_FOUND)
                return self._send_json(HTTPStatus.OK, self.app.health())
            route = self.app.routes.get(path)
            if route is None:
                raise RequestError(f"no POST route {path!r}; routes: {', '.join(self.app.routes)}", HTTPStatus.NOT_FOUND)
            body = self._read_body()
            if path == "/stream":
                return self._stream(body)
            self._send_json(HTTPStatus.OK, route(body))
        except RequestError as err:
            self._send_json(err.status, {"error": str(err)}, err.status == HTTPStatus.UNAUTHORIZED)
        except Exception as err:  # JSON, never a traceback
            self.log_error("model server error %s: %s", type(err).__name__, err)
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(err).__name__}: {err}"})

    def _read_body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("a POST needs a Content-Length header", HTTPStatus.LENGTH_REQUIRED)
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(f"request body over {MAX_BODY_BYTES} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(f"body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise RequestError("body must be a JSON object")
        return body

    def _stream(self, body: dict) -> None:
        tokens = self.app.stream(body)  # validates, takes the lock, yields dicts
        try:
            first = next(tokens, None)
        except Exception:
            tokens.close()
            raise
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        try:
            if first is not None:
                self.wfile.write((json.dumps(first) + "\n").encode())
                self.wfile.flush()
            for item in tokens:
                self.wfile.write((json.dumps(item) + "\n").encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as err:
            self.log_error("model server stream error %s: %s", type(err).__name__, err)
            try:
                self.wfile.write((json.dumps({"error": f"{type(err).__name__}: {err}"}) + "\n").encode())
            except OSError:
                pass
        finally:
            tokens.close()
        self.close_connection = True

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
    non-loopback ``host`` without a ``token``.
    """

    def __init__(self, backend: LocalBackend, experiment: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 token: str | None = None, *, variant: str | None = None, verbose: bool = True) -> None:
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError("token must be a non-empty string or None")
        if host not in LOCAL_HOSTS and token is None:
            raise ValueError(f"host {host!r} would let anyone on the network run the model; bind 127.0.0.1, "
                             "or set a token (every request must then send 'Authorization: Bearer <token>')")
        self.backend, self.experiment, self.variant = backend, experiment, variant
        self.token, self.verbose = token, verbose
        self.lock = threading.Lock()
        self.routes = {"/generate": self.generate, "/generate_with_capture": self.generate_with_capture,
                       "/stream": self.stream, "/forward_with_capture": self.forward_with_capture}
        self.httpd = threading_server(host, port, type("_BoundHandler", (_Handler,), {"app": self}))
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
        if self.token is not None:
            auth = handler.headers.get("Authorization") or ""
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                raise RequestError("missing or wrong token: send 'Authorization: Bearer <token>'", HTTPStatus.UNAUTHORIZED)
        if not host_header_ok(handler.headers, self.allowed_hosts):
            raise RequestError("unexpected Host header; use the server's 127.0.0.1 address", HTTPStatus.FORBIDDEN)

    # --- endpoints (each takes the parsed JSON body) ---

    def health(self) -> dict:
        b = self.backend
        cfg = b.model.cfg
        return {"status": "ok", "experiment": self.experiment, "variant": self.variant,
                "model": {"name": getattr(cfg, "model_name", None), "n_layers": b.n_layers, "hidden_dim": b.hidden_dim,
                          "d_vocab": getattr(cfg, "d_vocab", None), "dtype": str(getattr(cfg, "dtype", "")),
                          "device": str(b.device)},
                "use_chat_template": b.use_chat_template}

    def _generation_args(self, body: dict, with_capture: bool):
        b = self.backend
        _fields(body, ("prompts",), ("config", "steering", "system_prompts") + (("capture",) if with_capture else ()))
        prompts = _str_list(body["prompts"], "prompts")
        system = body.get("system_prompts")
        if system is not None:
            _str_list(system, "system_prompts", allow_none_items=True)
            if len(system) != len(prompts):
                raise RequestError(f"got {len(prompts)} prompts but {len(system)} system_prompts")
        config = parse_config(body.get("config"))
        steering = parse_steering(body.get("steering"), b.n_layers, b.hidden_dim)
        capture = parse_capture(body.get("capture"), b.n_layers) if with_capture else None
        return prompts, config, steering, capture, system

    def generate(self, body: dict) -> dict:
        prompts, config, steering, _, system = self._generation_args(body, False)
        with self.lock:
            results = self.backend.generate_results(prompts, config, steering, system)
        return {"responses": [r.response_text for r in results],
                "results": [result_to_json(r, activations=False) for r in results]}

    def generate_with_capture(self, body: dict) -> dict:
        prompts, config, steering, capture, system = self._generation_args(body, True)
        with self.lock:
            results = self.backend.generate_with_capture(prompts, config, capture, steering, system)
        return {"results": [result_to_json(r) for r in results]}

    def stream(self, body: dict):
        """Validate now; return a generator of token dicts that holds the model lock while it runs."""
        b = self.backend
        _fields(body, ("prompt",), ("config", "capture", "steering"))
        if not isinstance(body["prompt"], str):
            raise RequestError("prompt must be a string")
        config = parse_config(body.get("config"))
        capture = parse_capture(body.get("capture"), b.n_layers)
        steering = parse_steering(body.get("steering"), b.n_layers, b.hidden_dim)

        def tokens():
            with self.lock:
                gen = b.stream(body["prompt"], config, capture, steering)
                try:
                    for t in gen:
                        yield {"token": t.token, "token_id": t.token_id, "activations": encode_activations(t.activations)}
                finally:
                    gen.close()  # removes its hooks before the lock is released

        return tokens()

    def forward_with_capture(self, body: dict) -> dict:
        b = self.backend
        _fields(body, ("input_ids", "capture"), ("attention_mask",))
        ids = _ids_tensor(body["input_ids"], "input_ids", getattr(b.model.cfg, "d_vocab", None))
        mask = None
        if body.get("attention_mask") is not None:
            mask = _ids_tensor(body["attention_mask"], "attention_mask", None)
            if mask.shape != ids.shape:
                raise RequestError(f"attention_mask shape {list(mask.shape)} != input_ids shape {list(ids.shape)}")
            if ((mask != 0) & (mask != 1)).any():
                raise RequestError("attention_mask must hold only 0 and 1")
        capture = parse_capture(body["capture"], b.n_layers, required=True)
        with self.lock:
            acts = b.forward_with_capture(ids, mask, capture)
            encoded = encode_activations(acts)
        return {"activations": encoded}


def serve(experiment: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None,
          variant: str | None = None, use_chat_template: bool | None = None) -> None:
    """Load ``experiment``'s model once and serve it until interrupted (Ctrl-C)."""
    if host not in LOCAL_HOSTS and token is None:  # fail before the (slow) model load
        raise ValueError(f"host {host!r} needs a token (--token or ${TOKEN_ENV})")
    backend = LocalBackend.from_experiment(experiment, variant, use_chat_template=use_chat_template)
    server = ModelServer(backend, experiment, host, port, token, variant=backend.variant)
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
          variant=getattr(args, "variant", None))
    return 0
