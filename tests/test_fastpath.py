"""The decode fast path (`tracelens.model.fastpath`) equals the reference path (the whole TransformerLens bridge,
`HookedGenerator(fast_path=False)`) to the bit, on every tested architecture under eager and SDPA attention:
tokens, step logits, captured activations, steering, capping, and every hook call (name and tensor)."""

import pytest
import torch
from transformer_lens.hook_points import HookPoint

from tracelens import ActivationCappingHook, get_hook_path
from tracelens.model.fastpath import fast_path
from tracelens.model.generation import CaptureConfig, HookedGenerator, SteeringConfig
from tracelens.model.prompts import tokenize_batch

PROMPTS = ["The capital of France is Paris.", "I am happy"]
STEPS = 5


def _unit(d, seed):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def _both(model, ids, mask, use_cache=True, **kwargs):
    """(reference, fast) outputs of the same greedy generation."""
    return [HookedGenerator(model, fast_path=fast).generate(ids, mask, STEPS, stop_at_eos=False, output_logits=True,
                                                            use_cache=use_cache, **kwargs)
            for fast in (False, True)]


def _assert_identical(reference, fast):
    for ref, got in zip(reference, fast, strict=True):
        assert got.token_ids == ref.token_ids
        assert torch.equal(got.logits, ref.logits)
        assert got.activations.keys() == ref.activations.keys()
        for layer, comps in ref.activations.items():
            for component, act in comps.items():
                assert torch.equal(got.activations[layer][component], act), (layer, component)


def _requests(model):
    d, last = model.cfg.d_model, model.cfg.n_layers - 1
    return {
        "plain": {},
        "steer residual": {"steering": [SteeringConfig(vector=_unit(d, 1), layer=0, coefficient=3.0)]},
        "steer response + capture": {
            "steering": [SteeringConfig(vector=_unit(d, 2), layer=last, coefficient=3.0, positions="response")],
            "capture": CaptureConfig([0, last], ["residual", "attn_contribution", "mlp_out"]),
        },
        "steer attention, some rows": {
            "steering": [SteeringConfig(vector=_unit(d, 3), layer=0, component="attn_contribution", coefficient=2.0, rows=(1, 2))],
            "capture": CaptureConfig([last]),
        },
    }


@pytest.mark.parametrize("request_name", ["plain", "steer residual", "steer response + capture",
                                          "steer attention, some rows"])
def test_fast_path_generation_equals_the_bridge_to_the_bit(tiny_sharp_each_attn, request_name):
    t = tiny_sharp_each_attn
    ids, mask = tokenize_batch(t.tokenizer, PROMPTS)
    assert (mask == 0).any(), "a left-padded batch"
    _assert_identical(*_both(t.model, ids, mask, **_requests(t.model)[request_name]))


def test_fast_path_uncached_and_capped_equals_the_bridge_to_the_bit(tiny_sharp_each_attn):
    t = tiny_sharp_each_attn
    ids, mask = tokenize_batch(t.tokenizer, PROMPTS[:1])
    steer = [SteeringConfig(vector=_unit(t.model.cfg.d_model, 4), layer=1, coefficient=2.0)]
    _assert_identical(*_both(t.model, ids, mask, use_cache=False, steering=steer))
    cap = ActivationCappingHook(t.model, _unit(t.model.cfg.d_model, 5), get_hook_path(0, "mlp_contribution"), 0.5)
    with cap:  # a hook registered outside the generator
        reference, fast = _both(t.model, ids, mask, steering=steer, capture=CaptureConfig([0]))
    plain = HookedGenerator(t.model).generate(ids, mask, STEPS, stop_at_eos=False, output_logits=True, steering=steer)
    assert not torch.equal(fast[0].logits, plain[0].logits), "the cap must change the logits"
    _assert_identical(reference, fast)


