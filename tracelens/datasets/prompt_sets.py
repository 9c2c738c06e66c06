"""Inference prompt sets: named lists of prompts to run a model on, loaded and validated.

A prompt set is one JSON file:

    {"name": str, "description": str, "prompts": [{"id": int, "text": str, ...}], "system_prompt"?: str | null}

Prompt ids must be unique ints (not necessarily contiguous); `text` must be a non-empty string. Extra keys on a
prompt (say "category") are kept in `Prompt.meta`; extra top-level keys are rejected, so a misspelt
"system_prompt" fails loudly instead of being ignored.

The package ships `general` (everyday questions, advice and short tasks) and `neutral` (50 Alpaca-style
instructions for massive-activation calibration) under `tracelens/data/prompt_sets` (see `list_prompt_sets()`).
Pass `root=` to use another folder of sets, or a path to a `.json` file to load one file directly. Files are only
parsed as JSON; nothing in them is executed.

Example:
    >>> ps = load_prompt_set("neutral")
    >>> ps.name, len(ps), ps.prompts[0].id, ps.system_prompt
    ('neutral', 50, 0, None)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from tracelens.errors import ConfigError, MissingArtifactError, PromptSetError
from tracelens.io import check_name, existing_dir, json_object, read_json


_TOP_KEYS = ("name", "description", "prompts", "system_prompt")
_REQUIRED_KEYS = ("name", "description", "prompts")
_FILE_HINT = "; to load a file, pass a pathlib.Path or a path ending in '.json'"


@dataclass(frozen=True)
class Prompt:
    """One prompt of a set: its `id`, its `text`, and any extra keys it carried in `meta`."""

    id: int
    text: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PromptSet:
    """A loaded, validated prompt set.

    Attributes:
        name: the set's own `name` field.
        description: what the set is for.
        prompts: the prompts, in file order.
        system_prompt: a system prompt to use with every prompt, or None for no system turn.
        path: the file it was read from.
    """

    name: str
    description: str
    prompts: list[Prompt]
    system_prompt: str | None = None
    path: Path | None = None

    @property
    def texts(self) -> list[str]:
        """The prompt texts, in order."""
        return [p.text for p in self.prompts]

    def __len__(self) -> int:
        return len(self.prompts)


def default_prompt_sets_root() -> Path:
    """The folder of prompt sets shipped with tracelens (`tracelens/data/prompt_sets`)."""
    path = Path(str(resources.files("tracelens").joinpath("data", "prompt_sets")))
    if not path.is_dir():
        raise MissingArtifactError(f"tracelens' shipped prompt-set folder is missing: expected a directory at {path}")
    return path


def list_prompt_sets(root: str | Path | None = None) -> list[str]:
    """Names of the prompt sets (`*.json` file stems) in `root` (default: the shipped sets), sorted.

    A file is listed whether or not its content is valid (`load_prompt_set` reports what is wrong).
    """
    base = _resolve_root(root)
    return sorted(p.stem for p in base.glob("*.json") if p.is_file() and _is_name(p.stem))


def load_prompt_set(name_or_path: str | Path, root: str | Path | None = None) -> PromptSet:
    """Load and validate a prompt set by name (from `root`, default the shipped sets) or from a file path.

    Args:
        name_or_path: a set name such as "neutral" (one folder name by `tracelens.io.check_name`, so it can never
            point outside `root`), or a `pathlib.Path` / a string ending in ".json" naming a file to read directly.
        root: the folder to look names up in, e.g. an experiment's own `datasets/inference`.

    Raises:
        ConfigError (a ValueError): a name that is not one folder name (`tracelens.io.check_name`; e.g.
            "../secrets", "a/b", "").
        MissingArtifactError (a FileNotFoundError): no such set or file (the message lists the available sets).
        PromptSetError: the file is not valid JSON or not in the prompt-set format (missing or unknown keys, empty
            or duplicate prompt ids, empty text, ...). The message names the file.
    """
    if isinstance(name_or_path, Path) or (isinstance(name_or_path, str) and name_or_path.endswith(".json")):
        path = Path(name_or_path)
        if not path.is_file():
            raise MissingArtifactError(f"prompt set file {str(path)!r} does not exist")
        return _read_prompt_set(path)
    base = _resolve_root(root)
    path = base / f"{check_name(name_or_path, 'prompt set', hint=_FILE_HINT)[0]}.json"
    if not path.is_file():
        available = list_prompt_sets(base)
        raise MissingArtifactError(
            f"prompt set {name_or_path!r} not found: no file {path}. Sets in {base}: "
            f"{', '.join(available) or 'none'}. To load a file elsewhere, pass its path ending in '.json'"
        )
    return _read_prompt_set(path)


# --- private helpers -------------------------------------------------------------------------------------------


def _resolve_root(root: str | Path | None) -> Path:
    return default_prompt_sets_root() if root is None else existing_dir(root, "prompt set root")


def _is_name(stem: str) -> bool:
    try:
        return bool(check_name(stem, "prompt set"))
    except ConfigError:
        return False


def _read_prompt_set(path: Path) -> PromptSet:
    data = json_object(read_json(path, PromptSetError, hint=""), str(path), _TOP_KEYS, _REQUIRED_KEYS,
                       '{"name": ..., "description": ..., "prompts": [...]}', PromptSetError)

    name, description, system_prompt = data["name"], data["description"], data.get("system_prompt")
    if not isinstance(name, str) or not name.strip():
        raise PromptSetError(f"{path}: 'name' must be a non-empty string; got {name!r}")
    if not isinstance(description, str):
        raise PromptSetError(f"{path}: 'description' must be a string; got {description!r}")
    if system_prompt is not None and (not isinstance(system_prompt, str) or not system_prompt.strip()):
        raise PromptSetError(
            f"{path}: 'system_prompt' must be a non-empty string or null (or left out); got {system_prompt!r}"
        )

    raw = data["prompts"]
    if not isinstance(raw, list) or not raw:
        raise PromptSetError(f'{path}: \'prompts\' must be a non-empty list of {{"id": int, "text": str}}; got {raw!r}')
    prompts = [_parse_prompt(path, i, item) for i, item in enumerate(raw)]
    first_index: dict[int, int] = {}
    for i, prompt in enumerate(prompts):
        if prompt.id in first_index:
            raise PromptSetError(
                f"{path}: duplicate prompt id {prompt.id} at prompts[{first_index[prompt.id]}] and prompts[{i}]; "
                "ids must be unique"
            )
        first_index[prompt.id] = i
    return PromptSet(name=name, description=description, prompts=prompts, system_prompt=system_prompt, path=path)


def _parse_prompt(path: Path, index: int, item: object) -> Prompt:
    where = f"{path}: prompts[{index}]"
    json_object(item, where, None, ("id", "text"), '{"id": 0, "text": "..."}', PromptSetError)
    pid, text = item["id"], item["text"]
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise PromptSetError(f"{where}: 'id' must be an integer; got {pid!r}")
    if not isinstance(text, str) or not text.strip():
        raise PromptSetError(f"{where} (id {pid}): 'text' must be a non-empty string; got {text!r}")
    meta = {k: v for k, v in item.items() if k not in ("id", "text")}
    return Prompt(id=pid, text=text, meta=meta)
