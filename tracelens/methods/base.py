"""The contract every extraction method follows, and the input checks they share.

``method.extract(pos_acts [n_pos, d], neg_acts [n_neg, d], **kwargs)`` returns a dict whose ``"vector"`` is a
float32 unit vector ``[d]`` on the inputs' device, oriented so that the mean projection of ``pos_acts`` exceeds
that of ``neg_acts`` (except for the random baseline), plus method-specific extras. Inputs of any float dtype
are upcast to float32 before any arithmetic. Methods never modify their inputs and work under
``torch.no_grad()`` and ``torch.inference_mode()``.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tracelens.model.edits import unit
from tracelens.errors import ConfigError, InputTypeError, ShapeError
from tracelens.math import remove_massive_dims

Acts = Float[Tensor, "_n d"]  # rows may differ between arguments ("_n" is not matched); widths must not


def _check_acts(x: Any, name: str, min_rows: int, method: str) -> Acts:
    """Return ``x`` as a float32 ``[n, d]`` tensor, raising ValueError if it is malformed or non-finite."""
    if not isinstance(x, Tensor):
        raise ShapeError(f"{name} must be a torch.Tensor of shape [n, d]; got {type(x).__name__}.")
    if x.ndim != 2:
        raise ShapeError(f"{name} must be 2-D [n, d]; got shape {tuple(x.shape)}; flatten positions first.")
    if x.shape[0] < min_rows:
        raise ShapeError(
            f"{name} has {x.shape[0]} rows but {method} needs at least {min_rows} per class; collect more examples."
        )
    x = x.detach().to(torch.float32)
    n_bad = int((~torch.isfinite(x)).sum())
    if n_bad:
        raise ConfigError(
            f"{name} has {n_bad} non-finite values (NaN or inf); float16 activations overflow above 65504, "
            "so capture in bfloat16 or float32."
        )
    return x


def _check_pair(pos: Any, neg: Any, names: tuple[str, str], min_rows: int, method: str) -> tuple[Acts, Acts]:
    """Check both classes and that they share a width."""
    pos, neg = _check_acts(pos, names[0], min_rows, method), _check_acts(neg, names[1], min_rows, method)
    if pos.shape[1] != neg.shape[1]:
        raise ShapeError(
            f"{names[0]} has width {pos.shape[1]} but {names[1]} has width {neg.shape[1]}; "
            "both classes must come from the same model and hook point."
        )
    return pos, neg


@dataclass(frozen=True)
class Split:
    """Float32 training activations and an optional validation split, all checked and of one width."""

    pos: Acts
    neg: Acts
    val_pos: Acts | None = None
    val_neg: Acts | None = None


def holdout_split(split: Split, fraction: float, seed: int) -> Split:
    """``split`` itself if it has a validation part, else one made by holding out ``fraction`` of each class.

    Each class keeps at least one training and one validation row; the rows are drawn with ``seed``.
    """
    if split.val_pos is not None:
        return split
    if not 0 < fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1); got {fraction}.")
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for acts in (split.pos, split.neg):
        order = torch.randperm(acts.shape[0], generator=generator).to(acts.device)
        n_val = min(max(1, round(fraction * acts.shape[0])), acts.shape[0] - 1)
        parts.append((acts[order[n_val:]], acts[order[:n_val]]))
    (pos, val_pos), (neg, val_neg) = parts
    return Split(pos, neg, val_pos, val_neg)


class ExtractionMethod(ABC):
    """Base class: ``extract`` checks and upcasts inputs, calls ``_fit`` and finishes the vector.

    Subclasses set ``name``, ``min_rows_per_class`` and ``oriented`` and implement ``_fit(split, **kwargs)``,
    which returns a dict with a (not necessarily unit) ``"vector"`` and its extras.
    """

    name: str
    min_rows_per_class: int = 2
    oriented: bool = True

    def extract(
        self,
        pos_acts: Acts,
        neg_acts: Acts,
        *,
        val_pos_acts: Acts | None = None,
        val_neg_acts: Acts | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Find a direction separating ``pos_acts`` from ``neg_acts``; see the module docstring for the contract.

        ``val_pos_acts``/``val_neg_acts`` (both or neither) are a held-out split; ``rfm`` and ``gradient`` tune on it
        (else they hold out part of the training rows), the other methods check and ignore it. Method hyper-parameters (``seed=``...) are keyword arguments; an unknown one
        raises TypeError listing those the method accepts.
        """
        pos, neg = _check_pair(pos_acts, neg_acts, ("pos_acts", "neg_acts"), self.min_rows_per_class, self.name)
        split = Split(pos, neg, *self._check_val(val_pos_acts, val_neg_acts, pos.shape[1]))
        accepted = [p for p in inspect.signature(self._fit).parameters if p != "split"]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise InputTypeError(f"{self.name} got unexpected keyword arguments {unknown}; it accepts {accepted}.")
        result = self._fit(split, **kwargs)
        result["vector"] = self._finish(result["vector"], split)
        return result

    def _check_val(self, val_pos: Any, val_neg: Any, width: int) -> tuple[Acts | None, Acts | None]:
        if val_pos is None and val_neg is None:
            return None, None
        if val_pos is None or val_neg is None:
            raise ConfigError("pass both val_pos_acts and val_neg_acts, or neither; got only one.")
        val_pos, val_neg = _check_pair(val_pos, val_neg, ("val_pos_acts", "val_neg_acts"), 1, self.name)
        if val_pos.shape[1] != width:
            raise ShapeError(
                f"val_pos_acts has width {val_pos.shape[1]} but pos_acts has width {width}; "
                "the validation split must come from the same model and hook point."
            )
        return val_pos, val_neg

    def _finish(self, vector: Float[Tensor, " d"], split: Split) -> Float[Tensor, " d"]:
        """`edits.unit` of the vector (zero or non-finite: DirectionError), flipped if ``oriented`` so that
        mean(pos @ v) > mean(neg @ v)."""
        vector = unit(vector.to(split.pos.device), f"{self.name} found no direction: its vector",
                      "; the two classes may be identical or differ only by a constant offset per row")
        if self.oriented and (split.pos @ vector).mean() < (split.neg @ vector).mean():
            vector = -vector
        return vector

    @abstractmethod
    def _fit(self, split: Split, **kwargs: Any) -> dict[str, Any]:
        """Return ``{"vector": Tensor[d], **extras}`` from checked float32 activations."""


@dataclass
class PreCleanedMethod:
    """Wrap a method so that it sees activations with ``massive_dims`` zeroed (on copies).

    Massive activations (dims 100-1000x the median, Sun et al. 2024) carry little class signal but dominate
    means and norms; zeroing them first keeps e.g. ``mean_diff`` on the signal. The result gains a
    ``"massive_dims"`` entry. Dims at or beyond the width are ignored, as in :func:`remove_massive_dims`.
    """

    base: ExtractionMethod
    massive_dims: Sequence[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.base.name}[cleaned]"

    def extract(
        self,
        pos_acts: Acts,
        neg_acts: Acts,
        *,
        val_pos_acts: Acts | None = None,
        val_neg_acts: Acts | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Zero the massive dims in every given split, then call ``base.extract`` with the same arguments."""

        def clean(x: Any) -> Any:
            return remove_massive_dims(x, self.massive_dims) if isinstance(x, Tensor) and x.ndim >= 1 else x

        result = self.base.extract(
            clean(pos_acts),
            clean(neg_acts),
            val_pos_acts=clean(val_pos_acts),
            val_neg_acts=clean(val_neg_acts),
            **kwargs,
        )
        return {**result, "massive_dims": list(self.massive_dims)}
