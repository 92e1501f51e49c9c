"""The one registry pattern: a named mapping from strings to builders, with clear errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object mapping used for datasets, models, attacks and defenses.

    Names are case-insensitive; registering a taken name is an error unless ``overwrite=True``.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, overwrite: bool = False) -> Any:
        """Register ``obj`` under ``name``; without ``obj`` acts as a decorator."""
        if obj is None:
            def deco(o: T) -> T:
                self.register(name, o, overwrite=overwrite)
                return o

            return deco
        key = name.lower()
        if key in self._items and not overwrite and self._items[key] is not obj:
            raise KeyError(f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it")
        self._items[key] = obj
        return obj

    def get(self, name: str) -> T:
        key = str(name).lower()
        if key not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; expected one of: {', '.join(sorted(self._items))}")
        return self._items[key]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Build: look up ``name`` and call it with the given arguments."""
        return self.get(name)(*args, **kwargs)
