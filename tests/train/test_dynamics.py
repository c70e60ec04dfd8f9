"""Live training dynamics: spectral norms by power iteration against dense SVD norms, the loss-spike
detector on a synthetic curve, and the monitor inside real tiny runs."""

import copy
import json

import pytest
import torch
from torch import nn

from rankscope.config import build_config
from rankscope.errors import ConfigError
from rankscope.nn import LoRALinear, LowRankLinear, SparsePlusLowRankLinear
from rankscope.train import checkpoint as ckpt
from rankscope.train.dynamics import DynamicsMonitor, SpikeDetector
from rankscope.train.trainer import train
from rankscope.train.update_spectra import (
    as_operator,
    current,
    snapshot,
    spectral_norm,
    spectral_norms,
    stack,
    update_operator,
    weight_operator,
)


def _exact(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix.double(), ord=2))


def _adam_like_update(weight_shape, lr, generator):
    """lr · m/(√v + eps) for a gradient with a few dominant directions, as Adam's first steps give."""
    m, n = weight_shape
    grad = torch.randn(m, 8, generator=generator) @ torch.randn(8, n, generator=generator)
    grad = 1e-3 * (grad + 0.2 * torch.randn(m, n, generator=generator))
    return lr * grad / (grad.abs() + 1e-8)


