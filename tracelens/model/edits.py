"""Activation edits as pure functions: what each hook adapter does to one activation tensor.

Shapes: `h` is `[*batch_pos, d]` (any leading dims); directions are `[d]`. Scores and projections
are computed in float32; edited activations come back in `h`'s dtype.
"""

from __future__ import annotations

import math
import numbers

import torch
from jaxtyping import Float
from torch import Tensor

from tracelens.errors import ConfigError, DirectionError, InputTypeError, ShapeError


MIN_NORM = 1e-8
"""The smallest norm a vector may have to define a direction (the seed's hooks use the same bound)."""


def as_vector(vector: Tensor, what: str = "vector") -> Float[Tensor, "d"]:
    """`vector` as a float32 1-D tensor; InputTypeError for a non-tensor, ShapeError for other shapes,
    DirectionError for NaN or inf entries."""
    if not isinstance(vector, Tensor):
        raise InputTypeError(f"{what} must be a torch.Tensor; got {type(vector).__name__}")
    if vector.dim() != 1:
        raise ShapeError(f"{what} must be 1-D [d_model]; got shape {tuple(vector.shape)}")
    if not torch.isfinite(vector).all():
        raise DirectionError(f"{what} contains NaN or inf")
    return vector.detach().float()


def finite_float(value, what: str) -> float:
    """`value` (a real number or one-element tensor) as a float; TypeError for anything else (bools,
    strings), ValueError for NaN or +-inf."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)) or (
        isinstance(value, Tensor) and value.numel() != 1
    ):
        raise InputTypeError(f"{what} must be a number; got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{what} must be a finite number; got {v}")
    return v


def unit(vector: Tensor, what: str = "direction", hint: str = "") -> Float[Tensor, "d"]:
    """The float32 unit vector along `vector`: the one unit-vector policy of tracelens.

    Every direction tracelens steers, ablates, caps, projects on in a hook, or returns from an extraction method is
    normalised here, and a vector with NaN / inf entries or a norm below `MIN_NORM` is a DirectionError (`hint`
    appended to its message), never a silent zero or NaN. (The seed's measurement helpers in `tracelens.math`
    keep its documented +1e-8 guard: there a zero vector measures 0.)
    """
    v = as_vector(vector, what)
    norm = v.norm()
    if norm < MIN_NORM:
        raise DirectionError(f"{what} must have norm >= {MIN_NORM:g} to define a direction; got norm "
                             f"{norm.item():.3g}{hint}")
    return v / norm


def add(h: Float[Tensor, "*pos d"], vector: Float[Tensor, "d"], coefficient: float) -> Float[Tensor, "*pos d"]:
    """Steering: `h + coefficient * vector`, the addend cast to `h.dtype` (the vector is not normalised)."""
    return h + (coefficient * vector).to(h.dtype)


def project(h: Float[Tensor, "*pos d"], unit_vectors: Float[Tensor, "d"] | Float[Tensor, "n d"]) -> Tensor:
    """Float32 scores `<h, v>`: `[*pos]` for one `[d]` direction, `[*pos, n]` for `[n, d]` directions."""
    return h.float() @ (unit_vectors if unit_vectors.dim() == 1 else unit_vectors.T)


def ablate(h: Float[Tensor, "*pos d"], unit_direction: Float[Tensor, "d"]) -> Float[Tensor, "*pos d"]:
    """Directional ablation `h - <h, r> r` (float32 maths), leaving the orthogonal part of `h`."""
    hf = h.float()
    return (hf - (hf @ unit_direction)[..., None] * unit_direction).to(h.dtype)


def cap(
    h: Float[Tensor, "*pos d"], unit_direction: Float[Tensor, "d"], threshold: float, mode: str = "floor"
) -> Float[Tensor, "*pos d"]:
    """Clamp the projection on `v`: floor `h + max(0, t - <h,v>) v`, ceiling `h - max(0, <h,v> - t) v`."""
    hf = h.float()
    proj = hf @ unit_direction
    if mode == "floor":
        shift = (threshold - proj).clamp(min=0)
    elif mode == "ceiling":
        shift = -(proj - threshold).clamp(min=0)
    else:
        raise ConfigError(f"unknown capping mode {mode!r}; use 'floor' or 'ceiling'")
    return (hf + shift[..., None] * unit_direction).to(h.dtype)
