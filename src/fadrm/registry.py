"""A small generic name -> object registry (datasets, models, methods, optimisers, ...).

Every registry is also indexed by its kind, so that code below the modules that fill
them (the config's validation) can name them without importing those modules: asked for by
kind, a registry not yet made is loaded from the module that fills it (:data:`PROVIDERS`), so
``import fadrm`` need not import every stage (and PyTorch) up front.
"""

from __future__ import annotations

import importlib
from typing import Any, Generic, Iterator, TypeVar

from .errors import FadrmError

T = TypeVar("T")

_BY_KIND: dict[str, "Registry[Any]"] = {}
# The module that makes and fills each kind of registry (a test checks that every kind is here).
PROVIDERS = {
    "model": "fadrm.models",
    "dataset": "fadrm.data",
    "augmentation": "fadrm.rand_augment",
    "mix": "fadrm.augment",
    "patch scoring": "fadrm.synthesis.patches",
    "unit plan": "fadrm.synthesis.units",
    "initialiser": "fadrm.synthesis.init",
    "statistics matcher": "fadrm.synthesis.matching",
    **dict.fromkeys(("method", "stage plan", "teacher policy"), "fadrm.synthesis.methods"),
    **dict.fromkeys(("optimizer", "schedule", "loss"), "fadrm.students"),
    **dict.fromkeys(("baseline", "real subset"), "fadrm.baselines"),
}


class Registry(Generic[T]):
    """Maps names to objects; an unknown name fails listing the valid ones.

    Args:
        kind: what the registry holds, used in error messages ("model", "dataset").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        _BY_KIND.setdefault(kind, self)  # the package's own; a stand-in made later (a test's) is not indexed

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


def registry(kind: str) -> Registry[Any]:
    """The package's registry of ``kind`` ("method", "optimizer", "mix", ...), loaded on first use."""
    if kind not in _BY_KIND:
        importlib.import_module(PROVIDERS[kind])
    return _BY_KIND[kind]
