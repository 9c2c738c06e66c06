"""Shared fixtures: tiny random models of every tested architecture, built once per session."""

import functools
import os

# Tests never touch the network: any accidental hub call fails at once instead of hanging.
os.environ["HF_HUB_OFFLINE"] = "1"

import jaxtyping  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tracelens.model.loading import ATTN_IMPLEMENTATIONS, sdpa_supported  # noqa: E402
from tracelens.testing import ARCHITECTURES, tiny_hf_model, tiny_model  # noqa: E402

ATTENTION_CASES = [
    (arch, impl) for arch in ARCHITECTURES for impl in ATTN_IMPLEMENTATIONS
    if impl == "eager" or sdpa_supported(tiny_hf_model(arch, n_layers=1))
]
"""(architecture, attn_implementation) for every implementation each architecture's HF class has (Gemma-2: eager)."""


def attention_ids(case: tuple[str, str]) -> str:
    return "-".join(case)


@pytest.fixture(autouse=True)
def _type_checks(request):
    """Annotations are checked at run time (pyproject's addopts); `unchecked_types` tests opt out."""
    if request.node.get_closest_marker("unchecked_types") is None:
        yield
        return
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


@functools.lru_cache(maxsize=None)
def cached_tiny(architecture: str, **kwargs):
    return tiny_model(architecture, **kwargs)


@pytest.fixture(scope="module")
def tiny_llama():
    """The Llama `TinyModel`, shared by a module (checked for hooks left on it when the module ends)."""
    yield from _checked(cached_tiny("llama"))


@pytest.fixture(params=ARCHITECTURES)
def tiny(request):
    """A `TinyModel` (bridge + untouched HF reference) per architecture, fp32, init std 0.02, `load_model`'s
    default attention (SDPA, eager for Gemma-2)."""
    yield from _checked(cached_tiny(request.param))


@pytest.fixture(params=ARCHITECTURES)
def tiny_sharp(request):
    """Like `tiny` with init std 0.2: decode-step logits are sensitive enough to expose cache bugs."""
    yield from _checked(cached_tiny(request.param, init_std=0.2))


@pytest.fixture(params=ATTENTION_CASES, ids=attention_ids)
def tiny_each_attn(request):
    """Like `tiny`, once per attention implementation; the reference runs the same implementation."""
    architecture, impl = request.param
    yield from _checked(cached_tiny(architecture, attn_implementation=impl))


@pytest.fixture(params=ATTENTION_CASES, ids=attention_ids)
def tiny_sharp_each_attn(request):
    """Like `tiny_sharp`, once per attention implementation; the reference runs the same implementation."""
    architecture, impl = request.param
    yield from _checked(cached_tiny(architecture, init_std=0.2, attn_implementation=impl))


def _checked(t):
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
