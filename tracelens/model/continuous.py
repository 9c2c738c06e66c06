"""`ContinuousBatch`: KV-cached generation in which sequences join a running batch between decode steps and
leave it as soon as they finish (continuous, or in-flight, batching).

`add` starts a *group* of prompts (one request): its prompt pass runs at once, as one left-padded forward with
the group's own steering and step capture (the first forward `HookedGenerator.generate` runs for those prompts
alone), samples each row's first token, and its KV cache joins the batch's: both are left-padded to the longer
timeline, the padding masked out, which is what a left-padded batch's cache holds (full and sliding-window
layers alike). Each `step()` then runs one decode forward for every row, each with its own steering (a
conditional spec steers a row only if the prompt pass's decision passed it), temperature, stop ids, step
capture and top log-probabilities. A row that produced a stop token or its last token leaves the batch at once
(`BatchRow.finished`), `remove` drops rows between steps, and leading cache columns no remaining row uses are cut,
so a row that has gone costs nothing. Only the last position's logits are computed.

A row's tokens are those its group gets alone from `HookedGenerator.generate` when greedy: the batch changes
only floating-point rounding (tests/test_continuous.py). Sampled rows draw from the global RNG; seeded sampling
needs its group's own draws, so `add` refuses it (generate it alone with `HookedGenerator`). Hooks are
registered until the rows change or `unhook()` is called: call it before another model call runs between two
steps. Not thread-safe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from jaxtyping import Int
from torch import Tensor
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from tracelens.errors import ConfigError, ShapeError
from tracelens.model.fastpath import fast_path
from tracelens.model.generation import HookedGenerator, StepCapture, check_generation_args, steering_hook
from tracelens.model.hooks import PerSampleSteering, _layers
from tracelens.model.requests import CaptureSpec, GenerationConfig, SteeringSpec, TokenOutput, check_steering_request


@dataclass(eq=False)
class BatchRow:
    """One sequence of a `ContinuousBatch`: its prompt length, settings and what it has generated so far.

    `token_ids` end at the stop token when one was produced; with `top_logprobs=k`, `logprobs[i]` is token i's
    log-probability and `top[i]` its step's `k` likeliest `(token_id, logprob)`. `on_token(row, TokenOutput)` is
    called as each token is produced (its `activations` at the row's capture sites; no logits)."""

    prompt_length: int
    max_new_tokens: int
    temperature: float
    stop_ids: frozenset[int]
    steering: list[SteeringSpec]  # decode-step steering of this row alone (rows None, no condition)
    capture: CaptureSpec | None
    top_logprobs: int | None
    on_token: Callable[["BatchRow", TokenOutput], None] | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None
    finished: bool = False


class ContinuousBatch:
    """A running batch of `BatchRow`s on a tracelens model (module docstring). `rows` lists the unfinished ones,
    in batch order; `fast_path` as in `HookedGenerator`."""

    def __init__(self, model, *, fast_path: bool = True) -> None:
        self.model = model
        self.fast_path = fast_path
        self.device = torch.device(model.cfg.device)
        self.rows: list[BatchRow] = []
        self._cache = None
        self._mask: Int[Tensor, "batch pos"] | None = None  # real (1) and padding (0) cache positions, and the next
        self._positions: Int[Tensor, "batch"] | None = None  # each row's next position (its first real token is 0)
        self._last: Int[Tensor, "batch"] | None = None  # each row's last token, the next step's input
        self._hooks: contextlib.ExitStack | None = None  # the decode adapters of the current rows, while registered
        self._grabbed: dict = {}  # their step capture's last reads

    def add(self, input_ids: Int[Tensor, "group pos"], attention_mask: Int[Tensor, "group pos"] | None,
            config: GenerationConfig, steering: Sequence[SteeringSpec] | None = None,
            capture: CaptureSpec | None = None, *, top_logprobs: int | None = None,
            on_token: Callable[[BatchRow, TokenOutput], None] | None = None) -> list[BatchRow]:
        """Run a group's prompt pass (left-padded, as `HookedGenerator.generate` takes it; `steering` over the
        group's rows), sample each row's first token and join the batch; one `BatchRow` per prompt, in order.
        Rows done after their first token are returned finished and never join. ConfigError before any model work
        for arguments `HookedGenerator` refuses, and for seeded sampling (module docstring)."""
        if input_ids.dim() != 2:
            raise ShapeError(f"input_ids must be [group, pos]; got shape {tuple(input_ids.shape)}")
        check_generation_args(self.model, input_ids.shape[1], config.max_new_tokens, config.temperature)
        specs = check_steering_request(steering, input_ids.shape[0])
        if config.temperature > 0 and config.seed is not None:
            raise ConfigError("seeded sampling draws depend on the batch: generate it alone (HookedGenerator); got "
                              f"temperature={config.temperature:g} with seed={config.seed}")
        ids = input_ids.to(self.device)
        mask = (torch.ones_like(ids) if attention_mask is None else attention_mask.to(self.device)).long()
        if mask.shape != ids.shape or (mask[:, -1] == 0).any():
            raise ConfigError("the group must be left-padded with its attention mask: every row's last position a "
                              "real token")
        lengths = mask.sum(dim=1)
        self.unhook()
        stops = frozenset(HookedGenerator(self.model).stop_ids(config.stop_token_ids).tolist())
        with contextlib.ExitStack() as stack:
            adapters = [stack.enter_context(steering_hook(self.model, spec, lengths)) for spec in specs]
            grabbed = {} if capture is None else stack.enter_context(StepCapture(self.model, capture)).last
            out = self._forward(ids, mask, (mask.cumsum(dim=1) - 1).clamp(min=0), None)
        rows = [BatchRow(int(n), config.max_new_tokens, config.temperature, stops,
                         _row_steering(specs, adapters, r), capture, top_logprobs, on_token,
                         logprobs=None if top_logprobs is None else [], top=None if top_logprobs is None else [])
                for r, n in enumerate(lengths.tolist())]
        tokens = self._record(rows, out.logits[:, -1, :], grabbed)
        kept = [r for r, row in enumerate(rows) if not row.finished]
        if kept:
            index = torch.tensor(kept, device=self.device)
            cache = out.past_key_values
            cache.batch_select_indices(index)
            self._join(cache, mask[index], lengths[index], tokens[index], [rows[r] for r in kept])
        return rows

    def step(self) -> list[BatchRow]:
        """One decode step for every row; the rows that finished with it (they have left the batch)."""
        if not self.rows:
            return []
        if self._hooks is None:
            self._hook()
        mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        out = self._forward(self._last[:, None], mask, self._positions[:, None], self._cache)
        self._cache, self._mask = out.past_key_values, mask
        self._positions = self._positions + 1
        self._last = self._record(self.rows, out.logits[:, -1, :], self._grabbed)
        done = [row for row in self.rows if row.finished]
        if done:
            self.remove(done)
        return done

    def remove(self, rows: Sequence[BatchRow]) -> None:
        """Drop `rows` (finished or not) from the batch; rows not in it are ignored."""
        gone = {id(row) for row in rows}
        keep = [i for i, row in enumerate(self.rows) if id(row) not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.unhook()
        if not keep:
            self._cache = self._mask = self._positions = self._last = None
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask, self._positions, self._last = self._mask[index], self._positions[index], self._last[index]
        unused = int((self._mask.sum(dim=0) > 0).long().argmax())  # leading columns no row uses
        if unused:
            self._mask = self._mask[:, unused:]
            _crop_front(self._cache, unused)

    def unhook(self) -> None:
        """Remove the decode steps' hooks from the model (the next `step` registers them again)."""
        if self._hooks is not None:
            self._hooks.close()
            self._hooks, self._grabbed = None, {}

    # --- internals ----------------------------------------------------------------------------------

    def _hook(self) -> None:
        """Register the current rows' decode steering, each spec at its own row, and one step capture of every
        row's sites."""
        stack = contextlib.ExitStack()
        steering = [replace(s, rows=(i, i + 1)) for i, row in enumerate(self.rows) for s in row.steering]
        sites = _capture_union([row.capture for row in self.rows])
        try:
            if steering:
                stack.enter_context(PerSampleSteering(self.model, steering))
            self._grabbed = {} if sites is None else stack.enter_context(StepCapture(self.model, sites)).last
        except BaseException:
            stack.close()
            raise
        self._hooks = stack

    def _forward(self, ids, mask, positions, cache):
        with torch.inference_mode(), (fast_path(self.model) if self.fast_path else contextlib.nullcontext()):
            return self.model.original_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                             past_key_values=cache, use_cache=True, logits_to_keep=1)

    def _record(self, rows: list[BatchRow], logits: Tensor, grabbed: dict) -> Int[Tensor, "batch"]:
        """Sample each row's token from `logits` `[batch, vocab]`, append it (with its log-probabilities), call
        `on_token`, and mark rows that are done; the tokens."""
        logits = logits.float().to(self.device)  # the head may sit on another device
        tokens = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            if row.temperature > 0:
                tokens[i] = HookedGenerator._sample(logits[i:i + 1], row.temperature, None)[0]
        k = max((row.top_logprobs for row in rows if row.top_logprobs is not None), default=None)
        logp = None if k is None else torch.log_softmax(logits, dim=-1).cpu()
        top = None if k is None else torch.topk(logp, min(k, logp.shape[1]), dim=-1)
        for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
            row.token_ids.append(token)
            if row.top_logprobs is not None:
                row.logprobs.append(float(logp[i, token]))
                row.top.append(list(zip(top.indices[i, :row.top_logprobs].tolist(),
                                        top.values[i, :row.top_logprobs].tolist())))
            if row.on_token is not None:
                acts = {} if row.capture is None else _row_activations(grabbed, row.capture, i, self.model)
                row.on_token(row, TokenOutput(token_id=token, step=len(row.token_ids) - 1, activations=acts))
            row.finished = len(row.token_ids) >= row.max_new_tokens or token in row.stop_ids
        return tokens

    def _join(self, cache, mask: Tensor, lengths: Tensor, tokens: Tensor, rows: list[BatchRow]) -> None:
        """Put a prompt pass's cache (its rows, `mask` `[n, pos]`) after the batch's rows, both padded on the left
        to the longer timeline."""
        self.unhook()
        if not self.rows:
            self._cache, self._mask, self._positions, self._last, self.rows = cache, mask, lengths, tokens, rows
            return
        width = max(self._mask.shape[1], mask.shape[1])
        _pad_front(self._cache, width - self._mask.shape[1])
        _pad_front(cache, width - mask.shape[1])
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        pad = lambda m: torch.cat([m.new_zeros(m.shape[0], width - m.shape[1]), m], dim=1)  # noqa: E731
        self._mask = torch.cat([pad(self._mask), pad(mask)])
        self._positions = torch.cat([self._positions, lengths])
        self._last = torch.cat([self._last, tokens])
        self.rows = self.rows + rows


def _row_steering(specs: list[SteeringSpec], adapters: list, r: int) -> list[SteeringSpec]:
    """The decode-step steering of row `r` of a group: every spec that reaches the row (its rows, or the prompt
    pass's decision for a conditional one) as a plain spec for that row alone. Every decode position is steered
    whatever `positions` says ("response" starts at the last prompt token)."""
    out = []
    for spec, adapter in zip(specs, adapters):
        if spec.condition is not None:
            if bool(adapter.gate[r]):
                out.append(replace(spec, condition=None, rows=None))
        elif spec.rows is None or spec.rows[0] <= r < spec.rows[1]:
            out.append(replace(spec, positions="all", rows=None))
    return out


def _capture_union(captures: list[CaptureSpec | None]) -> CaptureSpec | None:
    """One capture covering every row's sites (None when no row captures)."""
    wanted = [c for c in captures if c is not None]
    if not wanted:
        return None
    layers = None if any(c.layers is None for c in wanted) else sorted({l for c in wanted for l in c.layers})
    return CaptureSpec(layers=layers, components=sorted({comp for c in wanted for comp in c.components}))


def _row_activations(grabbed: dict, capture: CaptureSpec, i: int, model) -> dict[int, dict[str, Tensor]]:
    """Row `i`'s `[d]` activations at its own capture sites, from a step capture of the batch's union."""
    return {l: {c: grabbed[l][c][i] for c in capture.components} for l in _layers(model, capture.layers)}


def _layer_kinds(cache) -> None:
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) or getattr(layer, "record_past", False):
            raise ConfigError(f"continuous batching merges DynamicLayer and DynamicSlidingWindowLayer caches; this "
                              f"model's cache has a {type(layer).__name__}")


def _pad_front(cache, n: int) -> None:
    """Add `n` masked positions before every row of `cache` (a sliding layer keeps at most its window - 1)."""
    _layer_kinds(cache)
    if n == 0:
        return
    for layer in cache.layers:
        if isinstance(layer, DynamicSlidingWindowLayer):
            total = layer.cumulative_length + n
            add = min(total, layer.sliding_window - 1) - layer.keys.shape[-2]
            layer.cumulative_length = total
        else:
            add = n
        zeros = layer.keys.new_zeros(*layer.keys.shape[:-2], add, layer.keys.shape[-1])
        layer.keys = torch.cat([zeros, layer.keys], dim=-2)
        layer.values = torch.cat([zeros.to(layer.values.dtype), layer.values], dim=-2)


def _crop_front(cache, n: int) -> None:
    """Remove the first `n` positions (padding of every row) from `cache`."""
    _layer_kinds(cache)
    for layer in cache.layers:
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length -= n
            keep = min(layer.cumulative_length, layer.sliding_window - 1)
            layer.keys, layer.values = layer.keys[..., -keep:, :], layer.values[..., -keep:, :]
        else:
            layer.keys, layer.values = layer.keys[..., n:, :], layer.values[..., n:, :]
