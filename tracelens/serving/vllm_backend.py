"""`VLLMBackend`: high-throughput bulk generation through vLLM (no steering, no activation capture).

For bulk text (stories, dialogues, rollouts, the response stage of extraction) where nothing reads
model internals. vLLM's continuous batching is typically several times faster than `LocalBackend`.

It honours the text part of `tracelens.serving.protocol.Backend` (`model_name`, `prompt_token_ids`,
`token_texts`, `text_token_ids`, `generate`, `generate_results`). Constraints (vLLM exposes no model
internals), each refused with `tracelens.errors.BackendError` naming it:
- no steering: `generate`/`generate_results` with `steering` (`TLVLLMBackend` in
  `tracelens.serving.tl_vllm_backend` steers and captures on TransformerLens' instrumented vLLM engine);
- no activation capture, no teacher-forced scoring, no layer facts: `generate_with_capture`,
  `forward_with_capture`, `response_logprobs`, `n_layers`, `hidden_dim`; results carry text and token ids only;
- seeds are not identical across backends (the same seed gives different samples than HF/LocalBackend);
- needs the optional extra: ``pip install 'tracelens[vllm]'``.

Prompts go to vLLM as token ids made by `tracelens.model.prompts.encode`, so a chat-formatted prompt that
already starts with BOS is never given a second one and the stored `prompt_token_ids` are exactly what
`LocalBackend` would feed the model.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Sequence
from typing import Any

from tracelens.serving.backends import CaptureResult, GenerationConfig
from tracelens.errors import BackendError, StateError
from tracelens.io import read_json
from tracelens.model.prompts import encode, token_strings
from tracelens.serving.prompting import PromptSide

INSTALL_HINT = "pip install 'tracelens[vllm]'"
_QUANT_METHODS = ("awq", "gptq")


def _import_vllm() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """vLLM's `LLM` and `SamplingParams`, or an ImportError naming the extra to install."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError as err:
        raise ImportError(f"VLLMBackend needs vLLM, which is not installed: {INSTALL_HINT}") from err
    return LLM, SamplingParams


def detect_quantization(model_id: str) -> str | None:
    """"awq" or "gptq" when the model is quantized that way, else None.

    A local folder's `config.json` (`quantization_config.quant_method`) decides when it names one of
    them; otherwise the model id itself ("...-AWQ-INT4", "...-GPTQ", case-insensitive)."""
    config = os.path.join(str(model_id), "config.json")
    if os.path.isfile(config):
        try:
            method = (read_json(config, hint="").get("quantization_config") or {}).get("quant_method")
        except (OSError, ValueError, AttributeError):  # an unreadable config: the name decides
            method = None
        if isinstance(method, str) and method.lower() in _QUANT_METHODS:
            return method.lower()
    name = str(model_id).lower()
    for method in _QUANT_METHODS:
        if method in name:
            return method
    return None


