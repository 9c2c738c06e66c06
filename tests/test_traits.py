"""Shipped starter traits and the trait loader: content checks, formats, every validation error, hashing."""

import hashlib
import json
import re
from pathlib import Path

import pytest

from tracelens.datasets.traits import (
    JudgeCorpus,
    Scenario,
    SteeringQuestions,
    TraitDataError,
    TraitDataset,
    default_traits_root,
    list_traits,
    load_trait,
)

STARTER = ["starter/enthusiasm", "starter/formality", "starter/optimism"]
RUBRIC = "Score x (0-100).\nHIGH (70-100): a\nMID (30-69): b\nLOW (0-29): c\nKey distinction: d\n"


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


# --- shipped traits ----------------------------------------------------------------------------------------------


def test_list_traits_finds_exactly_the_shipped_starter_traits():
    assert list_traits() == STARTER


@pytest.mark.parametrize("name", STARTER)
def test_shipped_trait_loads_with_enough_matched_pairs_and_questions(name):
    trait = load_trait(name)
    assert isinstance(trait, TraitDataset)
    assert trait.name == name
    assert trait.path == default_traits_root().joinpath(*name.split("/"))
    assert len(trait.positive) == len(trait.negative) == len(trait) >= 40
    # 24 questions: the first 8 search the coefficient, the other 16 are for reporting.
    assert len(trait.steering.questions) == 24
    assert trait.steering.direction == "positive"
    assert re.fullmatch(r"[0-9a-f]{64}", trait.input_hash)


@pytest.mark.parametrize("name", STARTER)
def test_shipped_pairs_share_the_prompt_and_contrast_the_system_prompt(name):
    trait = load_trait(name)
    for i, (pos, neg) in enumerate(trait.pairs):
        assert pos.prompt == neg.prompt, f"pair {i}"
        assert pos.system_prompt and neg.system_prompt, f"pair {i}"
        assert pos.system_prompt.strip() and neg.system_prompt.strip(), f"pair {i}"
        assert pos.system_prompt != neg.system_prompt, f"pair {i}"
    # Several paraphrases per side, and no system prompt used on both sides.
    pos_systems = {s.system_prompt for s in trait.positive}
    neg_systems = {s.system_prompt for s in trait.negative}
    assert len(pos_systems) >= 3 and len(neg_systems) >= 3
    assert not pos_systems & neg_systems


@pytest.mark.parametrize("name", STARTER)
def test_shipped_prompts_and_questions_have_no_duplicates_or_overlap(name):
    trait = load_trait(name)
    prompts = [_norm(s.prompt) for s in trait.positive]
    questions = [_norm(q) for q in trait.steering.questions]
    assert len(set(prompts)) == len(prompts), "duplicate extraction prompt"
    assert len(set(questions)) == len(questions), "duplicate steering question"
    assert not set(prompts) & set(questions), "steering questions must differ from extraction prompts"


def test_shipped_steering_questions_never_reuse_any_traits_extraction_prompts():
    traits = [load_trait(name) for name in STARTER]
    all_prompts = {_norm(s.prompt) for t in traits for s in t.positive}
    for t in traits:
        assert not {_norm(q) for q in t.steering.questions} & all_prompts, t.name


@pytest.mark.parametrize("name", STARTER)
def test_shipped_judge_corpus_is_balanced_and_independent_of_the_scenarios_and_questions(name):
    trait = load_trait(name)
    corpus = trait.judge_corpus
    assert isinstance(corpus, JudgeCorpus)
    assert corpus.path == trait.path / "judge_corpus.jsonl"
    assert corpus.input_hash == hashlib.sha256(corpus.path.read_bytes()).hexdigest()
    assert len(corpus.positive) == len(corpus.negative) == 60 and len(corpus.texts) == 120
    texts = {_norm(t) for t in corpus.texts}
    prompts = {_norm(s.prompt) for s in trait.positive + trait.negative}
    systems = {_norm(s.system_prompt) for s in trait.positive + trait.negative}
    questions = {_norm(q) for q in trait.steering.questions}
    assert not texts & (prompts | systems | questions)
    # Surface cues vary with the label: "!" is neither necessary nor sufficient for either side.
    exclaims = [sum("!" in t for t in side) for side in (corpus.positive, corpus.negative)]
    assert all(n >= 1 for n in exclaims) and all(n < 60 for n in exclaims), exclaims


