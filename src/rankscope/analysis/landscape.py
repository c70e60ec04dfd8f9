"""One-dimensional loss landscapes (METRICS.md §1): grids, summary numbers and directions.

Profiles are ``P(α) = L(θ + α·d) − L(θ)`` (or raw losses ``L(θ + α·d)``: every summary here is
invariant to adding a constant) sampled on a symmetric grid that contains 0.

Summary functions take array-likes (tensors, numpy arrays, lists), compute in fp64, and are
vectorised over leading dimensions: a single profile gives a Python float, a batch a tensor.

Direction generators yield ``dict[name, Tensor]`` shaped like the parameters, one direction at a
time, so a pipeline holds a single direction in memory while it evaluates the grid.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch

from rankscope.errors import AnalysisError, did_you_mean

DEFAULT_GRID_POINTS = 25
DEFAULT_RANDOM_RADIUS = 0.003
DEFAULT_SINGULAR_RADIUS = 0.05
# The study's singular-direction grid: numpy.arange(x_min, x_max, x_interval) with the values of
# its launcher (low-rank-geometry, loss-landscape/scripts/bash_scripts/pca_top20_60m.sh: --x_min
# -0.05 --x_max 0.0501 --x_interval 0.004): 26 points, spacing 0.004, no 0, centre index 13 (α = 0.002).
STUDY_SINGULAR_GRID = (-0.05, 0.0501, 0.004)
SV_TOLERANCE = 1e-12  # singular values at or below count as zero (same rule as spectral.py)

ArrayLike = torch.Tensor | Sequence[float]


def _as_float64(values: ArrayLike) -> torch.Tensor:
    t = torch.as_tensor(values)
    return t.detach().to(torch.float64)


def _as_output(value: torch.Tensor) -> float | torch.Tensor:
    return value.item() if value.ndim == 0 else value


# --- grids ------------------------------------------------------------------------------------


def make_grid(n_points: int = DEFAULT_GRID_POINTS, radius: float = DEFAULT_RANDOM_RADIUS) -> torch.Tensor:
    """``n_points`` evenly spaced α in ``[−radius, radius]``, fp64, exactly symmetric, exactly 0 in the middle.

    ``n_points`` must be odd (so that 0 is a grid point) and at least 3.
    """
    if not isinstance(n_points, int) or n_points < 3 or n_points % 2 == 0:
        raise AnalysisError(
            f"n_points must be an odd integer >= 3 so the grid contains 0, got {n_points!r} "
            f"(e.g. {DEFAULT_GRID_POINTS})"
        )
    if not radius > 0:
        raise AnalysisError(f"radius must be > 0, got {radius!r}")
    half = n_points // 2
    # α_m = radius·m/M: −α_m is computed by the same operations, so the grid is symmetric bit for bit.
    return torch.arange(-half, half + 1, dtype=torch.float64) * (radius / half)


def arange_grid(start: float, stop: float, step: float) -> torch.Tensor:
    """``numpy.arange(start, stop, step)`` bit for bit (fp64): ``ceil((stop − start) / step)``
    points ``start + i·δ`` with ``δ = (start + step) − start``, as numpy fills it.

    This is how the study's landscape scripts build their α axis (``Landscape4Model.synthesize_coordinates``).
    """
    if not (step > 0 and stop > start):
        raise AnalysisError(f"an arange grid needs step > 0 and stop > start, got ({start}, {stop}, {step})")
    count = int(math.ceil((stop - start) / step))
    if count < 3:
        raise AnalysisError(f"the grid ({start}, {stop}, {step}) has {count} points; a profile needs at least 3")
    delta = (start + step) - start
    return start + torch.arange(count, dtype=torch.float64) * delta


def middle_index(n_points: int) -> int:
    """The study's centre of any grid: ``len // 2`` (4_expected_sharpness.py, ``_resolve_center_index``)."""
    return n_points // 2


def check_grid(alphas: ArrayLike) -> torch.Tensor:
    """A valid α axis: 1-D, finite, strictly increasing, at least 3 points (any spacing or centre)."""
    a = _as_float64(alphas)
    if a.ndim != 1 or a.numel() < 3:
        raise AnalysisError(f"the α grid must be 1-D with at least 3 points, got shape {tuple(a.shape)}")
    if not torch.isfinite(a).all():
        raise AnalysisError("the α grid contains nan or inf values")
    if not (a[1:] > a[:-1]).all():
        raise AnalysisError("the α grid must be strictly increasing; sort it (make_grid builds one)")
    return a


