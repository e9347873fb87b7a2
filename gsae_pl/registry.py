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

    def __init__(self, key: str, package: str):
        self.key, self.package = key, package
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

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        self._load()
        return iter(list(self._entries.items()))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __getitem__(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            raise UserError(f"{self.key}={name} is not one of: {', '.join(self._entries)}")
        return self._entries[name]
