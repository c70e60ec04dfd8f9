"""SwitchLoRA against reference steps written from the official code (asfsdsf/SwitchLoRA @f9a174e):
switchlora/switch_lora.py `SwitchLoraLayer.switch` L746-780, `_select_indices` L453-470 (continuous
mode), `_switch_chosen_indices` L327-451, `zero_lora_states` L822-856, `correct_switched_lora`
L800-818, `_get_switch_rate` / `_get_switch_replace_num` L242-270; switchlora/optimizer.py
`_multi_tensor_adamw_element_wise_step` L514-650; switchlora/lora_utils.py `get_init_lora_bound`
L375-394, `layer2lora` L64-71."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import build_tiny_method  # tests/ is on sys.path
from rankscope.errors import ConfigError
from rankscope.methods.base import check_param_groups
from rankscope.methods.switchlora import switch_count, switch_rate
from rankscope.nn.switchlora import SwitchLoRALinear, init_bounds
from rankscope.optim import RowStepAdamW

WARM = 5


def _layer(in_features=12, out_features=10, rank=4, seed=0) -> SwitchLoRALinear:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    return SwitchLoRALinear.from_linear(linear, rank, alpha=1.0)


# ------------------------------------------------------------------------------ the layer at init


def test_the_layer_starts_at_the_dense_init_with_the_official_candidates():
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 10, bias=False)
    layer = SwitchLoRALinear.from_linear(linear, 4, alpha=1.0)
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-6)
    assert layer.scale == 0.25  # alpha 1 / rank 4
    k = 10  # min(in, out)
    assert layer.candidates_A.shape == (k, 12) and layer.candidates_B.shape == (k, 10)
    assert layer.selected_A.tolist() == [6, 7, 8, 9]  # the last r candidates
    assert layer.selected_B.tolist() == [8, 9, 6, 7]  # rotated by r // 2: [sel[i - 2] for i in range(4)]
    assert layer.cursors.tolist() == [0, 2]
    assert torch.equal(layer.A, layer.candidates_A[layer.selected_A])
    assert torch.equal(layer.B, layer.candidates_B[layer.selected_B].T)
    bound_a, bound_b = init_bounds(12, 10, 4)
    gain = math.sqrt(1 / 3)
    assert bound_a == pytest.approx(math.sqrt(3) * ((10**0.5 * 4) / 12**1.5) ** 0.25 * gain**0.5)
    assert bound_b == pytest.approx(math.sqrt(3) * (4 / (10 * 12) ** 0.5) ** 0.25 * gain**0.5)
    assert layer.candidates_A.abs().max() <= bound_a and layer.candidates_B.abs().max() <= bound_b


# ------------------------------------------------------------------------------ the schedule


def test_switch_rate_and_stochastic_rounding_follow_the_exponential_descent():
    assert switch_rate(99, 100.0) == pytest.approx(0.3)  # rho reaches 0.3 at D updates (k + 1 = D)
    assert switch_rate(0, 100.0) == pytest.approx(0.3 ** 0.01)
    assert switch_rate(10**6, 100.0) == 1e-8  # floored
    # rank 16, interval 40 at rate ~1: 0.4 vectors per update -> 1 with probability 0.4
    assert switch_count(16, 0, 40.0, 1e9, draw=0.39) == 1
    assert switch_count(16, 0, 40.0, 1e9, draw=0.41) == 0
    assert switch_count(256, 0, 40.0, 1e9, draw=0.99) == 6  # 6.4 -> 6 or 7
    assert switch_count(256, 0, 40.0, 1e9, draw=0.0) == 7


# ------------------------------------------------------------------------------ the switch


def _reference_state(layer: SwitchLoRALinear) -> dict:
    return {"W": layer.weight.detach().clone(), "A": layer.A.detach().clone(), "B": layer.B.detach().clone(),
            "CA": layer.candidates_A.clone(), "CB": layer.candidates_B.clone(),
            "selA": layer.selected_A.tolist(), "selB": layer.selected_B.tolist(),
            "cA": int(layer.cursors[0]), "cB": int(layer.cursors[1]),
            "fixA": [0] * layer.rank, "fixB": [0] * layer.rank, "r": layer.rank, "s": layer.scale}


def _continuous(values) -> bool:
    return all(b == a + 1 for a, b in zip(values, values[1:]))


def _reference_side(st, W, mat1, cands, sel, mat2, fix_other, rows):
    """_switch_chosen_indices for one side: mat1's rows are switched, mat2's columns weigh W's change."""
    k = cands.shape[0]
    first = sel[rows[0] - 1] + 1
    replace = {i: (first + o) % k for o, i in enumerate(rows)}
    keys, dests = list(replace), list(replace.values())
    if len(replace) > 1 and _continuous(keys) and _continuous(dests):  # switch_continuous_rows
        b, e, db, de = keys[0], keys[-1] + 1, dests[0], dests[-1] + 1
        piece = cands[db:de].clone()
        W += mat2[:, b:e] @ (mat1[b:e] - piece) * st["s"]
        for i in keys:
            cands[sel[i]] = mat1[i]
        mat1[b:e] = piece
    else:  # switch_rows
        for i, j in replace.items():
            W += mat2[:, i, None] @ (mat1[i, None, :] - cands[j]) * st["s"]
        for i in keys:
            cands[sel[i]] = mat1[i]
        for i, j in replace.items():
            mat1[i] = cands[j]
    for i, j in replace.items():
        sel[i] = j
        fix_other[i] = WARM


