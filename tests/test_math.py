"""Hand-computed oracles for tracelens.math; each expected value is worked out in the comment beside it."""

import pytest
import torch

from tracelens.math import (
    batch_cosine_similarity,
    compute_top_pcs_by_variance,
    cosine_similarity,
    denoise_with_pcs,
    grand_mean_center,
    normalize_projections,
    orthogonalize,
    pairwise_cosine_matrix,
    pca,
    pca_norm_correlation,
    project_out_subspace,
    projection,
    remove_massive_dims,
    representational_similarity,
    trait_clusters,
    vector_set_comparison,
)

R2 = 2**-0.5  # 1/sqrt(2) = 0.70710678...


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---- projection and cosines ----------------------------------------------------------------------------------


def test_projection_normalizes_only_the_vector():
    # v = [0, 2] -> v_hat = [0, 1]; [3, 4].v_hat = 4, [1, 0].v_hat = 0
    assert torch.allclose(projection(t([3, 4], [1, 0]), t(0, 2)), t(4, 0))
    # without normalising: [3, 4].[0, 2] = 8
    assert torch.allclose(projection(t([3, 4], [1, 0]), t(0, 2), normalize_vector=False), t(8, 0))


def test_projection_keeps_leading_dims_and_returns_float32_for_bf16():
    acts = t([3, 4], [1, 0]).to(torch.bfloat16).reshape(1, 2, 2)
    out = projection(acts, t(0, 2).to(torch.bfloat16))
    assert out.dtype == torch.float32 and out.shape == (1, 2)
    assert torch.allclose(out, t([4, 0]))


def test_projection_on_zero_vector_is_zero_not_nan():
    assert torch.equal(projection(t([3, 4]), t(0, 0)), t(0))


@pytest.mark.parametrize(
    "call",
    [
        lambda: projection(torch.ones(2, 3), torch.ones(4)),
        lambda: batch_cosine_similarity(torch.ones(2, 3), torch.ones(4)),
        lambda: cosine_similarity(torch.ones(3), torch.ones(4)),
        lambda: orthogonalize(torch.ones(3), torch.ones(4)),
        lambda: project_out_subspace(torch.ones(3), torch.ones(1, 4)),
    ],
)
@pytest.mark.unchecked_types
def test_width_mismatch_names_the_likely_cause(call):
    with pytest.raises(ValueError, match=r"width 3 but the vector has width 4; the vector is probably from another model"):
        call()


def test_batch_cosine_similarity():
    # [3,4]/5 . [1,0] = 0.6; a zero row gives 0; [-1,0] . [1,0] = -1
    out = batch_cosine_similarity(t([3, 4], [0, 0], [-1, 0]), t(5, 0))
    assert torch.allclose(out, t(0.6, 0, -1))


def test_cosine_similarity():
    # [1,1].[1,0] / (sqrt2 * 1) = 1/sqrt2; a zero vector gives 0
    assert cosine_similarity(t(1, 1), t(1, 0)).item() == pytest.approx(R2, abs=1e-6)
    assert cosine_similarity(t(0, 0), t(1, 0)).item() == 0.0
    assert cosine_similarity(t(1, 1).half(), t(1, 0).half()).dtype == torch.float32


def test_orthogonalize():
    # v = [2,3], o = [1,1]: v.o = 5, |o|^2 = 2 -> v - 2.5*o = [-0.5, 0.5]
    assert torch.allclose(orthogonalize(t(2, 3), t(1, 1)), t(-0.5, 0.5))
    # |o|^2 = 1e-12 < 1e-10: nothing to remove
    assert torch.equal(orthogonalize(t(2, 3), t(1e-6, 0)), t(2, 3))


# ---- multi-vector operations ----------------------------------------------------------------------------------


def test_pairwise_cosine_matrix():
    # rows [1,0], [1,1], [0,0]: cos(r0,r1) = 1/sqrt2; the zero row has cosine 0 with everything
    expected = t([1, R2, 0], [R2, 1, 0], [0, 0, 0])
    assert torch.allclose(pairwise_cosine_matrix(t([1, 0], [1, 1], [0, 0])), expected, atol=1e-6)


def test_pca_hand_computed():
    # rows [1,0],[3,0],[2,1]; mean [2, 1/3]; centred [-1,-1/3],[1,-1/3],[0,2/3]
    # var_x = (1+1+0)/2 = 1, var_y = (1/9+1/9+4/9)/2 = 1/3, cov_xy = (1/3 - 1/3 + 0)/2 = 0
    # -> components e_x, e_y; ratios 1/(4/3) = 0.75 and 0.25; projections = centred rows
    components, ratio, proj = pca(t([1, 0], [3, 0], [2, 1]), n_components=5)
    assert torch.allclose(components, t([1, 0], [0, 1]), atol=1e-6)
    assert torch.allclose(ratio, t(0.75, 0.25))
    assert torch.allclose(proj, t([-1, -1 / 3], [1, -1 / 3], [0, 2 / 3]), atol=1e-6)


