"""What every rankscope optimizer shares: validation, plain AdamW groups, tensor-only state.

Each optimizer here treats some parameter groups specially (GaLore's projected weights, LORO's
and Spectron's factor pairs) and every other group as a plain AdamW, in one of two published forms:
- `_plain_adamw_step`: exactly `torch.optim.AdamW` (torch's own functional kernel with the
  arguments `torch.optim.AdamW` passes, so parameters are bit-identical to torch's);
- `_reference_adamw_step`: the Hugging Face form that galore_torch 1.0 and fira 1.0.2 use for every
  parameter (transformers' old AdamW): eps is added to sqrt(v) *before* the bias correction is
  folded into the step size, so the effective eps is eps / sqrt(1 - beta2^t) (32x larger at t = 1
  with beta2 0.999), and decoupled weight decay is applied after the update (p -= lr*wd*p) instead
  of before it (p *= 1 - lr*wd). On gradients of 1e-3 the two forms differ by 3% on the first step.

Optimizer state is tensors only, so `torch.load(weights_only=True)` reads a saved state dict.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer
from torch.optim.adamw import adamw as functional_adamw

from rankscope.errors import ConfigError, HyperparameterError  # noqa: F401 - HyperparameterError re-exported


def new_step_counter() -> torch.Tensor:
    """A step counter kept on the CPU like torch's AdamW keeps its own.

    Reading it (`int(counter)`) never waits for an accelerator, so per-matrix logic that
    depends on the step (projector refresh, bias correction) costs no device sync.
    """
    return torch.tensor(0.0, dtype=torch.float32)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise HyperparameterError(message)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_adamw_hyperparameters(group: dict[str, Any]) -> None:
    """lr, betas, eps and weight_decay as torch.optim.AdamW accepts them (floats, not tensors)."""
    lr = group["lr"]
    require(_is_number(lr) and lr >= 0.0 and math.isfinite(lr),
            f"invalid learning rate {lr!r}: use a finite number >= 0")
    betas = group["betas"]
    require(isinstance(betas, (tuple, list)) and len(betas) == 2,
            f"invalid betas {betas!r}: use a pair (beta1, beta2), e.g. (0.9, 0.999)")
    for index, beta in enumerate(betas):
        require(_is_number(beta) and 0.0 <= beta < 1.0,
                f"invalid beta{index + 1} {beta!r}: use a number in [0, 1)")
    eps = group["eps"]
    require(_is_number(eps) and eps >= 0.0, f"invalid eps {eps!r}: use a number >= 0")
    weight_decay = group["weight_decay"]
    require(_is_number(weight_decay) and weight_decay >= 0.0,
            f"invalid weight_decay {weight_decay!r}: use a number >= 0")


def validate_int(group: dict[str, Any], key: str, minimum: int) -> None:
    value = group[key]
    require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
            f"invalid {key} {value!r}: use an integer >= {minimum}")


def validate_float(group: dict[str, Any], key: str, minimum: float, *, strict: bool = False) -> None:
    value = group[key]
    ok = _is_number(value) and math.isfinite(value) and (value > minimum if strict else value >= minimum)
    require(ok, f"invalid {key} {value!r}: use a number {'>' if strict else '>='} {minimum}")


class RankscopeOptimizer(Optimizer):
    """Base class: AdamW-style constructor, per-group validation, plain AdamW groups.

    Subclasses implement `_validate_special_group(group)` (return True when the group is one of
    theirs and valid, False for a plain AdamW group) and `step`.
    `load_state_dict` casts every state tensor except "step" to its parameter's dtype, which
    would round an integer counter in bf16 or demote fp32 bookkeeping. Keys in
    `_preserved_state_keys` keep their saved dtype: "cpu" ones stay on the CPU (counters),
    "param_device" ones move to the parameter's device.
    """

    _preserved_state_keys: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
    ) -> None:
        defaults = {"lr": lr, "betas": tuple(betas) if isinstance(betas, list) else betas,
                    "eps": eps, "weight_decay": weight_decay}
        validate_adamw_hyperparameters(defaults)
        super().__init__(params, defaults)

    # Torch calls add_param_group for every group in __init__, so this validates them all,
    # and also groups added later.
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            validate_adamw_hyperparameters(group)
            self._validate_special_group(group)
        except HyperparameterError:
            self.param_groups.pop()
            raise

    def _validate_special_group(self, group: dict[str, Any]) -> bool:
        return False

    # ----------------------------------------------------------------- plain AdamW groups
    @torch.no_grad()
    def _plain_adamw_step(self, group: dict[str, Any]) -> None:
        """One torch.optim.AdamW step for a group, through torch's own functional kernel."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamW does not support sparse gradients")
            has_complex |= torch.is_complex(p)
            state = self.state[p]
            if len(state) == 0:
                state["step"] = new_step_counter()
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        # Same arguments torch.optim.AdamW passes with its defaults (foreach/fused chosen by torch).
        functional_adamw(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            foreach=None, capturable=False, differentiable=False, fused=None,
            grad_scale=None, found_inf=None, has_complex=has_complex,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )

    @torch.no_grad()
    def _reference_adamw_step(self, group: dict[str, Any]) -> None:
        """One step of the galore_torch / fira AdamW on a plain group, multi-tensor.

        Parameters are bucketed by (device, dtype, step count), the step count setting the bias
        correction; within a bucket every operation is one `torch._foreach_*` call doing, tensor
        by tensor, what the reference does per parameter (bitwise equal on the CPU).
        """
        beta1, beta2 = group["betas"]
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamW does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = new_step_counter()
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buckets.setdefault((p.device, p.dtype, int(state["step"])), []).append(p)
        for (_, _, step), params in buckets.items():
            states = [self.state[p] for p in params]
            torch._foreach_add_([s["step"] for s in states], 1.0)
            directions = adam_directions([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                                         [p.grad for p in params], beta1, beta2, group["eps"])
            torch._foreach_add_(params, directions, alpha=-bias_corrected_step_size(group["lr"], beta1, beta2, step + 1))
            apply_decoupled_weight_decay(params, group)

    # ------------------------------------------------------------------ state handling
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, except keys in `_preserved_state_keys` keep their saved dtype."""
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        kept: dict[Any, dict[str, torch.Tensor]] = {}
        for param_id, param_state in saved_state.items():
            preserved = {k: v.clone() for k, v in param_state.items() if k in self._preserved_state_keys}
            if preserved:
                kept[param_id] = preserved
        super().load_state_dict(state_dict)
        if not kept:
            return
        # Same id -> parameter pairing torch uses: saved group order against current group order.
        saved_ids = [pid for g in saved_groups for pid in g["params"]]
        current = [p for g in self.param_groups for p in g["params"]]
        id_to_param = dict(zip(saved_ids, current))
        for param_id, preserved in kept.items():
            param = id_to_param[param_id]
            for key, value in preserved.items():
                where = self._preserved_state_keys[key]
                device = torch.device("cpu") if where == "cpu" else param.device
                self.state[param][key] = value.to(device=device)


def bias_corrected_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """The reference GaLore/Fira/LORO form: lr * sqrt(1 - beta2^t) / (1 - beta1^t), python floats."""
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    return lr * math.sqrt(bias_correction2) / bias_correction1


def update_adam_moments(
    state: dict[str, Any], grad: torch.Tensor, beta1: float, beta2: float, eps: float
) -> torch.Tensor:
    """Advance exp_avg / exp_avg_sq with `grad` and return m / (sqrt(v) + eps).

    Eps outside the square root and no bias correction inside the ratio: the form used by
    galore_torch, fira and the LORO reference (bias correction goes into the step size).
    """
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    return exp_avg / denom


def adam_directions(
    exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], grads: list[torch.Tensor],
    beta1: float, beta2: float, eps: float,
) -> list[torch.Tensor]:
    """`update_adam_moments` for many tensors at once: advance every moment pair with its gradient
    and return each m / (sqrt(v) + eps), one `torch._foreach_*` call per operation.

    Operation for operation the reference's per-tensor code, so CPU results are bitwise equal.
    """
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denominators, eps)
    return torch._foreach_div(exp_avgs, denominators)


def apply_decoupled_weight_decay(params: list[torch.Tensor], group: dict[str, Any]) -> None:
    """p -= lr * weight_decay * p, after the update, as galore_torch / fira / transformers' AdamW."""
    if group["weight_decay"] > 0.0:
        torch._foreach_add_(params, params, alpha=-group["lr"] * group["weight_decay"])


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes held by all tensors in the optimizer state (moments, projectors, counters)."""
    total = 0
    for param_state in optimizer.state.values():
        for value in param_state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def evaluate_closure(closure) -> float | None:
    """The loss of an optimizer's optional closure, evaluated with gradients enabled (torch's convention)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
