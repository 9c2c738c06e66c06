"""``OpenAIJudge``: an LLM judge over any OpenAI-compatible chat-completions endpoint, scored from
first-token logprobs (the upstream method); see ``tracelens.judges`` for running one locally."""

from __future__ import annotations

import http.client
import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tracelens.errors import ConfigError, JudgeError
from tracelens.judges.base import OFF_TOPIC_CAP, _BatchScoring

TRAIT_MIN_MASS = 0.25  # trait score is None when the integer tokens hold less probability than this
COHERENCE_MIN_MASS = 0.1  # the same floor for the grammar/fluency score
MAX_CHARS = 2000  # question and response are truncated to this many characters before judging

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
                f"OpenAIJudge needs max_concurrency >= 1, retries >= 0, timeout > 0 and backoff >= 0; got "
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
