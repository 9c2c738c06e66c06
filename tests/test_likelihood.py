"""Teacher-forced log-likelihoods and the judge-free steering metrics, against plain HF forwards."""

import pytest
import torch

from hf_reference import hf_hooks
from tracelens.model.hooks import SteeringHook
from tracelens.model.likelihood import response_logprobs
from tracelens.pipeline.steering_eval import ReferenceTexts, _score_texts, judge_free_metrics, random_control
from tracelens.serving.backends import LocalBackend, SteeringSpec

PROMPTS = [[5, 17, 33, 2], [9, 4], [40, 41, 42, 43, 44, 45]]
RESPONSES = [[7, 8, 9], [100, 3, 12, 60, 61], [11]]


def _hf_distributions(reference, prompt, response, edit=None):
    ids = torch.tensor([prompt + response])
    with torch.no_grad(), hf_hooks(reference, edit or {}):
        logits = reference(ids).logits[0].float()
    return logits[len(prompt) - 1 : -1].log_softmax(-1)


def _hf_logprobs(reference, prompt, response, edit=None):
    return _hf_distributions(reference, prompt, response, edit).gather(-1, torch.tensor(response)[:, None])[:, 0]


def test_one_row_at_a_time_equals_the_hf_model_exactly(tiny):
    got = response_logprobs(tiny.model, PROMPTS, RESPONSES, batch_size=1)
    for p, r, g in zip(PROMPTS, RESPONSES, got):
        assert g.shape == (len(r),)
        assert torch.equal(g, _hf_logprobs(tiny.reference, p, r))


def test_left_padded_batches_equal_one_row_at_a_time(tiny):
    alone = response_logprobs(tiny.model, PROMPTS, RESPONSES, batch_size=1)
    batched, dists = response_logprobs(tiny.model, PROMPTS, RESPONSES, batch_size=3, distributions=True)
    for a, b, d, r in zip(alone, batched, dists, RESPONSES):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        assert d.shape == (len(r), tiny.model.cfg.d_vocab)
        torch.testing.assert_close(d.gather(-1, torch.tensor(r)[:, None])[:, 0], b)


