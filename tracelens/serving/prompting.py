"""The prompt side every backend shares, written once: `PromptSide` (formatting with the chat template and system
prompts, prompt token ids, token texts) and the functions beside it (`check_prompts`, the steering of a batch's rows).

`LocalBackend`, `VLLMBackend` and `TLVLLMBackend` are `PromptSide`s over their tokenizer; `RemoteBackend`, which
has none (the server formats), shares `check_prompts`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from tracelens.errors import ConfigError, InputTypeError, ShapeError
from tracelens.model.prompts import encode, format_prompt
from tracelens.model.requests import SteeringSpec


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """`prompts` as a list; InputTypeError for one string (a call takes a list of prompts)."""
    if isinstance(prompts, str):
        raise InputTypeError("prompts must be a list of strings, not one string")
    return list(prompts)


class PromptSide:
    """Prompts as the model sees them, for a backend with a `tokenizer` and a `use_chat_template` setting (None: the
    template when the tokenizer has one)."""

    def format(self, prompt: str, system_prompt: str | None = None) -> str:
        """`prompt` as the model's text (`tracelens.model.prompts.format_prompt`)."""
        return format_prompt(self.tokenizer, prompt, system_prompt, self.use_chat_template)

    def prompt_token_ids(self, prompts: Sequence[str],
                         system_prompts: Sequence[str | None] | None = None) -> list[list[int]]:
        """The token ids generation feeds the model for each prompt (formatted as generation formats it)."""
        return [encode(self.tokenizer, t) for t in self._texts(prompts, system_prompts, False)]

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Each id decoded alone (readable text, special tokens kept)."""
        return [self.tokenizer.decode([int(i)]) for i in token_ids]

    def text_token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text tokenized alone, no special tokens added (a response's ids after its prompt's)."""
        return [list(self.tokenizer(t, add_special_tokens=False).input_ids) for t in check_prompts(texts)]

    def _texts(self, prompts: Sequence[str], system_prompts: Sequence[str | None] | None,
               formatted: bool) -> list[str]:
        """The model's text of each prompt: `prompts` as given when `formatted` (then no system prompts), else
        each through `format` with its system prompt (`system_prompts`: one per prompt, None entries allowed)."""
        prompts = check_prompts(prompts)
        if system_prompts is not None and len(system_prompts) != len(prompts):
            raise ShapeError(f"got {len(prompts)} prompts but {len(system_prompts)} system prompts")
        if formatted and system_prompts is not None:
            raise ConfigError("formatted prompts are used as given: put the system prompt in the text; "
                              "got system_prompts with formatted=True")
        if formatted:
            return prompts
        return [self.format(p, s) for p, s in zip(prompts, system_prompts or [None] * len(prompts))]


def covering(steering: Sequence[SteeringSpec], start: int, end: int) -> list[int]:
    """The indices of the `steering` entries that reach a prompt of `start..end-1` (`rows=None`: every prompt)."""
    return [k for k, spec in enumerate(steering) if spec.rows is None or (spec.rows[0] < end and spec.rows[1] > start)]


def rows_within(steering: Sequence[SteeringSpec] | None, start: int, end: int) -> list[SteeringSpec] | None:
    """The steering of prompts `start..end-1` as a batch of its own: the entries that reach it (`covering`), their
    `rows` shifted by `start` and clipped to the batch (None: no steering). The specs are copied, not re-checked."""
    steering = list(steering or ())
    out = []
    for k in covering(steering, start, end):
        spec = steering[k]
        if spec.rows is not None:
            spec = copy.copy(spec)
            spec.rows = (max(spec.rows[0], start) - start, min(spec.rows[1], end) - start)
        out.append(spec)
    return out or None
