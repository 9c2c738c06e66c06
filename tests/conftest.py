"""Shared fixtures: tiny random models of every tested architecture, built once per session."""

import functools
import os

# Tests never touch the network: any accidental hub call fails at once instead of hanging.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from tracelens.testing import ARCHITECTURES, tiny_model  # noqa: E402


@functools.lru_cache(maxsize=None)
def cached_tiny(architecture: str, **kwargs):
    return tiny_model(architecture, **kwargs)


@pytest.fixture(params=ARCHITECTURES)
def tiny(request):
    """A `TinyModel` (bridge + untouched HF reference) per architecture, fp32, init std 0.02."""
    t = cached_tiny(request.param)
    yield t
    assert not _active_hooks(t.model), "a test left hooks on the model"


@pytest.fixture(params=ARCHITECTURES)
def tiny_sharp(request):
    """Like `tiny` with init std 0.2: decode-step logits are sensitive enough to expose cache bugs."""
    t = cached_tiny(request.param, init_std=0.2)
    yield t
    assert not _active_hooks(t.model), "a test left hooks on the model"


def _active_hooks(model) -> list[str]:
    """TL hook points with hooks, plus torch pre-hooks left on the wrapped HF model."""
    names = [name for name, hp in model.hook_dict.items() if hp._forward_hooks or hp._backward_hooks]
    return names + ["original_model pre-hook"] * len(model.original_model._forward_pre_hooks)


def encode(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask for `texts`, with the tokenizer's own special-token rules."""
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    return batch.input_ids, batch.attention_mask
