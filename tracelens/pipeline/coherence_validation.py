"""A held-out coherence validation set from the model's own answers, and the validity of each coherence signal.

The set: the unsteered model's greedy answers to a prompt set whose questions are disjoint from the steering
questions (label 1, kind ``"intact"``), and damaged versions of each (label 0) in known ways: random-direction
steering at three norms (``random_steering_<m>x``: a seeded random unit vector at the middle layer, coefficient
``m`` x the layer's mean residual norm), ``truncated`` (the first ``TRUNCATE_FRACTION`` of its words),
``shuffled_sentences``, ``shuffled_words`` and ``repeated`` (its opening phrase said ``REPEATS`` times). A damage
that leaves the text unchanged (one sentence to shuffle, steering too weak to change a greedy answer) is left out.

The questions are split, seeded, into ``tune`` (what a coherence scorer may be tuned on: the fluency map's
constants, `tune_fluency_map`) and ``held_out``; each signal's validity is its AUROC of intact vs damaged on the
held-out part, with a 95% bootstrap interval resampling questions (all answers of a drawn question together),
overall and per damage kind. A signal is any ``items -> scores`` function (higher = more coherent, None =
undecided): `judge_signal` (a judge's ``coherence_score``, with its degeneracy guard; `OpenAIJudge` alike),
`degeneracy_signal` (1 kept, 0 flagged) and `nll_signal` (minus the per-token NLL under the unsteered model).

The set is built once per model variant and answer length and stored (`coherence_set`); every steering search
measures its judge's signals on it (`coherence_signals`, `measure_coherence_validity`) and keeps the record in
its results header, where `SteeringResults.selection_rule` reads whether the judge's coherence may be used.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from tracelens.datasets.prompt_sets import load_prompt_set
from tracelens.datasets.traits import list_traits, load_trait
from tracelens.errors import ConfigError
from tracelens.judges.degeneracy import degeneracy
from tracelens.judges.fluency import Fluency
from tracelens.metrics import LEVEL, N_RESAMPLES, Estimate, auroc, resample_counts
from tracelens.model.edits import unit
from tracelens.model.prompts import left_pad
from tracelens.serving.backends import CaptureSpec, GenerationConfig, SteeringSpec
from tracelens.serving.protocol import Backend
from tracelens.store import Experiment
from tracelens.types import JUDGE_COHERENCE, CoherenceItem, CoherenceSet, CoherenceValidation

STEERING_MULTIPLES = (0.25, 0.5, 1.0)  # random-direction coefficients, in units of the layer's mean residual norm
TRUNCATE_FRACTION = 0.5
REPEATS = 4
PHRASE_WORDS = 8  # the repeated phrase: the answer's first sentence, at most this many words
TEXT_DAMAGES = ("truncated", "shuffled_sentences", "shuffled_words", "repeated")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

Signal = Callable[[Sequence[CoherenceItem]], Sequence[float | None]]


def starter_steering_questions() -> list[str]:
    """Every steering question (search and report) of the shipped ``starter/*`` traits."""
    return [q for name in list_traits() if name.startswith("starter/") for q in load_trait(name).steering.questions]


def check_disjoint(questions: Sequence[str], steering_questions: Sequence[str]) -> None:
    """ConfigError naming the overlap when a question (compared case- and whitespace-insensitively) is also a
    steering question."""
    key = lambda q: " ".join(q.casefold().split())  # noqa: E731
    shared = sorted({key(q) for q in questions} & {key(q) for q in steering_questions})
    if shared:
        raise ConfigError(f"the coherence validation questions must be disjoint from the steering questions; got "
                          f"{len(shared)} shared: {shared[:3]}")


def split_questions(questions: Sequence[str], seed: int = 0, tune_fraction: float = 0.5) -> tuple[list[str], list[str]]:
    """``(tune, held_out)``: a seeded permutation of the unique questions cut at ``tune_fraction``; each part
    keeps at least one question (ConfigError for fewer than 2 questions)."""
    unique = list(dict.fromkeys(questions))
    if len(unique) < 2 or not 0 < tune_fraction < 1:
        raise ConfigError(f"split_questions needs >= 2 questions and 0 < tune_fraction < 1; got {len(unique)} and "
                          f"{tune_fraction}")
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed)).tolist()
    n_tune = min(max(1, round(tune_fraction * len(unique))), len(unique) - 1)
    return [unique[i] for i in order[:n_tune]], [unique[i] for i in order[n_tune:]]


def text_damages(response: str, rng: random.Random) -> dict[str, str]:
    """The text damages of ``response`` (``TEXT_DAMAGES``), each left out when it would not change the text."""
    words, sentences = response.split(), _SENTENCE_END.split(response.strip())
    phrase = " ".join(sentences[0].split()[:PHRASE_WORDS])
    damaged = {
        "truncated": " ".join(words[: max(1, int(len(words) * TRUNCATE_FRACTION))]),
        "shuffled_sentences": " ".join(_shuffled(sentences, rng)),
        "shuffled_words": " ".join(_shuffled(words, rng)),
        "repeated": " ".join([phrase] * REPEATS),
    }
    return {kind: text for kind, text in damaged.items() if text.split() != words}


def _shuffled(parts: list[str], rng: random.Random, tries: int = 10) -> list[str]:
    """A permutation of ``parts`` that differs from it (``parts`` itself when all are equal or under 2)."""
    for _ in range(tries if len(set(parts)) > 1 else 0):
        out = rng.sample(parts, len(parts))
        if out != parts:
            return out
    return parts


def mean_residual_norm(backend: Backend, questions: Sequence[str], responses: Sequence[Sequence[int]],
                       layer: int) -> float:
    """The mean over answers of ||mean residual over the response tokens|| at ``layer`` (as the extraction's
    ``activation_norms``, in residual units), by one unsteered forward of prompt + response."""
    prompts = backend.prompt_token_ids(list(questions))
    rows = [p + list(r) for p, r in zip(prompts, responses) if r]
    lengths = [len(r) for r in responses if r]
    ids, mask = left_pad(rows)
    acts = backend.forward_with_capture(ids, mask, CaptureSpec([layer]))[layer]["residual"].float().cpu()
    width = ids.shape[1]
    return float(torch.stack([acts[i, width - n:].mean(0).norm() for i, n in enumerate(lengths)]).mean())


def build_coherence_set(backend: Backend, steering_questions: Sequence[str], prompt_set: str = "general",
                        max_new_tokens: int = 40, seed: int = 0, layer: int | None = None,
                        multiples: Sequence[float] = STEERING_MULTIPLES) -> CoherenceSet:
    """Generate the intact and randomly steered answers (greedy, ``max_new_tokens``) to ``prompt_set``'s
    questions, add the text damages, and split the questions (`split_questions(seed)`). ``layer`` defaults to
    the middle one. ConfigError when a question is a steering question."""
    questions = [p.text for p in load_prompt_set(prompt_set).prompts]
    check_disjoint(questions, steering_questions)
    layer = backend.n_layers // 2 if layer is None else layer
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    results = backend.generate_results(questions, config)
    intact = [r.response_text for r in results]
    norm = mean_residual_norm(backend, questions, [r.response_token_ids for r in results], layer)
    g, n = torch.Generator().manual_seed(seed), len(questions)
    coefficients = {f"random_steering_{m:g}x": m * norm for m in multiples}
    steering = [SteeringSpec(layer=layer, vector=unit(torch.randn(backend.hidden_dim, generator=g)),
                             coefficient=c, rows=(k * n, (k + 1) * n)) for k, c in enumerate(coefficients.values())]
    steered = backend.generate(questions * len(coefficients), config, steering)
    rng, items = random.Random(seed), []
    for i, (question, answer) in enumerate(zip(questions, intact)):
        items.append(CoherenceItem(question, answer, True, "intact"))
        damaged = {kind: steered[k * n + i] for k, kind in enumerate(coefficients)} | text_damages(answer, rng)
        items += [CoherenceItem(question, text, False, kind) for kind, text in damaged.items() if text != answer]
    tune, held_out = split_questions(questions, seed)
    return CoherenceSet(items, tune, held_out, layer, coefficients, prompt_set, backend.model_name, seed,
                        max_new_tokens)


def judge_signal(judge, trait_name: str | None = None, definition: str | None = None) -> Signal:
    """A judge's ``coherence_score`` from its ``score(items, trait_name, definition)`` (degeneracy guard
    applied): any judge, offline or ``OpenAIJudge`` (which needs a trait to score, though coherence ignores it)."""
    return lambda items: [r["coherence_score"] for r in judge.score(
        [{"question": it.question, "response": it.response} for it in items], trait_name, definition)]


def degeneracy_signal(items: Sequence[CoherenceItem]) -> list[float]:
    """1.0 for an answer the degeneracy guard keeps, 0.0 for one it flags."""
    return [0.0 if degeneracy(it.response).degenerate else 1.0 for it in items]


def nll_signal(backend: Backend) -> Signal:
    """Minus the mean per-token NLL (nats/token) of each answer given its chat-formatted question under the
    backend's unsteered model (teacher forcing, as `Fluency.nll`); -inf for an answer without tokens."""
    def signal(items: Sequence[CoherenceItem]) -> list[float]:
        prompts = backend.prompt_token_ids([it.question for it in items])
        answers = backend.text_token_ids([it.response for it in items])
        rows, out = [i for i, a in enumerate(answers) if a], [-math.inf] * len(items)
        if rows:
            scored = backend.response_logprobs([prompts[i] for i in rows], [answers[i] for i in rows]).logprobs
            for i, logprobs in zip(rows, scored):
                out[i] = float(logprobs.mean())
        return out

    return signal


def clustered_auroc(scores: Sequence[float], labels: Sequence[bool], groups: Sequence[str],
                    n_resamples: int = N_RESAMPLES, seed: int = 0) -> Estimate:
    """AUROC of ``scores`` (label True positive) with a 95% percentile bootstrap interval resampling the
    groups (questions): a drawn group brings all its items, so a question's answers never count as independent.
    The point value equals `tracelens.metrics.auroc`; on one positive and one negative per group the interval
    equals `paired_separation`'s. ConfigError without both labels."""
    s, y = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.bool)
    if not y.any() or y.all():
        raise ConfigError(f"an AUROC needs intact and damaged items; got {int(y.sum())} and {int((~y).sum())}")
    names = list(dict.fromkeys(groups))
    index = torch.as_tensor([names.index(g) for g in groups])
    pos, neg = s[y], s[~y]
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    w = resample_counts(len(names), n_resamples, seed)[:, index]  # [b, items]: each item weighs as its group
    wp, wn = w[:, y], w[:, ~y]
    resampled = torch.einsum("bi,ij,bj->b", wp, wins, wn) / (wp.sum(1) * wn.sum(1))
    value = auroc(pos.tolist(), neg.tolist())  # lists: auroc's annotation binds one length "n" to both
    lo, hi = torch.nanquantile(resampled, torch.tensor([(1 - LEVEL) / 2, (1 + LEVEL) / 2], dtype=torch.float64)).tolist()
    return Estimate(value, lo, hi)


def signal_validity(items: Sequence[CoherenceItem], scores: Sequence[float | None], n_resamples: int = N_RESAMPLES,
                    seed: int = 0) -> tuple[Estimate, dict[str, Estimate]]:
    """``(overall, {kind: estimate})``: `clustered_auroc` of intact vs all damaged, and vs each damage kind.
    Items a signal left undecided (None) are left out."""
    kept = [(it, float(s)) for it, s in zip(items, scores) if s is not None]

    def of(part):
        return clustered_auroc([s for _, s in part], [it.intact for it, _ in part], [it.question for it, _ in part],
                               n_resamples, seed)

    kinds = dict.fromkeys(it.kind for it, _ in kept if not it.intact)
    return of(kept), {kind: of([(it, s) for it, s in kept if it.intact or it.kind == kind]) for kind in kinds}


def measure_coherence_validity(cset: CoherenceSet, signals: Mapping[str, Signal],
                               sources: Mapping[str, str] | None = None,
                               n_resamples: int = N_RESAMPLES) -> CoherenceValidation:
    """Each signal's validity on the HELD-OUT items only, as a `CoherenceValidation`; ``sources`` names what
    each signal is (a judge's name, a model)."""
    held_out = cset.split("held_out")
    overall, per_kind = {}, {}
    for name, signal in signals.items():
        total, kinds = signal_validity(held_out, signal(held_out), n_resamples, cset.seed)
        overall[name], per_kind[name] = total.to_dict(), {k: e.to_dict() for k, e in kinds.items()}
    count = lambda part: {"items": len(part), "intact": sum(it.intact for it in part)}  # noqa: E731
    return CoherenceValidation(
        model=cset.model, prompt_set=cset.prompt_set, seed=cset.seed, max_new_tokens=cset.max_new_tokens,
        layer=cset.layer, coefficients=dict(cset.coefficients),
        n_items={"tune": count(cset.split("tune")), "held_out": count(held_out)},
        n_questions={"tune": len(cset.tune), "held_out": len(cset.held_out)},
        tune_questions=list(cset.tune), held_out_questions=list(cset.held_out),
        auroc=overall, per_kind=per_kind, sources=dict(sources or {}),
    )


def tune_fluency_map(cset: CoherenceSet, fluency: Fluency, intact_score: float = 95.0) -> dict[str, float]:
    """The fluency map's constants from the TUNE items only: the midpoint is the geometric mean of the intact
    answers' largest NLL and the damaged answers' median NLL; the scale puts the intact median at
    ``intact_score``. Returns those NLL statistics (nats/token) and ``{"midpoint", "scale"}``."""
    tune = cset.split("tune")
    nll = fluency.nll([it.question for it in tune], [it.response for it in tune])
    intact = torch.as_tensor([x for x, it in zip(nll, tune) if it.intact], dtype=torch.float64)
    damaged = torch.as_tensor([x for x, it in zip(nll, tune) if not it.intact], dtype=torch.float64)
    damaged = damaged[torch.isfinite(damaged)]
    stats = {"intact_median": float(intact.median()), "intact_max": float(intact.max()),
             "damaged_median": float(damaged.median())}
    midpoint = (stats["intact_max"] * stats["damaged_median"]) ** 0.5
    scale = (midpoint - stats["intact_median"]) / torch.log(torch.tensor(intact_score / (100 - intact_score))).item()
    return {**stats, "midpoint": midpoint, "scale": scale}


def coherence_set(exp: Experiment, variant: str, backend: Backend, steering_questions: Sequence[str],
                  max_new_tokens: int, prompt_set: str = "general", seed: int = 0) -> CoherenceSet:
    """The variant's stored set for ``prompt_set`` and ``max_new_tokens`` (built by `build_coherence_set` and
    stored on first use); ConfigError when one of its questions is a steering question."""
    cset = exp.coherence_set(variant, prompt_set, max_new_tokens)
    if cset is None or cset.seed != seed:
        cset = build_coherence_set(backend, steering_questions, prompt_set, max_new_tokens, seed)
        exp.write_coherence_set(variant, cset)
    check_disjoint(cset.tune + cset.held_out, steering_questions)
    return cset


def coherence_signals(judge, trait_name: str, definition: str,
                      backend: Backend) -> tuple[dict[str, Signal], dict[str, str]]:
    """``(signals, sources)`` measured beside every steering search: the judge's coherence
    (``JUDGE_COHERENCE``, what selection's threshold reads), the degeneracy guard and the NLL under the
    backend's unsteered model (the per-answer form of the KL budget's damage)."""
    signals = {JUDGE_COHERENCE: judge_signal(judge, trait_name, definition), "degeneracy": degeneracy_signal,
               "nll": nll_signal(backend)}
    sources = {JUDGE_COHERENCE: getattr(judge, "name", type(judge).__name__),
               "degeneracy": "tracelens.judges.degeneracy", "nll": Path(str(backend.model_name)).name}
    return signals, sources
