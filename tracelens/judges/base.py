"""The ``Judge`` protocol, the batch scoring every judge shares (the degeneracy guard included) and
``summarize_judge_scores``.

Example (``summarize_judge_scores`` is pure arithmetic)::

    >>> r = summarize_judge_scores([{"trait_score": 80.0, "coherence_score": 90.0},
    ...                             {"trait_score": 40.0, "coherence_score": None}])
    >>> r.trait_mean, r.coherence_mean, r.n, r.trait_std, r.success_rate
    (60.0, 90.0, 2, 20.0, 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from tracelens.errors import ConfigError
from tracelens.types import JudgeResult
from tracelens.judges.degeneracy import degeneracy

OFF_TOPIC_CAP = 50.0  # an off-topic response scores at most this much coherence
SUCCESS_THRESHOLD = 50.0  # summarize_judge_scores counts trait scores above this as successes


@runtime_checkable
class Judge(Protocol):
    """Scores on 0-100; None means undecidable (the judge's answer carried too little probability mass)."""

    def score_trait(self, question: str, response: str, trait_name: str, definition: str) -> float | None: ...

    def score_coherence(self, question: str, response: str) -> float | None: ...

    def score(
        self, items: Sequence[Mapping[str, str]], trait_name: str | None = None, definition: str | None = None
    ) -> list[dict[str, float | str | None]]: ...


def summarize_judge_scores(scores: Sequence[Mapping[str, float | str | None]]) -> JudgeResult:
    """Aggregate per-response scores ``[{"trait_score", "coherence_score", "degenerate"?}, ...]`` into a
    ``JudgeResult``.

    None scores (and a missing ``coherence_score``) are dropped per field, so the trait and coherence means
    may average different responses. ``n`` is the number of trait scores; ``trait_std`` is the population
    std; ``success_rate`` is the fraction of trait scores above 50; ``min_score``/``max_score`` are over
    trait scores; ``n_degenerate`` counts the responses whose ``"degenerate"`` is set (a missing key counts
    as not degenerate). Everything is rounded to 2 decimals. No trait scores give ``trait_mean=None, n=0``.
    """
    trait = [float(s["trait_score"]) for s in scores if s.get("trait_score") is not None]
    coherence = [float(s["coherence_score"]) for s in scores if s.get("coherence_score") is not None]
    coherence_mean = round(sum(coherence) / len(coherence), 2) if coherence else None
    n_degenerate = sum(1 for s in scores if s.get("degenerate"))
    if not trait:
        return JudgeResult(trait_mean=None, coherence_mean=coherence_mean, n=0, n_degenerate=n_degenerate)
    mean = sum(trait) / len(trait)
    std = math.sqrt(sum((t - mean) ** 2 for t in trait) / len(trait))
    return JudgeResult(
        trait_mean=round(mean, 2),
        coherence_mean=coherence_mean,
        n=len(trait),
        trait_std=round(std, 2),
        success_rate=round(sum(t > SUCCESS_THRESHOLD for t in trait) / len(trait), 2),
        min_score=round(min(trait), 2),
        max_score=round(max(trait), 2),
        n_degenerate=n_degenerate,
    )


def _rows(
    items: Sequence[Mapping[str, str]], trait_name: str | None, definition: str | None
) -> list[tuple[str, str, str | None, str | None]]:
    """``(question, response, trait_name, definition)`` per item; an item's own keys override the defaults."""
    rows = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or "question" not in item or "response" not in item:
            raise ConfigError(
                f"items[{i}] must be a mapping with 'question' and 'response' (and optionally 'trait_name', "
                f"'definition'); got {item!r:.200}."
            )
        rows.append(
            (item["question"], item["response"], item.get("trait_name", trait_name), item.get("definition", definition))
        )
    return rows


class _BatchScoring:
    """``score(items)``, shared by every judge: the judge's own scores, then the degeneracy guard."""

    def score(
        self, items: Sequence[Mapping[str, str]], trait_name: str | None = None, definition: str | None = None
    ) -> list[dict[str, float | str | None]]:
        """Score each ``{"question", "response", "trait_name"?, "definition"?}``; ``trait_name`` and
        ``definition`` are the defaults for items without their own. Results are in input order, each
        ``{"trait_score", "coherence_score", "degenerate"}``: when ``degeneracy(response)`` flags the answer,
        ``coherence_score`` is 0.0 whatever the judge said and ``degenerate`` is the reason; else it is None.
        (``score_coherence`` alone is the judge's raw score, without the guard.)"""
        rows = _rows(items, trait_name, definition)
        scores = self._score_rows(rows)
        for result, row in zip(scores, rows):
            result["degenerate"] = degeneracy(row[1]).reason
            if result["degenerate"] is not None:
                result["coherence_score"] = 0.0
        return scores

    def _score_rows(self, rows: list[tuple[str, str, str | None, str | None]]) -> list[dict[str, float | None]]:
        """The judge's own scores, one row at a time; judges that batch or parallelise override this."""
        return [self._score_row(row) for row in rows]

    def _score_row(self, row: tuple[str, str, str | None, str | None]) -> dict[str, float | None]:
        question, response, trait_name, definition = row
        return {
            "trait_score": self.score_trait(question, response, trait_name, definition),
            "coherence_score": self.score_coherence(question, response),
        }
