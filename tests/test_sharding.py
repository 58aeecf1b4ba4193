"""torchrun: two gloo processes give the same distilled set as one process, each unit done once, and train
the same students and teachers as one process within float tolerance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fadrm
from fadrm.teachers import load_teacher
from test_distill import pngs

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _distill(fmnist_root: Path, teacher: Path, *options: str) -> list[str]:
    """A quick two-stage distillation of the fixture on the CPU, with ``options``."""
    return [
        "distill",
        "--dataset",
        "fashion-mnist",
        "--data-root",
        str(fmnist_root),
        "--teacher",
        str(teacher),
        "--sizes",
        "24",
        "28",
        "--budgets",
        "3",
        "3",
        "--mipc",
        "16",
        "--num-crop",
        "2",
        "--device",
        "cpu",
        *options,
    ]


def _one_and_two_processes(command: list[str], tmp_path: Path) -> dict[str, str]:
    """Run ``fadrm COMMAND`` into tmp_path/one in one process and into tmp_path/two under torchrun
    with two, one thread each; returns that environment."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "fadrm", *command, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert single.returncode == 0, single.stderr
    sharded = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "fadrm", *command, "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    return env


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside this python")
def test_two_processes_equal_one(fmnist_root, teacher_ckpt, tmp_path):
    common = _distill(fmnist_root, teacher_ckpt, "--ipc", "3", "--classes-per-group", "5", "--groups-per-batch", "1")
    env = _one_and_two_processes(common, tmp_path)
    assert pngs(tmp_path / "one" / "images") == pngs(tmp_path / "two" / "images")
    assert pngs(tmp_path / "one" / "init") == pngs(tmp_path / "two" / "init")
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["images"]) == 30
    ranks = [u["rank"] for u in manifest["units"]]
    assert sorted(set(ranks)) == [0, 1] and len(manifest["units"]) == 6  # each unit once, both ranks worked
    # A rank that died leaves unit records missing; rerunning (even in one process) finishes the job.
    for record in sorted((tmp_path / "two" / "state" / "units").glob("*.json"))[::2]:
        record.unlink()
    (tmp_path / "two" / "manifest.json").unlink()
    rerun = subprocess.run(
        [sys.executable, "-m", "fadrm", *common, "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert pngs(tmp_path / "one" / "images") == pngs(tmp_path / "two" / "images")


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside this python")
def test_two_processes_equal_one_with_the_default_batching(fmnist_root, teacher_ckpt, tmp_path):
    # Default settings: on the CPU a batch holds 100 images, here 10 groups of 10 classes, so IPC 11
    # plans two batches of unequal size; one process runs both, two processes one each. The batches
    # are planned before they are shared out, so every image is computed in the same company.
    common = _distill(fmnist_root, teacher_ckpt, "--ipc", "11", "--classes-per-group", "10")
    _one_and_two_processes(common, tmp_path)
    assert pngs(tmp_path / "one" / "images") == pngs(tmp_path / "two" / "images")
    units = json.loads((tmp_path / "two" / "manifest.json").read_text())["units"]
    assert sorted({u["rank"] for u in units}) == [0, 1] and sorted({u["batched_groups"] for u in units}) == [1, 10]


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside this python")
def test_two_processes_equal_one_for_class_major_units(fmnist_root, teacher_ckpt, tmp_path):
    # G-VBSM: groups of 5 classes x 2 slots, one group per batch; its statistics computed beforehand
    # (several processes refuse to compute a missing file each).
    stats = ["--stats-dir", str(tmp_path / "stats")]
    fadrm.compute_statistics(
        "fashion-mnist", teacher_ckpt, data_root=str(fmnist_root), stats_dir=stats[1], device="cpu", log=lambda s: None
    )
    common = _distill(
        fmnist_root,
        teacher_ckpt,
        "--method",
        "g-vbsm",
        "--ipc",
        "2",
        "--group-images",
        "10",
        "--groups-per-batch",
        "1",
        *stats,
    )
    _one_and_two_processes(common, tmp_path)
    assert pngs(tmp_path / "one" / "images") == pngs(tmp_path / "two" / "images")
    units = json.loads((tmp_path / "two" / "manifest.json").read_text())["units"]
    assert [u["unit"] for u in units] == ["ipc0000-0001-group0000", "ipc0000-0001-group0001"]
    assert sorted(u["rank"] for u in units) == [0, 1]


# ------------------------------------------------ one model, several processes
# K processes change only the order of float additions (gradients averaged over the ranks,
# BatchNorm sums over the ranks), as another thread count does in one process; after these few
# steps the weights agree to about 1e-6. A wrong BatchNorm batch or gradient weighting is off by
# about 1e-2 after the same steps, so this tolerance tells the two apart.
WEIGHT_TOLERANCE = dict(rtol=1e-4, atol=2e-4)


def _assert_same_weights(one: Path, two: Path) -> None:
    a, b = (load_teacher(path).model.state_dict() for path in (one, two))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), **WEIGHT_TOLERANCE), key


