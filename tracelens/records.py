"""The one codec of tracelens' records: ``@record`` gives a dataclass or NamedTuple ``to_dict()`` (plain JSON data:
nested records as dicts, integer keys as strings, tuples as lists) and ``from_dict(d)`` (the record back; unknown
keys ignored), read from its fields and their type hints. A field stored another way says how in
``field(metadata=stored(...))``; the records themselves live in `tracelens.types`."""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass
from types import NoneType, UnionType
from typing import Any, TypeVar

from tracelens.errors import DataError, InputTypeError

_R = TypeVar("_R")


@dataclass(frozen=True)
class Stored:
    """How ``to_dict`` / ``from_dict`` store one field where it is not stored as-is under its own name (give it as
    ``field(metadata=stored(...))``). ``key``: its JSON key; ``under``: the key of the nested object that holds
    it; ``legacy``: an older key read when the key is absent; ``omit_none``: left out when None; ``digits``: numbers
    written as floats rounded to that many decimals; ``read``: applied to the value read (``int`` for layers);
    ``missing``: the factory of the value read when the key is absent or null (files from before the field)."""

    key: str | None = None
    under: str | None = None
    legacy: str | None = None
    omit_none: bool = False
    digits: int | None = None
    read: Callable[[Any], Any] | None = None
    missing: Callable[[], Any] | None = None


def stored(**how: Any) -> dict[str, Stored]:
    """A field's ``metadata``: ``field(metadata=stored(omit_none=True))``; the options are ``Stored``'s."""
    return {"stored": Stored(**how)}


def record(cls: type[_R]) -> type[_R]:
    """Class decorator: gives a dataclass or NamedTuple ``to_dict`` and ``from_dict`` from its fields' type hints
    and ``stored(...)`` metadata. A ``_on_disk(d)`` method, where the class has one, finishes the dict
    ``to_dict`` returns (a constant ``"type"`` key, derived keys, another key order)."""
    cls.to_dict = _to_dict
    cls.from_dict = classmethod(_from_dict)
    return cls


@functools.cache
def _fields(cls: type) -> list[tuple[str, Any, bool, Stored]]:
    """``(name, type hint, required, how it is stored)`` per field of the dataclass or NamedTuple ``cls``."""
    hints = typing.get_type_hints(cls)
    if dataclasses.is_dataclass(cls):
        return [(f.name, hints[f.name], f.default is MISSING and f.default_factory is MISSING,
                 f.metadata.get("stored", Stored())) for f in dataclasses.fields(cls)]
    return [(name, hints[name], name not in cls._field_defaults, Stored()) for name in cls._fields]


def _to_dict(self: Any) -> dict[str, Any]:
    """This record as plain JSON data: nested records as dicts, integer keys as strings, tuples as lists."""
    d: dict[str, Any] = {}
    for name, hint, _, how in _fields(type(self)):
        value = getattr(self, name)
        if value is None and how.omit_none:
            continue
        value = _encode(value, hint) if how.digits is None else _round(value, how.digits)
        (d.setdefault(how.under, {}) if how.under else d)[how.key or name] = value
    return self._on_disk(d) if hasattr(self, "_on_disk") else d


def _from_dict(cls: type[_R], d: Mapping[str, Any]) -> _R:
    """The record ``to_dict`` wrote: keys it does not know are ignored, layer keys may be strings or ints."""
    if not isinstance(d, Mapping):
        raise InputTypeError(f"{cls.__name__}.from_dict expects a mapping; got {type(d).__name__}.")
    kw: dict[str, Any] = {}
    absent = []
    for name, hint, required, how in _fields(cls):
        value = _lookup(d, name, how)
        if how.missing is not None and (value is None or value is MISSING):
            kw[name] = how.missing()
        elif value is not MISSING:
            value = _decode(value, hint, f"{cls.__name__}.{name}")
            kw[name] = value if how.read is None else how.read(value)
        elif required:
            absent.append(f"{how.under}.{how.key or name}" if how.under else how.key or name)
    if absent:
        raise DataError(f"{cls.__name__}.from_dict: missing {', '.join(map(repr, absent))} (got keys {list(d)})")
    return cls(**kw)


def _lookup(d: Mapping[str, Any], name: str, how: Stored) -> Any:
    """The stored value of field ``name`` in ``d``; ``MISSING`` when it has none."""
    holder, key = (d.get(how.under) if how.under else d), how.key or name
    if isinstance(holder, Mapping) and key in holder:
        return holder[key]
    return d.get(how.legacy, MISSING) if how.legacy else MISSING


def _is_record(hint: Any) -> bool:
    return isinstance(hint, type) and hasattr(hint, "from_dict")


def _unwrapped(hint: Any) -> Any:
    """``X`` of ``X | None``; other hints as they are."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, UnionType) and len(args) == 2 and NoneType in args:
        return args[0] if args[1] is NoneType else args[1]
    return hint


@functools.cache
def _as_is(hint: Any) -> bool:
    """Whether values of ``hint`` are stored as they are: no record, mapping or list (nor an Optional of one)."""
    hint = _unwrapped(hint)
    return typing.get_origin(hint) is None and not _is_record(hint)


def _encode(value: Any, hint: Any) -> Any:
    """``value`` (of type ``hint``) as JSON data; a value of another type (``Any``, ``int | str``) is copied."""
    if value is None:
        return None
    hint = _unwrapped(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_record(hint):
        return value.to_dict()
    if origin is dict:
        return {(str(k) if args[0] is int else k): _encode(v, args[1]) for k, v in value.items()}
    if origin in (list, tuple):  # tuple[X, ...]
        return copy.deepcopy(list(value)) if _as_is(args[0]) else [_encode(v, args[0]) for v in value]
    return copy.deepcopy(value)


def _decode(value: Any, hint: Any, where: str) -> Any:
    """``value`` read from JSON as ``hint``: records rebuilt, mappings and lists checked and rebuilt (integer keys
    from strings, tuples from lists); other values as they are."""
    if value is None and NoneType in typing.get_args(hint):
        return None
    hint = _unwrapped(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_record(hint):
        return hint.from_dict(value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise InputTypeError(f"{where} must be a mapping; got {type(value).__name__}.")
        return {(int(k) if args[0] is int else k): _decode(v, args[1], where) for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise InputTypeError(f"{where} must be a list; got {type(value).__name__}.")
        return origin(value if _as_is(args[0]) else (_decode(v, args[0], where) for v in value))
    return value


def _round(value: Any, digits: int) -> Any:
    """Every number in ``value`` (a number, or lists and dicts of them) as a float rounded to ``digits`` decimals."""
    if isinstance(value, (int, float)):
        return round(float(value), digits)
    if isinstance(value, Mapping):
        return {k: _round(v, digits) for k, v in value.items()}
    return [_round(v, digits) for v in value]
