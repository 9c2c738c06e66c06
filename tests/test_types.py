"""Record types: JSON round trips (also through json.dumps/loads), unknown keys ignored, derived properties."""

import dataclasses
import doctest
import json
import typing
from dataclasses import dataclass, field

import pytest

import tracelens.types
from tracelens.errors import DataError, InputTypeError
from tracelens.records import record, stored
from tracelens.types import (
    ActivationMetadata,
    CoherenceItem,
    CoherenceSet,
    CoherenceValidation,
    Evaluation,
    EvaluationRow,
    JUDGE_COHERENCE,
    JudgeResult,
    ModelConfig,
    ModelVariant,
    NeutralReference,
    ProjectionConfig,
    ProjectionEntry,
    ProjectionRecord,
    ResponseRecord,
    ResponsesMetadata,
    ScenarioResponse,
    SteeringEntry,
    SteeringHeader,
    SteeringResults,
    SteeringRunRecord,
    VectorLayer,
    VectorMetadata,
    VectorResult,
    VectorSpec,
    Vetting,
)


def _run(layer, coef, trait, coherence, method="probe"):
    return SteeringRunRecord(
        result=JudgeResult(trait, coherence, 5, 3.0, 0.6, 10.0, 90.0),
        config=ProjectionConfig.single(layer, "residual", "response[:]", method, weight=coef),
        eval_judge="embedding",
        timestamp="2026-11-27T10:00:00",
    )


def _built_entry():
    return ProjectionEntry.build(
        "probe", 9, "steering", 0.25, [1.0, 2.0], [3.0, -1.0, 0.5], [2.0, 2.0], [4.0, 4.0, 1.0]
    )


def _entry():
    """An entry as read back from a file: to_dict rounds to 4 decimals, so exact round trips start from there."""
    return ProjectionEntry.from_dict(_built_entry().to_dict())


