"""Robustness scores of a distilled set: how much of its accuracy survives without soft labels and augmentation.

The field's evaluation benchmark (DD-Ranking) scores a distilled set against a
random real subset of the same size trained the same way. With every accuracy a
**fraction** of the real validation set (top-1 after the last epoch; nothing is
chosen on the validation set):

* HLR, hard label recovery = full-data hard - distilled hard (lower is better);
* IOR, improvement over random = distilled soft - random soft (higher is better);
* LRS, label-robust score = (exp(a) - exp(-1)) / (e - exp(-1)), a = lam IOR - (1 - lam) HLR;
* ARS, augmentation-robust score = the same map of b = lam (distilled - random, augmented)
  + (1 - lam) (distilled - random, not augmented), soft labels throughout;

with lam = 0.5. Since every difference lies in [-1, 1], a and b do too, and LRS and ARS lie in [0, 1].
DD-Ranking's own code feeds percentages into the exponentials, which leaves that range; here
fractions are used, so the scores are comparable with its documented definition, not its output.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

from .baselines import DISTILLED, FULL_DATA

LAMBDA = 0.5
SCORES = ("hlr", "ior", "lrs", "ars")


def _unit_exponential(x: float) -> float:
    """Maps [-1, 1] monotonically onto [0, 1]: (exp(x) - exp(-1)) / (e - exp(-1))."""
    return (math.exp(x) - math.exp(-1)) / (math.e - math.exp(-1))


def label_robust_score(hlr: float, ior: float, lam: float = LAMBDA) -> float:
    """LRS from HLR and IOR (fractions)."""
    return _unit_exponential(lam * ior - (1 - lam) * hlr)


def augmentation_robust_score(gap_augmented: float, gap_plain: float, lam: float = LAMBDA) -> float:
    """ARS from the distilled-minus-random accuracy gaps with and without augmentation (fractions)."""
    return _unit_exponential(lam * gap_augmented + (1 - lam) * gap_plain)


def scores(accuracy: Mapping[tuple[str, str, bool], float]) -> dict[str, float]:
    """The scores that ``accuracy`` allows, keyed as :data:`SCORES`.

    ``accuracy`` maps (training set, labels, augmented) to a fraction, e.g.
    ``("distilled", "hard", True)``; scores whose accuracies are missing are left out.
    """
    out: dict[str, float] = {}
    full, hard = accuracy.get((FULL_DATA, "hard", True)), accuracy.get((DISTILLED, "hard", True))
    soft, random_soft = accuracy.get((DISTILLED, "soft", True)), accuracy.get(("random-real", "soft", True))
    if full is not None and hard is not None:
        out["hlr"] = full - hard
    if soft is not None and random_soft is not None:
        out["ior"] = soft - random_soft
    if "hlr" in out and "ior" in out:
        out["lrs"] = label_robust_score(out["hlr"], out["ior"])
    plain, random_plain = accuracy.get((DISTILLED, "soft", False)), accuracy.get(("random-real", "soft", False))
    if "ior" in out and plain is not None and random_plain is not None:
        out["ars"] = augmentation_robust_score(out["ior"], plain - random_plain)
    return out


def robustness_summary(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per student, each computable score's mean and sample standard deviation over the seeds.

    Each seed's scores use that seed's runs; the full-data run is one per student, shared by
    every seed. Students without any computable score are left out.
    """
    rows = []
    for student in dict.fromkeys(run["student"] for run in runs):
        mine = [run for run in runs if run["student"] == student]
        shared = {
            (r["train_set"], r["labels"], r.get("augment", True)): r["top1"] / 100
            for r in mine
            if r["train_set"] == FULL_DATA
        }
        per_seed = []
        for seed in dict.fromkeys(r["seed"] for r in mine if r["train_set"] == DISTILLED):
            accuracy = {
                **shared,
                **{
                    (r["train_set"], r["labels"], r.get("augment", True)): r["top1"] / 100
                    for r in mine
                    if r["seed"] == seed and r["train_set"] != FULL_DATA
                },
            }
            per_seed.append(scores(accuracy))
        row: dict[str, Any] = {"student": student, "repeats": len(per_seed)}
        for name in SCORES:
            values = [s[name] for s in per_seed if name in s]
            if values:
                row[name] = statistics.fmean(values)
                row[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        if any(name in row for name in SCORES):
            rows.append(row)
    return rows
