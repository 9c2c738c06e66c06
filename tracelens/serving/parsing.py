"""The model server's JSON requests as the request types of `tracelens.model.requests`: one parser per type.

A parser checks the JSON's shape (an object, its field names), builds the dataclass, whose own checks are the
rules, and adds only what the server decides: its upper bounds. What depends on the model (layers inside it,
vectors of their site's width, prompts that fit its context) is `LocalBackend.check_generation`'s, run by the
server under `bad_request`. Every validation error becomes a 400 (`RequestError`) whose message names the field:
``config: max_new_tokens must be an integer >= 1; got 0``.

Bounds: ``config.max_new_tokens`` at most the server's ``max_new_tokens_limit``; ``stop_token_ids`` inside the
vocabulary; at most the server's ``max_prompts`` prompts per request; at most `MAX_STEERING` steering entries.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import MISSING, fields

import torch

from tracelens.errors import ConfigError, DirectionError, InputTypeError, RequestError, ShapeError
from tracelens.model.requests import CaptureSpec, GenerationConfig, SteeringSpec, check_rows, check_steering_request
from tracelens.model.sites import resolve_layer
from tracelens.serving.codec import decode_tensor

MAX_STEERING = 64
"""Steering entries per request."""

NamedVector = Callable[[dict, str], tuple[int, torch.Tensor]]
"""Resolves a steering entry that names its vector (``trait``...) to ``(layer, vector)``; RequestError if none."""


@contextlib.contextmanager
def bad_request(what: str | None = None) -> Iterator[None]:
    """A validation error raised inside (ConfigError, ShapeError, DirectionError, InputTypeError) as a 400
    `RequestError` with the same message, prefixed with ``what`` (the field) when given."""
    try:
        yield
    except (ConfigError, ShapeError, DirectionError, InputTypeError) as err:
        raise RequestError(f"{what}: {err}" if what else str(err)) from None


def check_fields(body: dict, required: tuple[str, ...], optional: tuple[str, ...], what: str | None = None) -> None:
    """RequestError for a missing required field or a field not in ``required + optional``."""
    prefix = f"{what}: " if what else ""
    missing = [k for k in required if k not in body]
    if missing:
        raise RequestError(f"{prefix}missing field(s): {', '.join(missing)}")
    unknown = sorted(set(body) - set(required) - set(optional))
    if unknown:
        raise RequestError(f"{prefix}unknown field(s): {', '.join(unknown)}; allowed: {', '.join(required + optional)}")


def parse_object(cls: type, obj, what: str, exclude: tuple[str, ...] = ()):
    """``cls(**obj)`` for a JSON object whose keys are ``cls``'s fields (less ``exclude``); 400 otherwise."""
    if not isinstance(obj, dict):
        raise RequestError(f"{what} must be a JSON object; got {type(obj).__name__}")
    init = [f for f in fields(cls) if f.init and f.name not in exclude]
    required = tuple(f.name for f in init if f.default is MISSING and f.default_factory is MISSING)
    check_fields(obj, required, tuple(f.name for f in init if f.name not in required), what)
    with bad_request(what):
        return cls(**obj)


def parse_prompts(v, what: str, limit: int, allow_none_items: bool = False) -> list:
    """A list of 1 to ``limit`` strings (or nulls with ``allow_none_items``)."""
    if not isinstance(v, list) or not 1 <= len(v) <= limit or not all(
            isinstance(x, str) or (allow_none_items and x is None) for x in v):
        got = f"a list of {len(v)}" if isinstance(v, list) else type(v).__name__
        raise RequestError(f"{what} must be a list of 1 to {limit} strings{' or nulls' if allow_none_items else ''}; "
                           f"got {got}")
    return v


def parse_config(v, max_new_tokens_limit: int, d_vocab: int | None = None) -> GenerationConfig:
    """A `GenerationConfig` from a request's ``config`` (None: defaults); ``max_new_tokens`` defaults to the
    smaller of `GenerationConfig`'s default and the limit, and may not exceed the limit."""
    v = {} if v is None else v
    if isinstance(v, dict):
        v = {"max_new_tokens": min(GenerationConfig.max_new_tokens, max_new_tokens_limit), **v}
    config = parse_object(GenerationConfig, v, "config")
    check_max_new_tokens_limit(config.max_new_tokens, max_new_tokens_limit, "config.max_new_tokens")
    if d_vocab is not None and any(i >= d_vocab for i in config.stop_token_ids or ()):
        raise RequestError(f"config: stop_token_ids must be token ids below the vocabulary size {d_vocab}; "
                           f"got {config.stop_token_ids}")
    return config


