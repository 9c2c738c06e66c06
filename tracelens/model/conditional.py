"""Conditional steering (CAST, Lee et al., arXiv 2409.05907): steer a row only when its prompt crosses a
threshold on a condition vector, decided once at the end of the prompt and kept for its whole generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from tracelens.model import edits
from tracelens.model.capture import capture_at_position
from tracelens.errors import ConfigError, ShapeError, StateError
from tracelens.model.hooks import HookAdapter, _checked_vector, _edit_flat, _flat
from tracelens.metrics import accuracy
from tracelens.model.positions import TokenPositions, resolve_position
from tracelens.model.requests import Condition, check_condition_layer
from tracelens.model.sites import get_hook_path


class ConditionalSteering(HookAdapter):
    """Add `coefficient * vector` at `layer` (every position) only in rows whose condition score passes.

    The score is `<h, unit(condition)>` at `condition_layer`'s `component`, averaged over `position` of each
    row's prompt (a `prompt[...]` position, counted from the row's first real token). A row passes when
    `score > threshold` ("greater") or `score < threshold` ("less"). The decision is made on every forward
    call that starts a sequence (no KV cache) and reused by the cached decode steps that continue it.
    The decision is part of the edit: it runs in the edit phase of its hook point (see `tracelens.model.hooks`),
    before this adapter's own steering and after edits registered earlier there; `layer >= condition_layer`
    (ValueError otherwise). It reads token positions, so it needs the `with` form, not `fwd_hooks()`.
    Left-padded batches need their attention mask. After a forward, `.scores` `[batch]` and `.gate`
    `[batch]` (bool) hold the last decision.

    `prompt_lengths` (real prompt tokens: an int, or one per row) is for a forward that runs past the prompt, as
    the teacher-forced capture over prompt + response does: `position` is then counted within each row's prompt,
    so the decision is the one generation made at the prompt. None: the first forward is all prompt.
    """

    def __init__(self, model, vector: Tensor, layer: int, condition: Tensor, condition_layer: int, threshold: float,
                 comparator: str = "greater", coefficient: float = 1.0, position: str = "prompt[-1]",
                 component: str = "residual", prompt_lengths: int | Int[Tensor, "batch"] | None = None) -> None:
        super().__init__(model)
        checked = Condition(condition, condition_layer, threshold, comparator, position)  # the one rule set
        check_condition_layer(layer, condition_layer, model.cfg.n_layers)
        self.steer_hook = get_hook_path(layer, component, model)
        self.condition_hook = get_hook_path(condition_layer, component, model)
        self.vector = _checked_vector(model, self.steer_hook, vector)
        self.condition = edits.unit(_checked_vector(model, self.condition_hook, condition, "condition"), "condition")
        self.threshold, self.comparator, self.coefficient = checked.threshold, comparator, float(coefficient)
        self.position, self.prompt_lengths = position, prompt_lengths
        self.scores: Tensor | None = None
        self.gate: Tensor | None = None
        self.positions = TokenPositions(model)

    def __enter__(self):
        self.scores = self.gate = None
        return super().__enter__()

    def _hooks(self):
        # Same site: the decision is registered first, so it reads the activation before this steering.
        return [(self.condition_hook, self._decide), (self.steer_hook, self._steer)]

    def _decide(self, act: Tensor, hook) -> None:
        if self.positions.continues_cache:  # a cached decode step continues the decided sequence
            return
        flat = _flat(act)
        batch, seq = flat.shape[:2]
        _, real = self.positions.current(batch, seq, act.device)
        lengths = real.sum(1)
        if not torch.equal(real, torch.arange(seq, device=act.device)[None, :] >= (seq - lengths)[:, None]):
            raise ConfigError("conditional steering needs left-padded rows (real tokens last, attention mask passed)")
        lengths = lengths.cpu()
        prompts = lengths if self.prompt_lengths is None else torch.as_tensor(self.prompt_lengths).cpu().reshape(-1)
        prompts = prompts.expand(batch) if prompts.numel() == 1 else prompts
        if prompts.shape != (batch,) or (prompts > lengths).any() or (prompts < 1).any():
            raise ShapeError(f"prompt_lengths must be one count in [1, real tokens] per row; got {prompts.tolist()} "
                             f"for rows of {lengths.tolist()} tokens")
        scores = []
        for i, (n, p) in enumerate(zip(lengths.tolist(), prompts.tolist())):
            s, e = resolve_position(self.position, p, n)
            if e <= s:
                raise ConfigError(f"position {self.position!r} selects no tokens of row {i} ({n} tokens)")
            scores.append(edits.project(flat[i, seq - n + s : seq - n + e], self.condition.to(act.device)).mean())
        self.scores = torch.stack(scores)
        self.gate = self.scores > self.threshold if self.comparator == "greater" else self.scores < self.threshold

    def _steer(self, act: Tensor, hook) -> Tensor:
        if self.gate is None or self.gate.shape[0] != act.shape[0]:
            raise StateError("no condition decision for this batch: run the prompt (without KV cache) first")
        v = self.vector.to(act.device)
        return _edit_flat(act, v.shape[0], hook, lambda h: edits.add(h, v, self.coefficient), self.gate)


@dataclass(frozen=True)
class ConditionFit:
    """A threshold and comparator for `ConditionalSteering`, and the balanced accuracy they reach on the
    prompts they were fitted on (in [0, 1]; report held-out accuracy separately)."""

    threshold: float
    comparator: str
    accuracy: float


def fit_condition_threshold(model, condition: Tensor, condition_layer: int, steer_prompts: Sequence[str],
                            keep_prompts: Sequence[str], position: str = "prompt[-1]", pre_formatted: bool = False,
                            component: str = "residual") -> ConditionFit:
    """The threshold between two prompt sets (those to steer, those to leave) with the best balanced accuracy,
    taken at midpoints between sorted scores; the comparator points towards the steer set's mean.
    Prompts go through the chat template unless `pre_formatted` (format them as you will at generation)."""
    unit = edits.unit(condition, "condition")
    score = {name: capture_at_position(model, model.tokenizer, prompts, condition_layer, position, "mean",
                                       pre_formatted, component) @ unit
             for name, prompts in (("steer", steer_prompts), ("keep", keep_prompts))}
    comparator = "greater" if score["steer"].mean() >= score["keep"].mean() else "less"
    sign = 1.0 if comparator == "greater" else -1.0
    ordered = torch.cat([score["steer"], score["keep"]]).sort().values
    cuts = torch.cat([ordered[:1] - 1, (ordered[1:] + ordered[:-1]) / 2, ordered[-1:] + 1])
    accs = [accuracy(sign * score["steer"], sign * score["keep"], float(sign * c)) for c in cuts]
    best = max(range(len(cuts)), key=lambda k: accs[k])
    return ConditionFit(float(cuts[best]), comparator, accs[best])