@pytest.mark.parametrize("name", STARTER)
def test_shipped_definition_follows_the_rubric_shape(name):
    definition = load_trait(name).definition
    trait_word = name.split("/")[1]
    assert definition.startswith(f"Score {trait_word} in the response (0-100).")
    for band in ("HIGH (70-100):", "MID (30-69):", "LOW (0-29):", "Key distinction:"):
        assert band in definition, band


@pytest.mark.parametrize("name", STARTER)
def test_shipped_files_are_well_formed_jsonl_with_explicit_system_prompts(name):
    folder = load_trait(name).path
    for side in ("positive", "negative"):
        lines = (folder / f"{side}.jsonl").read_text(encoding="utf-8").splitlines()
        assert all(set(json.loads(line)) == {"prompt", "system_prompt"} for line in lines)
    assert not (folder / "positive.txt").exists() and not (folder / "negative.txt").exists()


# --- helpers for tiny datasets -----------------------------------------------------------------------------------


def _rows(*prompts, system="sys"):
    return "".join(json.dumps({"prompt": p, "system_prompt": system}) + "\n" for p in prompts)


def _corpus(n_pos=10, n_neg=10):
    """``judge_corpus.jsonl`` text with n_pos texts labelled 1 and n_neg labelled 0."""
    rows = [{"text": f"yes {i}", "label": 1} for i in range(n_pos)]
    rows += [{"text": f"no {i}", "label": 0} for i in range(n_neg)]
    return "".join(json.dumps(r) + "\n" for r in rows)


def make_trait(root: Path, name="cat/trait", pos=None, neg=None, definition=RUBRIC, steering=None, fmt="jsonl",
               corpus=None):
    """Write a valid tiny trait (2 pairs) under root, with any file overridable; None leaves the default (no
    judge corpus unless ``corpus`` is given)."""
    folder = root.joinpath(*name.split("/"))
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        default_pos, default_neg = _rows("a?", "b?", system="be X"), _rows("a?", "b?", system="be not X")
    else:
        default_pos, default_neg = "start A\nstart B\n", "begin A\nbegin B\n"
    (folder / f"positive.{fmt}").write_text(default_pos if pos is None else pos, encoding="utf-8")
    (folder / f"negative.{fmt}").write_text(default_neg if neg is None else neg, encoding="utf-8")
    if definition is not False:
        (folder / "definition.txt").write_text(definition, encoding="utf-8")
    if steering is not False:
        text = steering if isinstance(steering, str) else json.dumps(steering or {"questions": ["q1?"]})
        (folder / "steering.json").write_text(text, encoding="utf-8")
    if corpus is not None:
        (folder / "judge_corpus.jsonl").write_text(corpus, encoding="utf-8")
    return folder


def test_tiny_jsonl_trait_loads_into_dataclasses(tmp_path):
    steering = {"questions": ["q1?", {"question": "q2?"}], "direction": "negative", "eval_prompt": "Rate {x}"}
    make_trait(tmp_path, steering=steering)
    trait = load_trait("cat/trait", root=tmp_path)
    assert trait.positive == [Scenario("a?", "be X"), Scenario("b?", "be X")]
    assert trait.negative == [Scenario("a?", "be not X"), Scenario("b?", "be not X")]
    assert trait.pairs[1] == (Scenario("b?", "be X"), Scenario("b?", "be not X"))
    assert trait.definition == RUBRIC.strip()
    assert trait.steering == SteeringQuestions(questions=["q1?", "q2?"], direction="negative", eval_prompt="Rate {x}")
    assert trait.files == {"positive": trait.path / "positive.jsonl", "negative": trait.path / "negative.jsonl"}
    assert trait.judge_corpus is None
    assert list_traits(tmp_path) == ["cat/trait"]


