"""Conditional steering against a hand-written torch-hook implementation on the HF reference, padded batches
and KV-cached generation included; threshold fitting on hand-made scores."""

import pytest
import torch

from tests.conftest import cached_tiny, encode
from tracelens.model.capture import capture_at_position
from tracelens.model.conditional import ConditionalSteering, fit_condition_threshold
from tracelens.model.generation import HookedGenerator

PROMPTS = ["How do you feel today?", "Paris is lovely", "hey what's up, that was totally awesome lol", "I am sad"]


@pytest.fixture(scope="module")
def t():
    return cached_tiny("llama", n_layers=3, init_std=0.2)


@pytest.fixture(scope="module")
def vectors():
    g = torch.Generator().manual_seed(3)
    return torch.randn(64, generator=g), torch.randn(64, generator=g)  # steering vector, condition


def reference_hooks(reference, vector, layer, condition, condition_layer, threshold, coefficient, first, last):
    """CAST by hand: score = mean <h, c/|c|> over real tokens [first, last) of each row at block
    `condition_layer`'s output on the prompt pass; rows above `threshold` get `coefficient * vector` at block
    `layer` on every pass. Returns the hook handles and the dict holding the gate."""
    unit = condition / condition.norm()
    state = {}

    def decide(module, inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        if h.shape[1] == 1:  # decode step: keep the prompt's decision
            return None
        mask = state["mask"]
        rows = []
        for i in range(h.shape[0]):
            real = h[i][mask[i].bool()]  # left padding removed
            rows.append((real[first:last] @ unit).mean())
        state["gate"] = torch.stack(rows) > threshold
        return None

    def steer(module, inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        h = torch.where(state["gate"][:, None, None], h + coefficient * vector, h)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handles = [reference.model.layers[condition_layer].register_forward_hook(decide),
               reference.model.layers[layer].register_forward_hook(steer)]
    return handles, state


@pytest.mark.parametrize("position, first, last", [("prompt[-1]", -1, None), ("prompt[1:3]", 1, 3)])
def test_padded_forward_equals_the_hand_written_reference(t, vectors, position, first, last):
    vector, condition = vectors
    ids, mask = encode(t.tokenizer, PROMPTS)
    assert (mask == 0).any()
    probe = ConditionalSteering(t.model, vector, 2, condition, 1, threshold=0.0, position=position)
    with probe, torch.no_grad():
        t.model(ids, attention_mask=mask)
    threshold = float(probe.scores.median())  # half the rows pass
    handles, state = reference_hooks(t.reference, vector, 2, condition, 1, threshold, 4.0, first, last)
    state["mask"] = mask
    try:
        with torch.no_grad():
            expected = t.reference(ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()
    with ConditionalSteering(t.model, vector, 2, condition, 1, threshold, coefficient=4.0,
                             position=position) as steer, torch.no_grad():
        got = t.model(ids, attention_mask=mask)
    assert torch.equal(steer.gate, state["gate"]) and 0 < int(steer.gate.sum()) < len(PROMPTS)
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-4)
    with torch.no_grad():
        plain = t.model(ids, attention_mask=mask)
    changed = (got - plain).abs().amax(dim=(1, 2)) > 1e-3
    assert torch.equal(changed, steer.gate)  # exactly the passing rows are steered


def test_less_comparator_steers_the_other_rows(t, vectors):
    vector, condition = vectors
    ids, mask = encode(t.tokenizer, PROMPTS)
    with ConditionalSteering(t.model, vector, 2, condition, 1, 0.0) as up, torch.no_grad():
        t.model(ids, attention_mask=mask)
    with ConditionalSteering(t.model, vector, 2, condition, 1, 0.0, comparator="less") as down, torch.no_grad():
        t.model(ids, attention_mask=mask)
    assert torch.equal(down.gate, up.scores < 0) and torch.equal(up.gate, up.scores > 0)


def test_cached_generation_keeps_the_prompt_decision_like_the_reference(t, vectors):
    vector, condition = vectors
    ids, mask = encode(t.tokenizer, PROMPTS)
    with ConditionalSteering(t.model, vector, 1, condition, 1, 0.0) as probe, torch.no_grad():
        t.model(ids, attention_mask=mask)
    threshold = float(probe.scores.median())
    handles, state = reference_hooks(t.reference, vector, 1, condition, 1, threshold, 6.0, -1, None)
    state["mask"] = mask
    try:
        with torch.no_grad():
            ref = t.reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                       pad_token_id=4, output_logits=True, return_dict_in_generate=True)
    finally:
        for h in handles:
            h.remove()
    with ConditionalSteering(t.model, vector, 1, condition, 1, threshold, coefficient=6.0) as steer:
        outs = HookedGenerator(t.model).generate(ids, mask, max_new_tokens=6, stop_at_eos=False, output_logits=True)
    assert 0 < int(steer.gate.sum()) < len(PROMPTS)
    for i, out in enumerate(outs):
        assert out.token_ids == ref.sequences[i, ids.shape[1]:].tolist()
        assert torch.allclose(out.logits, torch.stack([step[i] for step in ref.logits]).float(), atol=1e-3)


def test_bad_settings_are_errors(t, vectors):
    vector, condition = vectors
    with pytest.raises(ValueError, match=r"steering layer 0 runs before condition layer 1"):
        ConditionalSteering(t.model, vector, 0, condition, 1, 0.0)
    with pytest.raises(ValueError, match=r"position must be a 'prompt\[...\]' position; got 'response\[0\]'"):
        ConditionalSteering(t.model, vector, 1, condition, 1, 0.0, position="response[0]")
    with pytest.raises(ValueError, match=r"comparator must be one of greater, less; got '>'"):
        ConditionalSteering(t.model, vector, 1, condition, 1, 0.0, comparator=">")
    ids, mask = encode(t.tokenizer, PROMPTS)
    right = t.tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="right")
    with pytest.raises(ValueError, match=r"needs left-padded rows"), ConditionalSteering(
            t.model, vector, 1, condition, 1, 0.0), torch.no_grad():
        t.model(right.input_ids, attention_mask=right.attention_mask)


