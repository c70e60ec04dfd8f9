"""Benchmarks: smoke runs of every sub-benchmark (outputs, one record per method, ratio 1.0 for
full), FLOP counts against hand-computed values and torch's FlopCounterMode, the MFU formula.
No test looks at how long anything took."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rankscope.bench import make_config, run_benchmark
from rankscope.bench.common import add_ratios, rotated, run_alternating, select_methods
from rankscope.bench.flops import linear_flops, lookup_peak_tflops, mfu, model_flops
from rankscope.bench.train import period_setting, split_periodic
from rankscope.cli import main
from rankscope.errors import ConfigError, RankscopeError
from rankscope.models import LlamaConfig, build_model
from rankscope.nn import ColaLinear, LoRALinear, LowRankLinear, SparsePlusLowRankLinear

ONE_LAYER = {"num_layers": 1}


@pytest.fixture(autouse=True)
def one_thread():
    # LAPACK's SVD with 2 threads on a shared 2-core machine can take ~500x longer than with
    # one (threads spin while others hold the cores); one thread keeps the smoke runs short.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_outputs(out, name):
    payload = json.loads((out / f"{name}.json").read_text())
    with (out / f"{name}.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    png = (out / f"{name}.png").read_bytes()
    return payload, rows, png


def check_one_record_per_method(payload, rows, png, methods, ratio_key):
    records = payload["records"]
    assert [r["method"] for r in records] == methods
    assert [r["method"] for r in rows] == methods
    full = records[0]
    assert full[ratio_key] == pytest.approx(1.0)
    assert float(rows[0][ratio_key]) == pytest.approx(1.0)
    assert all(r[ratio_key] is not None and r[ratio_key] > 0 for r in records)
    assert png.startswith(PNG_MAGIC)


# ---------------------------------------------------------------------------------------------
# smoke runs


def test_train_bench_writes_records_for_each_method(tmp_path):
    result = run_benchmark("train", {
        "methods": "galore", "batch_size": 2, "seq_len": 16, "steps": 4, "warmup_steps": 1, "repeats": 1,
        "period": 2, "model_overrides": ONE_LAYER, "memory_steps": 1,
    }, out_dir=tmp_path, show=False)
    payload, rows, png = read_outputs(tmp_path, "train")
    check_one_record_per_method(payload, rows, png, ["full", "galore"], "step_s_ratio")
    full, galore = payload["records"]
    assert full["peak_memory_bytes_ratio"] == pytest.approx(1.0)
    # A fresh process per method on CPU; a one-layer model can peak no higher than the imports do.
    assert full["peak_memory_bytes"] >= full["idle_rss_bytes"] > 0
    # Same dense model: parameters equal; GaLore's moments live in the rank-r projection, plus
    # its projectors, so its optimizer state differs from AdamW's.
    assert galore["total_params"] == full["total_params"]
    assert galore["optimizer_state_bytes"] != full["optimizer_state_bytes"]
    assert galore["period_setting"] == "update_proj_gap" and galore["period_timed"] == 2
    assert galore["period_literature"] == 200
    assert galore["periodic_extra_s"] is not None and full["periodic_extra_s"] is None
    assert full["model_flops_per_token"] == galore["model_flops_per_token"] > 0
    assert full["mfu"] is None  # CPU without --peak-tflops: no peak to compare with
    # The cost of live training dynamics, amortized at the default train.dynamics_every.
    assert full["dynamics_period"] == 100 and full["dynamics_extra_s"] is not None
    assert full["dynamics_overhead"] == pytest.approx(full["dynamics_extra_s"] / (100 * full["step_s"]))
    assert result.files["png"].exists()


def test_train_bench_keeps_one_methods_model_alive_at_a_time(monkeypatch):
    """At 1B every method resident at once does not fit one GPU: each (method, repeat) is built,
    timed and freed before the next build, and the repeats still rotate the methods' order."""
    import gc
    import weakref

    from rankscope.bench import train as bench_train

    built, alive_at_build = [], []
    real_build = bench_train.build_method_run

    def counting_build(preset, method_name, *args, **kwargs):
        # No gc.collect here: a model kept only by a reference cycle would still hold its GPU
        # memory until the collector runs, so the benchmark must have collected it itself.
        alive_at_build.append(sum(ref() is not None for _, ref in built))
        run = real_build(preset, method_name, *args, **kwargs)
        built.append((method_name, weakref.ref(run.model)))
        return run

    monkeypatch.setattr(bench_train, "build_method_run", counting_build)
    result = run_benchmark("train", {
        "methods": "galore,loro", "batch_size": 2, "seq_len": 16, "steps": 2, "warmup_steps": 1, "repeats": 2,
        "period": 2, "model_overrides": ONE_LAYER, "memory": False,
    }, show=False)
    gc.collect()
    assert alive_at_build == [0] * 6
    # Interleaved: repeat 0 in order full, galore, loro; repeat 1 rotated.
    assert [name for name, _ in built] == ["full", "galore", "loro", "galore", "loro", "full"]
    assert all(ref() is None for _, ref in built)
    for record in result.records:  # both repeats' samples were kept, and the tensors were accounted
        assert record["timed_steps"] == 4 and record["optimizer_state_bytes"] > 0


