"""Shipped prompt sets and the prompt-set loader: content checks, names vs paths, every validation error."""

import doctest
import json
import re
from pathlib import Path

import pytest

import tracelens.datasets.prompt_sets
from tracelens.datasets.prompt_sets import (
    Prompt,
    PromptSet,
    PromptSetError,
    default_prompt_sets_root,
    list_prompt_sets,
    load_prompt_set,
)

SHIPPED = ["general", "neutral"]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _write(folder: Path, name: str, data) -> Path:
    path = folder / f"{name}.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def _valid(**overrides) -> dict:
    data = {"name": "tiny", "description": "d", "prompts": [{"id": 0, "text": "a"}, {"id": 1, "text": "b"}]}
    data.update(overrides)
    return data


# --- shipped sets ------------------------------------------------------------------------------------------------


def test_list_prompt_sets_finds_exactly_the_shipped_sets():
    assert list_prompt_sets() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_set_loads_with_matching_name_unique_ids_and_texts(name):
    ps = load_prompt_set(name)
    assert isinstance(ps, PromptSet) and all(isinstance(p, Prompt) for p in ps.prompts)
    assert ps.name == name
    assert ps.path == default_prompt_sets_root() / f"{name}.json"
    assert ps.description.strip()
    assert ps.system_prompt is None
    assert [p.id for p in ps.prompts] == list(range(len(ps)))
    assert all(p.meta == {} for p in ps.prompts)
    texts = [_norm(t) for t in ps.texts]
    assert len(set(texts)) == len(texts), "duplicate prompt"
    assert all(t == t.strip() and 10 <= len(t) <= 200 for t in ps.texts)


def test_shipped_general_has_at_least_20_varied_prompts():
    ps = load_prompt_set("general")
    assert len(ps) >= 20
    questions = [t for t in ps.texts if t.endswith("?")]
    tasks = [t for t in ps.texts if not t.endswith("?")]
    assert len(questions) >= 5 and len(tasks) >= 5, "mix of questions and short tasks"


def test_shipped_neutral_has_exactly_50_instructions():
    ps = load_prompt_set("neutral")
    assert len(ps) == 50
    # Alpaca-style: imperative instructions, not questions, no system prompt.
    assert not [t for t in ps.texts if t.endswith("?")]
    first_words = {t.split()[0] for t in ps.texts}
    assert {"Explain", "Describe", "List", "Name"} <= first_words


def test_shipped_sets_do_not_overlap():
    general = {_norm(t) for t in load_prompt_set("general").texts}
    neutral = {_norm(t) for t in load_prompt_set("neutral").texts}
    assert not general & neutral


def test_module_doctest_runs():
    result = doctest.testmod(tracelens.datasets.prompt_sets)
    assert result.failed == 0 and result.attempted >= 2


# --- names, roots and paths --------------------------------------------------------------------------------------


def test_load_by_name_from_a_custom_root_keeps_system_prompt_and_extra_prompt_keys(tmp_path):
    data = _valid(system_prompt="Be brief.")
    data["prompts"][1]["category"] = "x"
    _write(tmp_path, "mine", data)
    ps = load_prompt_set("mine", root=tmp_path)
    assert ps == PromptSet(
        name="tiny",
        description="d",
        prompts=[Prompt(0, "a"), Prompt(1, "b", {"category": "x"})],
        system_prompt="Be brief.",
        path=tmp_path / "mine.json",
    )
    assert ps.texts == ["a", "b"] and len(ps) == 2
    assert list_prompt_sets(tmp_path) == ["mine"]


def test_load_by_path_as_path_or_json_string(tmp_path):
    path = _write(tmp_path, "direct", _valid())
    assert load_prompt_set(path).path == path
    assert load_prompt_set(str(path)).path == path


def test_ids_need_not_be_contiguous_and_null_system_prompt_is_none(tmp_path):
    path = _write(tmp_path, "s", _valid(prompts=[{"id": 7, "text": "x"}, {"id": -2, "text": "y"}], system_prompt=None))
    ps = load_prompt_set(path)
    assert [p.id for p in ps.prompts] == [7, -2] and ps.system_prompt is None


@pytest.mark.parametrize("name", ["../neutral", "..", ".", "a/b", "a\\b", "/etc/passwd", "", ".hidden", "_private"])
def test_names_that_could_escape_the_root_are_rejected(name):
    with pytest.raises(ValueError, match=r"invalid prompt set name .*pass a pathlib.Path or a path ending in '.json'"):
        load_prompt_set(name)


