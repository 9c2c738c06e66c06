"""Atomic file writing, crash-safe appends, code-free tensor loading, and the one JSON / JSONL reader.

Every file is written to a temporary name in the same folder and renamed into place, so a killed
run leaves either the old file or the new one, never half of one; files get the usual permissions
(0666 less the umask), like any other file the user creates. An append first repairs a torn last
line left by a killed writer, keeping the fragment in a `.torn` file beside it. Tensors are stored
as safetensors (no pickle, nothing executes on load).

Every JSON or JSONL file the package reads, its own artifacts and the files a user writes (traits, prompt sets,
A/B sets, model configs), goes through `read_json` / `read_json_lines`: a malformed file raises the caller's error
class naming the file, line and column, and `json_object` checks a record's keys the same way everywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tracelens.errors import ConfigError, DataError, MissingArtifactError



def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def unique_sibling(path: Path, tag: str) -> Path:
    """A new, unused path beside `path`: `{stem}.{tag}-{random}{suffix}` (never overwrites anything)."""
    path = Path(path)
    while True:
        candidate = path.with_name(f"{path.stem}.{tag}-{uuid.uuid4().hex[:12]}{path.suffix}")
        if not candidate.exists():
            return candidate


@contextlib.contextmanager
def _replacing(path: Path):
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; the file should look like any other
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    with _replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def append_jsonl(path: Path, obj) -> None:
    """Append one JSON line with a single write, after repairing a torn last line (see `repair_jsonl`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_jsonl(path)
    line = (json.dumps(obj, allow_nan=False) + "\n").encode()
    with open(path, "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def repair_jsonl(path: Path) -> Path | None:
    """Make `path` end at a line boundary. A last line without its newline is completed when it is
    valid JSON, else moved to a new `{stem}.torn-*.jsonl` beside it (returned) and cut off."""
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return None
    cut = data.rfind(b"\n") + 1
    fragment = data[cut:]
    try:
        json.loads(fragment)
    except ValueError:
        aside = unique_sibling(path, "torn")
        write_bytes(aside, fragment)
        write_bytes(path, data[:cut])
        return aside
    write_bytes(path, data + b"\n")
    return None


def read_text(path: str | Path, error: type[Exception] = DataError) -> str:
    """The file's text decoded as UTF-8; `error` naming the file when it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path} is not valid UTF-8 text ({err})") from None


FORCE_HINT = "; delete it or re-run with --force"
"""What to do about a corrupt artifact (tracelens' own output), appended to its error."""


def _malformed(where: str, err: json.JSONDecodeError, error: type[Exception], hint: str) -> Exception:
    return error(f"{where}: malformed JSON ({err.msg} at column {err.colno}){hint}")


def read_json(path: str | Path, error: type[Exception] = DataError, hint: str = FORCE_HINT) -> Any:
    """The JSON value in the file at `path`. Malformed JSON raises `error` naming the file, line and column, then
    `hint` (for files a user writes, pass `hint=""`)."""
    try:
        return json.loads(read_text(path, error))
    except json.JSONDecodeError as err:
        raise _malformed(f"{path}, line {err.lineno}", err, error, hint) from None


def read_json_lines(path: str | Path, error: type[Exception] = DataError, hint: str = FORCE_HINT,
                    torn_tail: bool = False) -> list[tuple[str, Any]]:
    """`(where, value)` for each non-blank line of the JSONL file at `path`, `where` being "{path}, line {n}" for
    the caller's own errors. A malformed line raises `error` naming it (then `hint`), except the last line when
    `torn_tail` (a killed writer's half line, dropped)."""
    lines = read_text(path, error).splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}, line {n}", json.loads(line)))
        except json.JSONDecodeError as err:
            if torn_tail and n == len(lines):
                break
            raise _malformed(f"{path}, line {n}", err, error, f": {line[:80]!r}{hint}") from None
    return rows


def read_jsonl(path: str | Path) -> list[Any]:
    """The values of a JSONL artifact, one per line: [] when there is no file; a torn last line (from a killed
    writer) is dropped, any other bad line raises DataError."""
    return [value for _, value in read_json_lines(path, torn_tail=True)] if Path(path).is_file() else []


def json_object(value: Any, where: str, keys: tuple[str, ...] | None, required: tuple[str, ...] = (),
                example: str = "", error: type[Exception] = DataError) -> dict:
    """`value` when it is a JSON object with only `keys` (None: any) and all of `required`; `error` naming `where`
    otherwise (`example` shows the expected shape)."""
    if not isinstance(value, dict):
        raise error(f"{where}: expected a JSON object{f' like {example}' if example else ''}; "
                    f"got {type(value).__name__}")
    unknown = sorted(set(value) - set(keys)) if keys is not None else []
    if unknown:
        raise error(f"{where}: unknown keys {unknown}; allowed keys are {list(keys)}")
    missing = [k for k in required if k not in value]
    if missing:
        raise error(f"{where}: missing {', '.join(map(repr, missing))} (got keys {sorted(value)})")
    return value


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    with _replacing(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise MissingArtifactError(f"no tensor file at {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"{path} is corrupt or not a safetensors file: {err}") from err


def existing_dir(path: str | Path, what: str) -> Path:
    """`path` as a Path when it is an existing directory; MissingArtifactError naming `what` otherwise."""
    if not Path(path).is_dir():
        raise MissingArtifactError(f"{what} must be an existing directory; got {str(path)!r}")
    return Path(path)


SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
"""One part of a name that becomes a folder (see `check_name`)."""


def check_name(value: object, what: str, max_parts: int | None = 1, hint: str = "") -> list[str]:
    """The "/"-separated parts of a name that becomes folders (an experiment, trait, variant, prompt set, ...).

    The one rule for every name: each part starts with a letter or digit and holds only letters, digits, '.', '_'
    and '-', so no part is empty, '.', '..', hidden or absolute, and '_'-prefixed folders stay tracelens' own
    (``steering/_reference``). At most `max_parts` parts: 1 for every name but a trait's, which may nest
    (``None``: any number, e.g. "starter/optimism" or "base/alignment/deception"). ConfigError otherwise, with
    `hint` appended.
    """
    example = "'default'" if max_parts == 1 else "'starter/optimism'"
    if not isinstance(value, str):
        raise ConfigError(f"invalid {what} name {value!r}: {what} must be a string like {example}; "
                          f"got {type(value).__name__}{hint}")
    parts = value.split("/")
    if (max_parts is not None and len(parts) > max_parts) or not all(map(SEGMENT.match, parts)):
        shape = "one folder name" if max_parts == 1 else "a relative name"
        raise ConfigError(
            f"invalid {what} name {value!r}: expected {shape} like {example} whose '/'-separated parts start with a "
            f"letter or digit and hold only letters, digits, '.', '_' and '-' (no empty, '.', '..' or absolute "
            f"parts){hint}"
        )
    return parts
