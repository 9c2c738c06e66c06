"""Hook adapters: capture, steer, ablate, cap and project activations at TransformerLens hook points.

Every adapter is a context manager over `model.hooks(...)`: its TL hooks are added on enter and
exactly those are removed on exit, also when the body raises. Adapters nest and stack (hooks on one
site run in the order they were entered) and work the same under `model(...)`, `run_with_hooks`,
`run_with_cache` and generation. `adapter.fwd_hooks()` gives the same hooks as a list for
`model.run_with_hooks(..., fwd_hooks=adapter.fwd_hooks())`. `path` is a TL hook name or an HF module path
(`"model.layers.16"`), see `tracelens.sites.resolve_hook_name`.

Activations at head-split sites (`attn.hook_k`/`hook_v`, `[batch, pos, heads, d_head]`) are edited
as their flat `[batch, pos, heads * d_head]` view, so vectors are always 1-D.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable, Sequence

import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor

from tracelens import edits
from tracelens.sites import get_hook_path, resolve_hook_name, resolve_layer

HookFn = Callable[..., Tensor | None]


class HookAdapter:
    """Base: subclasses list `(hook_name, fn)` pairs in `_hooks()`; `fn(act, hook)` returns the new
    activation or None for "unchanged"."""

    def __init__(self, model) -> None:
        self.model = model
        self._stack: contextlib.ExitStack | None = None

    def _hooks(self) -> list[tuple[str, HookFn]]:
        raise NotImplementedError

    def _enter_extra(self, stack: contextlib.ExitStack) -> None:
        """Register anything besides TL hooks (removed with them)."""

    def _needs_extra(self) -> bool:
        """True when the TL hooks only work with what `_enter_extra` registers."""
        return False

    def fwd_hooks(self) -> list[tuple[str, HookFn]]:
        """`[(hook_name, fn), ...]` for `model.run_with_hooks(..., fwd_hooks=...)`, equal to the `with` form.

        Captures and projections still accumulate on the adapter (`.get()`). An adapter that also needs a
        hook outside TransformerLens (`PerPositionSteeringHook` with a `token_range`) raises TypeError.
        """
        if self._needs_extra():
            raise TypeError(
                f"{type(self).__name__} with a token_range must be used as a context manager (it reads the "
                "attention mask through a pre-hook on the HF model, which run_with_hooks cannot register); "
                "got a fwd_hooks() call"
            )
        return list(self._hooks())

    def __enter__(self):
        if self._stack is not None:
            raise RuntimeError(f"{type(self).__name__} is already active; create a new one to stack it")
        stack = contextlib.ExitStack()
        try:
            self._enter_extra(stack)
            stack.enter_context(self.model.hooks(fwd_hooks=self._hooks()))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> bool:
        stack, self._stack = self._stack, None
        return bool(stack.__exit__(*exc))


# --- shared validation ------------------------------------------------------------------------------

_HEAD_SITES = {"attn.hook_k": "kv", "attn.hook_v": "kv", "attn.k.hook_out": "kv", "attn.v.hook_out": "kv",
               "attn.hook_q": "q", "attn.q.hook_out": "q", "attn.hook_z": "q"}


def site_width(model, hook_name: str) -> int | None:
    """Flat width of the activation at `hook_name`, when known without running the model."""
    cfg = model.cfg
    leaf = hook_name.split(".", 2)[-1] if hook_name.startswith("blocks.") else hook_name
    kind = _HEAD_SITES.get(leaf)
    if kind == "kv":
        return (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) * cfg.d_head
    if kind == "q":
        return cfg.n_heads * cfg.d_head
    if leaf.startswith("hook_resid") or leaf in ("hook_out", "hook_in", "hook_attn_out", "hook_mlp_out",
                                                 "attn.hook_out", "mlp.hook_out", "ln1_post.hook_out",
                                                 "ln2_post.hook_out"):
        return cfg.d_model
    return None


def _checked_vector(model, hook_name: str, vector: Tensor, what: str = "vector") -> Float[Tensor, "d"]:
    v = edits.as_vector(vector, what)
    width = site_width(model, hook_name)
    if width is not None and v.shape[0] != width:
        raise ValueError(
            f"{what} has {v.shape[0]} elements but {hook_name} has width {width}: "
            "the vector is probably from another model or site"
        )
    return v


def finite_float(value, what: str) -> float:
    """`value` (a real number or one-element tensor) as a float; TypeError for anything else (bools,
    strings), ValueError for NaN or +-inf."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)) or (
        isinstance(value, Tensor) and value.numel() != 1
    ):
        raise TypeError(f"{what} must be a number; got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number; got {v}")
    return v