def grid_center(alphas: ArrayLike) -> int:
    """Index c of α = 0 in a valid grid: 1-D, increasing, odd length, symmetric about 0.

    Raises :class:`~rankscope.analysis.AnalysisError` (a ``ValueError``) otherwise.
    """
    a = check_grid(alphas)
    if a.numel() % 2 == 0:
        raise AnalysisError(
            f"the α grid has {a.numel()} points, so it cannot be symmetric and contain 0; use an odd count"
        )
    c = a.numel() // 2
    tolerance = 1e-9 * a.abs().max().item()
    if abs(a[c].item()) > tolerance:
        raise AnalysisError(f"the α grid does not contain 0 at its centre (α[{c}] = {a[c].item():g}); use make_grid")
    if ((a + a.flip(0)).abs() > tolerance).any():
        raise AnalysisError("the α grid is not symmetric about 0 (α_{c+m} != −α_{c−m}); use make_grid")
    return c


def _profile_center(profile: torch.Tensor, alphas: ArrayLike | None, center: int | None = None) -> int:
    n = profile.shape[-1]
    if center is not None:
        # An explicit centre (the study's len // 2 on a grid that need not contain 0).
        if alphas is not None:
            n_alphas = check_grid(alphas).numel()
            if n_alphas != n:
                raise AnalysisError(f"the profile has {n} points but the α grid has {n_alphas}; evaluate every grid point")
        if not 0 <= center < n:
            raise AnalysisError(f"the centre index {center} is outside the profile's {n} points")
        return center
    if alphas is None:
        if n < 3 or n % 2 == 0:
            raise AnalysisError(f"a profile needs an odd number (>= 3) of grid points with α = 0 in the middle, got {n}")
        return n // 2
    c = grid_center(alphas)
    n_alphas = torch.as_tensor(alphas).numel()
    if n_alphas != n:
        raise AnalysisError(f"the profile has {n} points but the α grid has {n_alphas}; evaluate every grid point")
    return c


# --- summary numbers --------------------------------------------------------------------------


def expected_sharpness(profile_mean: ArrayLike, alphas: ArrayLike | None, center: int | None = None) -> float | torch.Tensor:
    """``ES = (1/M) Σ_{m=1..M} [½(L̄(α_{c+m}) + L̄(α_{c−m})) − L̄(α_c)]`` over the last dimension.

    ``profile_mean`` is the profile averaged over directions, shape ``(G,)`` or ``(..., G)``.
    Without ``center`` the grid must be symmetric about α = 0 (c is the 0); with ``center`` (the
    study's ``len // 2`` on any grid) ``M = min(c, G − 1 − c)``, as the study's
    ``4_expected_sharpness.py`` computes it.
    """
    profile = _as_float64(profile_mean)
    if profile.ndim == 0:
        raise AnalysisError("profile_mean must have the grid as its last dimension, got a scalar")
    c = _profile_center(profile, alphas, center)
    half = min(c, profile.shape[-1] - 1 - c)
    if half < 1:
        raise AnalysisError(f"the centre index {c} leaves no point on one side of a {profile.shape[-1]}-point profile")
    center_value = profile[..., c : c + 1]
    left = profile[..., c - half : c].flip(-1)  # α_{c−1}, α_{c−2}, ...: pairs with α_{c+1}, α_{c+2}, ...
    right = profile[..., c + 1 : c + 1 + half]
    return _as_output((0.5 * (left + right) - center_value).mean(-1))


def direction_variance(profiles: ArrayLike) -> float | torch.Tensor:
    """``DV = (1/|grid|) Σ_j Var_i[L_i(α_j)]``, population variance over directions.

    ``profiles`` has shape ``(n_directions, G)`` or ``(..., n_directions, G)``; a single
    direction gives 0.
    """
    p = _as_float64(profiles)
    if p.ndim < 2:
        raise AnalysisError(f"profiles must have shape (n_directions, n_grid), got {tuple(p.shape)}")
    if p.shape[-2] == 0:
        raise AnalysisError("profiles contain no directions")
    return _as_output(p.var(dim=-2, correction=0).mean(-1))


