"""HookedGenerator against HF `generate` on the untouched reference (init std 0.2, fp32), under eager and SDPA
attention (the reference runs the same implementation as the model)."""

import pytest
import torch

from tracelens import CaptureHook, get_hook_path
from tracelens.model.generation import CaptureConfig, HookedGenerator, SteeringConfig
from tracelens.model.prompts import tokenize_batch

from hf_reference import hf_hooks, hf_module_for

PROMPTS = ["The capital of France is Paris.", "I am happy"]
STEPS = 6


def _unit(d, seed):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def _hf_generate(t, ids, mask, edits=None):
    """HF greedy generation on the reference: new tokens (up to and including the first stop) and step logits."""
    with hf_hooks(t.reference, edits or {}), torch.no_grad():
        out = t.reference.generate(ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True, pad_token_id=t.tokenizer.pad_token_id)
    tokens = out.sequences[:, ids.shape[1]:]
    return tokens, torch.stack(out.logits, dim=1)


def _assert_matches_hf(result, hf_tokens, hf_logits, stop_id):
    n = len(result.token_ids)
    expected = hf_tokens.tolist()
    if stop_id in expected:
        expected = expected[: expected.index(stop_id) + 1]
    assert result.token_ids == expected
    # Not bit-exact under either attention implementation: HF generate's prefill computes the unembedding
    # for the last position only (logits_to_keep=1), another matmul shape; about 1e-6 on these models.
    assert (result.logits - hf_logits[:n]).abs().max() <= 1e-4


def test_greedy_generation_equals_hf_generate_tokens_and_step_logits(tiny_sharp_each_attn):
    t = tiny_sharp_each_attn
    ids, mask = tokenize_batch(t.tokenizer, PROMPTS[:1])
    [ours] = HookedGenerator(t.model).generate(ids, mask, STEPS, output_logits=True)
    hf_tokens, hf_logits = _hf_generate(t, ids, mask)
    _assert_matches_hf(ours, hf_tokens[0], hf_logits[0], t.tokenizer.eos_token_id)


@pytest.mark.parametrize("positions", ["all", "response"])
def test_steered_generation_equals_hf_generate_with_the_same_torch_hook_cached_and_uncached(tiny_sharp_each_attn,
                                                                                          positions):
    t = tiny_sharp_each_attn
    ids, mask = tokenize_batch(t.tokenizer, PROMPTS[:1])
    n = ids.shape[1]
    v, c = _unit(t.model.cfg.d_model, 1), 3.0
    seen = {"n": 0}

    def edit(h):  # independent position counter for one unpadded row
        pos = torch.arange(seen["n"], seen["n"] + h.shape[1])
        seen["n"] += h.shape[1]
        inside = pos >= (0 if positions == "all" else n - 1)
        return torch.where(inside[None, :, None], h + (c * v).to(h.dtype), h)

    hf_tokens, hf_logits = _hf_generate(t, ids, mask, {hf_module_for(t.reference, 0, "residual"): edit})
    plain_tokens, plain_logits = _hf_generate(t, ids, mask)
    assert not torch.allclose(hf_logits, plain_logits), "the steering must change the logits"
    steering = [SteeringConfig(vector=v, layer=0, coefficient=c, positions=positions)]
    for cached in (True, False):
        [ours] = HookedGenerator(t.model).generate(ids, mask, STEPS, steering=steering, output_logits=True,
                                                   use_cache=cached)
        _assert_matches_hf(ours, hf_tokens[0], hf_logits[0], t.tokenizer.eos_token_id)


def test_left_padded_batch_equals_each_prompt_alone(tiny_each_attn):
    t = tiny_each_attn
    ids, mask = tokenize_batch(t.tokenizer, PROMPTS)
    assert (mask == 0).any()
    steering = [SteeringConfig(vector=_unit(t.model.cfg.d_model, 2), layer=1, component="attn_contribution", coefficient=2.0)]
    capture = CaptureConfig(layers=[0, 1])
    batch = HookedGenerator(t.model).generate(ids, mask, STEPS, steering=steering, capture=capture, output_logits=True)
    for row, prompt in enumerate(PROMPTS):
        a_ids, a_mask = tokenize_batch(t.tokenizer, [prompt])
        [alone] = HookedGenerator(t.model).generate(a_ids, a_mask, STEPS, steering=steering, capture=capture,
                                                    output_logits=True)
        assert batch[row].token_ids == alone.token_ids
        assert (batch[row].logits - alone.logits).abs().max() <= 1e-4
        for layer in (0, 1):
            assert (batch[row].activations[layer]["residual"] - alone.activations[layer]["residual"]).abs().max() <= 1e-5


