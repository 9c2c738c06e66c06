"""Massive-dim calibration: budget, prefill only, real tokens only, resume; candidate dims and cleaning by hand."""

import pytest
import torch
from conftest import _active_hooks

from tracelens import get_hook_path
from tracelens.model.generation import HookedGenerator
from tracelens.model.hooks import CaptureHook
from tracelens.io import read_json
from tracelens.model.massive import MassiveDimCollector, aggregate, candidate_dims
from tracelens.model.prompts import tokenize_batch

TEXTS = ["The capital of France is Paris.", "I am so happy today!", "What is the best way to learn?"] * 4


def _feed(t, texts, collector):
    for text in texts:
        ids, mask = tokenize_batch(t.tokenizer, [text])
        with torch.no_grad():
            t.model(ids, attention_mask=mask)


def test_calibration_stops_at_its_budget_and_removes_its_hooks(tiny, tmp_path):
    c = MassiveDimCollector(tiny.model, tmp_path / "calibration.json", target_tokens=30)
    c.register()
    c.register()  # idempotent
    _feed(tiny, TEXTS, c)
    seen = c.tokens_seen
    longest = max(len(tiny.tokenizer(x).input_ids) for x in TEXTS)
    assert 30 <= seen < 30 + longest  # stops after the pass that crosses the budget
    sums = c.sums.clone()
    _feed(tiny, TEXTS[:2], c)
    assert torch.equal(c.sums, sums) and c.tokens_seen == seen
    assert c.finalize() is None  # under 100 tokens: nothing written
    assert not (tmp_path / "calibration.json").exists()
    assert _active_hooks(tiny.model) == []


def test_decode_steps_and_pad_tokens_are_ignored_and_sums_are_exact(tiny, tmp_path):
    c = MassiveDimCollector(tiny.model, tmp_path / "c.json", target_tokens=10_000)
    c.register()
    ids, mask = tokenize_batch(tiny.tokenizer, TEXTS[:2])
    with CaptureHook(tiny.model, get_hook_path(1)) as cap:
        HookedGenerator(tiny.model).generate(ids, mask, 5, stop_at_eos=False)
    c.finalize()
    assert c.tokens_seen == int(mask.sum())  # the prompt tokens of the prefill, nothing from decode steps
    prefill = cap.get(concat=False)[0]
    assert torch.allclose(c.sums[1], prefill[mask.bool()].double().sum(0), atol=1e-6)


def test_finalize_writes_and_a_new_collector_resumes(tiny, tmp_path):
    path = tmp_path / "calibration.json"
    c = MassiveDimCollector(tiny.model, path, target_tokens=100_000, info={"experiment": "x"})
    c.register()
    _feed(tiny, TEXTS * 2, c)
    report = c.finalize()
    assert report is not None and read_json(path)["aggregate"]["tokens_seen"] == c.tokens_seen >= 100
    assert report["experiment"] == "x" and report["is_calibration"] and report["source"] == "inference_passive"
    resumed = MassiveDimCollector(tiny.model, path, target_tokens=100_000)
    assert resumed.tokens_seen == c.tokens_seen and torch.equal(resumed.sums, c.sums)
    assert MassiveDimCollector(tiny.model, path, target_tokens=100).should_skip()


def test_aggregate_by_hand():
    # 2 layers, d=3, 2 tokens: layer 0 tokens (10,1,0),(10,-1,0); layer 1 tokens (0,0,4),(0,2,4)
    sums = torch.tensor([[20.0, 0.0, 0.0], [0.0, 2.0, 8.0]], dtype=torch.float64)
    units = torch.tensor([[2 * 10 / 101**0.5, 0, 0], [0, 2 / 20**0.5, 1 + 4 / 20**0.5]], dtype=torch.float64)
    norms = torch.tensor([2 * 101**0.5, 4 + 20**0.5], dtype=torch.float64)
    agg = aggregate(sums, units, norms, tokens=2, n_prompts=1, top_k=1)
    assert agg["top_dims_by_layer"] == {"0": [0], "1": [2]}
    # layer 0 mean |.| = (10,0,0): dim 0 is 10 / mean(10,0,0) = 3.0x
    assert agg["dim_magnitude_by_layer"]["0"] == [3.0, 0.0]
    assert agg["layer_norms"] == [round(101**0.5, 3), round((4 + 20**0.5) / 2, 3)]
    assert agg["mean_alignment_by_layer"][0] == round(10 / 101**0.5, 4)  # each token's cosine to (1,0,0)


def test_candidate_dims_by_hand():
    cal = {"aggregate": {"top_dims_by_layer": {"0": [7, 1, 2, 3, 4], "1": [7, 1, 9, 8, 6], "2": [7, 5, 9, 11, 12],
                                                "3": [1, 13, 14, 15, 16]}}}
    assert candidate_dims(cal, "top5-3layers") == [1, 7]  # 7 at layers 0,1,2; 1 at 0,1,3
    assert candidate_dims(cal, "all") == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16]
    assert candidate_dims(cal, "none") == []
    with pytest.raises(ValueError, match="unknown clean mode 'some'"):
        candidate_dims(cal, "some")
