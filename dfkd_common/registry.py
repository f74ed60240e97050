"""Name -> component registries.

Every pluggable piece (datasets, models, generators, synthesis methods, loss terms, distillation losses) is
registered by name with a decorator, so adding a method is a new module, never an edit of a central
``if/elif`` switch. Unknown names raise :class:`~dfkd_common.errors.DfkdError` listing what exists, which the
CLI turns into a one-line message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from dfkd_common.errors import DfkdError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named mapping of components filled by the ``@registry.register("name")`` decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise DfkdError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
