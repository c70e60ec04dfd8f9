"""Intruder dimensions on constructed matrices, where the answer is known by construction
(reeceshuttle/intruder-dimensions find_intruder_dimensions.py: top-k left singular vectors, max |cos|
against every reference singular vector, intruder when below ε; k 10, ε 0.5)."""

from __future__ import annotations

import math

import pytest
import torch

from rankscope.analysis.stages.intruder import (
    count_intruders,
    intruder_rows,
    intruder_scores,
    is_degenerate,
)


def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def _matrix(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * s) @ v.T


SIGMAS = torch.tensor([10.0 - 0.4 * i for i in range(24)], dtype=torch.float64)  # distinct: 10, 9.6, ..., 0.8


@pytest.fixture
def base():
    """A full-rank 32 x 24 reference: its 24 left singular vectors are exactly u's columns."""
    return _orthonormal(32, 24, 0), SIGMAS, _orthonormal(24, 24, 1)


def _planted(u, s, v, sigma: float) -> torch.Tensor:
    """The reference with its smallest component's left vector replaced by a direction orthogonal to
    every reference left vector, at singular value `sigma`: an exact SVD with one new direction."""
    new = torch.randn(32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    new -= u @ (u.T @ new)
    new /= new.norm()
    kept = _matrix(u[:, :-1], s[:-1], v[:, :-1])
    return kept + sigma * torch.outer(new, v[:, -1])


def _count(W, reference, k=10, threshold=0.5, side="left") -> int:
    similarities, _ = intruder_scores(W, reference, k, side)
    return int(count_intruders(similarities, threshold))


def test_a_matrix_against_itself_has_no_intruders(base):
    W = _matrix(*base)
    similarities, _ = intruder_scores(W, W)
    assert torch.allclose(similarities, torch.ones(10, dtype=torch.float64), atol=1e-10)
    assert _count(W, W) == 0


def test_new_singular_values_on_the_same_vectors_are_no_intruders(base):
    u, s, v = base
    assert _count(_matrix(u, s.flip(0), v), _matrix(u, s, v)) == 0  # the order of the directions changed


def test_a_rotation_within_the_kept_subspace_stays_below_the_threshold_as_the_definition_says(base):
    """Rotating the top two directions by 45 degrees gives |cos| = 1/sqrt(2) ~ 0.707 with both old
    ones: above ε = 0.5, no intruder; at ε 0.75 both are."""
    u, s, v = base
    rotation = torch.eye(24, dtype=torch.float64)
    c = math.cos(math.pi / 4)
    rotation[:2, :2] = torch.tensor([[c, -c], [c, c]], dtype=torch.float64)
    rotated = _matrix(u @ rotation, s, v)
    similarities, _ = intruder_scores(rotated, _matrix(u, s, v))
    assert similarities[:2] == pytest.approx([c, c], abs=1e-9)
    assert _count(rotated, _matrix(u, s, v)) == 0
    assert _count(rotated, _matrix(u, s, v), threshold=0.75) == 2


def test_planting_a_new_top_direction_gives_exactly_one_intruder(base):
    u, s, v = base
    reference = _matrix(u, s, v)
    planted = _planted(u, s, v, 20.0)
    similarities, _ = intruder_scores(planted, reference)
    assert similarities[0] < 1e-8  # the top vector is the planted one
    assert similarities[1:] == pytest.approx([1.0] * 9)
    assert _count(planted, reference) == 1


def test_k_limits_which_vectors_are_looked_at(base):
    u, s, v = base
    reference = _matrix(u, s, v)
    # Planted at singular value 5.0: the 14th (13 values from 10 down to 5.2 are larger).
    planted = _planted(u, s, v, 5.0)
    assert _count(planted, reference, k=10) == 0
    assert _count(planted, reference, k=13) == 0
    assert _count(planted, reference, k=14) == 1
    assert intruder_scores(planted, reference, k=100)[0].shape == (24,)  # k beyond min(m, n): all of them


def test_right_side_uses_the_right_singular_vectors(base):
    u, s, v = base
    reference = _matrix(u, s, v)
    other = _orthonormal(24, 24, 9)
    assert _count(_matrix(u, s, other), reference, side="left") == 0
    assert _count(_matrix(u, s, other), reference, side="right") > 0


def test_degenerate_flags_repeated_top_singular_values(base):
    u, s, v = base
    _, values = intruder_scores(_matrix(u, s, v), _matrix(u, s, v))
    assert not bool(is_degenerate(values, 10))
    repeated = s.clone()
    repeated[3] = repeated[2]
    _, values = intruder_scores(_matrix(u, repeated, v), _matrix(u, s, v))
    assert bool(is_degenerate(values, 10))


def test_rows_sum_per_matrix_counts_and_batch_by_shape(base):
    u, s, v = base
    reference = _matrix(u, s, v)
    planted = _planted(u, s, v, 20.0)
    square = _matrix(_orthonormal(8, 8, 3), SIGMAS[:8], _orthonormal(8, 8, 4))
    weights = {"a": planted, "b": reference, "c": square}
    references = {"a": reference, "b": reference, "c": square}
    rows = intruder_rows(weights, references, {"a": 0, "b": 0, "c": 1})
    value = {(r["matrix"], r["metric"]): r["value"] for r in rows}
    assert value[("a", "intruders")] == 1 and value[("b", "intruders")] == 0 and value[("c", "intruders")] == 0
    assert value[("total", "intruders")] == 1 and value[("mean", "intruders")] == pytest.approx(1 / 3)
    assert value[("c", "similarity_8")] == pytest.approx(1.0) and ("c", "similarity_9") not in value