EXAMPLES = {
    "VectorSpec": VectorSpec(9, "attn_contribution", "response[:5]", "probe", 0.5),
    "ProjectionConfig": ProjectionConfig(
        [
            VectorSpec(9, "attn_contribution", "response[:]", "probe", 0.5),
            VectorSpec(12, "residual", "response[:]", "mean_diff", 0.3),
        ]
    ),
    "VectorResult": VectorResult(
        layer=12, method="probe", position="response[:]", component="residual", score=31.5, direction="positive",
        source="steering", coefficient=4.2, naturalness=70.0, delta=31.5, coherence=82.0, val_accuracy=0.9,
        val_auroc=0.97,
    ),
    "JudgeResult": JudgeResult(62.5, 81.25, 4, 12.1, 0.75, 40.0, 90.0, n_degenerate=1),
    "ModelVariant": ModelVariant("instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "some/lora"),
    "ModelConfig": ModelConfig(
        huggingface_id="google/gemma-2-2b", model_type="gemma2", variant="base", supports_system_prompt=False,
        num_hidden_layers=26, hidden_size=2304, num_attention_heads=8, num_key_value_heads=4, intermediate_size=9216,
        max_context_length=8192, vocab_size=256000, notes={"massive_dims": [1068]},
    ),
    "SteeringEntry": SteeringEntry("mood/happy", "instruct", "response_all", "steering", "/x/results.jsonl"),
    "ActivationMetadata": ActivationMetadata(
        n_layers=30, hidden_dim=576, captured_layers=[3, 10], activation_norms={3: 12.5, 10: 40.25},
        n_examples_pos=45, n_examples_neg=44, n_val_pos=5, n_val_neg=5, model="smollm2", position="response[:]",
    ),
    "ResponseRecord": ResponseRecord(
        prompt="Hi", response="Hello there", tokens=["<s>", "Hi", "Hello", " there"], token_ids=[1, 5, 6, 7],
        prompt_end=2, inference_model="smollm2", capture_date="2026-11-27", system_prompt="Be kind.", tags=["demo"],
        sentence_boundaries=[2, 4],
    ),
    "ProjectionEntry": _entry(),
    "ProjectionRecord": ProjectionRecord(
        prompt_id=3, prompt_set="harmless", n_prompt_tokens=2, n_response_tokens=3, projections=[_entry(), _entry()],
        position="response[:]", centered=True, projection_date="2026-11-27",
    ),
    "SteeringRunRecord": dataclasses.replace(_run(12, 4.2, 70.0, 85.0), input_hashes={"prompts": "abc"}),
    "SteeringHeader": SteeringHeader(
        trait="mood/happy", direction="positive", steering_model="smollm2", steering_experiment="demo",
        vector_source={"model": "smollm2", "experiment": "demo", "trait": "mood/happy"},
        eval={"model": "embedding", "method": "classifier", "trait_judge": "embedding"}, prompts_file="q.json",
        prompts_hash="123", n_questions=5, selection={"max_kl": 0.5, "min_coherence": 77.0}, command="tracelens steer",
    ),
    "CoherenceValidation": CoherenceValidation(
        model="m", prompt_set="general", seed=0, max_new_tokens=40, layer=15, coefficients={"random_steering_1x": 9.5},
        n_items={"tune": {"items": 90, "intact": 12}, "held_out": {"items": 88, "intact": 12}},
        n_questions={"tune": 12, "held_out": 12}, tune_questions=["a"], held_out_questions=["b"],
        auroc={"nll": {"value": 0.9, "lo": 0.8, "hi": 0.97}}, per_kind={"nll": {"truncated": {"value": 0.4, "lo": 0.3,
                                                                                           "hi": 0.5}}},
        sources={"nll": "m"}),
    "CoherenceItem": CoherenceItem("q?", "An answer.", True, "intact"),
    "CoherenceSet": CoherenceSet([CoherenceItem("q?", "An answer.", True, "intact"),
                                  CoherenceItem("q?", "answer. An", False, "shuffled_words")],
                                 tune=["p?"], held_out=["q?"], layer=1, coefficients={"random_steering_1x": 2.5},
                                 prompt_set="general", model="tiny", seed=0, max_new_tokens=8),
    "ScenarioResponse": ScenarioResponse("Hi?", "Be glad.", "Hello!", [1, 5], [6, 7]),
    "ResponsesMetadata": ResponsesMetadata(model="smollm2", trait="mood/happy", max_new_tokens=8, temperature=0.0,
                                           chat_template=True, input_hashes={"scenarios": "abc"}, input_hash="def"),
    "Vetting": Vetting([{"idx": 0, "polarity": "pos", "score": 80.0}], {"pos": 60.0, "neg": 40.0}, [0], [],
                       {"n_pairs": 1, "n_kept": 1}, "abc"),
    "VectorLayer": VectorLayer(norm=1.0, baseline=0.25, train_acc=0.9),
    "VectorMetadata": VectorMetadata(model="smollm2", trait="mood/happy", method="probe", position="response[:]",
                                     layers={3: VectorLayer(1.0, 0.25, bias=0.1), 10: VectorLayer(1.0, -0.5)},
                                     input_hash="abc"),
    "EvaluationRow": EvaluationRow("probe", 3, 0.25, {"auroc": 0.9, "accuracy": 0.8, "effect_size": 1.5},
                                   {"auroc": {"value": 0.85, "lo": 0.7, "hi": 0.95}}, True),
    "Evaluation": Evaluation(
        trait="mood/happy", position="response[:]", component="residual", splits={"train": 6, "select": 2, "test": 2},
        bootstrap={"n_resamples": 1000}, chance={"n_directions": 20, "percentiles": [5.0, 95.0], "layers": {}},
        results=[EvaluationRow("probe", 3, 0.25, {"auroc": 0.9, "accuracy": 0.8, "effect_size": 1.5}, {}, False)],
        selected={"method": "probe", "layer": 3, "by": "select auroc"}, input_hash="abc",
    ),
    "NeutralReference": NeutralReference("smollm2", ["Hello."], [[1, 2]], [[3, 4]]),
    "SteeringResults": SteeringResults(
        header=SteeringHeader(trait="mood/happy"), baseline=JudgeResult(20.0, 90.0, 5),
        runs=[_run(10, 3.0, 50.0, 90.0), _run(12, 4.0, 70.0, 80.0)], baseline_timestamp="t0",
    ),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_to_dict_from_dict_round_trips_also_through_json(name):
    obj = EXAMPLES[name]
    d = obj.to_dict()
    assert json.loads(json.dumps(d)) == d, "to_dict must already be plain JSON data"
    assert type(obj).from_dict(d) == obj
    assert type(obj).from_dict(json.loads(json.dumps(d))) == obj


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_from_dict_ignores_unknown_keys(name):
    obj = EXAMPLES[name]
    d = obj.to_dict()
    d["added_by_a_newer_version"] = {"x": 1}
    assert type(obj).from_dict(d) == obj


def test_every_record_type_has_an_example():
    public = {name for name in dir(tracelens.types) if hasattr(getattr(tracelens.types, name), "from_dict")}
    assert public == set(EXAMPLES)


RECORDS = [cls for _, cls in sorted(vars(tracelens.types).items())
           if isinstance(cls, type) and cls.__module__ == "tracelens.types" and hasattr(cls, "from_dict")]
"""Every record class of `tracelens.types`, found by introspection: a new record is covered without a test edit."""


def _names(cls) -> list[str]:
    return list(cls._fields) if hasattr(cls, "_fields") else [f.name for f in dataclasses.fields(cls)]


def _replace(obj, **changes):
    return obj._replace(**changes) if hasattr(obj, "_replace") else dataclasses.replace(obj, **changes)


def _value_of(hint):
    """A value of type `hint` with nothing left None."""
    args = typing.get_args(hint)
    if type(None) in args:
        return _value_of(next(a for a in args if a is not type(None)))
    if typing.get_origin(hint) is dict:
        return {_value_of(args[0]): _value_of(args[1])}
    if typing.get_origin(hint) is list:
        return [_value_of(args[0])]
    if getattr(hint, "__name__", None) in EXAMPLES:
        return EXAMPLES[hint.__name__]
    return {int: 3, float: 0.25, str: "set", bool: True}.get(hint, {"any": [1, 2.5, "x", True]})


def _every_field_set(obj):
    hints = typing.get_type_hints(type(obj))
    return _replace(obj, **{n: _value_of(hints[n]) for n in _names(type(obj)) if getattr(obj, n) is None})


def _optional_fields_none(obj):
    hints = typing.get_type_hints(type(obj))
    return _replace(obj, **{n: None for n in _names(type(obj)) if type(None) in typing.get_args(hints[n])})


@pytest.mark.parametrize("variant", [_every_field_set, _optional_fields_none])
@pytest.mark.parametrize("cls", RECORDS, ids=lambda cls: cls.__name__)
def test_every_record_round_trips_with_every_field_set_and_with_its_optional_fields_none(cls, variant):
    obj = variant(EXAMPLES[cls.__name__])
    if variant is _every_field_set:
        assert all(getattr(obj, n) is not None for n in _names(cls))
    d = obj.to_dict()
    assert cls.from_dict(d) == obj
    assert cls.from_dict(json.loads(json.dumps(d, allow_nan=False))) == obj


@record
@dataclass
class _Sample:
    """A record with what the records above do not all use: tuples, NamedTuples, int keys, renamed keys."""

    variants: tuple[ModelVariant, ...]
    norms: dict[int, list[VectorLayer]]
    best: VectorSpec | None = None
    label: str = field(default="", metadata=stored(key="name", under="meta", legacy="label"))
    note: str | None = field(default=None, metadata=stored(omit_none=True))


def test_the_codec_stores_tuples_as_lists_int_keys_as_strings_and_declared_keys_where_declared():
    sample = _Sample((ModelVariant("base", "gpt2"),), {3: [VectorLayer(1.0, 0.5)]}, label="x")
    d = sample.to_dict()
    assert d == {"variants": [{"name": "base", "model": "gpt2", "lora": None}],
                 "norms": {"3": [{"norm": 1.0, "baseline": 0.5}]}, "best": None, "meta": {"name": "x"}}
    assert _Sample.from_dict(json.loads(json.dumps(d))) == sample
    assert _Sample.from_dict({**d, "meta": {}, "label": "old"}).label == "old"
    assert _Sample.from_dict({**d, "note": "n"}).to_dict()["note"] == "n"


@pytest.mark.unchecked_types
def test_the_codec_names_missing_keys_and_values_of_the_wrong_kind():
    with pytest.raises(DataError, match=r"_Sample.from_dict: missing 'variants', 'norms' \(got keys \['best'\]\)"):
        _Sample.from_dict({"best": None})
    with pytest.raises(InputTypeError, match="_Sample.norms must be a mapping; got list"):
        _Sample.from_dict({"variants": [], "norms": [1]})
    with pytest.raises(InputTypeError, match="_Sample.variants must be a list; got str"):
        _Sample.from_dict({"variants": "base", "norms": {}})
    with pytest.raises(DataError, match=r"ProjectionRecord.from_dict: missing 'metadata.prompt_id'"):
        ProjectionRecord.from_dict({"projections": []})


def test_module_doctest_runs():
    assert doctest.testmod(tracelens.types).failed == 0


def test_vector_spec_dict_has_the_five_upstream_keys():
    assert VectorSpec(9, "residual", "response[:]", "probe").to_dict() == {
        "layer": 9, "component": "residual", "position": "response[:]", "method": "probe", "weight": 1.0,
    }


def test_projection_config_single_and_ensemble():
    single = ProjectionConfig.single(9, "residual", "response[:]", "probe", weight=0.9)
    assert single.vectors == [VectorSpec(9, "residual", "response[:]", "probe", 0.9)]
    assert not single.is_ensemble
    assert EXAMPLES["ProjectionConfig"].is_ensemble
    assert ProjectionConfig.from_dict({"vectors": [{"layer": "9", "component": "residual", "position": "p",
                                                    "method": "probe"}]}).vectors[0].layer == 9


def test_normalized_weights():
    config = ProjectionConfig([VectorSpec(9, "r", "p", "m", 0.5), VectorSpec(12, "r", "p", "m", 0.3),
                               VectorSpec(15, "r", "p", "m", 0.2)])
    assert config.normalized_weights == pytest.approx([0.5, 0.3, 0.2])
    doubled = ProjectionConfig([VectorSpec(9, "r", "p", "m", 2.0), VectorSpec(12, "r", "p", "m", 6.0)])
    assert doubled.normalized_weights == pytest.approx([0.25, 0.75])
    zero = ProjectionConfig([VectorSpec(9, "r", "p", "m", 1.0), VectorSpec(12, "r", "p", "m", -1.0),
                             VectorSpec(15, "r", "p", "m", 0.0)])
    assert zero.normalized_weights == pytest.approx([1 / 3, 1 / 3, 1 / 3])


def test_projection_config_rejects_no_vectors():
    with pytest.raises(ValueError, match="at least one VectorSpec"):
        ProjectionConfig([])


def test_vector_result_to_vector_spec():
    result = EXAMPLES["VectorResult"]
    assert result.to_vector_spec() == VectorSpec(12, "residual", "response[:]", "probe", 1.0)
    assert result.to_vector_spec(weight=4.2).weight == 4.2


def test_vector_result_checks_source_direction_and_steering_only_fields():
    VectorResult(3, "probe", "response[:]", source="evaluation", score=0.9, val_auroc=0.9)
    with pytest.raises(ValueError, match="source must be one of"):
        VectorResult(3, "probe", "response[:]", source="judged")
    with pytest.raises(ValueError, match="direction must be one of"):
        VectorResult(3, "probe", "response[:]", direction="up")
    with pytest.raises(ValueError, match="come from steering runs, but source='evaluation'"):
        VectorResult(3, "probe", "response[:]", source="evaluation", delta=10.0)
    with pytest.raises(ValueError, match="come from steering runs"):
        VectorResult(3, "probe", "response[:]", source="unscored", coherence=80.0)


def test_judge_result_empty():
    assert JudgeResult.empty() == JudgeResult(None, None, 0, 0.0, 0.0, None, None, 0)
    assert JudgeResult.from_dict(JudgeResult.empty().to_dict()) == JudgeResult.empty()


def test_judge_result_from_before_the_degeneracy_guard_reads_as_none_degenerate():
    old = {"trait_mean": 70.0, "coherence_mean": 85.0, "n": 5, "trait_std": 3.0, "success_rate": 0.6,
           "min_score": 10.0, "max_score": 90.0}
    assert JudgeResult.from_dict(old) == JudgeResult(70.0, 85.0, 5, 3.0, 0.6, 10.0, 90.0, n_degenerate=0)


def test_model_variant_is_a_named_tuple_with_optional_lora():
    variant = ModelVariant("base", "gpt2")
    assert variant == ("base", "gpt2", None)
    assert variant.lora is None
    assert ModelVariant.from_dict({"name": "base", "model": "gpt2", "extra": 1}) == variant


def test_activation_metadata_layer_keys_are_ints_in_python_and_strings_in_json():
    meta = EXAMPLES["ActivationMetadata"]
    d = meta.to_dict()
    assert d["activation_norms"] == {"3": 12.5, "10": 40.25}
    loaded = ActivationMetadata.from_dict(json.loads(json.dumps(d)))
    assert loaded.activation_norms == {3: 12.5, 10: 40.25}
    assert loaded.n_train == 89 and loaded.n_val == 10


def test_response_record_split_and_checks():
    rec = EXAMPLES["ResponseRecord"]
    assert rec.prompt_tokens == ["<s>", "Hi"]
    assert rec.response_tokens == ["Hello", " there"]
    with pytest.raises(ValueError, match="3 tokens but 2 token_ids"):
        ResponseRecord("p", "r", ["a", "b", "c"], [1, 2], 1)
    with pytest.raises(ValueError, match=r"prompt_end must be in \[0, 2\]; got 3"):
        ResponseRecord("p", "r", ["a", "b"], [1, 2], 3)


def test_projection_entry_normalizes_by_the_segment_mean_norm_and_rounds_to_4_decimals():
    entry = _built_entry()
    # prompt norms mean 2 -> [1/2, 2/2]; response norms mean (4 + 4 + 1) / 3 = 3 -> [3/3, -1/3, 0.5/3]
    assert entry.normalized_prompt == pytest.approx([0.5, 1.0])
    assert entry.normalized_response == pytest.approx([1.0, -1 / 3, 0.5 / 3])
    d = entry.to_dict()
    assert d["normalized_response"] == [1.0, -0.3333, 0.1667]
    assert d["token_norms"] == {"prompt": [2.0, 2.0], "response": [4.0, 4.0, 1.0]}
    zero = ProjectionEntry.build("probe", 1, "unscored", 0.0, [1.5], [], [0.0], [])
    assert zero.normalized_prompt == [1.5] and zero.normalized_response == []
    with pytest.raises(ValueError, match="prompt 2 scores vs 1 norms"):
        ProjectionEntry.build("probe", 1, "unscored", 0.0, [1.0, 2.0], [], [1.0], [])


def test_projection_record_file_layout():
    d = EXAMPLES["ProjectionRecord"].to_dict()
    assert set(d) == {"metadata", "projections"}
    assert d["metadata"]["n_vectors"] == 2
    assert d["metadata"]["multi_vector"] is True
    assert d["metadata"]["score_mode"] == "raw+normalized"
    assert d["metadata"]["prompt_id"] == 3 and d["metadata"]["centered"] is True


def test_steering_run_record_properties_and_line_format():
    run = SteeringRunRecord(
        result=JudgeResult(70.0, 85.0, 5),
        config=ProjectionConfig([VectorSpec(14, "attn_contribution", "response[:5]", "mean_diff", 6.5),
                                 VectorSpec(20, "residual", "response[:5]", "probe", 1.0)]),
        eval_judge="gpt-4.1-mini",
    )
    assert (run.layer, run.coefficient, run.method, run.component) == (14, 6.5, "mean_diff", "attn_contribution")
    d = run.to_dict()
    assert d["type"] == "run" and d["eval"] == {"trait_judge": "gpt-4.1-mini"}
    assert "input_hashes" not in d
    assert d["config"]["vectors"][0]["weight"] == 6.5
    assert run.is_valid() and not run.is_valid(min_coherence=90)
    assert not dataclasses.replace(run, result=JudgeResult(None, 90.0, 0)).is_valid()


def test_steering_results_best_run_is_direction_aware_and_needs_coherence():
    results = SteeringResults(
        header=SteeringHeader(trait="t"),
        baseline=JudgeResult(30.0, 92.0, 5),
        runs=[
            _run(10, 2.0, 55.0, 88.0), _run(12, 3.0, 80.0, 60.0), _run(14, 2.5, 65.0, 77.0), _run(16, 1.0, 10.0, 95.0)
        ],
    )
    best = results.best_run()
    assert (best.layer, best.coefficient) == (14, 2.5)  # layer 12 goes further but is incoherent (60 < 77)
    assert results.delta(best) == pytest.approx(35.0)
    assert results.best_run(min_coherence=50).layer == 12
    assert results.best_run(layer=10).layer == 10
    assert results.best_run(method="gradient") is None
    assert [r.layer for r in results.valid_runs()] == [10, 14, 16]
    negative = dataclasses.replace(results, header=SteeringHeader(trait="t", direction="negative"))
    assert negative.best_run().layer == 16
    assert negative.delta(negative.best_run()) == pytest.approx(-20.0)


def _validity(judge_lo):
    est = {"value": 0.8, "lo": judge_lo, "hi": 0.9}
    return CoherenceValidation(
        model="m", prompt_set="general", seed=0, max_new_tokens=40, layer=15, coefficients={}, n_items={},
        n_questions={}, tune_questions=[], held_out_questions=[], auroc={JUDGE_COHERENCE: est, "nll": est},
        per_kind={}).to_dict()


@pytest.mark.parametrize("validity, threshold", [(_validity(0.6), 77.0), (_validity(0.45), None), ({}, None)])
def test_the_coherence_threshold_applies_only_where_the_judges_coherence_is_shown_valid(validity, threshold):
    header = SteeringHeader(trait="t", selection={"max_kl": 0.5, "min_coherence": 77.0}, coherence_validity=validity)
    runs = [_run(12, 3.0, 80.0, 60.0), _run(14, 2.5, 65.0, 77.0)]
    for run in runs:
        run.judge_free = {"kl": {"value": 0.2, "lo": 0.1, "hi": 0.3}}
    results = SteeringResults(header, JudgeResult(30.0, 92.0, 5), runs)
    assert results.selection_rule() == (threshold, 0.5)
    # the incoherent layer-12 run goes furthest: excluded only when the threshold is validated
    assert results.selected_run().layer == (14 if threshold else 12)
    assert SteeringResults(header=SteeringHeader(trait="t")).delta(results.runs[0]) is None


def test_results_jsonl_save_and_load(tmp_path):
    results = EXAMPLES["SteeringResults"]
    path = tmp_path / "steering" / "results.jsonl"
    results.save(path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["type"] for line in lines] == ["header", "baseline", "run", "run"]
    assert lines[1] == {"type": "baseline", "result": results.baseline.to_dict(), "timestamp": "t0"}
    with path.open("a") as f:  # unknown line types and blank lines are tolerated
        f.write('\n{"type": "note", "text": "hi"}\n')
    assert SteeringResults.load(path) == results


def test_results_jsonl_without_header_is_rejected():
    with pytest.raises(ValueError, match="no .*header.* line"):
        SteeringResults.from_jsonl_lines([{"type": "baseline", "result": JudgeResult.empty().to_dict()}])


def test_steering_header_checks_direction():
    with pytest.raises(ValueError, match="direction must be one of"):
        SteeringHeader(trait="t", direction="up")


@pytest.mark.unchecked_types
def test_from_dict_rejects_non_mappings():
    with pytest.raises(TypeError, match="VectorSpec.from_dict expects a mapping; got list"):
        VectorSpec.from_dict([9, "residual"])


def test_model_config_leaves_out_unset_fields_and_reads_a_loaded_model():
    assert set(EXAMPLES["ModelConfig"].to_dict()) >= {"notes", "vocab_size"}
    assert "sae" not in EXAMPLES["ModelConfig"].to_dict()
    from conftest import cached_tiny

    t = cached_tiny("llama")
    config = ModelConfig.from_model(t.model, variant="it", supports_system_prompt=True, huggingface_id="tiny/llama")
    hf = t.reference.config
    assert config == ModelConfig(
        "tiny/llama", "llama", "it", True, hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads,
        hf.num_key_value_heads, hf.intermediate_size, hf.max_position_embeddings, hf.vocab_size,
    )
    assert ModelConfig.from_model(t.reference, "it", True, "tiny/llama") == config  # an HF model directly


def test_steering_entries_list_every_results_file(tmp_path):
    from tracelens.store import Experiment

    exp = Experiment.named("demo", tmp_path)
    for trait, position in [("mood/happy", "response[:]"), ("mood/sad", "prompt[-1]")]:
        path = exp.steering_results_path(trait, "instruct", position)
        path.parent.mkdir(parents=True)
        path.write_text("")
    assert exp.steering_entries() == [
        SteeringEntry("mood/happy", "instruct", "response_all", "steering",
                      str(exp.steering_results_path("mood/happy", "instruct", "response[:]"))),
        SteeringEntry("mood/sad", "instruct", "prompt_-1", "steering",
                      str(exp.steering_results_path("mood/sad", "instruct", "prompt[-1]"))),
    ]
