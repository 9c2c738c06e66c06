"""The extraction pipeline on a tiny model: layout, resume after an interruption, --force, selection."""

import json

import pytest
import torch

import tracelens.extraction as ex
from tracelens.backends import LocalBackend
from tracelens.experiments import Experiment, get_model_variant
from tracelens.extraction import ExtractionConfig, load_activation_metadata, parse_layers, run_extraction
from tracelens.io import load_tensors
from tracelens.selection import select_vector, select_vectors

TRAIT = "starter/optimism"


@pytest.mark.parametrize(
    "spec, expected",
    [("all", list(range(10))), ("30%-60%", [3, 4, 5]), ("0-8:4", [0, 4, 8]), ("2,5,-1", [2, 5, 9]), ([1, 3], [1, 3])],
)
def test_parse_layers(spec, expected):
    # 30% of depth 9 (layers 0..9) rounds to 3, 60% to 5
    assert parse_layers(spec, 10) == expected


@pytest.mark.parametrize("bad", ["some", "10-12", "0-3:x", [12]])
def test_bad_layer_specs_are_rejected(bad):
    with pytest.raises(ValueError, match="layer spec|bad layer spec"):
        parse_layers(bad, 10)


def _experiment(root) -> Experiment:
    exp = Experiment.named("tiny-exp", root)
    exp.write_config({"base": {"model": "tiny-llama"}}, {"extraction": "base", "application": "base"})
    return exp


def _files(exp: Experiment) -> dict[str, bytes]:
    return {str(p.relative_to(exp.dir)): p.read_bytes() for p in sorted(exp.dir.rglob("*")) if p.is_file()}


CONFIG = ExtractionConfig(methods=("probe", "mean_diff"), max_new_tokens=4, position="response[:]")


def test_pipeline_writes_the_layout_and_evaluates_every_method_with_the_random_baseline(tmp_path, tiny):
    exp = _experiment(tmp_path)
    report = run_extraction(exp, [TRAIT], CONFIG, backend=LocalBackend.from_model(tiny.model))[TRAIT]
    meta = load_activation_metadata(exp, TRAIT, "base", "response[:]")
    assert meta.n_layers == 2 and meta.hidden_dim == 64 and meta.captured_layers == [0, 1]
    assert meta.n_examples_pos == meta.n_examples_neg == 54 - 5 and meta.n_val_pos == 5  # 10% of 54 held out
    act_dir = exp.activations_dir(TRAIT, "base", "response[:]", "residual")
    train = load_tensors(act_dir / "train_all_layers.safetensors")["activations"]
    assert train.dtype == torch.float16 and train.shape == (98, 2, 64)
    assert meta.activation_norms[1] == pytest.approx(float(train[:, 1].float().norm(dim=-1).mean()), rel=1e-3)
    for method in ("probe", "mean_diff", "random_baseline"):
        for layer in (0, 1):
            v = ex.load_vector(exp, TRAIT, "base", "response[:]", "residual", method, layer)
            assert v.dtype == torch.float32 and v.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert {(r["method"], r["layer"]) for r in report["results"]} == {
        (m, l) for m in ("probe", "mean_diff", "random_baseline") for l in (0, 1)
    }
    best = select_vector(exp, TRAIT)
    assert best.source == "evaluation" and best.method != "random_baseline"
    assert best.val_accuracy == max(r["val_accuracy"] for r in report["results"] if r["method"] != "random_baseline")
    pos = json.loads((exp.responses_dir(TRAIT, "base") / "pos.json").read_text())
    assert len(pos) == 54 and set(pos[0]) >= {"prompt", "system_prompt", "response", "response_token_ids"}


