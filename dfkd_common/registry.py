"""Name -> component registries, filled lazily from the declared index.

Every pluggable piece (tasks, model sources, datasets, models, generators, synthesis methods, loss terms, student
terms, online feeds, variation models, key maps) is registered by name with a decorator, so adding a method is a
new module and one line in :mod:`dfkd_common.index`, never an edit of a central ``if/elif`` switch.

Why lazy: a stage should import (and its DVC stage depend on) only the code it runs. :meth:`Registry.get` imports
the module the index names for a name the first time it is asked for; :meth:`Registry.names` lists the index
without importing anything. Each registration records the module whose top level made it
(:meth:`Registry.origin`), which is how the registry test holds the index to the code. Unknown names raise
:class:`~dfkd_common.errors.DfkdError` listing what exists, which the CLI turns into a one-line message.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from dfkd_common.errors import DfkdError
from dfkd_common.index import INDEX

T = TypeVar("T")


def _registering_module() -> str:
    """The module whose top-level code is running the registration (decorators sit at module level, possibly
    inside a helper such as the synthesis terms' ``@term``): the innermost ``<module>`` frame on the stack."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_name != "<module>":
        frame = frame.f_back  # type: ignore[assignment]
    return str(frame.f_globals.get("__name__", "?")) if frame is not None else "?"


class Registry(Generic[T]):
    """A named mapping of components filled by the ``@registry.register("name")`` decorator.

    ``kind`` names the registry in messages and selects its entries in :data:`dfkd_common.index.INDEX`.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.index: dict[str, str] = INDEX.get(kind, {})
        self._items: dict[str, T] = {}
        self._origin: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            self._origin[name] = _registering_module()
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items and name in self.index:
            importlib.import_module(self.index[name])
            if name not in self._items:  # the index and the code disagree: a bug, never the user's input
                raise RuntimeError(f"dfkd_common/index.py says {self.index[name]} registers the {self.kind} "
                                   f"{name!r}, and it does not")
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise DfkdError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def names(self) -> list[str]:
        """Every name: the index's (imported or not) and any registered outside it (a user's own, a test's)."""
        return sorted(set(self.index) | set(self._items))

    def origin(self, name: str) -> str | None:
        """The module that registered ``name`` (None: not imported yet)."""
        return self._origin.get(name)

    def load_all(self) -> None:
        """Import every module the index names for this registry (tests, tools that list everything)."""
        for module in sorted(set(self.index.values())):
            importlib.import_module(module)

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
