"""The coherence validation set: question splits, damages, the clustered AUROC and the stored record."""

import random

import pytest
import torch

from tracelens.datasets.prompt_sets import load_prompt_set
from tracelens.errors import ConfigError
from tracelens.judges.fluency import Fluency
from tracelens.metrics import paired_separation
from tracelens.pipeline import coherence_validation as cv
from tracelens.serving.backends import LocalBackend
from tracelens.store import Experiment
from tracelens.types import CoherenceValidation

GENERAL = [p.text for p in load_prompt_set("general").prompts]


def test_the_held_out_split_shares_no_question_with_the_tune_split_nor_the_steering_questions():
    tune, held_out = cv.split_questions(GENERAL, seed=0)
    assert set(tune).isdisjoint(held_out) and sorted(tune + held_out) == sorted(GENERAL)
    assert (tune, held_out) == cv.split_questions(GENERAL, seed=0) != cv.split_questions(GENERAL, seed=1)
    steering = cv.starter_steering_questions()
    assert len(steering) >= 30 and set(held_out).isdisjoint(steering)
    cv.check_disjoint(GENERAL, steering)
    with pytest.raises(ConfigError, match="disjoint from the steering questions; got 1 shared"):
        cv.check_disjoint(GENERAL, steering + ["  how much water should a healthy adult drink EACH day?"])
    with pytest.raises(ConfigError, match=">= 2 questions"):
        cv.split_questions(["one question"])


def test_text_damages_change_the_text_in_the_named_way():
    answer = "Rice is easy to cook. Add eggs and peas at the end. Season it with soy sauce."
    damaged = cv.text_damages(answer, random.Random(0))
    assert set(damaged) == set(cv.TEXT_DAMAGES)
    assert damaged["truncated"] == "Rice is easy to cook. Add eggs and"
    assert sorted(damaged["shuffled_words"].split()) == sorted(answer.split()) != damaged["shuffled_words"].split()
    sentences = ["Rice is easy to cook.", "Add eggs and peas at the end.", "Season it with soy sauce."]
    assert damaged["shuffled_sentences"] != answer and all(s in damaged["shuffled_sentences"] for s in sentences)
    assert damaged["repeated"] == " ".join(["Rice is easy to cook."] * cv.REPEATS)
    assert "shuffled_sentences" not in cv.text_damages("One sentence only, nothing to reorder", random.Random(0))


def _items(n_questions=12):
    """Per question: one intact answer and two damaged kinds."""
    return [cv.CoherenceItem(f"q{i}", f"r{i}-{kind}", kind == "intact", kind)
            for i in range(n_questions) for kind in ("intact", "a", "b")]


def test_a_signal_that_sees_the_damage_has_a_high_auroc_and_a_constant_one_has_0_5():
    items = _items()
    sees = [1.0 + 0.001 * i if it.intact else 0.001 * i for i, it in enumerate(items)]
    overall, per_kind = cv.signal_validity(items, sees, n_resamples=200)
    assert overall.value == 1.0 and overall.lo > 0.5 and set(per_kind) == {"a", "b"}
    constant, per_kind = cv.signal_validity(items, [3.0] * len(items), n_resamples=200)
    assert (constant.value, constant.lo, constant.hi) == (0.5, 0.5, 0.5)
    half, per_kind = cv.signal_validity(items, [1.0 if it.kind != "b" else 0.0 for it in items], n_resamples=200)
    assert per_kind["a"].value == 0.5 and per_kind["b"].value == 1.0 and half.value == 0.75
    undecided = [None if it.kind == "b" else s for it, s in zip(items, sees)]
    assert set(cv.signal_validity(items, undecided, n_resamples=50)[1]) == {"a"}


def test_the_clustered_auroc_on_paired_items_equals_paired_separation():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(15, generator=g) + 0.5, torch.randn(15, generator=g)
    groups = [f"q{i}" for i in range(15)] * 2
    ours = cv.clustered_auroc(torch.cat([pos, neg]).tolist(), [True] * 15 + [False] * 15, groups, 300, seed=3)
    theirs = paired_separation(pos, neg, 0.0, n_resamples=300, seed=3)["auroc"]
    assert ours.to_dict() == theirs.to_dict()
    with pytest.raises(ConfigError, match="needs intact and damaged items"):
        cv.clustered_auroc([1.0, 2.0], [True, True], ["a", "b"])


