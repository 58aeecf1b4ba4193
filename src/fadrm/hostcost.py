"""Host cost of a piece of work, counted exactly: operators dispatched and scalars read back.

On a GPU the host issues every operator (at least one kernel launch each) and waits at
every value it reads back; when those dominate, the device idles. Both are counted the same
on any machine by intercepting the dispatcher, so a CPU run predicts the host side of a GPU
run without one. Counts are of ATen operators as dispatched (views included, since each
costs the host a dispatch), after autograd, so a backward pass is counted too.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

# Operators that hand a tensor's value to Python (``.item()``, ``float(t)``, ``bool(t)``,
# ``if t:``): on a GPU each one waits for every queued kernel.
SCALAR_READS = frozenset({"aten._local_scalar_dense.default"})


@dataclass
class HostCost:
    """What a counted region dispatched: operators by name and scalar reads."""

    ops: collections.Counter = field(default_factory=collections.Counter)
    scalar_reads: float = 0

    @property
    def total(self) -> float:
        """Operators dispatched, scalar reads included."""
        return sum(self.ops.values())

    def __add__(self, other: "HostCost") -> "HostCost":
        return HostCost(self.ops + other.ops, self.scalar_reads + other.scalar_reads)

    def __sub__(self, other: "HostCost") -> "HostCost":
        ops = collections.Counter(self.ops)
        ops.subtract(other.ops)
        return HostCost(+ops, self.scalar_reads - other.scalar_reads)

    def scaled(self, factor: float) -> "HostCost":
        """Every count times ``factor`` (e.g. per iteration from a count over several)."""
        return HostCost(collections.Counter({op: n * factor for op, n in self.ops.items()}), self.scalar_reads * factor)


class CountHostCost(TorchDispatchMode):
    """Context manager counting every ATen operator dispatched inside it (autograd's included).

    ``with CountHostCost() as counted: ...`` then ``counted.cost``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cost = HostCost()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func)
        self.cost.ops[name] += 1
        if name in SCALAR_READS:
            self.cost.scalar_reads += 1
        return func(*args, **(kwargs or {}))
