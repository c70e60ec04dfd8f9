"""A small generic registry with lazy entries and did-you-mean errors."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from rankscope.errors import RankscopeError, did_you_mean

T = TypeVar("T")


@dataclass
class _Entry:
    target: Any
    description: str


class Registry(Generic[T]):
    """Maps names to objects; a target given as "package.module:attr" is imported on first use."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, _Entry] = {}

    def register(self, name: str, target: Any, description: str = "") -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = _Entry(target, description)

    def get(self, name: str) -> T:
        entry = self._entries.get(name)
        if entry is None:
            raise RankscopeError(f"unknown {self.kind} {name!r}{did_you_mean(name, self._entries)}")
        if isinstance(entry.target, str):
            module_name, _, attr = entry.target.partition(":")
            entry.target = getattr(importlib.import_module(module_name), attr)
        return entry.target

    def describe(self, name: str) -> str:
        self.get(name)
        return self._entries[name].description

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