@pytest.mark.parametrize("lr", [1e-5, 1e-4, 1e-3, 1e-2])
def test_power_iteration_matches_matrix_norm_on_dense_updates(lr):
    g = torch.Generator().manual_seed(1)
    weight = 0.02 * torch.randn(352, 128, generator=g)
    update = _adam_like_update(weight.shape, lr, g)
    layer = nn.Linear(128, 352, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    before = snapshot(layer)
    with torch.no_grad():
        layer.weight.add_(update)
    sigma_dw, _ = spectral_norm(update_operator(layer, before, current(layer)), generator=g)
    sigma_w, _ = spectral_norm(weight_operator(layer, current(layer)), generator=g)
    assert sigma_dw == pytest.approx(_exact(layer.weight.detach().double() - weight.double()), rel=2e-3)
    assert sigma_w == pytest.approx(_exact(layer.weight.detach()), rel=2e-3)


def test_power_iteration_on_a_flat_gaussian_spectrum_and_zero():
    g = torch.Generator().manual_seed(2)
    matrix = 1e-4 * torch.randn(200, 300, generator=g)  # σ₂/σ₁ close to 1: the slow case
    sigma, _ = spectral_norm(matrix, iters=60, tol=1e-7, generator=g)
    assert sigma == pytest.approx(_exact(matrix), rel=2e-3)
    assert spectral_norm(torch.zeros(5, 7), generator=g)[0] == 0.0


def _factored_layers(g):
    low = LowRankLinear(96, 160, rank=16, generator=g)
    lora = LoRALinear(96, 160, rank=16, alpha=32.0, generator=g)
    sparse = SparsePlusLowRankLinear(96, 160, rank=16, alpha=32.0, density=0.05, generator=g)
    with torch.no_grad():
        lora.B.normal_(0, 0.02, generator=g)
        sparse.B.normal_(0, 0.02, generator=g)
    return {"lowrank": low, "lora": lora, "sltrain": sparse}


def _weight_f64(layer) -> torch.Tensor:
    return copy.deepcopy(layer).double().effective_weight().detach()


@pytest.mark.parametrize("kind", ["lowrank", "lora", "sltrain"])
@pytest.mark.parametrize("lr", [1e-6, 1e-5, 1e-3, 1e-2])
def test_factored_update_norm_matches_the_dense_difference(kind, lr):
    """ΔW of a factored layer is applied through its factors, ΔB·A' + B·ΔA: an update 1e-6 the
    size of the factors (a cosine tail) is measured to 1e-4, where B'A' − BA in float32 would
    lose ~1e-3 to cancellation."""
    g = torch.Generator().manual_seed(3)
    layer = _factored_layers(g)[kind]
    w_before = _weight_f64(layer)
    before = snapshot(layer)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(_adam_like_update(p.shape, lr, g) if p.dim() == 2 else lr * torch.sign(torch.randn(p.shape, generator=g)))
    after = current(layer)
    sigma, _ = spectral_norm(update_operator(layer, before, after), generator=g)
    assert sigma == pytest.approx(_exact(_weight_f64(layer) - w_before), rel=1e-4)
    sigma_w, _ = spectral_norm(weight_operator(layer, after), generator=g)
    assert sigma_w == pytest.approx(_exact(_weight_f64(layer)), rel=3e-3)


def test_a_batch_of_layers_gives_each_its_own_norm():
    """Layers of one structure are stacked and iterated together (sparse terms included): each
    map's σ₁ must be its own, exactly as measured alone."""
    g = torch.Generator().manual_seed(7)
    layers = [SparsePlusLowRankLinear(48, 80, rank=8, alpha=16.0, density=0.1, generator=g) for _ in range(3)]
    ops = []
    for scale, layer in zip((1.0, 10.0, 0.1), layers):
        with torch.no_grad():
            layer.B.normal_(0, 0.05 * scale, generator=g)
            layer.sparse_values.mul_(scale)
        ops.append(weight_operator(layer, current(layer)))
    batched, _ = spectral_norms(stack(ops), iters=60, tol=1e-8, generator=g)
    alone = [_exact(_weight_f64(layer)) for layer in layers]
    assert batched.tolist() == pytest.approx(alone, rel=1e-4)
    # The batch stops only when every map has converged: the rank-1 first one converges at once.
    dense = torch.randn(4, 60, 40, generator=g) * torch.tensor([1.0, 1e-3, 5.0, 1e-2])[:, None, None]
    dense[0] = torch.outer(torch.randn(60, generator=g), torch.randn(40, generator=g))
    batched, _ = spectral_norms(as_operator(dense), generator=g)
    assert batched.tolist() == pytest.approx([_exact(m) for m in dense], rel=1e-3)


def test_lora_merge_is_not_an_update():
    """ReLoRA's merge moves s·B·A into W0 and restarts the factors: W, hence ΔW, is unchanged."""
    g = torch.Generator().manual_seed(4)
    layer = _factored_layers(g)["lora"]
    before = snapshot(layer)
    layer.merge_and_reinit(generator=g)
    sigma, _ = spectral_norm(update_operator(layer, before, current(layer)), generator=g)
    assert sigma < 1e-6 * _exact(layer.effective_weight().detach())


def test_spike_detector_on_a_synthetic_loss_curve():
    g = torch.Generator().manual_seed(5)
    steps = torch.arange(1, 401, dtype=torch.float64)
    curve = 3.0 + 6.0 * torch.exp(-steps / 60.0) + 0.03 * torch.randn(400, generator=g, dtype=torch.float64)
    spikes_at = {150: 1.6, 151: 1.35, 300: 1.25}  # multiplicative jumps; 151 is the spike's tail
    detector = SpikeDetector(factor=1.2, window=50)
    found = {}
    for step, loss in enumerate(curve.tolist(), start=1):
        result = detector.observe(loss * spikes_at.get(step, 1.0))
        if result is not None:
            found[step] = result
    assert sorted(found) == [150, 151, 300]
    # The median is taken over the 50 losses before the spike (steps 100..149), as observed.
    median = float(curve[99:149].sort().values[24:26].mean())  # statistics.median of an even count
    assert found[150]["median"] == pytest.approx(median, rel=1e-12)
    assert found[150]["ratio"] == pytest.approx(1.6 * float(curve[149]) / median, rel=1e-12)
    # A fast early fall of the loss is never a spike, and nothing is flagged before half a
    # window of history exists.
    early = SpikeDetector(factor=1.2, window=10)
    assert [early.observe(loss) for loss in (9.0, 8.0, 7.5, 7.0, 20.0)] == [None] * 5
    assert early.observe(20.0) is not None
    assert SpikeDetector(1.2, 50).observe(float("nan")) is None


def _tiny(tiny_overrides, method, *extra):
    return build_config({}, tiny_overrides + [f"method.name={method}", *extra])


@pytest.mark.parametrize("method,weight_of", [
    ("full", lambda s, n: s[f"{n}.weight"]),
    ("lowrank", lambda s, n: s[f"{n}.B"] @ s[f"{n}.A"]),
])
def test_logged_update_norms_equal_the_checkpoint_difference(tmp_path, tiny_overrides, method, weight_of):
    """End to end: ‖ΔW‖₂ logged at step 4 equals the dense SVD norm of W(4) − W(3) read back from
    the checkpoints, and ‖W‖₂ that of W(4)."""
    cfg = _tiny(tiny_overrides, method, "train.steps=4", "train.checkpoint_steps=[3]", "train.dynamics_every=4")
    train(cfg, tmp_path / "run")
    states = {c.step: {k: v.double() for k, v in ckpt.load_model_state(c.path).items()}
              for c in ckpt.list_checkpoints(tmp_path / "run")}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in records if r["step"] == 4)["dynamics"]
    assert logged["trigger"] == "period"
    assert len(logged["matrices"]) == 2 * 7
    for name in ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"):
        update = weight_of(states[4], name) - weight_of(states[3], name)
        row = logged["matrices"][name]
        assert row["dW"] == pytest.approx(_exact(update), rel=5e-3)
        assert row["W"] == pytest.approx(_exact(weight_of(states[4], name)), rel=5e-3)
        assert row["ratio"] == pytest.approx(row["dW"] / row["W"])
    assert logged["max_update_norm"] == max(r["dW"] for r in logged["matrices"].values())
    assert all(g["grad_norm"] > 0 and g["lr"] > 0 for g in logged["groups"].values())


