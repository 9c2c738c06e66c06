"""One error vocabulary, one name rule, one layer grammar, one unit-vector policy."""

import re
from pathlib import Path

import pytest
import torch

import tracelens
from tracelens import cli, errors
from tracelens.model import edits
from tracelens.errors import (
    ConfigError,
    DirectionError,
    MissingArtifactError,
    ServerError,
    TracelensError,
    UnknownKeyError,
)
from tracelens.store import Experiment, check_name, get_model_variant
from tracelens.pipeline.extraction import parse_layers
from tracelens.datasets.prompt_sets import load_prompt_set
from tracelens.testing import ARCHITECTURES
from tracelens.datasets.traits import load_trait

# --- the vocabulary -------------------------------------------------------------------------------------------

BUILTIN = {
    "TracelensError": Exception, "ConfigError": ValueError, "ShapeError": ValueError, "DirectionError": ValueError,
    "DataError": ValueError, "TraitDataError": ValueError, "PromptSetError": ValueError, "ABDataError": ValueError,
    "MissingArtifactError": FileNotFoundError, "UnknownKeyError": KeyError, "InputTypeError": TypeError,
    "BackendError": RuntimeError, "JudgeError": RuntimeError, "ServerError": RuntimeError,
    "StateError": RuntimeError, "GenerationCancelled": RuntimeError, "RequestError": Exception,
}


def test_every_class_is_a_tracelens_error_and_its_builtin_and_is_exported():
    assert set(errors.__all__) == set(BUILTIN)
    for name, builtin in BUILTIN.items():
        cls = getattr(errors, name)
        assert issubclass(cls, TracelensError) and issubclass(cls, builtin), name
        assert getattr(tracelens, name) is cls, name


@pytest.mark.parametrize("module, name", [
    ("datasets.traits", "TraitDataError"), ("datasets.prompt_sets", "PromptSetError"), ("pipeline.ab", "ABDataError"),
    ("judges.openai", "JudgeError"), ("serving.client", "ServerError"), ("model.generation", "GenerationCancelled"),
    ("app.server", "RequestError"),
])
def test_the_old_names_import_from_their_modules_as_the_same_classes(module, name):
    import importlib

    assert getattr(importlib.import_module(f"tracelens.{module}"), name) is getattr(errors, name)


def test_messages_read_as_given():
    # KeyError alone would print the message's repr, quotes included
    assert str(UnknownKeyError("experiment 'x' has no model variant 'y'")) == "experiment 'x' has no model variant 'y'"
    err = ServerError(401, "missing token")
    assert (err.status, err.message, str(err)) == (401, "missing token", "model server error 401: missing token")


def test_the_package_raises_no_bare_builtin():
    """Every deliberate raise uses the vocabulary; only a private lookup miss caught next to it stays a KeyError."""
    pattern = re.compile(r"raise (ValueError|RuntimeError|FileNotFoundError|TypeError|KeyError)\(")
    root = Path(tracelens.__file__).parent
    found = [f"{p.relative_to(root)}: {line.strip()}" for p in sorted(root.rglob("*.py"))
             for line in p.read_text().splitlines() if pattern.search(line)]
    assert found == ["model/cleaning.py: raise KeyError(dim)"]


def test_an_unknown_variant_is_an_unknown_key_error_and_still_a_key_error(tmp_path):
    exp = Experiment.named("e", tmp_path)
    exp.dir.mkdir()
    exp.config_path.write_text('{"model_variants": {"a": {"model": "m"}}}')
    with pytest.raises(KeyError) as info:
        get_model_variant(exp, "b")
    assert isinstance(info.value, UnknownKeyError)
    assert str(info.value) == "experiment 'e' has no model variant 'b'; it has ['a']"


@pytest.mark.parametrize("cls", [getattr(errors, n) for n in BUILTIN if n not in ("ServerError", "RequestError")])
def test_the_cli_prints_every_tracelens_error_in_one_line_and_exits_2(cls, capsys, monkeypatch):
    def fail(**kwargs):
        raise cls("report must be written; got a failure")

    monkeypatch.setattr(cli, "report", fail)
    assert cli.main(["report", "--experiment", "x", "--output", "o.md"]) == 2
    err = capsys.readouterr().err
    assert err == "tracelens report: error: report must be written; got a failure\n"
    with pytest.raises(cls):
        cli.main(["--debug", "report", "--experiment", "x", "--output", "o.md"])