def test_jsonl_system_prompt_is_optional_and_blank_lines_are_skipped(tmp_path):
    pos = '{"prompt": "a?"}\n\n{"prompt": "b?", "system_prompt": null}\n   \n'
    make_trait(tmp_path, pos=pos)
    assert load_trait("cat/trait", tmp_path).positive == [Scenario("a?", None), Scenario("b?", None)]


def test_txt_format_strips_lines_skips_blanks_and_has_no_system_prompt(tmp_path):
    make_trait(tmp_path, fmt="txt", pos="  The deadline passed, so I  \n\n\t\nI told them\n", neg="x\ny\n")
    trait = load_trait("cat/trait", root=tmp_path)
    assert trait.positive == [Scenario("The deadline passed, so I"), Scenario("I told them")]
    assert trait.negative == [Scenario("x", None), Scenario("y", None)]


def test_formats_can_differ_between_polarities(tmp_path):
    folder = make_trait(tmp_path)
    (folder / "negative.jsonl").unlink()
    (folder / "negative.txt").write_text("n1\nn2\n", encoding="utf-8")
    trait = load_trait("cat/trait", tmp_path)
    assert [s.prompt for s in trait.negative] == ["n1", "n2"]


def test_deeper_nesting_and_user_root_as_string(tmp_path):
    make_trait(tmp_path, name="base/alignment/deception")
    assert load_trait("base/alignment/deception", root=str(tmp_path)).name == "base/alignment/deception"
    assert list_traits(str(tmp_path)) == ["base/alignment/deception"]


# --- validation errors -------------------------------------------------------------------------------------------


def test_missing_trait_folder_lists_available_traits(tmp_path):
    make_trait(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"trait 'cat/nope' not found: .*Traits under .*: cat/trait"):
        load_trait("cat/nope", tmp_path)


def test_missing_root_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"trait root must be an existing directory; got '.*missing'"):
        load_trait("cat/trait", tmp_path / "missing")