def test_infer_bench_grid_and_summary(tmp_path):
    run_benchmark("infer", {"methods": "lowrank", "batch_sizes": [1, 2], "seq_lens": [8], "iters": 1,
                            "warmup": 1, "repeats": 1, "model_overrides": ONE_LAYER}, out_dir=tmp_path, show=False)
    payload, rows, png = read_outputs(tmp_path, "infer")
    check_one_record_per_method(payload, rows, png, ["full", "lowrank"], "latency_geomean_s_ratio")
    grid = payload["table_grid"]
    assert len(grid) == 4  # 2 methods x 2 batch sizes x 1 length
    assert all(r["latency_s_ratio"] == pytest.approx(1.0) for r in grid if r["method"] == "full")
    full, lowrank = payload["records"]
    assert full["form"] == "dense" and lowrank["form"] == "LowRankLinear"
    assert lowrank["params"] < full["params"]
    assert (tmp_path / "infer_grid.csv").exists()


def test_optimizer_bench_against_references(tmp_path):
    run_benchmark("optimizer", {"steps": 1, "warmup": 1, "repeats": 1, "refresh_steps": 1, "model_overrides": ONE_LAYER,
                                "loro_sizes": [16, 32], "loro_rank": 4}, out_dir=tmp_path, show=False)
    payload, rows, png = read_outputs(tmp_path, "optimizer")
    methods = ["full", "spam", "stable-spam", "galore", "galore-stacked", "galore-rsvd", "golore", "galore-ref", "fira", "fira-stacked", "fira-ref",
               "apollo", "apollo-stacked", "apollo-mini", "apollo-ref"]
    check_one_record_per_method(payload, rows, png, methods, "step_s_ratio")
    by_name = {r["method"]: r for r in payload["records"]}
    assert by_name["galore"]["ours_over_reference_step"] > 0
    assert by_name["galore"]["gap"] == 200 and by_name["galore-stacked"]["refresh_step_s"] is None
    # Same projected moments and projectors whoever implements them; ours also counts its step
    # counters (one fp32 tensor per parameter: 7 projections + 2 norms), the references' are ints.
    counters = 4 * 9
    assert by_name["galore"]["state_bytes"] == by_name["galore-ref"]["state_bytes"] + counters
    assert by_name["fira"]["state_bytes"] == by_name["fira-ref"]["state_bytes"] + counters
    # APOLLO holds GaLore's projected moments and projectors plus, per projected matrix, its int64
    # seed and the limiter's fp32 norm.
    assert by_name["apollo"]["state_bytes"] == by_name["galore"]["state_bytes"] + 7 * (8 + 4)
    assert by_name["apollo-mini"]["state_bytes"] < by_name["apollo"]["state_bytes"]
    # GoLore's random phase holds exactly GaLore's state: the draw is not stored.
    assert by_name["golore"]["state_bytes"] == by_name["galore"]["state_bytes"]
    assert by_name["golore"]["refresh_step_s"] is not None
    # SPAM keeps Adam's two full-size moments (plus fp32 counters); Stable-SPAM adds its running statistics.
    assert by_name["spam"]["state_bytes"] >= by_name["full"]["state_bytes"]
    assert by_name["stable-spam"]["state_bytes"] >= by_name["full"]["state_bytes"]
    assert by_name["galore"]["state_bytes"] < by_name["full"]["state_bytes"]
    # The floor: one row per family, Fira's with one more back-projection, and every projected
    # record divided by its own family's floor.
    floor = {r["family"]: r for r in payload["table_floor"]}
    assert floor["galore"]["back_projections"] == 1 and floor["fira"]["back_projections"] == 2
    assert floor["apollo"]["back_projections"] == 0
    for name in ("galore", "galore-ref", "fira", "fira-ref", "apollo", "apollo-ref"):
        family = name.split("-")[0]
        assert by_name[name]["floor_s"] == pytest.approx(floor[family]["adam_s"] + floor[family]["matmul_s"])
        assert by_name[name]["step_over_floor"] == pytest.approx(by_name[name]["step_s"] / by_name[name]["floor_s"])
    assert by_name["full"]["floor_s"] is None
    # Fira's full-size residual passes, timed alone, extend only Fira's floor.
    assert by_name["fira"]["floor_with_residual_s"] == pytest.approx(floor["fira"]["floor_s"] + floor["fira"]["residual_s"])
    assert by_name["apollo"]["floor_with_residual_s"] == pytest.approx(floor["apollo"]["floor_s"] + floor["apollo"]["residual_s"])
    assert "floor_with_residual_s" not in by_name["galore"]
    # On the CPU the process CPU time is kept next to the wall time, with its own floor ratio.
    assert by_name["galore"]["step_over_floor_cpu"] == pytest.approx(
        by_name["galore"]["step_cpu_s"] / by_name["galore"]["floor_cpu_s"])
    # The randomized refresh: one row per distinct shape (tiny: 128x128, 352x128, 128x352),
    # subspaces close to the exact one on a decaying spectrum, nearly all the energy kept.
    svd = payload["table_randomized_svd"]
    assert [(r["shape"], r["side"]) for r in svd] == [("128x128", "right"), ("352x128", "right"), ("128x352", "left")]
    assert all(0 <= r["subspace_distance_max"] < 0.5 and r["energy_kept_min"] > 0.99 for r in svd)
    loro = payload["table_loro_scaling"]
    assert [r["d"] for r in loro] == [16, 32]
    # The two retractions compute the same matrix: the benchmark compares equal work.
    assert all(r["relative_difference"] < 1e-4 for r in loro)
    assert (tmp_path / "optimizer_scaling.png").read_bytes().startswith(PNG_MAGIC)
    assert payload["meta"]["settings"]["plain_tensors"] == 2


