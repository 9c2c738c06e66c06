"""`Backend`: the contract every generation backend states, and what the pipeline stages may use of one.

Monitoring and the steering evaluation use nothing but these members, so `LocalBackend` (the model in this
process) and `RemoteBackend` (a running `tracelens server`) serve them alike (tests/test_backend_protocol.py).
`VLLMBackend` honours the text part (model name, prompt token ids, token texts, text token ids, `generate`,
`generate_results`) and raises `tracelens.errors.BackendError` naming what vLLM cannot do for the rest (layer
counts, capture, teacher-forced scoring); steering there is refused the same way.

Steering is a sequence of `SteeringSpec`; `SteeringSpec.rows=(start, end)` limits one entry to prompts
`start..end-1` of the call, so several steering settings share one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from jaxtyping import Int
from torch import Tensor

from tracelens.serving.backends import (
    CaptureResult,
    CaptureSpec,
    GenerationConfig,
    ResponseLogprobs,
    SteeringSpec,
)

DEFAULT_PORT = 8765
"""Where `tracelens server` listens and `get_backend` looks for one, unless told otherwise."""
TOKEN_ENV = "TRACELENS_SERVER_TOKEN"
"""The environment variable holding the model server's token (the CLI's and the client's default)."""


@runtime_checkable
class Backend(Protocol):
    """What a backend offers; members not listed here are a backend's own (see the module docstring)."""

    @property
    def model_name(self) -> str | None:
        """The served model's name (a Hugging Face id or path), None when unknown."""

    @property
    def n_layers(self) -> int:
        """Transformer blocks of the model."""

    @property
    def hidden_dim(self) -> int:
        """Width of the residual stream (`d_model`)."""

    def prompt_token_ids(self, prompts: Sequence[str],
                         system_prompts: Sequence[str | None] | None = None) -> list[list[int]]:
        """The token ids the model is fed for each prompt (chat template and system prompt applied as
        generation applies them)."""

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """The readable text of each token id (decoded alone, special tokens kept, no BPE markers)."""

    def text_token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids as a response continues a prompt: tokenized alone, no special tokens added."""

    def generate(self, prompts: Sequence[str], config: GenerationConfig | None = None,
                 steering: Sequence[SteeringSpec] | None = None,
                 system_prompts: Sequence[str | None] | None = None) -> list[str]:
        """Response texts in prompt order (special tokens skipped, whitespace stripped)."""

    def generate_results(self, prompts: Sequence[str], config: GenerationConfig | None = None,
                         steering: Sequence[SteeringSpec] | None = None,
                         system_prompts: Sequence[str | None] | None = None) -> list[CaptureResult]:
        """Like `generate`, with each prompt's text and prompt/response token ids (no activations)."""

    def generate_with_capture(self, prompts: Sequence[str], config: GenerationConfig | None = None,
                              capture: CaptureSpec | None = None, steering: Sequence[SteeringSpec] | None = None,
                              system_prompts: Sequence[str | None] | None = None) -> list[CaptureResult]:
        """Like `generate_results`, with activations `[n_tokens, d]` (float32, CPU) at every prompt and response
        position, read after the steering by one teacher-forced forward under the same steering."""

    def forward_with_capture(self, input_ids: Int[Tensor, "batch pos"],
                             attention_mask: Int[Tensor, "batch pos"] | None,
                             capture: CaptureSpec) -> dict[int, dict[str, Tensor]]:
        """One unsteered forward pass; `{layer: {component: [batch, pos, d]}}`."""

    def response_logprobs(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                          steering: Sequence[SteeringSpec] | None = None, *, kl: bool = False) -> ResponseLogprobs:
        """Teacher-forced `log p(response[k] | prompt, response[:k])` per response token under `steering`
        (every position of every row; `rows` not allowed); with `kl`, also the per-token KL divergence
        (nats) of the steered next-token distribution from the unsteered one."""
