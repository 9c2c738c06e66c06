"""Hook adapters: capture, steer, ablate, cap and project activations at TransformerLens hook points.

`HookAdapter` is the one base: it owns registration and removal, and a subclass only defines what it does
to an activation (a single-site adapter implements `SiteEdit.edit` or `SiteRead.read`). An adapter is a
context manager over `model.hooks(...)`: its TL hooks are added on enter and exactly those are removed on
exit, also when the body raises; adapters nest and unwind innermost first. `adapter.fwd_hooks()` gives the
same hooks as a list for `model.run_with_hooks(..., fwd_hooks=adapter.fwd_hooks())`. Adapters work the same
under `model(...)`, `run_with_hooks`, `run_with_cache` and `HookedGenerator`.

Order at a hook point: an adapter is an edit (it returns a new activation) or a read (it records one). All
tracelens hooks at one hook point run as one group, at the place of the first of them: every edit, in the
order registered, then every read, in the order registered. So a capture or projection sees the activation
after all edits at its site, whether it was entered before or after them, in an outer or an inner `with`
block, or passed to `run_with_hooks` through `fwd_hooks()`. Hooks added outside tracelens (a plain TL hook,
`run_with_cache`'s cache) keep their own place: added after the group's first hook, they see its result.

`path` is a TL hook name or an HF module path (`"model.layers.16"`), see `tracelens.model.sites.resolve_hook_name`.
Activations at head-split sites (`attn.hook_k`/`hook_v`, `[batch, pos, heads, d_head]`) are edited as their
flat `[batch, pos, heads * d_head]` view, so vectors are always 1-D.
"""

from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar, Literal

import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tracelens.model import edits
from tracelens.model.edits import finite_float
from tracelens.model.loading import require_bridge
from tracelens.errors import ConfigError, InputTypeError, ShapeError, StateError, UnknownKeyError
from tracelens.model.positions import TokenPositions
from tracelens.model.requests import SteeringSpec, check_width
from tracelens.model.sites import get_hook_path, resolve_hook_name, resolve_layer, site_width

HookFn = Callable[..., Tensor | None]
Phase = Literal["edit", "read"]
EDIT: Phase = "edit"
READ: Phase = "read"


class _Grouped:
    """One adapter hook as TL registers it: `fn(act, hook)` and its phase. The first `_Grouped` registered at
    a hook point runs the group of all of them there (edits, then reads, each in registration order); the
    others then pass. One wrapped by TL (`run_with_hooks(remove_batch_dim=True)`) is not found in the group
    and runs alone, in its place."""

    __slots__ = ("fn", "phase")

    def __init__(self, fn: HookFn, phase: Phase) -> None:
        self.fn, self.phase = fn, phase

    def __call__(self, act: Tensor, hook) -> Tensor | None:
        group = [h.user_hook for h in getattr(hook, "fwd_hooks", ()) if isinstance(h.user_hook, _Grouped)]
        if self not in group:
            return self.fn(act, hook)
        if group[0] is not self:
            return None
        if len({id(member) for member in group}) != len(group):
            raise StateError(f"an adapter's hook is registered twice at {hook.name}; register each adapter once")
        out = act
        for member in sorted(group, key=lambda m: m.phase == READ):  # stable: registration order within a phase
            new = member.fn(out, hook)
            out = out if new is None else new
        return None if out is act else out


