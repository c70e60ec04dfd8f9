"""Known-answer tests for rankscope.analysis.landscape."""

from __future__ import annotations

import pytest
import torch
from sklearn.decomposition import PCA

from rankscope.analysis import AnalysisError
from rankscope.analysis import landscape as LS

SHAPES = {"layer.weight": (4, 3), "layer.bias": (4,), "head.weight": (2, 4)}


def flatten(direction: dict[str, torch.Tensor], names=tuple(SHAPES)) -> torch.Tensor:
    return torch.cat([direction[name].reshape(-1).double() for name in names])


# --- grids ------------------------------------------------------------------------------------


def test_make_grid_is_symmetric_and_contains_zero():
    grid = LS.make_grid(25, 0.003)
    assert grid.shape == (25,) and grid[12].item() == 0.0
    assert torch.equal(grid, -grid.flip(0))
    assert grid[0].item() == pytest.approx(-0.003) and grid[-1].item() == pytest.approx(0.003)
    assert LS.grid_center(grid) == 12
    with pytest.raises(ValueError):
        LS.make_grid(24, 0.003)
    with pytest.raises(ValueError):
        LS.make_grid(25, 0.0)


@pytest.mark.parametrize(
    "bad_grid",
    [
        torch.linspace(-1, 1, 24),  # no 0, even length
        torch.tensor([-1.0, -0.2, 0.3, 1.0, 2.0]),  # odd but 0 missing
        torch.tensor([-1.0, 0.0, 2.0]),  # contains 0, not symmetric
        torch.tensor([1.0, 0.0, -1.0]),  # not increasing
    ],
)
def test_expected_sharpness_rejects_grids_without_zero_or_symmetry(bad_grid):
    with pytest.raises(ValueError):
        LS.expected_sharpness(torch.zeros(len(bad_grid)), bad_grid)


def test_arange_grid_is_numpy_arange_bit_for_bit_and_the_study_grid_has_no_zero():
    import numpy as np

    for start, stop, step in (LS.STUDY_SINGULAR_GRID, (-0.003, 0.0031, 0.00025), (-0.25, 0.251, 0.02)):
        ours = LS.arange_grid(start, stop, step).numpy()
        assert np.array_equal(ours, np.arange(start, stop, step)), (start, stop, step)
    study = LS.arange_grid(*LS.STUDY_SINGULAR_GRID)
    assert study.numel() == 26 and not (study == 0).any()
    assert LS.middle_index(26) == 13 and study[13].item() == pytest.approx(0.002)
    assert (study[1:] - study[:-1]).sub(0.004).abs().max() < 1e-15  # spacing 0.004, not 0.05/12
    with pytest.raises(AnalysisError):
        LS.arange_grid(0.0, 0.001, 0.004)  # one point


def test_expected_sharpness_with_the_studys_centre_index_hand_worked():
    # Study (4_expected_sharpness.py): c = len // 2, offsets 1..min(c, len − 1 − c), ES the mean of
    # ½(L(c+m) + L(c−m)) − L(c). For 6 points c = 3 and m = 1, 2 (index 0 is never used).
    profile = torch.tensor([100.0, 5.0, 2.0, 1.0, 4.0, 9.0], dtype=torch.float64)
    expected = ((0.5 * (4.0 + 2.0) - 1.0) + (0.5 * (9.0 + 5.0) - 1.0)) / 2  # (2 + 6) / 2 = 4
    alphas = LS.arange_grid(-0.3, 0.3, 0.1)  # six points, no 0
    assert LS.expected_sharpness(profile, alphas, center=LS.middle_index(6)) == pytest.approx(expected)
    assert LS.center_to_min(profile, alphas, center=3) == 0.0
    summary = LS.profile_summary(torch.stack([profile, profile]), alphas, center=3)
    assert summary["expected_sharpness"] == pytest.approx(4.0) and summary["direction_variance"] == 0.0
    with pytest.raises(AnalysisError):
        LS.expected_sharpness(profile, alphas, center=0)  # nothing on the left


def test_study_grid_spacing_sets_the_sharpness_of_a_quadratic():
    # On L(α) = a·α² the shifted centre cancels: ES = a·h²·(M + 1)(2M + 1)/6 with spacing h and
    # M = 12 offsets on both grids, so the ratio is the squared ratio of the spacings: ours
    # (25 points over ±0.05, h = 0.05/12) is 8.5% sharper than the study's (h = 0.004).
    a = 3.0
    study = LS.arange_grid(*LS.STUDY_SINGULAR_GRID)
    centred = LS.make_grid(25, 0.05)
    es_study = LS.expected_sharpness(a * study**2, study, center=LS.middle_index(study.numel()))
    es_centred = LS.expected_sharpness(a * centred**2, centred)
    assert es_study == pytest.approx(a * 0.004**2 * 13 * 25 / 6, rel=1e-9)
    assert es_centred / es_study == pytest.approx((0.05 / 12 / 0.004) ** 2, rel=1e-9)
    assert es_centred / es_study == pytest.approx(1.0851, abs=1e-4)


