"""Logistic-regression probe on row-normalised activations."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from tracelens.methods.base import ExtractionMethod, Split


class Probe(ExtractionMethod):
    """L2-regularised logistic regression (scikit-learn lbfgs, ``random_state=42``, deterministic).

    Each row is scaled to unit norm first (``x / (||x|| + 1e-8)``), so coefficients are O(1) whatever the
    model's activation scale. ``C`` is the inverse regularisation strength. Extras: ``bias`` (the intercept,
    in row-normalised units; not used for steering) and ``train_acc`` (accuracy on the normalised training set).
    """

    name = "probe"
    min_rows_per_class = 1

    def _fit(self, split: Split, *, C: float = 1.0, max_iter: int = 1000) -> dict[str, Any]:
        x = torch.cat([split.pos, split.neg]).cpu()
        x = (x / (x.norm(dim=1, keepdim=True) + 1e-8)).numpy()
        y = np.r_[np.ones(split.pos.shape[0]), np.zeros(split.neg.shape[0])]
        clf = LogisticRegression(C=C, max_iter=max_iter, random_state=42).fit(x, y)
        return {
            "vector": torch.from_numpy(clf.coef_[0].copy()),
            "bias": float(clf.intercept_[0]),
            "train_acc": float(clf.score(x, y)),
        }
