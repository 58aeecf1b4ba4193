"""Generated damage: every kind of file fadrm writes, damaged five ways, then the same command again.

For each file a distillation or an evaluation writes, and each damage (truncated, emptied, bytes
flipped, deleted, replaced by the same file of a run of other settings), the rerun either gives
exactly the undamaged run's result or stops with one line (exit 2) naming what to do; never a
stale result, never a traceback or "internal error". Where fadrm can remake the file it must:
those cases are listed in :data:`REMADE` and must finish with the undamaged result.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import fadrm.evaluation.run as evaluation_run
from conftest import quick_teacher_config, rded_distill_argv, run_cli

DAMAGES = ("truncated", "emptied", "flipped", "deleted", "replaced")

# Relative to the set: one file of each kind a distillation writes.
SET_FILES = (
    "run.json",
    "config.yaml",
    "manifest.json",
    "state/units/ipc0000-group0000.json",
    "state/init/class00000.json",
    "images/000_T-shirt_top/000.png",
    "init/000_T-shirt_top/000.png",
)
# Relative to the evaluation folder: one file of each kind an evaluation writes.
SOFT = "runs/distilled-convnet-small-soft"
EVAL_FILES = (
    "evaluation.json",
    "config.yaml",
    "results.json",
    f"{SOFT}.json",
    f"{SOFT}.pt",
    f"{SOFT}.partial.pt",
    "labels/labels.json",
    "labels/epoch00000.safetensors",
    "labels/epoch00000.sha256",
)
# (file, damage) pairs that may end in a refusal: without its run.json a set's files cannot be told
# apart from another run's, and a run.json of other settings (or one whose flipped bytes still read
# as JSON of other settings) is a different run.
MAY_REFUSE = {("run.json", "deleted"), ("run.json", "replaced"), ("run.json", "flipped")}
EVAL_ARGS = ("--epochs", "2", "--labels", "stored", "--baseline", "hard-labels", "--device", "cpu")


def damage(path: Path, how: str, other: Path) -> None:
    """Damage ``path`` in place (``other``: the same file of a run of other settings)."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "emptied":
        path.write_bytes(b"")
    elif how == "flipped":
        middle = bytearray(data)
        for offset in (len(data) // 3, len(data) // 2, 2 * len(data) // 3):
            middle[offset] ^= 0xFF
        path.write_bytes(bytes(middle))
    elif how == "deleted":
        path.unlink()
    else:
        shutil.copyfile(other, path)


def set_result(folder: Path) -> dict[str, object]:
    """What a distillation produced: every distilled image's bytes and the manifest's image records."""
    images = {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((folder / "images").rglob("*.png"))
    }
    return {"images": images, "records": json.loads((folder / "manifest.json").read_text())["images"]}


def eval_result(folder: Path) -> list[tuple]:
    """What an evaluation reported: each run's accuracies."""
    runs = json.loads((folder / "results.json").read_text())["runs"]
    return sorted((r["student"], r["train_set"], r["labels"], r["top1"], r["top5"], r["best_top1"]) for r in runs)


def one_clear_line(status: int, err: list[str]) -> bool:
    return status == 2 and len(err) == 1 and err[0].startswith("fadrm: error:") and "internal error" not in err[0]


@pytest.fixture(scope="module")
def sets(fmnist_root, teacher_ckpt, tmp_path_factory) -> dict[str, Path]:
    """The reference set (seed 0), a set of other settings (seed 1), each evaluated, and an unfinished
    evaluation of the reference (its soft student's checkpoint after one epoch)."""
    root = tmp_path_factory.mktemp("damage")
    folders = {}
    for name, seed in (("reference", "0"), ("other", "1")):
        folders[name] = root / name
        assert run_cli_quiet(rded_distill_argv(fmnist_root, teacher_ckpt, folders[name], "--seed", seed)) == 0
        argv = ["evaluate", str(folders[name]), *EVAL_ARGS, "--data-root", str(fmnist_root)]
        assert run_cli_quiet(argv) == 0
    # An evaluation stopped once the soft student's first epoch was saved keeps its checkpoint: one of
    # each set is put beside its finished evaluation.
    original = evaluation_run.write_finished_run

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    for name in ("reference", "other"):
        unfinished = root / f"{name}-unfinished"
        shutil.copytree(folders[name], unfinished, ignore=shutil.ignore_patterns("eval"))
        evaluation_run.write_finished_run = stop
        try:
            run_cli_quiet(["evaluate", str(unfinished), *EVAL_ARGS, "--data-root", str(fmnist_root)])
        finally:
            evaluation_run.write_finished_run = original
        partial = f"eval/{SOFT}.partial.pt"
        shutil.copyfile(unfinished / partial, folders[name] / partial)
    return folders


def run_cli_quiet(argv: list[str]) -> int:
    from fadrm.cli import main

    try:
        return main(argv)
    except SystemExit as exit_info:
        return int(exit_info.code or 0)


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("relative", SET_FILES)
def test_a_damaged_set_file_is_remade_or_one_clear_line(
    relative, how, sets, fmnist_root, teacher_ckpt, tmp_path, capsys
):
    folder = tmp_path / "set"
    shutil.copytree(sets["reference"], folder, ignore=shutil.ignore_patterns("eval"))
    damage(folder / relative, how, sets["other"] / relative)
    capsys.readouterr()
    status, _, err = run_cli(rded_distill_argv(fmnist_root, teacher_ckpt, folder), capsys)
    if (relative, how) in MAY_REFUSE and status != 0:
        assert one_clear_line(status, err), err
        return
    assert status == 0, err
    assert set_result(folder) == set_result(sets["reference"])


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("relative", EVAL_FILES)
def test_a_damaged_evaluation_file_is_remade(relative, how, sets, fmnist_root, tmp_path, capsys):
    folder = tmp_path / "set"
    shutil.copytree(sets["reference"], folder)
    damage(folder / "eval" / relative, how, sets["other"] / "eval" / relative)
    if relative.endswith(".partial.pt"):
        (folder / "eval" / f"{SOFT}.json").unlink()  # the student is unfinished: its checkpoint is read
    capsys.readouterr()
    status, _, err = run_cli(["evaluate", str(folder), *EVAL_ARGS, "--data-root", str(fmnist_root)], capsys)
    if status == 2 and relative.endswith(".partial.pt"):
        # A checkpoint that loads but cannot be restored is set aside; the same command then starts again.
        assert one_clear_line(status, err) and "run the same command again" in err[0], err
        status, _, err = run_cli(["evaluate", str(folder), *EVAL_ARGS, "--data-root", str(fmnist_root)], capsys)
    assert status == 0, err
    assert eval_result(folder / "eval") == eval_result(sets["reference"] / "eval")


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("part", ["file", "description", "partial"])
def test_a_damaged_statistics_file_is_computed_again(part, how, fmnist_root, teacher_ckpt, tmp_path, monkeypatch):
    """A teacher's statistics file (a cache fadrm computes), its description, or its unfinished pass damaged:
    the same command gives the undamaged file; an unfinished pass whose damage still reads as one of other
    settings (or one replaced by another's) is refused in one line."""
    import fadrm
    from fadrm.errors import FadrmError
    from fadrm.synthesis import statistics
    from fadrm.teachers import load_teacher

    options = {"data_root": str(fmnist_root), "batch_size": 40, "log": lambda line: None}
    name = statistics.statistics_file(load_teacher(teacher_ckpt)).name
    fadrm.compute_statistics("fashion-mnist", teacher_ckpt, stats_dir=str(tmp_path / "reference"), **options)
    if part == "partial":
        # Passes stopped in their third batch, of this seed and another.
        monkeypatch.setattr(statistics, "SAVE_EVERY_SECONDS", 0.0)
        real_normalize, calls = statistics.normalize, {"n": 0}

        def dies_in_the_third_batch(*args):
            calls["n"] += 1
            if calls["n"] % 3 == 0:
                raise KeyboardInterrupt
            return real_normalize(*args)

        monkeypatch.setattr(statistics, "normalize", dies_in_the_third_batch)
        for folder, seed in (("other", 1), ("damaged", 0)):
            with pytest.raises(KeyboardInterrupt):
                fadrm.compute_statistics(
                    "fashion-mnist", teacher_ckpt, stats_dir=str(tmp_path / folder), seed=seed, **options
                )
        monkeypatch.setattr(statistics, "normalize", real_normalize)
    else:
        for folder, seed in (("other", 1), ("damaged", 0)):
            fadrm.compute_statistics(
                "fashion-mnist", teacher_ckpt, stats_dir=str(tmp_path / folder), seed=seed, **options
            )
    relative = {"file": name, "description": name.replace(".safetensors", ".json"), "partial": f"{name}.partial"}[part]
    damage(tmp_path / "damaged" / relative, how, tmp_path / "other" / relative)
    try:
        fadrm.compute_statistics("fashion-mnist", teacher_ckpt, stats_dir=str(tmp_path / "damaged"), **options)
    except FadrmError as error:
        assert part == "partial" and "was made with different settings" in str(error), error
        return
    assert (tmp_path / "damaged" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_unfinished_teacher_is_trained_again(how, fmnist_root, tmp_path):
    """A teacher run stopped after its first epoch, its ``.partial`` damaged: the same command ends with the
    weights of an uninterrupted run, or (a file of other settings) one line."""
    from fadrm.artifacts import partial_path
    from fadrm.config import TeacherConfig
    from fadrm.errors import FadrmError
    from fadrm.teachers import train_teacher

    def config(out: Path, seed: int = 0) -> TeacherConfig:
        return quick_teacher_config(fmnist_root, out, seed=seed)

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/2"):
            raise KeyboardInterrupt

    straight = train_teacher(config(tmp_path / "straight.pt"), log=lambda line: None)
    for name, seed in (("other.pt", 1), ("damaged.pt", 0)):
        with pytest.raises(KeyboardInterrupt):
            train_teacher(config(tmp_path / name, seed), log=stop_after_first_epoch)
    damage(partial_path(tmp_path / "damaged.pt"), how, partial_path(tmp_path / "other.pt"))
    try:
        again = train_teacher(config(tmp_path / "damaged.pt"), log=lambda line: None)
    except FadrmError as error:
        assert how == "replaced" and "made with different settings (seed)" in str(error), error
        return
    for a, b in zip(straight.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
