"""Extraction methods: one contract battery over every method, then each method's own behaviour."""

import pytest
import torch

from tracelens.math import cosine_similarity
from tracelens.methods import METHODS, PreCleanedMethod, get_method
from tracelens.methods.base import Split, holdout_split
from tracelens.methods.fisher import maximise_separation
from tracelens.metrics import auroc

ALL = list(METHODS)
ORIENTED = [name for name in ALL if name != "random_baseline"]
WIDTH = 12


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These fits are tiny; on a shared 2-core machine torch's thread pool costs more than it gains (6x for rfm)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted():
    """Unit direction u and 30 rows per class at +-1.5 u in N(0, I) noise (d' = 3 along u)."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(WIDTH, generator=g)
    u /= u.norm()
    pos = torch.randn(30, WIDTH, generator=g) + 1.5 * u
    neg = torch.randn(30, WIDTH, generator=g) - 1.5 * u
    return u, pos, neg


def extract(name, pos, neg, **kwargs):
    return get_method(name).extract(pos, neg, **({"seed": 0} if name == "random_baseline" else {}), **kwargs)


CONVERGED = {"gradient": {"num_steps": 2000}}
"""Budgets at which a method reaches its optimum from any start (the seed's 100 gradient steps may not)."""


# ---- the contract, for every method ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_returns_float32_unit_vector(name, planted):
    _, pos, neg = planted
    vector = extract(name, pos, neg)["vector"]
    assert vector.dtype == torch.float32 and vector.shape == (WIDTH,)
    assert vector.norm().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", ORIENTED)
def test_recovers_and_orients_the_planted_direction(name, planted):
    u, pos, neg = planted
    vector = extract(name, pos, neg, **CONVERGED.get(name, {}))["vector"]
    assert (pos @ vector).mean() > (neg @ vector).mean()
    assert cosine_similarity(vector, u) > 0.85


@pytest.mark.parametrize("name", ORIENTED)
def test_orientation_follows_the_labels(name, planted):
    _, pos, neg = planted
    budget = CONVERGED.get(name, {})
    forward, backward = extract(name, pos, neg, **budget)["vector"], extract(name, neg, pos, **budget)["vector"]
    assert cosine_similarity(forward, backward) < -0.85


@pytest.mark.parametrize("name", ALL)
def test_deterministic(name, planted):
    _, pos, neg = planted
    assert torch.equal(extract(name, pos, neg)["vector"], extract(name, pos, neg)["vector"])


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_upcast(name, dtype, planted):
    _, pos, neg = planted
    result = extract(name, pos.to(dtype), neg.to(dtype))
    assert result["vector"].dtype == torch.float32
    reference = extract(name, pos.to(dtype).float(), neg.to(dtype).float())["vector"]
    assert torch.allclose(result["vector"], reference, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_stable_when_activations_are_scaled_by_1e4(name, planted):
    _, pos, neg = planted
    small, large = extract(name, pos, neg)["vector"], extract(name, pos * 1e4, neg * 1e4)["vector"]
    assert torch.isfinite(large).all()
    assert cosine_similarity(small, large) > 0.999


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_under_no_grad_and_inference_mode(name, context, planted):
    _, pos, neg = planted
    expected = extract(name, pos, neg)["vector"]
    with context():
        pos_ctx, neg_ctx = pos.clone(), neg.clone()  # inference tensors under inference_mode
        vector = extract(name, pos_ctx, neg_ctx)["vector"]
    assert torch.allclose(vector, expected, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_inputs_are_not_modified(name, planted):
    _, pos, neg = planted
    pos_copy, neg_copy = pos.clone(), neg.clone()
    PreCleanedMethod(get_method(name), [0]).extract(pos, neg, **({"seed": 0} if name == "random_baseline" else {}))
    assert torch.equal(pos, pos_copy) and torch.equal(neg, neg_copy)


# ---- input checks ---------------------------------------------------------------------------------------------


@pytest.mark.unchecked_types
@pytest.mark.parametrize("name", ALL)
def test_width_mismatch(name):
    with pytest.raises(ValueError, match="pos_acts has width 4 but neg_acts has width 5; both classes must come"):
        extract(name, torch.randn(4, 4), torch.randn(4, 5))


@pytest.mark.parametrize("name", ALL)
def test_non_finite_values(name):
    neg = torch.randn(4, 3)
    neg[1, 2] = float("nan")
    with pytest.raises(ValueError, match="neg_acts has 1 non-finite values"):
        extract(name, torch.randn(4, 3), neg)


@pytest.mark.parametrize("name", ALL)
def test_float16_overflow_is_reported(name):
    with pytest.raises(ValueError, match="pos_acts has 1 non-finite values .*float16 activations overflow"):
        extract(name, torch.tensor([[70000.0, 0], [1, 1], [0, 1]]).half(), torch.randn(3, 2).half())


@pytest.mark.parametrize(("name", "rows"), [("fisher", 3), ("rfm", 2)])
def test_too_few_rows(name, rows):
    with pytest.raises(ValueError, match=f"neg_acts has {rows - 1} rows but {name} needs at least {rows} per class"):
        extract(name, torch.randn(5, 3), torch.randn(rows - 1, 3))


@pytest.mark.parametrize("name", ["mean_diff", "probe", "random_baseline"])
def test_one_row_per_class_is_enough(name):
    result = extract(name, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert result["vector"].norm().item() == pytest.approx(1.0)


@pytest.mark.unchecked_types
def test_shape_and_type_checks():
    with pytest.raises(ValueError, match="pos_acts must be 2-D \\[n, d\\]; got shape \\(3,\\)"):
        get_method("mean_diff").extract(torch.ones(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="neg_acts must be a torch.Tensor of shape \\[n, d\\]; got list"):
        get_method("mean_diff").extract(torch.ones(2, 3), [[1.0, 2.0, 3.0]])


@pytest.mark.unchecked_types
def test_validation_split_checks():
    pos, neg = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="pass both val_pos_acts and val_neg_acts, or neither"):
        get_method("rfm").extract(pos, neg, val_pos_acts=pos)
    with pytest.raises(ValueError, match="val_pos_acts has width 2 but pos_acts has width 3"):
        get_method("rfm").extract(pos, neg, val_pos_acts=torch.randn(2, 2), val_neg_acts=torch.randn(2, 2))


def test_unknown_hyperparameter_lists_the_accepted_ones():
    with pytest.raises(TypeError, match="mean_diff got unexpected keyword arguments \\['seed'\\]; it accepts \\[\\]"):
        get_method("mean_diff").extract(torch.randn(2, 3), torch.randn(2, 3), seed=1)


def test_identical_classes_have_no_direction():
    acts = torch.randn(4, 3)
    with pytest.raises(ValueError, match="mean_diff found no direction"):
        get_method("mean_diff").extract(acts, acts)
    with pytest.raises(ValueError, match="fisher found no direction: the two classes have identical means"):
        get_method("fisher").extract(acts, acts)


def test_get_method_unknown_name_lists_the_methods():
    with pytest.raises(ValueError, match="unknown extraction method 'pca'; available methods: mean_diff, probe, gradient, fisher, random_baseline, rfm"):
        get_method("pca")


# ---- per-method behaviour -------------------------------------------------------------------------------------


def test_mean_diff_hand_computed():
    # means [2, 0] and [0, 2] -> diff [2, -2] -> [1, -1]/sqrt2
    result = get_method("mean_diff").extract(torch.tensor([[1.0, 0], [3, 0]]), torch.tensor([[0.0, 1], [0, 3]]))
    assert torch.allclose(result["vector"], torch.tensor([1.0, -1.0]) / 2**0.5)
    assert torch.equal(result["pos_mean"], torch.tensor([2.0, 0])) and torch.equal(result["neg_mean"], torch.tensor([0.0, 2]))


def test_probe_sees_row_normalised_activations(planted):
    # scaling each row by its own positive factor leaves the normalised rows, so the probe, unchanged
    _, pos, neg = planted
    factors = torch.linspace(0.1, 100, 30)[:, None]
    result, rescaled = extract("probe", pos, neg), extract("probe", pos * factors, neg * factors.flip(0))
    assert torch.allclose(result["vector"], rescaled["vector"], atol=1e-5)
    assert isinstance(result["bias"], float) and 0.9 <= result["train_acc"] <= 1.0


def _seed_gradient(pos, neg, seed=0, num_steps=100, lr=0.01, regularization=0.01):
    """The seed's GradientMethod loop, written out on the global RNG as the original did."""
    torch.manual_seed(seed)
    vector = torch.randn(pos.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([vector], lr=lr)
    for _ in range(num_steps):
        optimizer.zero_grad()
        v_norm = vector / (vector.norm() + 1e-8)
        loss = -((pos @ v_norm).mean() - (neg @ v_norm).mean()) + regularization * vector.norm()
        loss.backward()
        optimizer.step()
    final = vector.detach() / (vector.detach().norm() + 1e-8)
    return final if (pos @ final).mean() >= (neg @ final).mean() else -final


@pytest.mark.parametrize("seed", [0, 4])
def test_gradient_is_the_seeds_adam_loop(planted, seed):
    _, pos, neg = planted
    result = get_method("gradient").extract(pos, neg, seed=seed)
    reference = _seed_gradient(pos, neg, seed=seed)
    assert torch.allclose(result["vector"], reference, atol=1e-6)
    assert result["final_separation"] == pytest.approx(float((pos @ reference).mean() - (neg @ reference).mean()), rel=1e-5)


def test_gradient_reaches_mean_diff_only_with_enough_steps(planted):
    # the separation of unit projections is maximised by the mean difference; 100 Adam steps of lr 0.01 can stop
    # far from it (seed 4 starts almost opposite); 2000 steps come close from every start (Adam's fixed step
    # leaves a jitter of about 1% once the norm penalty has shrunk ||v||)
    _, pos, neg = planted
    target = extract("mean_diff", pos, neg)["vector"]
    short = [cosine_similarity(extract("gradient", pos, neg, seed=s)["vector"], target) for s in range(5)]
    assert min(short) < 0.5 and max(short) > 0.999
    for s in range(5):
        assert cosine_similarity(extract("gradient", pos, neg, seed=s, num_steps=2000)["vector"], target) > 0.98


def test_gradient_is_seeded_and_leaves_the_global_rng_alone(planted):
    _, pos, neg = planted
    state = torch.get_rng_state()
    a = extract("gradient", pos, neg, seed=1)["vector"]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, extract("gradient", pos, neg, seed=1)["vector"])
    assert not torch.equal(a, extract("gradient", pos, neg, seed=2)["vector"])
    with torch.inference_mode():
        assert torch.equal(a, extract("gradient", pos, neg, seed=1)["vector"])
    with pytest.raises(ValueError, match="num_steps must be >= 0; got -1"):
        extract("gradient", pos, neg, num_steps=-1)


def test_fisher_converges_to_the_closed_form(planted):
    # with shrinkage g the maximiser is S^-1 delta in standardised units, S = (1-g) C + g c I; mapped back by 1/s
    _, pos, neg = planted
    result = get_method("fisher").extract(pos, neg, shrinkage=0.3)
    centered = torch.cat([pos - pos.mean(0), neg - neg.mean(0)]).double()
    s = (centered.pow(2).sum(0) / 58).sqrt()
    z, delta = centered / s, (pos.mean(0) - neg.mean(0)).double() / s
    cov = z.T @ z / 58
    shrunk = 0.7 * cov + 0.3 * cov.trace() / WIDTH * torch.eye(WIDTH, dtype=torch.float64)
    closed_form = torch.linalg.solve(shrunk, delta) / s
    assert result["converged"] and result["val_auc"] == {}
    assert cosine_similarity(result["vector"], closed_form.float()) > 1 - 1e-6
    # J at the optimum is sqrt(delta' S^-1 delta)
    assert result["final_separation"] == pytest.approx(float(delta @ torch.linalg.solve(shrunk, delta)) ** 0.5)


def test_fisher_reaches_the_same_optimum_from_any_seed(planted):
    _, pos, neg = planted
    a = get_method("fisher").extract(pos, neg, seed=1)["vector"]
    b = get_method("fisher").extract(pos, neg, seed=2)["vector"]
    assert cosine_similarity(a, b) > 1 - 1e-6


def test_fisher_warns_when_it_runs_out_of_iterations(planted):
    _, pos, neg = planted
    with pytest.warns(RuntimeWarning, match="fisher did not converge in 1 iterations"):
        result = get_method("fisher").extract(pos, neg, shrinkage=0.3, max_iter=1)
    assert result["converged"] is False


def test_fisher_chooses_shrinkage_on_the_validation_split(planted):
    _, pos, neg = planted
    result = get_method("fisher").extract(pos, neg, shrinkage_grid=(1.0, 0.5))
    assert set(result["val_auc"]) == {1.0, 0.5} and result["shrinkage"] in (1.0, 0.5)
    with pytest.raises(ValueError, match="shrinkage must be in \\(0, 1\\]; got 0"):
        get_method("fisher").extract(pos, neg, shrinkage=0)


def test_fisher_ignores_a_massive_dimension_without_signal(planted):
    # dim 0 gets a class-independent value ~1000 +- 100: it dominates mean_diff but not the standardised objective
    _, pos, neg = planted
    g = torch.Generator().manual_seed(1)
    massive_pos, massive_neg = pos.clone(), neg.clone()
    massive_pos[:, 0] += 1000 + 100 * torch.randn(30, generator=g)
    massive_neg[:, 0] += 1000 + 100 * torch.randn(30, generator=g)
    assert extract("mean_diff", massive_pos, massive_neg)["vector"][0].abs() > 0.9
    vector = extract("fisher", massive_pos, massive_neg)["vector"]
    assert vector[0].abs() < 0.01
    # the signal u carried in dim 0 is lost under the noise there; the other dims barely change
    assert cosine_similarity(vector[1:], extract("fisher", pos, neg)["vector"][1:]) > 0.95


def test_maximise_separation_is_scale_free(planted):
    _, pos, neg = planted
    a = maximise_separation(pos, neg, 0.5)
    b = maximise_separation(pos * 1e4, neg * 1e4, 0.5)
    assert a.separation == pytest.approx(b.separation, rel=1e-6)


def test_random_baseline_seeding_and_global_state(planted):
    _, pos, neg = planted
    state = torch.get_rng_state()
    a = get_method("random_baseline").extract(pos, neg, seed=3)["vector"]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, get_method("random_baseline").extract(pos * 2, neg, seed=3)["vector"])
    assert not torch.equal(a, get_method("random_baseline").extract(pos, neg, seed=4)["vector"])
    unseeded = [get_method("random_baseline").extract(pos, neg)["vector"] for _ in range(2)]
    assert not torch.equal(*unseeded)


def test_rfm_reports_the_validation_auc_of_its_vector(planted):
    u, pos, neg = planted
    g = torch.Generator().manual_seed(2)
    val_pos = torch.randn(10, WIDTH, generator=g) + 1.5 * u
    val_neg = torch.randn(10, WIDTH, generator=g) - 1.5 * u
    result = get_method("rfm").extract(pos, neg, val_pos_acts=val_pos, val_neg_acts=val_neg, bandwidths=(10.0,))
    vector = result["vector"]
    assert result["val_auc"] == pytest.approx(auroc(val_pos @ vector, val_neg @ vector))
    assert result["bandwidth"] == 10.0 and result["center_grads"] in (False, True)
    assert [(e["bandwidth"], e["center_grads"]) for e in result["grid"]] == [(10.0, False), (10.0, True)]


def test_rfm_predictor_selection_is_the_seeds_and_picks_the_best_predictor(planted, monkeypatch):
    import xrfm

    u, pos, neg = planted
    g = torch.Generator().manual_seed(2)
    val_pos = torch.randn(10, WIDTH, generator=g) + 1.5 * u
    val_neg = torch.randn(10, WIDTH, generator=g) - 1.5 * u
    predictions, fitted = [], []
    original_predict, original_fit = xrfm.RFM.predict, xrfm.RFM.fit

    def recording_predict(self, samples, *args, **kwargs):
        out = original_predict(self, samples, *args, **kwargs)
        predictions.append(out[:, 0].clone())
        return out

    def recording_fit(self, *args, **kwargs):
        out = original_fit(self, *args, **kwargs)
        fitted.append(len(predictions))  # xrfm predicts during fit too; the first call after it is the scoring one
        return out

    monkeypatch.setattr(xrfm.RFM, "predict", recording_predict)
    monkeypatch.setattr(xrfm.RFM, "fit", recording_fit)
    result = get_method("rfm").extract(
        pos, neg, val_pos_acts=val_pos, val_neg_acts=val_neg, selection="predictor", reg=1e-3
    )
    # an independent score of each pair's predictor: AUROC of the predictions recorded on the validation rows
    by_hand = [auroc(predictions[i][:10], predictions[i][10:]) for i in fitted]
    assert [e["predictor_auc"] for e in result["grid"]] == pytest.approx(by_hand)
    best = max(result["grid"], key=lambda e: e["predictor_auc"])
    assert (result["bandwidth"], result["center_grads"]) == (best["bandwidth"], best["center_grads"])
    assert result["predictor_auc"] == best["predictor_auc"]
    with pytest.raises(ValueError, match="selection must be 'vector' or 'predictor'; got 'auc'"):
        get_method("rfm").extract(pos, neg, selection="auc")


def test_rfm_raises_with_the_cause_when_every_fit_fails(planted, monkeypatch):
    import xrfm

    def broken_fit(self, *args, **kwargs):
        raise ValueError("singular kernel")

    monkeypatch.setattr(xrfm.RFM, "fit", broken_fit)
    _, pos, neg = planted
    with pytest.raises(RuntimeError, match="rfm: every fit failed \\(bandwidth=1.0, center_grads=False: ValueError: singular kernel"):
        get_method("rfm").extract(pos, neg)


def test_rfm_skips_a_failing_pair(planted, monkeypatch):
    import xrfm

    original = xrfm.RFM.fit

    def flaky_fit(self, *args, center_grads=False, **kwargs):
        if center_grads:
            raise RuntimeError("boom")
        return original(self, *args, center_grads=center_grads, **kwargs)

    monkeypatch.setattr(xrfm.RFM, "fit", flaky_fit)
    _, pos, neg = planted
    result = get_method("rfm").extract(pos, neg, bandwidths=(10.0,))
    assert result["center_grads"] is False
    assert result["grid"][1] == {"bandwidth": 10.0, "center_grads": True, "error": "RuntimeError: boom"}


def test_holdout_split():
    split = Split(torch.arange(10.0)[:, None], torch.arange(2.0)[:, None])
    held = holdout_split(split, 0.2, seed=0)
    # 10 rows: round(2) = 2 held out; 2 rows: max(1, round(0.4)) = 1, leaving 1
    assert (len(held.pos), len(held.val_pos), len(held.neg), len(held.val_neg)) == (8, 2, 1, 1)
    assert sorted(torch.cat([held.pos, held.val_pos]).flatten().tolist()) == list(range(10))
    assert holdout_split(held, 0.5, seed=1) is held  # an existing validation split is kept
    with pytest.raises(ValueError, match="val_fraction must be in \\(0, 1\\); got 1.5"):
        holdout_split(split, 1.5, seed=0)


def test_pre_cleaned_method_zeroes_the_dims_first():
    # dim 1 differs hugely between classes; cleaned, mean_diff sees only dim 0: [1,.] - [0,.] -> [1, 0]
    pos, neg = torch.tensor([[1.0, 500.0], [1.0, 700.0]]), torch.tensor([[0.0, 0.0], [0.0, 10.0]])
    method = PreCleanedMethod(get_method("mean_diff"), [1, 99])
    result = method.extract(pos, neg)
    assert torch.equal(result["vector"], torch.tensor([1.0, 0.0]))
    assert result["massive_dims"] == [1, 99] and method.name == "mean_diff[cleaned]"
    assert torch.equal(result["pos_mean"], torch.tensor([1.0, 0.0]))
    # no dims: exactly the base method
    assert torch.equal(PreCleanedMethod(get_method("mean_diff")).extract(pos, neg)["vector"], extract("mean_diff", pos, neg)["vector"])