def center_to_min(profile_mean: ArrayLike, alphas: ArrayLike | None = None, center: int | None = None) -> float | torch.Tensor:
    """``L̄(α_c) − min_j L̄(α_j)`` (≥ 0; > 0 when the centre is not the minimum along the profile).

    Without ``alphas`` or ``center`` the grid is taken to be symmetric with α = 0 at the middle index.
    """
    profile = _as_float64(profile_mean)
    if profile.ndim == 0:
        raise AnalysisError("profile_mean must have the grid as its last dimension, got a scalar")
    c = _profile_center(profile, alphas, center)
    return _as_output(profile[..., c] - profile.amin(-1))


def profile_summary(profiles: ArrayLike, alphas: ArrayLike, center: int | None = None) -> dict[str, float | torch.Tensor]:
    """All summary numbers of a set of profiles ``(n_directions, G)`` on one grid.

    Keys: ``expected_sharpness``, ``direction_variance``, ``center_to_min`` (all of the mean
    profile, DV across directions) and ``profile_mean`` (fp64 tensor ``(G,)``). ``center`` as in
    :func:`expected_sharpness`.
    """
    p = _as_float64(profiles)
    if p.ndim != 2:
        raise AnalysisError(f"profiles must have shape (n_directions, n_grid), got {tuple(p.shape)}")
    mean = p.mean(0)
    return {
        "expected_sharpness": expected_sharpness(mean, alphas, center),
        "direction_variance": direction_variance(p),
        "center_to_min": center_to_min(mean, alphas, center),
        "profile_mean": mean,
    }


# --- random directions ------------------------------------------------------------------------

_NORMALIZATIONS = {None: None, "none": None, "filter": "filter", "filter_normalized": "filter"}


def _tensor_seed(seed: int, index: int, name: str) -> int:
    """A 64-bit generator seed from (study seed, direction index, parameter name).

    Hashing all three makes every tensor of every direction an independent stream: direction i
    does not depend on how many directions were drawn before, nor on the order of the dict.
    """
    digest = hashlib.blake2b(f"rankscope/random-direction/{seed}/{index}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _filter_normalize(direction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Rescale each row (filter) of ``direction`` to the norm of the same row of ``reference``.

    2-D and higher: rows are slices along dim 0; 0-D/1-D: the whole tensor (Li et al. 2018).
    """
    ref = reference.detach().to(device=direction.device, dtype=torch.float32)
    d32 = direction.to(torch.float32)
    if direction.ndim >= 2:
        d_rows = d32.reshape(direction.shape[0], -1)
        ref_norm = torch.linalg.vector_norm(ref.reshape(direction.shape[0], -1), dim=1, keepdim=True)
        d_norm = torch.linalg.vector_norm(d_rows, dim=1, keepdim=True)
        scaled = d_rows * (ref_norm / d_norm.clamp_min(torch.finfo(torch.float32).tiny))
        return scaled.reshape(direction.shape).to(direction.dtype)
    scale = torch.linalg.vector_norm(ref) / torch.linalg.vector_norm(d32).clamp_min(torch.finfo(torch.float32).tiny)
    return (d32 * scale).to(direction.dtype)


def _check_normalization(
    shapes: Mapping[str, Sequence[int]], normalization: str | None, reference: Mapping[str, torch.Tensor] | None
) -> str | None:
    if normalization not in _NORMALIZATIONS:
        valid = [k for k in _NORMALIZATIONS if k is not None]
        raise AnalysisError(f"unknown direction normalization {normalization!r}{did_you_mean(str(normalization), valid)}")
    mode = _NORMALIZATIONS[normalization]
    if mode == "filter":
        if reference is None:
            raise AnalysisError("filter normalization needs reference=θ (the parameters the directions perturb)")
        missing = [name for name in shapes if name not in reference]
        if missing:
            raise AnalysisError(f"reference lacks parameters {missing[:3]}; pass θ with every perturbed name")
        for name, shape in shapes.items():
            if tuple(reference[name].shape) != tuple(shape):
                raise AnalysisError(
                    f"reference {name!r} has shape {tuple(reference[name].shape)} but the direction has {tuple(shape)}"
                )
    return mode


def random_direction(
    shapes: Mapping[str, Sequence[int]],
    index: int,
    seed: int,
    normalization: str | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Direction number ``index`` of the study with ``seed``: entries i.i.d. N(0, 1).

    Drawn on the CPU generator (whose stream is the same on every machine), then moved to
    ``device``, so a GPU run and a CPU run use the same directions.
    """
    mode = _check_normalization(shapes, normalization, reference)
    return _draw(shapes, index, seed, mode, reference, dtype, device)


def _draw(
    shapes: Mapping[str, Sequence[int]],
    index: int,
    seed: int,
    mode: str | None,
    reference: Mapping[str, torch.Tensor] | None,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device="cpu")
    direction: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        generator.manual_seed(_tensor_seed(seed, index, name))
        d = torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device=device)
        if mode == "filter":
            d = _filter_normalize(d, reference[name])
        direction[name] = d.to(dtype)
    return direction


