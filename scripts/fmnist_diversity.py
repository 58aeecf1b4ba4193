"""How typical and how varied each training set of the study is, through the relabelling teacher's eyes.

    python scripts/fmnist_diversity.py --study runs/study --ipc 10 50 --seed 0

For each IPC, compares the random real subset the baselines train on with the
distilled sets of ``scripts/fmnist_study.py`` (same seed): the teacher's
accuracy and mean confidence on the un-augmented images, and the spread of
each class in the teacher's feature space (mean distance of an image's
L2-normalised penultimate features to its class centroid; 0 = all images of
a class look identical to the teacher). Forward passes only: seconds on a CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import fadrm
from fadrm.distilled import DistilledSet
from fadrm.baselines import random_real_subset
from fadrm.data.datasets import TrainingSet
from fadrm.data import get_dataset_spec, load_split, normalize
from fmnist_study import METHODS  # the study's methods, in its order (this script's folder is on sys.path)


@torch.no_grad()
def describe(teacher: torch.nn.Module, spec, training_set: TrainingSet) -> dict[str, float]:
    """Teacher accuracy and confidence on the images, and the mean within-class feature spread."""
    features: list[torch.Tensor] = []
    handle = teacher.classifier.register_forward_hook(lambda m, inputs, out: features.append(inputs[0]))
    try:
        logits = teacher(normalize(training_set.images.float().div(255), spec.mean, spec.std))
    finally:
        handle.remove()
    unit = torch.nn.functional.normalize(features[0], dim=1)
    labels = training_set.labels
    spread = []
    for label in labels.unique():
        members = unit[labels == label]
        spread.append((members - members.mean(0)).norm(dim=1).mean())
    probabilities = logits.softmax(1)
    return {
        "teacher_top1": float((logits.argmax(1) == labels).float().mean() * 100),
        "confidence": float(probabilities.max(1).values.mean()),
        "spread": float(torch.stack(spread).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="runs/study")
    parser.add_argument("--ipc", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    study = Path(args.study)
    spec = get_dataset_spec("fashion-mnist")
    teacher = fadrm.load_teacher(study / "teacher.pt", spec).model
    train = load_split(spec, "train")
    print("| IPC | training set | teacher top-1 (%) | teacher confidence | within-class spread |")
    print("|---:|---|---:|---:|---:|")
    for ipc in args.ipc:
        sets = [("random real", random_real_subset(train, spec, ipc, args.seed))]
        for method in METHODS:
            folder = study / f"{method}-ipc{ipc}-seed{args.seed}"
            if (folder / "manifest.json").exists():
                sets.append((method, TrainingSet(method, *DistilledSet.open(folder).images())))
        for name, training_set in sets:
            d = describe(teacher, spec, training_set)
            print(f"| {ipc} | {name} | {d['teacher_top1']:.1f} | {d['confidence']:.3f} | {d['spread']:.3f} |")


if __name__ == "__main__":
    main()
