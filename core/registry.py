"""Named things of one sort, registered one way: commands, engines, benchmark kinds, judge
backends and merge methods each have one ``Registry``.

An entry is the thing itself, or ``"module:attribute"`` imported the first time it is asked for,
so listing the names (``chatvec --help``, an error message) imports nothing heavy and an engine
whose library is missing (vLLM) costs nothing until it is used. Extensions register the same way
the shipped entries are registered::

    from chatvec.eval.kinds import KINDS
    KINDS.register("my-kind", "my_package.kinds:MyKind")
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from chatvec.core.errors import InputError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str) -> None:
        self.what = what  # "engine", "benchmark kind", ...: used in error messages
        self._entries: dict[str, Any] = {}
        self._summaries: dict[str, str] = {}

    def register(self, name: str, target: Any = None, *, summary: str = ""):
        """Add ``target`` (an object or ``"module:attribute"``) under ``name``; without a target,
        a decorator that registers what it decorates."""
        if target is None:

            def decorate(obj: T) -> T:
                self.register(name, obj, summary=summary)
                return obj

            return decorate
        if not name:
            raise ValueError(f"a {self.what} needs a name")
        self._entries[name] = target
        self._summaries[name] = summary
        return target

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise InputError(f"unknown {self.what} {name!r}; choose one of: {', '.join(self.names())}")
        target = self._entries[name]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
            self._entries[name] = target
        return target

    get = __getitem__

    def target(self, name: str) -> str:
        """Where an entry lives, without importing it: ``"module:attribute"``."""
        entry = self._entries[name]
        if isinstance(entry, str):
            return entry
        module = getattr(entry, "__module__", type(entry).__module__)
        return f"{module}:{getattr(entry, '__qualname__', type(entry).__qualname__)}"

    def summary(self, name: str) -> str:
        return self._summaries.get(name, "")

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        for name in self.names():
            yield name, self[name]
