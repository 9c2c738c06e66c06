"""Separation metrics on projection scores of positive and negative examples.

Inputs are 1-D score tensors (``n_pos`` and ``n_neg`` long, any float dtype, lists accepted) such as
``projection(acts, vector)``; results are Python floats or bools.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from scipy.stats import rankdata
from torch import Tensor

from tracelens.errors import ConfigError, ShapeError


Scores = Float[Tensor, " n"] | Sequence[float]


def _scores(x: Scores, name: str, min_len: int = 1) -> Float[Tensor, " n"]:
    """Return ``x`` as a 1-D float64 tensor, raising ValueError if it is not 1-D or too short."""
    t = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    if t.ndim != 1 or t.shape[0] < min_len:
        raise ShapeError(f"{name} must be a 1-D sequence of at least {min_len} scores; got shape {tuple(t.shape)}.")
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
        raise ShapeError(f"x and y must have the same length; got {x.shape[0]} and {y.shape[0]}.")
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


# --- intervals ----------------------------------------------------------------------------------------

N_RESAMPLES, LEVEL = 1000, 0.95


@dataclass(frozen=True)
class Estimate:
    """A point value with its bootstrap interval ``[lo, hi]`` (95% percentile interval unless stated)."""

    value: float
    lo: float
    hi: float

    def to_dict(self) -> dict[str, float]:
        return {"value": round(self.value, 4), "lo": round(self.lo, 4), "hi": round(self.hi, 4)}

    @classmethod
    def from_dict(cls, d: Mapping[str, float]) -> Estimate:
        return cls(float(d["value"]), float(d["lo"]), float(d["hi"]))

    def __format__(self, spec: str) -> str:
        spec = spec or ".2f"
        return f"{self.value:{spec}} [{self.lo:{spec}}, {self.hi:{spec}}]"


def resample_counts(n: int, n_resamples: int = N_RESAMPLES, seed: int = 0) -> Float[Tensor, "b n"]:
    """How often each of ``n`` items is drawn in each of ``n_resamples`` bootstrap resamples (rows sum to n)."""
    if n < 1:
        raise ConfigError(f"the bootstrap needs at least 1 item; got {n}")
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (n_resamples, n), generator=g)
    return torch.zeros(n_resamples, n, dtype=torch.float64).scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))


def _interval(value: float, resampled: Float[Tensor, " b"], level: float) -> Estimate:
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.nanquantile(resampled.double(), q).tolist()
    return Estimate(float(value), lo, hi)


def bootstrap_mean(x: Scores, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = LEVEL) -> Estimate:
    """The mean of ``x`` with a percentile bootstrap interval over its items (e.g. per-question deltas)."""
    x = _scores(x, "x")
    w = resample_counts(len(x), n_resamples, seed)
    return _interval(float(x.mean()), (w @ x) / len(x), level)


def paired_separation(pos_proj: Scores, neg_proj: Scores, threshold: float, n_resamples: int = N_RESAMPLES,
                      seed: int = 0, level: float = LEVEL) -> dict[str, Estimate]:
    """AUROC, accuracy at a fixed ``threshold`` and signed Cohen's d of paired scores, with intervals.

    ``pos_proj[i]`` and ``neg_proj[i]`` belong to question i; the bootstrap resamples questions (both
    responses of a drawn question enter together), so answers sharing a question never count as
    independent. The point values equal ``auroc``, ``accuracy(..., threshold)`` and ``effect_size(signed=True)``.
    """
    pos, neg = _scores(pos_proj, "pos_proj", 2), _scores(neg_proj, "neg_proj", 2)
    if pos.shape != neg.shape:
        raise ShapeError(f"paired scores must have one positive and one negative per question; got {len(pos)} "
                         f"and {len(neg)}")
    n = len(pos)
    w = torch.cat([torch.ones(1, n, dtype=torch.float64), resample_counts(n, n_resamples, seed)])
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    aurocs = torch.einsum("bi,ij,bj->b", w, wins, w) / n**2
    accs = (w @ (pos > threshold).double() + w @ (neg <= threshold).double()) / (2 * n)

    def mean_var(x):
        m = (w @ x) / n
        return m, ((w @ x**2) - n * m**2) / (n - 1)

    (mp, vp), (mn, vn) = mean_var(pos), mean_var(neg)
    pooled = ((vp + vn) / 2).clamp_min(0).sqrt()
    d = torch.where(pooled > 0, (mp - mn) / pooled.clamp_min(1e-300), torch.zeros_like(pooled))
    return {name: _interval(float(t[0]), t[1:], level) for name, t in
            (("auroc", aurocs), ("accuracy", accs), ("effect_size", d))}