# --- summaries on a quadratic loss with known Hessian -----------------------------------------


def quadratic_setup(seed: int = 0):
    """L(θ) = ½ θᵀHθ over the flattened SHAPES, with a random SPD Hessian H."""
    P = sum(torch.Size(s).numel() for s in SHAPES.values())
    A = torch.randn(P, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    H = A @ A.T / P + 0.1 * torch.eye(P, dtype=torch.float64)
    return P, H, (lambda theta: 0.5 * theta @ H @ theta)


def evaluate_profiles(loss, theta0, directions, alphas):
    """P_i(α) = L(θ0 + α d_i) − L(θ0), evaluated by calling the loss (no closed form here)."""
    return torch.stack(
        [torch.stack([loss(theta0 + a * d) - loss(theta0) for a in alphas]) for d in directions]
    )


def test_expected_sharpness_and_direction_variance_match_quadratic_closed_forms_at_minimum():
    P, H, loss = quadratic_setup()
    alphas = LS.make_grid(11, 0.5)
    directions = [flatten(d) for d in LS.random_directions(SHAPES, 8, seed=3)]
    profiles = evaluate_profiles(loss, torch.zeros(P, dtype=torch.float64), directions, alphas)

    curvatures = torch.stack([d @ H @ d for d in directions])  # dᵢᵀHdᵢ
    half_right = alphas[6:]  # α_{c+m}, m = 1..M
    # At θ = 0: P_i(α) = ½α² dᵢᵀHdᵢ, so ES = (1/M) Σ_m ½ α_m² · mean_i(dᵢᵀHdᵢ)
    es_closed = (0.5 * half_right**2).mean() * curvatures.mean()
    # and Var_i[P_i(α)] = ¼ α⁴ Var_i(dᵢᵀHdᵢ), so DV = mean_j ¼ α_j⁴ · Var_i(dᵢᵀHdᵢ)
    dv_closed = (0.25 * alphas**4).mean() * curvatures.var(correction=0)

    assert LS.expected_sharpness(profiles.mean(0), alphas) == pytest.approx(es_closed.item(), rel=1e-10)
    assert LS.direction_variance(profiles) == pytest.approx(dv_closed.item(), rel=1e-10)
    summary = LS.profile_summary(profiles, alphas)
    assert summary["expected_sharpness"] == pytest.approx(es_closed.item(), rel=1e-10)
    assert summary["center_to_min"] == 0.0  # θ is the minimum along every direction


def test_expected_sharpness_ignores_the_gradient_term_away_from_the_minimum():
    P, H, loss = quadratic_setup(seed=1)
    theta0 = torch.randn(P, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    alphas = LS.make_grid(7, 0.3)
    directions = [flatten(d) for d in LS.random_directions(SHAPES, 5, seed=9)]
    profiles = evaluate_profiles(loss, theta0, directions, alphas)

    # P_i(α) = α gᵀdᵢ + ½α² dᵢᵀHdᵢ with g = Hθ0: the linear part cancels in the symmetric pairs of ES...
    slopes = torch.stack([(H @ theta0) @ d for d in directions])
    curvatures = torch.stack([d @ H @ d for d in directions])
    es_closed = (0.5 * alphas[4:] ** 2).mean() * curvatures.mean()
    assert LS.expected_sharpness(profiles.mean(0), alphas) == pytest.approx(es_closed.item(), rel=1e-9)
    # ...but not in DV, which sees both terms.
    per_point = alphas[None, :] * slopes[:, None] + 0.5 * alphas[None, :] ** 2 * curvatures[:, None]
    dv_closed = per_point.var(dim=0, correction=0).mean()
    assert LS.direction_variance(profiles) == pytest.approx(dv_closed.item(), rel=1e-9)
    # center_to_min > 0: moving downhill along some direction lowers the mean loss.
    mean = profiles.mean(0)
    assert LS.center_to_min(mean, alphas) == pytest.approx((mean[3] - mean.min()).item())


def test_center_to_min_and_direction_variance_on_small_known_profiles():
    alphas = LS.make_grid(5, 1.0)  # [-1, -0.5, 0, 0.5, 1]
    profile = (alphas - 0.5) ** 2
    assert LS.center_to_min(profile) == pytest.approx(0.25)
    assert LS.center_to_min(profile.tolist(), alphas) == pytest.approx(0.25)
    assert LS.direction_variance(profile[None, :]) == 0.0  # one direction (K = 1)
    two = torch.stack([torch.zeros(5), torch.full((5,), 2.0)])
    assert LS.direction_variance(two) == pytest.approx(1.0)  # population variance of {0, 2}
    # Vectorised over leading dimensions.
    batch = torch.stack([profile, 2 * profile])
    es = LS.expected_sharpness(batch, alphas)
    assert es.shape == (2,) and es[1].item() == pytest.approx(2 * es[0].item())


# --- random directions ------------------------------------------------------------------------


def test_random_directions_are_reproducible_and_independent_of_draw_order():
    first = list(LS.random_directions(SHAPES, 4, seed=7))
    again = list(LS.random_directions(dict(reversed(list(SHAPES.items()))), 4, seed=7))
    for a, b in zip(first, again):
        for name in SHAPES:
            assert torch.equal(a[name], b[name])
    # Direction 3 is the same whether drawn fourth, alone, or through random_direction.
    alone = next(LS.random_directions(SHAPES, 1, seed=7, start=3))
    single = LS.random_direction(SHAPES, 3, seed=7)
    for name in SHAPES:
        assert torch.equal(first[3][name], alone[name]) and torch.equal(first[3][name], single[name])
        assert first[3][name].shape == SHAPES[name] and first[3][name].dtype == torch.float32
    # Different directions and different seeds differ.
    assert not torch.equal(first[0]["layer.weight"], first[1]["layer.weight"])
    other_seed = LS.random_direction(SHAPES, 0, seed=8)
    assert not torch.equal(first[0]["layer.weight"], other_seed["layer.weight"])


def test_random_direction_entries_are_standard_normal():
    d = LS.random_direction({"w": (300, 300)}, 0, seed=1)["w"]
    assert abs(d.mean().item()) < 0.01 and d.std().item() == pytest.approx(1.0, abs=0.01)


def test_filter_normalization_matches_reference_row_norms():
    g = torch.Generator().manual_seed(2)
    reference = {name: torch.randn(shape, generator=g) * 3 for name, shape in SHAPES.items()}
    reference["layer.weight"][1] = 0.0  # a zero row stays zero
    raw = LS.random_direction(SHAPES, 2, seed=4)
    normalized = next(LS.random_directions(SHAPES, 1, seed=4, normalization="filter", reference=reference, start=2))
    for name in ("layer.weight", "head.weight"):
        got = normalized[name].norm(dim=1)
        assert torch.allclose(got, reference[name].norm(dim=1), rtol=1e-5, atol=1e-6)
        # Each row keeps its direction: only the length changes.
        nonzero = reference[name].norm(dim=1) > 0
        cos = torch.nn.functional.cosine_similarity(normalized[name][nonzero], raw[name][nonzero], dim=1)
        assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    # 1-D parameters are rescaled as a whole.
    assert normalized["layer.bias"].norm().item() == pytest.approx(reference["layer.bias"].norm().item(), rel=1e-5)
    ratio = normalized["layer.bias"] / raw["layer.bias"]
    assert torch.allclose(ratio, ratio[0].expand(4))  # one scale for the whole tensor


def test_random_direction_arguments_are_checked_at_call_time():
    with pytest.raises(AnalysisError):
        LS.random_directions(SHAPES, 2, seed=0, normalization="filter")  # no reference
    with pytest.raises(AnalysisError, match="filter"):
        LS.random_directions(SHAPES, 2, seed=0, normalization="filtr", reference={})
    bad_reference = {name: torch.zeros(3) for name in SHAPES}
    with pytest.raises(AnalysisError):
        LS.random_directions(SHAPES, 2, seed=0, normalization="filter", reference=bad_reference)


# --- singular directions ----------------------------------------------------------------------


def test_singular_directions_of_a_diagonal_matrix_are_scaled_unit_entries():
    W = torch.diag(torch.tensor([3.0, 5.0, 1.0]))
    weights = {"w": W, "norm": torch.ones(3)}
    weighted = list(LS.singular_directions(weights, k_max=4, beyond_rank="zero"))
    unweighted = list(LS.singular_directions(weights, k_max=4, weighted=False, beyond_rank="zero"))
    assert len(weighted) == 4 and all(set(d) == {"w"} for d in weighted)  # 1-D tensors are not perturbed
    for k, (index, sigma) in enumerate([(1, 5.0), (0, 3.0), (2, 1.0)]):
        expected = torch.zeros(3, 3)
        expected[index, index] = 1.0
        assert torch.allclose(weighted[k]["w"], sigma * expected, atol=1e-6)
        assert torch.allclose(unweighted[k]["w"], expected, atol=1e-6)
    assert torch.equal(weighted[3]["w"], torch.zeros(3, 3))  # k > rank
    assert torch.equal(unweighted[3]["w"], torch.zeros(3, 3))


def test_singular_directions_beyond_the_rank_clamp_k_as_the_study_does():
    # Study (Landscape4ModelPCA): comp_idx = min(k − 1, len(S) − 1). For a 3 × 3 matrix and
    # k = 4, 5 the direction is the third (last) component again, σ-weighted or not.
    W = torch.diag(torch.tensor([3.0, 5.0, 1.0]))
    last = torch.zeros(3, 3)
    last[2, 2] = 1.0
    weighted = list(LS.singular_directions({"w": W}, k_max=5))  # the default rule is the study's
    unweighted = list(LS.singular_directions({"w": W}, k_max=5, weighted=False, beyond_rank="clamp"))
    for k in (2, 3, 4):
        assert torch.allclose(weighted[k]["w"], 1.0 * last, atol=1e-6)
        assert torch.allclose(unweighted[k]["w"], last, atol=1e-6)
    # A wide 2 × 4 matrix has two components; k = 3 reuses the second.
    wide = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    third = list(LS.singular_directions({"w": wide}, k_max=3))[2]["w"]
    assert torch.allclose(third, torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]), atol=1e-6)
    with pytest.raises(AnalysisError, match="beyond_rank"):
        LS.singular_directions({"w": W}, beyond_rank="wrap")


