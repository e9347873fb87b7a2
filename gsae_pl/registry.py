"""Named plug-ins: architectures, loss terms, evaluations register themselves by name.

A plug-in is one file in its package. The first lookup imports every module of that package,
so a new file registers itself and no list elsewhere is edited; choice lists in configs and
messages are read from here, never copied.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from gsae_pl.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> plug-in, for the config key `key` (e.g. "sae.architecture"), filled by the
    modules of `package` as they are imported."""

    def __init__(self, key: str, package: str, order: tuple[str, ...] = ()):
        """`order`: the names that come first, in this order, wherever entries are listed
        (choice lists, schema blocks, the sum of the loss terms); the others follow by name.
        So the order is declared, never the order files happen to be imported in."""
        self.key, self.package, self.order = key, package, tuple(order)
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise RuntimeError(f"{self.key}: two plug-ins named {name!r}")
            self._entries[name] = entry
            return entry
        return add

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # before importing: a plug-in module may itself look names up
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{module.name}")

    def _rank(self, name: str) -> tuple[int, str]:
        return (self.order.index(name) if name in self.order else len(self.order), name)

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(sorted(self._entries, key=self._rank))

    def items(self) -> Iterator[tuple[str, T]]:
        return iter([(name, self._entries[name]) for name in self.names()])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())  # like the name -> plug-in dict it replaces

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __getitem__(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            raise UserError(f"{self.key}={name} is not one of: {', '.join(self.names())}")
        return self._entries[name]
