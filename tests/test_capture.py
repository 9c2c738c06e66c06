"""capture_at_position: shapes, pooling, left-pad offsets, batched == one at a time, errors."""

import pytest
import torch

from tracelens import get_hook_path
from tracelens.model.capture import capture_at_position
from tracelens.model.prompts import encode, format_prompt

PROMPTS = ["What is the capital of France?", "Hi", "Please answer the question politely and formally."]


def _alone(t, prompt, layer):
    ids = torch.tensor([encode(t.tokenizer, format_prompt(t.tokenizer, prompt))])
    with torch.no_grad():
        _, cache = t.model.run_with_cache(ids, names_filter=get_hook_path(layer))
    return cache[get_hook_path(layer)][0]


def test_last_prompt_token_equals_an_unpadded_forward(tiny):
    acts = capture_at_position(tiny.model, tiny.tokenizer, PROMPTS, layers=1, position="prompt[-1]", pool="last")
    assert acts.shape == (3, tiny.model.cfg.d_model) and acts.dtype == torch.float32
    for i, p in enumerate(PROMPTS):
        assert (acts[i] - _alone(tiny, p, 1)[-1]).abs().max() <= 1e-5


@pytest.mark.parametrize("pool", ["mean", "first", "last"])
def test_pools_over_a_slice_and_batched_equals_one_at_a_time(tiny, pool):
    batched = capture_at_position(tiny.model, tiny.tokenizer, PROMPTS, layers=[0, 1], position="prompt[-3:]", pool=pool)
    single = torch.cat([capture_at_position(tiny.model, tiny.tokenizer, [p], [0, 1], "prompt[-3:]", pool, batch_size=1)
                        for p in PROMPTS])
    assert batched.shape == (3, 2, tiny.model.cfg.d_model)
    assert (batched - single).abs().max() <= 1e-5
    last3 = _alone(tiny, PROMPTS[0], 0)[-3:]
    expected = {"mean": last3.mean(0), "first": last3[0], "last": last3[-1]}[pool]
    assert (batched[0, 0] - expected).abs().max() <= 1e-5


def test_pool_none_returns_every_token_padded_with_its_mask(tiny):
    out, mask = capture_at_position(tiny.model, tiny.tokenizer, PROMPTS, layers=[1], position="all[:]", pool="none",
                                    return_mask=True)
    alone = [_alone(tiny, p, 1) for p in PROMPTS]
    width = max(len(a) for a in alone)
    assert out.shape == (3, 1, width, tiny.model.cfg.d_model) and mask.shape == (3, width)
    for i, a in enumerate(alone):
        assert mask[i].tolist() == [True] * len(a) + [False] * (width - len(a))
        assert (out[i, 0, : len(a)] - a).abs().max() <= 1e-5
        assert not out[i, :, len(a):].any()  # padding is zeros
    squeezed = capture_at_position(tiny.model, tiny.tokenizer, PROMPTS, layers=1, position="all[:2]", pool="none")
    assert squeezed.shape == (3, 2, tiny.model.cfg.d_model)  # equal slices: no padding, the seed's [n, seq, d]
    assert torch.equal(squeezed, out[:, 0, :2])
    with pytest.raises(ValueError, match=r"return_mask must be used with pool='none'.*got pool='mean'"):
        capture_at_position(tiny.model, tiny.tokenizer, PROMPTS, 1, return_mask=True)


def test_pre_formatted_prompts_are_used_as_given(tiny):
    raw = capture_at_position(tiny.model, tiny.tokenizer, ["plain text"], 0, "all[-1]", "last", pre_formatted=True)
    ids = torch.tensor([encode(tiny.tokenizer, "plain text")])
    with torch.no_grad():
        _, cache = tiny.model.run_with_cache(ids, names_filter=get_hook_path(0))
    assert (raw[0] - cache[get_hook_path(0)][0, -1]).abs().max() <= 1e-5


def test_errors_name_the_problem(tiny):
    m, tok = tiny.model, tiny.tokenizer
    with pytest.raises(ValueError, match=r"selects no tokens of prompt 1"):
        capture_at_position(m, tok, ["a long prompt with many tokens in it", "x"], 0, "all[5:]", pre_formatted=True)
    with pytest.raises(ValueError, match=r"prefill-only"):
        capture_at_position(m, tok, PROMPTS, 0, "response[:5]")
    with pytest.raises(ValueError, match=r"unknown pool 'max'"):
        capture_at_position(m, tok, PROMPTS, 0, pool="max")
    with pytest.raises(ValueError, match=r"malformed position"):
        capture_at_position(m, tok, PROMPTS, 0, "prompt-1")