class VLLMBackend(PromptSide):
    """Bulk generation on a vLLM engine.

    `engine_kwargs` (`tensor_parallel_size`, `gpu_memory_utilization`, `max_model_len`, `dtype`, ...)
    go to `vllm.LLM` unchanged; `quantization` is filled in from `detect_quantization` unless given.
    `llm_factory` / `sampling_params_cls` replace `vllm.LLM` / `vllm.SamplingParams` (tests use
    stand-ins); `tokenizer` defaults to `transformers.AutoTokenizer.from_pretrained(model_id)`,
    loaded on first use.
    """

    def __init__(self, model_id: str, seed: int = 42, *, tokenizer=None, use_chat_template: bool | None = None,
                 llm_factory: Callable[..., Any] | None = None,
                 sampling_params_cls: Callable[..., Any] | None = None, **engine_kwargs) -> None:
        if llm_factory is None or sampling_params_cls is None:
            llm_cls, params_cls = _import_vllm()
            llm_factory = llm_factory or llm_cls
            sampling_params_cls = sampling_params_cls or params_cls
        self.model_id = model_id
        self.seed = seed
        self.use_chat_template = use_chat_template
        self.batch_size: int | None = None  # accepted for LocalBackend compatibility; vLLM batches itself
        self._tokenizer = tokenizer
        self._sampling_params_cls = sampling_params_cls
        kwargs = dict(engine_kwargs)
        quant = detect_quantization(model_id)
        if quant is not None and kwargs.get("quantization") is None:
            kwargs["quantization"] = quant
        self.engine_kwargs = kwargs
        self._llm = llm_factory(model=model_id, seed=seed, **kwargs)

    # --- properties ---------------------------------------------------------------------------------

    @property
    def llm(self):
        if self._llm is None:
            raise StateError("this VLLMBackend has been shut down; make a new one")
        return self._llm

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_id)
        return self._tokenizer

    @property
    def model(self):
        raise AttributeError("VLLMBackend has no in-process model to hook; use LocalBackend for model access")

    @property
    def model_name(self) -> str:
        return self.model_id

    @property
    def n_layers(self) -> int:
        raise _cannot(self, "report the model's layers")

    @property
    def hidden_dim(self) -> int:
        raise _cannot(self, "report the model's hidden size")

    # --- generation ---------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], config: GenerationConfig | None = None, steering=None,
                 system_prompts: Sequence[str | None] | None = None, *, formatted: bool = False) -> list[str]:
        """Response texts in input order (whitespace stripped); `formatted=True`: the prompts are the model's
        text already (no chat template, no system prompts)."""
        return [r.response_text for r in self.generate_results(prompts, config, steering, system_prompts,
                                                               formatted=formatted)]

    def generate_results(self, prompts: Sequence[str], config: GenerationConfig | None = None,
                         steering=None, system_prompts: Sequence[str | None] | None = None, *,
                         formatted: bool = False) -> list[CaptureResult]:
        """Like `LocalBackend.generate_results`: raw prompts formatted with the chat template (and
        `system_prompts`, one per prompt), results with prompt/response text and token ids, no activations."""
        return self._run(self._texts(prompts, system_prompts, formatted), config or GenerationConfig(), steering)

    def generate_with_capture(self, prompts, config=None, capture=None, steering=None, system_prompts=None):
        raise _cannot(self, "capture activations")

    def forward_with_capture(self, input_ids, attention_mask, capture):
        raise _cannot(self, "capture activations")

    def response_logprobs(self, prompt_ids, response_ids, steering=None, *, kl=False):
        raise _cannot(self, "score given responses by teacher forcing")

    def sampling_params(self, config: GenerationConfig):
        """The `SamplingParams` for `config` (its seed, else the backend's)."""
        return self._sampling_params_cls(**self._sampling_kwargs(config))

    def _sampling_kwargs(self, config: GenerationConfig) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            max_tokens=config.max_new_tokens,
            temperature=config.temperature,
            seed=self.seed if config.seed is None else config.seed,
        )
        if config.stop_token_ids:
            kwargs["stop_token_ids"] = list(config.stop_token_ids)
        return kwargs

    def _run(self, texts: list[str], config: GenerationConfig, steering=None) -> list[CaptureResult]:
        """Results for formatted `texts`, in order (`steering`: refused here, before any engine work, as plain vLLM
        has no hooks; a subclass may apply it)."""
        if steering:
            raise _cannot(self, "steer")
        if not texts:
            return []
        ids = [encode(self.tokenizer, t) for t in texts]
        return self._results(texts, ids, self._complete(ids, config))

    def _complete(self, ids: list[list[int]], config: GenerationConfig) -> list:
        """vLLM's completion (`outputs[0]`) for each prompt's token ids, in input order."""
        outputs = self.llm.generate([{"prompt_token_ids": i} for i in ids], self.sampling_params(config))
        return [out.outputs[0] for out in _in_input_order(list(outputs), ids)]

    def _response_text(self, completion, response_ids: list[int]) -> str:
        return completion.text.strip()

    def _results(self, texts: list[str], ids: list[list[int]], completions: list) -> list[CaptureResult]:
        tok = self.tokenizer
        results = []
        for text, prompt_ids, completion in zip(texts, ids, completions):
            response_ids = [int(t) for t in completion.token_ids]
            results.append(CaptureResult(
                prompt_text=text,
                response_text=self._response_text(completion, response_ids),
                prompt_tokens=token_strings(tok, prompt_ids),
                response_tokens=token_strings(tok, response_ids),
                prompt_token_ids=list(prompt_ids),
                response_token_ids=response_ids,
            ))
        return results

    # --- teardown -----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Free the engine and its GPU memory (safe to call twice); the backend is unusable afterwards."""
        if self._llm is None:
            return
        llm, self._llm = self._llm, None
        engine = getattr(llm, "llm_engine", None)
        for owner in (engine, getattr(engine, "engine_core", None)):
            stop = getattr(owner, "shutdown", None)
            if callable(stop):
                try:
                    stop()
                except Exception:  # best effort: teardown must not raise
                    pass
        del llm, engine
        try:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
        except Exception:
            pass
        else:
            for cleanup in (destroy_model_parallel, destroy_distributed_environment):
                try:
                    cleanup()
                except Exception:
                    pass
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass

    def __enter__(self) -> "VLLMBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _cannot(backend: VLLMBackend, what: str) -> BackendError:
    return BackendError(f"{type(backend).__name__} cannot {what}: the vLLM engine exposes no model internals for it; "
                        "use LocalBackend or a RemoteBackend on `tracelens server`"
                        + (", or TLVLLMBackend (tracelens.serving.tl_vllm_backend) for steering and capture"
                           if type(backend) is VLLMBackend else ""))


def _in_input_order(outputs: list, prompt_ids: list[list[int]]) -> list:
    """vLLM's outputs re-ordered to match the inputs: by numeric `request_id` when every output has
    one (ids grow with submission order), else as returned; then each output's `prompt_token_ids`
    must be the ids sent at its position."""
    if len(outputs) != len(prompt_ids):
        raise BackendError(f"vLLM returned {len(outputs)} outputs for {len(prompt_ids)} prompts")
    keys = [_request_key(o) for o in outputs]
    if all(k is not None for k in keys) and len(set(keys)) == len(keys):
        outputs = [o for _, o in sorted(zip(keys, outputs), key=lambda pair: pair[0])]
    for i, (out, sent) in enumerate(zip(outputs, prompt_ids)):
        got = getattr(out, "prompt_token_ids", None)
        if got is not None and list(got) != list(sent):
            raise BackendError(f"vLLM output {i} does not belong to prompt {i} (its prompt token ids differ)")
        if not getattr(out, "outputs", None):
            raise BackendError(f"vLLM output {i} has no completion")
    return outputs


def _request_key(output) -> int | None:
    rid = getattr(output, "request_id", None)
    if rid is None:
        return None
    try:
        return int(str(rid).split("-")[0])
    except ValueError:
        return None
