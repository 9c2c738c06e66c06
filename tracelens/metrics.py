"""Separation metrics on projection scores of positive and negative examples.

Inputs are 1-D score tensors (``n_pos`` and ``n_neg`` long, any float dtype, lists accepted) such as
``projection(acts, vector)``; results are Python floats or bools.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from scipy.stats import rankdata
from torch import Tensor

Scores = Float[Tensor, " n"] | Sequence[float]


def _scores(x: Scores, name: str, min_len: int = 1) -> Float[Tensor, " n"]:
    """Return ``x`` as a 1-D float64 tensor, raising ValueError if it is not 1-D or too short."""
    t = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    if t.ndim != 1 or t.shape[0] < min_len:
        raise ValueError(f"{name} must be a 1-D sequence of at least {min_len} scores, got shape {tuple(t.shape)}.")
    return t


def accuracy(pos_proj: Scores, neg_proj: Scores, threshold: float | None = None) -> float:
    """Balanced accuracy of the rule "score > threshold means positive", in [0, 1].

    The default threshold is the midpoint of the two class means. A positive is correct when strictly above
    the threshold, a negative when at or below it; the result is the mean of the two per-class accuracies.
    """
    pos, neg = _scores(pos_proj, "pos_proj"), _scores(neg_proj, "neg_proj")
    if threshold is None:
        threshold = float((pos.mean() + neg.mean()) / 2)
    return float(((pos > threshold).double().mean() + (neg <= threshold).double().mean()) / 2)


def effect_size(pos_proj: Scores, neg_proj: Scores, signed: bool = False) -> float:
    """Cohen's d: ``(mean_pos - mean_neg) / sqrt((var_pos + var_neg) / 2)`` with unbiased variances.

    Returns |d| unless ``signed`` (then positive means pos > neg). A zero pooled std gives 0.0.
    Needs at least 2 scores per class (ValueError otherwise).
    """
    pos, neg = _scores(pos_proj, "pos_proj", 2), _scores(neg_proj, "neg_proj", 2)
    pooled = torch.sqrt((pos.var() + neg.var()) / 2)
    if pooled <= 0:
        return 0.0
    d = float((pos.mean() - neg.mean()) / pooled)
    return d if signed else abs(d)


def polarity_correct(pos_proj: Scores, neg_proj: Scores) -> bool:
    """True if the positive scores have the larger mean (the vector points the right way)."""
    return bool(_scores(pos_proj, "pos_proj").mean() > _scores(neg_proj, "neg_proj").mean())


def pearson_correlation(x: Scores, y: Scores) -> float:
    """Pearson r of two equal-length sequences, in [-1, 1]; a constant input gives 0 (denominator >= 1e-8)."""
    x, y = _scores(x, "x", 2), _scores(y, "y", 2)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}.")
    xc, yc = x - x.mean(), y - y.mean()
    return float((xc @ yc) / (xc.norm() * yc.norm()).clamp_min(1e-8))


def auroc(pos_scores: Scores, neg_scores: Scores) -> float:
    """Area under the ROC curve: P(random positive scores above random negative), ties counting 1/2.

    Threshold-free and scale-free; 0.5 is chance, 1.0 perfect separation, 0.0 perfectly reversed.
    Computed from the Mann-Whitney U statistic with average ranks for ties.
    """
    pos, neg = _scores(pos_scores, "pos_scores"), _scores(neg_scores, "neg_scores")
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    ranks = rankdata(torch.cat([pos, neg]).numpy())
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))
