"""`ContinuousBatch` against each group generated alone by `HookedGenerator`: groups that join a running batch at
staggered steps, with different prompt lengths, lengths of answer, stops, steering and capture."""

import pytest
import torch

from tracelens.errors import ConfigError
from tracelens.model.continuous import ContinuousBatch
from tracelens.model.generation import HookedGenerator
from tracelens.model.prompts import left_pad
from tracelens.model.requests import CaptureSpec, Condition, GenerationConfig, SteeringSpec

ACT_TOL = 1e-4  # batch composition changes float rounding only; init std 0.2 amplifies it through the layers


def _vector(model, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.cfg.d_model, generator=g)


def _groups(model):
    """(prompt rows, config, steering, capture, join step) per group: a long answer alone, a two-prompt group with
    per-row steering joining mid-answer, a short prompt steered on its response, a group stopped by a token id."""
    v, w = _vector(model, 1), _vector(model, 2)
    return [
        ([[5, 6, 7, 8, 9]], GenerationConfig(max_new_tokens=12), None, CaptureSpec(layers=[0, -1]), 0),
        ([[11, 12, 13, 14, 15, 16, 17, 18, 19], [20, 21]], GenerationConfig(max_new_tokens=7),
         [SteeringSpec(layer=0, vector=v, coefficient=2.0, rows=(1, 2)),
          SteeringSpec(layer=1, vector=w, coefficient=-1.0, component="attn_contribution")], None, 2),
        ([[30, 31, 32]], GenerationConfig(max_new_tokens=9),
         [SteeringSpec(layer=0, vector=w, coefficient=3.0, positions="response")],
         CaptureSpec(layers=[1], components=["residual", "mlp_contribution"]), 3),
        ([[40, 41, 42, 43]], GenerationConfig(max_new_tokens=10, stop_token_ids=None), None, None, 3),
    ]


def _alone(model, rows, config, steering, capture):
    ids, mask = left_pad(rows, 0)
    return HookedGenerator(model).generate(ids, mask, config.max_new_tokens, 0.0, capture, steering,
                                           config.stop_token_ids, output_logits=True)


def test_rows_joining_a_running_batch_get_what_their_group_gets_alone(tiny_sharp):
    model = tiny_sharp.model
    groups = _groups(model)
    alone = [_alone(model, *g[:4]) for g in groups]
    # the last group stops at the token its alone run produces at step 4
    stop = alone[3][0].token_ids[4]
    groups[3] = (groups[3][0], GenerationConfig(max_new_tokens=10, stop_token_ids=[stop]), None, None, 3)
    alone[3] = _alone(model, *groups[3][:4])

    batch = ContinuousBatch(model)
    started, tokens, steps = [], {}, 0
    while len(started) < len(groups) or batch.rows:
        for g, (rows, config, steering, capture, at) in enumerate(groups):
            if at == steps and g not in {s[0] for s in started}:
                ids, mask = left_pad(rows, 0)
                made = batch.add(ids, mask, config, steering, capture, top_logprobs=2,
                                 on_token=lambda row, t: tokens.setdefault(id(row), []).append(t))
                started.append((g, made))
        batch.step()
        # the cache is as wide as the longest live row needs (its prompt and tokens but the last), never wider
        need = [row.prompt_length + len(row.token_ids) - 1 for row in batch.rows]
        assert (batch._mask is None and not need) or batch._mask.shape[1] == max(need)
        steps += 1
    assert steps < 20
    for g, made in started:
        for row, want in zip(made, alone[g]):
            streamed = tokens[id(row)]
            assert row.finished and row.token_ids == want.token_ids  # greedy tokens identical
            logp = torch.log_softmax(want.logits.float(), dim=-1)
            assert row.logprobs == pytest.approx(logp.gather(1, torch.tensor(want.token_ids)[:, None])[:, 0].tolist(),
                                                 abs=ACT_TOL)
            assert [[i for i, _ in t] for t in row.top] == torch.topk(logp, 2).indices.tolist()
            capture = groups[g][3]
            assert [t.token_id for t in streamed] == want.token_ids and [t.step for t in streamed] == list(
                range(len(want.token_ids)))
            if capture is not None:
                for t in streamed:
                    for layer, comps in want.activations.items():
                        for c, acts in comps.items():
                            torch.testing.assert_close(t.activations[layer][c], acts[t.step].cpu(), atol=ACT_TOL,
                                                       rtol=0)


def test_conditional_steering_keeps_the_prompt_pass_decision_for_each_row(tiny_sharp):
    model = tiny_sharp.model
    v, c = _vector(model, 3), _vector(model, 4)
    rows = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    ids, mask = left_pad(rows, 0)
    scores = []
    for threshold in (-1e9, 1e9):  # every row passes, then none
        condition = Condition(vector=c, layer=0, threshold=threshold)
        spec = SteeringSpec(layer=1, vector=v, coefficient=4.0, condition=condition)
        config = GenerationConfig(max_new_tokens=6)
        want = HookedGenerator(model).generate(ids, mask, 6, 0.0, None, [spec])
        batch = ContinuousBatch(model)
        batch.add(*left_pad([[50, 51, 52]], 0), GenerationConfig(max_new_tokens=8))  # an unsteered row first
        batch.step()
        made = batch.add(ids, mask, config, [spec])
        while batch.rows:
            batch.step()
        assert [r.token_ids for r in made] == [w.token_ids for w in want]
        scores.append([r.token_ids for r in made])
    assert scores[0] != scores[1]  # the decision changes the answer, so the test can fail


def test_seeded_sampling_and_unpadded_groups_are_refused_before_any_model_work(tiny_llama):
    batch = ContinuousBatch(tiny_llama.model)
    ids, mask = left_pad([[5, 6], [7]], 0)
    with pytest.raises(ConfigError, match="seeded sampling"):
        batch.add(ids, mask, GenerationConfig(max_new_tokens=4, temperature=0.7, seed=1))
    with pytest.raises(ConfigError, match="left-padded"):
        batch.add(ids, mask.flip(1), GenerationConfig(max_new_tokens=4))
    assert batch.rows == []
