"""The adapter contract, run over every adapter class (every concrete subclass of `tracelens.model.hooks.HookAdapter`).

Each adapter: leaves no hook behind when its block raises; nests and unwinds innermost first; at its neutral
setting (strength 0, a floor below every activation; any setting of a read) is the identity, to the bit, while
its active setting changes the logits (an edit) or not (a read); gives the same logits and records under
`model(...)`, `run_with_hooks(fwd_hooks=adapter.fwd_hooks())` (or refuses it, when it reads token positions),
`run_with_cache` and `HookedGenerator` (cached equal to uncached); and its reads run after the edits at its
sites whatever the entry order. Hand-computed oracles for each edit live in test_hooks.py.
"""

import contextlib
import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import tracelens
from conftest import _active_hooks, cached_tiny, encode
from tracelens import get_hook_path
from tracelens.model.conditional import ConditionalSteering
from tracelens.model.generation import CaptureConfig, HookedGenerator, StepCapture
from tracelens.model.hooks import (
    READ,
    AblationHook,
    ActivationCappingHook,
    CaptureHook,
    HookAdapter,
    MultiLayerAblation,
    MultiLayerActivationCapping,
    MultiLayerCapture,
    MultiLayerProjection,
    MultiLayerSteering,
    PerPositionSteeringHook,
    PerSampleSteering,
    ProjectionHook,
    SteeringHook,
)
from tracelens.model.massive import MassiveDimCollector

TEXTS = ["The capital of France is Paris.", "I am so happy today!", "What is the best way to learn?"]
STEPS = 3


def _vec(model, seed: int) -> torch.Tensor:
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


@dataclass
class Case:
    """How to build an adapter: `make(model, tmp)` at an active setting, `neutral(model, tmp)` at its
    identity setting (None: the adapter has none), `recorded(adapter)` what it accumulated."""

    make: Callable
    neutral: Callable | None
    recorded: Callable = lambda a: {}


def _steer_configs(model, coefs):
    v, w, n = _vec(model, 1), _vec(model, 2), model.cfg.n_layers
    return [(0, v, coefs[0]), (n - 1, w, coefs[1], "attn_contribution")]


def _sample_configs(model, coefs):
    return [(0, _vec(model, 1), coefs[0], (0, 1)), (1, _vec(model, 2), coefs[1], (1, 3))]


def _seq(parts: list[torch.Tensor]) -> torch.Tensor:
    """One record per forward call joined on the position dim (one call: as recorded; generation: every step)."""
    return torch.cat(parts, dim=1)


def _projection(a):
    return {"scores": _seq(a.get(concat=False)), "norms": _seq(a.get_norms(concat=False))}


def _multi_projection(a):
    return {f"{kind}{l}": _seq(get(l, concat=False)) for l in a.parts for kind, get in (("s", a.get), ("n", a.get_norms))}


CASES = {
    CaptureHook: Case(lambda m, _: CaptureHook(m, get_hook_path(0)), None, lambda a: {"acts": _seq(a.get(concat=False))}),
    MultiLayerCapture: Case(lambda m, _: MultiLayerCapture(m), None,
                            lambda a: {str(l): _seq(a.get(l, concat=False)) for l in a.parts}),
    ProjectionHook: Case(lambda m, _: ProjectionHook(m, torch.stack([_vec(m, 1), _vec(m, 2)]), get_hook_path(1)), None,
                         _projection),
    MultiLayerProjection: Case(lambda m, _: MultiLayerProjection(m, {l: _vec(m, l) for l in range(m.cfg.n_layers)}),
                               None, _multi_projection),
    StepCapture: Case(lambda m, _: StepCapture(m, CaptureConfig(components=("residual", "attn_out"))), None,
                      lambda a: {f"{l}{c}": x for l, comps in a.last.items() for c, x in comps.items()}),
    MassiveDimCollector: Case(lambda m, tmp: MassiveDimCollector(m, tmp / "calibration.json", target_tokens=10**6),
                              None, lambda a: {"sums": a.sums, "norms": a.norm_sums}),
    SteeringHook: Case(lambda m, _: SteeringHook(m, _vec(m, 1), get_hook_path(0), 3.0),
                       lambda m, _: SteeringHook(m, _vec(m, 1), get_hook_path(0), 0.0)),
    MultiLayerSteering: Case(lambda m, _: MultiLayerSteering(m, _steer_configs(m, (2.0, -1.0))),
                             lambda m, _: MultiLayerSteering(m, _steer_configs(m, (0.0, 0.0)))),
    PerPositionSteeringHook: Case(
        lambda m, _: PerPositionSteeringHook(m, _vec(m, 1), get_hook_path(0), 3.0, token_range=(2, None)),
        lambda m, _: PerPositionSteeringHook(m, _vec(m, 1), get_hook_path(0), 0.0, token_range=(2, None))),
    PerSampleSteering: Case(lambda m, _: PerSampleSteering(m, _sample_configs(m, (2.0, -3.0))),
                            lambda m, _: PerSampleSteering(m, _sample_configs(m, (0.0, 0.0)))),
    ConditionalSteering: Case(
        lambda m, _: ConditionalSteering(m, _vec(m, 1), 1, _vec(m, 2), 0, threshold=-1e4, coefficient=4.0),
        lambda m, _: ConditionalSteering(m, _vec(m, 1), 1, _vec(m, 2), 0, threshold=-1e4, coefficient=0.0),
        lambda a: {"scores": a.scores}),
    AblationHook: Case(lambda m, _: AblationHook(m, _vec(m, 1), get_hook_path(0)), None),
    MultiLayerAblation: Case(lambda m, _: MultiLayerAblation(m, _vec(m, 1)), None),
    ActivationCappingHook: Case(lambda m, _: ActivationCappingHook(m, _vec(m, 1), get_hook_path(0), threshold=0.5),
                                lambda m, _: ActivationCappingHook(m, _vec(m, 1), get_hook_path(0), threshold=-1e4)),
    MultiLayerActivationCapping: Case(
        lambda m, _: MultiLayerActivationCapping(m, {0: _vec(m, 1), -1: _vec(m, 2)}, {0: 0.5, -1: -0.5}),
        lambda m, _: MultiLayerActivationCapping(m, {0: _vec(m, 1), -1: _vec(m, 2)}, {0: -1e4, -1: -1e4})),
}
NAMES = {cls.__name__: cls for cls in CASES}
# Removing a direction has no strength to set to 0; ablation is checked against hand-written edits instead.
WITHOUT_NEUTRAL_EDIT = {AblationHook, MultiLayerAblation}


