"""A run's identity: the settings that define its result, and the history that keeps old results valid.

A resume, a reused student or a reused label store is accepted only for the same identity. The
identity is every option declared ``defines=True``, except where :data:`UNCHANGED_SINCE` says an
option added in a later release is left out: at the value that reproduces what every run before
it did, so the results those runs wrote keep their identity (and are reused, not redone).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from .options import Options, flatten, key_of, option_fields

# A predicate on the flat settings of a run: true when the option it is filed under acts as it
# did before the option existed (so it stays out of the identity).
AsBefore = Callable[[Mapping[str, Any]], bool]


def at(key: str, value: Any) -> AsBefore:
    """Out of the identity while ``key`` is absent or holds ``value``."""
    return lambda flat: flat.get(key, value) == value


def unset(key: str) -> AsBefore:
    """Out of the identity while ``key`` is absent, empty, zero or off."""
    return lambda flat: not flat.get(key)


def other_than(key: str, value: Any) -> AsBefore:
    """Out of the identity while ``key`` holds anything but ``value`` (an option that acts only with it)."""
    return lambda flat: flat.get(key) != value


def either(*rules: AsBefore) -> AsBefore:
    """Out of the identity while any of ``rules`` holds."""
    return lambda flat: any(rule(flat) for rule in rules)


# Per stage section, per option key: when a defining option added after the first release stays
# out of the identity; each group names the release that added it.
UNCHANGED_SINCE: dict[str, dict[str, AsBefore]] = {
    "distill": {
        # 0.3, for G-VBSM, EDC and CV-DD: at the values that leave every earlier method's maths as it was.
        "stat_ema": at("stat_ema", 0.0),
        "conv_drop": at("conv_drop", 0.0),
        "dd_weight": at("dd_weight", 0.0),
        "group_images": at("group_images", None),
        "group_slots": at("group_slots", None),
        "committee_size": at("committee_size", 1),
        "fixed_committee": at("fixed_committee", None),
        "priors": at("priors", None),
        # Patches fill the image at factor 1, where either scoring gives the same ranking.
        "patch_scoring": at("factor", 1),
    },
    "evaluate": {
        # 0.3: the only behaviour before.
        "schedule": at("schedule", "stretched-cosine"),
        "loss": at("loss", "kl"),
        # 0.3, for the students of G-VBSM, EDC and CV-DD; momentum acts with SGD only.
        "momentum": either(at("momentum", 0.9), other_than("optimizer", "sgd")),
        "ce_weight": other_than("loss", "mse-ce"),
        "ema_decay": unset("ema_decay"),
        "rand_augment": unset("rand_augment"),
        "teacher_priors": unset("teacher_priors"),
        "prior_temperature": unset("teacher_priors"),
        "balance_teachers": unset("balance_teachers"),
        # 0.4: the only behaviour before.
        "augment": at("augment", True),
    },
}


def defining_settings(cls: type[Options], values: Mapping[str, Any]) -> dict[str, Any]:
    """The settings among ``values`` (a config of stage ``cls`` as a dict, nested or flat) that
    define the result.

    Options declared with ``defines=False`` are left out, and so is one that
    :data:`UNCHANGED_SINCE` finds as it was before it existed; keys the stage does not declare
    (written by another version) are kept, so they keep distinguishing results.
    """
    declared = {key_of(f): f for _, f in option_fields(cls)}
    as_before = UNCHANGED_SINCE.get(getattr(cls, "SECTION", ""), {})
    kept = {k: v for k, v in flatten(cls, values).items() if k not in declared or declared[k].metadata["defines"]}
    return {k: v for k, v in kept.items() if not (k in declared and k in as_before and as_before[k](kept))}
