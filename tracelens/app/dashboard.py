"""The Trait Dynamics dashboard: a local, read-only web page over one experiment's files.

``serve("my_exp")`` serves http://127.0.0.1:8000 with the standard library only. The page (plain HTML,
vanilla JS and inline SVG, in ``tracelens/data/dashboard/``) calls a JSON API:

- ``GET /api/info`` -> ``{experiment, variants, default_variant}``
- ``GET /api/prompt-sets?variant=V`` -> ``{prompt_sets: [name, ...]}``
- ``GET /api/prompts?variant=V&prompt_set=S`` -> ``{prompts: [{id, prompt}]}``
- ``GET /api/traits?variant=V&kind=projections|extraction|steering`` -> ``{traits: ["category/name", ...]}``
- ``GET /api/projections?variant=V&prompt_set=S&prompt_id=I&trait=T[&trait=T2...]&clean=none|top5-3layers|all``
  -> ``{tokens, prompt_end, clean, traits: {T: [{method, layer, prompt, response, dims_removed}]}, errors: {T: msg}}``
  (scores cleaned server-side with ``tracelens.model.cleaning.clean_scores``, rounded to 4 decimals)
- ``GET /api/extraction?variant=V&trait=T`` -> ``{evaluations: [{position_dir, position, component, methods, layers,
  splits, chance, results, selected}]}`` (``chance``, ``results`` and ``selected`` as in the evaluation file:
  test AUROC / accuracy ``{value, lo, hi}`` per method x layer, the random directions' 5th-95th percentile band)
- ``GET /api/steering?variant=V&trait=T`` -> ``{results: [{position_dir, direction, judge, baseline,
  baseline_judge_free, runs: [{layer, method, component, coefficient, trait_mean, coherence_mean, n, judge_free,
  control, selected}], report}]}`` (``judge_free`` / ``control``: trait effect, NLL cost and KL in nats/token,
  each ``{value, lo, hi}``; ``report`` is the selected run on the report questions, or null)

It only reads what the pipeline wrote, and every file path comes from ``tracelens.store``. Names from the
browser are checked there (letters, digits, ``. _ -``; ``category/name`` for traits); the final path is resolved
and must stay inside the experiment folder (a symlink out of it is refused). Errors are JSON
``{"error": message}``: 400 for a bad name or parameter, 404 for a missing file, 500 for an unreadable file
(message only, no traceback). It binds 127.0.0.1 and checks the Host header (against DNS rebinding) unless
``allow_remote=True``, which requires a ``token``: every request must then carry it, as HTTP Basic (the browser's
login prompt: any user name, the token as password) or ``Authorization: Bearer <token>``, else 401.
"""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tracelens.model.cleaning import CLEAN_MODES, clean_scores, dims_for_mode
from tracelens.errors import ConfigError, MissingArtifactError, RequestError
from tracelens.store import Experiment
from tracelens.io import read_json, read_jsonl
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
from tracelens.pipeline.tradeoff_plot import tradeoff_svg
from tracelens.types import ProjectionEntry, ResponseRecord, SteeringResults

_STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/index.html": ("index.html", "text/html; charset=utf-8"),
           "/app.js": ("app.js", "text/javascript; charset=utf-8")}
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


_EVALUATION_KEYS = ("splits", "chance", "results", "selected")  # what the extraction view draws
TOKEN_ENV = "TRACELENS_DASHBOARD_TOKEN"  # the CLI's token when --token is not given


def _bad(message: str) -> RequestError:
    return RequestError(message)


class DashboardData:
    """The dashboard's read-only view of one experiment; each method returns a JSON-ready dict."""

    def __init__(self, experiment: Experiment):
        self.exp = experiment
        self.base = experiment.dir.resolve()

    # --- paths ----------------------------------------------------------------------------------

    def _path(self, build, *args) -> Path:
        """``build(*args)`` (an ``Experiment`` method), resolved and checked to lie inside the experiment."""
        try:
            path = build(*args)
        except ValueError as err:
            raise _bad(str(err)) from None
        resolved = path.resolve()
        if not resolved.is_relative_to(self.base):
            raise _bad(f"{path.relative_to(self.exp.dir)} leads outside the experiment folder")
        return resolved

    def _read(self, path: Path, what: str):
        if not path.is_file():
            raise RequestError(f"no {what} at {path.relative_to(self.base)}; "
                               "run the pipeline stage that writes it",
                               HTTPStatus.NOT_FOUND)
        try:
            return read_json(path)
        except (ValueError, OSError) as err:
            raise RequestError(f"cannot read {what}: {err}", HTTPStatus.INTERNAL_SERVER_ERROR) from None

    # --- listings -------------------------------------------------------------------------------

    def info(self) -> dict:
        variants, default = [], None
        try:
            config = self.exp.config()
            variants = list(config["model_variants"])
            default = config.get("defaults", {}).get("application")
        except (FileNotFoundError, ValueError):
            pass
        on_disk = self.exp.inference_variants()
        variants += [v for v in on_disk if v not in variants]
        return {"experiment": self.exp.name, "variants": variants,
                "default_variant": default if default in variants else (variants[0] if variants else None)}

    def prompt_sets(self, variant: str) -> dict:
        self._path(self.exp.inference_responses_dir, variant)
        return {"prompt_sets": self.exp.prompt_sets(variant)}

    def prompts(self, variant: str, prompt_set: str) -> dict:
        self._path(self.exp.inference_responses_dir, variant, prompt_set)
        try:
            ids = self.exp.prompt_ids(variant, prompt_set)
        except MissingArtifactError as err:
            raise RequestError(str(err), HTTPStatus.NOT_FOUND) from None
        out = []
        for prompt_id in ids:
            try:
                text = str(read_json(self._path(self.exp.inference_response_path, variant, prompt_set, prompt_id))
                           .get("prompt", ""))
            except (ValueError, OSError, AttributeError):
                text = "(unreadable)"
            out.append({"id": prompt_id, "prompt": text[:120]})
        return {"prompts": out}

    def traits(self, variant: str, kind: str) -> dict:
        if kind not in ("projections", "extraction", "steering"):
            raise _bad(f"kind must be projections, extraction or steering; got {kind!r}")
        if kind == "projections":
            self._path(self.exp.projections_dir, variant)
        try:
            return {"traits": self.exp.traits(kind, variant)}
        except ValueError as err:  # a bad variant name
            raise _bad(str(err)) from None

    # --- trait dynamics -------------------------------------------------------------------------

    def projections(self, variant: str, prompt_set: str, prompt_id: str, traits: list[str], clean: str) -> dict:
        if clean not in CLEAN_MODES:
            raise _bad(f"clean must be one of {list(CLEAN_MODES)}; got {clean!r}")
        if not traits:
            raise _bad("give at least one trait=category/name")
        path = self._path(self.exp.inference_response_path, variant, prompt_set, prompt_id)
        try:
            response = ResponseRecord.from_dict(self._read(path, "response"))
        except (TypeError, ValueError) as err:
            raise RequestError(f"response file is not a ResponseRecord: {err}", HTTPStatus.INTERNAL_SERVER_ERROR) from None
        out, errors, statuses = {}, {}, set()
        for trait in traits:
            try:
                out[trait] = self._trait_scores(variant, trait, prompt_set, prompt_id, clean, response)
            except RequestError as err:
                if err.status == HTTPStatus.BAD_REQUEST:
                    raise
                errors[trait] = str(err)
                statuses.add(err.status)
        if not out:  # nothing to draw: answer with the worst error
            raise RequestError("; ".join(f"{t}: {m}" for t, m in errors.items()), max(statuses))
        return {"tokens": response.tokens, "prompt_end": response.prompt_end, "clean": clean,
                "traits": out, "errors": errors}

    def _trait_scores(self, variant, trait, prompt_set, prompt_id, clean, response: ResponseRecord) -> list[dict]:
        data = self._read(self._path(self.exp.projection_path, variant, trait, prompt_set, prompt_id), "projections")
        try:
            entries = [ProjectionEntry.from_dict(e) for e in data.get("projections", [])]
        except (KeyError, TypeError, ValueError) as err:
            raise RequestError(f"projection file is malformed: {err}", HTTPStatus.INTERNAL_SERVER_ERROR) from None
        n_prompt, n_response = response.prompt_end, len(response.tokens) - response.prompt_end
        massive = data.get("massive_dim_data")
        rows = []
        for e in entries:
            if len(e.prompt) != n_prompt or len(e.response) != n_response:
                raise RequestError(f"projections ({len(e.prompt)}+{len(e.response)} tokens) do not match the response "
                                   f"record ({n_prompt}+{n_response} tokens); re-run inference for this prompt",
                                   HTTPStatus.INTERNAL_SERVER_ERROR)
            try:
                dims = dims_for_mode(massive, clean)
                prompt, resp = e.prompt, e.response
                if dims:
                    layer = str(e.layer)
                    vec = massive["vector"][layer]
                    prompt = clean_scores(prompt, massive["prompt"][layer], vec, dims)
                    resp = clean_scores(resp, massive["response"][layer], vec, dims)
            except KeyError as err:
                raise RequestError(f"massive_dim_data has no entry {err} for layer {e.layer}",
                                   HTTPStatus.INTERNAL_SERVER_ERROR) from None
            except (ValueError, TypeError) as err:
                raise RequestError(str(err), HTTPStatus.INTERNAL_SERVER_ERROR) from None
            rows.append({"method": e.method, "layer": e.layer, "prompt": [round(x, 4) for x in prompt],
                         "response": [round(x, 4) for x in resp], "dims_removed": dims})
        return rows

    # --- results views --------------------------------------------------------------------------

    def extraction(self, variant: str, trait: str) -> dict:
        self._path(self.exp.evaluation_dir, trait, variant)
        files = [p.resolve() for p in self.exp.evaluation_paths(trait, variant)]
        if not files:
            raise RequestError(f"no extraction evaluation for {trait!r} ({variant}); "
                               "run extraction first",
                               HTTPStatus.NOT_FOUND)
        evaluations = []
        for path in files:
            if not path.is_relative_to(self.base):
                continue
            report = self._read(path, "evaluation")
            missing = [k for k in _EVALUATION_KEYS if not isinstance(report, dict) or k not in report]
            if missing:
                raise RequestError(f"evaluation {path.relative_to(self.base)} has no {', '.join(missing)} (an older "
                                   "format); re-run extraction with --force",
                                   HTTPStatus.INTERNAL_SERVER_ERROR)
            rows = report["results"]
            evaluations.append({"position_dir": path.parent.name, "position": report.get("position"),
                                "component": path.stem, "methods": sorted({r["method"] for r in rows}),
                                "layers": sorted({int(r["layer"]) for r in rows}),
                                **{k: report[k] for k in _EVALUATION_KEYS}})
        return {"trait": trait, "evaluations": evaluations}

    def steering(self, variant: str, trait: str) -> dict:
        self._path(self.exp.steering_variant_dir, trait, variant)
        out = []
        for position_dir, path in self.exp.steering_results_paths(trait, variant).items():
            path = path.resolve()
            if not path.is_relative_to(self.base):
                continue
            try:
                results = SteeringResults.from_jsonl_lines(read_jsonl(path))
            except (ValueError, KeyError, TypeError) as err:
                raise RequestError(f"cannot read steering results: {err}", HTTPStatus.INTERNAL_SERVER_ERROR) from None
            selected = results.report["config"] if results.report else None
            max_kl = results.header.selection.get("max_kl")
            runs = [{"layer": r.layer, "method": r.method, "component": r.component, "coefficient": r.coefficient,
                     "trait_mean": r.result.trait_mean, "coherence_mean": r.result.coherence_mean, "n": r.result.n,
                     "judge_free": r.judge_free, "within_budget": None if max_kl is None else r.within_budget(max_kl),
                     "selected": r.config.to_dict() == selected}
                    for r in sorted(results.runs, key=lambda r: (r.method, r.layer, abs(r.coefficient)))]
            out.append({"position_dir": position_dir, "direction": results.header.direction,
                        "judge": results.header.eval, "selection": results.header.selection,
                        "baseline": None if results.baseline is None else results.baseline.to_dict(),
                        "baseline_judge_free": results.baseline_judge_free, "runs": runs, "report": results.report,
                        "tradeoff_svg": tradeoff_svg(results)})
        if not out:
            raise RequestError(f"no steering results for {trait!r} ({variant}); run steering first",
                               HTTPStatus.NOT_FOUND)
        return {"trait": trait, "results": out}


