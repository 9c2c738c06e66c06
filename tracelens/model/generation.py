"""`HookedGenerator`: KV-cached, batched generation with per-token capture and steering.

The 1:1 token -> activation mapping: the activation recorded for generated token k is the hidden
state at the position that produced it (the last prompt position for token 0, token k-1's position
for token k). Each decode step runs one new token through the model (KV cache), so generation is
O(n). Steering applies to the prompt and to every step, exactly like `SteeringHook` around
generation; `SteeringConfig(positions="response")` steers from the last prompt position on, and
`HookedGenerator(model, steer_prompt=False)` from the first generated token on (the original's behaviour).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tracelens.errors import ConfigError, GenerationCancelled, ShapeError
from tracelens.model.edits import unit
from tracelens.model.hooks import READ, HookAdapter, PerPositionSteeringHook, PerSampleSteering, SteeringHook, _layers
# SteeringConfig, CaptureConfig and TokenOutput stay importable from here (the seed's import path)
from tracelens.model.requests import (  # noqa: F401
    CaptureConfig,
    CaptureSpec,
    SequenceOutput,
    SteeringConfig,
    SteeringSpec,
    TokenOutput,
    check_condition_layer,
    check_max_new_tokens,
    check_rows_within,
    check_steering_request,
    check_temperature,
    check_width,
)
from tracelens.model.fastpath import fast_path
from tracelens.model.sites import get_hook_path, resolve_hook_name, site_width


def check_generation_args(model, prompt_len: int, max_new_tokens: int, temperature: float) -> None:
    """ValueError unless `max_new_tokens` is an int >= 1, `temperature` finite and >= 0, and
    `prompt_len + max_new_tokens` (tokens) fits the model's context `model.cfg.n_ctx`."""
    check_max_new_tokens(max_new_tokens)
    check_temperature(temperature)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and prompt_len + max_new_tokens > n_ctx:
        raise ConfigError(
            f"prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} is {prompt_len + max_new_tokens} "
            f"tokens, over the model's context of {n_ctx}; shorten the prompt or lower max_new_tokens"
        )


@dataclass
class _Step:
    tokens: Int[Tensor, "batch"]
    activations: dict[int, dict[str, Tensor]]  # [batch, d] each
    logits: Float[Tensor, "batch vocab"]
    stopped: torch.BoolTensor  # rows whose token this step is a stop token


def steering_hook(model, spec: SteeringSpec, prompt_lengths: int | Int[Tensor, "batch"], *,
                  steer_prompt: bool = True) -> HookAdapter:
    """The adapter for one `SteeringSpec`: a `SteeringHook` for positions "all", a `PerPositionSteeringHook`
    from each row's last prompt token on for "response" (`prompt_lengths`: real prompt tokens, an int or one
    per row), a `ConditionalSteering` when it has a condition (deciding within those prompt tokens, also in a
    forward over prompt + response). `spec.rows` limits either to a slice of the batch (then `prompt_lengths`
    must have one entry per row for "response"). `steer_prompt=False` steers no prompt position, whatever
    `spec.positions` says: a `PerPositionSteeringHook` from each row's first generated token on (ConfigError for
    a spec with a condition, which steers the prompt it decides on)."""
    if spec.condition is not None:
        if not steer_prompt:
            raise ConfigError("steer_prompt=False must be used with steering that has no condition (conditional "
                              "steering steers the prompt it decides on); got a spec with a condition")
        from tracelens.model.conditional import ConditionalSteering

        c = spec.condition
        return ConditionalSteering(model, spec.vector, spec.layer, c.vector, c.layer, c.threshold, c.comparator,
                                   spec.coefficient, c.position, spec.component, prompt_lengths=prompt_lengths)
    if steer_prompt and spec.positions == "all" and spec.rows is not None:
        return PerSampleSteering(model, [spec])
    path = get_hook_path(spec.layer, spec.component, model)
    if steer_prompt and spec.positions == "all":
        return SteeringHook(model, spec.vector, path, spec.coefficient)
    first = prompt_lengths - 1 if steer_prompt else prompt_lengths  # the last prompt token, or the first generated
    return PerPositionSteeringHook(model, spec.vector, path, spec.coefficient, (_starts(first, spec.rows), None))


def check_steering(model, spec: SteeringSpec) -> None:
    """Refuse, before any model work, a spec `model` cannot take: a layer outside it, a site it does not fire, a
    vector (or condition vector) whose width is not its site's, a condition vector of no direction, a condition
    layer after the steering layer. The spec's vector was checked when it was built; rows are checked against each
    call's prompts (`check_steering_request`)."""
    sites = [(spec.layer, spec.vector, "vector")]
    if spec.condition is not None:
        c = spec.condition
        check_condition_layer(spec.layer, c.layer, model.cfg.n_layers)
        unit(c.vector, "condition")
        sites.append((c.layer, c.vector, "condition"))
    for layer, vector, what in sites:
        name = resolve_hook_name(model, get_hook_path(layer, spec.component, model))
        check_width(vector, site_width(model, name), name, what)


