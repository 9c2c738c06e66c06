"""Generation backends: one interface for generation with steering and activation capture.

The interface is stated by `tracelens.serving.protocol.Backend`. `LocalBackend` runs a loaded tracelens model in
this process. Prompts are formatted with the chat template (explicit `use_chat_template` > experiment config > the
tokenizer has a template; `tracelens.serving.prompting.PromptSide`), batched automatically (a batch size from free
memory, halved on out-of-memory) with a progress bar.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tracelens.errors import ConfigError, DataError, InputTypeError
from tracelens.model.generation import (
    HookedGenerator,
    check_capture,
    check_generation_args,
    check_steering,
    steering_hook,
)
from tracelens.model.requests import (  # noqa: F401  (TokenResult: the seed's import path)
    CaptureResult,
    CaptureSpec,
    GenerationConfig,
    ResponseLogprobs,
    SteeringSpec,
    TokenOutput,
    TokenResult,
    check_every_position,
    check_steering_request,
    field_errors,
)
from tracelens.store import Experiment, get_model_variant
from tracelens.model.hooks import MultiLayerCapture, _layers
from tracelens.model.loading import load_model, require_bridge
from tracelens.model.likelihood import response_logprobs
from tracelens.model.prompts import encode, left_pad, token_strings, tokenize_batch
from tracelens.serving.prompting import PromptSide, check_prompts, rows_within


class LocalBackend(PromptSide):
    """Generation, capture and steering on a model loaded in this process.

    The generating methods check their request first (`check_generation`), and take a keyword-only `cancel`:
    called before every forward pass of generation, True stops it with `GenerationCancelled`, and
    `formatted`: True when the prompts are already the model's text (chat template applied, or raw completion
    text), so they are used as given (no system prompts then).
    """

    def __init__(self, model, tokenizer=None, use_chat_template: bool | None = None) -> None:
        require_bridge(model)
        self._model = model
        self._tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        self.use_chat_template = use_chat_template
        self.batch_size: int | None = None  # learned: halved on out-of-memory, then kept
        self.experiment: str | None = None  # set by from_experiment
        self.variant: str | None = None
        self._unsteered: tuple[tuple, list[Tensor]] | None = None  # (texts, distributions) of the last KL reference

    @classmethod
    def from_model(cls, model, tokenizer=None, use_chat_template: bool | None = None) -> "LocalBackend":
        return cls(model, tokenizer, use_chat_template)

    @classmethod
    def from_experiment(cls, experiment: str | Experiment, variant: str | None = None,
                        device: str | torch.device | None = "auto", use_chat_template: bool | None = None, *,
                        mode: str = "application", root: str | os.PathLike | None = None,
                        **load_kwargs) -> "LocalBackend":
        """Load the model of ``experiment`` (a name or an `Experiment`) for ``variant`` (default: the config's
        ``defaults[mode]``, else the first); the seed's argument order.

        A variant's LoRA adapter is merged into its model (`tracelens.model.loading.merge_lora`; needs
        ``tracelens[lora]``). The chat template is used per ``use_chat_template`` if given, else the config's
        ``use_chat_template``, else when the tokenizer has one. ``root`` overrides the experiments folder of an
        experiment given by name; ``device`` ("auto": CUDA when available, else CPU) and ``load_kwargs``
        (``dtype``, ``attn_implementation``, ``device_map``, ...) go to `tracelens.model.loading.load_model`.
        """
        exp = Experiment.of(experiment, None if root is None else Path(root))
        mv = get_model_variant(exp, variant, mode)
        if use_chat_template is None:
            configured = exp.config().get("use_chat_template")
            if configured is not None and not isinstance(configured, bool):
                raise DataError(f"{exp.config_path}: use_chat_template must be true, false or absent")
            use_chat_template = configured
        model = load_model(mv.model, lora=mv.lora, device=device, **load_kwargs)
        backend = cls(model, use_chat_template=use_chat_template)
        backend.experiment, backend.variant = exp.name, mv.name
        return backend

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def n_layers(self) -> int:
        return self._model.cfg.n_layers

    @property
    def hidden_dim(self) -> int:
        return self._model.cfg.d_model

    @property
    def device(self) -> torch.device:
        return torch.device(self._model.cfg.device)

    @property
    def model_name(self) -> str | None:
        return getattr(self._model.cfg, "model_name", None)

    def response_logprobs(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                          steering: Sequence[SteeringSpec] | None = None, *, kl: bool = False) -> ResponseLogprobs:
        """Teacher-forced log-probabilities of each response token (`tracelens.model.likelihood.response_logprobs`,
        batches of 8) under `steering` at every position; `kl` adds the per-token KL divergence from the unsteered
        distributions (a second, unsteered pass, kept for the next call on the same texts: a search scores every
        run against one reference; the model's weights must not change meanwhile). ConfigError for steering
        limited to rows, the response or a condition (`check_every_position`)."""
        check_every_position(steering)
        with _steering_adapters(self._model, steering, 0):
            scored = response_logprobs(self._model, prompt_ids, response_ids, distributions=kl)
        if not kl:
            return ResponseLogprobs(scored)
        logprobs, steered = scored
        unsteered = self._unsteered_distributions(prompt_ids, response_ids)
        return ResponseLogprobs(logprobs, [(u.exp() * (u - s)).sum(-1) for u, s in zip(unsteered, steered)])

    def prompt_logprobs(self, token_ids: Sequence[Sequence[int]], steering: Sequence[SteeringSpec] | None = None,
                        top: int = 0, batch_size: int = 8) -> list[tuple[list[float], list[list[tuple[int, float]]]]]:
        """Per row of token ids, each token after the first scored by teacher forcing under `steering` (at every
        position): its `log p(token | the tokens before it)` and the `top` most likely `(token_id, logprob)`
        there (OpenAI's `echo`); a one-token row scores nothing. Rows run in left-padded batches of
        `batch_size`, so at most one batch's next-token distributions are held at once."""
        check_every_position(steering)
        out = []
        for start in range(0, len(token_ids), batch_size):
            rows = [list(r) for r in token_ids[start : start + batch_size]]
            scored = [r for r in rows if len(r) > 1]
            dists = []
            if scored:
                with _steering_adapters(self._model, steering, 0):
                    _, dists = response_logprobs(self._model, [r[:1] for r in scored], [r[1:] for r in scored],
                                                 batch_size, distributions=True)
            found = iter(dists)
            out += [token_logprobs(next(found), r[1:], top, log_softmaxed=True) if len(r) > 1 else ([], [])
                    for r in rows]
        return out

    def _unsteered_distributions(self, prompt_ids: Sequence[Sequence[int]],
                                 response_ids: Sequence[Sequence[int]]) -> list[Tensor]:
        """The unsteered next-token log-distributions of the responses, recomputed only for other texts."""
        key = (tuple(map(tuple, prompt_ids)), tuple(map(tuple, response_ids)))
        if self._unsteered is None or self._unsteered[0] != key:
            self._unsteered = (key, response_logprobs(self._model, prompt_ids, response_ids, distributions=True)[1])
        return self._unsteered[1]

    # --- generation ---------------------------------------------------------------------------------

    def check_generation(self, prompts: Sequence[str], config: GenerationConfig | None = None,
                         system_prompts: Sequence[str | None] | None = None, *,
                         steering: Sequence[SteeringSpec] | None = None, capture: CaptureSpec | None = None,
                         formatted: bool = False) -> None:
        """Refuse, before any model work, a request generation would fail on: TypeError for one string or an
        argument not of the request types; ValueError for an empty `prompts`, `system_prompts` of another length,
        a formatted prompt whose tokens plus `config.max_new_tokens` exceed the model's context
        (`model.cfg.n_ctx`), or steering / capture the model cannot take (a layer outside it, a vector of another
        width, rows past the prompts), the message naming the entry (`steering[1]: ...`). Every generating
        method runs these checks first."""
        self._prepare(prompts, config, system_prompts, formatted, steering, capture)

    def check_token_prompts(self, prompt_ids: Sequence[Sequence[int]], config: GenerationConfig | None = None, *,
                            steering: Sequence[SteeringSpec] | None = None,
                            capture: CaptureSpec | None = None) -> None:
        """`check_generation` for prompts given as token ids (used as given): the same rules, the longest row's
        length counted in its ids."""
        if len(prompt_ids) == 0:
            raise ConfigError("prompt_ids must be a non-empty list of token-id lists; got an empty list")
        self._check_request(len(prompt_ids), max(len(r) for r in prompt_ids), config, steering, capture)

    def generate(self, prompts: Sequence[str], config: GenerationConfig | None = None,
                 steering: Sequence[SteeringSpec] | None = None,
                 system_prompts: Sequence[str | None] | None = None, *,
                 cancel: Callable[[], bool] | None = None, formatted: bool = False) -> list[str]:
        """Response texts, in prompt order (special tokens skipped, whitespace stripped).
        `system_prompts`, one per prompt (None entries allowed), go through the chat template."""
        results = self.generate_results(prompts, config, steering, system_prompts, cancel=cancel, formatted=formatted)
        return [r.response_text for r in results]

    def generate_results(self, prompts: Sequence[str], config: GenerationConfig | None = None,
                         steering: Sequence[SteeringSpec] | None = None,
                         system_prompts: Sequence[str | None] | None = None, *,
                         cancel: Callable[[], bool] | None = None, formatted: bool = False,
                         top_logprobs: int | None = None) -> list[CaptureResult]:
        """Like `generate`, with the prompt text and prompt/response token ids of each result (no activations);
        `top_logprobs=k` (an int >= 0) also fills `response_logprobs` and `response_top_logprobs`."""
        return self._generate(prompts, config, steering, None, system_prompts, cancel, formatted, top_logprobs)

    def generate_with_capture(self, prompts: Sequence[str], config: GenerationConfig | None = None,
                              capture: CaptureSpec | None = None,
                              steering: Sequence[SteeringSpec] | None = None,
                              system_prompts: Sequence[str | None] | None = None, *,
                              cancel: Callable[[], bool] | None = None, formatted: bool = False,
                              top_logprobs: int | None = None) -> list[CaptureResult]:
        """Responses plus activations at every prompt and response position, read by one
        teacher-forced forward over prompt + response under the same steering (`top_logprobs` as in
        `generate_results`)."""
        return self._generate(prompts, config, steering, capture or CaptureSpec(), system_prompts, cancel, formatted,
                              top_logprobs)

    def stream(self, prompt: str, config: GenerationConfig | None = None, capture: CaptureSpec | None = None,
               steering: Sequence[SteeringSpec] | None = None, *,
               cancel: Callable[[], bool] | None = None, formatted: bool = False) -> Iterator[TokenOutput]:
        """An iterator over the tokens of one prompt as they are generated (activations: those that produced
        each token). The request is checked now, not at the first token; closing the iterator removes its hooks."""
        config = config or GenerationConfig()
        [text], _ = self._prepare([prompt], config, None, formatted, steering, capture)
        ids, mask = tokenize_batch(self._tokenizer, [text])
        tokens = HookedGenerator(self._model).stream(
            ids, mask, config.max_new_tokens, config.temperature, capture, steering or None,
            config.stop_token_ids, config.seed, cancel=cancel,
        )
        return self._decoded(tokens)

    def _decoded(self, tokens: Iterator[TokenOutput]) -> Iterator[TokenOutput]:
        """The generator's tokens with their text, without logits (as `RemoteBackend` gives them)."""
        try:
            for tok in tokens:
                yield replace(tok, token=self._tokenizer.decode([tok.token_id]), logits=None)
        finally:
            tokens.close()

    def forward_with_capture(self, input_ids: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"] | None,
                             capture: CaptureSpec) -> dict[int, dict[str, Tensor]]:
        """One forward pass; `{layer: {component: [batch, pos, d]}}` (on the model's device)."""
        device = self.device
        captures = {c: MultiLayerCapture(self._model, capture.layers, c, keep_on_gpu=True) for c in capture.components}
        mask = None if attention_mask is None else attention_mask.to(device)
        with ExitStack() as stack, torch.inference_mode():
            for cap in captures.values():
                stack.enter_context(cap)
            self._model(input_ids.to(device), attention_mask=mask)
        return {l: {c: captures[c].get(l) for c in capture.components} for l in _layers(self._model, capture.layers)}

    # --- internals ----------------------------------------------------------------------------------

    def _prepare(self, prompts, config: GenerationConfig | None, system_prompts, formatted: bool, steering=None,
                 capture: CaptureSpec | None = None) -> tuple[list[str], int]:
        """The formatted prompts and the token count of the longest, after `check_generation`'s checks."""
        if not isinstance(prompts, str) and len(prompts) == 0:
            raise ConfigError("prompts must be a non-empty list of strings; got an empty list")
        texts = self._texts(prompts, system_prompts, formatted)
        longest = max(len(encode(self._tokenizer, t)) for t in texts)
        self._check_request(len(texts), longest, config, steering, capture)
        return texts, longest

    def _check_request(self, n_prompts: int, longest: int, config: GenerationConfig | None, steering,
                       capture: CaptureSpec | None) -> None:
        """The checks of a generation over `n_prompts` prompts whose longest has `longest` tokens."""
        config = GenerationConfig() if config is None else config
        for what, value, kind in (("config", config, GenerationConfig), ("capture", capture, CaptureSpec)):
            if value is not None and not isinstance(value, kind):
                raise InputTypeError(f"{what} must be a {kind.__name__}; got {type(value).__name__}")
        check_steering_request(steering, n_prompts, functools.partial(check_steering, self._model))
        if capture is not None:
            with field_errors("capture"):
                check_capture(self._model, capture)
        check_generation_args(self._model, longest, config.max_new_tokens, config.temperature)

    def _generate(self, prompts, config, steering, capture, system_prompts, cancel, formatted=False,
                  top_logprobs=None) -> list[CaptureResult]:
        config = config or GenerationConfig()
        if top_logprobs is not None and (not isinstance(top_logprobs, int) or isinstance(top_logprobs, bool)
                                         or top_logprobs < 0):
            raise ConfigError(f"top_logprobs must be None or an integer >= 0; got {top_logprobs!r}")
        texts, longest = self._prepare(prompts, config, system_prompts, formatted, steering, capture)

        def run(batch: list[tuple[int, str]]) -> list[CaptureResult]:
            start, batch_texts = batch[0][0], [text for _, text in batch]
            steer = rows_within(steering, start, start + len(batch))
            ids, mask = tokenize_batch(self._tokenizer, batch_texts)
            outs = HookedGenerator(self._model).generate(
                ids, mask, config.max_new_tokens, config.temperature, None, steer,
                config.stop_token_ids, config.seed, output_logits=top_logprobs is not None, cancel=cancel,
            )
            k = top_logprobs
            scored = None if k is None else [token_logprobs(o.logits, o.token_ids, k) for o in outs]
            return self.results(batch_texts, [o.token_ids for o in outs], scored, capture, steer)

        batch_size = self._initial_batch_size(longest, config.max_new_tokens)
        return _batched(list(enumerate(texts)), run, batch_size, self, "generate")

    def results(self, texts: Sequence[str], response_ids: Sequence[list[int]],
                logprobs: Sequence[tuple[list[float], list[list[tuple[int, float]]]]] | None = None,
                capture: CaptureSpec | None = None, steering: Sequence[SteeringSpec] | None = None,
                prompt_ids: Sequence[list[int]] | None = None) -> list[CaptureResult]:
        """The `CaptureResult`s of generated `response_ids` for the formatted `texts` (their tokens: `prompt_ids`,
        None: the texts encoded): decoded, with each token's `(logprob, top alternatives)` when given, and with
        `capture` the activations of one teacher-forced forward over prompt + response under `steering` (over these
        rows), as generation produces them."""
        prompt_ids = prompt_ids or [encode(self._tokenizer, t) for t in texts]
        results = [self._result(text, ids, p) for text, ids, p in zip(texts, response_ids, prompt_ids)]
        for r, scored in zip(results, logprobs or ()):
            r.response_logprobs, r.response_top_logprobs = scored
        if capture is not None:
            self._capture_positions(results, capture, steering)
        return results

    def _result(self, prompt_text: str, response_ids: list[int], prompt_ids: list[int]) -> CaptureResult:
        tok = self._tokenizer
        return CaptureResult(
            prompt_text=prompt_text,
            response_text=tok.decode(response_ids, skip_special_tokens=True).strip(),
            prompt_tokens=token_strings(tok, prompt_ids),
            response_tokens=token_strings(tok, response_ids),
            prompt_token_ids=prompt_ids,
            response_token_ids=list(response_ids),
        )

    def _capture_positions(self, results: list[CaptureResult], capture: CaptureSpec, steering) -> None:
        """Fill prompt/response activations from one left-padded forward over prompt + response."""
        rows = [r.prompt_token_ids + r.response_token_ids for r in results]
        ids, mask = left_pad(rows)
        width = ids.shape[1]
        with _steering_adapters(self._model, steering, torch.tensor([len(r.prompt_token_ids) for r in results])):
            acts = self.forward_with_capture(ids, mask, capture)
        for i, r in enumerate(results):
            start, split = width - len(rows[i]), width - len(r.response_token_ids)
            r.prompt_activations = {l: {c: a[i, start:split].float().cpu() for c, a in comps.items()} for l, comps in acts.items()}
            r.response_activations = {l: {c: a[i, split:].float().cpu() for c, a in comps.items()} for l, comps in acts.items()}

    def _initial_batch_size(self, longest_prompt: int, max_new_tokens: int) -> int:
        if self.batch_size is not None:
            return self.batch_size
        cfg = self._model.cfg
        seq = longest_prompt + max_new_tokens
        kv_heads = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        bytes_per = torch.finfo(cfg.dtype).bits // 8 if cfg.dtype.is_floating_point else 4
        # KV cache + a few residual-width activations per token + float32 logits of the last position
        per_row = seq * cfg.n_layers * 2 * kv_heads * cfg.d_head * bytes_per + seq * cfg.d_model * 16 * bytes_per + cfg.d_vocab * 8
        return max(1, min(64, int(_free_memory_bytes(self.device) * 0.5 // per_row)))


def generate_batch(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 256, *, temperature: float = 0.0,
                   stop_token_ids: list[int] | None = None, seed: int | None = None,
                   batch_size: int | None = None) -> list[str]:
    """Responses to already-formatted `prompts`, in order (the seed's `utils.model_generation.generate_batch`).

    Prompts are left-padded with `tokenize_batch` (no double BOS) and generated with the KV cache under whatever
    adapters are active on `model`; responses are decoded without special tokens and stripped. `batch_size=None`
    runs all prompts as one batch, so batch-slice steering (`PerSampleSteering`) sees the rows it was given; a
    `batch_size` splits them, and such slices then index each sub-batch. Unlike the seed it never re-splits on
    out-of-memory, which would silently move those slices.
    """
    prompts = check_prompts(prompts)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be None or >= 1; got {batch_size}")
    size = batch_size or max(1, len(prompts))
    responses = []
    for start in range(0, len(prompts), size):
        ids, mask = tokenize_batch(tokenizer, list(prompts[start : start + size]))
        outs = HookedGenerator(model).generate(ids, mask, max_new_tokens, temperature, None, None, stop_token_ids, seed)
        responses.extend(tokenizer.decode(o.token_ids, skip_special_tokens=True).strip() for o in outs)
    return responses


def token_logprobs(logits: Float[Tensor, "n vocab"], token_ids: list[int], k: int,
              log_softmaxed: bool = False) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Each token's log-probability under its step's `logits` (already log-probabilities when
    `log_softmaxed`), and the `k` most likely `(token_id, logprob)`."""
    logp = logits.float() if log_softmaxed else torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(token_ids, dtype=torch.long)[:, None])[:, 0].tolist()
    top = torch.topk(logp, min(k, logp.shape[1]), dim=-1)
    return chosen, [list(zip(i.tolist(), v.tolist())) for i, v in zip(top.indices, top.values)]


def _steering_adapters(model, steering: Sequence[SteeringSpec] | None,
                       prompt_lengths: int | Int[Tensor, "batch"]) -> ExitStack:
    """`steering` entered as adapters on `model` for a forward over whole sequences (`prompt_lengths`: real
    prompt tokens per row, where "response" steering starts)."""
    stack = ExitStack()
    for spec in steering or ():
        stack.enter_context(steering_hook(model, spec, prompt_lengths))
    return stack


def _free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
    )


def _batched(items: list, run: Callable[[list], list], batch_size: int, owner: LocalBackend, desc: str) -> list:
    """`run` over consecutive batches with a progress bar; an out-of-memory error halves the batch."""
    out: list = []
    with tqdm(total=len(items), desc=desc, disable=len(items) <= batch_size) as bar:
        i = 0
        while i < len(items):
            try:
                out.extend(run(items[i : i + batch_size]))
            except BaseException as err:
                if not _is_oom(err) or batch_size == 1:
                    raise
                batch_size //= 2
                owner.batch_size = batch_size
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            bar.update(min(batch_size, len(items) - i))
            i += batch_size
    return out
