"""The figures an evaluation reports: every run, their means over the repeats, the robustness scores."""

from __future__ import annotations

import statistics
from typing import Any, Sequence

from ..robustness import robustness_summary
from ..teachers import Teacher
from .plan import EvaluatedSet, EvaluationPlan
from .store import LabelStore, stored_label_bytes


def summarise(
    plan: EvaluationPlan,
    distilled_set: EvaluatedSet,
    teachers: Sequence[Teacher],
    runs: list[dict[str, Any]],
    stores: Sequence[LabelStore],
) -> dict[str, Any]:
    """The results of an evaluation as ``results.json`` holds them: the set, the settings, every run
    in the order it was planned, the means over the repeats, the robustness scores where the arms
    allow them, and the stored labels' size."""
    config = plan.config
    results: dict[str, Any] = {
        "distilled": str(config.distilled),
        "dataset": distilled_set.dataset,
        "method": distilled_set.method,
        "ipc": distilled_set.ipc,
        "protocol": config.protocol,
        "images_per_class": list(distilled_set.images_per_class),
        "teachers": [t.describe() for t in teachers],
        "config": config.to_dict(),
        "runs": runs,
        "summary": summarise_runs(runs),
    }
    robustness = robustness_summary(runs)
    if robustness:
        results["robustness"] = robustness
    if stores:
        results["stored_labels"] = {
            "dirs": [str(store.folder) for store in stores],
            "bytes": sum(store.bytes_on_disk() for store in stores),
            "bytes_per_image_per_epoch": stored_label_bytes(len(distilled_set.class_names), config.topk),
        }
    return results


def summarise_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation of the final top-1/top-5 and the best top-1 over the repeats
    of each (student, set, labels, augmentation)."""
    groups: dict[tuple[str, str, str, bool], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["student"], run["train_set"], run["labels"], run.get("augment", True)), []).append(run)
    summary = []
    for (student, train_set, labels, augment), members in groups.items():
        row: dict[str, Any] = {
            "student": student,
            "train_set": train_set,
            "labels": labels,
            "augment": augment,
            "repeats": len(members),
        }
        for metric in ("top1", "top5", "best_top1"):
            values = [m[metric] for m in members]
            row[metric] = statistics.fmean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(row)
    return summary
