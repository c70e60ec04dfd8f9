"""SwitchLoRA: LoRA whose vectors are switched with candidate vectors on a decaying schedule.

Zhou et al. (arXiv 2406.06564); official code asfsdsf/SwitchLoRA @f9a174e: switchlora/switch_lora.py
(the layer and the switch, rankscope/nn/switchlora.py), switchlora/optimizer.py (`StepAdamW`:
rankscope.optim.RowStepAdamW), llama/main.py (L381-389 targets, L617-636 the order: backward, clip,
switch, optimizer.step; the switch gets the 0-based update number and D = ratio x steps).

Per update k (0-based) every layer switches n vectors of A and of B: the rate is
ρ(k) = max(x^(k + 1), 1e-8) with x = 0.3^(1/D) (exponential descent, ρ(D) = 0.3), the interval
I = I0 / ρ(k), n = r / I rounded stochastically (up with probability its fraction), capped by
`SwitchLoRALinear.available()`. Switching is effectively over after about 3D updates. It runs in
the `before_update` hook: after clipping, before the optimizer step, as the official loop does,
so the switched vectors receive the gradient computed for the vectors they replace.

Settings of llama/examples/basic/run_switchlora_350m.sh (the only pre-training script with its
own settings; the README leaves the other sizes to the paper): lr 0.02 with rank 256 at 350M,
I0 40, ratio 0.1, adam_warm_step 5, α 1 (main.py passes 1.), clip 1.0, wd 0, torch AdamW's
betas and eps. At every other preset rankscope keeps those and takes GaLore's literature rank
(256 at 350M, as the script); the script's batch (1152 x 512 tokens) and 40000 steps are a
different protocol from rankscope's shared schedule.

Deviations: the stochastic rounding draws from a generator seeded by the run's seed, the update
number and the layer (the reference: numpy's global RNG), so a resumed run switches the same
vectors. As the reference, the candidates stay in host memory (`offload`), which also keeps them
out of DDP's buffer broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rankscope.methods._targets import literature_rank
from rankscope.methods.base import Method, OptimDefaults, ResolvedOptim, require, scope_weight_decay, split_targeted
from rankscope.methods.lowrank import default_targets, validate_targets_and_rank
from rankscope.models import LlamaConfig
from rankscope.nn import replace_linears
from rankscope.nn.switchlora import CANDIDATE_BUFFERS, SwitchLoRALinear
from rankscope.optim.row_step_adamw import RowStepAdamW

RATE_AT_D = 0.3  # the exponential descent reaches 0.3 at D updates
MIN_RATE = 1e-8


def switch_rate(update: int, descent_steps: float) -> float:
    """ρ(k) of the official exponential descent for the 0-based update k."""
    return max((RATE_AT_D ** (1 / descent_steps)) ** (update + 1), MIN_RATE)


def switch_count(rank: int, update: int, interval: float, descent_steps: float, draw: float) -> int:
    """n = rank / (interval / ρ(k)), rounded up when `draw` (uniform in [0, 1)) is below its fraction."""
    expected = rank / (interval / switch_rate(update, descent_steps))
    whole = int(expected)
    return whole + (1 if draw < expected - whole else 0)


@dataclass
class SwitchLoRASettings:
    rank: int = 128
    alpha: float = 1.0  # main.py passes lora_alpha=1.: s = 1 / rank
    interval: float = 40.0  # I0, --switch_lora_interval
    descent_ratio: float = 0.1  # --switch_lora_descent_rate: D = ratio x train.steps
    warm_steps: int = 5  # --adam_warm_step: updates a switched vector's counterpart stays frozen
    offload: bool = True  # candidates in host memory (the official default; --no_offload_candidates)
    targets: list[str] = field(default_factory=default_targets)


class SwitchLoRA(Method):
    name = "switchlora"
    description = "SwitchLoRA: LoRA (frozen W0) whose A rows and B columns are switched with candidates, ever less often."
    Settings = SwitchLoRASettings
    fsdp_refusal = ("its switches rewrite single rows of A and columns of B, W0 and their Adam state between steps "
                    "(indexing tensors that FSDP splits by rows) from candidate banks kept in host memory outside "
                    "FSDP; that bookkeeping is not shard-aware")

    def __init__(self, settings: SwitchLoRASettings, model_config: LlamaConfig, preset: str = "tiny"):
        super().__init__(settings, model_config, preset)
        self._seed = 0
        self._descent_steps = 1.0

    @classmethod
    def default_settings(cls, preset: str, model_config: LlamaConfig) -> SwitchLoRASettings:
        return SwitchLoRASettings(rank=literature_rank(preset, model_config))

    @classmethod
    def optim_defaults(cls, preset: str) -> OptimDefaults:
        # run_switchlora_350m.sh: lr 0.02; main.py: weight decay 0, clip_grad_norm 1.0, torch AdamW eps.
        return OptimDefaults(lr=0.02, weight_decay=0.0, eps=1e-8, grad_clip=1.0)

    def validate(self) -> None:
        s = self.settings
        validate_targets_and_rank(s.targets, s.rank, self.model_config)
        require(s.alpha > 0, f"method.alpha {s.alpha} must be positive (s = alpha / rank; the official 1)")
        require(isinstance(s.warm_steps, int) and s.warm_steps >= 1,
                f"method.warm_steps {s.warm_steps!r} must be an integer >= 1 (the official adam_warm_step 5)")
        # The reference stops with "Switch interval can not be less than adam warm up steps" when
        # I0 / ρ(k) < 2 x warm; ρ <= 1, so this refuses it before training.
        require(s.interval >= 2 * s.warm_steps,
                f"method.interval {s.interval} must be at least 2 x method.warm_steps = {2 * s.warm_steps} "
                "(a switched vector and its counterpart need the warm-up in turn); the official 40")
        require(0 < s.descent_ratio, f"method.descent_ratio {s.descent_ratio} must be > 0 (the official 0.1)")

    def parameterize(self, model: nn.Module) -> nn.Module:
        s = self.settings
        replace_linears(model, lambda name, linear: SwitchLoRALinear.from_linear(
            linear, s.rank, s.alpha, offload=s.offload, name=name), s.targets)
        if s.offload:  # DDP neither broadcasts nor checks host-memory buffers (identical on every rank)
            model._ddp_params_and_buffers_to_ignore = [
                f"{name}.{buffer}" for name, module in model.named_modules() if isinstance(module, SwitchLoRALinear)
                for buffer in CANDIDATE_BUFFERS]
        # The run's seed (the trainer seeds the global RNG just before), read without a draw.
        self._seed = torch.initial_seed() % 2**63
        return model

    def build_optimizer(self, model: nn.Module, optim: ResolvedOptim) -> torch.optim.Optimizer:
        self._descent_steps = self.settings.descent_ratio * optim.total_steps
        layers = self.layers(model)
        _, rest = split_targeted(model, layers)
        groups = [{"params": [layer.A for layer in layers], "name": "lora_A", "step_axis": 0},
                  {"params": [layer.B for layer in layers], "name": "lora_B", "step_axis": 1}]
        groups += scope_weight_decay([{"params": rest, "name": "other"}], model, optim.weight_decay_scope)
        return RowStepAdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                            state_dtype=optim.state_dtype)

    @staticmethod
    def layers(model: nn.Module) -> list[SwitchLoRALinear]:
        return [m for m in model.modules() if isinstance(m, SwitchLoRALinear)]

    def before_update(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        s = self.settings
        update = step - 1  # the reference passes its 0-based update_step
        generator = torch.Generator().manual_seed((self._seed + update * 0x9E3779B97F4A7C15) % 2**63)
        draws = torch.rand(len(self.layers(model)), generator=generator, dtype=torch.float64).tolist()
        for layer, draw in zip(self.layers(model), draws):
            count = min(switch_count(s.rank, update, s.interval, self._descent_steps, draw), layer.available())
            layer.switch(count, s.warm_steps)
            layer.reset_counterpart_state(optimizer, s.warm_steps)
            layer.hold_frozen()


__all__ = ["SwitchLoRA", "SwitchLoRASettings", "switch_count", "switch_rate"]