class HookAdapter(ABC):
    """The base of every adapter: registration, removal and the order at a hook point (module docstring).

    A subclass sets `phase` (EDIT or READ) and lists `(hook_name, fn)` pairs in `_hooks()`; `fn(act, hook)`
    returns the new activation (an edit) or None (a read). One that needs token positions sets
    `self.positions` (a `TokenPositions`, registered as a pre-hook on the HF model while the adapter is active).
    """

    phase: ClassVar[Phase] = EDIT

    def __init__(self, model) -> None:
        require_bridge(model)
        self.model = model
        self.positions: TokenPositions | None = None
        self._stack: contextlib.ExitStack | None = None
        self._registered: list[tuple[str, _Grouped]] | None = None

    @abstractmethod
    def _hooks(self) -> list[tuple[str, HookFn]]:
        """`(hook_name, fn)` pairs, one per hook point the adapter acts on."""

    def _grouped(self) -> list[tuple[str, _Grouped]]:
        """The hooks as registered, built once so that each keeps its identity in its hook point's group."""
        if self._registered is None:
            self._registered = [(name, _Grouped(fn, self.phase)) for name, fn in self._hooks()]
        return self._registered

    @property
    def active(self) -> bool:
        """True inside the adapter's `with` block."""
        return self._stack is not None

    def fwd_hooks(self) -> list[tuple[str, HookFn]]:
        """`[(hook_name, fn), ...]` for `model.run_with_hooks(..., fwd_hooks=...)`, equal to the `with` form.

        Captures and projections still accumulate on the adapter (`.get()`). TypeError for an adapter that
        reads token positions (it needs a pre-hook on the HF model, which run_with_hooks cannot register);
        RuntimeError while the adapter is active (its hooks are registered already).
        """
        if self.positions is not None:
            raise InputTypeError(
                f"{type(self).__name__} reads token positions from the attention mask through a pre-hook on the HF "
                "model, which run_with_hooks cannot register: use it as a context manager (with ...); got a "
                "fwd_hooks() call"
            )
        if self.active:
            raise StateError(f"{type(self).__name__} is active, so its hooks are registered already; got a "
                               "fwd_hooks() call inside its with block")
        return list(self._grouped())

    def __enter__(self):
        if self._stack is not None:
            raise StateError(f"{type(self).__name__} is already active; create a new one to stack it")
        stack = contextlib.ExitStack()
        try:
            if self.positions is not None:
                self.positions.register(stack)
            stack.enter_context(self.model.hooks(fwd_hooks=self._grouped()))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> bool:
        stack, self._stack = self._stack, None
        return bool(stack.__exit__(*exc))


class SiteAdapter(HookAdapter):
    """An adapter at one hook point, `self.hook_name` (resolved from `path`). A vector passed through
    `_vector` is checked against the site's width, and so is every activation at run time."""

    def __init__(self, model, path: str) -> None:
        super().__init__(model)
        self.hook_name = resolve_hook_name(model, path)
        self.width: int | None = None

    def _vector(self, vector: Tensor, what: str = "vector") -> Float[Tensor, "d"]:
        v = _checked_vector(self.model, self.hook_name, vector, what)
        self.width = v.shape[0]
        return v

    def _hooks(self) -> list[tuple[str, HookFn]]:
        return [(self.hook_name, self._apply)]

    @abstractmethod
    def _apply(self, act: Tensor, hook) -> Tensor | None:
        """The TL hook function."""


