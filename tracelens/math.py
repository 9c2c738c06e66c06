"""Model-free vector math for trait directions.

Every function takes tensors of any float dtype (float16/bfloat16 included) and returns float32 results.
These are measurements, and keep the seed's +1e-8 guard: a zero vector or row measures 0 rather than NaN.
(A direction that tracelens steers, ablates, caps or returns from a method goes through `edits.unit`, which
raises DirectionError on a zero or non-finite vector.) Shape names:
``d`` is the model width, ``n`` a number of vectors or samples, ``k`` a number of basis directions.

The separation metrics of :mod:`tracelens.metrics` are importable from here too, as from the seed's ``core.math``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tracelens.errors import ConfigError, ShapeError
from tracelens.metrics import accuracy, auroc, effect_size, pearson_correlation, polarity_correct  # noqa: F401

EPS = 1e-8
"""Added to norms before dividing, so a zero vector maps to zero instead of NaN."""


def _check_width(width: int, vector_width: int, what: str) -> None:
    """Raise if an activation-like tensor and a direction have different model widths."""
    if width != vector_width:
        raise ShapeError(
            f"{what} has width {width} but the vector has width {vector_width}; "
            "the vector is probably from another model (check the model it was extracted from)."
        )


def _unit(x: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch d"]:
    """Row-wise ``x / (||x|| + 1e-8)`` in float32; zero rows stay zero."""
    x = x.float()
    return x / (x.norm(dim=-1, keepdim=True) + EPS)


def projection(
    activations: Float[Tensor, "*batch d"],
    vector: Float[Tensor, " d"],
    normalize_vector: bool = True,
) -> Float[Tensor, "*batch"]:
    """Scalar projection of each activation onto ``vector`` (``acts @ v / ||v||``), in activation units.

    Only the vector is normalised. A zero vector gives zeros. Raises ValueError on a width mismatch.
    """
    _check_width(activations.shape[-1], vector.shape[-1], "activations")
    v = _unit(vector) if normalize_vector else vector.float()
    return activations.float() @ v


def batch_cosine_similarity(
    activations: Float[Tensor, "*batch d"], vector: Float[Tensor, " d"]
) -> Float[Tensor, "*batch"]:
    """Cosine of each activation with ``vector``, in [-1, 1]; zero rows or a zero vector give 0."""
    _check_width(activations.shape[-1], vector.shape[-1], "activations")
    return _unit(activations) @ _unit(vector)


def cosine_similarity(a: Float[Tensor, " d"], b: Float[Tensor, " d"]) -> Float[Tensor, ""]:
    """Cosine of two vectors as a 0-d float32 tensor; 0 if either is zero."""
    _check_width(a.shape[-1], b.shape[-1], "the first vector")
    return (_unit(a) * _unit(b)).sum()


def orthogonalize(v: Float[Tensor, " d"], onto: Float[Tensor, " d"]) -> Float[Tensor, " d"]:
    """``v - (v.o / ||o||^2) o``: remove ``onto``'s component from ``v``.

    If ``||onto||^2 < 1e-10`` there is no direction to remove and ``v`` is returned (as float32).
    """
    _check_width(v.shape[-1], onto.shape[-1], "v")
    v, onto = v.float(), onto.float()
    norm_sq = onto @ onto
    if norm_sq < 1e-10:
        return v.clone()
    return v - (v @ onto) / norm_sq * onto


def pairwise_cosine_matrix(vectors: Float[Tensor, "n d"]) -> Float[Tensor, "n n"]:
    """``[n, n]`` cosine matrix of the rows; a zero row has cosine 0 with everything (itself included)."""
    unit = _unit(vectors)
    return unit @ unit.T


def _svd_flip(vt: Float[Tensor, "k d"]) -> Float[Tensor, "k d"]:
    """Fix SVD's arbitrary signs: each row's largest-magnitude entry becomes positive."""
    idx = vt.abs().argmax(dim=1)
    signs = torch.sign(vt[torch.arange(vt.shape[0]), idx])
    signs[signs == 0] = 1
    return vt * signs[:, None]


def pca(
    vectors: Float[Tensor, "n d"], n_components: int = 10
) -> tuple[Float[Tensor, "k d"], Float[Tensor, " k"], Float[Tensor, "n k"]]:
    """PCA by SVD of the mean-centred rows.

    Returns ``(components [k, d], explained variance ratio [k], projections of the centred rows [n, k])`` with
    ``k = min(n_components, n, d)``. Variances are ``S^2 / (n - 1)``; each component's largest entry is made
    positive so the signs are reproducible. All-identical rows give a ratio of 0. Raises ValueError if n < 2.
    """
    if vectors.ndim != 2 or vectors.shape[0] < 2:
        raise ShapeError(f"pca needs a 2-D tensor with at least 2 rows; got shape {tuple(vectors.shape)}.")
    centered = vectors.float() - vectors.float().mean(dim=0)
    _, s, vt = torch.linalg.svd(centered, full_matrices=False)
    k = min(n_components, s.shape[0])
    variance = s**2 / (vectors.shape[0] - 1)
    ratio = variance / variance.sum() if variance.sum() > 0 else torch.zeros_like(variance)
    components = _svd_flip(vt[:k])
    return components, ratio[:k], centered @ components.T


def project_out_subspace(
    vectors: Float[Tensor, "*n d"], basis: Float[Tensor, "k d"]
) -> Float[Tensor, "*n d"]:
    """Remove the span of ``basis``'s rows from each vector (1-D or 2-D input, same shape out).

    The basis need not be orthonormal or independent: it is orthonormalised by SVD, dropping directions with
    singular value below 1e-6 of the largest. An empty or all-zero basis leaves the vectors unchanged.
    """
    _check_width(vectors.shape[-1], basis.shape[-1], "vectors")
    vectors = vectors.float()
    if basis.shape[0] == 0:
        return vectors.clone()
    _, s, vt = torch.linalg.svd(basis.float(), full_matrices=False)
    q = vt[s > 1e-6 * s.max()] if s.max() > 0 else vt[:0]
    return vectors - (vectors @ q.T) @ q


def grand_mean_center(
    vectors: Mapping[str, Float[Tensor, " d"]],
) -> tuple[dict[str, Float[Tensor, " d"]], Float[Tensor, " d"]]:
    """Subtract the mean of all vectors from each: ``({name: v - mean}, mean)``, keys in sorted order.

    Removes what every trait direction shares (Sofroniew et al. 2026, §1.1.4). Raises ValueError if empty.
    """
    if not vectors:
        raise ConfigError("grand_mean_center needs at least one vector; got an empty mapping.")
    names = sorted(vectors)
    grand_mean = torch.stack([vectors[name].float() for name in names]).mean(dim=0)
    return {name: vectors[name].float() - grand_mean for name in names}, grand_mean


def compute_top_pcs_by_variance(
    activations: Float[Tensor, "n d"], variance_threshold: float = 0.5, max_components: int = 50
) -> tuple[Float[Tensor, "k d"], Float[Tensor, " k"], int]:
    """Smallest set of top PCs whose cumulative explained variance reaches ``variance_threshold``.

    ``k = #(cumulative ratio < threshold) + 1``, capped at ``max_components`` and the number of PCs.
    Returns ``(basis [k, d], variance ratios [k], k)``. Used on neutral activations to find shared noise.
    """
    if not 0 < variance_threshold <= 1:
        raise ConfigError(f"variance_threshold must be in (0, 1]; got {variance_threshold}.")
    components, ratio, _ = pca(activations, n_components=min(activations.shape))
    k = int((ratio.cumsum(0) < variance_threshold).sum()) + 1
    k = min(k, max_components, components.shape[0])
    return components[:k], ratio[:k], k


def denoise_with_pcs(
    vectors: Mapping[str, Float[Tensor, " d"]], basis: Float[Tensor, "k d"]
) -> dict[str, Float[Tensor, " d"]]:
    """Apply :func:`project_out_subspace` with ``basis`` to every named vector."""
    return {name: project_out_subspace(v, basis) for name, v in vectors.items()}


def trait_clusters(
    vectors: Float[Tensor, "n d"], k: int = 10, n_init: int = 20, random_state: int = 42
) -> tuple[Int[Tensor, " n"], Float[Tensor, "k d"], float]:
    """K-means on the vectors (scikit-learn): ``(labels [n], centroids [k, d], inertia)``; deterministic.

    Raises ValueError if ``k`` is not between 1 and the number of vectors.
    """
    from sklearn.cluster import KMeans

    if not 1 <= k <= vectors.shape[0]:
        raise ConfigError(f"k must be between 1 and the number of vectors ({vectors.shape[0]}); got {k}.")
    km = KMeans(n_clusters=k, n_init=n_init, random_state=random_state)
    km.fit(vectors.float().cpu().numpy())
    return torch.from_numpy(km.labels_).long(), torch.from_numpy(km.cluster_centers_).float(), float(km.inertia_)


def representational_similarity(
    vectors_by_layer: Mapping[int, Float[Tensor, "n d"]], method: str = "spearman"
) -> tuple[Float[Tensor, "l l"], list[int]]:
    """Compare layers by how they arrange the same n vectors (RSA, Kriegeskorte 2008).

    For each layer, the upper triangle (above the diagonal) of its cosine matrix is one vector; entry
    ``[i, j]`` compares layers i and j by Spearman correlation (``method="spearman"``) or by cosine
    (``"cosine"``). Layers come back sorted. Needs n >= 3 so the triangles have at least 3 entries; a layer
    whose cosines are all equal correlates 0 with every layer, itself included.
    """
    if method not in ("spearman", "cosine"):
        raise ConfigError(f"method must be 'spearman' or 'cosine'; got {method!r}.")
    layers = sorted(vectors_by_layer)
    sizes = {layer: vectors_by_layer[layer].shape[0] for layer in layers}
    if len(set(sizes.values())) != 1 or next(iter(sizes.values()), 0) < 3:
        raise ShapeError(f"every layer needs the same n >= 3 vectors; got n per layer {sizes}.")
    n = next(iter(sizes.values()))
    rows, cols = torch.triu_indices(n, n, offset=1)
    triangles = torch.stack([pairwise_cosine_matrix(vectors_by_layer[layer])[rows, cols] for layer in layers])
    if method == "spearman":
        from scipy.stats import rankdata

        triangles = torch.from_numpy(rankdata(triangles.numpy(), axis=1)).float()
        triangles = triangles - triangles.mean(dim=1, keepdim=True)
    return pairwise_cosine_matrix(triangles), layers


def pca_norm_correlation(
    projections: Float[Tensor, "n c"],
    names: Sequence[str],
    norms: Mapping[str, tuple[float, float]],
    min_overlap: int = 10,
) -> dict | None:
    """Pearson correlations of PC1/PC2 scores with human (valence, arousal) norms (Sofroniew et al. 2026).

    ``projections[i]`` belongs to ``names[i]``; only names present in ``norms`` are used. Returns
    ``{n_overlapping, emotions, pc1_vs_valence, pc2_vs_arousal, pc1_vs_arousal, pc2_vs_valence}``, or None if
    fewer than ``min_overlap`` names overlap.
    """
    from tracelens.metrics import pearson_correlation

    if projections.ndim != 2 or projections.shape[1] < 2 or projections.shape[0] != len(names):
        raise ShapeError(
            f"projections must be [len(names)={len(names)}, >=2]; got shape {tuple(projections.shape)}."
        )
    keep = [i for i, name in enumerate(names) if name in norms]
    if len(keep) < min_overlap:
        return None
    emotions = [names[i] for i in keep]
    valence = torch.tensor([norms[name][0] for name in emotions], dtype=torch.float32)
    arousal = torch.tensor([norms[name][1] for name in emotions], dtype=torch.float32)
    pc1, pc2 = projections[keep, 0].float(), projections[keep, 1].float()
    return {
        "n_overlapping": len(keep),
        "emotions": emotions,
        "pc1_vs_valence": pearson_correlation(pc1, valence),
        "pc2_vs_arousal": pearson_correlation(pc2, arousal),
        "pc1_vs_arousal": pearson_correlation(pc1, arousal),
        "pc2_vs_valence": pearson_correlation(pc2, valence),
    }


def _cross_cosines(
    rows: Mapping[str, Float[Tensor, " d"]], cols: Mapping[str, Float[Tensor, " d"]], names: list[str]
) -> dict[str, dict[str, float]]:
    """``{row_name: {col_name: cosine}}`` over ``names`` (rows missing a name are skipped)."""
    return {
        r: {c: float(cosine_similarity(rows[r], cols[c])) for c in names} for r in names if r in rows
    }


def vector_set_comparison(
    vectors_a: Mapping[str, Float[Tensor, " d"]],
    vectors_b: Mapping[str, Float[Tensor, " d"]],
    vectors_c: Mapping[str, Float[Tensor, " d"]] | None = None,
) -> dict:
    """Compare two named sets of directions over their shared names (sorted).

    Returns ``same_key_cosine`` {name: cos(a, b)}, ``mean_same_key_cosine``, ``cross_key_cosine``
    {a_name: {b_name: cos}}, ``retained_norm`` {name: ||a without span(b)|| / ||a||} (0 for a zero a) and its
    mean, ``third_set_cosine`` {c_name: {b_name: cos}} when ``vectors_c`` is given (else None) and ``n_common``.
    With no shared names it returns ``{"error": ...}``.
    """
    common = sorted(set(vectors_a) & set(vectors_b))
    if not common:
        return {"error": f"no common keys: a has {sorted(vectors_a)}, b has {sorted(vectors_b)}"}
    same = {name: float(cosine_similarity(vectors_a[name], vectors_b[name])) for name in common}
    span_b = torch.stack([vectors_b[name].float() for name in common])
    retained = {}
    for name in common:
        a = vectors_a[name].float()
        norm = float(a.norm())
        retained[name] = float(project_out_subspace(a, span_b).norm()) / norm if norm > EPS else 0.0
    return {
        "same_key_cosine": same,
        "mean_same_key_cosine": float(np.mean(list(same.values()))),
        "cross_key_cosine": _cross_cosines(vectors_a, vectors_b, common),
        "retained_norm": retained,
        "mean_retained_norm": float(np.mean(list(retained.values()))),
        "third_set_cosine": _cross_cosines(vectors_c, vectors_b, common) if vectors_c else None,
        "n_common": len(common),
    }


def remove_massive_dims(
    activations: Float[Tensor, "*batch d"], dims: Sequence[int], clone: bool = True
) -> Float[Tensor, "*batch d"]:
    """Zero ``activations[..., dim]`` for each dim (massive activations, Sun et al. 2024).

    Dims ``>= d`` are ignored (a calibration list may cover a wider model); an empty list returns the input
    itself. With ``clone=False`` the input is edited in place. Keeps the input dtype. Negative dims raise
    ValueError (they would silently index from the end).
    """
    if any(dim < 0 for dim in dims):
        raise ConfigError(f"massive dims must be non-negative indices; got {list(dims)}.")
    if not dims:
        return activations
    out = activations.clone() if clone else activations
    out[..., [dim for dim in dims if dim < activations.shape[-1]]] = 0
    return out


def normalize_projections(
    raw: Float[Tensor, " t"] | Sequence[float], token_norms: Float[Tensor, " t"] | Sequence[float],
    mode: str = "normalized",
) -> Float[Tensor, " t"]:
    """Rescale per-token projections: ``normalized`` divides by the mean token norm (layer-scale adjusted),
    ``cosine`` by each token's own norm (a cosine), ``raw`` returns them unchanged. A zero norm gives 0.
    """
    raw = torch.as_tensor(raw, dtype=torch.float32)
    norms = torch.as_tensor(token_norms, dtype=torch.float32)
    if mode == "raw":
        return raw
    if raw.shape != norms.shape:
        raise ShapeError(f"raw has shape {tuple(raw.shape)} but token_norms has {tuple(norms.shape)}.")
    if mode == "cosine":
        return torch.where(norms > 0, raw / norms.clamp_min(EPS), 0.0)
    if mode == "normalized":
        mean_norm = norms.mean() if norms.numel() else torch.tensor(0.0)
        return raw / mean_norm if mean_norm > 0 else torch.zeros_like(raw)
    raise ConfigError(f"mode must be 'normalized', 'cosine' or 'raw'; got {mode!r}.")
