"""A small generic name -> object registry (datasets, models, methods)."""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from .errors import FadrmError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; an unknown name fails listing the valid ones.

    Args:
        kind: what the registry holds, used in error messages ("model", "dataset").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` under ``name``; registering a name twice is a bug."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj
        return obj

    def get(self, name: str) -> T:
        """Return the entry for ``name`` or raise a FadrmError listing the valid names."""
        try:
            return self._entries[name]
        except KeyError:
            raise FadrmError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