@pytest.mark.slow
def test_two_processes_train_the_students_of_one(distilled, fmnist_root, tmp_path):
    # BSSL labels live under two processes (each labels one half), stored labels (rank 0 writes
    # them, the other waits) for the distilled set, and hard labels for the random real baseline.
    command = [
        "evaluate",
        str(distilled),
        "--data-root",
        str(fmnist_root),
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--eval-every",
        "1",
        "--bssl",
        "--labels",
        "stored",
        "--baseline",
        "random-real",
        "--device",
        "cpu",
        "--workers",
        "0",
    ]
    _one_and_two_processes(command, tmp_path)
    arms = ("distilled-convnet-small-soft", "random-real-convnet-small-soft", "random-real-convnet-small-hard")
    runs = sorted(path.name for path in (tmp_path / "two" / "runs").iterdir())
    assert runs == sorted(f"{arm}.{ext}" for arm in arms for ext in ("json", "pt"))  # no checkpoint left
    for arm in arms:
        _assert_same_weights(tmp_path / "one" / "runs" / f"{arm}.pt", tmp_path / "two" / "runs" / f"{arm}.pt")
        one, two = (
            json.loads((tmp_path / out / "runs" / f"{arm}.json").read_text())["result"] for out in ("one", "two")
        )
        # Validation is shared out by batch and added in batch order: the same model scores the same.
        assert [h["top5"] for h in one["history"]] == [h["top5"] for h in two["history"]]
        # The KL at T = 20 is about 1e-4 and a difference of near-equal distributions: 1e-3 relative.
        assert [h["train_loss"] for h in one["history"]] == pytest.approx(
            [h["train_loss"] for h in two["history"]], rel=1e-3
        )


@pytest.mark.slow
def test_two_processes_train_the_teacher_of_one(fmnist_root, tmp_path):
    command = [
        "train-teacher",
        "--dataset",
        "fashion-mnist",
        "--model",
        "convnet-small",
        "--model-arg",
        "width=4",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--data-root",
        str(fmnist_root),
        "--device",
        "cpu",
        "--workers",
        "0",
    ]
    _one_and_two_processes(command, tmp_path)
    _assert_same_weights(tmp_path / "one", tmp_path / "two")
    history = [torch.load(tmp_path / out, weights_only=True)["history"] for out in ("one", "two")]
    assert [h["top1"] for h in history[0]] == [h["top1"] for h in history[1]]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside this python")
def test_a_refusal_every_process_meets_is_printed_once(fmnist_root, tmp_path):
    """Two processes for batches of one image: each refuses alike, rank 0 alone says so (torchrun then adds
    its own report of the failed processes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = ["train-teacher", "--dataset", "fashion-mnist", "--model", "convnet-small", "--batch-size", "1"]
    command += ["--epochs", "1", "--device", "cpu", "--data-root", str(fmnist_root), "--out", str(tmp_path / "t.pt")]
    result = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "fadrm", *command],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    ours = [line for line in result.stderr.splitlines() if "fadrm: " in line]
    assert result.returncode != 0 and len(ours) == 1, result.stderr[-3000:]
    assert "2 processes need batches of at least 2 images; use fewer processes" in ours[0]