def check_capture(model, capture: CaptureSpec) -> None:
    """Refuse, before any model work, capture layers outside `model` (ConfigError naming the valid range)."""
    _layers(model, capture.layers)


class StepCapture(HookAdapter):
    """Reads, at `capture.layers` x `capture.components`, the last position of each forward call (the one that
    produces the next token): `.last[layer][component]` is `[batch, d]` (flat, on CPU), replaced every call."""

    phase = READ

    def __init__(self, model, capture: CaptureConfig) -> None:
        super().__init__(model)
        self._sites = [(layer, component, get_hook_path(layer, component, model))
                       for layer in _layers(model, capture.layers) for component in capture.components]
        self.last: dict[int, dict[str, Tensor]] = {layer: {} for layer, _, _ in self._sites}

    def _hooks(self):
        return [(name, functools.partial(self._keep, layer, component)) for layer, component, name in self._sites]

    def _keep(self, layer: int, component: str, act: Tensor, hook) -> None:
        self.last[layer][component] = act[:, -1].detach().flatten(1).to("cpu")



def _starts(first: int | Int[Tensor, "batch"], rows: tuple[int, int] | None):
    """Where steering starts in each row: `first` (an int or one per row); rows outside `rows` never start."""
    if rows is None:
        return first
    starts = torch.as_tensor(first).reshape(-1)
    check_rows_within(rows, starts.numel())
    outside = torch.ones_like(starts, dtype=torch.bool)
    outside[rows[0]:rows[1]] = False
    return starts.masked_fill(outside, torch.iinfo(starts.dtype).max)