def _reference_switch(st, n):
    r = st["r"]
    fixed_a, fixed_b = sum(1 for v in st["fixA"] if v > 0), sum(1 for v in st["fixB"] if v > 0)
    n = min(n, (st["cA"] - fixed_a - st["cB"]) % r, (st["cB"] - fixed_b - st["cA"]) % r)
    if n == 0:
        return
    rows_a = [i % r for i in range(st["cA"], st["cA"] + n)]
    rows_b = [i % r for i in range(st["cB"], st["cB"] + n)]
    st["cA"], st["cB"] = (st["cA"] + n) % r, (st["cB"] + n) % r
    _reference_side(st, st["W"], st["A"], st["CA"], st["selA"], st["B"], st["fixB"], rows_a)
    _reference_side(st, st["W"].T, st["B"].T, st["CB"], st["selB"], st["A"].T, st["fixA"], rows_b)


def _reference_countdown(fix):
    for i, v in enumerate(fix):
        fix[i] = v - 1 if v > 0 else 0


def test_switches_match_the_reference_and_keep_the_function():
    layer = _layer(rank=4)
    st = _reference_state(layer)
    x = torch.randn(5, 12)
    for n in [1, 2, 0, 1, 3, 1, 1, 2, 1, 1, 1, 2]:  # caps by the available count, wraps the cursors
        before = layer(x).detach()
        with torch.no_grad():
            assert layer.available() == min((st["cA"] - sum(v > 0 for v in st["fixA"]) - st["cB"]) % 4,
                                            (st["cB"] - sum(v > 0 for v in st["fixB"]) - st["cA"]) % 4)
            layer.switch(min(n, layer.available()), WARM)
        _reference_switch(st, n)
        torch.testing.assert_close(layer(x).detach(), before, rtol=1e-5, atol=1e-6)  # the function is kept
        for ours, theirs in ((layer.weight, st["W"]), (layer.A, st["A"]), (layer.B, st["B"]),
                             (layer.candidates_A, st["CA"]), (layer.candidates_B, st["CB"])):
            torch.testing.assert_close(ours.detach(), theirs, rtol=1e-6, atol=1e-7)
        assert layer.selected_A.tolist() == st["selA"] and layer.selected_B.tolist() == st["selB"]
        assert layer.cursors.tolist() == [st["cA"], st["cB"]]
        assert layer.frozen_A.tolist() == st["fixA"] and layer.frozen_B.tolist() == st["fixB"]
        layer.hold_frozen()
        _reference_countdown(st["fixA"])
        _reference_countdown(st["fixB"])
    assert len(set(layer.selected_A.tolist())) == 4  # four distinct candidates in use