def test_optimizer_bench_floor_parts_do_the_methods_arithmetic():
    """The floor's matmuls are the projection and back-projection the optimizers compute."""
    from rankscope.bench.optimizer import Floor, bench_tensors
    from rankscope.models import get_preset

    tensors = bench_tensors(dataclasses.replace(get_preset("tiny"), num_layers=1), seed=0, device=torch.device("cpu"))
    floor = Floor(tensors, rank=8, device=torch.device("cpu"))
    before = [w.clone() for w in floor.weights]
    floor.matmuls(back_projections=2)
    for index in (0, 4, 6):  # a square (right), a tall (right) and a wide (left) weight
        p, g, side = floor.projectors[index], tensors.grads[index], floor.sides[index]
        low = g @ p.T if side == "right" else p.T @ g
        back = low @ p if side == "right" else p @ low
        assert torch.allclose(floor.lows[index], low, atol=1e-9)
        assert torch.allclose(floor.weights[index] - before[index], -2 * 1e-3 * back, rtol=1e-3, atol=1e-8)
    assert [s for s in floor.sides[:7]] == ["right"] * 6 + ["left"]
    before = [w.clone() for w in floor.weights]
    floor.residual_passes()
    for index in (0, 6):  # phi scales rows (right projection) or columns (left projection)
        expected = tensors.grads[index] * floor.phis[index]
        assert torch.equal(floor.residuals[index], expected)
        assert torch.allclose(floor.weights[index] - before[index], -1e-3 * expected, rtol=1e-3, atol=1e-8)
    assert floor.phis[0].shape == (128, 1) and floor.phis[6].shape == (1, 352)


def test_optimizer_bench_gradients_have_the_decaying_spectrum():
    from rankscope.bench.optimizer import bench_tensors
    from rankscope.models import get_preset

    tensors = bench_tensors(dataclasses.replace(get_preset("tiny"), num_layers=1), seed=0, device=torch.device("cpu"))
    grad = tensors.grads[4]
    singular = torch.linalg.svdvals(grad)
    expected = 1.0 / torch.arange(1, singular.numel() + 1)
    assert torch.allclose(singular / singular[0], expected, rtol=1e-3, atol=1e-6)
    assert float(grad.square().mean().sqrt()) == pytest.approx(1e-3, rel=1e-4)
    # Two matrices of one shape: same spectrum, different singular vectors.
    assert not torch.allclose(tensors.grads[4], tensors.grads[5])


