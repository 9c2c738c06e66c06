"""The artifact store (`tracelens.store`): it alone builds paths under an experiment folder, and
every artifact kind round-trips through it as a typed record in the on-disk format the pipeline always wrote."""

import ast
import inspect
import json
from pathlib import Path

import pytest
import torch

import tracelens
import tracelens.store as store
from tracelens.errors import DataError, MissingArtifactError
from tracelens.io import read_jsonl
from tracelens.store import Experiment
from tracelens.pipeline.extraction import load_activation_metadata
from tracelens.types import (
    ActivationMetadata,
    Evaluation,
    EvaluationRow,
    JudgeResult,
    NeutralReference,
    ProjectionConfig,
    ProjectionEntry,
    ProjectionRecord,
    ResponseRecord,
    ResponsesMetadata,
    ScenarioResponse,
    SteeringHeader,
    SteeringRunRecord,
    VectorLayer,
    VectorMetadata,
    Vetting,
)

TRAIT, VARIANT, POS, COMP = "starter/optimism", "base", "response[:]", "residual"
PACKAGE = Path(tracelens.__file__).parent
STORE_FILE = Path(store.__file__)

# --- nobody else builds paths under an experiment ---------------------------------------------------------

# Names the store owns that other modules may still spell for their own, unrelated files.
SHARED_NAMES = {"config.json": "also a Hugging Face model folder's config (model/loading.py, serving/vllm_backend.py)"}


def _path_members() -> set[str]:
    """Members of `Experiment` that give a path in the layout (annotated `-> Path`, `list[Path]`, ...)."""
    names = set()
    for name, member in vars(Experiment).items():
        fn = member.fget if isinstance(member, property) else member
        if callable(fn) and "Path" in str(inspect.signature(fn).return_annotation):
            names.add(name)
    return names


def _store_file_names() -> set[str]:
    """Every file-name literal in the store's source (``metadata.json``, ``results.jsonl``, ...)."""
    tree = ast.parse(STORE_FILE.read_text())
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and n.value[:1].isalnum() and n.value.endswith((".json", ".jsonl", ".safetensors", ".md"))}


def layout_violations(source: str, path_members: set[str], owned_names: set[str]) -> list[str]:
    """Lines of `source` that build or list paths under an experiment folder: a `/` join or a glob /
    iterdir on something an `Experiment` path member returned (directly, through `Path(...)` or through a
    variable assigned from it), or a file-name literal the store owns."""
    tree = ast.parse(source)
    found = []

    def from_store(node, tainted) -> bool:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Path" and node.args:
            return from_store(node.args[0], tainted)
        if isinstance(node, ast.Call):
            node = node.func
        if isinstance(node, ast.Attribute):
            return node.attr in path_members
        return isinstance(node, ast.Name) and node.id in tainted

    for fn in [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))]:
        tainted = {t.id for n in ast.walk(fn) if isinstance(n, ast.Assign) and from_store(n.value, set())
                   for t in n.targets if isinstance(t, ast.Name)}
        for n in ast.walk(fn):
            if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div) and from_store(n.left, tainted):
                found.append(f"line {n.lineno}: joins a name onto an experiment path")
            elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                  and n.func.attr in ("glob", "rglob", "iterdir") and from_store(n.func.value, tainted)):
                found.append(f"line {n.lineno}: lists an experiment folder")
    found += [f"line {n.lineno}: spells the store's file name {n.value!r}" for n in ast.walk(tree)
              if isinstance(n, ast.Constant) and n.value in owned_names]
    return sorted(set(found))


def test_no_module_but_the_store_builds_paths_under_an_experiment():
    members, owned = _path_members(), _store_file_names() - set(SHARED_NAMES)
    assert {"dir", "vectors_dir", "responses_dir", "steering_results_path", "projection_path"} <= members
    assert {"metadata.json", "results.jsonl", "response_scores.json"} <= owned
    bad = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        if file != STORE_FILE and (v := layout_violations(file.read_text(), members, owned)):
            bad[str(file.relative_to(PACKAGE))] = v
    assert not bad, f"paths under an experiment built outside tracelens/store.py: {bad}"


@pytest.mark.parametrize("snippet", [
    'meta = exp.vectors_dir(t, v, p, c, m) / "metadata.json"',  # what selection, monitoring did
    'path = write_report(exp, [t], Path(exp.dir) / "report.md")',  # what the demo did
    'root = exp.vectors_root(t, v, p, c)\nfiles = sorted(root.glob("*"))',  # what selection's listing did
    'def f(exp):\n    d = exp.responses_dir(t, v)\n    return d / name',
    'lines = read_jsonl(folder / "results.jsonl")',  # the store's file name spelled elsewhere
])
def test_the_layout_check_catches_what_the_modules_used_to_do(snippet):
    assert layout_violations(snippet, _path_members(), _store_file_names() - set(SHARED_NAMES))