def test_measuring_never_changes_training(tmp_path, tiny_overrides):
    on = train(_tiny(tiny_overrides, "relora", "train.steps=8", "train.dynamics_every=1",
                     "method.reset_every=4", "method.restart_warmup=2"), tmp_path / "on")
    off = train(_tiny(tiny_overrides, "relora", "train.steps=8", "train.dynamics_every=0",
                      "method.reset_every=4", "method.restart_warmup=2"), tmp_path / "off")
    assert on["val_loss"] == off["val_loss"]
    losses = [{r["step"]: r.get("loss") for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())}
              for run in ("on", "off")]
    assert {step: losses[0][step] for step in losses[1]} == losses[1]
    on_records = [json.loads(line) for line in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in on_records if "dynamics" in r] == list(range(1, 9))
    assert not any("dynamics" in json.loads(line) for line in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines())


def test_a_spike_names_the_matrices_whose_update_jumped():
    """Synthetic run: random gradients, SGD whose lr warms up linearly (so raw update norms grow
    5x over the run, which is not a jump), a loss spike at step 33 whose update moves two
    matrices 50x and 20x more than usual."""
    from rankscope.config import TrainConfig
    from rankscope.models import LlamaConfig, build_model

    torch.manual_seed(0)
    model = build_model(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=2, num_layers=2))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    monitor = DynamicsMonitor(model, optimizer, TrainConfig(dynamics_every=5, spike_factor=1.2, spike_window=20))
    g = torch.Generator().manual_seed(6)
    jumps = {"layers.1.mlp.up_proj": (model.layers[1].mlp.up_proj.weight, 50.0),
             "layers.0.self_attn.k_proj": (model.layers[0].self_attn.k_proj.weight, 20.0)}
    spikes = []
    rng_before = torch.get_rng_state()
    for step in range(1, 41):
        optimizer.param_groups[0]["lr"] = 1e-4 * step
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 1e-2
        loss = 2.0 + 0.01 * (step % 3) + (1.5 if step == 33 else 0.0)
        monitor.before_update(step, torch.tensor(loss))
        optimizer.step()
        if step == 33:
            with torch.no_grad():
                for weight, factor in jumps.values():
                    weight.add_(factor * 1e-4 * step * 1e-2 * torch.randn(weight.shape, generator=g))
        out = monitor.after_update(step)
        if step % 5 == 0:
            assert out["dynamics"]["trigger"] == "period"
        if "spike" in out:
            spikes.append((step, out))
    assert torch.equal(torch.get_rng_state(), rng_before)  # measuring draws from its own generator
    assert [s for s, _ in spikes] == [33]
    out = spikes[0][1]
    assert out["dynamics"]["trigger"] == "spike"  # measured at the spike although 33 is off-period
    assert out["spike"]["ratio"] == pytest.approx(3.5 / 2.01, rel=0.01)
    named = [m["matrix"] for m in out["spike"]["matrices"]]
    assert named == ["layers.1.mlp.up_proj", "layers.0.self_attn.k_proj"]
    assert out["spike"]["matrices"][0]["jump"] > out["spike"]["matrices"][1]["jump"] > 5