def test_steered_logprobs_equal_a_torch_hook_on_the_hf_model(tiny):
    v = torch.randn(tiny.model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    with SteeringHook(tiny.model, v, "blocks.0.hook_resid_post", 3.0):
        got = response_logprobs(tiny.model, PROMPTS, RESPONSES, batch_size=1)
    edit = {"model.layers.0": lambda h: h + 3.0 * v}
    for p, r, g in zip(PROMPTS, RESPONSES, got):
        assert torch.equal(g, _hf_logprobs(tiny.reference, p, r, edit))
    assert not torch.equal(got[0], _hf_logprobs(tiny.reference, PROMPTS[0], RESPONSES[0]))


def test_empty_rows_and_length_mismatch_are_named(tiny):
    with pytest.raises(ValueError, match="row 1 needs at least one prompt token and one response token"):
        response_logprobs(tiny.model, [[1], [2]], [[3], []])
    with pytest.raises(ValueError, match="got 2 prompts but 1 responses"):
        response_logprobs(tiny.model, [[1], [2]], [[3]])


def _refs():
    return ReferenceTexts(pair_prompts=PROMPTS, pos=RESPONSES, neg=[[13, 14], [15], [16, 17, 18]],
                          neutral_prompts=PROMPTS[:2], neutral=RESPONSES[:2],
                          pair_questions=["q0", "q1", "q2"], neutral_questions=["q0", "q1"])


def test_judge_free_metrics_are_zero_at_coefficient_zero_and_match_a_direct_computation(tiny):
    refs, backend = _refs(), LocalBackend.from_model(tiny.model)
    unsteered = _score_texts(backend, refs)
    v = torch.randn(backend.hidden_dim, generator=torch.Generator().manual_seed(2))
    zero = judge_free_metrics(backend, refs, unsteered, SteeringSpec(layer=0, vector=v, coefficient=0.0))
    assert all(m == {"value": 0.0, "lo": 0.0, "hi": 0.0} for m in zero.values())

    got = judge_free_metrics(backend, refs, unsteered, SteeringSpec(layer=0, vector=v, coefficient=4.0))
    edit = {"model.layers.0": lambda h: h + 4.0 * v}

    def llr(i, e=None):
        return (_hf_logprobs(tiny.reference, PROMPTS[i], refs.pos[i], e).mean()
                - _hf_logprobs(tiny.reference, PROMPTS[i], refs.neg[i], e).mean())

    effect = torch.stack([llr(i, edit) - llr(i) for i in range(3)]).mean()
    nll = torch.stack([_hf_logprobs(tiny.reference, PROMPTS[i], RESPONSES[i]).mean()
                       - _hf_logprobs(tiny.reference, PROMPTS[i], RESPONSES[i], edit).mean() for i in range(2)]).mean()
    assert got["trait_effect"]["value"] == pytest.approx(float(effect), abs=1e-4)
    assert got["nll_cost"]["value"] == pytest.approx(float(nll), abs=1e-4)
    assert got["kl"]["value"] > 0 and got["kl"]["lo"] <= got["kl"]["value"] <= got["kl"]["hi"]


def test_the_random_control_has_the_vectors_norm_and_is_seeded():
    v = torch.full((16,), 0.5)
    r = random_control(v, 3)
    assert r.norm() == pytest.approx(v.norm()) and torch.equal(r, random_control(v, 3))
    assert not torch.equal(r, random_control(v, 4)) and abs(float(r @ v) / float(v.norm() ** 2)) < 0.9


def test_kl_equals_the_hf_models_and_the_unsteered_pass_is_kept_for_the_same_texts(tiny, monkeypatch):
    import tracelens.serving.backends as backends

    backend = LocalBackend.from_model(tiny.model)
    v = torch.randn(backend.hidden_dim, generator=torch.Generator().manual_seed(5))
    spec = [SteeringSpec(layer=0, vector=v, coefficient=4.0)]
    first = backend.response_logprobs(PROMPTS, RESPONSES, spec, kl=True).kl
    edit = {"model.layers.0": lambda h: h + 4.0 * v}
    for p, r, got in zip(PROMPTS, RESPONSES, first):
        u, s = _hf_distributions(tiny.reference, p, r), _hf_distributions(tiny.reference, p, r, edit)
        torch.testing.assert_close(got, (u.exp() * (u - s)).sum(-1), atol=1e-5, rtol=1e-4)
    calls, real = [], backends.response_logprobs
    monkeypatch.setattr(backends, "response_logprobs", lambda *a, **k: calls.append(k) or real(*a, **k))
    again = backend.response_logprobs(PROMPTS, RESPONSES, spec, kl=True).kl
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(first, again))  # the steered pass only
    backend.response_logprobs(PROMPTS[:2], RESPONSES[:2], spec, kl=True)
    assert len(calls) == 3  # other texts: a new unsteered pass


def test_prompt_logprobs_score_every_token_after_the_first_in_bounded_batches(tiny):
    backend = LocalBackend.from_model(tiny.model)
    rows = [p + r for p, r in zip(PROMPTS, RESPONSES)] + [[5]]
    got = backend.prompt_logprobs(rows, top=4, batch_size=2)  # two batches and a one-token row
    assert got[-1] == ([], [])
    for row, (logprobs, top) in zip(rows[:-1], got):
        want = _hf_distributions(tiny.reference, row[:1], row[1:])
        assert logprobs == pytest.approx(want.gather(-1, torch.tensor(row[1:])[:, None])[:, 0].tolist(), abs=1e-5)
        assert [[i for i, _ in t] for t in top] == torch.topk(want, 4).indices.tolist()