def test_the_layout_check_leaves_other_folders_alone():
    ok = 'out = Path(args.out)\nwrite_json(out / "report.json", r)\nfor p in DATA_DIR.glob("*.jsonl"): pass'
    assert layout_violations(ok, _path_members(), _store_file_names() - set(SHARED_NAMES)) == []


# --- typed round trips ------------------------------------------------------------------------------------


@pytest.fixture
def exp(tmp_path):
    e = Experiment.named("store", tmp_path)
    e.write_config({VARIANT: {"model": "tiny"}}, {"extraction": VARIANT})
    return e


def _json(path: Path):
    return json.loads(path.read_text())


def test_responses_and_vetting_round_trip_in_the_stored_format(exp):
    pos = [ScenarioResponse("q1", "be sunny", "yes!", [1, 2], [3]), ScenarioResponse("q2", None, "ok", [4], [5, 6])]
    neg = [ScenarioResponse("q1", "be gloomy", "no.", [1, 7], [8]), ScenarioResponse("q2", None, "meh", [4], [9])]
    meta = ResponsesMetadata(model="tiny", trait=TRAIT, max_new_tokens=3, temperature=0.0, chat_template=None,
                             input_hashes={"scenarios": "abc"}, input_hash="h1")
    exp.write_responses(TRAIT, VARIANT, pos, neg, meta)
    assert exp.responses(TRAIT, VARIANT) == (pos, neg) and exp.responses_metadata(TRAIT, VARIANT) == meta
    assert _json(exp.responses_dir(TRAIT, VARIANT) / "pos.json")[0] == {
        "prompt": "q1", "system_prompt": "be sunny", "response": "yes!", "prompt_token_ids": [1, 2],
        "response_token_ids": [3]}
    vetting = Vetting([{"idx": 0, "polarity": "pos", "score": 90.0}], {"pos": 60.0, "neg": 40.0}, [0], [1],
                      {"n_pairs": 2, "n_kept": 1}, "h2")
    exp.write_vetting(TRAIT, VARIANT, vetting)
    assert exp.vetting(TRAIT, VARIANT) == vetting
    assert list(_json(exp.vetting_path(TRAIT, VARIANT))) == ["results", "thresholds", "kept_indices",
                                                             "failed_indices", "summary", "input_hash"]
    with pytest.raises(MissingArtifactError, match="run `tracelens extract` first"):
        exp.responses(TRAIT, "other")


def test_activations_and_their_metadata_round_trip(exp):
    g = torch.Generator().manual_seed(0)
    tensors = {s: torch.randn(4, 2, 8, generator=g).to(torch.float16) for s in ("train", "select", "test")}
    meta = ActivationMetadata(n_layers=2, hidden_dim=8, captured_layers=[0, 1], activation_norms={0: 1.5, 1: 2.5},
                              n_examples_pos=2, n_examples_neg=2, model="tiny", position=POS, dtype="float16",
                              splits={"train": [0, 1], "select": [2, 3], "test": [4, 5]}, split_fractions=[0.6, 0.2, 0.2],
                              split_seed=0, input_hash="h")
    exp.write_activations(TRAIT, VARIANT, meta, tensors)
    assert exp.activation_metadata(TRAIT, VARIANT, POS, COMP) == meta
    assert load_activation_metadata(exp, TRAIT, VARIANT) == meta  # the seed's name, by experiment object
    on_disk = _json(exp.activations_dir(TRAIT, VARIANT, POS, COMP) / "metadata.json")
    assert list(on_disk)[-5:] == ["dtype", "splits", "split_fractions", "split_seed", "input_hash"]
    assert on_disk["activation_norms"] == {"0": 1.5, "1": 2.5}
    pos, neg = exp.activations(TRAIT, VARIANT, POS, COMP, "test")
    assert pos.dtype == torch.float32 and torch.equal(torch.cat([pos, neg]), tensors["test"].float())
    with pytest.raises(ValueError, match="split must be one of"):
        exp.activations(TRAIT, VARIANT, POS, COMP, "val")