@pytest.mark.unchecked_types
def test_non_string_name_is_rejected():
    with pytest.raises(ValueError, match=r"invalid prompt set name 3"):
        load_prompt_set(3)


def test_unknown_name_lists_the_available_sets():
    with pytest.raises(FileNotFoundError, match=r"prompt set 'nope' not found: .*Sets in .*: general, neutral"):
        load_prompt_set("nope")


def test_missing_file_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prompt set file '.*absent.json' does not exist"):
        load_prompt_set(tmp_path / "absent.json")


def test_bad_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prompt set root must be an existing directory"):
        load_prompt_set("x", root=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"prompt set root must be an existing directory"):
        list_prompt_sets(tmp_path / "missing")


def test_list_prompt_sets_skips_non_json_and_unloadable_names(tmp_path):
    _write(tmp_path, "ok", _valid())
    _write(tmp_path, "broken", "{")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.json").write_text("{}")
    assert list_prompt_sets(tmp_path) == ["broken", "ok"]  # listed even if invalid; load reports the problem


# --- validation errors -------------------------------------------------------------------------------------------


def test_malformed_json_names_the_file_and_line(tmp_path):
    path = _write(tmp_path, "bad", '{\n  "name": "x",\n  "prompts": [\n}')
    with pytest.raises(PromptSetError, match=rf"{re.escape(str(path))}, line 4: malformed JSON"):
        load_prompt_set("bad", root=tmp_path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes(b'{"name": "caf\xe9"}')
    with pytest.raises(PromptSetError, match=r"latin.json is not valid UTF-8"):
        load_prompt_set(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], r"expected a JSON object like .* got list"),
        ({"name": "x", "prompts": []}, r"missing 'description' \(got keys"),
        ({}, r"missing 'name', 'description', 'prompts'"),
        (_valid(system_promt="hi"), r"unknown keys \['system_promt'\]; allowed keys are"),
        (_valid(name=""), r"'name' must be a non-empty string; got ''"),
        (_valid(name=5), r"'name' must be a non-empty string; got 5"),
        (_valid(description=None), r"'description' must be a string; got None"),
        (_valid(system_prompt="  "), r"'system_prompt' must be a non-empty string or null"),
        (_valid(system_prompt=["a"]), r"'system_prompt' must be a non-empty string or null"),
        (_valid(prompts=[]), r"'prompts' must be a non-empty list"),
        (_valid(prompts={"id": 0, "text": "a"}), r"'prompts' must be a non-empty list"),
        (_valid(prompts=["just text"]), r"prompts\[0\]: expected a JSON object like"),
        (_valid(prompts=[{"text": "a"}]), r"prompts\[0\]: missing 'id' \(got keys \['text'\]\)"),
        (_valid(prompts=[{"id": 0}]), r"prompts\[0\]: missing 'text'"),
        (_valid(prompts=[{"id": "0", "text": "a"}]), r"prompts\[0\]: 'id' must be an integer; got '0'"),
        (_valid(prompts=[{"id": 1.0, "text": "a"}]), r"prompts\[0\]: 'id' must be an integer; got 1.0"),
        (_valid(prompts=[{"id": True, "text": "a"}]), r"prompts\[0\]: 'id' must be an integer; got True"),
        (_valid(prompts=[{"id": 0, "text": "a"}, {"id": 1, "text": "   "}]),
         r"prompts\[1\] \(id 1\): 'text' must be a non-empty string; got '   '"),
        (_valid(prompts=[{"id": 0, "text": None}]), r"prompts\[0\] \(id 0\): 'text' must be a non-empty string"),
        (_valid(prompts=[{"id": 3, "text": "a"}, {"id": 4, "text": "b"}, {"id": 3, "text": "c"}]),
         r"duplicate prompt id 3 at prompts\[0\] and prompts\[2\]; ids must be unique"),
    ],
)
def test_every_validation_error_names_the_file_and_the_problem(tmp_path, data, message):
    path = _write(tmp_path, "s", data)
    with pytest.raises(PromptSetError, match=rf"^{re.escape(str(path))}.*{message}"):
        load_prompt_set("s", root=tmp_path)


def test_prompt_set_error_is_a_value_error():
    assert issubclass(PromptSetError, ValueError)
