"""The one source of derived randomness: every seed and generator comes from here.

Each random stream is derived from the run seed and the identity of what it
drives (a synthesis unit, an epoch's order, a batch's views, ...), never from
a shared global state, so results do not depend on which process computes
what, or in which order. Changing any function here changes every output.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the run seed and a unit's identity (stable across Python versions)."""
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def make_generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


def epoch_seed(seed: int, epoch: int) -> int:
    """Teacher training's per-epoch seed (global RNG and loader shuffle): ``seed * 100_003 + epoch``.

    Kept exactly so that teacher runs started by earlier versions resume identically.
    """
    return seed * 100_003 + epoch


def global_random_state(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's global generators (the CPU's, and ``device``'s when it is a GPU), for a checkpoint.

    Student views never draw from them; a student with dropout does.
    """
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_global_random_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put back what :func:`global_random_state` saved (a GPU's state only on a GPU)."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