def _adapter_classes() -> set[type]:
    """Every HookAdapter subclass defined anywhere in tracelens, less the bases: abstract classes and private
    classes that other adapters derive from (`_Composite`, `_PerLayer`)."""
    for info in pkgutil.walk_packages(tracelens.__path__, "tracelens."):
        importlib.import_module(info.name)
    found, todo = set(), [HookAdapter]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found and sub.__module__.startswith("tracelens."):
                found.add(sub)
                todo.append(sub)
    return {cls for cls in found if not inspect.isabstract(cls)
            and not (cls.__name__.startswith("_") and cls.__subclasses__())}


def _reads(cls) -> bool:
    return cls.phase == READ


def _positional(adapter) -> bool:
    return adapter.positions is not None


@pytest.fixture(params=["llama", "gemma2"])
def t(request):
    t = cached_tiny(request.param)
    yield t
    assert not _active_hooks(t.model), "a test left hooks on the model"


@pytest.fixture
def batch(t):
    return encode(t.tokenizer, TEXTS)


def _forward(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask)


def _hook_counts(model) -> dict[str, int]:
    counts = {name: len(hp.fwd_hooks) for name, hp in model.hook_dict.items() if hp.fwd_hooks}
    return {**counts, "pre-hooks": len(model.original_model._forward_pre_hooks)}