def _flat(act: Tensor) -> Tensor:
    """`[batch, pos, d]` as is; per-head `[batch, pos, head, d_head]` merged to `[batch, pos, head * d_head]`."""
    return rearrange(act, "b p h d -> b p (h d)") if act.dim() == 4 else act


def _check_runtime_width(act: Tensor, width: int, hook) -> None:
    if act.shape[-1] != width:
        raise ValueError(f"vector has {width} elements but the activation at {hook.name} has width {act.shape[-1]}")


def _edit_flat(act: Tensor, width: int, hook, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply `fn` to the flat view of `act` and return it in `act`'s shape."""
    flat = _flat(act)
    _check_runtime_width(flat, width, hook)
    out = fn(flat)
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
            raise ValueError(f"nothing captured at {self.hook_name}: run a forward pass inside the with block")
        if not concat:
            return list(self.items)
        if len({t.shape[1:] for t in self.items}) > 1:
            raise ValueError(
                f"captures at {self.hook_name} differ in shape beyond the batch dim "
                f"({[tuple(t.shape) for t in self.items]}); use get(concat=False)"
            )
        return torch.cat(self.items, dim=0)

    def clear(self) -> None:
        self.items.clear()


class CaptureHook(HookAdapter):
    """Record the activation at `path` on every forward pass (detached; on CPU unless `keep_on_gpu`).

    `.get()` -> `[batch, seq, hidden]`, repeated forwards concatenated on the batch dim;
    `.get(concat=False)` -> the list, one tensor per forward (what KV-cached decoding needs).
    """

    def __init__(self, model, path: str, keep_on_gpu: bool = False) -> None:
        super().__init__(model)
        self.hook_name = resolve_hook_name(model, path)
        self.keep_on_gpu = keep_on_gpu
        self._acts = CaptureBuffer(self.hook_name)

    def _hooks(self):
        return [(self.hook_name, self._capture)]

    def _capture(self, act: Tensor, hook) -> None:
        act = act.detach()
        self._acts.add(act if self.keep_on_gpu else act.to("cpu"))

    def get(self, concat: bool = True) -> Tensor | list[Tensor]:
        return self._acts.get(concat)

    def clear(self) -> None:
        self._acts.clear()


class _PerLayer(HookAdapter):
    """Base for adapters that run one child adapter per layer; `.parts` maps layer -> child."""

    parts: dict[int, HookAdapter]

    def _hooks(self):
        return [pair for part in self.parts.values() for pair in part._hooks()]

    def _part(self, layer: int):
        key = resolve_layer(layer, self.model.cfg.n_layers)
        if key not in self.parts:
            raise KeyError(f"layer {layer} was not hooked; hooked layers: {sorted(self.parts)}")
        return self.parts[key]


class MultiLayerCapture(_PerLayer):
    """`CaptureHook` at `component` of each of `layers` (None = all). `.get(layer)`, `.get_all()`."""

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


class SteeringHook(HookAdapter):
    """Add `coefficient * vector` at every position of every forward pass (prompt and each decode step).

    The vector is not normalised: with unit vectors the coefficient is in residual-norm units.
    """

    def __init__(self, model, vector: Tensor, path: str, coefficient: float = 1.0) -> None:
        super().__init__(model)
        self.hook_name = resolve_hook_name(model, path)
        self.vector = _checked_vector(model, self.hook_name, vector)
        self.coefficient = finite_float(coefficient, "coefficient")

    def _hooks(self):
        return [(self.hook_name, self._steer)]

    def _steer(self, act: Tensor, hook) -> Tensor:
        v = self.vector.to(act.device)
        return _edit_flat(act, v.shape[0], hook, lambda h: edits.add(h, v, self.coefficient))


class MultiLayerSteering(HookAdapter):
    """Several `SteeringHook`s: `configs=[(layer, vector, coef), ...]`; a 4th item overrides `component`."""

    def __init__(self, model, configs: Sequence[tuple], component: str = "residual") -> None:
        super().__init__(model)
        self._steerers = []
        for i, cfg in enumerate(configs):
            if len(cfg) not in (3, 4):
                raise ValueError(f"configs[{i}] must be (layer, vector, coef[, component]), got {len(cfg)} items")
            layer, vector, coef, *comp = cfg
            path = get_hook_path(layer, comp[0] if comp else component, model)
            self._steerers.append(SteeringHook(model, vector, path, coef))

    def _hooks(self):
        return [pair for s in self._steerers for pair in s._hooks()]


class _TokenPositions:
    """Each current token's position counted from its row's first real token, for every forward call.

    Reads the attention mask (which generation passes for past + current tokens) from a forward
    pre-hook on the HF model; without a mask, rows are unpadded and positions continue the KV cache.
    """

    def __init__(self, model) -> None:
        self.model = model
        self._mask: Tensor | None = None
        self._past = 0

    def register(self, stack: contextlib.ExitStack) -> None:
        handle = self.model.original_model.register_forward_pre_hook(self._record, with_kwargs=True)
        stack.callback(handle.remove)

    def _record(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        cache = kwargs.get("past_key_values")
        self._past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0

    def current(self, batch: int, seq: int, device) -> tuple[Int[Tensor, "batch seq"], torch.BoolTensor]:
        """(positions, is_real_token) for the `seq` tokens of the forward call in progress."""
        if self._mask is None:
            pos = torch.arange(self._past, self._past + seq, device=device).expand(batch, seq)
            return pos, torch.ones(batch, seq, dtype=torch.bool, device=device)
        mask = self._mask.to(device)
        if mask.shape[0] != batch or mask.shape[1] < seq:
            raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not cover a [{batch}, {seq}] activation")
        pos = mask.long().cumsum(dim=1)[:, -seq:] - 1
        return pos, mask[:, -seq:].bool()


class PerPositionSteeringHook(HookAdapter):
    """Steer only absolute token positions `start <= p < end` (`end=None`: open; `token_range=None`: all).

    Positions count from each row's first real token (left padding accounted for) and stay correct
    across KV-cached decode steps, so `token_range=(prompt_len, None)` steers exactly the generated
    tokens. Pass the attention mask when a batch is padded.
    """

    def __init__(self, model, vector: Tensor, path: str, coefficient: float = 1.0,
                 token_range: tuple[int, int | None] | None = None) -> None:
        super().__init__(model)
        if token_range is not None:
            if len(token_range) != 2 or not isinstance(token_range[0], int) or token_range[0] < 0 or (
                token_range[1] is not None and token_range[1] < token_range[0]
            ):
                raise ValueError(f"token_range must be (start, end) with 0 <= start <= end or end=None, got {token_range!r}")
        self.steer = SteeringHook(model, vector, path, coefficient)
        self.token_range = token_range
        self._positions = _TokenPositions(model)

    def _needs_extra(self) -> bool:
        return self.token_range is not None  # positions come from the attention mask, read by a pre-hook

    def _enter_extra(self, stack):
        if self._needs_extra():
            self._positions.register(stack)

    def _hooks(self):
        if self.token_range is None:
            return self.steer._hooks()
        return [(self.steer.hook_name, self._steer_range)]

    def _steer_range(self, act: Tensor, hook) -> Tensor:
        start, end = self.token_range
        pos, real = self._positions.current(act.shape[0], act.shape[1], act.device)
        inside = real & (pos >= start) & ((pos < end) if end is not None else True)
        steered = self.steer._steer(act, hook)
        view = inside.view(*inside.shape, *([1] * (act.dim() - 2)))
        return torch.where(view, steered, act)


class PerSampleSteering(HookAdapter):
    """A different vector and coefficient per batch slice: `configs=[(layer, vector, coef, (b_start, b_end))]`.

    One hook per layer; overlapping slices add. A slice past the batch size is an error at run time
    (it would otherwise silently steer the wrong rows of a split batch).
    """

    def __init__(self, model, configs: Sequence[tuple], component: str = "residual") -> None:
        super().__init__(model)
        self._by_hook: dict[str, list[tuple[Tensor, float, int, int]]] = {}
        for i, cfg in enumerate(configs):
            if len(cfg) != 4:
                raise ValueError(f"configs[{i}] must be (layer, vector, coef, (b_start, b_end)), got {len(cfg)} items")
            layer, vector, coef, rows = cfg
            start, end = rows
            if not 0 <= start < end:
                raise ValueError(f"configs[{i}] has batch slice {tuple(rows)}; need 0 <= b_start < b_end")
            hook_name = get_hook_path(layer, component, model)
            v = _checked_vector(model, hook_name, vector, f"configs[{i}] vector")
            self._by_hook.setdefault(hook_name, []).append((v, finite_float(coef, f"configs[{i}] coefficient"), start, end))

    def _hooks(self):
        return [(name, self._make_fn(entries)) for name, entries in self._by_hook.items()]

    @staticmethod
    def _make_fn(entries):
        def steer(act: Tensor, hook) -> Tensor:
            out = act.clone()
            for v, coef, start, end in entries:
                if end > act.shape[0]:
                    raise ValueError(f"batch slice ({start}, {end}) exceeds the batch of {act.shape[0]} at {hook.name}")
                flat = _flat(out[start:end])
                _check_runtime_width(flat, v.shape[0], hook)
                out[start:end] = edits.add(flat, v.to(act.device), coef).view_as(out[start:end])
            return out

        return steer


# --- ablation and capping ---------------------------------------------------------------------------


class AblationHook(HookAdapter):
    """Project the direction out: `x' = x - (x . r) r` with `r` the unit direction, at every position."""

    def __init__(self, model, direction: Tensor, path: str) -> None:
        super().__init__(model)
        self.hook_name = resolve_hook_name(model, path)
        self.direction = edits.unit(_checked_vector(model, self.hook_name, direction, "direction"))

    def _hooks(self):
        return [(self.hook_name, self._ablate)]

    def _ablate(self, act: Tensor, hook) -> Tensor:
        r = self.direction.to(act.device)
        return _edit_flat(act, r.shape[0], hook, lambda h: edits.ablate(h, r))


class MultiLayerAblation(_PerLayer):
    """`AblationHook` with one direction at `component` of each of `layers` (None = all)."""

    def __init__(self, model, direction: Tensor, layers: Iterable[int] | None = None, component: str = "residual") -> None:
        super().__init__(model)
        self.parts = {l: AblationHook(model, direction, get_hook_path(l, component, model)) for l in _layers(model, layers)}


class ActivationCappingHook(HookAdapter):
    """Clamp the projection on the unit direction `v` at `threshold` (raw units of `<h, v>`).

    floor: `h <- h + max(0, t - <h,v>) v`; ceiling: `h <- h - max(0, <h,v> - t) v`. The part of `h`
    orthogonal to `v` is untouched; every position is capped.
    """

    def __init__(self, model, vector: Tensor, path: str, threshold: float, mode: str = "floor") -> None:
        super().__init__(model)
        if mode not in ("floor", "ceiling"):
            raise ValueError(f"unknown capping mode {mode!r}; use 'floor' or 'ceiling'")
        self.hook_name = resolve_hook_name(model, path)
        self.direction = edits.unit(_checked_vector(model, self.hook_name, vector, "vector"))
        self.threshold = finite_float(threshold, "threshold")
        self.mode = mode

    def _hooks(self):
        return [(self.hook_name, self._cap)]

    def _cap(self, act: Tensor, hook) -> Tensor:
        v = self.direction.to(act.device)
        return _edit_flat(act, v.shape[0], hook, lambda h: edits.cap(h, v, self.threshold, self.mode))


class MultiLayerActivationCapping(_PerLayer):
    """`ActivationCappingHook` per layer: `vectors_by_layer={L: v}`, `thresholds_by_layer={L: t}`."""

    def __init__(self, model, vectors_by_layer: dict[int, Tensor], thresholds_by_layer: dict[int, float],
                 mode: str = "floor", component: str = "residual") -> None:
        super().__init__(model)
        if set(vectors_by_layer) != set(thresholds_by_layer):
            raise ValueError(
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


class ProjectionHook(HookAdapter):
    """Scores `<h, v>` (v unit, float32) computed where the activation lives; only scores leave it.

    `.get()` -> `[batch, seq]` for a `[d]` vector, `[batch, seq, n_vec]` for a `[n_vec, d]` matrix;
    `.get_norms()` -> `||h||` per token `[batch, seq]`. Repeated forwards concatenate on the batch dim.
    """

    def __init__(self, model, vector: Tensor, path: str) -> None:
        super().__init__(model)
        self.hook_name = resolve_hook_name(model, path)
        if isinstance(vector, Tensor) and vector.dim() == 2:
            rows = [edits.unit(_checked_vector(model, self.hook_name, r, f"vector[{i}]"), f"vector[{i}]")
                    for i, r in enumerate(vector)]
            self.vectors = torch.stack(rows)
        else:
            self.vectors = edits.unit(_checked_vector(model, self.hook_name, vector), "vector")
        self._scores = CaptureBuffer(self.hook_name)
        self._norms = CaptureBuffer(self.hook_name)

    def _hooks(self):
        return [(self.hook_name, self._project)]

    def _project(self, act: Tensor, hook) -> None:
        flat = _flat(act.detach())
        _check_runtime_width(flat, self.vectors.shape[-1], hook)
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
        raise ValueError("calibrate_cap_threshold needs at least one prompt")
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    tok = model.tokenizer
    scores = []
    with ProjectionHook(model, vector, get_hook_path(layer, component, model)) as proj, torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            batch = tok(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True, padding_side="left")
            model(batch.input_ids.to(model.cfg.device), attention_mask=batch.attention_mask.to(model.cfg.device))
            scores.append(proj.get()[batch.attention_mask.bool()])
            proj.clear()
    return torch.quantile(torch.cat(scores), percentile / 100).item()