def test_tensorboard_gets_the_dynamics(tmp_path, tiny_overrides):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_tiny(tiny_overrides, "lowrank", "train.steps=4", "train.dynamics_every=2", "train.tensorboard=true"),
          tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"dynamics/max_update_norm", "dynamics/grad_norm/targeted", "dynamics/dW/layers.0.self_attn.q_proj"} <= tags
    assert [e.step for e in events.Scalars("dynamics/max_update_norm")] == [2, 4]


@pytest.mark.parametrize("setting,message", [
    ("train.dynamics_every=-1", "dynamics_every"),
    ("train.spike_factor=1.0", "spike_factor"),
    ("train.spike_window=1", "spike_window"),
    ("train.dynamics_power_iters=0", "dynamics_power_iters"),
])
def test_bad_dynamics_settings_are_refused(setting, message):
    with pytest.raises(ConfigError, match=message):
        build_config({}, [setting])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["full", "lowrank", "sltrain", "lora"])
def test_a_measured_step_holds_little_more_than_its_snapshot(method, dtype):
    """A measured step must keep a copy of the targeted tensors from before the update (in their
    own dtype) and the power iteration's vectors (k = 8 per matrix and label, kept to warm-start
    the next measurement), and little else: every product widens one matrix at a time to fp32, so
    the bytes torch allocates beyond those stay below half the fp32 size of the targeted tensors.
    fp32 copies of every weight and update, stacked per shape, took 2.8x (fp32) to 7.7x
    (SLTrain, bf16-pure) that size in all."""
    from helpers import build_tiny_method
    from memory_probe import cpu_bytes
    from rankscope.config import TrainConfig
    from rankscope.models import iter_target_linears

    _, model, _, _ = build_tiny_method(method)
    model.to(dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1e-3)
    g = torch.Generator().manual_seed(8)
    for p in trainable:
        p.grad = (1e-2 * torch.randn(p.shape, generator=g)).to(dtype)
    steps = {p: (1e-3 * torch.randn(p.shape, generator=g)).to(dtype) for p in trainable}
    tensors = [t for _, _, _, layer in iter_target_linears(model) for t in [*layer.parameters(), *layer.buffers()]]
    snapshot_bytes = sum(t.numel() * t.element_size() for t in tensors)
    fp32_bytes = sum(t.numel() * 4 for t in tensors if t.is_floating_point())
    # A few power iterations: the peak is reached in the first, and the profiler slows each op.
    monitor = DynamicsMonitor(model, optimizer, TrainConfig(dynamics_every=1, dynamics_power_iters=3))

    def measured_step():
        monitor.before_update(1, torch.tensor(3.0))
        with torch.no_grad():  # the update, in place: it allocates nothing itself
            for p in trainable:
                p.add_(steps[p])
        return monitor.after_update(1)

    measured = cpu_bytes(measured_step)
    assert measured.result["dynamics"]["max_update_norm"] > 0
    vector_bytes = sum(v.numel() * v.element_size() for v in monitor.vectors.values())
    assert measured.peak >= snapshot_bytes + vector_bytes  # the probe sees what must be held
    assert measured.peak - snapshot_bytes - vector_bytes < 0.5 * fp32_bytes
