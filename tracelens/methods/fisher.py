"""Fisher-style direction: the class separation in units of within-class spread, maximised by L-BFGS.

This was tracelens' ``gradient`` before that name went back to the seed's algorithm (:mod:`.gradient`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tracelens.errors import ConfigError, DirectionError
from tracelens.methods.base import ExtractionMethod, Split, holdout_split
from tracelens.metrics import auroc

SHRINKAGE_GRID = (1.0, 0.95, 0.8, 0.5, 0.2, 0.05)
"""Default shrinkages tried (1 ignores correlations between dims; small values whiten more)."""


@dataclass(frozen=True)
class Ascent:
    """The result of one maximisation: the raw-coordinate direction and how the optimiser ended."""

    vector: Float[Tensor, " d"]
    separation: float
    n_evals: int
    converged: bool


def _auroc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUROC estimate (Hanley & McNeil 1982, exponential approximation)."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    variance = auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)
    return max(variance, 0.0) ** 0.5 / (n_pos * n_neg) ** 0.5


def _relative_gradient(w: Float[Tensor, " d"], loss: Float[Tensor, ""]) -> float:
    """``||w|| ||grad|| / |loss|``: stationarity of a scale-invariant objective, independent of ``||w||``."""
    return float(w.detach().norm() * w.grad.norm() / loss.detach().abs().clamp_min(1e-12))


def maximise_separation(
    pos: Float[Tensor, "n_pos d"],
    neg: Float[Tensor, "n_neg d"],
    shrinkage: float,
    *,
    seed: int = 0,
    tol: float = 1e-6,
    max_iter: int = 2000,
) -> Ascent:
    """Maximise ``J(w) = w.(mu_pos - mu_neg) / sqrt(w' S w)`` over directions by L-BFGS (see :class:`Fisher`).

    Works in float64 on within-class standardised coordinates; never forms a ``[d, d]`` matrix (each step is
    O(n d)). Needs autograd, so call it with grad mode on and ordinary (non-inference) tensors.
    """
    pos, neg = pos.double(), neg.double()
    pos_mean, neg_mean = pos.mean(dim=0), neg.mean(dim=0)
    centered = torch.cat([pos - pos_mean, neg - neg_mean])
    dof = centered.shape[0] - 2
    std = (centered.pow(2).sum(dim=0) / dof).sqrt()
    scale = torch.where(std > 0, std, torch.ones_like(std))  # a constant dim keeps its raw scale
    z, delta = centered / scale, (pos_mean - neg_mean) / scale
    if not delta.any():
        raise DirectionError("fisher found no direction: the two classes have identical means.")
    mean_variance = z.pow(2).sum() / dof / z.shape[1]  # the identity target, scaled to C's mean variance

    def separation(w: Float[Tensor, " d"]) -> Float[Tensor, ""]:
        spread = (1 - shrinkage) * (z @ w).pow(2).sum() / dof + shrinkage * mean_variance * (w @ w)
        return (w @ delta) / spread.sqrt()

    w = torch.randn(z.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = w.to(z.device).requires_grad_()
    optimizer = torch.optim.LBFGS(
        [w], lr=1, max_iter=max_iter, tolerance_grad=0, tolerance_change=0,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip
    n_evals = 0

    def closure() -> Float[Tensor, ""]:
        nonlocal n_evals
        optimizer.zero_grad()
        loss = -separation(w)
        loss.backward()
        n_evals += 1
        if _relative_gradient(w, loss) < tol:
            w.grad.zero_()  # L-BFGS stops where the gradient is exactly zero
        return loss

    optimizer.step(closure)
    optimizer.zero_grad()
    loss = -separation(w)
    loss.backward()
    converged = _relative_gradient(w, loss) < tol
    return Ascent(w.detach() / scale, -float(loss.detach()), n_evals, converged)


class Fisher(ExtractionMethod):
    """Maximise the projected class separation in units of within-class spread, by L-BFGS to convergence.

    After scaling each dim by its pooled within-class std (``z = x / s``), it maximises over directions ``w``

        J(w) = w.(mu_pos - mu_neg) / sqrt(w' S w),   S = (1 - g) C + g c I,

    where ``C`` is the pooled within-class covariance of ``z``, ``c`` its mean variance and ``g`` the shrinkage.
    ``J`` is the Cohen's d of the training projections under the shrunk covariance. Unlike maximising the raw
    mean difference (whose optimum is just ``mean_diff``), it discounts directions along which the classes are
    noisy, and a dimension's scale (a massive activation's, say) does not set its weight. Its unique maximiser is
    ``S^-1 (mu_pos - mu_neg)`` up to scale; the returned vector is ``w / s``, in raw activation coordinates.

    With fewer rows than dims, small ``g`` overfits (``g = 0`` is unbounded), so unless ``shrinkage=`` is given
    ``g`` is chosen from ``shrinkage_grid`` by the AUROC of the projections on the validation split
    (``val_pos_acts``/``val_neg_acts``, else ``val_fraction`` of each class held out with ``seed``) with the
    one-standard-error rule: the largest ``g`` whose AUROC is within one standard error (Hanley-McNeil) of the
    best, since a small validation split cannot tell nearby AUROCs apart and more shrinkage generalises more
    safely. The final direction is then fitted on all of ``pos_acts``/``neg_acts``.

    Convergence: from a random start (``seed``), L-BFGS with a strong-Wolfe line search runs until the relative
    gradient ``||w|| ||grad J|| / |J|`` is below ``tol`` (a scale-free stationarity test), or warns after
    ``max_iter`` iterations. Extras: ``final_separation`` (J at the end), ``shrinkage``, ``val_auc``
    ({shrinkage: validation AUROC}, empty if ``shrinkage=`` was given), ``n_evals`` and ``converged``.
    Needs 3 rows per class (2 to fit after holding one out); each step costs O(n d) time and memory.
    """

    name = "fisher"
    min_rows_per_class = 3

    def _fit(
        self,
        split: Split,
        *,
        seed: int = 0,
        shrinkage: float | None = None,
        shrinkage_grid: Sequence[float] = SHRINKAGE_GRID,
        val_fraction: float = 0.2,
        tol: float = 1e-6,
        max_iter: int = 2000,
    ) -> dict[str, Any]:
        for g in [shrinkage] if shrinkage is not None else shrinkage_grid:
            if not 0 < g <= 1:
                raise ConfigError(f"shrinkage must be in (0, 1]; got {g}; 0 is unbounded when rows < dims.")
        # Callers often hold torch.no_grad() or inference_mode(); the optimiser needs autograd, and inference
        # tensors cannot be saved for backward, so re-enable both and clone the inputs into ordinary tensors.
        with torch.inference_mode(False), torch.enable_grad():
            pos, neg = split.pos.clone(), split.neg.clone()
            val_auc: dict[float, float] = {}
            if shrinkage is None:
                held = holdout_split(Split(pos, neg, split.val_pos, split.val_neg), val_fraction, seed)
                for g in shrinkage_grid:
                    vector = maximise_separation(held.pos, held.neg, g, seed=seed, tol=tol, max_iter=max_iter).vector
                    val_auc[g] = auroc(held.val_pos @ vector.float(), held.val_neg @ vector.float())
                best = max(val_auc.values())
                tolerance = _auroc_standard_error(best, len(held.val_pos), len(held.val_neg))
                shrinkage = max(g for g, auc in val_auc.items() if auc >= best - tolerance)
            ascent = maximise_separation(pos, neg, shrinkage, seed=seed, tol=tol, max_iter=max_iter)
        if not ascent.converged:
            warnings.warn(
                f"fisher did not converge in {max_iter} iterations (tol={tol}); raise max_iter or tol.",
                RuntimeWarning,
                stacklevel=3,
            )
        return {
            "vector": ascent.vector,
            "final_separation": ascent.separation,
            "shrinkage": shrinkage,
            "val_auc": val_auc,
            "n_evals": ascent.n_evals,
            "converged": ascent.converged,
        }
