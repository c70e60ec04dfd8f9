"""Parameterized linears: shapes, dense equivalence, init statistics, merges, custom autograd."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rankscope.errors import ConfigError
from rankscope.nn import (
    ColaLinear,
    LoRALinear,
    LowRankLinear,
    ParameterizedLinear,
    SparsePlusLowRankLinear,
)
from rankscope.nn.sparse import _SparsePlusLowRankMatmul

IN, OUT, RANK = 24, 16, 4


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _trained_like(layer: nn.Module, seed: int = 1) -> nn.Module:
    """Give every trainable float parameter random values, so zero-initialised factors (B in LoRA
    and SLTrain) do not hide a wrong formula in the tests."""
    gen = _seeded(seed)
    with torch.no_grad():
        for param in layer.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.3)
    return layer


def _all_layers(generator: torch.Generator | None = None) -> dict[str, ParameterizedLinear]:
    return {
        "lowrank": LowRankLinear(IN, OUT, RANK, generator=generator),
        "lora": LoRALinear(IN, OUT, RANK, alpha=8.0, generator=generator),
        "sparse": SparsePlusLowRankLinear(IN, OUT, RANK, alpha=8.0, density=0.1, generator=generator),
        "cola": ColaLinear(IN, OUT, RANK, generator=generator),
    }


@pytest.mark.parametrize("kind", ["lowrank", "lora", "sparse", "cola"])
def test_shapes_and_attributes(kind: str) -> None:
    layer = _all_layers(_seeded())[kind]
    assert isinstance(layer, ParameterizedLinear)
    assert (layer.in_features, layer.out_features, layer.rank) == (IN, OUT, RANK)
    x = torch.randn(3, 5, IN)
    y = layer(x)
    assert y.shape == (3, 5, OUT)
    factors = layer.factors()
    assert factors["B"].shape == (OUT, RANK)
    assert factors["A"].shape == (RANK, IN)
    # Gradients reach every trainable parameter.
    y.square().sum().backward()
    for name, param in layer.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.shape == param.shape, name


@pytest.mark.parametrize("kind", ["lowrank", "lora", "sparse"])
def test_effective_weight_reproduces_forward(kind: str) -> None:
    layer = _trained_like(_all_layers(_seeded())[kind].double())
    x = torch.randn(2, 7, IN, dtype=torch.float64)
    with torch.no_grad():
        weight = layer.effective_weight()
        assert weight.shape == (OUT, IN)
        torch.testing.assert_close(layer(x), x @ weight.T, rtol=1e-12, atol=1e-12)


def test_lowrank_weight_is_product_of_factors_and_xavier_init() -> None:
    layer = LowRankLinear(256, 192, 32, generator=_seeded())
    with torch.no_grad():
        torch.testing.assert_close(layer.effective_weight(), layer.B @ layer.A)
    # Xavier-uniform: U(±√(6/(fan_in + fan_out))), whose std is that bound / √3.
    for factor, (fan_out, fan_in) in ((layer.B, (192, 32)), (layer.A, (32, 256))):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert factor.abs().max() <= bound
        assert factor.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_cola_forward_is_b_silu_a_x_and_has_no_dense_weight() -> None:
    layer = _trained_like(ColaLinear(IN, OUT, RANK, generator=_seeded()).double())
    x = torch.randn(4, IN, dtype=torch.float64)
    hidden = x @ layer.A.T
    expected = (hidden * torch.sigmoid(hidden)) @ layer.B.T  # SiLU(h) = h·sigmoid(h)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert layer.effective_weight() is None
    # The nonlinearity makes it genuinely non-linear: no matrix reproduces it.
    assert not torch.allclose(layer(2 * x), 2 * layer(x))


def test_cola_init_std() -> None:
    in_f, out_f, rank = 512, 256, 64
    layer = ColaLinear(in_f, out_f, rank, generator=_seeded())
    expected = rank ** -0.25 * (in_f + out_f) ** -0.25
    for factor in (layer.A, layer.B):
        assert factor.mean().item() == pytest.approx(0.0, abs=0.05 * expected)
        assert factor.std().item() == pytest.approx(expected, rel=0.03)


def test_lora_init_output_equals_frozen_part_and_freezing() -> None:
    layer = LoRALinear(IN, OUT, RANK, alpha=16.0, generator=_seeded())
    assert not layer.weight.requires_grad
    assert layer.A.requires_grad and layer.B.requires_grad
    assert torch.count_nonzero(layer.B) == 0
    assert layer.scale == pytest.approx(16.0 / RANK)
    # A is Kaiming-uniform with a = √5: U(±1/√in), not zero.
    assert layer.A.abs().max() <= 1 / math.sqrt(IN) and layer.A.abs().max() > 0.5 / math.sqrt(IN)
    x = torch.randn(5, IN)
    torch.testing.assert_close(layer(x), x @ layer.weight.T)


def test_lora_random_frozen_weight_std() -> None:
    layer = LoRALinear(512, 384, 8, generator=_seeded())
    assert layer.weight.std().item() == pytest.approx(0.02, rel=0.02)


def test_lora_from_linear_copies_weight() -> None:
    linear = nn.Linear(IN, OUT, bias=False)
    layer = LoRALinear.from_linear(linear, RANK, alpha=8.0, generator=_seeded())
    torch.testing.assert_close(layer.weight, linear.weight)
    assert layer.weight.data_ptr() != linear.weight.data_ptr()
    x = torch.randn(3, IN)
    torch.testing.assert_close(layer(x), linear(x))


def test_lora_merge_keeps_function_and_resets_adapter() -> None:
    layer = _trained_like(LoRALinear(IN, OUT, RANK, alpha=8.0, generator=_seeded()))
    x = torch.randn(6, IN)
    with torch.no_grad():
        before = layer(x)
        expected_weight = layer.weight + layer.scale * layer.B @ layer.A
        old_A = layer.A.clone()
    layer.merge_and_reinit(generator=_seeded(5))
    with torch.no_grad():
        after = layer(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight, expected_weight, rtol=1e-6, atol=1e-7)
    assert torch.count_nonzero(layer.B) == 0
    assert not torch.equal(layer.A, old_A)
    assert layer.A.abs().max() <= 1 / math.sqrt(IN)
    assert not layer.weight.requires_grad and layer.A.requires_grad and layer.B.requires_grad


def test_sparse_support_size_uniqueness_and_init() -> None:
    in_f, out_f, density = 200, 100, 0.03
    layer = SparsePlusLowRankLinear(in_f, out_f, 8, alpha=32.0, density=density, generator=_seeded())
    index = layer.sparse_index
    assert index.dtype == torch.int32
    assert index.numel() == round(density * in_f * out_f) == 600
    assert torch.unique(index).numel() == index.numel()
    assert int(index.min()) >= 0 and int(index.max()) < in_f * out_f
    assert layer.sparse_values.shape == (600,)
    bound = 1 / math.sqrt(in_f)
    assert layer.sparse_values.abs().max() <= bound
    assert layer.sparse_values.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert torch.count_nonzero(layer.B) == 0
    assert layer.scale == pytest.approx(4.0)
    # With B = 0 the layer is exactly its sparse part.
    dense_sparse = torch.zeros(out_f * in_f).index_add_(0, index, layer.sparse_values.detach())
    x = torch.randn(3, in_f)
    torch.testing.assert_close(layer(x), x @ dense_sparse.view(out_f, in_f).T)
    # The support is spread over the whole matrix, not clustered (rows and columns both covered).
    rows, cols = index.long() // in_f, index.long() % in_f
    assert rows.unique().numel() > 0.9 * out_f and cols.unique().numel() > 0.9 * in_f


@pytest.mark.parametrize("kind", ["lowrank", "lora", "sparse", "cola"])
def test_init_is_deterministic_under_a_seed(kind: str) -> None:
    first = _all_layers(_seeded(3))[kind].state_dict()
    second = _all_layers(_seeded(3))[kind].state_dict()
    other = _all_layers(_seeded(4))[kind].state_dict()
    torch.manual_seed(11)
    global_a = _all_layers(None)[kind].state_dict()
    torch.manual_seed(11)
    global_b = _all_layers(None)[kind].state_dict()
    for key in first:
        assert torch.equal(first[key], second[key]), key
        assert torch.equal(global_a[key], global_b[key]), key
    assert any(not torch.equal(first[key], other[key]) for key in first if first[key].is_floating_point())


@pytest.mark.parametrize("n_tokens", [2, 8])  # 2: factor grads via the bottleneck, 8: via G_W
def test_sparse_custom_backward_gradcheck(n_tokens: int) -> None:
    in_f, out_f, rank = 6, 5, 2
    gen = _seeded(7)
    x = torch.randn(n_tokens, in_f, dtype=torch.float64, generator=gen, requires_grad=True)
    A = torch.randn(rank, in_f, dtype=torch.float64, generator=gen, requires_grad=True)
    B = torch.randn(out_f, rank, dtype=torch.float64, generator=gen, requires_grad=True)
    index = torch.randperm(in_f * out_f, generator=gen)[:9].sort().values.to(torch.int32)
    values = torch.randn(9, dtype=torch.float64, generator=gen, requires_grad=True)
    scale = 1.5
    assert torch.autograd.gradcheck(
        lambda x, A, B, v: _SparsePlusLowRankMatmul.apply(x, A, B, v, index, scale), (x, A, B, values)
    )

    # Against autograd on the dense formula, with a 3-d input.
    x3 = x.detach().reshape(2, n_tokens // 2, in_f).requires_grad_()
    upstream = torch.randn(2, n_tokens // 2, out_f, dtype=torch.float64, generator=gen)
    custom = _SparsePlusLowRankMatmul.apply(x3, A, B, values, index, scale)
    grads_custom = torch.autograd.grad(custom, (x3, A, B, values), upstream)
    sparse_dense = torch.zeros(out_f * in_f, dtype=torch.float64).index_put(
        (index.long(),), values
    ).view(out_f, in_f)
    reference = x3 @ (scale * B @ A + sparse_dense).T
    grads_reference = torch.autograd.grad(reference, (x3, A, B, values), upstream)
    torch.testing.assert_close(custom, reference)
    for got, want in zip(grads_custom, grads_reference):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_sparse_gradients_only_where_needed() -> None:
    layer = _trained_like(SparsePlusLowRankLinear(IN, OUT, RANK, alpha=8.0, density=0.1, generator=_seeded()))
    layer.A.requires_grad_(False)
    x = torch.randn(3, IN)  # no grad for x: the backward must skip it
    layer(x).sum().backward()
    assert layer.A.grad is None
    assert layer.B.grad is not None and layer.sparse_values.grad is not None


def test_sparse_keeps_no_dense_weight() -> None:
    layer = _trained_like(SparsePlusLowRankLinear(IN, OUT, RANK, alpha=8.0, density=0.1, generator=_seeded()))
    dense_shapes = {(OUT, IN), (IN, OUT)}
    for name, tensor in [*layer.named_parameters(), *layer.named_buffers(), *layer.state_dict().items()]:
        assert tuple(tensor.shape) not in dense_shapes, name
    stored = sum(t.numel() for t in layer.state_dict().values())
    assert stored < OUT * IN  # r·(in+out) + 2·nnz = 160 + 77 < 384

    # Nothing the size of the dense weight is saved for backward either.
    saved_shapes: list[tuple[int, ...]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    x = torch.randn(5, IN, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert saved_shapes, "the forward saved nothing: the hook did not run"
    assert not dense_shapes & set(saved_shapes), saved_shapes


def test_sparse_index_survives_safetensors_round_trip(tmp_path) -> None:
    layer = _trained_like(SparsePlusLowRankLinear(IN, OUT, RANK, alpha=8.0, density=0.1, generator=_seeded(1)))
    assert "sparse_index" in layer.state_dict()
    path = tmp_path / "layer.safetensors"
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(path))
    loaded_state = load_file(str(path))
    assert loaded_state["sparse_index"].dtype == torch.int32

    fresh = SparsePlusLowRankLinear(IN, OUT, RANK, alpha=8.0, density=0.1, generator=_seeded(2))
    assert not torch.equal(fresh.sparse_index, layer.sparse_index)  # a different support at first
    fresh.load_state_dict(loaded_state)
    assert fresh.sparse_index.dtype == torch.int32
    assert torch.equal(fresh.sparse_index, layer.sparse_index)
    x = torch.randn(4, IN)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_sparse_index_stays_integer_under_dtype_cast() -> None:
    layer = SparsePlusLowRankLinear(IN, OUT, RANK, density=0.1, generator=_seeded()).to(torch.bfloat16)
    assert layer.sparse_index.dtype == torch.int32
    assert layer.sparse_values.dtype == torch.bfloat16
    assert layer(torch.randn(2, IN, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "make",
    [
        lambda r: LowRankLinear(IN, OUT, r),
        lambda r: LoRALinear(IN, OUT, r, alpha=8.0),
        lambda r: SparsePlusLowRankLinear(IN, OUT, r),
        lambda r: ColaLinear(IN, OUT, r),
    ],
    ids=["lowrank", "lora", "sparse", "cola"],
)
def test_rank_validation(make) -> None:
    with pytest.raises(ConfigError, match=r"rank 16 must be below min\(d_in, d_out\) = 16 .*lower method.rank"):
        make(16)
    with pytest.raises(ConfigError, match="rank 0 must be at least 1"):
        make(0)
    assert make(15).rank == 15  # the largest rank that is still a factorization


def test_rank_error_names_the_layer() -> None:
    with pytest.raises(ConfigError, match="for layer layers.3.mlp.up_proj; lower method.rank"):
        LowRankLinear.from_linear(nn.Linear(8, 32, bias=False), 8, name="layers.3.mlp.up_proj")


@pytest.mark.parametrize("density", [0.0, 1.0, -0.1, 1.5])
def test_density_validation(density: float) -> None:
    with pytest.raises(ConfigError, match=r"density .* must be in \(0, 1\)"):
        SparsePlusLowRankLinear(IN, OUT, RANK, density=density)


def test_density_too_small_for_layer() -> None:
    with pytest.raises(ConfigError, match="gives no sparse entries"):
        SparsePlusLowRankLinear(IN, OUT, RANK, density=1e-4)


def test_from_linear_takes_shape_device_dtype() -> None:
    linear = nn.Linear(IN, OUT, bias=False).double()
    for layer in (
        LowRankLinear.from_linear(linear, RANK, generator=_seeded()),
        SparsePlusLowRankLinear.from_linear(linear, RANK, alpha=8.0, density=0.1, generator=_seeded()),
        ColaLinear.from_linear(linear, RANK, generator=_seeded()),
        LoRALinear.from_linear(linear, RANK, alpha=8.0, generator=_seeded()),
    ):
        assert (layer.in_features, layer.out_features) == (IN, OUT)
        assert all(p.dtype == torch.float64 for p in layer.parameters())
    with pytest.raises(ValueError, match="bias"):
        LowRankLinear.from_linear(nn.Linear(IN, OUT, bias=True), RANK)


def test_lora_bf16_merge_is_accurate() -> None:
    """The merge sums in fp32, so a bf16 frozen weight only takes the final rounding."""
    layer = _trained_like(LoRALinear(64, 48, 4, alpha=8.0, generator=_seeded()).to(torch.bfloat16))
    exact = layer.weight.double() + layer.scale * layer.B.double() @ layer.A.double()
    layer.merge_and_reinit()
    # One bf16 rounding: relative error at most 2^-8 per entry.
    assert ((layer.weight.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-30).all()
    assert torch.count_nonzero(layer.B) == 0


def test_sparse_under_autocast_matches_fp32() -> None:
    """The custom backward runs outside autocast and must pick the forward's compute dtype itself."""
    layer = _trained_like(SparsePlusLowRankLinear(64, 48, 4, alpha=8.0, density=0.1, generator=_seeded()))
    reference = SparsePlusLowRankLinear(64, 48, 4, alpha=8.0, density=0.1, generator=_seeded(9))
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 10, 64, generator=_seeded(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    reference(x).square().sum().backward()
    reference_grads = dict(reference.named_parameters())
    for name, param in layer.named_parameters():
        want = reference_grads[name].grad
        assert param.grad.dtype == torch.float32
        assert ((param.grad - want).norm() / want.norm()).item() < 0.03, name


def test_lowrank_dense_svd_init_is_the_balanced_truncated_svd_of_the_linear() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT, bias=False)
    layer = LowRankLinear.from_linear(linear, RANK, "dense_svd")
    u, s, vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
    torch.testing.assert_close(layer.effective_weight().detach().double(), (u[:, :RANK] * s[:RANK]) @ vh[:RANK],
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.linalg.svdvals(layer.B.detach().double()), s[:RANK].sqrt(), rtol=1e-5, atol=0)
    with pytest.raises(ConfigError, match="from_linear"):
        LowRankLinear(IN, OUT, RANK, "dense_svd")


def test_lora_zero_initial_a_and_dropout_validation() -> None:
    layer = LoRALinear(IN, OUT, RANK, initial_a="zero")
    assert not layer.A.any() and not layer.B.any()
    x = torch.randn(3, IN)
    torch.testing.assert_close(layer(x), x @ layer.weight.T)
    with pytest.raises(ConfigError, match="dropout"):
        LoRALinear(IN, OUT, RANK, dropout=1.0)
    with pytest.raises(ConfigError, match="initial A"):
        LoRALinear(IN, OUT, RANK, initial_a="orthogonal")
