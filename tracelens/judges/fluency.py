"""``Fluency``: a response's mean per-token NLL under a causal language model, given the chat-formatted
question, and a 0-100 fluency score from it. Word-order damage (shuffled words or sentences) and the text of a
steered model pushed too far raise the NLL that the unsteered model assigns; a repetition score does not see it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tracelens.errors import ConfigError, ShapeError
from tracelens.model.likelihood import response_logprobs
from tracelens.model.prompts import encode, format_prompt

# The map's constants, chosen on the TUNE split (12 of the 24 `general` questions, seed 0; 95 answers) of the
# coherence validation set of the default model (SmolLM2-135M-Instruct, its own greedy 40-token answers and
# their damaged versions; `tracelens.pipeline.coherence_validation.tune_fluency_map`): the intact answers' NLL
# has median 0.761 and maximum 0.998 nats/token, the damaged ones' median is 1.519. The midpoint is the geometric
# mean of the intact maximum and the damaged median (1.231); the scale puts the intact median at 95 (0.160).
FLUENCY_MIDPOINT = 1.23  # nats/token: the NLL that scores 50
FLUENCY_SCALE = 0.16  # nats/token: the width of the logistic


def fluency_score(nll: float | np.ndarray, midpoint: float = FLUENCY_MIDPOINT,
                  scale: float = FLUENCY_SCALE) -> float | np.ndarray:
    """``100 / (1 + exp((nll - midpoint) / scale))`` elementwise (a float for a float): 100 for a fluent text,
    50 at ``midpoint``, towards 0 as the NLL (nats/token) grows; an infinite NLL (no response token) scores 0."""
    with np.errstate(over="ignore"):  # exp overflows to inf for a huge NLL: the score is then 0
        score = 100.0 / (1.0 + np.exp((np.asarray(nll, dtype=np.float64) - midpoint) / scale))
    return float(score) if np.ndim(nll) == 0 else score


class Fluency:
    """Fluency of responses under a causal LM (a TransformerLens bridge from ``load_model``, with ``.tokenizer``).

    ``nll(questions, responses)`` is, per row, the mean NLL (nats/token) of the response's tokens (tokenized
    without special tokens, no end-of-turn token: an answer cut at ``max_new_tokens`` is not penalised) given
    ``format_prompt(question)`` (the chat template as generation applies it, ``use_chat_template`` as there),
    teacher-forced in left-padded batches (`tracelens.model.likelihood.response_logprobs`). An empty response
    has NLL inf. ``score(questions, responses)`` maps it to 0-100 by ``fluency_score(nll, midpoint, scale)``.
    Meant for the unsteered model scoring answers (its own, steered ones): steering damage raises their NLL.
    Responses are truncated to ``max_response_tokens`` tokens.
    """

    def __init__(self, model, midpoint: float = FLUENCY_MIDPOINT, scale: float = FLUENCY_SCALE,
                 use_chat_template: bool | None = None, batch_size: int = 8, max_response_tokens: int = 256) -> None:
        if not (math.isfinite(midpoint) and math.isfinite(scale) and scale > 0):
            raise ConfigError(f"Fluency needs a finite midpoint and a scale > 0; got {midpoint!r} and {scale!r}")
        self.model = model
        self.tokenizer = model.tokenizer
        self.midpoint, self.scale = float(midpoint), float(scale)
        self.use_chat_template = use_chat_template
        self.batch_size = batch_size
        self.max_response_tokens = max_response_tokens

    @property
    def name(self) -> str:
        """``"<model name>@<midpoint>/<scale>"``: the model (the last part of its name or path, so no machine's
        folders) and the map, recorded in the judge's name."""
        model = Path(str(getattr(self.model.cfg, "model_name", None) or "model")).name
        return f"{model}@{self.midpoint:g}/{self.scale:g}"

    def nll(self, questions: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """``[n]`` mean per-token NLL (nats/token) of each response given its question; inf for no token."""
        if len(questions) != len(responses):
            raise ShapeError(f"Fluency needs one question per response; got {len(questions)} and {len(responses)}")
        tok = self.tokenizer
        prompts = [encode(tok, format_prompt(tok, str(q), use_chat_template=self.use_chat_template))
                   for q in questions]
        answers = [tok(str(r), add_special_tokens=False).input_ids[: self.max_response_tokens] for r in responses]
        rows = [i for i, a in enumerate(answers) if a]
        out = np.full(len(responses), np.inf)
        if rows:
            logprobs = response_logprobs(self.model, [prompts[i] for i in rows], [answers[i] for i in rows],
                                         batch_size=self.batch_size)
            out[rows] = [-float(lp.mean()) for lp in logprobs]
        return out

    def score(self, questions: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """``[n]`` fluency scores in [0, 100]."""
        return np.asarray(fluency_score(self.nll(questions, responses), self.midpoint, self.scale))