def test_fitted_threshold_separates_prompts_that_differ_on_the_condition(t):
    """Condition = the difference of the two sets' mean last-token states: the fit must separate them perfectly."""
    steer = ["I am so happy today!", "I am so happy today! Everything feels wonderful."]
    keep = ["I feel sad", "I feel sad and tired"]
    acts = {n: capture_at_position(t.model, t.tokenizer, p, 1) for n, p in (("s", steer), ("k", keep))}
    condition = acts["k"].mean(0) - acts["s"].mean(0)  # points at the keep set: the comparator must be "less"
    fit = fit_condition_threshold(t.model, condition, 1, steer, keep)
    unit = condition / condition.norm()
    s, k = acts["s"] @ unit, acts["k"] @ unit
    assert fit.comparator == "less" and fit.accuracy == 1.0
    assert s.max() < fit.threshold < k.min()


def test_the_backend_option_equals_the_adapter_around_the_generator(t, vectors):
    from tracelens.serving.backends import GenerationConfig, LocalBackend, SteeringSpec
    from tracelens.model.conditional import Condition

    vector, condition = vectors
    backend = LocalBackend.from_model(t.model, use_chat_template=False)
    ids, mask = encode(t.tokenizer, PROMPTS)
    with ConditionalSteering(t.model, vector, 1, condition, 1, 0.0) as probe, torch.no_grad():
        t.model(ids, attention_mask=mask)
    threshold = float(probe.scores.median())
    spec = SteeringSpec(layer=1, vector=vector, coefficient=6.0, condition=Condition(condition, 1, threshold))
    got = backend.generate_results(PROMPTS, GenerationConfig(max_new_tokens=5), [spec])
    texts = [backend.format(p) for p in PROMPTS]
    from tracelens.model.prompts import tokenize_batch

    ids, mask = tokenize_batch(t.tokenizer, texts)
    with ConditionalSteering(t.model, vector, 1, condition, 1, threshold, coefficient=6.0) as steer:
        want = HookedGenerator(t.model).generate(ids, mask, max_new_tokens=5)
    assert 0 < int(steer.gate.sum()) < len(PROMPTS)
    assert [r.response_token_ids for r in got] == [o.token_ids for o in want]
    plain = backend.generate_results(PROMPTS, GenerationConfig(max_new_tokens=5))
    assert [r.response_token_ids for r in got] != [r.response_token_ids for r in plain]
    with pytest.raises(ValueError, match="conditional steering covers every position"):
        SteeringSpec(layer=1, vector=vector, coefficient=6.0, positions="response", condition=Condition(condition, 1, threshold))


def test_capture_decides_the_condition_at_the_prompt_as_generation_does(t, vectors):
    """`generate_with_capture` reads activations in one forward over prompt + response under the same steering;
    a conditional spec must decide there at the prompt's last token, as generation did, not at the response's
    last token. The threshold lies between the two scores, the comparator passing the prompt: the captured
    activations equal those of the same steering without a condition."""
    from tracelens.model.requests import CaptureSpec, Condition, GenerationConfig, SteeringSpec
    from tracelens.serving.backends import LocalBackend

    vector, condition = vectors
    backend = LocalBackend.from_model(t.model, use_chat_template=False)
    cfg, capture = GenerationConfig(max_new_tokens=6), CaptureSpec([0, 2])
    always = SteeringSpec(layer=2, vector=vector, coefficient=6.0)
    [want] = backend.generate_with_capture([PROMPTS[2]], cfg, capture, [always])
    unit = condition / condition.norm()
    at_prompt = float(want.prompt_activations[0]["residual"][-1] @ unit)  # layer 0: before the steering at 2
    at_end = float(want.response_activations[0]["residual"][-1] @ unit)
    assert abs(at_prompt - at_end) > 1e-3
    comparator = "greater" if at_prompt > at_end else "less"
    conditional = SteeringSpec(layer=2, vector=vector, coefficient=6.0,
                               condition=Condition(condition, 0, (at_prompt + at_end) / 2, comparator))
    [got] = backend.generate_with_capture([PROMPTS[2]], cfg, capture, [conditional])
    assert got.response_token_ids == want.response_token_ids
    for part in ("prompt_activations", "response_activations"):
        torch.testing.assert_close(getattr(got, part)[2]["residual"], getattr(want, part)[2]["residual"])
