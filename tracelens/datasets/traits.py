"""Trait datasets: contrastive scenarios, a judge rubric and steering questions, loaded and validated.

A trait lives in a folder `<root>/<category>/<name>/` (deeper nesting such as `base/alignment/deception` works too):

- `positive.jsonl` / `negative.jsonl`: one `{"prompt": str, "system_prompt"?: str | null}` object per line, or
  `positive.txt` / `negative.txt`: one scenario per line (stripped, blank lines skipped, no system prompt).
  Row i of the positive file is paired with row i of the negative file, so both must hold the same number of rows.
- `definition.txt`: the judge rubric (score 0-100 with HIGH / MID / LOW bands and "Key distinction" notes).
- `steering.json`: `{"questions": [str | {"question": str}], "direction"?: "positive" | "negative",
  "eval_prompt"?: str, "coherence_prompt"?: str, "vet_prompt"?: str}`. Questions are used in file order: the first
  `n_search` for the steering coefficient search, the rest for reporting, so appending questions never moves one
  from the reported set into the search set.
- `judge_corpus.jsonl` (optional): one `{"text": str, "label": 1 | 0}` per line, hand-labelled answers that show
  the trait (1) or its opposite (0), at least 10 per label. It is independent of the scenarios, so an offline
  judge fitted on it (`tracelens.judges.offline_judge`) never sees the responses the vectors were extracted from.

The package ships starter traits under `tracelens/data/traits` (see `list_traits()`); pass `root=` to load an
experiment's own datasets. Files are only ever parsed as text and JSON; nothing in them is executed.

Example:
    >>> trait = load_trait("starter/optimism")
    >>> trait.name, len(trait.pairs) >= 40, trait.steering.direction
    ('starter/optimism', True, 'positive')
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from tracelens.errors import MissingArtifactError, TraitDataError
from tracelens.io import check_name, existing_dir, json_object, read_json, read_json_lines, read_text


POLARITIES = ("positive", "negative")
SCENARIO_FORMATS = (".jsonl", ".txt")
DIRECTIONS = ("positive", "negative")
_ROW_KEYS = ("prompt", "system_prompt")
_STEERING_KEYS = ("questions", "direction", "eval_prompt", "coherence_prompt", "vet_prompt")
_CORPUS_KEYS = ("text", "label")
JUDGE_CORPUS_FILE = "judge_corpus.jsonl"
JUDGE_CORPUS_MIN_PER_LABEL = 10


@dataclass(frozen=True)
class Scenario:
    """One extraction prompt: the user `prompt` and an optional `system_prompt` (None = no system turn)."""

    prompt: str
    system_prompt: str | None = None


@dataclass(frozen=True)
class SteeringQuestions:
    """The contents of `steering.json`.

    `questions` are neutral prompts used to check that steering changes behaviour, in file order (the first
    `n_search` for the coefficient search, the rest for reporting); `direction` says which way a
    successful steer moves the trait ("positive": adding the vector should raise the judge's score). The optional
    prompts override the judge's default trait, coherence and response-vetting prompts.
    """

    questions: list[str]
    direction: Literal["positive", "negative"] = "positive"
    eval_prompt: str | None = None
    coherence_prompt: str | None = None
    vet_prompt: str | None = None


@dataclass(frozen=True)
class JudgeCorpus:
    """The contents of `judge_corpus.jsonl`: labelled texts to fit an offline judge of the trait on.

    Attributes:
        texts, labels: in file order (blank lines skipped); `labels[i]` is 1 when `texts[i]` shows the trait and
            0 when it shows the opposite. Texts are unique ignoring case and whitespace; each label has >= 10.
        path: the file.
        input_hash: sha256 hex digest of the file's bytes, so results can name the exact corpus their judge saw.
    """

    texts: list[str]
    labels: list[int]
    path: Path
    input_hash: str

    @property
    def positive(self) -> list[str]:
        """The texts labelled 1, in file order."""
        return [t for t, label in zip(self.texts, self.labels) if label == 1]

    @property
    def negative(self) -> list[str]:
        """The texts labelled 0, in file order."""
        return [t for t, label in zip(self.texts, self.labels) if label == 0]


@dataclass(frozen=True)
class TraitDataset:
    """A loaded, validated trait.

    Attributes:
        name: the trait name as given to `load_trait`, e.g. "starter/optimism".
        positive, negative: matched scenario lists; `positive[i]` and `negative[i]` form pair i.
        definition: the judge rubric from `definition.txt`, stripped.
        steering: the parsed `steering.json`.
        path: the trait folder.
        input_hash: sha256 hex digest over the two scenario files (their names and bytes). It changes whenever
            a scenario file changes and is stable otherwise, so extraction outputs can be cached on it.
        files: the scenario files that were read, keyed by polarity.
        judge_corpus: the parsed `judge_corpus.jsonl`, or None when the trait has none.
    """

    name: str
    positive: list[Scenario]
    negative: list[Scenario]
    definition: str
    steering: SteeringQuestions
    path: Path
    input_hash: str
    files: dict[str, Path] = field(default_factory=dict)
    judge_corpus: JudgeCorpus | None = None

    @property
    def pairs(self) -> list[tuple[Scenario, Scenario]]:
        """`(positive[i], negative[i])` for every i."""
        return list(zip(self.positive, self.negative))

    def __len__(self) -> int:
        """The number of matched pairs."""
        return len(self.positive)


def default_traits_root() -> Path:
    """The folder of traits shipped with tracelens (`tracelens/data/traits`)."""
    root = resources.files("tracelens").joinpath("data", "traits")
    path = Path(str(root))
    if not path.is_dir():
        raise MissingArtifactError(f"tracelens' shipped trait folder is missing: expected a directory at {path}")
    return path


def list_traits(root: str | Path | None = None) -> list[str]:
    """Names ("category/name") of every trait folder under `root` (default: the shipped traits), sorted.

    A trait folder is one that holds a `positive.jsonl` or `positive.txt` file; it is listed whether or not the rest
    of it is valid (`load_trait` reports what is wrong).
    """
    base = _resolve_root(root)
    names = {
        found.parent.relative_to(base).as_posix()
        for fmt in SCENARIO_FORMATS
        for found in base.rglob(f"positive{fmt}")
        if found.is_file() and found.parent != base
    }
    return sorted(names)


def load_trait(trait: str, root: str | Path | None = None) -> TraitDataset:
    """Load and validate the trait `trait` ("category/name") from `root` (default: the shipped traits).

    Args:
        trait: a relative, "/"-separated name such as "starter/optimism". Absolute paths, "." / ".." segments and
            backslashes are rejected (`tracelens.io.check_name`), so a name can never point outside `root`.
        root: the folder holding trait folders, e.g. an experiment's own dataset folder.

    Returns:
        A `TraitDataset` with matched positive/negative scenarios, the rubric, the steering questions and, when
        the folder has one, the judge corpus.

    Raises:
        ConfigError (a ValueError): `trait` is not a safe relative name (`tracelens.io.check_name`).
        MissingArtifactError (a FileNotFoundError): the trait folder or one of its files is missing.
        TraitDataError: a file is malformed (bad JSON, a row without a string `prompt`, an empty file, unequal
            positive/negative counts, a `steering.json` without questions or with a bad direction, a judge corpus
            row whose label is not 0/1, a duplicate corpus text, fewer than 10 corpus texts per label, ...).
    """
    base = _resolve_root(root)
    folder = base.joinpath(*check_name(trait, "trait", None))
    if not folder.is_dir():
        available = list_traits(base)
        shown = ", ".join(available[:20]) + (", ..." if len(available) > 20 else "")
        raise MissingArtifactError(
            f"trait {trait!r} not found: no folder {folder}. Traits under {base}: {shown or 'none'}"
        )

    files = {polarity: _scenario_file(folder, polarity) for polarity in POLARITIES}
    scenarios = {polarity: _read_scenarios(path) for polarity, path in files.items()}
    n_pos, n_neg = len(scenarios["positive"]), len(scenarios["negative"])
    if n_pos != n_neg:
        raise TraitDataError(
            f"{files['positive'].name} has {n_pos} scenarios but {files['negative'].name} has {n_neg}; "
            f"they are matched by line, so both need the same count (in {folder})"
        )

    return TraitDataset(
        name=trait,
        positive=scenarios["positive"],
        negative=scenarios["negative"],
        definition=_read_definition(folder / "definition.txt"),
        steering=_read_steering(folder / "steering.json"),
        path=folder,
        input_hash=_hash_files([files["positive"], files["negative"]]),
        files=files,
        judge_corpus=_read_judge_corpus(folder / JUDGE_CORPUS_FILE),
    )


# --- private helpers -------------------------------------------------------------------------------------------


def _resolve_root(root: str | Path | None) -> Path:
    return default_traits_root() if root is None else existing_dir(root, "trait root")


def _scenario_file(folder: Path, polarity: str) -> Path:
    present = [folder / f"{polarity}{fmt}" for fmt in SCENARIO_FORMATS if (folder / f"{polarity}{fmt}").is_file()]
    if not present:
        raise MissingArtifactError(
            f"missing {polarity}.jsonl (or {polarity}.txt) in {folder}: each trait needs positive and negative "
            "scenario files"
        )
    if len(present) > 1:
        raise TraitDataError(
            f"both {' and '.join(p.name for p in present)} exist in {folder}; keep one format per polarity"
        )
    return present[0]


def _read_scenarios(path: Path) -> list[Scenario]:
    if path.suffix == ".txt":
        scenarios = [Scenario(line.strip()) for line in read_text(path, TraitDataError).splitlines() if line.strip()]
    else:
        scenarios = [_parse_row(where, row) for where, row in read_json_lines(path, TraitDataError, hint="")]
    if not scenarios:
        raise TraitDataError(f"{path} has no scenarios (the file is empty or only blank lines)")
    return scenarios


def _parse_row(where: str, row: object) -> Scenario:
    json_object(row, where, _ROW_KEYS, ("prompt",), '{"prompt": "...", "system_prompt": "..."}', TraitDataError)
    prompt, system_prompt = row["prompt"], row.get("system_prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise TraitDataError(f"{where}: 'prompt' must be a non-empty string; got {prompt!r}")
    if system_prompt is not None and (not isinstance(system_prompt, str) or not system_prompt.strip()):
        raise TraitDataError(
            f"{where}: 'system_prompt' must be a non-empty string or null (or left out); got {system_prompt!r}"
        )
    return Scenario(prompt, system_prompt)


def _read_definition(path: Path) -> str:
    if not path.is_file():
        raise MissingArtifactError(
            f"missing {path.name} in {path.parent}: each trait needs a judge rubric (score 0-100 with HIGH/MID/LOW bands)"
        )
    text = read_text(path, TraitDataError).strip()
    if not text:
        raise TraitDataError(f"{path} is empty; it should hold the judge rubric")
    return text


def _read_steering(path: Path) -> SteeringQuestions:
    if not path.is_file():
        raise MissingArtifactError(
            f'missing {path.name} in {path.parent}: each trait needs {{"questions": [...], "direction": "positive"}}'
        )
    data = json_object(read_json(path, TraitDataError, hint=""), str(path), _STEERING_KEYS,
                       example='{"questions": [...]}', error=TraitDataError)
    raw = data.get("questions")
    if not isinstance(raw, list) or not raw:
        raise TraitDataError(f"{path}: 'questions' must be a non-empty list of strings; got {raw!r}")
    questions = [_parse_question(path, i, q) for i, q in enumerate(raw)]
    direction = data.get("direction", "positive")
    if direction not in DIRECTIONS:
        raise TraitDataError(f"{path}: 'direction' must be 'positive' or 'negative'; got {direction!r}")
    optional = {}
    for key in ("eval_prompt", "coherence_prompt", "vet_prompt"):
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise TraitDataError(f"{path}: {key!r} must be a non-empty string or left out; got {value!r}")
        optional[key] = value
    return SteeringQuestions(questions=questions, direction=direction, **optional)


def _parse_question(path: Path, index: int, item: object) -> str:
    question = item.get("question") if isinstance(item, dict) else item
    if not isinstance(question, str) or not question.strip():
        raise TraitDataError(
            f'{path}: questions[{index}] must be a non-empty string or {{"question": "..."}}; got {item!r}'
        )
    return question


def _read_judge_corpus(path: Path) -> JudgeCorpus | None:
    if not path.is_file():
        return None
    texts: list[str] = []
    labels: list[int] = []
    first_seen: dict[str, str] = {}  # normalised text -> where it first appeared
    for where, row in read_json_lines(path, TraitDataError, hint=""):
        json_object(row, where, _CORPUS_KEYS, _CORPUS_KEYS, '{"text": "...", "label": 1}', TraitDataError)
        text, label = row["text"], row["label"]
        if not isinstance(text, str) or not text.strip():
            raise TraitDataError(f"{where}: 'text' must be a non-empty string; got {text!r}")
        if type(label) is not int or label not in (0, 1):  # type() check: JSON true/1.0 are not labels
            raise TraitDataError(f"{where}: 'label' must be 1 (shows the trait) or 0 (the opposite); got {label!r}")
        key = " ".join(text.lower().split())
        if key in first_seen:
            raise TraitDataError(
                f"{where}: duplicate text (the same as {first_seen[key]}, ignoring case and whitespace)"
            )
        first_seen[key] = where
        texts.append(text)
        labels.append(label)
    n_pos, n_neg = labels.count(1), labels.count(0)
    if min(n_pos, n_neg) < JUDGE_CORPUS_MIN_PER_LABEL:
        raise TraitDataError(
            f"{path}: needs at least {JUDGE_CORPUS_MIN_PER_LABEL} texts per label; got {n_pos} with label 1 and "
            f"{n_neg} with label 0"
        )
    return JudgeCorpus(texts, labels, path, hashlib.sha256(path.read_bytes()).hexdigest())


def _hash_files(paths: list[Path]) -> str:
    """sha256 over each file's name, size and bytes, in order (the name makes a .txt -> .jsonl switch count)."""
    digest = hashlib.sha256()
    for path in paths:
        data = path.read_bytes()
        digest.update(f"{path.name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