@pytest.mark.parametrize("side", ["positive", "negative"])
def test_missing_scenario_file(tmp_path, side):
    folder = make_trait(tmp_path)
    (folder / f"{side}.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=rf"missing {side}\.jsonl \(or {side}\.txt\) in .*trait"):
        load_trait("cat/trait", tmp_path)


def test_missing_definition(tmp_path):
    make_trait(tmp_path, definition=False)
    with pytest.raises(FileNotFoundError, match=r"missing definition\.txt in .*judge rubric"):
        load_trait("cat/trait", tmp_path)


def test_empty_definition(tmp_path):
    make_trait(tmp_path, definition="  \n\n")
    with pytest.raises(TraitDataError, match=r"definition\.txt is empty"):
        load_trait("cat/trait", tmp_path)


def test_missing_steering(tmp_path):
    make_trait(tmp_path, steering=False)
    with pytest.raises(FileNotFoundError, match=r"missing steering\.json in .*\"questions\""):
        load_trait("cat/trait", tmp_path)


def test_both_formats_for_one_polarity(tmp_path):
    folder = make_trait(tmp_path)
    (folder / "positive.txt").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(TraitDataError, match=r"both positive\.jsonl and positive\.txt exist in .*one format"):
        load_trait("cat/trait", tmp_path)


def test_malformed_json_names_file_and_line(tmp_path):
    make_trait(tmp_path, pos='{"prompt": "a?"}\n\n{"prompt": "b?"\n')
    with pytest.raises(TraitDataError, match=r"positive\.jsonl, line 3: malformed JSON \(.* at column \d+\)"):
        load_trait("cat/trait", tmp_path)


def test_row_that_is_not_an_object(tmp_path):
    make_trait(tmp_path, neg='{"prompt": "a?"}\n["b?"]\n')
    with pytest.raises(TraitDataError, match=r"negative\.jsonl, line 2: expected a JSON object .* got list"):
        load_trait("cat/trait", tmp_path)


def test_row_without_prompt(tmp_path):
    make_trait(tmp_path, pos='{"prompt": "a?"}\n{"system_prompt": "s"}\n')
    with pytest.raises(TraitDataError, match=r"positive\.jsonl, line 2: missing 'prompt' \(got keys \['system_prompt'\]\)"):
        load_trait("cat/trait", tmp_path)


@pytest.mark.parametrize("value", [3, None, "", "   ", ["a"]])
def test_row_with_non_string_or_empty_prompt(tmp_path, value):
    make_trait(tmp_path, pos=json.dumps({"prompt": value}) + "\n" + '{"prompt": "b?"}\n')
    with pytest.raises(TraitDataError, match=r"positive\.jsonl, line 1: 'prompt' must be a non-empty string; got "):
        load_trait("cat/trait", tmp_path)


@pytest.mark.parametrize("value", [7, "", {"a": 1}])
def test_row_with_bad_system_prompt(tmp_path, value):
    make_trait(tmp_path, neg='{"prompt": "a?"}\n' + json.dumps({"prompt": "b?", "system_prompt": value}) + "\n")
    with pytest.raises(TraitDataError, match=r"negative\.jsonl, line 2: 'system_prompt' must be a non-empty string"):
        load_trait("cat/trait", tmp_path)


def test_row_with_misspelt_key_is_rejected_not_silently_dropped(tmp_path):
    make_trait(tmp_path, pos='{"prompt": "a?", "sytem_prompt": "s"}\n{"prompt": "b?"}\n')
    with pytest.raises(TraitDataError, match=r"line 1: unknown keys \['sytem_prompt'\]; allowed keys are"):
        load_trait("cat/trait", tmp_path)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
@pytest.mark.parametrize("fmt", ["jsonl", "txt"])
def test_empty_scenario_file(tmp_path, content, fmt):
    make_trait(tmp_path, neg=content, fmt=fmt)
    with pytest.raises(TraitDataError, match=rf"negative\.{fmt} has no scenarios"):
        load_trait("cat/trait", tmp_path)


def test_count_mismatch_names_both_counts(tmp_path):
    pos = _rows(*[f"p{i}?" for i in range(41)])
    neg = _rows(*[f"p{i}?" for i in range(40)])
    make_trait(tmp_path, pos=pos, neg=neg)
    msg = r"positive\.jsonl has 41 scenarios but negative\.jsonl has 40; they are matched by line"
    with pytest.raises(TraitDataError, match=msg):
        load_trait("cat/trait", tmp_path)


@pytest.mark.parametrize("name", ["positive.jsonl", "judge_corpus.jsonl"])
def test_invalid_utf8(tmp_path, name):
    folder = make_trait(tmp_path)
    (folder / name).write_bytes(b'{"prompt": "caf\xe9?"}\n')
    with pytest.raises(TraitDataError, match=rf"{re.escape(name)} is not valid UTF-8"):
        load_trait("cat/trait", tmp_path)


@pytest.mark.parametrize(
    ("steering", "match"),
    [
        ("{not json", r"steering\.json, line 1: malformed JSON"),
        ('["q?"]', r"steering\.json: expected a JSON object .* got list"),
        ({"direction": "positive"}, r"'questions' must be a non-empty list of strings; got None"),
        ({"questions": []}, r"'questions' must be a non-empty list of strings; got \[\]"),
        ({"questions": "q?"}, r"'questions' must be a non-empty list of strings; got 'q\?'"),
        ({"questions": ["ok?", 5]}, r"questions\[1\] must be a non-empty string or \{\"question\": \"...\"\}; got 5"),
        ({"questions": [{"q": "x"}]}, r"questions\[0\] must be a non-empty string .* got \{'q': 'x'\}"),
        ({"questions": ["ok?", "  "]}, r"questions\[1\] must be a non-empty string"),
        ({"questions": ["q?"], "direction": "up"}, r"'direction' must be 'positive' or 'negative'; got 'up'"),
        ({"questions": ["q?"], "direction": None}, r"'direction' must be 'positive' or 'negative'; got None"),
        ({"questions": ["q?"], "eval_prompt": 3}, r"'eval_prompt' must be a non-empty string or left out; got 3"),
        ({"questions": ["q?"], "vet_prompt": ""}, r"'vet_prompt' must be a non-empty string or left out; got ''"),
        ({"questions": ["q?"], "qestions": ["x"]}, r"unknown keys \['qestions'\]; allowed keys are \['questions'"),
    ],
)
def test_bad_steering_json(tmp_path, steering, match):
    make_trait(tmp_path, steering=steering)
    with pytest.raises(TraitDataError, match=match):
        load_trait("cat/trait", tmp_path)


def test_steering_direction_defaults_to_positive(tmp_path):
    make_trait(tmp_path, steering={"questions": ["q?"]})
    assert load_trait("cat/trait", tmp_path).steering == SteeringQuestions(questions=["q?"])


def test_trait_data_error_is_a_value_error():
    assert issubclass(TraitDataError, ValueError)


# --- trait names that could escape the root ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../outside", "cat/../../outside", "cat/..", "..", "/etc/passwd", "/abs/trait", "cat\\..\\outside",
     "C:/x", "", "cat//trait", "cat/trait/", "./cat/trait", "cat/.hidden", "cat/tr ait"],
)
def test_trait_names_that_could_escape_the_root_are_rejected(tmp_path, name):
    root = tmp_path / "root"
    make_trait(root)
    # A valid trait right outside the root: a traversal bug would load it instead of raising.
    make_trait(tmp_path, name="outside")
    with pytest.raises(ValueError, match=r"invalid trait name .*expected a relative name like 'starter/optimism'"):
        load_trait(name, root)