def random_directions(
    shapes: Mapping[str, Sequence[int]],
    n: int,
    seed: int,
    normalization: str | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
    *,
    start: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield directions ``start .. start + n − 1`` (see :func:`random_direction`).

    ``normalization``: None (default) or ``"filter"`` (alias ``"filter_normalized"``): each row
    of a ≥2-D tensor, and the whole of a 0/1-D tensor, rescaled to the norm of the same part of
    ``reference`` (θ). Arguments are checked at call time, before the first direction is drawn.
    """
    if n < 0 or start < 0:
        raise AnalysisError(f"n and start must be >= 0, got n={n}, start={start}")
    mode = _check_normalization(shapes, normalization, reference)

    def generate() -> Iterator[dict[str, torch.Tensor]]:
        for index in range(start, start + n):
            yield _draw(shapes, index, seed, mode, reference, dtype, device)

    return generate()


# --- singular directions ----------------------------------------------------------------------


BEYOND_RANK_RULES = ("clamp", "zero")


def singular_directions(
    weights: Mapping[str, torch.Tensor],
    k_max: int = 20,
    weighted: bool = True,
    *,
    beyond_rank: str = "clamp",
    dtype: torch.dtype = torch.float32,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield, for k = 1..k_max, ``{name: σ_k·u_k·v_kᵀ}`` for every 2-D tensor of ``weights``.

    ``weighted=False`` gives ``u_k·v_kᵀ``. Tensors that are not 2-D are left out of the dicts
    (a direction of zero there: nothing to perturb). The SVDs are computed once, in fp64 on the
    tensors' device, when this function is called.

    Where a matrix has fewer components than k:

    - ``beyond_rank="clamp"`` (the study's rule, ``Landscape4ModelPCA._rank_k_directions_for_name``:
      ``comp_idx = min(k − 1, len(S) − 1)``): k > min(m, n) reuses the last component, and a
      component whose σ_k is numerically zero is used as the SVD gives it (σ_k·u_k·v_kᵀ ≈ 0
      weighted, the unit u_k·v_kᵀ unweighted);
    - ``beyond_rank="zero"`` (ours): the entry is zero where σ_k ≤ 1e-12 or k > min(m, n).
    """
    if not isinstance(k_max, int) or k_max < 1:
        raise AnalysisError(f"k_max must be a positive integer, got {k_max!r}")
    if beyond_rank not in BEYOND_RANK_RULES:
        raise AnalysisError(f"unknown beyond_rank rule {beyond_rank!r}{did_you_mean(str(beyond_rank), BEYOND_RANK_RULES)}")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for name, W in weights.items():
        if W.ndim != 2:
            continue
        U, S, Vh = torch.linalg.svd(W.detach().to(torch.float64), full_matrices=False)
        factors[name] = (U[:, :k_max], S[:k_max], Vh[:k_max])
    shapes = {name: tuple(W.shape) for name, W in weights.items() if W.ndim == 2}

    def generate() -> Iterator[dict[str, torch.Tensor]]:
        for k in range(k_max):
            direction: dict[str, torch.Tensor] = {}
            for name, (U, S, Vh) in factors.items():
                index = min(k, S.numel() - 1) if beyond_rank == "clamp" else k
                if beyond_rank == "clamp" or (index < S.numel() and S[index] > SV_TOLERANCE):
                    scale = S[index] if weighted else 1.0
                    direction[name] = (scale * torch.outer(U[:, index], Vh[index])).to(dtype)
                else:
                    direction[name] = torch.zeros(shapes[name], dtype=dtype, device=U.device)
            yield direction

    return generate()


# --- trajectory PCA ---------------------------------------------------------------------------


class TrajectoryPCA(NamedTuple):
    """Principal directions of a training trajectory.

    ``directions[j]`` is a dict shaped like the snapshots, unit norm over all tensors together;
    ``explained_variance_ratio[j]`` its share of the trajectory's variance; ``coordinates``
    (T × n_components) the projections of every θ_t − θ_final onto the directions, for plotting
    the path (the last row is 0).
    """

    directions: list[dict[str, torch.Tensor]]
    explained_variance_ratio: torch.Tensor
    coordinates: torch.Tensor


def trajectory_pca_directions(
    snapshots: Sequence[Mapping[str, torch.Tensor]],
    n_components: int = 2,
    *,
    dtype: torch.dtype = torch.float32,
) -> TrajectoryPCA:
    """PCA of the flattened differences θ_t − θ_final over checkpoints (Li et al. 2018).

    ``snapshots`` are the checkpoints in order, the last one being θ_final. As in Li et al.
    (who fit sklearn's PCA), the rows θ_t − θ_final for t < final are centred over t before the
    decomposition. It goes through the (T−1) × (T−1) Gram matrix, accumulated tensor by tensor,
    so neither a P × P matrix nor the whole flattened (T−1) × P matrix is ever formed.
    Components are signed so that the largest-magnitude checkpoint score is positive.
    """
    if len(snapshots) < n_components + 2:
        raise AnalysisError(
            f"{n_components} trajectory components need at least {n_components + 2} checkpoints, "
            f"got {len(snapshots)}; keep more checkpoints or ask for fewer components"
        )
    if n_components < 1:
        raise AnalysisError(f"n_components must be >= 1, got {n_components}")
    final = snapshots[-1]
    names = [name for name, t in final.items() if t.is_floating_point()]
    for i, snap in enumerate(snapshots[:-1]):
        for name in names:
            if name not in snap or snap[name].shape != final[name].shape:
                raise AnalysisError(
                    f"checkpoint {i} lacks {name!r} or has another shape; every snapshot needs the same parameters"
                )
    n_rows = len(snapshots) - 1

    def differences(name: str) -> torch.Tensor:
        """Rows θ_t[name] − θ_final[name] for t < final, flattened, fp64 (not centred)."""
        ref = final[name].detach().to(torch.float64).reshape(-1)
        return torch.stack(
            [snap[name].detach().to(device=ref.device, dtype=torch.float64).reshape(-1) - ref for snap in snapshots[:-1]]
        )

    gram = torch.zeros(n_rows, n_rows, dtype=torch.float64)
    for name in names:
        rows = differences(name)
        D = rows - rows.mean(0, keepdim=True)
        gram += (D @ D.T).cpu()
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    order = torch.argsort(eigenvalues, descending=True)
    eigenvalues = eigenvalues[order].clamp_min(0.0)
    eigenvectors = eigenvectors[:, order]
    total = eigenvalues.sum()
    if total <= 0:
        raise AnalysisError("the checkpoints are all identical, so the trajectory has no principal directions")
    top_values = eigenvalues[:n_components]
    if (top_values <= 1e-12 * total).any():
        raise AnalysisError(
            f"the trajectory spans fewer than {n_components} directions; ask for fewer components"
        )
    Q = eigenvectors[:, :n_components]
    # Deterministic signs: the largest-magnitude score of each component is positive.
    largest = Q.abs().argmax(0)
    Q = Q * torch.sign(Q[largest, torch.arange(n_components)])

    # v_j = Dcᵀ q_j / sqrt(λ_j) is the unit principal direction; built tensor by tensor.
    inv_sqrt = 1.0 / torch.sqrt(top_values)
    directions: list[dict[str, torch.Tensor]] = [{} for _ in range(n_components)]
    coordinates = torch.zeros(len(snapshots), n_components, dtype=torch.float64)
    for name in names:
        rows = differences(name)
        D = rows - rows.mean(0, keepdim=True)
        V = D.T @ (Q * inv_sqrt).to(D.device)  # (p, n_components)
        coordinates[:-1] += (rows @ V).cpu()  # θ_final − θ_final = 0 leaves the last row at 0
        for j in range(n_components):
            directions[j][name] = V[:, j].reshape(final[name].shape).to(dtype)
    return TrajectoryPCA(directions, top_values / total, coordinates)