class HookedGenerator:
    """Generation with capture and steering on a tracelens model (see the module docstring).

    `fast_path=True` runs every forward call under `tracelens.model.fastpath.fast_path`: the blocks and other
    components with no hook registered run as the plain HF modules, which gives the same tokens, logits,
    captures and hook calls to the bit (`tests/test_fastpath.py`); False runs the whole TransformerLens bridge.

    `steer_prompt=True` (the default) steers the prompt pass and every decode step, as `SteeringHook` around
    generation does; False is the original `HookedGenerator`: the prompt pass (so also the first generated token)
    is unsteered, and steering acts from the first generated token's position on, with or without KV cache."""

    def __init__(self, model, *, fast_path: bool = True, steer_prompt: bool = True) -> None:
        self.model = model
        self.fast_path = fast_path
        self.steer_prompt = steer_prompt

    def generate(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        max_new_tokens: int = 50,
        temperature: float = 0.0,
        capture: CaptureConfig | None = None,
        steering: Sequence[SteeringConfig] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        *,
        stop_at_eos: bool = True,
        use_cache: bool = True,
        output_logits: bool = False,
        cancel: Callable[[], bool] | None = None,
    ) -> list[SequenceOutput]:
        """One `SequenceOutput` per row. Left-padded batches need `attention_mask`. `temperature=0` is
        greedy; otherwise softmax sampling reproducible with `seed`. Rows stop at the model's EOS ids
        (unless `stop_at_eos=False`) and at `stop_token_ids`. `use_cache=False` recomputes the whole
        sequence every step (for checking the cache). `cancel` is called before every forward pass;
        True raises `GenerationCancelled`. ValueError (before any model work) for arguments
        `check_generation_args` or `check_steering_request` refuses."""
        self._check(input_ids, max_new_tokens, temperature, steering)
        batch = input_ids.shape[0]
        rows: list[list[_Step]] = [[] for _ in range(batch)]
        stops = self.stop_ids(stop_token_ids, stop_at_eos)
        ended = [False] * batch  # rows that produced a stop token before this step (one read per step)
        for step in self._steps(input_ids, attention_mask, max_new_tokens, temperature, capture, steering,
                                stops, seed, use_cache, cancel):
            for r in range(batch):
                if not ended[r]:
                    rows[r].append(step)
            ended = step.stopped.tolist()
        return [self._package(r, steps, output_logits) for r, steps in enumerate(rows)]

    def stream(
        self,
        input_ids: Int[Tensor, "1 pos"],
        attention_mask: Int[Tensor, "1 pos"] | None = None,
        max_new_tokens: int = 50,
        temperature: float = 0.0,
        capture: CaptureConfig | None = None,
        steering: Sequence[SteeringConfig] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        *,
        cancel: Callable[[], bool] | None = None,
    ) -> Iterator[TokenOutput]:
        """An iterator over each generated token of a single prompt (batch 1) as it is produced.
        Arguments are checked now (ValueError), not at the first token; `cancel` as in `generate`."""
        if input_ids.shape[0] != 1:
            raise ShapeError(f"stream takes one prompt (batch 1); got batch {input_ids.shape[0]}; use generate")
        self._check(input_ids, max_new_tokens, temperature, steering)
        stops = self.stop_ids(stop_token_ids, True)
        return self._stream(self._steps(input_ids, attention_mask, max_new_tokens, temperature, capture,
                                        steering, stops, seed, True, cancel))

    # --- internals ----------------------------------------------------------------------------------

    @staticmethod
    def _stream(steps) -> Iterator[TokenOutput]:
        try:
            for k, step in enumerate(steps):
                acts = {l: {c: a[0] for c, a in comps.items()} for l, comps in step.activations.items()}
                yield TokenOutput(token_id=int(step.tokens[0]), step=k, activations=acts, logits=step.logits[0])
                if step.stopped[0]:
                    return
        finally:
            steps.close()  # removes the hooks now, not when the generator is collected

    def _check(self, input_ids: Tensor, max_new_tokens: int, temperature: float, steering) -> None:
        if input_ids.dim() != 2:
            raise ShapeError(f"input_ids must be [batch, pos]; got shape {tuple(input_ids.shape)}")
        check_generation_args(self.model, input_ids.shape[1], max_new_tokens, temperature)
        check_steering_request(steering, input_ids.shape[0])

    def _package(self, row: int, steps: list[_Step], output_logits: bool) -> SequenceOutput:
        out = SequenceOutput([int(s.tokens[row]) for s in steps])
        if steps:
            out.activations = {
                l: {c: torch.stack([s.activations[l][c][row] for s in steps]) for c in comps}
                for l, comps in steps[0].activations.items()
            }
            if output_logits:
                out.logits = torch.stack([s.logits[row] for s in steps])
        return out

    def stop_ids(self, stop_token_ids: Sequence[int] | None = None, stop_at_eos: bool = True) -> Tensor:
        """The ids that end a row: `stop_token_ids` plus, with `stop_at_eos`, the model's EOS ids (sorted, 1-D)."""
        ids: set[int] = set(stop_token_ids or ())
        sources = (self.model.original_model.generation_config, self.model.original_model.config) if stop_at_eos else ()
        for source in sources:
            eos = getattr(source, "eos_token_id", None)
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        return torch.tensor(sorted(ids), dtype=torch.long)

    def _steps(self, input_ids, attention_mask, max_new_tokens, temperature, capture, steering,
               stop_ids: Tensor, seed, use_cache, cancel) -> Iterator[_Step]:
        device = torch.device(self.model.cfg.device)
        ids = input_ids.to(device)
        mask = (torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)).long()
        if mask.shape != ids.shape:
            raise ShapeError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")
        if (mask[:, -1] == 0).any():
            raise ConfigError("the batch must be left-padded: every row's last position must be a real token")
        stop_ids = stop_ids.to(device)
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        prompt_lengths = mask.sum(dim=1)

        # Hooks stay registered while a stream is suspended at `yield` and go when it is closed.
        with contextlib.ExitStack() as stack:
            for cfg in steering or ():
                stack.enter_context(steering_hook(self.model, cfg, prompt_lengths, steer_prompt=self.steer_prompt))
            grabbed = {} if capture is None else stack.enter_context(StepCapture(self.model, capture)).last

            cache, inputs = None, ids
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # each row's first real token is position 0
            stopped = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
            for k in range(max_new_tokens):
                if cancel is not None and cancel():
                    raise GenerationCancelled(f"generation cancelled after {k} of {max_new_tokens} tokens")
                with torch.inference_mode(), (fast_path(self.model) if self.fast_path else contextlib.nullcontext()):
                    out = self.model.original_model(
                        input_ids=inputs, attention_mask=mask, position_ids=positions,
                        past_key_values=cache, use_cache=use_cache,
                    )
                logits = out.logits[:, -1, :].float().to(device)  # the head may sit on another device
                token = self._sample(logits, temperature, gen)
                token = torch.where(stopped, torch.zeros_like(token), token)
                now_stopped = ~stopped & torch.isin(token, stop_ids)
                yield _Step(token.cpu(), {l: dict(c) for l, c in grabbed.items()}, logits.cpu(), (now_stopped | stopped).cpu())
                stopped |= now_stopped
                if stopped.all():
                    return
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                # The last position is a real token in every row, so the new one is one further.
                step_positions = positions[:, -1:] + 1
                if use_cache:
                    cache, inputs, positions = out.past_key_values, token[:, None], step_positions
                else:
                    ids = torch.cat([ids, token[:, None]], dim=1)
                    inputs, positions = ids, torch.cat([positions, step_positions], dim=1)

    @staticmethod
    def _sample(logits: Tensor, temperature: float, gen: torch.Generator | None) -> Tensor:
        if temperature == 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=gen).squeeze(1)
