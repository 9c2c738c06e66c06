"""The extraction pipeline on a tiny model: layout, resume after an interruption, --force, selection."""

import json

import pytest
import torch

import tracelens.pipeline.extraction as ex
from tracelens.serving.backends import LocalBackend
from tracelens.store import Experiment, get_model_variant
from tracelens.pipeline.extraction import ExtractionConfig, load_activation_metadata, parse_layers, run_extraction
import tracelens.store as store
from tracelens.io import load_tensors, save_tensors
from tracelens.types import VectorLayer, VectorMetadata
from tracelens.pipeline.selection import select_vector, select_vectors

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
    # 54 distinct questions: round(0.2 * 54) = 11 each for select and test, 32 for train
    assert (meta.n_examples_pos, meta.n_val_pos, meta.n_test_pos) == (32, 11, 11) == tuple(report.splits.values())
    train = load_tensors(exp.activations_path(TRAIT, "base", "response[:]", "residual", "train"))["activations"]
    assert train.dtype == torch.float16 and train.shape == (64, 2, 64)
    assert meta.activation_norms[1] == pytest.approx(float(train[:, 1].float().norm(dim=-1).mean()), rel=1e-3)
    for method in ("probe", "mean_diff", "random_baseline"):
        for layer in (0, 1):
            v = exp.vector(TRAIT, "base", "response[:]", "residual", method, layer)
            assert v.dtype == torch.float32 and v.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert {(r.method, r.layer) for r in report.results} == {
        (m, l) for m in ("probe", "mean_diff", "random_baseline") for l in (0, 1)
    }
    for r in report.results:
        for metric in ("auroc", "accuracy", "effect_size"):
            e = r.test[metric]
            assert e["lo"] <= e["value"] <= e["hi"], (r.method, metric)
        assert r.above_chance == (r.test["auroc"]["lo"] > report.chance["layers"][str(r.layer)]["auroc"]["hi"])
    assert report.chance["n_directions"] == ex.MIN_RANDOM == 100  # the default
    assert report.command == "python API (run_extraction)"
    assert exp.evaluation(TRAIT, "base", "response[:]", "residual") == report  # what the store wrote reads back
    best = select_vector(exp, TRAIT)
    assert best.source == "evaluation" and best.method != "random_baseline"
    assert (best.method, best.layer) == (report.selected["method"], report.selected["layer"])
    assert best.val_auroc == max(r.select["auroc"] for r in report.results if r.method != "random_baseline")
    assert best.test["auroc"] == report.row(best.method, best.layer).test["auroc"]
    pos = json.loads((exp.responses_dir(TRAIT, "base") / "pos.json").read_text())
    assert len(pos) == 54 and set(pos[0]) >= {"prompt", "system_prompt", "response", "response_token_ids"}
    splits = meta.splits
    questions = {s: {pos[i]["prompt"] for i in idx} for s, idx in splits.items()}
    assert not (questions["train"] & questions["select"] or questions["train"] & questions["test"]
                or questions["select"] & questions["test"])
    assert sorted(i for idx in splits.values() for i in idx) == list(range(54))


def _write_fixture(exp, shift: float):
    """Two layers of 64-d activations, unit noise: train classes at x=+-3, select and test shifted by `shift`
    along x; a mean_diff vector along x with the train midpoint (0) as its threshold."""
    args = (TRAIT, "base", "response[:]", "residual")
    g = torch.Generator().manual_seed(0)
    for split, n, off in (("train", 8, 0.0), ("select", 6, shift), ("test", 10, shift)):
        noise = torch.randn(2 * n, 2, 64, generator=g)
        x = torch.cat([3 * torch.ones(n), -3 * torch.ones(n)]) + off
        noise[:, :, 0] += x[:, None]
        save_tensors(exp.activations_path(*args, split), {"activations": noise})
    for method in ("mean_diff", "random_baseline"):
        vectors = {layer: torch.eye(64)[0] if method == "mean_diff" else torch.eye(64)[1 + layer] for layer in (0, 1)}
        exp.write_vectors(TRAIT, "base", VectorMetadata(method=method, position="response[:]", layers={
            layer: VectorLayer(norm=1.0, baseline=0.0) for layer in vectors}), vectors)


@pytest.mark.parametrize("shift, expected", [(0.0, 1.0), (6.0, 0.5)])
def test_accuracy_uses_the_threshold_fitted_on_train_not_the_test_labels(tmp_path, shift, expected):
    # Shifted test data: every test score is above the train threshold 0, so only half are right (0.5),
    # while a midpoint of the test class means would still call all of them right.
    exp = _experiment(tmp_path)
    _write_fixture(exp, shift)
    config = ExtractionConfig(methods=("mean_diff",), position="response[:]")
    report = ex.evaluate_vectors(exp, TRAIT, "base", config, [0, 1], {"mean_diff": "h", "random_baseline": "h"})
    row = report.row("mean_diff", 0)
    assert row.threshold == 0.0
    assert row.test["accuracy"]["value"] == expected and row.test["auroc"]["value"] == 1.0
    test_pos, test_neg = exp.activations(TRAIT, "base", "response[:]", "residual", "test")
    assert ex.accuracy(test_pos[:, 0, 0], test_neg[:, 0, 0]) == 1.0  # what the old, test-label midpoint gave
    assert row.above_chance is True and report.selected["method"] == "mean_diff"