def test_vectors_round_trip_with_their_thresholds_and_are_listed_by_method_and_layer(exp):
    vectors = {0: torch.eye(8)[0], 10: torch.eye(8)[1], 2: torch.eye(8)[2]}
    meta = VectorMetadata(model="tiny", trait=TRAIT, method="probe", component=COMP, position=POS, input_hash="h",
                          layers={l: VectorLayer(norm=1.0, baseline=0.25 * l, train_acc=0.9 if l else None)
                                  for l in vectors})
    exp.write_vectors(TRAIT, VARIANT, meta, vectors)
    exp.write_vectors(TRAIT, VARIANT, VectorMetadata(method="mean_diff", position=POS, layers={
        3: VectorLayer(1.0, 0.0)}), {3: torch.eye(8)[3]})
    assert exp.vector_metadata(TRAIT, VARIANT, POS, COMP, "probe") == meta
    assert exp.vector_metadata(TRAIT, VARIANT, POS, COMP, "probe").threshold(10) == 2.5
    with pytest.raises(KeyError, match="stored layers: \\[0, 2, 10\\]"):
        meta.threshold(5)
    assert torch.equal(exp.vector(TRAIT, VARIANT, POS, COMP, "probe", 10), torch.eye(8)[1])
    # numeric layer order, not file-name order (layer10 sorts before layer2 as text)
    assert exp.stored_vectors(TRAIT, VARIANT, POS, COMP) == {"mean_diff": [3], "probe": [0, 2, 10]}
    layers = _json(exp.vectors_dir(TRAIT, VARIANT, POS, COMP, "probe") / "metadata.json")["layers"]
    assert layers["0"] == {"norm": 1.0, "baseline": 0.0} and layers["2"] == {"norm": 1.0, "baseline": 0.5,
                                                                               "train_acc": 0.9}


def _evaluation(position=POS, component=COMP) -> Evaluation:
    est = {"value": 0.8, "lo": 0.7, "hi": 0.9}
    rows = [EvaluationRow(m, l, 0.1 * l, {"auroc": 0.5 + 0.1 * l, "accuracy": 0.6, "effect_size": 1.0},
                          {"auroc": est, "accuracy": est, "effect_size": est}, l == 1)
            for m in ("probe", "random_baseline") for l in (0, 1)]
    band = {"auroc": {"lo": 0.4, "median": 0.5, "hi": 0.6}, "accuracy": {"lo": 0.4, "median": 0.5, "hi": 0.6}}
    return Evaluation(TRAIT, position, component, {"train": 6, "select": 2, "test": 2},
                      {"n_resamples": 1000, "level": 0.95, "unit": "test question", "seed": 0},
                      {"n_directions": 20, "percentiles": [5.0, 95.0], "layers": {"0": band, "1": band}}, rows,
                      {"method": "probe", "layer": 1, "by": "select auroc"}, "h")


def test_evaluations_round_trip_and_are_found_whatever_their_position(exp):
    first, second = _evaluation(), _evaluation("response[:5]", "attn_out")
    exp.write_evaluation(TRAIT, VARIANT, first)
    exp.write_evaluation(TRAIT, VARIANT, second)
    assert exp.evaluation(TRAIT, VARIANT, POS, COMP) == first
    assert first.selected_row is first.row("probe", 1) and first.selected_row.above_chance
    assert {(e.position, e.component) for e in exp.evaluations(TRAIT, VARIANT)} == {(POS, COMP),
                                                                                   ("response[:5]", "attn_out")}
    on_disk = _json(exp.evaluation_path(TRAIT, VARIANT, POS, COMP))
    assert list(on_disk) == ["trait", "position", "component", "splits", "bootstrap", "chance", "results",
                             "selected", "input_hash", "command"]
    assert list(on_disk["results"][0]) == ["method", "layer", "threshold", "select", "test", "above_chance"]
    assert exp.traits("evaluation", VARIANT) == [TRAIT] and exp.traits("evaluation", "other") == []


def test_steering_results_append_survive_a_torn_line_and_set_aside(exp):
    at = (TRAIT, VARIANT, POS)
    assert exp.steering_results(*at) is None
    header = SteeringHeader(trait=TRAIT, direction="negative", vector_source={"method": "probe"}, n_questions=2)
    run = SteeringRunRecord(JudgeResult(trait_mean=30.0, coherence_mean=85.0, n=2),
                            ProjectionConfig.single(1, COMP, POS, "probe", weight=-2.0), eval_judge="fixed")
    exp.append_steering(*at, header)
    exp.append_steering(*at, {"type": "baseline", "result": JudgeResult(trait_mean=50.0, coherence_mean=None, n=2).to_dict()})
    path = exp.steering_results_path(*at)
    path.write_bytes(path.read_bytes() + b'{"type": "run", "res')  # a writer killed mid-line
    exp.append_steering(*at, run)
    results = exp.steering_results(*at)
    assert results.header == header and results.baseline.trait_mean == 50.0 and results.runs == [run]
    assert [l["type"] for l in read_jsonl(path)] == ["header", "baseline", "run"]
    assert len(list(path.parent.glob("results.torn-*.jsonl"))) == 1  # the fragment kept aside
    assert exp.all_steering_results(TRAIT, VARIANT) == {"response_all": results}
    assert exp.traits("steering_results", VARIANT) == [TRAIT] == exp.traits("steering", VARIANT)
    aside = exp.set_aside_steering_results(*at)
    assert aside.name.startswith("results.stale-") and exp.steering_results(*at) is None
    path.write_text('{"type": "note"}\n')
    with pytest.raises(DataError, match="no .*header"):
        exp.steering_results(*at)


