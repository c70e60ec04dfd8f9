"""ReLoRA: LoRA with periodic merges, so a sum of rank-r updates can build a high-rank weight.

W = W0 + s·B·A (s = α/r, or tanh(c) with `trainable_scaling`), W0 frozen, dropout on the
adapter input. Defaults reproduce the official harness (Guitaricet/relora torchrun_main.py
@176f376, peft_pretraining/relora.py, training_utils.py); every setting and its source is listed
in docs/methods.md. Two periods:

- `reset_every` (official --relora): merge W0 += s·B·A, A re-drawn Kaiming-uniform, B = 0.
- `cycle_length` (official --cycle_length, default = reset_every): the LR re-warms linearly over
  `restart_warmup` steps, and the Adam moments of A and B are pruned (random 99.9% by default).

Timing (`schedule="official"`): the harness steps its scheduler after each update, so update k
uses the scheduler value λ(k - 1). λ is 0 at every restart point p = m·cycle_length, so updates
1 and p + 1 run at lr 0, and the merge / pruning of point p follows update p + 1. No merge follows
the last update, so the final checkpoint holds trained adapters, as the official one does.
`schedule="shifted"` is rankscope's earlier variant: update k uses λ(k) with the restart point
keeping the envelope's lr, and the work of point p follows update p (no update is spent at lr 0).

Initial A: the official wrapper zeroes A (`initial_a="zero"`), so A and B get no gradient until
the first merge re-draws A; `initial_a="kaiming"` trains the adapters from the start.

Optional full-rank warm start (`warm_start_steps` > 0, a rankscope option: the official code
warm-starts from a separate full-rank run). W0 is trainable from the start, in its own param
group ("warm_start_dense"); the switch to ReLoRA is restart point `warm_start_steps`: W0 is
frozen (requires_grad False, so AdamW skips it), its Adam state is deleted, and the adapters are
merged, re-drawn and pruned. Later points follow every reset_every / cycle_length steps after
it. The W0 group stays in the optimizer (empty of state) so checkpoints have one layout. Under
DDP the trainer wraps the model again at the switch (it watches which parameters are trainable),
since a DDP built with W0 would wait for gradients W0 no longer gets.

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
from rankscope.methods.lora import LORA_ALPHA, LORA_DROPOUT, lora_parameterize, validate_lora
from rankscope.methods.lowrank import default_targets, two_group_adamw
from rankscope.models import LlamaConfig
from rankscope.nn import LoRALinear
from rankscope.optim import prune_adam_state
from rankscope.optim.prune import PRUNE_MODES
from rankscope.optim.schedules import jagged_cosine
from rankscope.optim.sharded import full_parameters

# The geometric study's reset periods (1000 / 5000 / 5000 steps at 60M / 130M / 350M); 1B and 7B
# keep the 350M value, 20m the 60M value. Tiny runs are a few hundred steps: reset every 100.
RESET_EVERY = {"tiny": 100, "20m": 1000, "60m": 1000, "130m": 5000, "350m": 5000, "1b": 5000, "7b": 5000}
# ReLoRA's restart warmup is 100 steps in its scripts; tiny re-warms over 10 (10% of its cycle).
RESTART_WARMUP = {"tiny": 10}
RELORA_SCHEDULES = ("official", "shifted")


@dataclass
class ReLoRASettings:
    rank: int = 128
    alpha: float = LORA_ALPHA
    reset_every: int = 1000
    # Steps between LR re-warms and optimizer-state pruning; None = reset_every (as the scripts).
    cycle_length: int | None = None
    restart_warmup: int = 100
    prune_ratio: float = 0.999
    prune_mode: str = "random"
    initial_a: str = "zero"
    dropout: float = LORA_DROPOUT
    trainable_scaling: bool = False
    schedule: str = "official"
    warm_start_steps: int = 0
    targets: list[str] = field(default_factory=default_targets)


class ReLoRA(Method):
    name = "relora"
    color = "#E69F00"
    period_setting = "reset_every"
    warmup_settings = ("restart_warmup",)
    description = "ReLoRA: frozen W0 + s·B·A merged into W0 every reset_every steps; jagged cosine LR."
    Settings = ReLoRASettings

    def __init__(self, settings: ReLoRASettings, model_config: LlamaConfig, preset: str = "tiny"):
        super().__init__(settings, model_config, preset)
        self._layers: list[LoRALinear] = []
        self._seed = 0  # drawn in parameterize from the seeded global RNG; saved for resume
        self._steps_done = 0
        self._total_steps: int | None = None  # known once the optimizer is built

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
        # keep the 350M value); wd 0; ReLoRA's torchrun_main --clip_grad_norm default 1.0.
        lr = 5e-4 if preset in ("350m", "1b", "7b") else 1e-3
        return OptimDefaults(lr=lr, weight_decay=0.0, eps=1e-8, grad_clip=1.0)

    def validate(self) -> None:
        s = self.settings
        validate_lora(s, self.model_config)
        require(s.reset_every >= 1, f"method.reset_every {s.reset_every} must be at least 1; e.g. 1000")
        require(s.cycle_length is None or s.cycle_length >= 1,
                f"method.cycle_length {s.cycle_length} must be at least 1 (or null = reset_every)")
        require(
            0 <= s.restart_warmup <= self.cycle_length,
            f"method.restart_warmup {s.restart_warmup} must be in [0, cycle_length={self.cycle_length}]; e.g. 100",
        )
        require(0.0 <= s.prune_ratio <= 1.0, f"method.prune_ratio {s.prune_ratio} must be in [0, 1]; e.g. 0.999")
        require(s.prune_mode in PRUNE_MODES, f"method.prune_mode {s.prune_mode!r} must be one of {', '.join(PRUNE_MODES)}")
        require(s.schedule in RELORA_SCHEDULES,
                f"method.schedule {s.schedule!r} must be one of {', '.join(RELORA_SCHEDULES)}")
        require(s.warm_start_steps >= 0, f"method.warm_start_steps {s.warm_start_steps} must be >= 0 (0 = no warm start)")

    def check_fsdp(self) -> None:
        super().check_fsdp()
        # FSDP2 fixes which parameters get gradients when it first runs: freezing W0 at the end of
        # the warm start would leave its gradients flowing into the optimizer.
        require(self.settings.warm_start_steps == 0,
                "method 'relora' cannot train with train.parallel=fsdp when method.warm_start_steps > 0: the warm "
                "start ends by freezing W0, which FSDP2 cannot stop reducing gradients for; use train.parallel=ddp "
                "or warm_start_steps=0")

    @property
    def cycle_length(self) -> int:
        return self.settings.cycle_length or self.settings.reset_every

    # -- model and optimizer -----------------------------------------------------------------
    def parameterize(self, model: nn.Module) -> nn.Module:
        self._layers = lora_parameterize(model, self.settings)
        # One draw from the seeded global RNG after the layers are built (so ReLoRA and LoRA get
        # the same init for the same seed): the root of every reset's generator.
        self._seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())  # a real draw even on meta
        if self.settings.warm_start_steps > 0:
            for layer in self._layers:
                layer.weight.requires_grad_(True)
        return model

    def build_optimizer(self, model: nn.Module, optim: ResolvedOptim) -> torch.optim.Optimizer:
        self._total_steps = optim.total_steps
        extra = []
        if self.settings.warm_start_steps > 0:
            dense = [m.weight for m in model.modules() if isinstance(m, LoRALinear)]
            extra.append({"params": dense, "name": "warm_start_dense"})
        return two_group_adamw(model, optim, extra)

    # -- timing ---------------------------------------------------------------------------------
    @property
    def _offset(self) -> int:
        """Update k uses scheduler step k - offset, and the work of point p follows update p + offset."""
        return 1 if self.settings.schedule == "official" else 0

    def _latest_point(self, index: int, period: int) -> int | None:
        """The last point (restart or merge) at or before scheduler step `index`: the warm-start
        switch, then every `period` steps after it (every `period` steps from 0 without one)."""
        origin = self.settings.warm_start_steps
        first = origin if origin > 0 else period
        if index < first:
            return None
        return origin + (index - origin) // period * period

    def _is_point(self, index: int, period: int) -> bool:
        return self._latest_point(index, period) == index

    def is_reset_step(self, steps_done: int) -> bool:
        """Whether a merge (and re-init of A and B) follows the update that completes `steps_done`."""
        if self._total_steps is not None and steps_done >= self._total_steps:
            return False  # never after the last update: the final checkpoint keeps its adapters
        return self._is_point(steps_done - self._offset, self.settings.reset_every)

    def lr_multiplier(self, step: int, optim: ResolvedOptim) -> float:
        """Multiplier for update number `step` (1-based): ReLoRA's jagged cosine (see the module
        docstring for which scheduler step an update uses)."""
        index = step - self._offset
        return jagged_cosine(
            index, optim.total_steps, optim.warmup_steps, optim.min_lr_ratio,
            restart=self._latest_point(index, self.cycle_length), restart_warmup=self.settings.restart_warmup,
            zero_at_restart=self.settings.schedule == "official",
        )

    # -- periodic work -------------------------------------------------------------------------
    def reset_generator(self, steps_done: int) -> torch.Generator:
        # Mix seed and step (golden-ratio multiplier) so nearby seeds and steps give unrelated streams.
        return torch.Generator().manual_seed((self._seed + steps_done * 0x9E3779B97F4A7C15) % 2**63)

    def _switch_step(self) -> int | None:
        warm = self.settings.warm_start_steps
        return warm + self._offset if warm > 0 else None

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._steps_done = step
        if self._total_steps is not None and step >= self._total_steps:
            return
        index = step - self._offset
        merge = self._is_point(index, self.settings.reset_every)
        prune = self._is_point(index, self.cycle_length)
        if not (merge or prune):
            return
        layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        if step == self._switch_step():
            self._end_warm_start(layers, optimizer)
        generator = self.reset_generator(step)
        if merge:
            # Under FSDP on the whole matrices (gathered per layer group, written back by rows),
            # so the ranks merge and re-draw exactly what one process does.
            with full_parameters(layers):
                for layer in layers:
                    layer.merge_and_reinit(generator)
        if prune:
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
        switch = self._switch_step()
        if switch is not None and self._steps_done >= switch:
            # The optimizer state loaded from the checkpoint already lacks W0's moments.
            self._end_warm_start(self._layers, None)
