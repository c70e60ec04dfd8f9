"""The method contract: everything a low-rank method may change, and nothing else.

A method is one subclass of `Method` in its own file plus one registry line in
`rankscope/methods/__init__.py`. The trainer only ever talks to this interface.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from rankscope.errors import ConfigError
from rankscope.optim import AdamW
from rankscope.optim.schedules import cosine_with_warmup

# Which parameters weight decay acts on. "all": every trainable parameter, as torch.optim.AdamW
# over model.parameters() in the official harnesses of GaLore, SLTrain, ReLoRA, CoLA and LORO.
# "matrices": every weight of a linear map or embedding (factors, sparse values and adapters
# included) but not norm gains, biases or scalar scales, as nanoGPT and the HF Trainer do.
WEIGHT_DECAY_SCOPES = ("all", "matrices")


@dataclass(frozen=True)
class OptimDefaults:
    """A method's optimizer settings from its official harness (used where the run config says None)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    eps: float = 1e-8
    # The official harnesses clip only when asked (GaLore / SLTrain / LORO / CoLA default 0.0);
    # ReLoRA's default is 1.0. 0 turns clipping off.
    grad_clip: float = 0.0
    weight_decay_scope: str = "all"
    # Per-role values (rankscope.optim.roles); None: the role follows the method's lr / decay.
    embed_lr: float | None = None
    head_lr: float | None = None
    norm_lr: float | None = None
    embed_weight_decay: float | None = None
    head_weight_decay: float | None = None
    norm_weight_decay: float | None = None


@dataclass(frozen=True)
class ResolvedOptim:
    """Optimizer and schedule settings after method defaults have filled the gaps."""

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    grad_clip: float
    total_steps: int
    warmup_steps: int
    min_lr_ratio: float
    weight_decay_scope: str = "all"
    # {role: {"lr": x, "weight_decay": y}} for the roles with a setting of their own (only the keys
    # that were set); empty: every parameter stays where the method's optimizer puts it.
    roles: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    # optim.state_dtype, passed to every method's optimizer: "fp32" moments (and projectors) for
    # bf16 weights, or "param" (the weights' dtype, as the official bf16 harnesses); rankscope.optim._base.
    state_dtype: str = "fp32"


@dataclass
class NoSettings:
    """A method without settings of its own."""