def test_every_registered_hook_fires_with_the_same_tensors(tiny_sharp_each_attn):
    t = tiny_sharp_each_attn
    ids, mask = tokenize_batch(t.tokenizer, PROMPTS)
    wanted = [n for n in t.model.hook_dict if n.startswith(("blocks.0.", "embed.", "ln_final.", "unembed."))]
    names = [n for n in wanted + [get_hook_path(t.model.cfg.n_layers - 1)] if _accepted(t.model, n)]
    steer = [SteeringConfig(vector=_unit(t.model.cfg.d_model, 6), layer=1, coefficient=3.0)]
    calls = {}
    for fast in (False, True):
        seen = calls[fast] = []
        record = lambda act, hook: seen.append((hook.name, act.clone()))  # noqa: E731
        with t.model.hooks(fwd_hooks=[(n, record) for n in names]):
            HookedGenerator(t.model, fast_path=fast).generate(ids, mask, 3, stop_at_eos=False, steering=steer)
    assert len(calls[True]) > 3 * len(names) // 2, "most of the named hooks fire at every step"
    assert [n for n, _ in calls[True]] == [n for n, _ in calls[False]]
    for (name, got), (_, ref) in zip(calls[True], calls[False]):
        assert torch.equal(got, ref), name


def _accepted(model, name: str) -> bool:
    """Whether TransformerLens takes a hook at `name` (it refuses points gated off by a `use_*` switch)."""
    try:
        with model.hooks(fwd_hooks=[(name, lambda act, hook: None)]):
            return True
    except ValueError:
        return False


def test_no_hook_point_runs_when_nothing_is_hooked_and_the_bridges_come_back(tiny, monkeypatch):
    ids, mask = tokenize_batch(tiny.tokenizer, PROMPTS[:1])
    before = {name: module for name, module in tiny.model.original_model.named_modules()}
    count = {"n": 0}
    forward = HookPoint.forward
    monkeypatch.setattr(HookPoint, "forward", lambda self, x: count.__setitem__("n", count["n"] + 1) or forward(self, x))
    HookedGenerator(tiny.model).generate(ids, mask, 3, stop_at_eos=False)
    assert count["n"] == 0
    HookedGenerator(tiny.model, fast_path=False).generate(ids, mask, 3, stop_at_eos=False)
    assert count["n"] > 0
    after = dict(tiny.model.original_model.named_modules())
    assert after.keys() == before.keys() and all(after[n] is m for n, m in before.items())


def test_units_keep_their_bridge_exactly_when_hooked(tiny):
    model = tiny.model
    n_units = model.cfg.n_layers + 4  # embedding, blocks, final norm, rotary embedding, unembedding
    layers = model.original_model.model.layers
    block = layers[0]
    with fast_path(model) as plain:
        assert plain == n_units
        assert layers[0] is block.original_component
    noop = lambda act, hook: None  # noqa: E731
    with model.hooks(fwd_hooks=[(get_hook_path(0), noop)]), fast_path(model) as plain:
        assert plain == n_units - 1
        assert layers[0] is block, "a hook on the residual keeps the block's own bridge"
        assert not any(isinstance(m, HookPoint) for m in block.original_component.modules()), "its inside runs as HF"
    with model.hooks(fwd_hooks=[(get_hook_path(0, "attn_contribution"), noop)]), fast_path(model):
        assert layers[0] is block and block.original_component.self_attn is block.attn
    handle = block.attn.register_forward_hook(lambda *a: None)  # a torch hook on a bridge module
    try:
        with fast_path(model) as plain:
            assert plain == n_units - 1 and layers[0] is block
    finally:
        handle.remove()
    with pytest.raises(RuntimeError, match="inside"), fast_path(model):
        raise RuntimeError("inside")
    assert layers[0] is block and block.original_component.self_attn is block.attn


def test_a_global_module_hook_turns_the_fast_path_off(tiny):
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        with fast_path(tiny.model) as plain:
            assert plain == 0
    finally:
        handle.remove()
