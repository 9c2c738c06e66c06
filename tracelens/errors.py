"""The errors tracelens raises: one base class, each kind also a subclass of the builtin callers expect.

Catch ``TracelensError`` for anything tracelens refuses or fails at, or the builtin (``ValueError``,
``FileNotFoundError``, ...) as before. Messages follow one style: "X must be Y; got Z" for a bad value, and name the
file (and line) for bad data. ``tracelens`` on the command line prints any of them as one line and exits 2.

    TracelensError
    ├── ConfigError (ValueError)            a setting, argument or spec has a bad value
    ├── ShapeError (ValueError)             tensors or sequences that must fit do not (width, dims, lengths)
    ├── DirectionError (ValueError)         a vector that cannot define a direction (zero or non-finite)
    ├── DataError (ValueError)              a file exists but its content is invalid
    │   ├── TraitDataError, PromptSetError, ABDataError
    ├── MissingArtifactError (FileNotFoundError)   an expected file or folder does not exist
    ├── UnknownKeyError (KeyError)          a lookup by name found nothing (a variant, a hooked layer, ...)
    ├── InputTypeError (TypeError)          an argument of the wrong type
    ├── BackendError (RuntimeError)         a model backend, judge, remote server or numerical routine failed
    │   ├── JudgeError, ServerError
    ├── StateError (RuntimeError)           called in the wrong state (already active, shut down, ...)
    ├── GenerationCancelled (RuntimeError)  generation stopped because its ``cancel`` callable said so
    └── RequestError                        an HTTP request refused with a ``status`` (server, dashboard); it is an
                                            answer to a client, not a Python failure, so no builtin fits
"""

from __future__ import annotations

from http import HTTPStatus


class TracelensError(Exception):
    """Base of every error tracelens raises on purpose."""


class ConfigError(TracelensError, ValueError):
    """A setting, argument or spec has a bad value: "X must be Y; got Z"."""


class ShapeError(TracelensError, ValueError):
    """Tensors or sequences that must fit do not: a width from another model, wrong dims, unequal lengths."""


class DirectionError(TracelensError, ValueError):
    """A vector cannot define a direction: its norm is below ``MIN_NORM`` (1e-8) or it has NaN / inf entries."""


class DataError(TracelensError, ValueError):
    """A file exists but its content is invalid; the message names the file and, if known, the line."""


class TraitDataError(DataError):
    """A trait dataset file exists but its content is invalid (the message names the file and, if known, the line)."""


class PromptSetError(DataError):
    """A prompt set file exists but its content is invalid (the message names the file)."""


class ABDataError(DataError):
    """An A/B dataset file is invalid; the message names the file and line."""


class MissingArtifactError(TracelensError, FileNotFoundError):
    """An expected file or folder does not exist; the message says which and what produces it."""


class UnknownKeyError(TracelensError, KeyError):
    """A lookup by name found nothing; the message lists what exists."""

    def __str__(self) -> str:  # KeyError would show the repr of the message, quotes and escapes included
        return str(self.args[0]) if self.args else ""


class InputTypeError(TracelensError, TypeError):
    """An argument of the wrong type: "X must be a T; got U"."""


class BackendError(TracelensError, RuntimeError):
    """A model backend, judge, remote server or numerical routine failed to do what was asked (an endpoint refused,
    vLLM answered out of order, every fit of a method failed, an installed library is known to compute wrongly)."""


class JudgeError(BackendError):
    """A judge could not produce scores: the endpoint refused, kept failing, or answered without logprobs."""


class ServerError(BackendError):
    """The model server answered an error: ``status`` (HTTP code) and its ``{"error"}`` message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"model server error {status}: {message}")
        self.status, self.message = status, message


class StateError(TracelensError, RuntimeError):
    """An object was used in the wrong state: an adapter entered twice, a backend after shutdown, ..."""


class GenerationCancelled(TracelensError, RuntimeError):
    """Generation stopped between two tokens because its `cancel` callable returned True."""


class RequestError(TracelensError):
    """A request the model server or dashboard refuses: answered ``{"error": message}`` with HTTP ``status``
    (400 by default; 4xx for the client's fault, 500 for a stored file it cannot read, 503 when busy or late);
    under the server's ``/v1`` as OpenAI's ``{"error": {message, type, param, code}}`` with ``code`` (e.g.
    ``model_not_found``)."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


__all__ = [
    "TracelensError", "ConfigError", "RequestError", "ShapeError", "DirectionError", "DataError", "TraitDataError",
    "PromptSetError", "ABDataError", "MissingArtifactError", "UnknownKeyError", "InputTypeError", "BackendError",
    "JudgeError", "ServerError", "StateError", "GenerationCancelled",
]