def test_analysis_bench_point_costs(tmp_path):
    run_benchmark("analysis", {"methods": "lowrank", "probe_sequences": 2, "seq_len": 8, "batch_size": 2,
                               "repeats": 1, "point_repeats": 1, "model_overrides": ONE_LAYER},
                  out_dir=tmp_path, show=False)
    payload, rows, png = read_outputs(tmp_path, "analysis")
    check_one_record_per_method(payload, rows, png, ["full", "lowrank"], "landscape_point_s_ratio")
    full, lowrank = payload["records"]
    assert full["spectral_rows_per_s_ratio"] == pytest.approx(1.0)
    # One layer, 7 projections, native and merged W alike: 10 metrics per W and 11 per dW, per
    # matrix plus the means, and 3 pooled numbers per dW.
    assert full["spectral_rows"] == 2 * ((7 + 1) * 10 + (7 + 1) * 11 + 3)
    assert lowrank["spectral_rows"] > full["spectral_rows"]  # factors A and B add rows
    assert full["landscape_over_forward"] > 0


def test_cli_bench_rejects_unknown_method(capsys):
    assert main(["bench", "train", "--methods", "gallore"]) == 2
    assert "did you mean 'galore'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# FLOPs and MFU

TINY = LlamaConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_heads=2, num_layers=1)


def test_dense_model_flops_by_hand():
    flops = model_flops(build_model(TINY), batch_size=1, seq_len=4)
    # Multiply-adds per token: q,k,v,o 4*8*8 + gate,up 2*8*16 + down 16*8 + lm_head 8*64 = 1152.
    assert flops.forward_per_token == pytest.approx(2 * 1152 + 4 * 4 * 8)  # + attention 4*T*d per token
    assert flops.forward == 2 * 1152 * 4 + 4 * 1 * 4 * 4 * 8
    assert flops.backward == 2 * flops.forward  # input and weight gradients of every matmul
    assert flops.training_per_token == pytest.approx(6 * 1152 + 12 * 4 * 8)


def test_lowrank_layer_in_model_flops_by_hand():
    model = build_model(TINY)
    attention = model.layers[0].self_attn
    attention.q_proj = LowRankLinear(8, 8, rank=2)
    flops = model_flops(model, batch_size=1, seq_len=4)
    # q: 8*8 multiply-adds per token become 2*(8+8) through the rank-2 bottleneck.
    assert flops.forward == 2 * (1152 - 64 + 32) * 4 + 4 * 4 * 4 * 8
    layer = linear_flops(LowRankLinear(8, 16, rank=2), tokens=5)
    assert (layer.forward, layer.backward) == (2 * 5 * 2 * 24, 4 * 5 * 2 * 24)


def test_frozen_lora_weight_has_no_weight_gradient_flops():
    base = nn.Linear(8, 16, bias=False)
    layer = linear_flops(LoRALinear.from_linear(base, rank=2), tokens=3)
    assert layer.forward == 2 * 3 * 8 * 16 + 2 * 3 * 2 * 24
    assert layer.backward == 2 * 3 * 8 * 16 + 4 * 3 * 2 * 24


@pytest.mark.parametrize("tokens", [3, 40])
@pytest.mark.parametrize("kind", ["linear", "lowrank", "lora", "cola", "sltrain"])
def test_layer_flops_match_torch_flop_counter(kind, tokens):
    base = nn.Linear(12, 20, bias=False)
    layer = {
        "linear": lambda: base,
        "lowrank": lambda: LowRankLinear(12, 20, rank=3),
        "lora": lambda: LoRALinear.from_linear(base, rank=3),
        "cola": lambda: ColaLinear.from_linear(base, rank=3),
        "sltrain": lambda: SparsePlusLowRankLinear.from_linear(base, rank=3, density=0.1),
    }[kind]()
    counted = linear_flops(layer, tokens)
    x = torch.randn(tokens, 12, requires_grad=True)
    with FlopCounterMode(display=False) as forward:
        y = layer(x)
    with FlopCounterMode(display=False) as backward:
        y.sum().backward()
    assert counted.forward == forward.get_total_flops()
    assert counted.backward == backward.get_total_flops()


def test_mfu_formula_and_peak_lookup():
    # 6e9 FLOPs per token at 1e5 tokens/s on a 989.5 TFLOP/s device.
    assert mfu(6e9, 1e5, 989.5) == pytest.approx(6e14 / 989.5e12)
    with pytest.raises(ConfigError):
        mfu(1.0, 1.0, 0.0)


