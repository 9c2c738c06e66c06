"""A random direction: the chance-level control every other method is compared with."""

from __future__ import annotations

from typing import Any

import torch

from tracelens.methods.base import ExtractionMethod, Split


class RandomBaseline(ExtractionMethod):
    """A uniformly random unit vector (normalised Gaussian); ignores the activations except for their width.

    ``seed=N`` makes it reproducible; without it each call differs. It uses its own generator, so it never
    changes torch's global random state. Not oriented: its expected held-out AUROC is 0.5.
    """

    name = "random_baseline"
    min_rows_per_class = 1
    oriented = False

    def _fit(self, split: Split, *, seed: int | None = None) -> dict[str, Any]:
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return {"vector": torch.randn(split.pos.shape[1], generator=generator), "seed": seed}