def _validation(auroc):
    return CoherenceValidation(
        model="m", prompt_set="general", seed=0, max_new_tokens=40, layer=15, coefficients={"random_steering_1x": 9.5},
        n_items={"tune": {"items": 90, "intact": 12}, "held_out": {"items": 88, "intact": 12}},
        n_questions={"tune": 12, "held_out": 12}, tune_questions=["a"], held_out_questions=["b"], auroc=auroc,
        per_kind={name: {"truncated": est} for name, est in auroc.items()}, sources={"nll": "m"})


def test_the_record_round_trips_and_names_the_signals_shown():
    record = _validation({"nll": {"value": 0.9, "lo": 0.8, "hi": 0.97},
                          "degeneracy": {"value": 0.6, "lo": 0.5, "hi": 0.7}})
    assert record.shown() == ["nll"]
    assert CoherenceValidation.from_dict(record.to_dict()) == record


def test_build_and_measure_on_a_tiny_model(tiny_llama):
    backend = LocalBackend.from_model(tiny_llama.model, use_chat_template=True)
    cset = cv.build_coherence_set(backend, cv.starter_steering_questions(), max_new_tokens=6, layer=1)
    intact = {it.question: it.response for it in cset.items if it.intact}
    assert len(intact) == len(GENERAL) and set(cset.tune).isdisjoint(cset.held_out)
    assert all(it.response != intact[it.question] for it in cset.items if not it.intact)
    assert {it.kind for it in cset.items} <= {"intact", *cset.coefficients, *cv.TEXT_DAMAGES}
    assert list(cset.coefficients) == ["random_steering_0.25x", "random_steering_0.5x", "random_steering_1x"]
    c = list(cset.coefficients.values())
    assert c[0] > 0 and c[1] == pytest.approx(2 * c[0]) and c[2] == pytest.approx(4 * c[0])
    fluency = Fluency(tiny_llama.model, use_chat_template=True)
    nll = cv.nll_signal(backend)(cset.items)  # through the backend: the Fluency judge's NLL, by another path
    assert nll == pytest.approx((-fluency.nll([it.question for it in cset.items],
                                              [it.response for it in cset.items])).tolist(), abs=1e-6)
    record = cv.measure_coherence_validity(cset, {"degeneracy": cv.degeneracy_signal, "nll": cv.nll_signal(backend)},
                                           {"nll": fluency.name}, n_resamples=100)
    held = cset.split("held_out")
    assert record.n_items["held_out"] == {"items": len(held), "intact": len(cset.held_out)}
    assert record.held_out_questions == cset.held_out and set(record.auroc) == {"degeneracy", "nll"}
    kinds = {it.kind for it in held if not it.intact}
    assert all(set(record.per_kind[name]) == kinds for name in record.auroc)
    assert all(0 <= e["lo"] <= e["hi"] <= 1 and 0 <= e["value"] <= 1 for e in record.auroc.values())
    with pytest.raises(ConfigError, match="disjoint"):
        cv.build_coherence_set(backend, GENERAL[:1], max_new_tokens=2)


def test_the_set_is_built_once_per_variant_and_length_and_checked_against_each_traits_questions(tiny_llama,
                                                                                               tmp_path, monkeypatch):
    backend = LocalBackend.from_model(tiny_llama.model, use_chat_template=True)
    exp = Experiment.named("cv", tmp_path)
    assert exp.coherence_set("instruct", "general", 4) is None
    cset = cv.coherence_set(exp, "instruct", backend, cv.starter_steering_questions(), 4)
    assert exp.coherence_set("instruct", "general", 4) == cset and exp.coherence_set("instruct", "general", 5) is None
    monkeypatch.setattr(cv, "build_coherence_set", lambda *a, **k: pytest.fail("the stored set was rebuilt"))
    assert cv.coherence_set(exp, "instruct", backend, ["another trait's question"], 4) == cset
    with pytest.raises(ConfigError, match="disjoint"):
        cv.coherence_set(exp, "instruct", backend, GENERAL[3:4], 4)
