"""Chat formatting and tokenization: no double BOS, no invented BOS, left padding."""

import pytest
import torch

from tracelens import format_prompt, tokenize_batch
from tracelens.model.prompts import encode
from tracelens.testing import make_tokenizer, tiny_model


def test_chat_template_with_system_prompt_and_generation_prompt():
    tok = make_tokenizer(bos=False)
    text = format_prompt(tok, "Hi", system_prompt="Be kind")
    assert text == "<|im_start|>system\nBe kind<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_that_rejects_the_system_role_gets_it_in_the_user_turn():
    tok = make_tokenizer(bos=False)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    assert format_prompt(tok, "Hi", system_prompt="Be kind") == "[user] Be kind\n\nHi\n[assistant] "


def test_without_a_template_the_text_is_used_as_is():
    tok = make_tokenizer()
    assert format_prompt(tok, "Hi", use_chat_template=False) == "Hi"
    assert format_prompt(tok, "Hi", "Sys", use_chat_template=False) == "Sys\n\nHi"
    tok.chat_template = None
    assert format_prompt(tok, "Hi") == "Hi"
    with pytest.raises(ValueError, match="has no chat_template"):
        format_prompt(tok, "Hi", use_chat_template=True)


def test_formatted_text_that_starts_with_bos_gets_no_second_bos():
    tok = make_tokenizer(bos=True)
    ids = encode(tok, format_prompt(tok, "Hi"))
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert encode(tok, "plain text")[0] == tok.bos_token_id  # plain text gets the tokenizer's BOS


def test_no_bos_is_invented_for_a_tokenizer_without_one_even_after_tl_sets_bos_to_eos():
    t = tiny_model("qwen2")
    assert t.tokenizer.bos_token is None and t.model.tokenizer.bos_token is not None  # TL's copy
    for tok in (t.tokenizer, t.model.tokenizer):
        assert encode(tok, "plain text") == t.tokenizer("plain text").input_ids
        assert tok.eos_token_id not in encode(tok, format_prompt(tok, "Hi"))[:1]


def test_tokenize_batch_left_pads_with_a_mask():
    tok = make_tokenizer()
    ids, mask = tokenize_batch(tok, ["a longer piece of text here", "short"])
    short = encode(tok, "short")
    assert mask[1].tolist() == [0] * (ids.shape[1] - len(short)) + [1] * len(short)
    assert ids[1, -len(short):].tolist() == short
    assert torch.all(mask[0] == 1)