# --- HTTP -------------------------------------------------------------------------------------------


def _one(query: dict, name: str, default: str | None = None) -> str:
    values = query.get(name)
    if not values:
        if default is not None:
            return default
        raise _bad(f"missing query parameter {name!r}")
    if len(values) > 1:
        raise _bad(f"query parameter {name!r} given {len(values)} times; give it once")
    return values[0]


def _static(name: str) -> bytes:
    return resources.files("tracelens").joinpath("data", "dashboard", name).read_bytes()


class _Handler(BaseHTTPRequestHandler):
    server_version = "tracelens-dashboard"
    data: DashboardData  # set on the subclass made by make_server
    allowed_hosts: frozenset[str] | None  # None: any Host header (allow_remote)
    token: str | None  # None: no authentication (loopback only)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        try:
            if not token_ok(self.headers, self.token):
                raise RequestError("missing or wrong token: log in with the token as password, "
                                   "or send 'Authorization: Bearer <token>'",
                                   HTTPStatus.UNAUTHORIZED)
            self._check_host()
            url = urlsplit(self.path)
            if url.path in _STATIC:
                name, ctype = _STATIC[url.path]
                return self._send(HTTPStatus.OK, _static(name), ctype)
            if not url.path.startswith("/api/"):
                raise RequestError(f"no page {url.path!r}", HTTPStatus.NOT_FOUND)
            self._send_json(HTTPStatus.OK, self._api(url.path[len("/api/"):], parse_qs(url.query)))
        except RequestError as err:
            self._send_json(err.status, {"error": str(err)})
        except Exception as err:  # answer JSON, never a traceback; log the type server-side
            self.log_error("dashboard error %s: %s", type(err).__name__, err)
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(err).__name__}: {err}"})

    def _check_host(self) -> None:
        if not host_header_ok(self.headers, self.allowed_hosts):
            raise RequestError("unexpected Host header; open the dashboard at its 127.0.0.1 address",
                               HTTPStatus.FORBIDDEN)

    def _api(self, route: str, q: dict) -> dict:
        d = self.data
        if route == "info":
            return d.info()
        if route == "prompt-sets":
            return d.prompt_sets(_one(q, "variant"))
        if route == "prompts":
            return d.prompts(_one(q, "variant"), _one(q, "prompt_set"))
        if route == "traits":
            return d.traits(_one(q, "variant"), _one(q, "kind", "projections"))
        if route == "projections":
            return d.projections(_one(q, "variant"), _one(q, "prompt_set"), _one(q, "prompt_id"),
                                 q.get("trait", []), _one(q, "clean", "none"))
        if route == "extraction":
            return d.extraction(_one(q, "variant"), _one(q, "trait"))
        if route == "steering":
            return d.steering(_one(q, "variant"), _one(q, "trait"))
        raise RequestError(f"no API route {route!r}", HTTPStatus.NOT_FOUND)

    def _send_json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj, allow_nan=False).encode(), "application/json")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", _CSP)
        if status == HTTPStatus.UNAUTHORIZED:  # makes a browser ask for the token
            self.send_header("WWW-Authenticate", 'Basic realm="tracelens dashboard", charset="UTF-8"')
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        if getattr(self.server, "verbose", True):
            super().log_message(format, *args)


