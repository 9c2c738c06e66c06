"""Hook adapters, proven against the same edit written as a plain torch forward hook on the HF model."""

import contextlib

import pytest
import torch

from tracelens import (
    AblationHook,
    ActivationCappingHook,
    CaptureHook,
    MultiLayerAblation,
    MultiLayerActivationCapping,
    MultiLayerCapture,
    MultiLayerProjection,
    MultiLayerSteering,
    PerPositionSteeringHook,
    PerSampleSteering,
    ProjectionHook,
    SteeringHook,
    calibrate_cap_threshold,
    get_hook_path,
)

from conftest import cached_tiny, encode
from hf_reference import hf_hooks, hf_module_for
from tracelens.testing import ARCHITECTURES

TEXTS = ["The capital of France is Paris.", "I am so happy today!", "What is the best way to learn?"]


def _vec(model, seed=0, scale=1.0):
    """A random direction of norm `scale` (extracted vectors are unit-norm)."""
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * scale


def _run_both(t, adapter, ref_edits, texts=TEXTS[:1]):
    """Logits and last-layer residual from the bridge under `adapter` and the HF reference under `ref_edits`."""
    ids, mask = encode(t.tokenizer, texts)
    last = t.model.cfg.n_layers - 1
    down = get_hook_path(last)
    with adapter, torch.no_grad():
        logits, cache = t.model.run_with_cache(ids, attention_mask=mask, names_filter=down)
    seen = {}
    ref_edits = dict(ref_edits)
    key = hf_module_for(t.reference, last, "residual")
    prev = ref_edits.get(key)

    def keep(h):
        out = prev(h) if prev else None
        seen["down"] = (h if out is None else out).clone()
        return out

    ref_edits[key] = keep
    with hf_hooks(t.reference, ref_edits), torch.no_grad():
        ref_logits = t.reference(ids, attention_mask=mask).logits
    real = mask.bool()  # pad positions hold finite junk; compare real tokens
    return (logits[real], cache[down][real]), (ref_logits[real], seen["down"][real])


def _assert_same(ours, ref, tol=0.0):
    for a, b in zip(ours, ref):
        if tol == 0.0:
            assert torch.equal(a, b), (a - b).abs().max()
        else:
            assert (a - b).abs().max() <= tol


def _conforms(t, adapter, ref_edits):
    """Unpadded: equal to the bit. Padded batch: logits <= 1e-6 and activations <= 1e-6 relative to
    their scale, since even without hooks the bridge's masked attention differs from HF's by ~1e-7."""
    _assert_same(*_run_both(t, adapter, ref_edits, TEXTS[:1]))
    (logits, act), (ref_logits, ref_act) = _run_both(t, adapter, ref_edits, TEXTS)
    assert (logits - ref_logits).abs().max() <= 1e-6
    assert (act - ref_act).abs().max() <= 1e-6 * ref_act.abs().max()


@pytest.mark.parametrize("component", ["residual", "attn_contribution", "mlp_contribution", "attn_out", "mlp_out"])
def test_steering_equals_the_hf_forward_hook_edit_to_the_bit(tiny, component):
    v, c = _vec(tiny.model), 3.0
    adapter = SteeringHook(tiny.model, v, get_hook_path(0, component), coefficient=c)
    edit = {hf_module_for(tiny.reference, 0, component): lambda h: h + (c * v).to(h.dtype)}
    _conforms(tiny, adapter, edit)


def test_steering_v_proj_edits_the_flat_projection_output(tiny):
    width = tiny.model.cfg.d_head * (tiny.model.cfg.n_key_value_heads or tiny.model.cfg.n_heads)
    v = torch.randn(width, generator=torch.Generator().manual_seed(1))
    adapter = SteeringHook(tiny.model, v, get_hook_path(1, "v_proj"), coefficient=2.0)
    edit = {hf_module_for(tiny.reference, 1, "v_proj"): lambda h: h + (2.0 * v).to(h.dtype)}
    _conforms(tiny, adapter, edit)


def test_hf_module_paths_steer_the_same_site_as_tl_names(tiny):
    v = _vec(tiny.model)
    a = _run_both(tiny, SteeringHook(tiny.model, v, "model.layers.0", 2.0), {})[0]
    b = _run_both(tiny, SteeringHook(tiny.model, v, "blocks.0.hook_resid_post", 2.0), {})[0]
    _assert_same(a, b)


