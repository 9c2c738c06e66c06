"""The command line: usage errors are one line and exit 2, before any model work; --debug re-raises; every option
says its default, and the defaults are the library's."""

import argparse
import dataclasses
import importlib
import inspect

import pytest

from tracelens import cli


@pytest.mark.parametrize("argv, match", [
    (["steer", "--experiment", "x", "--traits", "starter/optimism", "--coefficients", "nan"],
     "coefficients must be a non-empty list of finite numbers"),
    (["steer", "--experiment", "x", "--traits", "starter/optimism", "--n-search", "0"],
     "n_search must be a positive integer; got 0"),
    (["steer", "--experiment", "x", "--traits", "starter/optimism", "--max-new-tokens", "0"],
     "max_new_tokens must be a positive integer; got 0"),
    (["extract", "--experiment", "x", "--traits", "starter/optimism", "--methods", "pca"],
     "unknown extraction method 'pca'"),
    (["extract", "--experiment", "x", "--traits", "starter/optimism", "--component", "resid"],
     "component must be one of"),
    (["extract", "--experiment", "x", "--traits", "starter/optimism", "--max-new-tokens", "0"],
     "max_new_tokens must be a positive integer or None; got 0"),
    (["extract", "--experiment", "x", "--traits", "starter/optimism", "--splits", "0.5,0.5"],
     "split fractions must be three numbers"),
    (["extract", "--experiment", "../up", "--traits", "starter/optimism"], "invalid experiment name"),
])
def test_usage_errors_print_one_line_and_exit_2(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACELENS_EXPERIMENTS", str(tmp_path))
    monkeypatch.setattr("tracelens.model.loading.load_model", lambda *a, **k: pytest.fail("loaded a model first"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1 and err.startswith(f"tracelens {argv[0]}: error:")


def test_debug_shows_the_exception(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACELENS_EXPERIMENTS", str(tmp_path))
    with pytest.raises(ValueError, match="n_search must be a positive integer"):
        cli.main(["--debug", "steer", "--experiment", "x", "--traits", "starter/optimism", "--n-search", "0"])


def test_a_missing_experiment_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRACELENS_EXPERIMENTS", str(tmp_path))
    assert cli.main(["extract", "--experiment", "nothing-here", "--traits", "starter/optimism"]) == 2
    assert "experiment 'nothing-here' has no config" in capsys.readouterr().err


def _subparsers() -> dict:
    [sub] = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: p for name, p in sub.choices.items() if name != "serve"}  # 'serve' is dashboard's alias


def test_every_option_says_what_it_does_and_its_default():
    for name, parser in _subparsers().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = formatter._get_help_string(action) or ""
            assert len(text) > 10, f"{name} {action.option_strings[0]} has no help"
            if not action.required and action.nargs != 0:  # an option with a value says its default
                assert "default" in text, f"{name} {action.option_strings[0]}: {text!r} names no default"


def _library_defaults(target) -> dict:
    if dataclasses.is_dataclass(target):
        return {f.name: f.default for f in dataclasses.fields(target) if f.default is not dataclasses.MISSING}
    return {n: p.default for n, p in inspect.signature(target).parameters.items() if p.default is not p.empty}


def _as_library_value(text, like):
    if isinstance(like, (tuple, list)) and isinstance(text, str):
        return tuple(type(like[0])(x) for x in text.split(","))
    return text


@pytest.mark.parametrize("command, target, renamed", [
    ("extract", "tracelens.pipeline.extraction:ExtractionConfig", {}),
    ("steer", "tracelens.pipeline.steering_eval:SteeringEvalConfig", {}),
    ("monitor", "tracelens.pipeline.monitoring:MonitorConfig", {}),
    ("ab", "tracelens.pipeline.ab:ABConfig", {"splits": "fractions"}),
    ("server", "tracelens.app.server:ModelServer", {}),
])
def test_the_cli_defaults_are_the_library_defaults(command, target, renamed):
    module, name = target.split(":")
    library = _library_defaults(getattr(importlib.import_module(module), name))
    parser = _subparsers()[command]
    shared = [a for a in parser._actions if renamed.get(a.dest, a.dest) in library and a.option_strings]
    assert len(shared) >= 3, [a.dest for a in shared]
    for action in shared:
        expected = library[renamed.get(action.dest, action.dest)]
        assert _as_library_value(action.default, expected) == expected, (command, action.dest)


def test_the_cli_lists_exactly_the_librarys_choices():
    from tracelens.model.sites import COMPONENTS
    from tracelens.pipeline.ab import READ_POSITIONS

    [read] = [a for a in _subparsers()["ab"]._actions if a.dest == "read"]
    assert read.choices == sorted(READ_POSITIONS)
    assert cli.COMPONENT_HELP.endswith(f"{', '.join(COMPONENTS)} (tracelens.model.sites.COMPONENTS)")


def test_help_and_version_import_no_model_code():
    """`tracelens --help`, `--version` and every subcommand's `--help` answer without importing torch; `list`
    without TransformerLens."""
    import subprocess
    import sys

    code = ("import sys\nfrom tracelens import cli\nparser = cli.build_parser()\n"
            "print([m for m in ('torch', 'transformer_lens') if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout == "[]\n", done.stderr[-2000:]
    # `tracelens list` reads the store and the report's helpers, never the model code
    code = "import sys\nimport tracelens.pipeline.inventory\nprint('transformer_lens' in sys.modules)\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout == "False\n", done.stderr[-2000:]


def test_debug_is_accepted_after_the_subcommand(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACELENS_EXPERIMENTS", str(tmp_path))
    with pytest.raises(ValueError, match="n_search must be a positive integer"):
        cli.main(["steer", "--experiment", "x", "--traits", "starter/optimism", "--n-search", "0", "--debug"])


@pytest.mark.parametrize("command", ["extract", "monitor"])
def test_the_vllm_backend_refuses_a_lora_variant(command, tmp_path, monkeypatch, capsys):
    """vLLM would generate with the base model: refused before anything loads, never run under the LoRA label."""
    from tracelens.store import Experiment

    monkeypatch.setenv("TRACELENS_EXPERIMENTS", str(tmp_path))
    Experiment.named("x", tmp_path).write_config({"tuned": {"model": "default", "lora": "adapters/tuned"}})
    argv = [command, "--experiment", "x", "--traits", "starter/optimism", "--backend", "vllm"]
    assert cli.main(argv + (["--prompt-set", "general"] if command == "monitor" else [])) == 2
    assert ("--backend vllm needs a variant without a LoRA adapter; got 'tuned' with lora 'adapters/tuned'"
            in capsys.readouterr().err)