def test_the_cli_maps_the_errors_with_a_status_and_other_failures_exit_1(capsys, monkeypatch):
    for exc, code in ((ServerError(503, "busy"), 2), (errors.RequestError("bad", 400), 2), (OSError("disk"), 1)):
        monkeypatch.setattr(cli, "report", lambda exc=exc, **kwargs: (_ for _ in ()).throw(exc))
        assert cli.main(["report", "--experiment", "x", "--output", "o.md"]) == code
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


# --- one name rule --------------------------------------------------------------------------------------------

NAMES = ["starter/optimism", "base/alignment/deception", "optimism", "v1.2", "a-b_c", "_private", ".hidden", "..",
         "a/../b", "", "a//b", "/abs", "a\\b", "tr ait", "C:/x", "cat/", "cat/_x"]


def _accepts(fn, *args) -> bool:
    """Whether `fn` got past the name check: a ConfigError rejects; a missing file means the name was fine."""
    try:
        fn(*args)
    except ConfigError:
        return False
    except MissingArtifactError:
        return True
    return True


@pytest.mark.parametrize("name", NAMES)
def test_a_trait_name_accepted_by_one_reader_is_accepted_by_all(tmp_path, name):
    exp = Experiment.named("e", tmp_path)
    verdicts = {
        "check_name": _accepts(check_name, name, "trait", None),
        "load_trait": _accepts(load_trait, name, tmp_path),
        "extraction_dir": _accepts(exp.extraction_dir, name, "v"),
        "steering_dir": _accepts(exp.steering_dir, name, "v", "response[:]"),
        "projections_dir": _accepts(exp.projections_dir, "v", name),
    }
    assert len(set(verdicts.values())) == 1, verdicts


@pytest.mark.parametrize("name", [n for n in NAMES if not (isinstance(n, str) and n.endswith(".json"))])
def test_a_prompt_set_or_variant_name_accepted_by_one_reader_is_accepted_by_all(tmp_path, name):
    exp = Experiment.named("e", tmp_path)
    verdicts = {
        "check_name": _accepts(check_name, name, "prompt set"),
        "load_prompt_set": _accepts(load_prompt_set, name, tmp_path),
        "responses_dir": _accepts(exp.inference_responses_dir, "v", name),
        "projection_path": _accepts(exp.projection_path, "v", "a/b", name, 0),
        "massive_path": _accepts(exp.massive_activations_path, "v", name),
        "steering_dir": _accepts(exp.steering_dir, "a/b", "v", "response[:]", name),
        "variant": _accepts(exp.inference_dir, name),
        "experiment": _accepts(Experiment.named, name, tmp_path),
    }
    assert len(set(verdicts.values())) == 1, verdicts


def test_what_the_name_rule_accepts():
    assert check_name("base/alignment/deception", "trait", None) == ["base", "alignment", "deception"]
    assert check_name("v1.2", "variant") == ["v1.2"]
    with pytest.raises(ConfigError, match=r"^invalid trait name 3: trait must be a string like 'starter/optimism'; got int"):
        check_name(3, "trait", None)
    for name in ("_reference", "a/b"):  # '_' folders are tracelens' own; only traits nest
        with pytest.raises(ConfigError, match=rf"^invalid variant name '{name}': expected one folder name like 'default'"):
            check_name(name, "variant")


def test_a_nested_trait_runs_through_the_experiment_layout(tmp_path):
    """A 3-part trait is listed by the readers that walk the layout (steering entries, report, dashboard)."""
    from tracelens.app.dashboard import DashboardData
    from tracelens.pipeline.report import _traits_with_results

    exp = Experiment.named("e", tmp_path)
    for trait in ("base/alignment/deception", "mood/happy"):
        path = exp.steering_results_path(trait, "v", "response[:]")
        path.parent.mkdir(parents=True)
        path.write_text("")
        (exp.projection_path("v", trait, "general", 0)).parent.mkdir(parents=True)
        exp.projection_path("v", trait, "general", 0).write_text("{}")
    (exp.steering_dir("mood/happy", "v", "response[:]").parents[4] / "_reference" / "v").mkdir(parents=True)
    assert [e.trait for e in exp.steering_entries()] == ["base/alignment/deception", "mood/happy"]
    assert _traits_with_results(exp, "v", "v") == ["base/alignment/deception", "mood/happy"]
    data = DashboardData(exp)
    assert data.traits("v", "steering")["traits"] == ["base/alignment/deception", "mood/happy"]
    assert data.traits("v", "projections")["traits"] == ["base/alignment/deception", "mood/happy"]