def test_token_k_pairs_with_the_hidden_state_that_produced_it(tiny_each_attn):
    t = tiny_each_attn
    ids, mask = tokenize_batch(t.tokenizer, PROMPTS[:1])
    comps = ["residual", "attn_contribution", "mlp_out"]
    [out] = HookedGenerator(t.model).generate(ids, mask, STEPS, capture=CaptureConfig(None, comps))
    full = torch.cat([ids[0], torch.tensor(out.token_ids)])[None]
    hooks = [get_hook_path(l, c) for l in range(t.model.cfg.n_layers) for c in comps]
    with torch.no_grad():
        _, cache = t.model.run_with_cache(full, names_filter=hooks)
    n, k = ids.shape[1], len(out.token_ids)
    for layer in range(t.model.cfg.n_layers):
        for c in comps:
            teacher = cache[get_hook_path(layer, c)][0, n - 1 : n - 1 + k]
            assert out.activations[layer][c].shape == (k, t.model.cfg.d_model)
            assert (out.activations[layer][c] - teacher).abs().max() <= 1e-5


def test_decode_steps_run_one_token_through_the_model(tiny):
    ids, mask = tokenize_batch(tiny.tokenizer, PROMPTS[:1])
    with CaptureHook(tiny.model, get_hook_path(0)) as cap:
        [out] = HookedGenerator(tiny.model).generate(ids, mask, STEPS, stop_at_eos=False)
    shapes = [a.shape[1] for a in cap.get(concat=False)]
    assert len(out.token_ids) == STEPS
    assert shapes == [ids.shape[1]] + [1] * (STEPS - 1)


def test_stream_yields_the_same_tokens_and_activations_as_generate(tiny_sharp):
    t = tiny_sharp
    ids, mask = tokenize_batch(t.tokenizer, PROMPTS[:1])
    capture = CaptureConfig(layers=[1])
    steering = [SteeringConfig(vector=_unit(t.model.cfg.d_model, 3), layer=0, coefficient=2.0)]
    gen = HookedGenerator(t.model)
    [out] = gen.generate(ids, mask, STEPS, capture=capture, steering=steering)
    streamed = list(gen.stream(ids, mask, STEPS, capture=capture, steering=steering))
    assert [s.token_id for s in streamed] == out.token_ids
    assert [s.step for s in streamed] == list(range(len(out.token_ids)))
    assert torch.equal(torch.stack([s.activations[1]["residual"] for s in streamed]), out.activations[1]["residual"])


@pytest.mark.unchecked_types
def test_stream_refuses_a_batch(tiny):
    with pytest.raises(ValueError, match="stream takes one prompt"):
        next(HookedGenerator(tiny.model).stream(*tokenize_batch(tiny.tokenizer, PROMPTS)))


def test_a_stopped_row_stops_growing_while_others_continue(tiny_sharp):
    t = tiny_sharp
    ids, mask = tokenize_batch(t.tokenizer, PROMPTS)
    free = HookedGenerator(t.model).generate(ids, mask, STEPS, stop_at_eos=False, capture=CaptureConfig([0]))
    stop = free[0].token_ids[1]
    assert stop not in free[1].token_ids, "pick prompts whose rows differ for this test"
    out = HookedGenerator(t.model).generate(ids, mask, STEPS, stop_token_ids=[stop], stop_at_eos=False,
                                           capture=CaptureConfig([0]))
    k = free[0].token_ids.index(stop) + 1
    assert out[0].token_ids == free[0].token_ids[:k]
    assert out[0].activations[0]["residual"].shape[0] == k
    assert out[1].token_ids == free[1].token_ids


def test_sampling_is_reproducible_with_a_seed(tiny_sharp):
    t = tiny_sharp
    ids, mask = tokenize_batch(t.tokenizer, PROMPTS)
    gen = HookedGenerator(t.model)
    run = lambda seed: [o.token_ids for o in gen.generate(ids, mask, 10, temperature=1.5, seed=seed, stop_at_eos=False)]  # noqa: E731
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_generation_rejects_right_padding_and_bad_steering(tiny):
    ids, mask = tokenize_batch(tiny.tokenizer, PROMPTS)
    right = torch.flip(mask, dims=[1])
    with pytest.raises(ValueError, match="must be left-padded"):
        HookedGenerator(tiny.model).generate(ids, right, 2)
    with pytest.raises(ValueError, match="positions must be one of all, response; got 'prompt'"):  # at construction
        SteeringConfig(vector=torch.ones(tiny.model.cfg.d_model), layer=0, positions="prompt")