def test_multi_layer_steering_with_a_component_override(tiny):
    v0, v1 = _vec(tiny.model, 0), _vec(tiny.model, 1)
    adapter = MultiLayerSteering(tiny.model, [(0, v0, 1.5), (1, v1, -2.0, "attn_contribution")])
    edit = {
        hf_module_for(tiny.reference, 0, "residual"): lambda h: h + (1.5 * v0).to(h.dtype),
        hf_module_for(tiny.reference, 1, "attn_contribution"): lambda h: h + (-2.0 * v1).to(h.dtype),
    }
    _conforms(tiny, adapter, edit)


def test_zero_coefficient_is_bit_identical_and_opposite_coefficients_cancel(tiny):
    v = _vec(tiny.model)
    plain = _run_both(tiny, MultiLayerCapture(tiny.model, layers=[0]), {})[0]
    zero = _run_both(tiny, SteeringHook(tiny.model, v, get_hook_path(0), 0.0), {})[0]
    _assert_same(zero, plain)
    ids, _ = encode(tiny.tokenizer, TEXTS[:1])
    with SteeringHook(tiny.model, v, get_hook_path(0), 4.0), SteeringHook(tiny.model, v, get_hook_path(0), -4.0):
        with torch.no_grad():
            cancelled = tiny.model(ids)
    assert (cancelled - plain[0]).abs().max() <= 1e-6


def test_stacked_steering_adds_and_captures_entered_before_or_after_see_the_steered_activation(tiny):
    v = _vec(tiny.model)
    hook = get_hook_path(0)
    ids, _ = encode(tiny.tokenizer, TEXTS[:1])
    with CaptureHook(tiny.model, hook) as plain, torch.no_grad():
        tiny.model(ids)
    with CaptureHook(tiny.model, hook) as outer:  # entered before the edits: reads still run after them
        with SteeringHook(tiny.model, v, hook, 1.0), SteeringHook(tiny.model, v, hook, 2.0):
            with CaptureHook(tiny.model, hook) as inner, torch.no_grad():
                stacked = tiny.model(ids)
    with SteeringHook(tiny.model, v, hook, 3.0), torch.no_grad():
        single = tiny.model(ids)
    assert (stacked - single).abs().max() <= 1e-6
    assert (inner.get() - (plain.get() + 3.0 * v)).abs().max() <= 1e-5
    assert torch.equal(outer.get(), inner.get())


def test_ablation_equals_hf_edit_zeroes_the_projection_and_is_idempotent(tiny):
    d = _vec(tiny.model, 3)
    r = d / d.norm()
    hook = get_hook_path(0)

    def ref_ablate(h):
        hf = h.float()
        return (hf - (hf @ r)[..., None] * r).to(h.dtype)

    _conforms(tiny, AblationHook(tiny.model, d, hook), {hf_module_for(tiny.reference, 0, "residual"): ref_ablate})
    ids, _ = encode(tiny.tokenizer, TEXTS)
    with AblationHook(tiny.model, d, hook), ProjectionHook(tiny.model, d, hook) as proj, torch.no_grad():
        once = tiny.model(ids)
    assert proj.get().abs().max() <= 1e-5
    with AblationHook(tiny.model, d, hook), AblationHook(tiny.model, 5 * d, hook), torch.no_grad():
        twice = tiny.model(ids)
    assert (twice - once).abs().max() <= 1e-5


def test_multi_layer_ablation_covers_every_layer_by_default(tiny):
    d = _vec(tiny.model, 4)
    ids, _ = encode(tiny.tokenizer, TEXTS[:1])
    n = tiny.model.cfg.n_layers
    with MultiLayerAblation(tiny.model, d), MultiLayerProjection(tiny.model, {l: d for l in range(n)}) as proj:
        with torch.no_grad():
            tiny.model(ids)
    for layer in range(n):
        assert proj.get(layer).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", ["floor", "ceiling"])
def test_capping_equals_hf_edit_bounds_projection_keeps_orthogonal_part_and_is_idempotent(tiny, mode):
    d = _vec(tiny.model, 5)
    v = d / d.norm()
    hook = get_hook_path(0)
    ids, _ = encode(tiny.tokenizer, TEXTS)
    with ProjectionHook(tiny.model, d, hook) as raw, torch.no_grad():
        tiny.model(ids)
    t = raw.get().median().item()  # a threshold that binds on about half of the tokens

    def ref_cap(h):
        hf = h.float()
        p = hf @ v
        shift = (t - p).clamp(min=0) if mode == "floor" else -(p - t).clamp(min=0)
        return (hf + shift[..., None] * v).to(h.dtype)

    adapter = ActivationCappingHook(tiny.model, d, hook, threshold=t, mode=mode)
    _conforms(tiny, adapter, {hf_module_for(tiny.reference, 0, "residual"): ref_cap})
    with CaptureHook(tiny.model, hook) as pre, ActivationCappingHook(tiny.model, d, hook, t, mode):
        with CaptureHook(tiny.model, hook) as post, ProjectionHook(tiny.model, d, hook) as proj, torch.no_grad():
            once = tiny.model(ids)
    scores = proj.get()
    if mode == "floor":
        assert scores.min() >= t - 1e-5 and (raw.get() < t).any()
    else:
        assert scores.max() <= t + 1e-5 and (raw.get() > t).any()
    orth = lambda h: h - (h @ v)[..., None] * v  # noqa: E731
    assert (orth(post.get()) - orth(pre.get())).abs().max() <= 1e-5
    with ActivationCappingHook(tiny.model, d, hook, t, mode), ActivationCappingHook(tiny.model, d, hook, t, mode):
        with torch.no_grad():
            twice = tiny.model(ids)
    assert (twice - once).abs().max() <= 1e-5


def test_multi_layer_capping_caps_each_layer_at_its_threshold(tiny):
    d = _vec(tiny.model, 6)
    ids, _ = encode(tiny.tokenizer, TEXTS)
    thresholds = {0: 0.5, 1: -0.25}
    with MultiLayerActivationCapping(tiny.model, {0: d, 1: d}, thresholds), MultiLayerProjection(tiny.model, {0: d, 1: d}) as p:
        with torch.no_grad():
            tiny.model(ids)
    for layer, t in thresholds.items():
        assert p.get(layer).min() >= t - 1e-5


def test_per_sample_steering_slices_equal_each_slice_steered_alone(tiny):
    ids, mask = encode(tiny.tokenizer, TEXTS)
    v0, v1 = _vec(tiny.model, 7), _vec(tiny.model, 8)
    configs = [(0, v0, 2.0, (0, 2)), (0, v1, -1.0, (1, 3)), (1, v1, 3.0, (2, 3))]
    with PerSampleSteering(tiny.model, configs), torch.no_grad():
        batched = tiny.model(ids, attention_mask=mask)
    # Row 1 is in two overlapping slices, so it gets both vectors.
    alone = [
        [SteeringHook(tiny.model, v0, get_hook_path(0), 2.0)],
        [SteeringHook(tiny.model, v0, get_hook_path(0), 2.0), SteeringHook(tiny.model, v1, get_hook_path(0), -1.0)],
        [SteeringHook(tiny.model, v1, get_hook_path(0), -1.0), SteeringHook(tiny.model, v1, get_hook_path(1), 3.0)],
    ]
    for row, hooks in enumerate(alone):
        with contextlib.ExitStack() as stack, torch.no_grad():
            for h in hooks:
                stack.enter_context(h)
            logits = tiny.model(ids[row : row + 1], attention_mask=mask[row : row + 1])
        real = mask[row].bool()
        assert (batched[row, real] - logits[0, real]).abs().max() <= 1e-5


def test_per_sample_steering_refuses_a_slice_past_the_batch(tiny):
    ids, _ = encode(tiny.tokenizer, TEXTS[:1])
    with pytest.raises(ValueError, match=r"batch slice \(0, 2\) exceeds the batch of 1"):
        with PerSampleSteering(tiny.model, [(0, _vec(tiny.model), 1.0, (0, 2))]), torch.no_grad():
            tiny.model(ids)


def test_per_position_steering_in_one_forward_steers_only_the_range(tiny):
    v = _vec(tiny.model)
    ids, mask = encode(tiny.tokenizer, TEXTS[:1])

    def ref(h):
        out = h.clone()
        out[:, 2:5] += (1.5 * v).to(h.dtype)
        return out

    adapter = PerPositionSteeringHook(tiny.model, v, get_hook_path(0), 1.5, token_range=(2, 5))
    _assert_same(*_run_both(tiny, adapter, {hf_module_for(tiny.reference, 0, "residual"): ref}))


def _generate(model, ids, mask, cached, steps=6):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, use_past_kv_cache=cached,
                         stop_at_eos=False, output_logits=True, verbose=False, return_type="tokens")
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("offset", [(0, None), (-2, 3)], ids=["generated-only", "straddling"])
def test_per_position_steering_under_kv_cache_equals_uncached_and_hf_generate(tiny_sharp, offset):
    t = tiny_sharp
    v = _vec(t.model, 9, scale=0.5)
    ids, mask = encode(t.tokenizer, TEXTS[:1])
    n = ids.shape[1]
    start, end = n + offset[0], None if offset[1] is None else n + offset[1]
    runs = {}
    for cached in (True, False):
        with PerPositionSteeringHook(t.model, v, get_hook_path(0), 2.0, token_range=(start, end)), torch.no_grad():
            runs[cached] = _generate(t.model, ids, mask, cached)
    with torch.no_grad():
        plain = _generate(t.model, ids, mask, True)
    assert not torch.equal(runs[True][1], plain[1]), "the steering must change something for this test to mean anything"

    seen = {"n": 0}  # an independent position counter: one unpadded row, positions are 0, 1, 2, ...

    def counted(h):
        pos = torch.arange(seen["n"], seen["n"] + h.shape[1])
        seen["n"] += h.shape[1]
        inside = (pos >= start) & ((pos < end) if end is not None else True)
        return torch.where(inside[None, :, None], h + (2.0 * v).to(h.dtype), h)

    with hf_hooks(t.reference, {hf_module_for(t.reference, 0, "residual"): counted}), torch.no_grad():
        hf = t.reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, min_new_tokens=6,
                                  output_logits=True, return_dict_in_generate=True, pad_token_id=t.tokenizer.pad_token_id)
    hf_logits = torch.stack(hf.logits, dim=1)
    for tokens, logits in runs.values():
        assert torch.equal(tokens, hf.sequences)
        assert (logits - hf_logits).abs().max() <= 1e-4


def test_per_position_steering_left_padded_rows_equal_their_unpadded_runs(tiny_sharp):
    t = tiny_sharp
    v = _vec(t.model, 10, scale=0.5)
    ids, mask = encode(t.tokenizer, TEXTS[:2])
    assert (mask == 0).any()
    token_range = (3, 9)
    with PerPositionSteeringHook(t.model, v, get_hook_path(0), 2.0, token_range=token_range), torch.no_grad():
        tokens, logits = _generate(t.model, ids, mask, True)
        for row, text in enumerate(TEXTS[:2]):
            a_ids, a_mask = encode(t.tokenizer, [text])
            a_tokens, a_logits = _generate(t.model, a_ids, a_mask, True)
            n = a_ids.shape[1]
            assert torch.equal(tokens[row, -(n + 6):], a_tokens[0])
            assert (logits[row] - a_logits[0]).abs().max() <= 1e-4


def test_per_row_starts_steer_each_left_padded_row_from_its_own_position(tiny_sharp):
    t = tiny_sharp
    v = _vec(t.model, 10, scale=0.5)
    ids, mask = encode(t.tokenizer, TEXTS[:2])
    lengths = mask.sum(dim=1)
    assert lengths[0] != lengths[1]
    starts = lengths - 2  # each row's second-to-last prompt token on
    with PerPositionSteeringHook(t.model, v, get_hook_path(0), 2.0, token_range=(starts, None)), torch.no_grad():
        tokens, logits = _generate(t.model, ids, mask, True)
    for row, text in enumerate(TEXTS[:2]):
        a_ids, a_mask = encode(t.tokenizer, [text])
        with PerPositionSteeringHook(t.model, v, get_hook_path(0), 2.0, token_range=(int(starts[row]), None)), \
                torch.no_grad():
            a_tokens, a_logits = _generate(t.model, a_ids, a_mask, True)
        assert torch.equal(tokens[row, -a_tokens.shape[1]:], a_tokens[0])
        assert (logits[row] - a_logits[0]).abs().max() <= 1e-4
    with PerPositionSteeringHook(t.model, v, get_hook_path(0), 2.0, token_range=(starts, None)), torch.no_grad():
        with pytest.raises(ValueError, match=r"one value per row \(1\); got shape \(2,\)"):
            t.model(ids[:1], attention_mask=mask[:1])


def test_one_adapter_registered_twice_at_a_site_is_an_error(tiny):
    adapter = SteeringHook(tiny.model, _vec(tiny.model), get_hook_path(0), 1.0)
    ids, _ = encode(tiny.tokenizer, TEXTS[:1])
    with pytest.raises(RuntimeError, match="registered twice at blocks.0.hook_out"), torch.no_grad():
        tiny.model.run_with_hooks(ids, fwd_hooks=adapter.fwd_hooks() * 2)
    with adapter, pytest.raises(RuntimeError, match="SteeringHook is active, so its hooks are registered already"):
        adapter.fwd_hooks()


def test_projection_equals_capture_then_project_by_hand(tiny):
    hook = get_hook_path(1)
    vs = torch.stack([_vec(tiny.model, 11), _vec(tiny.model, 12, 3.0)])
    units = vs / vs.norm(dim=1, keepdim=True)
    ids, mask = encode(tiny.tokenizer, TEXTS)
    with CaptureHook(tiny.model, hook) as cap, ProjectionHook(tiny.model, vs[0], hook) as one:
        with ProjectionHook(tiny.model, vs, hook) as many, torch.no_grad():
            tiny.model(ids, attention_mask=mask)
            tiny.model(ids[:1, -4:])
    acts = cap.get(concat=False)
    assert one.get(concat=False)[0].shape == ids.shape
    assert many.get(concat=False)[0].shape == (*ids.shape, 2)
    for a, s_one, s_many, norms in zip(acts, one.get(concat=False), many.get(concat=False), one.get_norms(concat=False)):
        assert (s_many - a @ units.T).abs().max() <= 1e-5
        assert (s_one - a @ units[0]).abs().max() <= 1e-5
        assert (norms - a.norm(dim=-1)).abs().max() <= 1e-5


def test_multi_layer_capture_equals_run_with_cache(tiny):
    ids, mask = encode(tiny.tokenizer, TEXTS)
    with MultiLayerCapture(tiny.model) as cap, torch.no_grad():
        _, cache = tiny.model.run_with_cache(ids, attention_mask=mask)
    assert sorted(cap.get_all()) == list(range(tiny.model.cfg.n_layers))
    for layer, act in cap.get_all().items():
        assert torch.equal(act, cache[get_hook_path(layer)])
    assert torch.equal(cap.get(-1), cap.get(tiny.model.cfg.n_layers - 1))
    with pytest.raises(KeyError, match="layer 0 was not hooked"):
        MultiLayerCapture(tiny.model, layers=[1]).get(0)


def test_repeated_forwards_concatenate_on_the_batch_dim(tiny):
    ids, _ = encode(tiny.tokenizer, TEXTS[:1])
    with CaptureHook(tiny.model, get_hook_path(0)) as cap, torch.no_grad():
        tiny.model(ids)
        tiny.model(ids)
    assert cap.get().shape == (2, ids.shape[1], tiny.model.cfg.d_model)
    assert torch.equal(cap.get()[0], cap.get()[1])
    cap.clear()
    with pytest.raises(ValueError, match=r"nothing captured at blocks.0.hook_resid_post"):
        cap.get()


def test_calibrated_threshold_is_the_percentile_of_real_token_projections(tiny):
    d = _vec(tiny.model, 13)
    t = calibrate_cap_threshold(tiny.model, d, 1, TEXTS, percentile=25, batch_size=2)
    by_hand = []
    for text in TEXTS:
        ids, _ = encode(tiny.tokenizer, [text])
        with CaptureHook(tiny.model, get_hook_path(1)) as cap, torch.no_grad():
            tiny.model(ids)
        by_hand.append(cap.get()[0] @ (d / d.norm()))
    assert t == pytest.approx(torch.quantile(torch.cat(by_hand), 0.25).item(), abs=1e-5)


def test_bad_inputs_fail_fast_with_the_numbers(tiny):
    m, d = tiny.model, tiny.model.cfg.d_model
    n = m.cfg.n_layers
    with pytest.raises(ValueError, match=r"vector must be 1-D \[d_model\]; got shape \(2, 64\)"):
        SteeringHook(m, torch.ones(2, d), get_hook_path(0))
    with pytest.raises(ValueError, match=rf"vector has {d + 1} elements but blocks.0.hook_resid_post has width {d}: .*another model"):
        SteeringHook(m, torch.ones(d + 1), get_hook_path(0))
    with pytest.raises(ValueError, match=r"direction must have norm >= 1e-08 to define a direction; got norm 0$"):
        AblationHook(m, torch.zeros(d), get_hook_path(0))
    with pytest.raises(ValueError, match=r"direction must have norm >= 1e-08 to define a direction; got norm 1e-09$"):
        AblationHook(m, torch.full((d,), 1e-9 / d**0.5), get_hook_path(0))
    with pytest.raises(ValueError, match=r"unknown component 'resid'"):
        MultiLayerCapture(m, component="resid")
    with pytest.raises(ValueError, match=rf"layer {n} is out of range for a model with {n} layers"):
        MultiLayerSteering(m, [(n, torch.ones(d), 1.0)])
    with pytest.raises(ValueError, match=r"unknown capping mode 'clip'"):
        ActivationCappingHook(m, torch.ones(d), get_hook_path(0), 0.0, mode="clip")
    with pytest.raises(ValueError, match=r"vectors_by_layer has layers \[0, 1\] but thresholds_by_layer has \[0\]"):
        MultiLayerActivationCapping(m, {0: torch.ones(d), 1: torch.ones(d)}, {0: 1.0})
    for bad in [(5, 2), (-1, None), (torch.tensor([1, 4]), 3), (torch.tensor([-1, 2]), None)]:
        with pytest.raises(ValueError, match=r"token_range must be \(start, end\)"):
            PerPositionSteeringHook(m, torch.ones(d), get_hook_path(0), token_range=bad)
    with pytest.raises(ValueError, match=r"configs\[0\]: rows must be \(start, end\) integers with 0 <= start < end; got \(2, 2\)"):
        PerSampleSteering(m, [(0, torch.ones(d), 1.0, (2, 2))])
    with pytest.raises(ValueError, match=r"vector contains NaN or inf"):
        SteeringHook(m, torch.full((d,), float("nan")), get_hook_path(0))
    hook = SteeringHook(m, torch.ones(d), get_hook_path(0))
    with hook, pytest.raises(RuntimeError, match="already active"):
        hook.__enter__()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_edits_equal_the_hf_edit_at_the_first_a_middle_and_the_last_layer(architecture, dtype):
    t = cached_tiny(architecture, n_layers=5, dtype=dtype)
    ids, _ = encode(t.tokenizer, [" ".join(TEXTS * 3)])  # longer than the sliding windows (8; Mistral 64 is crossed in test_parity)
    with torch.no_grad():
        plain = t.model(ids)
    # one component per layer, a different one each (every component at layer 0 is covered above in fp32)
    for layer, component in [(0, "residual"), (2, "attn_contribution"), (4, "mlp_contribution"), (4, "residual")]:
        hook, module = get_hook_path(layer, component), hf_module_for(t.reference, layer, component)
        v = _vec(t.model, layer, scale=4.0)
        r = v / v.norm()
        cases = [
            (SteeringHook(t.model, v, hook, 2.0), lambda h: h + (2.0 * v).to(h.dtype)),
            (AblationHook(t.model, v, hook), lambda h: (h.float() - (h.float() @ r)[..., None] * r).to(h.dtype)),
            (ActivationCappingHook(t.model, v, hook, threshold=1.0),
             lambda h: (h.float() + (1.0 - h.float() @ r).clamp(min=0)[..., None] * r).to(h.dtype)),
        ]
        for adapter, edit in cases:
            with adapter, torch.no_grad():
                ours = t.model(ids)
            with hf_hooks(t.reference, {module: edit}), torch.no_grad():
                ref = t.reference(ids).logits
            assert torch.equal(ours, ref), (layer, component, type(adapter).__name__)
            assert not torch.equal(ours, plain), "every edit must change the logits for this test to mean anything"