def test_a_switched_row_and_its_counterpart():
    layer = _layer(rank=4)
    old_row = layer.A[0].detach().clone()
    slot = int(layer.selected_A[0])
    layer.switch(1, WARM)
    assert torch.equal(layer.candidates_A[slot], old_row)  # the old vector back in its own slot
    assert int(layer.selected_A[0]) == 0  # the candidate after the last row's (9 + 1) mod 10
    assert torch.equal(layer.A[0], layer.candidates_A[0])
    assert layer.frozen_B.tolist() == [WARM, 0, 0, 0]  # B's column 0 waits...
    assert layer.frozen_A.tolist() == [0, 0, WARM, 0]  # ... and A's row 2, the B side's counterpart


# ------------------------------------------------------------------------------ optimizer state


def _reference_row_adamw(param, grad, state, lr, betas, eps, wd):
    """_multi_tensor_adamw_element_wise_step for one tensor with a per-row (axis 0) / column step."""
    beta1, beta2 = betas
    state["step"] += 1
    param.mul_(1 - lr * wd)
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias1 = 1 - beta1 ** state["step"]
    bias2 = 1 - beta2 ** state["step"]
    step_size = (lr / bias1) * -1
    denom = state["exp_avg_sq"].sqrt() / bias2.sqrt() + eps
    param.addcdiv_(state["exp_avg"], denom / step_size)