def test_pca_sign_is_fixed_by_the_largest_entry():
    # the data lie along [-1, -2]; the component is reported as +[1, 2]/sqrt5
    components, _, _ = pca(t([-1, -2], [1, 2], [0, 0]), n_components=1)
    assert torch.allclose(components[0], t(1, 2) / 5**0.5, atol=1e-6)


def test_pca_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2 rows; got shape \\(1, 2\\)"):
        pca(t([1, 2]))


def test_project_out_subspace_orthonormalises_the_basis():
    # basis [1,0,0], [1,1,0] spans the xy-plane: [1,2,3] -> [0,0,3]; works on 1-D and 2-D input
    basis = t([1, 0, 0], [1, 1, 0])
    assert torch.allclose(project_out_subspace(t([1, 2, 3]), basis), t([0, 0, 3]), atol=1e-6)
    assert torch.allclose(project_out_subspace(t(1, 2, 3), basis), t(0, 0, 3), atol=1e-6)


def test_project_out_subspace_with_dependent_or_empty_basis():
    # [1,0,0] and [2,0,0] span only x: [1,2,3] -> [0,2,3] (QR would invent a second direction here)
    assert torch.allclose(project_out_subspace(t(1, 2, 3), t([1, 0, 0], [2, 0, 0])), t(0, 2, 3), atol=1e-6)
    assert torch.equal(project_out_subspace(t(1, 2, 3), torch.zeros(0, 3)), t(1, 2, 3))


def test_grand_mean_center():
    # mean of [2,0] and [0,2] is [1,1]; keys come back sorted
    centered, grand_mean = grand_mean_center({"b": t(2, 0), "a": t(0, 2)})
    assert list(centered) == ["a", "b"]
    assert torch.equal(grand_mean, t(1, 1))
    assert torch.equal(centered["a"], t(-1, 1)) and torch.equal(centered["b"], t(1, -1))
    with pytest.raises(ValueError, match="empty"):
        grand_mean_center({})


def test_compute_top_pcs_by_variance():
    acts = t([1, 0], [3, 0], [2, 1])  # ratios 0.75, 0.25 (see test_pca_hand_computed)
    # threshold 0.5: no cumulative ratio below it -> k = 0 + 1
    basis, ratios, k = compute_top_pcs_by_variance(acts, variance_threshold=0.5)
    assert k == 1 and torch.allclose(basis, t([1, 0]), atol=1e-6) and torch.allclose(ratios, t(0.75))
    # threshold 0.8: cumulative [0.75, 1.0], one below -> k = 2; max_components=1 caps it
    assert compute_top_pcs_by_variance(acts, variance_threshold=0.8)[2] == 2
    assert compute_top_pcs_by_variance(acts, variance_threshold=0.8, max_components=1)[2] == 1


def test_denoise_with_pcs():
    denoised = denoise_with_pcs({"a": t(1, 2), "b": t(3, 4)}, t([1, 0]))
    assert torch.allclose(denoised["a"], t(0, 2)) and torch.allclose(denoised["b"], t(0, 4))


def test_trait_clusters():
    # two pairs 10 apart: centroids [0, 0.5] and [10, 0.5]; inertia = 4 points * 0.5^2 = 1
    labels, centroids, inertia = trait_clusters(t([0, 0], [0, 1], [10, 0], [10, 1]), k=2)
    assert labels[0] == labels[1] != labels[2] == labels[3]
    assert sorted(centroids.tolist()) == [[0.0, 0.5], [10.0, 0.5]]
    assert inertia == pytest.approx(1.0)
    with pytest.raises(ValueError, match="between 1 and the number of vectors \\(4\\); got 5"):
        trait_clusters(torch.zeros(4, 2), k=5)


def test_representational_similarity_hand_computed():
    # layer 0: e1, e2, e1+e2 -> upper-triangle cosines [0, 1/sqrt2, 1/sqrt2]
    # layer 1: e1, e2, e1    -> [0, 1, 0]
    # spearman: ranks [1, 2.5, 2.5] and [1.5, 3, 1.5], centred [-1, .5, .5] and [-.5, 1, -.5]
    #   r = (0.5 + 0.5 - 0.25) / (sqrt1.5 * sqrt1.5) = 0.5
    # cosine: [0, .707, .707] . [0, 1, 0] = 0.707 (both have norm 1)
    layers = {3: t([1, 0], [0, 1], [1, 1]), 1: t([1, 0], [0, 1], [1, 0])}
    rsa, order = representational_similarity(layers)
    assert order == [1, 3]
    assert torch.allclose(rsa, t([1, 0.5], [0.5, 1]), atol=1e-6)
    rsa_cos, _ = representational_similarity(layers, method="cosine")
    assert torch.allclose(rsa_cos, t([1, R2], [R2, 1]), atol=1e-6)


