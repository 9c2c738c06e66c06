"""Massive-dimension cleaning of per-token projections, from plain JSON lists (no tensors).

A few residual dimensions carry activations 100-1000x the median (Sun et al. 2024) and add a nearly
constant bias to every projection. A projection file can carry what is needed to remove them afterwards,
under the top-level key ``"massive_dim_data"`` of ``projections/{trait}/{prompt_set}/{id}.json``
(next to ``"metadata"`` and ``"projections"`` of ``ProjectionRecord.to_dict()``)::

    "massive_dim_data": {
        "dims":           {"<layer>": [dim, ...]},      # top dims found at each layer (calibration)
        "top5_3layers":   [dim, ...],                   # dims in the top 5 at 3 or more layers
        "all_candidates": [dim, ...],                   # every candidate dim
        "prompt":   {"<layer>": {"<dim>": [act of that dim at each prompt token]}},
        "response": {"<layer>": {"<dim>": [act of that dim at each response token]}},
        "vector":   {"<layer>": {"<dim>": value of the unit trait vector at that dim}}
    }

Layer and dim keys are JSON strings ("12", "443"); ints are accepted too. Each activation list has one
value per token of its segment, like the entry's ``prompt``/``response`` scores. The "Clean" modes
(``CLEAN_MODES``) pick the dims: ``"none"`` none, ``"top5-3layers"`` the ``top5_3layers`` list, ``"all"``
the ``all_candidates`` list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tracelens.errors import ConfigError, DataError


CLEAN_MODES = {"none": None, "top5-3layers": "top5_3layers", "all": "all_candidates"}


def _lookup(table: Mapping, dim) -> object:
    for key in (dim, str(dim)):
        if key in table:
            return table[key]
    if isinstance(dim, str) and dim.lstrip("-").isdigit() and int(dim) in table:
        return table[int(dim)]
    raise KeyError(dim)


def clean_scores(raw: Sequence[float], acts_by_dim: Mapping, vec_by_dim: Mapping,
                 dims: Sequence[int | str]) -> list[float]:
    """Per-token scores with the contribution of the massive ``dims`` removed.

    ``cleaned[t] = raw[t] - sum over d in dims of acts_by_dim[d][t] * vec_by_dim[d]``: the projection of the
    activation with those dims zeroed. The vector is unit norm, so no division by ``||v||`` is needed.

    Args:
        raw: the raw projections of one segment (prompt or response), one per token.
        acts_by_dim: ``{dim: [activation of dim at each token]}``, each list as long as ``raw``
            (``massive_dim_data[segment][layer]``).
        vec_by_dim: ``{dim: value of the unit vector at dim}`` (``massive_dim_data["vector"][layer]``).
        dims: the dims to remove; empty returns a copy of ``raw``. Keys may be ints or their strings.

    Raises ValueError when a dim has no activations or no vector value, or its activations are not one per token.

    Example::

        >>> clean_scores([1.0, 2.0], {"7": [2.0, 4.0]}, {"7": 0.5}, [7])
        [0.0, 0.0]
    """
    out = [float(x) for x in raw]
    for dim in dims:
        try:
            acts, v = _lookup(acts_by_dim, dim), _lookup(vec_by_dim, dim)
        except KeyError:
            raise DataError(
                f"massive dim {dim} has no activations or no vector value in massive_dim_data "
                f"(activations for {sorted(map(str, acts_by_dim))}, vector values for {sorted(map(str, vec_by_dim))}); "
                "re-run inference so the projection file records every candidate dim"
            ) from None
        if len(acts) != len(out):
            raise DataError(f"massive dim {dim} has {len(acts)} activations for {len(out)} tokens; "
                             "they must be one per token of the segment")
        out = [s - float(a) * float(v) for s, a in zip(out, acts)]
    return out


def dims_for_mode(massive_dim_data: Mapping | None, mode: str) -> list:
    """The dims that Clean mode ``mode`` removes (see ``CLEAN_MODES``); ValueError for an unknown mode or
    when the file has no ``massive_dim_data`` for a mode other than ``"none"``."""
    if mode not in CLEAN_MODES:
        raise ConfigError(f"clean mode must be one of {list(CLEAN_MODES)}; got {mode!r}")
    key = CLEAN_MODES[mode]
    if key is None:
        return []
    if not massive_dim_data or key not in massive_dim_data:
        raise DataError(f"this projection file has no massive_dim_data[{key!r}]; choose clean mode 'none' "
                         "or re-run inference with massive-dim calibration")
    return list(massive_dim_data[key])
