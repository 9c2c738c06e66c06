"""Prompt formatting and tokenization that follow each tokenizer's own special-token rules."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from tracelens.errors import ConfigError



def format_prompt(tokenizer, prompt: str, system_prompt: str | None = None,
                  use_chat_template: bool | None = None) -> str:
    """`prompt` as the text the model sees: through the chat template with a generation prompt, or as is.

    `use_chat_template=None` uses the template when the tokenizer has one. A template that rejects
    the system role gets the system prompt prepended to the user turn instead. Without a template the
    system prompt, if any, is prepended with a blank line.
    """
    if use_chat_template is None:
        use_chat_template = getattr(tokenizer, "chat_template", None) is not None
    if not use_chat_template:
        return f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("use_chat_template=True but the tokenizer has no chat_template")
    messages = [{"role": "user", "content": prompt}]
    kwargs = dict(tokenize=False, add_generation_prompt=True, enable_thinking=False)
    if system_prompt is None:
        return tokenizer.apply_chat_template(messages, **kwargs)
    try:
        return tokenizer.apply_chat_template([{"role": "system", "content": system_prompt}, *messages], **kwargs)
    except Exception as err:  # jinja raises TemplateError, some templates raise ValueError/KeyError
        if "system" not in str(err).lower():
            raise
        merged = [{"role": "user", "content": f"{system_prompt}\n\n{prompt}"}]
        return tokenizer.apply_chat_template(merged, **kwargs)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text`: the tokenizer adds its special tokens unless the text already starts with
    its BOS (as chat-formatted text does), so there is never a double BOS and never an invented one."""
    bos = tokenizer.bos_token
    has_bos = bos is not None and text.startswith(bos)
    ids = tokenizer(text, add_special_tokens=not has_bos).input_ids
    bos_id = tokenizer.bos_token_id
    if bos_id is not None and len(ids) > 1 and ids[0] == bos_id and ids[1] == bos_id:
        raise ConfigError(f"double BOS token ({bos!r}) at the start of {text[:60]!r}")
    return ids


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """The tokenizer's string for each id; an id past its vocabulary (models often have spare embedding
    rows, which a steered model can sample) becomes `"<id N>"` instead of None."""
    return [t if t is not None else f"<id {i}>" for i, t in zip(ids, tokenizer.convert_ids_to_tokens(list(ids)))]


def tokenize_batch(tokenizer, texts: Sequence[str]) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Left-padded `input_ids` and `attention_mask` for `texts` (each encoded by `encode`)."""
    if not texts:
        raise ConfigError("tokenize_batch needs at least one text")
    return left_pad([encode(tokenizer, t) for t in texts], pad_id(tokenizer))


def pad_id(tokenizer) -> int:
    """The id left padding uses: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Token-id rows as a left-padded `[batch, pos]` tensor and its attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask
