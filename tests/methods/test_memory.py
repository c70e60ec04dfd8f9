"""Memory accounting: hand-computed counts, the materialisation step, and the methods table."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from rankscope import methods
from rankscope.cli import main
from rankscope.errors import ConfigError, RankscopeError
from rankscope.methods.base import ResolvedOptim
from rankscope.methods.memory_accounting import (
    account_memory,
    dense_activation_bytes,
    flash_attention_kernel,
    saved_activation_bytes,
)
from rankscope.methods.memory_table import (
    PUBLISHED_LORO_TABLE1,
    materialize_optimizer_state,
    measure_method,
    memory_table,
    print_memory_table,
    training_estimate,
    training_memory_table,
)
from rankscope.models import build_model, get_preset
from rankscope.optim import GaLoreAdamW, LoroAdamW, SpectronAdamW


def _tiny_model():
    torch.manual_seed(0)
    return build_model(dataclasses.replace(get_preset("tiny"), num_layers=2))


def test_full_adamw_holds_two_floats_of_state_per_parameter():
    model = _tiny_model()
    n = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    materialize_optimizer_state(model, optimizer)
    m = account_memory(model, optimizer)
    assert m["total_params"] == m["trainable_params"] == n and m["frozen_params"] == 0
    assert m["param_bytes"] == 4 * n
    assert m["optimizer_state_elements"] == 2 * n
    assert m["optimizer_state_projector_elements"] == 0
    # every tensor counted in the measured bytes: two fp32 moments plus one fp32 step per parameter
    n_tensors = len(list(model.parameters()))
    assert m["optimizer_state_bytes"] == 4 * 2 * n + 4 * n_tensors
    assert m["estimated_weight_bytes"] == 2 * n
    assert m["estimated_memory_bytes"] == 2 * (n + 2 * n) == m["estimated_memory_bytes_without_projectors"]


def test_frozen_weights_count_as_weights_but_carry_no_state():
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 4, bias=True))
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    materialize_optimizer_state(model, optimizer)
    m = account_memory(model, optimizer)
    assert (m["total_params"], m["trainable_params"], m["frozen_params"]) == (54, 24, 30)
    assert m["optimizer_state_elements"] == 2 * 24
    assert m["estimated_memory_bytes"] == 2 * (54 + 48)


@pytest.mark.parametrize(("shape", "side_elements"), [((12, 8), 3 * 8), ((8, 12), 8 * 3)])
def test_galore_state_is_moments_in_the_projected_space_plus_the_projector(shape, side_elements):
    weight = nn.Parameter(torch.randn(*shape))
    holder = nn.Module()
    holder.weight = weight
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 3, "update_proj_gap": 10}], lr=0.01)
    materialize_optimizer_state(holder, optimizer)
    m = account_memory(holder, optimizer)
    # std projection onto the short side: moments are max(m, n) x r each, projector min(m, n) x r
    assert m["optimizer_state_elements"] == 2 * 12 * 3 + side_elements
    assert m["optimizer_state_projector_elements"] == side_elements


def test_loro_and_spectron_state_counts():
    model = nn.Module()
    model.B = nn.Parameter(torch.randn(10, 2))
    model.A = nn.Parameter(torch.randn(2, 7))
    model.norm = nn.Parameter(torch.ones(7))
    loro = LoroAdamW([{"params": [model.B, model.A], "factor_pairs": True, "exact_every": 5},
                      {"params": [model.norm]}], lr=0.01)
    materialize_optimizer_state(model, loro)
    # Adam moments on the factors and the plain parameter; LORO's counters are scalars.
    assert account_memory(model, loro)["optimizer_state_elements"] == 2 * (20 + 14 + 7)
    spectron = SpectronAdamW([{"params": [model.B, model.A], "factor_pairs": True}, {"params": [model.norm]}], lr=0.01)
    materialize_optimizer_state(model, spectron)
    # one momentum per factor + a power-iteration vector on each factor's long side (10 and 7,
    # as NVIDIA's) + AdamW's two moments for the norm
    assert account_memory(model, spectron)["optimizer_state_elements"] == (20 + 14) + (10 + 7) + 2 * 7


@pytest.mark.parametrize("name", ["full", "galore", "fira", "loro", "spectron"])
def test_materialising_the_state_leaves_the_weights_untouched(name):
    cls = methods.get(name)
    cfg = dataclasses.replace(get_preset("tiny"), num_layers=2)
    method = cls(cls.default_settings("tiny", cfg), cfg, "tiny")
    torch.manual_seed(0)
    model = method.parameterize(build_model(cfg))
    d = cls.optim_defaults("tiny")
    optimizer = method.build_optimizer(model, ResolvedOptim(d.lr, d.weight_decay, (0.9, 0.999), d.eps, d.grad_clip, 10, 1, 0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lrs = [g["lr"] for g in optimizer.param_groups]
    materialize_optimizer_state(model, optimizer)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [g["lr"] for g in optimizer.param_groups] == lrs
    assert len(optimizer.state) == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["galore", "fira"])
def test_projector_prefill_has_exactly_the_sizes_of_the_svd_path(name):
    cls = methods.get(name)
    fast = measure_method(cls, "tiny", skip_svd=True, mode="measured")
    exact = measure_method(cls, "tiny", skip_svd=False, mode="measured")
    assert fast == exact
    assert fast["optimizer_state_projector_elements"] > 0


def test_shapes_on_the_meta_device_count_exactly_what_real_tensors_hold():
    """Every method, every count and byte: the meta-device table is the measured one."""
    for name in methods.names():
        cls = methods.get(name)
        assert measure_method(cls, "tiny", mode="shapes") == measure_method(cls, "tiny", mode="measured"), name


def test_memory_table_at_7b_from_shapes_with_progress():
    from rankscope.models import count_parameters

    lines = []
    rows = memory_table("7b", ["full", "galore"], progress=lines.append)
    full, galore = rows
    assert full["total_params"] == count_parameters(get_preset("7b"))
    assert full["optimizer_state_elements"] == 2 * full["total_params"]
    assert galore["optimizer_state_projector_elements"] > 0
    assert galore["optimizer_state_elements"] < full["optimizer_state_elements"]
    assert len(lines) == 4 and lines[0].startswith("[1/2] full at 7b") and "done in" in lines[1]
    assert all(r["seconds"] >= 0 for r in rows)


def test_memory_table_rejects_unknown_names_before_any_work():
    with pytest.raises(RankscopeError, match="did you mean 'galore'"):
        memory_table("350m", ["full", "gallore"])
    with pytest.raises(ConfigError, match="memory mode"):
        memory_table("tiny", ["full"], mode="guess")


def test_cli_memory_table_at_a_large_preset(capsys):
    assert main(["methods", "--memory", "--preset", "7b", "--methods", "lowrank"]) == 0
    out = capsys.readouterr().out
    assert "lowrank" in out and "meta device" in out
    assert main(["methods", "--memory", "--preset", "tiny", "--methods", "full", "--measured"]) == 0
    captured = capsys.readouterr()
    assert "Measured on real tensors" in captured.out and "[1/1] full at tiny (measured)" in captured.err


def test_memory_table_covers_every_method_at_tiny(capsys):
    names = methods.names()
    rows = memory_table("tiny", names)
    assert [r["method"] for r in rows] == names
    by_name = {r["method"]: r for r in rows}
    missing = [n for n, r in by_name.items() if "error" in r]
    assert not missing, missing
    full = by_name["full"]
    for low_rank in ("loro", "lowrank"):
        assert by_name[low_rank]["total_params"] < full["total_params"]
        assert by_name[low_rank]["estimated_memory_bytes"] < full["estimated_memory_bytes"]
    # GaLore keeps the dense weights but less optimizer state than full AdamW.
    assert by_name["galore"]["total_params"] == full["total_params"]
    assert by_name["galore"]["optimizer_state_elements"] < full["optimizer_state_elements"]
    assert all("published_mem_gb" not in r for r in rows)  # no published numbers for tiny
    print_memory_table(rows, "tiny")
    assert "loro" in capsys.readouterr().out


def test_published_table_matches_the_full_model_sizes():
    # LORO Table 1 counts parameters in millions: the dense presets must agree to rounding.
    for preset, table in PUBLISHED_LORO_TABLE1.items():
        n = sum(p.numel() for p in _count_only(preset))
        assert abs(n / 1e6 - table["full"][0]) < 1.0, preset


def _count_only(preset):
    """Parameter shapes of the dense preset without allocating its weights."""
    with torch.device("meta"):
        return list(build_model(get_preset(preset)).parameters())


# ------------------------------------------------------------------------- training estimate
class _RetainedStorages(TorchDispatchMode):
    """Every storage an op creates, as a weak reference: after the forward, the live ones (minus the
    weights) are the memory the backward is waiting for, whoever holds them (autograd's saved
    tensors, a checkpoint's kept inputs). Independent of the saved-tensor hooks it checks."""

    def __init__(self):
        super().__init__()
        self.storages = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def live_bytes(self, exclude):
        return sum(n for ptr, (ref, n) in self.storages.items() if not ref.expired() and ptr not in exclude)


def _retained_after_forward(model, ids) -> int:
    from rankscope.models import token_losses

    with flash_attention_kernel(), _RetainedStorages() as mode:
        loss = token_losses(model, ids).mean()
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), loss)}
    return mode.live_bytes(weights)


# (layers, batch, tokens): the coefficients of h, f, n, V, L, B and T all vary between cases.
ACTIVATION_CASES = [(1, 2, 64), (3, 3, 40), (2, 1, 48)]  # one sequence: its targets are a view of its ids


@pytest.mark.parametrize("layers,batch,tokens", ACTIVATION_CASES)
def test_activation_bytes_are_the_llama_formula_and_what_autograd_retains(layers, batch, tokens):
    """bf16-pure dense LLaMA on the CPU (whose SDPA is the flash kernel, saving what the GPU's does):
    the saved-tensor count equals the formula from the block's code, byte for byte, and equals the
    storages left alive after the forward; with activation checkpointing the ones left alive are
    the block inputs and what lives outside the blocks."""
    cfg = dataclasses.replace(get_preset("tiny"), num_layers=layers)
    torch.manual_seed(0)
    model = build_model(cfg).to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (batch, tokens))
    counted = saved_activation_bytes(model, ids)
    formula = dense_activation_bytes(cfg, batch, tokens)
    assert counted["total"] == formula["total"]
    assert counted["blocks"] == [formula["block"]] * layers
    assert counted["outside"] + counted["block_inputs"] == formula["checkpointed"]
    assert _retained_after_forward(model, ids) == counted["total"]
    model.activation_checkpointing = True
    assert _retained_after_forward(model, ids) == formula["checkpointed"]


