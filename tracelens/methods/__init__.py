"""Extraction methods: find a direction separating positive from negative activations.

``get_method(name).extract(pos_acts, neg_acts, **kwargs)`` for ``mean_diff``, ``probe``, ``gradient`` (the
seed's Adam ascent), ``fisher`` (spread-aware separation by L-BFGS), ``random_baseline`` and ``rfm``; see :mod:`tracelens.methods.base` for the contract they share.
"""

from __future__ import annotations

from tracelens.errors import ConfigError
from tracelens.methods.base import ExtractionMethod, PreCleanedMethod
from tracelens.methods.fisher import Fisher
from tracelens.methods.gradient import Gradient
from tracelens.methods.mean_diff import MeanDiff
from tracelens.methods.probe import Probe
from tracelens.methods.random_baseline import RandomBaseline
from tracelens.methods.rfm import RFM

METHODS: dict[str, type[ExtractionMethod]] = {
    cls.name: cls for cls in (MeanDiff, Probe, Gradient, Fisher, RandomBaseline, RFM)
}
"""Every method by its ``get_method`` name."""


def get_method(name: str) -> ExtractionMethod:
    """A fresh instance of the method called ``name``; raises ValueError listing the names if unknown."""
    if name not in METHODS:
        raise ConfigError(f"unknown extraction method {name!r}; available methods: {', '.join(METHODS)}.")
    return METHODS[name]()


__all__ = [
    "METHODS",
    "RFM",
    "ExtractionMethod",
    "Fisher",
    "Gradient",
    "MeanDiff",
    "PreCleanedMethod",
    "Probe",
    "RandomBaseline",
    "get_method",
]