def check_max_new_tokens_limit(n: int, limit: int, name: str) -> None:
    """The server's upper bound on new tokens (the lower one is `GenerationConfig`'s)."""
    if n > limit:
        raise RequestError(f"{name} must be an integer in [1, {limit}] (the server's max_new_tokens_limit); got {n}")


def parse_capture(v, required: bool = False) -> CaptureSpec | None:
    """A `CaptureSpec` from ``{layers?, components?}``; None when absent and not ``required``."""
    if v is None:
        if required:
            raise RequestError("missing field(s): capture")
        return None
    return parse_object(CaptureSpec, v, "capture")


def parse_steering(v, n_layers: int, named: NamedVector | None = None,
                   n_rows: int | None = None) -> list[SteeringSpec] | None:
    """Steering entries ``{layer, vector, coefficient?, component?, positions?, rows?}`` (the vector a JSON list or
    a safetensors blob); with ``named``, an entry may give ``trait`` (and ``layer?``, ``method?``, ``position?``)
    instead of ``vector``, resolved by ``named`` (its ``layer`` counted from the front). ``rows`` ``[start, end]``
    limits an entry to those of the request's ``n_rows`` prompts (`check_steering_request`); refused where ``n_rows``
    is None."""
    if v is None:
        return None
    if not isinstance(v, list) or len(v) > MAX_STEERING:
        got = f"a list of {len(v)}" if isinstance(v, list) else type(v).__name__
        raise RequestError(f"steering must be a list of at most {MAX_STEERING} entries {{layer, vector, "
                           f"coefficient?, component?, positions?}}; got {got}")
    specs = []
    for i, entry in enumerate(v):
        what = f"steering[{i}]"
        if not isinstance(entry, dict):
            raise RequestError(f"{what} must be a JSON object; got {type(entry).__name__}")
        entry = dict(entry)
        if named is not None and "trait" in entry:
            check_fields(entry, ("trait",), ("layer", "method", "position", "coefficient", "component", "positions")
                         + (("rows",) if n_rows is not None else ()), what)
            if "layer" in entry:
                with bad_request(what):
                    entry["layer"] = resolve_layer(entry["layer"], n_layers)
            entry["layer"], entry["vector"] = named(entry, what)
            for k in ("trait", "method", "position"):
                entry.pop(k, None)
        elif "vector" in entry:
            with bad_request(what):
                entry["vector"] = decode_tensor(entry["vector"], "vector", torch.float32)
        if entry.get("rows") is not None and n_rows is not None:
            with bad_request(what):
                entry["rows"] = check_rows(entry["rows"])  # a JSON [start, end] list as the (start, end) pair
        specs.append(parse_object(SteeringSpec, entry, what,
                                  exclude=("condition",) if n_rows is not None else ("condition", "rows")))
    if n_rows is not None:
        with bad_request():
            check_steering_request(specs, n_rows)
    return specs


def parse_id_rows(v, what: str, d_vocab: int | None, limit: int | None = None) -> list[list[int]]:
    """A list of 1 to ``limit`` non-empty lists of integer token ids (inside ``[0, d_vocab)`` when given)."""
    if not isinstance(v, list) or not v or (limit is not None and len(v) > limit):
        got = f"a list of {len(v)}" if isinstance(v, list) else type(v).__name__
        raise RequestError(f"{what} must be a list of 1 to {limit or 'any number of'} token-id lists; got {got}")
    for i, row in enumerate(v):
        if not isinstance(row, list) or not row or not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
            raise RequestError(f"{what}[{i}] must be a non-empty list of integer token ids; got {str(row)[:80]}")
        if d_vocab is not None and any(not 0 <= t < d_vocab for t in row):
            raise RequestError(f"{what}[{i}] must hold token ids inside [0, {d_vocab}); got {min(row)} to {max(row)}")
    return v


def parse_ids(v, what: str, d_vocab: int | None) -> torch.Tensor:
    """A non-empty 2-D integer tensor ``[batch, pos]`` (token ids inside ``[0, d_vocab)`` when given)."""
    with bad_request():
        t = decode_tensor(v, what)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.dim() != 2 or t.numel() == 0:
        raise RequestError(f"{what} must be a non-empty 2-D integer tensor [batch, pos]; got {t.dtype} {list(t.shape)}")
    t = t.long()
    if d_vocab is not None and (t.min() < 0 or t.max() >= d_vocab):
        raise RequestError(f"{what} must hold token ids inside [0, {d_vocab}); got ids from {int(t.min())} to "
                           f"{int(t.max())}")
    return t