def _assert_equal_records(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_battery_covers_every_adapter_class():
    assert _adapter_classes() == set(CASES)
    assert {cls for cls, case in CASES.items() if case.neutral is None and not _reads(cls)} == WITHOUT_NEUTRAL_EDIT


@pytest.mark.parametrize("name", NAMES)
def test_hooks_are_removed_when_the_block_raises(t, batch, tmp_path, name):
    adapter = CASES[NAMES[name]].make(t.model, tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with adapter:
            _forward(t.model, *batch)
            assert _active_hooks(t.model)
            raise RuntimeError("boom")
    assert _active_hooks(t.model) == [] and not adapter.active


@pytest.mark.parametrize("name", NAMES)
def test_adapters_nest_and_unwind_innermost_first(t, batch, tmp_path, name):
    case = CASES[NAMES[name]]
    outer, inner = case.make(t.model, tmp_path / "outer"), case.make(t.model, tmp_path / "inner")
    with outer:
        alone = _forward(t.model, *batch)
        counts = _hook_counts(t.model)
        with inner:
            doubled = _hook_counts(t.model)
            assert doubled == {k: 2 * v for k, v in counts.items()}
            _forward(t.model, *batch)
        assert _hook_counts(t.model) == counts
        assert torch.equal(_forward(t.model, *batch), alone)
    assert _active_hooks(t.model) == []


@pytest.mark.parametrize("name", NAMES)
def test_the_neutral_setting_is_the_identity_to_the_bit_and_the_active_setting_is_not(t, batch, tmp_path, name):
    cls = NAMES[name]
    case = CASES[cls]
    plain = _forward(t.model, *batch)
    with case.make(t.model, tmp_path / "active"):
        active = _forward(t.model, *batch)
    assert torch.equal(active, plain) == _reads(cls), "an edit must change the logits, a read must not"
    if case.neutral is not None:
        with case.neutral(t.model, tmp_path / "neutral"):
            assert torch.equal(_forward(t.model, *batch), plain)


def _managed(t, batch, tmp_path, case):
    """Logits and records of one forward under the `with` form: the reference for the other entry points."""
    with case.make(t.model, tmp_path / "managed") as adapter:
        logits = _forward(t.model, *batch)
    return logits, case.recorded(adapter)


@pytest.mark.parametrize("name", NAMES)
def test_run_with_hooks_equals_the_with_form_or_refuses_position_readers(t, batch, tmp_path, name):
    case = CASES[NAMES[name]]
    logits, records = _managed(t, batch, tmp_path, case)
    listed = case.make(t.model, tmp_path / "listed")
    ids, mask = batch
    if _positional(listed):
        with pytest.raises(TypeError, match="reads token positions .* use it as a context manager"):
            listed.fwd_hooks()
        return
    with torch.no_grad():
        got = t.model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=listed.fwd_hooks())
    assert torch.equal(got, logits)
    _assert_equal_records(case.recorded(listed), records)


@pytest.mark.parametrize("name", NAMES)
def test_run_with_cache_equals_the_with_form_and_caches_the_edited_activation(t, batch, tmp_path, name):
    case = CASES[NAMES[name]]
    logits, records = _managed(t, batch, tmp_path, case)
    ids, mask = batch
    with case.make(t.model, tmp_path / "cached") as adapter, CaptureHook(t.model, get_hook_path(1)) as seen:
        with torch.no_grad():
            got, cache = t.model.run_with_cache(ids, attention_mask=mask, names_filter=get_hook_path(1))
    assert torch.equal(got, logits)
    _assert_equal_records(case.recorded(adapter), records)
    assert torch.equal(cache[get_hook_path(1)], seen.get())


@pytest.mark.parametrize("name", NAMES)
def test_generation_under_the_adapter_is_cached_equal_to_uncached(t, batch, tmp_path, name):
    cls = NAMES[name]
    case = CASES[cls]
    ids, mask = batch
    gen = HookedGenerator(t.model)
    plain = gen.generate(ids, mask, STEPS, stop_at_eos=False, output_logits=True)
    runs = {}
    for cached in (True, False):
        with case.make(t.model, tmp_path / str(cached)) as adapter:
            runs[cached] = gen.generate(ids, mask, STEPS, stop_at_eos=False, output_logits=True, use_cache=cached)
        records = case.recorded(adapter)
        assert all(bool((v != 0).any()) for v in records.values()) and (records or not _reads(cls)), \
            "a read must have recorded something"
    for cached_row, uncached_row, plain_row in zip(runs[True], runs[False], plain):
        assert cached_row.token_ids == uncached_row.token_ids
        assert (cached_row.logits - uncached_row.logits).abs().max() <= 1e-4
    changed = any(not torch.equal(r.logits, p.logits) for r, p in zip(runs[True], plain))
    assert changed != _reads(cls), "an edit must change the step logits, a read must not"


def _sites(adapter) -> list[str]:
    return sorted({name for name, _ in adapter._grouped()})


@pytest.mark.parametrize("name", NAMES)
def test_reads_run_after_edits_at_a_site_whatever_the_entry_order(t, batch, tmp_path, name):
    """A read entered before an edit at the same site sees the edited activation, as one entered after it does;
    for an edit the read is a capture at each of its sites, for a read the edit is a steering at each of its."""
    cls = NAMES[name]
    case = CASES[cls]
    m = t.model

    def pair(tag):
        adapter = case.make(m, tmp_path / tag)
        if _reads(cls):
            partners = [SteeringHook(m, _vec(m, 7), site, 5.0) for site in _sites(adapter)]
            return adapter, partners, lambda: case.recorded(adapter)
        captures = [CaptureHook(m, site) for site in _sites(adapter)]
        return adapter, captures, lambda: {str(i): c.get() for i, c in enumerate(captures)}

    def run(read_first: bool, tag: str) -> dict:
        adapter, partners, recorded = pair(tag)
        reads, edits = ([adapter], partners) if _reads(cls) else (partners, [adapter])
        first, second = (reads, edits) if read_first else (edits, reads)
        with contextlib.ExitStack() as stack:
            for a in first + second:
                stack.enter_context(a)
            _forward(m, *batch)
        return recorded()

    before, after = run(True, "read-first"), run(False, "edit-first")
    _assert_equal_records(before, after)
    adapter, partners, recorded = pair("listed")
    if not any(_positional(a) for a in [adapter, *partners]):  # the fwd_hooks path, reads listed first
        reads, edits = ([adapter], partners) if _reads(cls) else (partners, [adapter])
        with torch.no_grad():
            m.run_with_hooks(batch[0], attention_mask=batch[1],
                             fwd_hooks=[hook for a in reads + edits for hook in a.fwd_hooks()])
        _assert_equal_records(recorded(), after)
    unedited = _records_without_edits(case, cls, m, batch, tmp_path)
    assert any(not torch.equal(after[k], unedited[k]) for k in after), "the edit must change what is read"


def _records_without_edits(case, cls, m, batch, tmp_path) -> dict:
    adapter = case.make(m, tmp_path / "unedited")
    captures = [] if _reads(cls) else [CaptureHook(m, site) for site in _sites(adapter)]
    with contextlib.ExitStack() as stack:
        for a in [adapter] if _reads(cls) else captures:
            stack.enter_context(a)
        _forward(m, *batch)
    return case.recorded(adapter) if _reads(cls) else {str(i): c.get() for i, c in enumerate(captures)}

