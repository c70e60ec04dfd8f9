"""The method registry: the only place that knows which methods exist.

A method is one file in this folder plus one line here; entries are imported on first use.
What else is optional (tuned defaults, golden loss curve, docs, demo): docs/methods.md, "Adding a method".
"""

from __future__ import annotations

from rankscope.methods.base import Method
from rankscope.registry import Registry

REGISTRY: Registry[type[Method]] = Registry("method")
REGISTRY.register("full", "rankscope.methods.full:FullRank")
REGISTRY.register("lowrank", "rankscope.methods.lowrank:LowRank")
REGISTRY.register("lora", "rankscope.methods.lora:LoRA")
REGISTRY.register("relora", "rankscope.methods.relora:ReLoRA")
REGISTRY.register("switchlora", "rankscope.methods.switchlora:SwitchLoRA")
REGISTRY.register("galore", "rankscope.methods.galore:GaLore")
REGISTRY.register("golore", "rankscope.methods.golore:GoLore")
REGISTRY.register("fira", "rankscope.methods.fira:Fira")
REGISTRY.register("sltrain", "rankscope.methods.sltrain:SLTrain")
REGISTRY.register("cola", "rankscope.methods.cola:CoLA")
REGISTRY.register("loro", "rankscope.methods.loro:LORO")
REGISTRY.register("spectron", "rankscope.methods.spectron:Spectron")
REGISTRY.register("apollo", "rankscope.methods.apollo:APOLLO")
REGISTRY.register("apollo_mini", "rankscope.methods.apollo:APOLLOMini")
REGISTRY.register("spam", "rankscope.methods.spam:SPAMMethod")
REGISTRY.register("stable_spam", "rankscope.methods.stable_spam:StableSPAMMethod")
REGISTRY.register("frozen", "rankscope.methods.frozen:FrozenBlocks")


def names() -> list[str]:
    return REGISTRY.names()


def get(name: str) -> type[Method]:
    return REGISTRY.get(name)


def is_control(name: str) -> bool:
    """Whether `name` is a control (a reference row such as `frozen`), not a method to rank."""
    return bool(getattr(REGISTRY.get(name), "is_control", False))


def method_names() -> list[str]:
    """The registered methods that are not controls."""
    return [name for name in names() if not is_control(name)]


def control_names() -> list[str]:
    return [name for name in names() if is_control(name)]