@pytest.mark.unchecked_types
def test_non_string_trait_name_is_rejected():
    with pytest.raises(ValueError, match=r"trait must be a string like 'starter/optimism'; got PosixPath"):
        load_trait(Path("starter/optimism"))


# --- input hash ------------------------------------------------------------------------------------------------


def test_input_hash_is_stable_and_tracks_scenario_files(tmp_path):
    folder = make_trait(tmp_path)
    first = load_trait("cat/trait", tmp_path).input_hash
    assert load_trait("cat/trait", tmp_path).input_hash == first

    # Rubric and steering questions are not extraction inputs: editing them keeps the hash.
    (folder / "definition.txt").write_text(RUBRIC + "More.\n", encoding="utf-8")
    (folder / "steering.json").write_text(json.dumps({"questions": ["other?"]}), encoding="utf-8")
    assert load_trait("cat/trait", tmp_path).input_hash == first

    # Any byte change in either scenario file changes it, and undoing the change restores it.
    for side in ("positive", "negative"):
        path = folder / f"{side}.jsonl"
        original = path.read_text(encoding="utf-8")
        path.write_text(original.replace("a?", "A?"), encoding="utf-8")
        assert load_trait("cat/trait", tmp_path).input_hash != first, side
        path.write_text(original, encoding="utf-8")
        assert load_trait("cat/trait", tmp_path).input_hash == first, side


def test_input_hash_distinguishes_swapped_polarities_and_differs_between_traits(tmp_path):
    folder = make_trait(tmp_path)
    first = load_trait("cat/trait", tmp_path).input_hash
    pos, neg = (folder / "positive.jsonl").read_bytes(), (folder / "negative.jsonl").read_bytes()
    (folder / "positive.jsonl").write_bytes(neg)
    (folder / "negative.jsonl").write_bytes(pos)
    assert load_trait("cat/trait", tmp_path).input_hash != first
    assert len({load_trait(name).input_hash for name in STARTER}) == len(STARTER)


def test_loading_never_executes_file_content(tmp_path):
    # A payload that would only run if something evaluated the text (eval/exec/pickle); JSON parsing keeps it data.
    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    make_trait(tmp_path, pos=_rows(payload, "b?"), steering={"questions": [payload]})
    trait = load_trait("cat/trait", tmp_path)
    assert trait.positive[0].prompt == payload and trait.steering.questions == [payload]
    assert not marker.exists()


# --- judge corpus --------------------------------------------------------------------------------------------------