class Method:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Settings: ClassVar[type] = NoSettings
    # A control is a reference row, not a method: studies train it next to the methods (see
    # StudySpec.controls) and the report neither ranks it nor tests it against full rank.
    is_control: ClassVar[bool] = False
    # The setting (a field of Settings, an int of steps) that spaces the method's periodic work
    # (GaLore's update_proj_gap, LORO's exact_every, ReLoRA's reset_every); None: no periodic work.
    # A value <= 0 in a run's settings means the work is off. `rankscope bench train` shortens it.
    period_setting: ClassVar[str | None] = None
    # Settings (ints of steps) that must fit inside that period (ReLoRA's restart_warmup, LORO's
    # rewarm_steps): whoever shortens the period cuts these below it.
    warmup_settings: ClassVar[tuple[str, ...]] = ()
    # Whether the method bounds each update's size by the lr (Spectron: ‖ΔW‖₂ ≈ lr); the dynamics
    # figure draws that bound next to the measured updates.
    update_bound: ClassVar[bool] = False
    # The method's line colour in the report's figures (hex); None: one is derived from the name.
    color: ClassVar[str | None] = None
    # Why the method cannot train under train.parallel=fsdp (parameters, gradients and optimizer
    # state sharded by rows, rankscope.train.sharding), or None when it can; `check_fsdp` adds
    # refusals that depend on the settings.
    fsdp_refusal: ClassVar[str | None] = None

    def __init__(self, settings: Any, model_config: Any, preset: str = "tiny"):
        self.settings = settings
        self.model_config = model_config
        self.preset = preset

    # -- configuration -------------------------------------------------------------------------
    @classmethod
    def default_settings(cls, preset: str, model_config: Any) -> Any:
        return cls.Settings()

    @classmethod
    def optim_defaults(cls, preset: str) -> OptimDefaults:
        return OptimDefaults()

    def validate(self) -> None:
        """Raise ConfigError for bad settings, before any training starts."""

    def check_fsdp(self) -> None:
        """Raise ConfigError, naming the method and why, when it cannot train sharded (FSDP)."""
        if self.fsdp_refusal:
            raise ConfigError(f"method {self.name!r} cannot train with train.parallel=fsdp: {self.fsdp_refusal}; "
                              "train it with train.parallel=ddp")

    # -- model ---------------------------------------------------------------------------------
    def parameterize(self, model: nn.Module) -> nn.Module:
        """Replace the targeted linears in place; the default keeps the dense model."""
        return model

    # -- optimizer -----------------------------------------------------------------------------
    def build_optimizer(self, model: nn.Module, optim: ResolvedOptim) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = scope_weight_decay([{"params": params, "name": "all"}], model, optim.weight_decay_scope)
        # torch.optim.AdamW's numbers, with the state dtype the run asks for (torch's own keeps
        # state in the weights' dtype, bf16 under bf16-pure).
        return AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                     state_dtype=optim.state_dtype)

    def lr_multiplier(self, step: int, optim: ResolvedOptim) -> float:
        """Multiplier on each group's base lr for update number `step` (1-based).

        Schedules are LambdaLR-style (multiplier 0 at index 0), so the first update gets the
        first non-zero warmup value and update `total_steps` ends at `min_lr_ratio`.
        """
        return cosine_with_warmup(step, optim.total_steps, optim.warmup_steps, optim.min_lr_ratio)

    # -- periodic work -------------------------------------------------------------------------
    def before_update(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Work between the gradient and the update number `step` (1-based): the trainer calls it
        after the gradients are complete (accumulated, all-reduced and clipped) and before
        `optimizer.step()`, and only for a step whose loss and gradient are finite (a skipped step
        skips it). It may change weights, gradients and optimizer state (SwitchLoRA's switches,
        which the update that follows must see). It runs inside the step, so its effect is in the
        checkpoint written after the step; any randomness must come from a generator seeded by the
        run and `step`, so that a resumed run repeats it."""

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Periodic work that follows update number `step` (ReLoRA's merges).

        The trainer writes a checkpoint due at `step` *before* calling this, so a checkpoint holds
        what the update produced (ReLoRA's adapters before their merge, as the official code
        saves them), and a run resumed from it replays `after_step(step)` first. So this must be
        a deterministic function of the saved state (model, optimizer, `state_dict()`).
        """

    def state_dict(self) -> dict[str, Any]:
        """Tensors / plain values the method keeps outside model and optimizer (for resume)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def split_targeted(model: nn.Module, targeted: list[nn.Module]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters of the targeted modules, and all other trainable parameters."""
    target_ids = {id(p) for module in targeted for p in module.parameters()}
    inside = [p for m in targeted for p in m.parameters() if p.requires_grad]
    outside = [p for p in model.parameters() if p.requires_grad and id(p) not in target_ids]
    return inside, outside


def no_decay_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters the "matrices" scope leaves undecayed: norm gains, biases, scalars."""
    exempt: set[int] = set()
    for module in model.modules():
        is_norm = type(module).__name__.endswith("Norm")
        for name, p in module.named_parameters(recurse=False):
            if is_norm or name == "bias" or p.numel() == 1:
                exempt.add(id(p))
    return exempt


def scope_weight_decay(groups: list[dict[str, Any]], model: nn.Module, scope: str) -> list[dict[str, Any]]:
    """Param groups with weight decay restricted to `scope` (see WEIGHT_DECAY_SCOPES).

    "all" returns the groups unchanged. "matrices" moves each group's exempt parameters into a
    copy of the group with weight_decay 0 (named "<name>_no_decay"); groups with method keys
    (factor pairs, projections) must hold matrices only, since splitting them would change
    what the optimizer does with them.
    """
    require(scope in WEIGHT_DECAY_SCOPES,
            f"optim.weight_decay_scope = {scope!r} is unknown; use one of {', '.join(WEIGHT_DECAY_SCOPES)}")
    if scope == "all":
        return groups
    exempt = no_decay_parameters(model)
    out: list[dict[str, Any]] = []
    for group in groups:
        decayed = [p for p in group["params"] if id(p) not in exempt]
        free = [p for p in group["params"] if id(p) in exempt]
        if free and (set(group) - {"params", "name"}):
            raise AssertionError(f"param group {group.get('name')!r} has method keys but holds non-matrix parameters")
        if decayed:
            out.append({**group, "params": decayed})
        if free:
            out.append({**group, "params": free, "weight_decay": 0.0, "name": f"{group.get('name', 'group')}_no_decay"})
    return out


def check_param_groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every trainable parameter sits in exactly one param group; frozen ones in none."""
    seen: dict[int, int] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen[id(p)] = seen.get(id(p), 0) + 1
    names = {id(p): n for n, p in model.named_parameters()}
    twice = [names.get(i, "?") for i, count in seen.items() if count > 1]
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and id(p) in seen]
    foreign = [i for i in seen if i not in names]
    if twice or missing or frozen or foreign:
        raise AssertionError(
            f"optimizer param groups must cover every trainable parameter once: "
            f"in several groups {twice[:5]}, in none {missing[:5]}, frozen but optimized {frozen[:5]}, "
            f"not in the model {len(foreign)}"
        )


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