def test_activation_count_on_the_meta_device_is_the_real_one_for_every_method():
    cfg = dataclasses.replace(get_preset("tiny"), num_layers=2)
    for name in methods.names():
        cls = methods.get(name)
        counts = []
        for device in ("cpu", "meta"):
            torch.manual_seed(0)
            with torch.device(device):
                model = cls(cls.default_settings("tiny", cfg), cfg, "tiny").parameterize(build_model(cfg))
            counts.append(saved_activation_bytes(model.to(torch.bfloat16),
                                                 torch.randint(0, cfg.vocab_size, (2, 32), device=device)))
        assert counts[0] == counts[1], name


@pytest.mark.parametrize("name", ["full", "galore", "lora", "spectron"])
@pytest.mark.parametrize("state_dtype", ["fp32", "param"])
def test_training_estimate_is_what_a_real_bf16_pure_step_holds(name, state_dtype):
    """The estimate's weights, gradients and optimizer state are the bytes of a real bf16-pure
    training step's tensors (SVD refreshes included) on the same model."""
    from rankscope.models import token_losses

    estimate = training_estimate(methods.get(name), "tiny", micro_batch=2, seq_len=32, gpus=4, state_dtype=state_dtype)
    cls = methods.get(name)
    cfg = get_preset("tiny")
    method = cls(cls.default_settings("tiny", cfg), cfg, "tiny")
    torch.manual_seed(0)
    model = method.parameterize(build_model(cfg)).to(torch.bfloat16)
    d = cls.optim_defaults("tiny")
    optimizer = method.build_optimizer(model, ResolvedOptim(d.lr, d.weight_decay, (0.9, 0.999), d.eps, d.grad_clip,
                                                            10, 1, 0.1, state_dtype=state_dtype))
    token_losses(model, torch.randint(0, cfg.vocab_size, (2, 32))).mean().backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    assert estimate["training_weight_bytes"] == sum(p.numel() * p.element_size() for p in model.parameters())
    assert estimate["training_grad_bytes"] == grads
    assert estimate["training_state_bytes"] == state
    resident = grads + state + estimate["training_weight_bytes"]
    assert estimate["training_ddp_bytes"] == resident + estimate["training_activation_bytes"]
    assert estimate["training_fsdp_checkpointed_bytes"] == (
        resident / 4 + estimate["training_fsdp_gathered_bytes"] + estimate["training_activation_checkpointed_bytes"])
    assert estimate["training_activation_checkpointed_bytes"] < estimate["training_activation_bytes"]


def test_training_estimate_at_7b():
    """Full rank at 7B, bf16-pure, one 2048-token sequence: 2 bytes per weight and gradient, fp32
    moments (or bf16 with state_dtype param), activations as the LLaMA formula (counted on meta)."""
    from rankscope.models import count_parameters

    preset = get_preset("7b")
    n = count_parameters(preset)
    tensors = 2 + 9 * preset.num_layers + 1  # embeddings, head, final norm; 7 linears + 2 norms per block
    fp32 = training_estimate(methods.get("full"), "7b", micro_batch=1, seq_len=2048, gpus=8)
    bf16 = training_estimate(methods.get("full"), "7b", micro_batch=1, seq_len=2048, gpus=8, state_dtype="param")
    assert fp32["training_weight_bytes"] == fp32["training_grad_bytes"] == 2 * n  # 13.5 GB
    assert fp32["training_state_bytes"] == 8 * n + 4 * tensors                    # 53.9 GB
    assert bf16["training_state_bytes"] == 4 * n + 4 * tensors                    # 27.0 GB
    assert fp32["training_activation_bytes"] == dense_activation_bytes(preset, 1, 2048)["total"]  # 12.6 GB
    assert fp32["training_fsdp_bytes"] < fp32["training_ddp_bytes"] / 3


def test_cli_memory_prints_the_training_estimate(capsys):
    assert main(["methods", "--memory", "--preset", "tiny", "--methods", "full,galore", "--micro-batch", "2",
                 "--seq-len", "64", "--gpus", "4", "--state-dtype", "param"]) == 0
    out = capsys.readouterr().out
    assert "Training memory per GPU at preset tiny, bf16-pure, micro-batch 2 x 64 tokens" in out
    assert "optim.state_dtype=param" in out and "FSDP/4" in out and "8-bit" in out
    with pytest.raises(ConfigError, match="state-dtype"):
        training_memory_table("tiny", ["full"], micro_batch=1, seq_len=8, gpus=1, state_dtype="bf16")