# torch.cuda.get_device_name() strings of real cards -> dense bf16 peak (None: not in the table).
DEVICE_PEAKS = [
    ("NVIDIA H100 80GB HBM3", 989.5),
    ("NVIDIA H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.5),
    ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA GH200 480GB", 989.5),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-SXM4-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA L40", 181.05),   # not the L4's 121 (a substring match took "L4" for it)
    ("NVIDIA L40S", 362.05),
    ("NVIDIA A10", 125.0),
    ("NVIDIA A10G", 70.0),    # not the A10's 125
    ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA GeForce RTX 3090", None),
    ("Tesla T4", None),
    ("NVIDIA A40", None),     # neither an A4 nor an A100
]


@pytest.mark.parametrize("name,peak", DEVICE_PEAKS, ids=[name for name, _ in DEVICE_PEAKS])
def test_peak_lookup_matches_whole_model_names(name, peak):
    assert lookup_peak_tflops(name) == peak


# ---------------------------------------------------------------------------------------------
# helpers


def test_rotated_order_puts_every_method_in_every_slot():
    names = ["full", "a", "b"]
    orders = [rotated(names, r) for r in range(3)]
    for slot in range(3):
        assert sorted(order[slot] for order in orders) == sorted(names)
    calls = []
    run_alternating(names, 2, lambda name, repeat: calls.append((repeat, name)))
    assert calls == [(0, "full"), (0, "a"), (0, "b"), (1, "a"), (1, "b"), (1, "full")]


def test_ratios_to_full_and_method_selection():
    records = [{"method": "lowrank", "t": 3.0}, {"method": "full", "t": 2.0}, {"method": "x", "t": None}]
    add_ratios(records, ["t"])
    assert [r["t_ratio"] for r in records] == [1.5, 1.0, None]
    assert select_methods("lowrank,galore")[0] == "full"
    assert select_methods("galore,full,galore") == ["full", "galore"]
    with pytest.raises(RankscopeError):
        select_methods("lorro")


def test_periodic_phase_is_found_from_the_step_times():
    # Steps 1, 4, 7, ... carry 0.5 s of periodic work on top of a 0.1 s step.
    samples = [{"step": s, "total": 0.1 + (0.5 if s % 3 == 1 else 0.0)} for s in range(12)]
    steady, periodic, phase = split_periodic(samples, 3)
    assert phase == 1 and len(periodic) == 4 and len(steady) == 8
    assert all(math.isclose(s["total"], 0.1) for s in steady)
    assert split_periodic(samples, None) == (samples, [], None)


def test_period_setting_and_config_plumbing():
    from rankscope import methods
    from rankscope.models import get_preset

    galore = methods.get("galore").default_settings("tiny", get_preset("tiny"))
    assert period_setting(galore) == ("update_proj_gap", galore.update_proj_gap)
    assert period_setting(methods.get("full").Settings()) is None
    config = make_config("infer", {"methods": "full", "iters": None})
    assert config.methods == "full" and config.iters == 5  # None skipped: the config's default applies
    # A key the benchmark does not have is an error, never silently dropped.
    with pytest.raises(ConfigError, match="bench infer has no setting 'steps'"):
        make_config("infer", {"methods": "full", "steps": 9})


@pytest.mark.parametrize("argv", [
    ["infer", "--steps", "999"], ["infer", "--period", "7"], ["gpu", "--budget-s", "1", "--repeats", "2"],
    ["optimizer", "--methods", "galore"], ["all", "--iters", "2"], ["train", "--probe-sequences", "4"],
])
def test_cli_bench_flag_that_does_not_apply_is_an_argparse_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_cli_bench_flags_are_fields_of_their_benchmark_config():
    from rankscope.bench import _config_class
    from rankscope.cli import bench as cli_bench
    from rankscope.cli._fields import dataclass_fields

    for flag in cli_bench.FLAGS:
        for name in flag.texts:
            for bench in (cli_bench.ALL if name == "all" else (name,)):
                fields = {f.name: f for f in dataclasses.fields(_config_class(bench))}
                if name == "all" and flag.field == "methods" and bench == "optimizer":
                    continue  # `all` passes --methods to the benchmarks that take it
                assert flag.field in fields, (flag.flag, bench)
    # The defaults the help shows are the dataclasses' own.
    for bench, (module, cls) in cli_bench.CONFIGS.items():
        real = _config_class(bench)
        read = dataclass_fields(module, cls)
        assert list(read) == [f.name for f in dataclasses.fields(real)]
        for f in dataclasses.fields(real):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert read[f.name].default == default, (bench, f.name)
