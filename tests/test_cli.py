"""The command line: usage errors are one line and exit 2, before any model work; --debug re-raises."""

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


def test_server_limits_reach_the_model_server(monkeypatch):
    import tracelens.serving.server

    seen = {}
    monkeypatch.setattr(tracelens.serving.server, "serve", lambda experiment, **kw: seen.update(kw, experiment=experiment))
    assert cli.main(["server", "--experiment", "x", "--max-new-tokens-limit", "64", "--io-timeout", "5"]) == 0
    assert seen["experiment"] == "x" and seen["max_new_tokens_limit"] == 64 and seen["io_timeout"] == 5.0
    assert "request_timeout" not in seen  # unset flags keep the server's defaults


@pytest.mark.parametrize("command", ["extract", "monitor"])
def test_the_vllm_backend_refuses_a_lora_variant(command, tmp_path, monkeypatch, capsys):
    """vLLM would generate with the base model: refused before anything loads, never run under the LoRA label."""
    from tracelens.pipeline.experiments import Experiment

    monkeypatch.setenv("TRACELENS_EXPERIMENTS", str(tmp_path))
    Experiment.named("x", tmp_path).write_config({"tuned": {"model": "default", "lora": "adapters/tuned"}})
    argv = [command, "--experiment", "x", "--traits", "starter/optimism", "--backend", "vllm"]
    assert cli.main(argv + (["--prompt-set", "general"] if command == "monitor" else [])) == 2
    assert ("--backend vllm needs a variant without a LoRA adapter; got 'tuned' with lora 'adapters/tuned'"
            in capsys.readouterr().err)
