"""Train / select / test splits by question, so no question's answers sit on both sides of a split.

`train` fits vectors and their decision thresholds, `select` chooses layer and method, `test` is only
ever scored. Items that share a question text always land in the same split. A question's split
depends only on its text and the seed (questions are ordered by a hash of both), so adding a
question to a dataset never moves the others between splits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from tracelens.errors import ConfigError


SPLITS = ("train", "select", "test")
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """`fractions` as a (train, select, test) tuple; ValueError unless three positive numbers summing to 1."""
    f = tuple(float(x) for x in fractions)
    if len(f) != 3 or any(not 0 < x < 1 for x in f) or abs(sum(f) - 1) > 1e-6:
        raise ConfigError(f"split fractions must be three numbers in (0, 1) for train, select and test summing "
                         f"to 1; got {tuple(fractions)}")
    return f


def split_by_question(questions: Sequence[str], fractions: Sequence[float] = DEFAULT_FRACTIONS,
                      seed: int = 0) -> dict[str, list[int]]:
    """`{"train", "select", "test"}` -> sorted item indices; items with the same question stay together.

    Split sizes are counted in distinct questions: select and test get `round(n * fraction)` (at least
    1 each), train the rest, which must be at least 2 (ValueError otherwise).
    """
    f = check_fractions(fractions)
    distinct = list(dict.fromkeys(questions))
    n = len(distinct)
    n_select, n_test = (max(1, round(n * x)) for x in f[1:])
    if n - n_select - n_test < 2:
        raise ConfigError(f"{n} distinct questions are too few for a train / select / test split of {f}: "
                         "train needs at least 2; use more scenarios")
    order = sorted(distinct, key=lambda q: hashlib.sha256(f"{seed}\0{q}".encode()).hexdigest())
    cuts = {"test": set(order[:n_test]), "select": set(order[n_test:n_test + n_select])}
    where = {q: next((s for s, qs in cuts.items() if q in qs), "train") for q in distinct}
    return {s: [i for i, q in enumerate(questions) if where[q] == s] for s in SPLITS}
