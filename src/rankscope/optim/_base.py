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

State dtype (`state_dtype`, the run's `optim.state_dtype`): "fp32" keeps every tensor that
accumulates across steps (moments, projectors, running norms) in at least fp32 whatever the
parameter's dtype, computes the update from them in fp32 and rounds it into the parameter once,
when it is applied. "param" keeps state in the parameter's dtype, as the official harnesses do
under bf16 (galore_torch 1.0 adamw.py: `state["exp_avg"] = torch.zeros_like(grad)`, the gradient
being the bf16 parameter's; torch.optim.AdamW likewise). In bf16 Adam's second moment then cannot
decay: v * 0.999 rounds back to v (a relative change below bf16's half-ulp, 2^-9), so v only
ratchets up and late updates shrink. For fp32 (or fp64) parameters the two settings are the same
tensors and the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer
from torch.optim.adamw import adamw as functional_adamw

from rankscope.errors import ConfigError, HyperparameterError  # noqa: F401 - HyperparameterError re-exported

STATE_DTYPES = ("fp32", "param")


def state_dtype_for(param_dtype: torch.dtype, setting: str) -> torch.dtype:
    """The dtype of a parameter's accumulated optimizer state under `state_dtype` = `setting`."""
    if setting == "fp32" and param_dtype.is_floating_point:
        return torch.promote_types(param_dtype, torch.float32)  # bf16/fp16 -> fp32; fp32, fp64 stay
    return param_dtype


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
    theirs and valid, False for a plain AdamW group) and `step`, and create accumulated state with
    `new_state(p)` (zeros in `state_dtype_of(p)`).
    torch's `load_state_dict` casts every state tensor except "step" to its parameter's dtype,
    which would round fp32 moments of a bf16 parameter, round an integer counter or demote fp32
    bookkeeping. Here floating state comes back in `state_dtype_of(p)` straight from the saved
    values, and keys in `_preserved_state_keys` keep their saved dtype: "cpu" ones stay on the CPU
    (counters), "param_device" ones move to the parameter's device.
    """

    _preserved_state_keys: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        state_dtype: str = "fp32",
    ) -> None:
        defaults = {"lr": lr, "betas": tuple(betas) if isinstance(betas, list) else betas,
                    "eps": eps, "weight_decay": weight_decay}
        validate_adamw_hyperparameters(defaults)
        validate_state_dtype(state_dtype)
        # An attribute, not a group key: it is the run's setting, and a resumed run takes it from
        # its config (loading casts the saved state to it), not from the checkpoint's groups.
        self.state_dtype = state_dtype
        super().__init__(params, defaults)


    def share_work_over(self, process_group: Any) -> None:
        """Data parallel (DDP): every rank holds the same weights and, after DDP's all-reduce, the
        same gradients, so work each rank would repeat (a projector refresh's SVDs) may be shared
        out over `process_group` (a torch.distributed ProcessGroup). Nothing is shared by default."""
    def state_dtype_of(self, p: torch.Tensor) -> torch.dtype:
        return state_dtype_for(p.dtype, self.state_dtype)

    def new_state(self, p: torch.Tensor) -> torch.Tensor:
        """Zeros shaped like `p` in its state dtype (fresh moments)."""
        return torch.zeros_like(p, dtype=self.state_dtype_of(p), memory_format=torch.preserve_format)

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
        """One torch.optim.AdamW step for a group: torch's own functional kernel where the state
        has the parameter's dtype, `upcast_adamw_step` (the same formula in fp32) where it does not."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        upcast = []
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
                state["exp_avg"] = self.new_state(p)
                state["exp_avg_sq"] = self.new_state(p)
            if state["exp_avg"].dtype != p.dtype:
                upcast.append(p)
                continue
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        for p in upcast:
            upcast_adamw_step(p, self.state[p], group)
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
                state["exp_avg"] = self.new_state(p)
                state["exp_avg_sq"] = self.new_state(p)
            # With fp32 state and bf16 weights the foreach operations below mix dtypes: each is
            # computed in fp32 and the final add rounds into the weight once.
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
        """torch's load, with floating state in `state_dtype_of(p)` and `_preserved_state_keys` as saved."""
        load_state_keeping_dtypes(self, state_dict, self._preserved_state_keys, self.state_dtype_of)


def validate_state_dtype(state_dtype: str) -> None:
    require(state_dtype in STATE_DTYPES,
            f"invalid state_dtype {state_dtype!r}: use one of {', '.join(STATE_DTYPES)} (optim.state_dtype)")


def load_state_keeping_dtypes(
    optimizer: Optimizer, state_dict: dict[str, Any], preserved_keys: dict[str, str],
    state_dtype_of: Callable[[torch.Tensor], torch.dtype],
) -> None:
    """`Optimizer.load_state_dict` for everything but the state tensors it would cast, which are
    restored from the saved values themselves: floating ones (except "step") in
    `state_dtype_of(param)` on the parameter's device, keys in `preserved_keys` in their saved
    dtype ("cpu": on the CPU, "param_device": on the parameter's).

    torch casts floating state to the parameter's dtype, so fp32 moments of a bf16 parameter would
    come back rounded to bf16; and casting first, then widening again, would also hold a bf16 copy
    of the whole state on the device (27 GB at 7B) next to the fp32 one. Where neither dtype nor
    device changes, `.to` returns the saved tensor itself, which the state then shares with the
    caller's dict, as after torch's own load.
    """
    def restored_here(key: str, value: Any) -> bool:
        return torch.is_tensor(value) and (key in preserved_keys or (key != "step" and value.is_floating_point()))

    saved_state = state_dict["state"]
    left_to_torch = {pid: {k: v for k, v in values.items() if not restored_here(k, v)}
                     for pid, values in saved_state.items()}
    Optimizer.load_state_dict(optimizer, {**state_dict, "state": left_to_torch})
    # Same id -> parameter pairing torch uses: saved group order against current group order.
    saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
    current = [p for g in optimizer.param_groups for p in g["params"]]
    id_to_param = dict(zip(saved_ids, current))
    for param_id, values in saved_state.items():
        param = id_to_param.get(param_id)
        if param is None:
            continue
        for key, value in values.items():
            if not restored_here(key, value):
                continue
            if key in preserved_keys:
                device = torch.device("cpu") if preserved_keys[key] == "cpu" else param.device
                optimizer.state[param][key] = value.clone().to(device=device)
            else:
                dtype = state_dtype_of(param) if param.is_floating_point() else value.dtype
                optimizer.state[param][key] = value.to(dtype=dtype, device=param.device)


@torch.no_grad()
def upcast_adamw_step(p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """torch.optim.AdamW's step (its single-tensor formula) for a parameter whose moments are kept
    in a wider dtype than itself: the gradient, moments and update in the moments' dtype, the
    weight decay and the update each rounded into the parameter as they are applied (mixed-dtype
    in-place ops compute in fp32 and round once). One tensor at a time, so the only full-size
    temporaries are this parameter's widened gradient and denominator."""
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    grad = p.grad.to(exp_avg.dtype)
    state["step"] += 1
    step = float(state["step"])
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denominator = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    p.addcdiv_(exp_avg, denominator, value=-step_size)


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