def test_representational_similarity_rejects_bad_input():
    with pytest.raises(ValueError, match="same n >= 3"):
        representational_similarity({0: torch.ones(3, 2), 1: torch.ones(4, 2)})
    with pytest.raises(ValueError, match="'spearman' or 'cosine'; got 'pearson'"):
        representational_similarity({0: torch.ones(3, 2)}, method="pearson")


def test_pca_norm_correlation():
    # pc1 [1,2,3] vs valence [1,2,3]: r = 1; pc2 [0,1,0] vs arousal [0,1,0]: r = 1
    # pc1 vs arousal: centred [-1,0,1] . [-1/3, 2/3, -1/3] = 0 -> r = 0; likewise pc2 vs valence
    norms = {"x": (1.0, 0.0), "y": (2.0, 1.0), "z": (3.0, 0.0), "unused": (9.0, 9.0)}
    out = pca_norm_correlation(t([1, 0], [2, 1], [3, 0], [7, 7]), ["x", "y", "z", "unknown"], norms, min_overlap=3)
    assert out["n_overlapping"] == 3 and out["emotions"] == ["x", "y", "z"]
    assert out["pc1_vs_valence"] == pytest.approx(1) and out["pc2_vs_arousal"] == pytest.approx(1)
    assert out["pc1_vs_arousal"] == pytest.approx(0, abs=1e-6) and out["pc2_vs_valence"] == pytest.approx(0, abs=1e-6)
    assert pca_norm_correlation(t([1, 0], [2, 1], [3, 0]), ["x", "y", "z"], norms, min_overlap=4) is None


def test_vector_set_comparison_hand_computed():
    a = {"x": t(1, 0, 0), "y": t(1, 1, 0)}
    b = {"x": t(1, 0, 0), "y": t(0, 0, 1), "only_b": t(0, 1, 0)}
    out = vector_set_comparison(a, b, {"x": t(0, 0, 1)})
    assert out["n_common"] == 2
    # same key: cos(a.x, b.x) = 1, cos(a.y, b.y) = 0; mean 0.5
    assert out["same_key_cosine"] == pytest.approx({"x": 1.0, "y": 0.0})
    assert out["mean_same_key_cosine"] == pytest.approx(0.5)
    # cross: cos(a.y, b.x) = 1/sqrt2
    assert out["cross_key_cosine"]["y"]["x"] == pytest.approx(R2)
    # span(b.x, b.y) = {e1, e3}: a.x loses everything; a.y -> [0,1,0], keeps 1/sqrt2 of its norm
    assert out["retained_norm"] == pytest.approx({"x": 0.0, "y": R2}, abs=1e-6)
    assert out["mean_retained_norm"] == pytest.approx(R2 / 2, abs=1e-6)
    assert out["third_set_cosine"]["x"] == pytest.approx({"x": 0.0, "y": 1.0})
    assert "error" in vector_set_comparison({"p": t(1, 0)}, {"q": t(1, 0)})


# ---- massive dims and projection normalisation ----------------------------------------------------------------


def test_remove_massive_dims_clones_by_default():
    acts = t([1, 2, 3], [4, 5, 6])
    out = remove_massive_dims(acts, [1, 7])  # dim 7 >= width 3 is ignored
    assert torch.equal(out, t([1, 0, 3], [4, 0, 6]))
    assert torch.equal(acts, t([1, 2, 3], [4, 5, 6]))


def test_remove_massive_dims_in_place_empty_and_dtype():
    acts = t(1, 2, 3).to(torch.bfloat16)
    assert remove_massive_dims(acts, []) is acts
    out = remove_massive_dims(acts, [0], clone=False)
    assert out is acts and out.dtype == torch.bfloat16 and acts[0].item() == 0
    with pytest.raises(ValueError, match="non-negative indices; got \\[-1\\]"):
        remove_massive_dims(acts, [-1])


def test_normalize_projections():
    raw, norms = [2.0, 4.0], [1.0, 3.0]
    # normalized: mean norm 2 -> [1, 2]; cosine: [2/1, 4/3]; raw: unchanged
    assert torch.allclose(normalize_projections(raw, norms), t(1, 2))
    assert torch.allclose(normalize_projections(raw, norms, mode="cosine"), t(2, 4 / 3))
    assert torch.equal(normalize_projections(raw, norms, mode="raw"), t(2, 4))
    # a zero-norm token gives 0, not inf
    assert torch.equal(normalize_projections(raw, [0.0, 2.0], mode="cosine"), t(0, 2))
    assert torch.equal(normalize_projections(raw, [0.0, 0.0]), t(0, 0))
    with pytest.raises(ValueError, match="'normalized', 'cosine' or 'raw'; got 'z'"):
        normalize_projections(raw, norms, mode="z")