def test_weighted_singular_directions_sum_to_the_matrix():
    W = torch.randn(5, 3, generator=torch.Generator().manual_seed(6))
    total = sum(d["w"] for d in LS.singular_directions({"w": W}, k_max=3))
    assert torch.allclose(total, W, atol=1e-5)
    rank_one = torch.outer(torch.arange(1.0, 4.0), torch.ones(2))
    directions = list(LS.singular_directions({"r": rank_one}, k_max=2, weighted=False, beyond_rank="zero"))
    assert torch.equal(directions[1]["r"], torch.zeros(3, 2))  # σ_2 = 0 (≤ 1e-12): zero, not an arbitrary null vector
    with pytest.raises(AnalysisError):
        LS.singular_directions({"w": W}, k_max=0)


# --- trajectory PCA ---------------------------------------------------------------------------


def planted_trajectory(T: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    final = {name: torch.randn(shape, generator=g, dtype=torch.float64) for name, shape in SHAPES.items()}
    planted = {name: torch.randn(shape, generator=g, dtype=torch.float64) for name, shape in SHAPES.items()}
    scale = flatten(planted).norm()
    planted = {name: t / scale for name, t in planted.items()}
    snapshots = []
    for t in range(T):
        coefficient = 3.0 * (T - 1 - t)  # moves along the planted direction towards θ_final
        noise = {name: 0.01 * torch.randn(shape, generator=g, dtype=torch.float64) for name, shape in SHAPES.items()}
        snapshots.append({name: final[name] + coefficient * planted[name] + (noise[name] if t < T - 1 else 0) for name in SHAPES})
    return snapshots, planted


def test_trajectory_pca_recovers_a_planted_direction_and_matches_sklearn():
    snapshots, planted = planted_trajectory()
    result = LS.trajectory_pca_directions(snapshots, n_components=2)
    assert len(result.directions) == 2 and set(result.directions[0]) == set(SHAPES)
    first = flatten(result.directions[0])
    assert first.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert abs(first @ flatten(planted)).item() > 0.999
    assert result.explained_variance_ratio[0].item() > 0.99

    # Oracle: sklearn's PCA on the flattened differences θ_t − θ_final (t < final).
    rows = torch.stack([flatten(s) - flatten(snapshots[-1]) for s in snapshots[:-1]]).numpy()
    pca = PCA(n_components=2, svd_solver="full").fit(rows)
    assert result.explained_variance_ratio.numpy() == pytest.approx(pca.explained_variance_ratio_, rel=1e-8)
    for j in range(2):
        ours = flatten(result.directions[j]).numpy()
        assert abs(ours @ pca.components_[j]) == pytest.approx(1.0, abs=1e-5)

    # Coordinates are the projections of θ_t − θ_final; θ_final sits at the origin.
    assert torch.equal(result.coordinates[-1], torch.zeros(2, dtype=torch.float64))
    expected = torch.from_numpy(rows) @ torch.stack([flatten(d) for d in result.directions]).T
    assert torch.allclose(result.coordinates[:-1], expected, rtol=1e-5, atol=1e-5)


def test_trajectory_pca_needs_enough_distinct_checkpoints():
    snapshots, _ = planted_trajectory(T=3)
    with pytest.raises(AnalysisError):
        LS.trajectory_pca_directions(snapshots, n_components=2)  # 3 checkpoints span at most 1 direction
    with pytest.raises(AnalysisError):
        LS.trajectory_pca_directions([snapshots[0]] * 5, n_components=1)  # no movement at all