# --- one layer grammar ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, best, expected", [
    ("all", None, list(range(10))),
    ("30%-60%", None, [3, 4, 5]),  # round(0.3 * 9) = 3 .. round(0.6 * 9) = 5
    ("0-8:4", None, [0, 4, 8]),
    ("2,5,-1", None, [2, 5, 9]),
    ([1, 3], None, [1, 3]),
    ("0-2,8", None, [0, 1, 2, 8]),
    ("best,best+5", 3, [3, 8]),
    ("best,best+5", 7, [7, 9]),  # best+N is clamped to the last layer
    ("best-1,2", 3, [2]),
    ("best-5", 2, [0]),
    ("best, 30%-60%", 9, [3, 4, 5, 9]),
])
def test_one_layer_grammar(spec, best, expected):
    assert parse_layers(spec, 10, best=best) == expected


def test_best_needs_a_best_layer_and_says_so():
    with pytest.raises(ConfigError, match=r"uses 'best\+5', but no best layer is known here"):
        parse_layers("3,best+5", 10)


@pytest.mark.parametrize("bad, match", [
    ("worst", r"layer spec must be 'all', .*; got 'worst' \(bad part 'worst'\)"),
    ("best+x", r"bad part 'best\+x'"),
    ("10-12", r"layer spec '10-12' gives layers \[10, 11, 12\] outside 0..9"),
    ([12], r"gives layers \[12\] outside 0..9"),
])
def test_bad_layer_specs_say_what_is_allowed(bad, match):
    with pytest.raises(ConfigError, match=match):
        parse_layers(bad, 10, best=3)


# --- one unit-vector policy -----------------------------------------------------------------------------------

@pytest.mark.parametrize("vector, match", [
    (torch.zeros(4), r"^direction must have norm >= 1e-08 to define a direction; got norm 0$"),
    (torch.full((4,), 1e-9), r"got norm 2e-09"),
    (torch.tensor([1.0, float("nan"), 0.0, 0.0]), r"^direction contains NaN or inf$"),
    (torch.tensor([float("inf"), 0.0, 0.0, 0.0]), r"^direction contains NaN or inf$"),
])
def test_unit_refuses_what_cannot_be_a_direction(vector, match):
    with pytest.raises(DirectionError, match=match):
        edits.unit(vector)


def test_unit_normalises_in_float32():
    # [3, 4] / 5
    assert torch.equal(edits.unit(torch.tensor([3.0, 4.0], dtype=torch.float16)), torch.tensor([0.6, 0.8]))


def test_methods_use_the_policy():
    from tracelens.methods import get_method

    same = torch.ones(6, 4)
    with pytest.raises(DirectionError, match=r"^mean_diff found no direction: its vector must have norm >= 1e-08.*"
                                             r"got norm 0; the two classes may be identical"):
        get_method("mean_diff").extract(same, same.clone())


@pytest.mark.parametrize("tiny", [ARCHITECTURES[0]], indirect=True)
def test_hooks_use_the_policy(tiny):
    from tracelens.model.hooks import AblationHook, ActivationCappingHook
    from tracelens.model.sites import get_hook_path

    hook, zero = get_hook_path(0, "residual"), torch.zeros(tiny.model.cfg.d_model)
    with pytest.raises(DirectionError, match="direction must have norm"):
        AblationHook(tiny.model, zero, hook)
    with pytest.raises(DirectionError, match="vector must have norm"):
        ActivationCappingHook(tiny.model, zero, hook, 1.0)


def test_the_seed_measurements_keep_their_documented_zero():
    """tracelens.math measures: the seed's cosine of a zero vector is 0, not an error (core_reference)."""
    from tracelens.math import cosine_similarity, projection

    assert float(cosine_similarity(torch.zeros(3), torch.ones(3))) == 0.0
    assert torch.equal(projection(torch.ones(2, 3), torch.zeros(3)), torch.zeros(2))
