"""Difference of class means: the baseline direction."""

from __future__ import annotations

from typing import Any

from tracelens.methods.base import ExtractionMethod, Split


class MeanDiff(ExtractionMethod):
    """``v = mean(pos) - mean(neg)``, normalised. Extras: ``pos_mean`` and ``neg_mean`` ``[d]`` (float32).

    Cheap and assumption-free, but any high-variance dimension leaks into the means: massive activations
    can swamp it (wrap it in :class:`PreCleanedMethod`). Needs 1 row per class.
    """

    name = "mean_diff"
    min_rows_per_class = 1

    def _fit(self, split: Split) -> dict[str, Any]:
        pos_mean, neg_mean = split.pos.mean(dim=0), split.neg.mean(dim=0)
        return {"vector": pos_mean - neg_mean, "pos_mean": pos_mean, "neg_mean": neg_mean}
