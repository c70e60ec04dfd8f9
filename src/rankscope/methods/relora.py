"""ReLoRA: LoRA with periodic merges, so a sum of rank-r updates can build a high-rank weight.

W = W0 + s·B·A (s = α/r), W0 frozen. Every `reset_every` steps: W0 += s·B·A, A re-drawn
Kaiming-uniform, B = 0 (the model's function is unchanged), and the Adam moments of A and B are
pruned (random 99.9% by default) so the fresh adapters are not pushed along the old directions.
The LR is a jagged cosine: after every reset it re-warms linearly over `restart_warmup` updates
to the cosine envelope. Unlike the official code (A = B = 0 at start, so the first cycle gets no
gradient), A starts Kaiming-uniform and B at zero.

Optional full-rank warm start (`warm_start_steps` > 0). W0 is trainable from the start, in its
own param group ("warm_start_dense"), together with the adapters and the dense parameters: for
the first `warm_start_steps` updates the model trains as a dense model (A and B add nothing the
dense W0 could not, and they are merged at the switch). After update number `warm_start_steps`
`after_step` switches to ReLoRA: W0 is frozen (requires_grad False, so it gets no gradient and
AdamW skips it), its Adam state is deleted, and the switch counts as a reset (merge, re-init,
state pruning, LR re-warm). Later resets follow every `reset_every` steps after the switch.
The W0 group stays in the optimizer (empty of state) so the param-group layout, and hence
checkpoints, are the same before and after the switch; on resume `load_state_dict` re-freezes W0.

Every random draw in `after_step` (the re-init of A and the random pruning) comes from a
torch.Generator seeded from the run's seed and the step, never from global state, so a resumed
run repeats the resets bit-identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rankscope.methods._targets import literature_rank
from rankscope.methods.base import Method, OptimDefaults, ResolvedOptim, require
from rankscope.methods.lora import LORA_ALPHA, lora_parameterize, validate_lora
from rankscope.methods.lowrank import default_targets, two_group_adamw
from rankscope.models import LlamaConfig
from rankscope.nn import LoRALinear
from rankscope.optim import prune_adam_state
from rankscope.optim.prune import PRUNE_MODES
from rankscope.optim.schedules import cosine_with_warmup

# The geometric study's reset periods (1000 / 5000 / 5000 steps at 60M / 130M / 350M); 1B and 7B
# keep the 350M value, 20m the 60M value. Tiny runs are a few hundred steps: reset every 100.
RESET_EVERY = {"tiny": 100, "20m": 1000, "60m": 1000, "130m": 5000, "350m": 5000, "1b": 5000, "7b": 5000}
# ReLoRA's restart warmup is 100 steps at every scale; tiny re-warms over 10 (10% of its cycle).
RESTART_WARMUP = {"tiny": 10}


@dataclass
class ReLoRASettings:
    rank: int = 128
    alpha: float = LORA_ALPHA
    reset_every: int = 1000
    restart_warmup: int = 100
    prune_ratio: float = 0.999
    prune_mode: str = "random"
    warm_start_steps: int = 0
    targets: list[str] = field(default_factory=default_targets)


class ReLoRA(Method):
    name = "relora"
    description = "ReLoRA: frozen W0 + s·B·A merged into W0 every reset_every steps; jagged cosine LR."
    Settings = ReLoRASettings

    def __init__(self, settings: ReLoRASettings, model_config: LlamaConfig, preset: str = "tiny"):
        super().__init__(settings, model_config, preset)
        self._layers: list[LoRALinear] = []
        self._seed = 0  # drawn in parameterize from the seeded global RNG; saved for resume
        self._steps_done = 0

    @classmethod
    def default_settings(cls, preset: str, model_config: LlamaConfig) -> ReLoRASettings:
        return ReLoRASettings(
            rank=literature_rank(preset, model_config),
            reset_every=RESET_EVERY.get(preset, 1000),
            restart_warmup=RESTART_WARMUP.get(preset, 100),
        )

    @classmethod
    def optim_defaults(cls, preset: str) -> OptimDefaults:
        # Geometric study / ReLoRA paper: lr 1e-3 at 60M and 130M, 5e-4 from 350M up (1B and 7B
        # keep the 350M value); wd 0, clip 1.0 as ReLoRA's script. Tiny trains well with 1e-3.
        lr = 5e-4 if preset in ("350m", "1b", "7b") else 1e-3
        return OptimDefaults(lr=lr, weight_decay=0.0, eps=1e-8, grad_clip=1.0)

    def validate(self) -> None:
        s = self.settings
        validate_lora(s, self.model_config)
        require(s.reset_every >= 1, f"method.reset_every {s.reset_every} must be at least 1; e.g. 1000")
        require(
            0 <= s.restart_warmup <= s.reset_every,
            f"method.restart_warmup {s.restart_warmup} must be in [0, reset_every={s.reset_every}]; e.g. 100",
        )
        require(0.0 <= s.prune_ratio <= 1.0, f"method.prune_ratio {s.prune_ratio} must be in [0, 1]; e.g. 0.999")
        require(s.prune_mode in PRUNE_MODES, f"method.prune_mode {s.prune_mode!r} must be one of {', '.join(PRUNE_MODES)}")
        require(s.warm_start_steps >= 0, f"method.warm_start_steps {s.warm_start_steps} must be >= 0 (0 = no warm start)")

    # -- model and optimizer -----------------------------------------------------------------
    def parameterize(self, model: nn.Module) -> nn.Module:
        self._layers = lora_parameterize(model, self.settings)
        # One draw from the seeded global RNG after the layers are built (so ReLoRA and LoRA get
        # the same init for the same seed): the root of every reset's generator.
        self._seed = int(torch.randint(0, 2**62, (1,)).item())
        if self.settings.warm_start_steps > 0:
            for layer in self._layers:
                layer.weight.requires_grad_(True)
        return model

    def build_optimizer(self, model: nn.Module, optim: ResolvedOptim) -> torch.optim.Optimizer:
        extra = []
        if self.settings.warm_start_steps > 0:
            dense = [m.weight for m in model.modules() if isinstance(m, LoRALinear)]
            extra.append({"params": dense, "name": "warm_start_dense"})
        return two_group_adamw(model, optim, extra)

    # -- schedule ----------------------------------------------------------------------------
    def _first_reset(self) -> int:
        warm = self.settings.warm_start_steps
        return warm if warm > 0 else self.settings.reset_every

    def is_reset_step(self, steps_done: int) -> bool:
        """Whether a reset (merge + re-init + pruning) follows the update that completes `steps_done`."""
        first = self._first_reset()
        return steps_done >= first and (steps_done - first) % self.settings.reset_every == 0

    def _last_reset_before(self, update: int) -> int | None:
        """The last reset that happened before update number `update` (1-based), or None."""
        first = self._first_reset()
        done = update - 1  # updates completed before this one
        if done < first:
            return None
        return first + (done - first) // self.settings.reset_every * self.settings.reset_every

    def lr_multiplier(self, step: int, optim: ResolvedOptim) -> float:
        """Multiplier for update number `step` (1-based): the cosine with warmup, re-warmed after
        every reset. A reset R happens in after_step(R), after update R; updates R + j for
        j = 1 .. restart_warmup get j / restart_warmup of the envelope's value at R + restart_warmup,
        then the envelope resumes. This is ReLoRA's jagged cosine aligned with the trainer's 1-based update index: update R
        itself keeps the envelope's lr (the reference's schedule would zero it, wasting the last
        update before the merge) and the first update
        after the merge gets the first non-zero re-warm value, as the first update of a run gets
        1 / warmup_steps. With a warm start the resets follow the switch."""
        envelope = cosine_with_warmup(step, optim.total_steps, optim.warmup_steps, optim.min_lr_ratio)
        rewarm = self.settings.restart_warmup
        last = self._last_reset_before(step)
        if step < optim.warmup_steps or last is None or step - last >= rewarm:
            return envelope
        target = cosine_with_warmup(last + rewarm, optim.total_steps, optim.warmup_steps, optim.min_lr_ratio)
        return (step - last) / rewarm * target

    # -- periodic work -------------------------------------------------------------------------
    def reset_generator(self, steps_done: int) -> torch.Generator:
        # Mix seed and step (golden-ratio multiplier) so nearby seeds and steps give unrelated streams.
        return torch.Generator().manual_seed((self._seed + steps_done * 0x9E3779B97F4A7C15) % 2**63)

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._steps_done = step
        if not self.is_reset_step(step):
            return
        layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        if self.settings.warm_start_steps > 0 and step == self.settings.warm_start_steps:
            self._end_warm_start(layers, optimizer)
        generator = self.reset_generator(step)
        for layer in layers:
            layer.merge_and_reinit(generator)
        prune_adam_state(
            optimizer,
            [p for layer in layers for p in (layer.A, layer.B)],
            ratio=self.settings.prune_ratio,
            mode=self.settings.prune_mode,
            generator=generator,
        )

    @staticmethod
    def _end_warm_start(layers: list[LoRALinear], optimizer: torch.optim.Optimizer | None) -> None:
        for layer in layers:
            layer.weight.requires_grad_(False)
            layer.weight.grad = None
            if optimizer is not None:
                optimizer.state.pop(layer.weight, None)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self._seed, "steps_done": self._steps_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._seed = int(state["seed"])
        self._steps_done = int(state["steps_done"])
        warm = self.settings.warm_start_steps
        if warm > 0 and self._steps_done >= warm:
            # The optimizer state loaded from the checkpoint already lacks W0's moments.
            self._end_warm_start(self._layers, None)
