"""Optimizers for low-rank pre-training: AdamW, GaLore / GoLore / Fira / APOLLO AdamW, SPAM, Stable-SPAM, LORO, Spectron, LR schedules.

Every optimizer is a `torch.optim.Optimizer` built like `torch.optim.AdamW`, plus `state_dtype`
("fp32" | "param", the run's optim.state_dtype: see `_base.py`); groups without method keys step
as torch's AdamW or as the method's reference does; state is tensors only (checkpoints load with
`torch.load(weights_only=True)` and resume bit-identically).
"""

from rankscope.optim._base import STATE_DTYPES, HyperparameterError, RankscopeOptimizer, state_bytes
from rankscope.optim.adamw import AdamW
from rankscope.optim.apollo import APOLLOAdamW
from rankscope.optim.fira import FiraAdamW
from rankscope.optim.galore import GaLoreAdamW
from rankscope.optim.golore import GoLoreAdamW
from rankscope.optim.loro import LoroAdamW, exact_step
from rankscope.optim.prune import prune_adam_state
from rankscope.optim.row_step_adamw import RowStepAdamW
from rankscope.optim.schedules import cosine_with_warmup
from rankscope.optim.spam import SPAM
from rankscope.optim.spectron import SpectronAdamW
from rankscope.optim.stable_spam import StableSPAM

__all__ = [
    "APOLLOAdamW",
    "AdamW",
    "FiraAdamW",
    "GaLoreAdamW",
    "GoLoreAdamW",
    "HyperparameterError",
    "LoroAdamW",
    "RankscopeOptimizer",
    "RowStepAdamW",
    "SPAM",
    "STATE_DTYPES",
    "SpectronAdamW",
    "StableSPAM",
    "cosine_with_warmup",
    "exact_step",
    "prune_adam_state",
    "state_bytes",
]