def test_neutral_reference_round_trips(exp):
    assert exp.neutral_reference(VARIANT, 8) is None
    ref = NeutralReference("tiny", ["hi"], [[1, 2]], [[3]])
    exp.write_neutral_reference(VARIANT, 8, ref)
    assert exp.neutral_reference(VARIANT, 8) == ref and exp.neutral_reference(VARIANT, 9) is None
    assert _json(exp.neutral_reference_path(VARIANT, 8)) == {"model": "tiny", "prompts": ["hi"],
                                                             "prompt_token_ids": [[1, 2]], "response_token_ids": [[3]]}


def test_monitoring_records_round_trip_and_are_listed(exp):
    rec = ResponseRecord("hi", "yo", ["h", "i", "y"], [1, 2, 3], 2, inference_model="tiny")
    for prompt_id in (10, 2, "b"):
        exp.write_response_record(VARIANT, "harmless", prompt_id, rec)
    assert exp.response_record(VARIANT, "harmless", 2) == rec and exp.has_response_record(VARIANT, "harmless", "b")
    assert exp.prompt_sets(VARIANT) == ["harmless"] and exp.prompt_ids(VARIANT, "harmless") == ["2", "10", "b"]
    assert exp.inference_variants() == [VARIANT]
    with pytest.raises(MissingArtifactError, match="no responses for prompt set 'other'"):
        exp.prompt_ids(VARIANT, "other")
    entry = ProjectionEntry.build("probe", 1, "evaluation", 0.5, [1.0, 2.0], [3.0], [2.0, 2.0], [4.0])
    massive = {"dims": {"1": [3]}, "prompt": {}, "response": {}, "vector": {}}
    proj = ProjectionRecord(2, "harmless", 2, 1, [entry], position=POS, massive_dim_data=massive)
    assert not exp.has_projection(VARIANT, TRAIT, "harmless", 2)
    exp.write_projection(VARIANT, TRAIT, proj)
    assert exp.projection(VARIANT, TRAIT, "harmless", 2) == proj
    assert list(_json(exp.projection_path(VARIANT, TRAIT, "harmless", 2))) == ["metadata", "projections",
                                                                                 "massive_dim_data"]
    assert exp.traits("projections", VARIANT) == [TRAIT]
    assert exp.massive_activations(VARIANT) is None
    exp.write_massive_activations(VARIANT, "neutral", {"aggregate": {}})
    assert exp.massive_activations(VARIANT, "neutral") == {"aggregate": {}}
    exp.remove_massive_activations(VARIANT, "neutral")
    assert exp.massive_activations(VARIANT, "neutral") is None


def test_stage_metadata_vouches_only_for_the_current_input_hash(exp):
    meta = ResponsesMetadata(model="tiny", input_hash="h1")
    exp.write_responses(TRAIT, VARIANT, [], [], meta)
    assert exp.stage_current("responses", "h1", False, TRAIT, VARIANT)
    assert not exp.stage_current("responses", "h1", True, TRAIT, VARIANT)  # force: redo, metadata gone
    assert not (exp.responses_dir(TRAIT, VARIANT) / "metadata.json").exists()
    with pytest.raises(ValueError, match="stage must be one of"):
        exp.stage_current("fitting", "h", False, TRAIT, VARIANT)
    with pytest.raises(ValueError, match="needs a position, a component and a method"):
        exp.stage_current("vectors", "h", False, TRAIT, VARIANT, POS, COMP)


# --- config.json: read once, re-read after a write ---------------------------------------------------------


def test_config_is_read_once_and_reread_after_a_write_or_an_edit(exp, monkeypatch):
    reads = []
    real = store._load_config
    monkeypatch.setattr(store, "_load_config", lambda path: reads.append(path) or real(path))
    fresh = Experiment.named(exp.name, exp.root)
    for _ in range(3):
        assert store.get_model_variant(fresh).name == VARIANT
    assert len(reads) == 1
    fresh.config()["model_variants"].clear()  # callers get a copy: the cache is not theirs to change
    assert fresh.config()["model_variants"] and len(reads) == 1
    fresh.write_config({"chat": {"model": "tiny"}})
    assert store.get_model_variant(fresh).name == "chat" and len(reads) == 2
    exp.write_config({"other": {"model": "tiny"}, "x": {"model": "tiny"}})  # another process edits the file
    assert store.get_model_variant(fresh).name == "other" and len(reads) == 3