def test_an_interrupted_run_resumes_to_identical_outputs_and_force_recomputes(tmp_path, tiny, monkeypatch):
    backend = LocalBackend.from_model(tiny.model)
    clean = _experiment(tmp_path / "clean")
    run_extraction(clean, [TRAIT], CONFIG, backend=backend)

    resumed = _experiment(tmp_path / "resumed")
    real_fit = ex.fit_vectors

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "fit_vectors", dies)
    with pytest.raises(KeyboardInterrupt):
        run_extraction(resumed, [TRAIT], CONFIG, backend=backend)
    responses = exp_file = resumed.responses_dir(TRAIT, "base") / "pos.json"
    stamp = exp_file.stat().st_mtime_ns
    monkeypatch.setattr(ex, "fit_vectors", real_fit)
    generated = []
    real_generate = backend.generate_results
    monkeypatch.setattr(backend, "generate_results", lambda *a, **k: generated.append(1) or real_generate(*a, **k))
    run_extraction(resumed, [TRAIT], CONFIG, backend=backend)
    assert generated == [] and responses.stat().st_mtime_ns == stamp  # stage 1 was not redone
    assert _files(resumed).keys() == _files(clean).keys()
    for name, data in _files(clean).items():
        if name.endswith(".safetensors"):
            assert data == _files(resumed)[name], name

    run_extraction(resumed, [TRAIT], ExtractionConfig(**{**CONFIG.__dict__, "force": True}), backend=backend)
    assert generated == [1, 1] and responses.stat().st_mtime_ns != stamp


def test_unknown_variants_modes_and_unsafe_names_are_rejected(tmp_path):
    exp = _experiment(tmp_path)
    assert get_model_variant(exp).name == "base"
    with pytest.raises(KeyError, match="has no model variant 'chat'"):
        get_model_variant(exp, "chat")
    with pytest.raises(ValueError, match="mode must be one of"):
        get_model_variant(exp, mode="training")
    for bad in ("../evil", "/abs", "a/b", ".."):
        with pytest.raises(ValueError, match="invalid experiment name"):
            Experiment.named(bad, tmp_path)
    with pytest.raises(ValueError, match="invalid trait name"):
        exp.extraction_dir("../../etc", "base")
    with pytest.raises(FileNotFoundError, match="no scored vectors"):
        select_vectors(exp, TRAIT)


class IndexJudge:
    """A test double with the Judge interface. First call (positive side): pair i scores 100 unless
    i % 4 == 0 (then 50); second call (negative side): 0 unless i % 3 == 0 (then 41)."""

    name = "index"

    def __init__(self):
        self.calls = 0

    def score(self, items, trait_name=None, definition=None):
        self.calls += 1
        if self.calls == 1:
            return [{"trait_score": 50.0 if i % 4 == 0 else 100.0} for i in range(len(items))]
        return [{"trait_score": 41.0 if i % 3 == 0 else 0.0} for i in range(len(items))]


def test_vetting_keeps_matched_pairs_that_pass_both_thresholds(tmp_path, tiny):
    exp = _experiment(tmp_path)
    run_extraction(exp, [TRAIT], CONFIG, backend=LocalBackend.from_model(tiny.model), vet_judge=IndexJudge())
    expected = [i for i in range(54) if i % 4 != 0 and i % 3 != 0]  # 60 > 50 fails; 41 > 40 fails
    vetting = json.loads(exp.vetting_path(TRAIT, "base").read_text())
    assert vetting["kept_indices"] == expected and vetting["summary"] == {"n_pairs": 54, "n_kept": len(expected)}
    meta = load_activation_metadata(exp, TRAIT, "base", "response[:]")
    assert meta.n_examples_pos + meta.n_val_pos == len(expected)


def test_a_separate_response_backend_generates_then_is_shut_down(tmp_path, tiny):
    class Responder(LocalBackend):
        calls, shut = 0, 0

        def generate_results(self, *args, **kwargs):
            Responder.calls += 1
            return super().generate_results(*args, **kwargs)

        def shutdown(self):
            Responder.shut += 1

    exp = _experiment(tmp_path)
    run_extraction(exp, [TRAIT], CONFIG, backend=LocalBackend.from_model(tiny.model),
                   response_backend=Responder.from_model(tiny.model))
    assert (Responder.calls, Responder.shut) == (2, 1)  # positive and negative sides, then freed
    assert load_activation_metadata(exp, TRAIT, "base", "response[:]").n_layers == 2
