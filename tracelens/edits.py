"""Activation edits as pure functions: what each hook adapter does to one activation tensor.

Shapes: `h` is `[*batch_pos, d]` (any leading dims); directions are `[d]`. Scores and projections
are computed in float32; edited activations come back in `h`'s dtype.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

_MIN_NORM = 1e-8


def as_vector(vector: Tensor, what: str = "vector") -> Float[Tensor, "d"]:
    """`vector` as a float32 1-D tensor; anything else is a ValueError naming its shape."""
    if not isinstance(vector, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(vector).__name__}")
    if vector.dim() != 1:
        raise ValueError(f"{what} must be 1-D [d_model], got shape {tuple(vector.shape)}")
    if not torch.isfinite(vector).all():
        raise ValueError(f"{what} contains NaN or inf")
    return vector.detach().float()


def unit(vector: Tensor, what: str = "direction") -> Float[Tensor, "d"]:
    """The float32 unit vector along `vector`; a zero or near-zero (norm < 1e-8) vector is an error."""
    v = as_vector(vector, what)
    norm = v.norm()
    if norm < _MIN_NORM:
        raise ValueError(f"{what} has norm {norm.item():.3g}, too small to define a direction (need >= 1e-8)")
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
        raise ValueError(f"unknown capping mode {mode!r}; use 'floor' or 'ceiling'")
    return (hf + shift[..., None] * unit_direction).to(h.dtype)