class SiteEdit(SiteAdapter):
    """A single-site edit: a subclass implements `edit` on the flat activation and may restrict it with
    `where` (rows x positions)."""

    phase = EDIT

    @abstractmethod
    def edit(self, h: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch pos d"]:
        """The edited activation, same shape and dtype."""

    def where(self, batch: int, seq: int, device) -> Bool[Tensor, "batch seq"] | None:
        """Where the edit applies, `[batch, seq]`; None (the default) for everywhere."""
        return None

    def _apply(self, act: Tensor, hook) -> Tensor:
        return _edit_flat(act, self.width, hook, self.edit, self.where(act.shape[0], act.shape[1], act.device))


class SiteRead(SiteAdapter):
    """A single-site read: a subclass implements `read` (it records, never edits)."""

    phase = READ

    @abstractmethod
    def read(self, act: Tensor) -> None:
        """Record `act` (detached, in the hook point's own shape)."""

    def _apply(self, act: Tensor, hook) -> None:
        if self.width is not None:
            _check_runtime_width(_flat(act), self.width, hook)
        self.read(act.detach())


class _Composite(HookAdapter):
    """An adapter made of child adapters of its own phase, `parts`; their hooks register together."""

    parts: dict | list

    def _children(self) -> Iterable[HookAdapter]:
        return self.parts.values() if isinstance(self.parts, dict) else self.parts

    def _hooks(self) -> list[tuple[str, HookFn]]:
        return [pair for part in self._children() for pair in part._hooks()]


# --- shared validation ------------------------------------------------------------------------------


def _checked_vector(model, hook_name: str, vector: Tensor, what: str = "vector") -> Float[Tensor, "d"]:
    v = edits.as_vector(vector, what)
    check_width(v, site_width(model, hook_name), hook_name, what)
    return v


def _flat(act: Tensor) -> Tensor:
    """`[batch, pos, d]` as is; per-head `[batch, pos, head, d_head]` merged to `[batch, pos, head * d_head]`."""
    return rearrange(act, "b p h d -> b p (h d)") if act.dim() == 4 else act


def _check_runtime_width(act: Tensor, width: int, hook) -> None:
    if act.shape[-1] != width:
        raise ShapeError(f"vector has {width} elements but the activation at {hook.name} has width {act.shape[-1]}")


def _edit_flat(act: Tensor, width: int, hook, fn: Callable[[Tensor], Tensor],
               where: Bool[Tensor, "batch"] | Bool[Tensor, "batch seq"] | None = None) -> Tensor:
    """`fn` applied to the flat view of `act`, kept only where `where` (rows, or rows x positions) is True,
    returned in `act`'s shape."""
    flat = _flat(act)
    _check_runtime_width(flat, width, hook)
    out = fn(flat)
    if where is not None:
        out = torch.where(where.view(*where.shape, *([1] * (out.dim() - where.dim()))), out, flat)
    return rearrange(out, "b p (h d) -> b p h d", h=act.shape[2]) if act.dim() == 4 else out


def _layers(model, layers: Iterable[int] | None) -> list[int]:
    n = model.cfg.n_layers
    return list(range(n)) if layers is None else [resolve_layer(layer, n) for layer in layers]


# --- capture ----------------------------------------------------------------------------------------


class CaptureBuffer:
    """Per-forward tensors, concatenated on the batch dim on request."""

    def __init__(self, hook_name: str) -> None:
        self.hook_name = hook_name
        self.items: list[Tensor] = []

    def add(self, t: Tensor) -> None:
        self.items.append(t)

    def get(self, concat: bool = True) -> Tensor | list[Tensor]:
        if not self.items:
            raise ConfigError(f"nothing captured at {self.hook_name}: run a forward pass inside the with block")
        if not concat:
            return list(self.items)
        if len({t.shape[1:] for t in self.items}) > 1:
            raise ShapeError(
                f"captures at {self.hook_name} differ in shape beyond the batch dim "
                f"({[tuple(t.shape) for t in self.items]}); use get(concat=False)"
            )
        return torch.cat(self.items, dim=0)

    def clear(self) -> None:
        self.items.clear()


class CaptureHook(SiteRead):
    """Record the activation at `path` on every forward pass (detached; on CPU unless `keep_on_gpu`).

    `.get()` -> `[batch, seq, hidden]`, repeated forwards concatenated on the batch dim;
    `.get(concat=False)` -> the list, one tensor per forward (what KV-cached decoding needs).
    """

    def __init__(self, model, path: str, keep_on_gpu: bool = False) -> None:
        super().__init__(model, path)
        self.keep_on_gpu = keep_on_gpu
        self._acts = CaptureBuffer(self.hook_name)

    def read(self, act: Tensor) -> None:
        self._acts.add(act if self.keep_on_gpu else act.to("cpu"))

    def get(self, concat: bool = True) -> Tensor | list[Tensor]:
        return self._acts.get(concat)

    def clear(self) -> None:
        self._acts.clear()


class _PerLayer(_Composite):
    """Base for adapters that run one child adapter per layer; `.parts` maps layer -> child."""

    parts: dict[int, HookAdapter]

    def _part(self, layer: int):
        key = resolve_layer(layer, self.model.cfg.n_layers)
        if key not in self.parts:
            raise UnknownKeyError(f"layer {layer} was not hooked; hooked layers: {sorted(self.parts)}")
        return self.parts[key]


class MultiLayerCapture(_PerLayer):
    """`CaptureHook` at `component` of each of `layers` (None = all). `.get(layer)`, `.get_all()`."""

    phase = READ

    def __init__(self, model, layers: Iterable[int] | None = None, component: str = "residual",
                 keep_on_gpu: bool = False) -> None:
        super().__init__(model)
        self.parts = {l: CaptureHook(model, get_hook_path(l, component, model), keep_on_gpu) for l in _layers(model, layers)}

    def get(self, layer: int, concat: bool = True):
        return self._part(layer).get(concat)

    def get_all(self) -> dict[int, Tensor]:
        return {layer: part.get() for layer, part in self.parts.items()}

    def clear(self) -> None:
        for part in self.parts.values():
            part.clear()


# --- steering ---------------------------------------------------------------------------------------


class SteeringHook(SiteEdit):
    """Add `coefficient * vector` at every position of every forward pass (prompt and each decode step).

    The vector is not normalised: with unit vectors the coefficient is in residual-norm units.
    """

    def __init__(self, model, vector: Tensor, path: str, coefficient: float = 1.0) -> None:
        super().__init__(model, path)
        self.vector = self._vector(vector)
        self.coefficient = finite_float(coefficient, "coefficient")

    def edit(self, h: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch pos d"]:
        return edits.add(h, self.vector.to(h.device), self.coefficient)


class MultiLayerSteering(_Composite):
    """Several `SteeringHook`s, one per `SteeringSpec` or seed tuple `(layer, vector, coef[, component])`
    (`component` applies to tuples that name none). Every row, every position: specs with `rows`,
    `positions="response"` or a condition are refused (use `PerSampleSteering` or the generator)."""

    def __init__(self, model, configs: Sequence[SteeringSpec | tuple], component: str = "residual") -> None:
        super().__init__(model)
        self.parts = [SteeringHook(model, s.vector, get_hook_path(s.layer, s.component, model), s.coefficient)
                      for s in _plain_specs(configs, component, "MultiLayerSteering", rows=False)]


def _plain_specs(configs: Sequence[SteeringSpec | tuple], component: str, adapter: str,
                 rows: bool) -> list[SteeringSpec]:
    """`configs` as specs (tuples through `SteeringSpec.from_tuple`, the one conversion); ConfigError for a
    spec this adapter would not honour (a condition, positions "response", or rows when `rows` is False)."""
    specs = [SteeringSpec.from_tuple(c, component, f"configs[{i}]") for i, c in enumerate(configs)]
    for i, s in enumerate(specs):
        if s.condition is not None or s.positions != "all" or (s.rows is not None and not rows):
            raise ConfigError(f"{adapter} steers {'its rows' if rows else 'every row'} at every position: configs[{i}] "
                              "must have positions 'all', no condition" + ("" if rows else " and no rows")
                              + f"; got positions={s.positions!r}, condition={s.condition is not None}, rows={s.rows}")
    return specs


class PerPositionSteeringHook(SteeringHook):
    """Steer only absolute token positions `start <= p < end` (`end=None`: open; `token_range=None`: all).

    Positions count from each row's first real token (left padding accounted for) and stay correct
    across KV-cached decode steps, so `token_range=(prompt_len, None)` steers exactly the generated
    tokens. `start` may be one int per row (a 1-D integer tensor), e.g. each row's own prompt length.
    Pass the attention mask when a batch is padded.
    """

    def __init__(self, model, vector: Tensor, path: str, coefficient: float = 1.0,
                 token_range: tuple[int | Int[Tensor, "batch"], int | None] | None = None) -> None:
        super().__init__(model, vector, path, coefficient)
        self.token_range = _check_token_range(token_range)
        if token_range is not None:
            self.positions = TokenPositions(model)

    def where(self, batch: int, seq: int, device) -> Bool[Tensor, "batch seq"] | None:
        if self.token_range is None:
            return None
        return self.positions.mask(*self.token_range, batch, seq, device)


def _check_token_range(token_range):
    """`token_range` unchanged: None, or (start, end) with start an int >= 0 or a 1-D integer tensor of them
    (one per row), and end None or an int >= every start; ValueError otherwise."""
    if token_range is None:
        return None
    ok = isinstance(token_range, tuple) and len(token_range) == 2
    if ok:
        start, end = token_range
        if isinstance(start, Tensor):
            ok = start.dim() == 1 and start.numel() > 0 and not start.is_floating_point() and start.dtype != torch.bool
            low, high = (int(start.min()), int(start.max())) if ok else (0, 0)
        else:
            ok = isinstance(start, int) and not isinstance(start, bool)
            low = high = start if ok else 0
        ok = ok and low >= 0 and (end is None or (isinstance(end, int) and not isinstance(end, bool) and end >= high))
    if not ok:
        raise ConfigError(f"token_range must be (start, end) with 0 <= start <= end or end=None (start an int or one "
                         f"per row); got {token_range!r}")
    return token_range


class PerSampleSteering(HookAdapter):
    """A different vector and coefficient per batch slice: `SteeringSpec`s with `rows=(b_start, b_end)` (None:
    every row), or the seed's tuples `(layer, vector, coef, (b_start, b_end))` at `component`.

    One hook per site; overlapping slices add. A slice past the batch size is an error at run time
    (it would otherwise silently steer the wrong rows of a split batch).
    """

    def __init__(self, model, configs: Sequence[SteeringSpec | tuple], component: str = "residual") -> None:
        super().__init__(model)
        self._by_hook: dict[str, list[tuple[Tensor, float, int, int | None]]] = {}
        for i, s in enumerate(_plain_specs(configs, component, "PerSampleSteering", rows=True)):
            hook_name = get_hook_path(s.layer, s.component, model)
            v = _checked_vector(model, hook_name, s.vector, f"configs[{i}] vector")
            start, end = s.rows if s.rows is not None else (0, None)
            self._by_hook.setdefault(hook_name, []).append((v, s.coefficient, start, end))

    def _hooks(self):
        return [(name, functools.partial(self._steer, entries)) for name, entries in self._by_hook.items()]

    @staticmethod
    def _steer(entries: list[tuple[Tensor, float, int, int | None]], act: Tensor, hook) -> Tensor:
        for v, coef, start, end in entries:
            end = act.shape[0] if end is None else end
            if end > act.shape[0]:
                raise ShapeError(f"batch slice ({start}, {end}) exceeds the batch of {act.shape[0]} at {hook.name}")
            rows = torch.zeros(act.shape[0], dtype=torch.bool, device=act.device)
            rows[start:end] = True
            act = _edit_flat(act, v.shape[0], hook, lambda h: edits.add(h, v.to(h.device), coef), rows)
        return act


# --- ablation and capping ---------------------------------------------------------------------------


class AblationHook(SiteEdit):
    """Project the direction out: `x' = x - (x . r) r` with `r` the unit direction, at every position."""

    def __init__(self, model, direction: Tensor, path: str) -> None:
        super().__init__(model, path)
        self.direction = edits.unit(self._vector(direction, "direction"))

    def edit(self, h: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch pos d"]:
        return edits.ablate(h, self.direction.to(h.device))


class MultiLayerAblation(_PerLayer):
    """`AblationHook` with one direction at `component` of each of `layers` (None = all)."""

    def __init__(self, model, direction: Tensor, layers: Iterable[int] | None = None, component: str = "residual") -> None:
        super().__init__(model)
        self.parts = {l: AblationHook(model, direction, get_hook_path(l, component, model)) for l in _layers(model, layers)}


class ActivationCappingHook(SiteEdit):
    """Clamp the projection on the unit direction `v` at `threshold` (raw units of `<h, v>`).

    floor: `h <- h + max(0, t - <h,v>) v`; ceiling: `h <- h - max(0, <h,v> - t) v`. The part of `h`
    orthogonal to `v` is untouched; every position is capped. `tau` is the original code's name for
    `threshold` (give one of them).
    """

    def __init__(self, model, vector: Tensor, path: str, threshold: float | None = None, mode: str = "floor", *,
                 tau: float | None = None) -> None:
        super().__init__(model, path)
        if mode not in ("floor", "ceiling"):
            raise ConfigError(f"unknown capping mode {mode!r}; use 'floor' or 'ceiling'")
        if (threshold is None) == (tau is None):
            raise ConfigError("ActivationCappingHook must be given exactly one of threshold and tau (the same "
                              f"value); got threshold={threshold!r}, tau={tau!r}")
        self.direction = edits.unit(self._vector(vector, "vector"), "vector")
        self.threshold = finite_float(threshold if tau is None else tau, "threshold")
        self.mode = mode

    def edit(self, h: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch pos d"]:
        return edits.cap(h, self.direction.to(h.device), self.threshold, self.mode)


class MultiLayerActivationCapping(_PerLayer):
    """`ActivationCappingHook` per layer: `vectors_by_layer={L: v}`, `thresholds_by_layer={L: t}`."""

    def __init__(self, model, vectors_by_layer: dict[int, Tensor], thresholds_by_layer: dict[int, float],
                 mode: str = "floor", component: str = "residual") -> None:
        super().__init__(model)
        if set(vectors_by_layer) != set(thresholds_by_layer):
            raise ConfigError(
                f"vectors_by_layer has layers {sorted(vectors_by_layer)} but thresholds_by_layer has "
                f"{sorted(thresholds_by_layer)}; give a threshold for every vector"
            )
        self.parts = {
            resolve_layer(l, model.cfg.n_layers): ActivationCappingHook(
                model, v, get_hook_path(l, component, model), thresholds_by_layer[l], mode
            )
            for l, v in vectors_by_layer.items()
        }


# --- projection -------------------------------------------------------------------------------------


class ProjectionHook(SiteRead):
    """Scores `<h, v>` (v unit, float32) computed where the activation lives; only scores leave it.

    `.get()` -> `[batch, seq]` for a `[d]` vector, `[batch, seq, n_vec]` for a `[n_vec, d]` matrix;
    `.get_norms()` -> `||h||` per token `[batch, seq]`. Repeated forwards concatenate on the batch dim.
    """

    def __init__(self, model, vector: Tensor, path: str) -> None:
        super().__init__(model, path)
        if isinstance(vector, Tensor) and vector.dim() == 2:
            self.vectors = torch.stack([edits.unit(self._vector(r, f"vector[{i}]"), f"vector[{i}]")
                                        for i, r in enumerate(vector)])
        else:
            self.vectors = edits.unit(self._vector(vector), "vector")
        self._scores = CaptureBuffer(self.hook_name)
        self._norms = CaptureBuffer(self.hook_name)

    def read(self, act: Tensor) -> None:
        flat = _flat(act)
        self._scores.add(edits.project(flat, self.vectors.to(act.device)).cpu())
        self._norms.add(flat.float().norm(dim=-1).cpu())

    def get(self, concat: bool = True) -> Tensor | list[Tensor]:
        return self._scores.get(concat)

    def get_norms(self, concat: bool = True) -> Tensor | list[Tensor]:
        return self._norms.get(concat)

    def clear(self) -> None:
        self._scores.clear()
        self._norms.clear()


class MultiLayerProjection(_PerLayer):
    """`ProjectionHook` per layer: `vectors_by_layer={L: [d] or [n_vec, d]}`; `.get(layer)`, `.get_all()`."""

    phase = READ

    def __init__(self, model, vectors_by_layer: dict[int, Tensor], component: str = "residual") -> None:
        super().__init__(model)
        self.parts = {resolve_layer(l, model.cfg.n_layers): ProjectionHook(model, v, get_hook_path(l, component, model))
                      for l, v in vectors_by_layer.items()}

    def get(self, layer: int, concat: bool = True) -> Tensor | list[Tensor]:
        return self._part(layer).get(concat)

    def get_norms(self, layer: int, concat: bool = True) -> Tensor | list[Tensor]:
        return self._part(layer).get_norms(concat)

    def get_all(self) -> dict[int, Tensor]:
        return {layer: part.get() for layer, part in self.parts.items()}

    def get_all_norms(self) -> dict[int, Tensor]:
        return {layer: part.get_norms() for layer, part in self.parts.items()}

    def clear(self) -> None:
        for part in self.parts.values():
            part.clear()


def calibrate_cap_threshold(model, vector: Tensor, layer: int, prompts: Sequence[str], *,
                            percentile: float = 25.0, component: str = "residual", batch_size: int = 8) -> float:
    """A capping threshold: the `percentile` of `<h, v>` over every real token of `prompts`.

    The Assistant Axis paper floors at the 25th percentile of default-assistant projections.
    Prompts are tokenized with the model's tokenizer as given (format chat prompts beforehand).
    """
    if not prompts:
        raise ConfigError("calibrate_cap_threshold needs at least one prompt")
    if not 0 <= percentile <= 100:
        raise ConfigError(f"percentile must be in [0, 100]; got {percentile}")
    tok = model.tokenizer
    scores = []
    with ProjectionHook(model, vector, get_hook_path(layer, component, model)) as proj, torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            batch = tok(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True, padding_side="left")
            model(batch.input_ids.to(model.cfg.device), attention_mask=batch.attention_mask.to(model.cfg.device))
            scores.append(proj.get()[batch.attention_mask.bool()])
            proj.clear()
    return torch.quantile(torch.cat(scores), percentile / 100).item()
