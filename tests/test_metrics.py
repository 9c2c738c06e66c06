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
    with pytest.raises(ValueError, match="pos_proj must be a 1-D sequence of at least 2 scores, got shape \\(1,\\)"):
        effect_size([1.0], [0.0, 2.0])


def test_polarity_correct():
    assert polarity_correct([1.0, 2.0], [0.0, 1.0]) is True
    assert polarity_correct([0.0, 1.0], [1.0, 2.0]) is False


def test_pearson_correlation_hand_computed():
    # x centred [-1,0,1]; y = [2,4,7], mean 13/3, centred [-7/3,-1/3,8/3]
    # r = (7/3 + 8/3) / (sqrt2 * sqrt(114)/3) = 5 / (sqrt2 * sqrt(114)/3) = 0.993399...
    assert pearson_correlation([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / (2**0.5 * 114**0.5 / 3))
    assert pearson_correlation([1, 2, 3], [5, 5, 5]) == 0.0  # constant: denominator clamped, r = 0
    with pytest.raises(ValueError, match="same length, got 3 and 2"):
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


def test_scores_must_be_one_dimensional():
    with pytest.raises(ValueError, match="pos_scores must be a 1-D sequence of at least 1 scores, got shape \\(2, 1\\)"):
        auroc(torch.ones(2, 1), torch.ones(2))