def test_the_chance_band_spreads_random_directions_and_is_seeded(tmp_path):
    exp = _experiment(tmp_path)
    _write_fixture(exp, 0.0)
    train = exp.activations(TRAIT, "base", "response[:]", "residual", "train")
    test = exp.activations(TRAIT, "base", "response[:]", "residual", "test")
    band = ex.chance_band(train, test, [0, 1], 20)
    assert band == ex.chance_band(train, test, [0, 1], 20)
    for layer in ("0", "1"):
        b = band[layer]["auroc"]
        assert 0.0 <= b["lo"] < b["median"] < b["hi"] <= 1.0  # random directions do not all separate
    with pytest.raises(ValueError, match="n_random must be at least 100 for a chance band; got 99"):
        ex.check_config(ExtractionConfig(n_random=99))


def test_the_chance_band_draws_its_own_directions_never_random_baselines(tmp_path):
    exp = _experiment(tmp_path)
    _write_fixture(exp, 0.0)
    config = ExtractionConfig(methods=("mean_diff",), position="response[:]")
    ex.fit_vectors(exp, TRAIT, "base", config, [0, 1], "h", "tiny")  # random_baseline seeded as the pipeline seeds it
    train = exp.activations(TRAIT, "base", "response[:]", "residual", "train")
    test = exp.activations(TRAIT, "base", "response[:]", "residual", "test")
    band = ex.chance_band(train, test, [0, 1], 100)
    for layer in (0, 1):
        baseline = exp.vector(TRAIT, "base", "response[:]", "residual", "random_baseline", layer)
        dirs = ex.chance_directions(64, layer, 100)
        assert dirs.shape == (100, 64) and torch.allclose(dirs.norm(dim=-1), torch.ones(100))
        assert float((dirs @ baseline / baseline.norm()).abs().max()) < 0.9  # direction 0 was its draw (cosine 1.0)
        aurocs = torch.tensor([ex.auroc(test[0][:, layer] @ d, test[1][:, layer] @ d) for d in dirs], dtype=torch.double)
        assert band[str(layer)]["auroc"]["hi"] == pytest.approx(float(torch.quantile(aurocs, 0.95)))
        assert not torch.equal(dirs, ex.chance_directions(64, layer, 100, seed=1))


def test_the_extract_command_records_its_command_line(monkeypatch):
    from tracelens.cli import main

    seen = {}
    monkeypatch.setattr(ex, "run_extraction", lambda *args, **kwargs: seen.update(kwargs) or {})
    assert main(["extract", "--experiment", "e", "--traits", TRAIT, "--limit", "3"]) == 0
    assert seen["command"] == f"tracelens extract --experiment e --traits {TRAIT} --limit 3"


def test_split_fractions_are_validated():
    with pytest.raises(ValueError, match="split fractions must be three numbers"):
        ex.check_config(ExtractionConfig(splits=(0.9, 0.1)))


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
    assert meta.n_examples_pos + meta.n_val_pos + meta.n_test_pos == len(expected)


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


def test_a_crash_mid_stage_after_a_config_change_never_leaves_mixed_files(tmp_path, tiny, monkeypatch):
    backend = LocalBackend.from_model(tiny.model)
    clean = _experiment(tmp_path / "clean")
    run_extraction(clean, [TRAIT], CONFIG, backend=backend)
    exp = _experiment(tmp_path / "crashed")
    run_extraction(exp, [TRAIT], CONFIG, backend=backend)
    real_save, calls = store.save_tensors, []

    def dies_on_second_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # kill -9 after the new train split was written, before select/test
        return real_save(*args, **kwargs)

    monkeypatch.setattr(store, "save_tensors", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):  # another split seed: new activations for every split
        run_extraction(exp, [TRAIT], ExtractionConfig(**{**CONFIG.__dict__, "split_seed": 1}), backend=backend)
    monkeypatch.setattr(store, "save_tensors", real_save)
    run_extraction(exp, [TRAIT], CONFIG, backend=backend)  # the old configuration again
    for name, data in _files(clean).items():
        if name.endswith(".safetensors") or "evaluation" in name:
            assert data == _files(exp)[name], name


@pytest.mark.parametrize("bad, match", [
    ({"layers": "99"}, "outside 0..1"),
    ({"component": "resid"}, "component must be one of residual"),
    ({"methods": ("pca",)}, "unknown extraction method 'pca'"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer or None; got 0"),
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
    ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
    ({"position": "middle"}, "position"),
])
def test_bad_settings_fail_before_any_generation(tmp_path, tiny, monkeypatch, bad, match):
    backend = LocalBackend.from_model(tiny.model)
    monkeypatch.setattr(backend, "generate_results", lambda *a, **k: pytest.fail("generated before validating"))
    with pytest.raises(ValueError, match=match):
        run_extraction(_experiment(tmp_path), [TRAIT], ExtractionConfig(**{**CONFIG.__dict__, **bad}), backend=backend)
    with pytest.raises(FileNotFoundError):
        run_extraction(_experiment(tmp_path), ["starter/nope"], CONFIG, backend=backend)