def test_row_step_adamw_matches_the_reference_and_torch_adamw():
    g = torch.Generator().manual_seed(0)
    A = torch.nn.Parameter(0.1 * torch.randn(4, 6, generator=g))
    B = torch.nn.Parameter(0.1 * torch.randn(5, 4, generator=g))
    other = torch.nn.Parameter(0.1 * torch.randn(7, generator=g))
    twin = torch.nn.Parameter(other.detach().clone())
    ours = RowStepAdamW([{"params": [A], "step_axis": 0}, {"params": [B], "step_axis": 1}, {"params": [other]}],
                        lr=0.02, weight_decay=0.1)
    torch_adamw = torch.optim.AdamW([twin], lr=0.02, weight_decay=0.1)
    ref = {name: (p.detach().clone(), {"step": torch.zeros(shape), "exp_avg": torch.zeros_like(p),
                                       "exp_avg_sq": torch.zeros_like(p)})
           for name, p, shape in (("A", A, (4, 1)), ("B", B, (1, 4)))}
    for step in range(6):
        grads = [10.0 ** (-5 + 3 * torch.rand((), generator=g)) * torch.randn(p.shape, generator=g) for p in (A, B, other)]
        for p, grad in zip((A, B, other), grads):
            p.grad = grad.clone()
        twin.grad = grads[2].clone()
        if step == 3:  # reset row 1 of A and column 2 of B, as a switch's counterpart
            for key in ("exp_avg", "exp_avg_sq", "step"):
                ours.state[A][key][1] = 0
                ours.state[B][key][:, 2] = 0
                ref["A"][1][key][1] = 0
                ref["B"][1][key][:, 2] = 0
        ours.step()
        torch_adamw.step()
        for (param, state), grad in zip(ref.values(), grads):
            _reference_row_adamw(param, grad, state, 0.02, (0.9, 0.999), 1e-8, 0.1)
    torch.testing.assert_close(A.detach(), ref["A"][0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(B.detach(), ref["B"][0], rtol=1e-6, atol=1e-9)
    assert ours.state[A]["step"].flatten().tolist() == [6, 3, 6, 6]
    assert ours.state[B]["step"].flatten().tolist() == [6, 6, 3, 6]
    assert torch.equal(other, twin)  # plain groups are torch's AdamW, bit for bit


def _built(**changes):
    method, model, optimizer, _ = build_tiny_method("switchlora", total_steps=100, **changes)
    return method, model, optimizer


def _backward(model, seed=1):
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(tokens).float().square().mean().backward()


def test_before_update_resets_the_counterparts_state_and_holds_them_for_warm_updates():
    method, model, optimizer = _built()
    check_param_groups(model, optimizer)
    layer = method.layers(model)[0]
    _backward(model)
    optimizer.step()  # states exist now
    optimizer.zero_grad()
    _backward(model, seed=2)
    layer.switch(2, WARM)  # by hand, to know which vectors
    frozen_rows = (layer.frozen_A == WARM).nonzero().flatten().tolist()
    frozen_cols = (layer.frozen_B == WARM).nonzero().flatten().tolist()
    layer.reset_counterpart_state(optimizer, WARM)
    layer.hold_frozen()
    state_a, state_b = optimizer.state[layer.A], optimizer.state[layer.B]
    for row in range(layer.rank):
        zeroed = row in frozen_rows
        assert (state_a["exp_avg"][row] == 0).all() == zeroed and (state_a["step"][row] == 0).all() == zeroed
        assert (layer.A.grad[row] == 0).all() == zeroed
    for col in frozen_cols:
        assert (state_b["exp_avg_sq"][:, col] == 0).all() and (layer.B.grad[:, col] == 0).all()
    before = layer.A.detach().clone()
    optimizer.step()
    moved = (layer.A.detach() != before).any(dim=1)
    assert not moved[frozen_rows].any() and moved[[r for r in range(layer.rank) if r not in frozen_rows]].all()
    assert layer.frozen_A[frozen_rows].tolist() == [WARM - 1] * len(frozen_rows)


def test_before_update_is_seeded_by_run_and_step():
    counts = []
    for _ in range(2):
        method, model, optimizer = _built()
        _backward(model)
        method.before_update(1, model, optimizer)
        counts.append([layer.selected_A.tolist() for layer in method.layers(model)])
    assert counts[0] == counts[1]


@pytest.mark.parametrize(("changes", "match"), [
    ({"interval": 8.0}, "interval"), ({"warm_steps": 0}, "warm_steps"), ({"descent_ratio": 0.0}, "descent_ratio"),
    ({"alpha": 0.0}, "alpha"), ({"rank": 128}, "rank"),
])
def test_bad_settings_name_the_setting(changes, match):
    with pytest.raises(ConfigError, match=match):
        _built(**changes)


def test_only_the_vectors_frozen_by_this_switch_are_reset():
    method, model, optimizer = _built()
    layer = method.layers(model)[0]
    _backward(model)
    optimizer.step()
    optimizer.zero_grad()
    _backward(model, seed=2)
    layer.switch(1, WARM)
    first = (layer.frozen_A == WARM).nonzero().flatten().tolist()
    layer.reset_counterpart_state(optimizer, WARM)
    layer.hold_frozen()
    optimizer.step()  # the rows frozen first count this update: step 1 (from 0)
    optimizer.zero_grad()
    _backward(model, seed=3)
    layer.switch(1, WARM)
    second = (layer.frozen_A == WARM).nonzero().flatten().tolist()
    assert set(first).isdisjoint(second)
    layer.reset_counterpart_state(optimizer, WARM)
    steps = optimizer.state[layer.A]["step"].flatten()
    assert steps[first].tolist() == [1.0] * len(first)  # frozen earlier: left alone (counter WARM - 1)
    assert steps[second].tolist() == [0.0] * len(second)


def test_offloaded_candidates_stay_in_host_memory_and_follow_the_dtype():
    layer = _layer()
    layer.to(torch.float64)
    assert layer.A.dtype == torch.float64 and layer.candidates_A.dtype == torch.float64
    meta = SwitchLoRALinear(12, 10, 4, device="meta")
    assert meta.candidates_A.device.type == "meta"  # shapes only (the memory table)
    layer._apply(lambda t: t.to("meta") if t.is_floating_point() else t)  # a move to another device
    assert layer.A.device.type == "meta" and layer.candidates_A.device.type == "cpu"
    kept = SwitchLoRALinear(12, 10, 4, offload=False)
    kept._apply(lambda t: t.to("meta"))
    assert kept.candidates_A.device.type == "meta"
    method, model, _ = _built()
    names = model._ddp_params_and_buffers_to_ignore
    assert len(names) == 2 * 7 * 2 and all(name in dict(model.named_buffers()) for name in names)


def test_the_memory_account_counts_the_candidates_as_buffers():
    from rankscope.methods.memory_accounting import account_memory

    method, model, optimizer = _built()
    cfg = method.model_config
    candidates = sum(layer.candidates_A.numel() + layer.candidates_B.numel() for layer in method.layers(model))
    expected = sum(min(layer.in_features, layer.out_features) * (layer.in_features + layer.out_features)
                   for layer in method.layers(model))
    assert candidates == expected and len(method.layers(model)) == cfg.num_layers * 7
    assert account_memory(model, optimizer)["buffer_elements"] >= candidates
