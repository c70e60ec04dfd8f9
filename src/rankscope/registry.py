"""A small generic registry with lazy entries and did-you-mean errors."""

from __future__ import annotations

import importlib
from typing import Any, Generic, TypeVar

from rankscope.errors import RankscopeError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; a target given as "package.module:attr" is imported on first use."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str, target: Any) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = target

    def unregister(self, name: str) -> None:
        """Remove an entry (tests register throwaway entries and take them out again)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise RankscopeError(f"unknown {self.kind} {name!r}{did_you_mean(name, self._entries)}")
        target = self._entries[name]
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            target = self._entries[name] = getattr(importlib.import_module(module_name), attr)
        return target

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