def make_server(experiment: str | Experiment, host: str = "127.0.0.1", port: int = 8000, *,
                root: str | Path | None = None, allow_remote: bool = False, token: str | None = None,
                verbose: bool = True) -> ThreadingHTTPServer:
    """A dashboard server for ``experiment`` (not yet serving; call ``serve_forever``). ``port=0`` picks a free one.

    ``root`` overrides the experiments folder (default ``$TRACELENS_EXPERIMENTS`` or ``./experiments``).
    ``token`` (any non-empty string) is required of every request when set. Raises ValueError for a host other
    than 127.0.0.1/localhost/::1 unless ``allow_remote=True``, for ``allow_remote=True`` without a token (the
    Host check is off, so the files would be readable by anyone who can reach the port), and FileNotFoundError
    when the experiment folder is missing.
    """
    check_token(token)
    if host not in LOCAL_HOSTS and not allow_remote:
        raise ConfigError(f"host {host!r} would expose the experiment's files to the network; use 127.0.0.1, "
                         "or pass allow_remote=True with a token if that is intended")
    if allow_remote and token is None:
        raise ConfigError("allow_remote=True needs a token, which every request must then send; got token=None "
                         f"(command line: --token or ${TOKEN_ENV})")
    exp = Experiment.of(experiment, root)
    if not exp.dir.is_dir():
        raise MissingArtifactError(f"no experiment folder at {exp.dir}; check the name or set TRACELENS_EXPERIMENTS")
    handler = type("_BoundHandler", (_Handler,), {"data": DashboardData(exp), "allowed_hosts": None, "token": token})
    server = threading_server(host, port, handler)
    server.verbose = verbose
    if not allow_remote:
        handler.allowed_hosts = loopback_host_headers(server.server_address[1])
    return server


def serve(experiment: str | Experiment, host: str = "127.0.0.1", port: int = 8000, *,
          root: str | Path | None = None, allow_remote: bool = False, token: str | None = None) -> None:
    """Serve the dashboard of ``experiment`` until interrupted (Ctrl-C). See ``make_server`` for the arguments."""
    server = make_server(experiment, host, port, root=root, allow_remote=allow_remote, token=token)
    login = "; log in with any user name and the token as password" if token is not None else ""
    serve_until_interrupted(server.serve_forever, server.server_close,
                            f"tracelens dashboard for {server.RequestHandlerClass.data.exp.name!r}: "
                            f"{http_url(*server.server_address[:2])}/{login}")


def serve_in_thread(experiment: str | Experiment, **kwargs) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """``make_server(experiment, port=0, **kwargs)`` serving in a daemon thread (for tests and notebooks);
    stop with ``server.shutdown(); server.server_close()``."""
    kwargs.setdefault("port", 0)
    server = make_server(experiment, **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread
