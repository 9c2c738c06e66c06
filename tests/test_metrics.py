"""Hand-computed oracles for tracelens.metrics."""

import pytest
import torch

from tracelens.metrics import accuracy, auroc, effect_size, pearson_correlation, polarity_correct


def test_accuracy_midpoint_threshold():
    # means 2.5 and 0.5 -> threshold 1.5: every score on its side -> 1.0
    assert accuracy([2.0, 3.0], [0.0, 1.0]) == 1.0
    # means 2 and 1 -> threshold 1.5: pos [1, 3] -> 1/2 above; neg [0, 2] -> 1/2 at or below -> 0.5
    assert accuracy([1.0, 3.0], [0.0, 2.0]) == 0.5


def test_accuracy_explicit_threshold_counts_ties_as_negative():
    # threshold 2: pos [1, 3] -> 1/2 strictly above; neg [0, 2] -> 2/2 at or below -> (0.5 + 1) / 2
    assert accuracy(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.0]), threshold=2.0) == 0.75


def test_effect_size_hand_computed():
    # pos [1,3]: mean 2, unbiased var 2; neg [0,2]: mean 1, var 2; pooled sqrt((2+2)/2) = sqrt2 -> d = 1/sqrt2
    assert effect_size([1.0, 3.0], [0.0, 2.0]) == pytest.approx(2**-0.5)
    assert effect_size([0.0, 2.0], [1.0, 3.0]) == pytest.approx(2**-0.5)
    assert effect_size([0.0, 2.0], [1.0, 3.0], signed=True) == pytest.approx(-(2**-0.5))


def test_effect_size_zero_spread_and_one_sample():
    assert effect_size([1.0, 1.0], [0.0, 0.0]) == 0.0
    with pytest.raises(ValueError, match="pos_proj must be a 1-D sequence of at least 2 scores; got shape \\(1,\\)"):
        effect_size([1.0], [0.0, 2.0])


def test_polarity_correct():
    assert polarity_correct([1.0, 2.0], [0.0, 1.0]) is True
    assert polarity_correct([0.0, 1.0], [1.0, 2.0]) is False


def test_pearson_correlation_hand_computed():
    # x centred [-1,0,1]; y = [2,4,7], mean 13/3, centred [-7/3,-1/3,8/3]
    # r = (7/3 + 8/3) / (sqrt2 * sqrt(114)/3) = 5 / (sqrt2 * sqrt(114)/3) = 0.993399...
    assert pearson_correlation([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / (2**0.5 * 114**0.5 / 3))
    assert pearson_correlation([1, 2, 3], [5, 5, 5]) == 0.0  # constant: denominator clamped, r = 0
    with pytest.raises(ValueError, match="same length; got 3 and 2"):
        pearson_correlation([1, 2, 3], [1, 2])


def test_auroc_hand_computed():
    # pairs (pos, neg): (1,0)=1 (1,2)=0 (2,0)=1 (2,2)=1/2 (3,0)=1 (3,2)=1 -> 4.5 / 6
    assert auroc([1.0, 2.0, 3.0], [0.0, 2.0]) == 0.75
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert auroc([1.0, 1.0], [1.0]) == 0.5


def test_metrics_accept_half_precision():
    pos, neg = torch.tensor([1.0, 3.0], dtype=torch.bfloat16), torch.tensor([0.0, 2.0], dtype=torch.float16)
    assert auroc(pos, neg) == 0.75  # (1,0)=1 (1,2)=0 (3,0)=1 (3,2)=1 -> 3/4
    assert effect_size(pos, neg) == pytest.approx(2**-0.5)


@pytest.mark.unchecked_types
def test_scores_must_be_one_dimensional():
    with pytest.raises(ValueError, match="pos_scores must be a 1-D sequence of at least 1 scores; got shape \\(2, 1\\)"):
        auroc(torch.ones(2, 1), torch.ones(2))


def test_paired_separation_points_equal_the_plain_metrics_and_intervals_contain_them():
    from tracelens.metrics import paired_separation

    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(15, generator=g) + 1.0, torch.randn(15, generator=g)
    got = paired_separation(pos, neg, threshold=0.3)
    assert got["auroc"].value == pytest.approx(auroc(pos, neg))
    assert got["accuracy"].value == pytest.approx(accuracy(pos, neg, threshold=0.3))
    assert got["effect_size"].value == pytest.approx(effect_size(pos, neg, signed=True))
    for e in got.values():
        assert e.lo <= e.value <= e.hi and e.lo < e.hi
    assert paired_separation(pos, neg, 0.3) == got  # seeded
    assert paired_separation(pos, neg, 0.3, seed=1) != got


def test_paired_bootstrap_resamples_questions_not_answers():
    from tracelens.metrics import paired_separation

    # Perfect separation: every resample of questions is still perfect, so the interval is [1, 1].
    got = paired_separation([2.0, 3.0, 4.0], [0.0, 1.0, 1.5], threshold=1.75)
    assert (got["auroc"].lo, got["auroc"].hi, got["accuracy"].lo) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="one positive and one negative per question"):
        paired_separation([1.0, 2.0, 3.0], [0.0, 1.0], threshold=0.5)


def test_bootstrap_mean_and_resample_counts():
    from tracelens.metrics import bootstrap_mean, resample_counts

    w = resample_counts(7, 200, seed=3)
    assert w.shape == (200, 7) and torch.all(w.sum(1) == 7)
    assert bootstrap_mean([2.0, 2.0, 2.0]).to_dict() == {"value": 2.0, "lo": 2.0, "hi": 2.0}
    e = bootstrap_mean(torch.arange(100.0))
    assert e.value == 49.5 and 40 < e.lo < 49.5 < e.hi < 60  # sd/sqrt(n) = 2.9: +-1.96 * 2.9 = +-5.7
    assert f"{e:.1f}".startswith("49.5 [")