def test_judge_corpus_loads_in_file_order_skipping_blank_lines(tmp_path):
    text = _corpus(10, 10).replace('"label": 1}\n', '"label": 1}\n\n', 1)  # a blank line after the first row
    text = '{"text": "  padded  ", "label": 0}\n' + text
    folder = make_trait(tmp_path, corpus=text)
    corpus = load_trait("cat/trait", tmp_path).judge_corpus
    assert corpus.texts == ["  padded  "] + [f"yes {i}" for i in range(10)] + [f"no {i}" for i in range(10)]
    assert corpus.labels == [0] + [1] * 10 + [0] * 10
    assert corpus.positive == [f"yes {i}" for i in range(10)]
    assert corpus.negative == ["  padded  "] + [f"no {i}" for i in range(10)]
    assert corpus.path == folder / "judge_corpus.jsonl"
    assert corpus.input_hash == hashlib.sha256(text.encode()).hexdigest()


def test_judge_corpus_hash_tracks_the_file_bytes_and_not_the_scenarios(tmp_path):
    folder = make_trait(tmp_path, corpus=_corpus())
    first = load_trait("cat/trait", tmp_path)
    (folder / "judge_corpus.jsonl").write_text(_corpus() + "\n", encoding="utf-8")  # same rows, one more byte
    second = load_trait("cat/trait", tmp_path)
    assert second.judge_corpus.texts == first.judge_corpus.texts
    assert second.judge_corpus.input_hash != first.judge_corpus.input_hash
    assert second.input_hash == first.input_hash  # the scenario hash ignores the corpus


@pytest.mark.parametrize(
    ("bad_line", "match"),
    [
        ('{"text": "x", "label": 1', r"line 21: malformed JSON \(.* at column \d+\)"),
        ('["x", 1]', r"line 21: expected a JSON object like \{\"text\": \"...\", \"label\": 1\}; got list"),
        ('{"text": "x"}', r"line 21: missing 'label' \(got keys \['text'\]\)"),
        ('{"label": 1}', r"line 21: missing 'text' \(got keys \['label'\]\)"),
        ('{"text": "x", "label": 1, "source": "me"}',
         r"line 21: unknown keys \['source'\]; allowed keys are \['text', 'label'\]"),
        ('{"text": "x", "label": 2}', r"line 21: 'label' must be 1 \(shows the trait\) or 0 \(the opposite\); got 2"),
        ('{"text": "x", "label": "1"}', r"line 21: 'label' must be 1 .* got '1'"),
        ('{"text": "x", "label": true}', r"line 21: 'label' must be 1 .* got True"),
        ('{"text": "x", "label": 1.0}', r"line 21: 'label' must be 1 .* got 1.0"),
        ('{"text": "x", "label": null}', r"line 21: 'label' must be 1 .* got None"),
        ('{"text": "", "label": 1}', r"line 21: 'text' must be a non-empty string; got ''"),
        ('{"text": "  ", "label": 0}', r"line 21: 'text' must be a non-empty string; got '  '"),
        ('{"text": 3, "label": 0}', r"line 21: 'text' must be a non-empty string; got 3"),
        ('{"text": "  YES   3 ", "label": 1}',
         r"line 21: duplicate text \(the same as .*judge_corpus\.jsonl, line 4, ignoring case and whitespace\)"),
    ],
)
def test_bad_judge_corpus_row_names_the_file_and_line(tmp_path, bad_line, match):
    make_trait(tmp_path, corpus=_corpus() + bad_line + "\n")
    with pytest.raises(TraitDataError, match=r"judge_corpus\.jsonl, " + match):
        load_trait("cat/trait", tmp_path)


@pytest.mark.parametrize(("n_pos", "n_neg"), [(9, 12), (12, 9), (0, 0)])
def test_judge_corpus_needs_ten_texts_per_label(tmp_path, n_pos, n_neg):
    make_trait(tmp_path, corpus=_corpus(n_pos, n_neg))
    msg = rf"judge_corpus\.jsonl: needs at least 10 texts per label; got {n_pos} with label 1 and {n_neg} with label 0"
    with pytest.raises(TraitDataError, match=msg):
        load_trait("cat/trait", tmp_path)

