"""One writer per output folder: a second fadrm process writing into the same folder is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import fadrm
from fadrm.errors import FadrmError
from fadrm.locks import LOCK_NAME, exclusive_folder

from conftest import rded_distill_argv, run_cli

QUICK = dict(epochs=1, batch_size=8, device="cpu", amp="off", workers=0)


def test_a_held_folder_refuses_a_second_writer_before_it_writes(fmnist_root, teacher_ckpt, tmp_path, capsys):
    out = tmp_path / "set"
    with exclusive_folder(out, "--out"):
        status, _, err = run_cli(rded_distill_argv(fmnist_root, teacher_ckpt, out), capsys)
        assert status == 2 and err == [
            f"fadrm: error: {out} is in use by another fadrm process (pid {os.getpid()}); wait for it to finish, "
            "or choose another --out"
        ]
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # nothing of the refused run
    assert not out.exists()  # the lock made the folder; released, it leaves nothing
    # A lock file whose process is gone (kill -9 leaves it) is taken over.
    out.mkdir()
    (out / LOCK_NAME).write_text("999999\n")
    status, _, _ = run_cli(rded_distill_argv(fmnist_root, teacher_ckpt, out), capsys)
    assert status == 0 and (out / "manifest.json").exists() and not (out / LOCK_NAME).exists()


def test_an_evaluation_folder_has_one_writer(distilled, fmnist_root, tmp_path):
    out = tmp_path / "e"
    with exclusive_folder(out, "--out"):
        with pytest.raises(FadrmError, match=rf"^{out} is in use by another fadrm process \(pid {os.getpid()}\)"):
            fadrm.evaluate(distilled, out=str(out), data_root=str(fmnist_root), log=lambda s: None, **QUICK)
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]
    results = fadrm.evaluate(distilled, out=str(out), data_root=str(fmnist_root), log=lambda s: None, **QUICK)
    assert results["runs"] and not (out / LOCK_NAME).exists()


def test_a_second_distill_into_a_set_being_made_is_refused(fmnist_root, teacher_ckpt, tmp_path):
    """Two real processes: the second (with --overwrite and other settings) no longer mixes its images
    into the first's set; it is refused naming the first's pid, before it writes anything."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "set"
    slow = ["--method", "fadrm", "--sizes", "28", "--budgets", "100000", "--groups-per-batch", "1"]
    first = subprocess.Popen(
        [sys.executable, "-m", "fadrm", *rded_distill_argv(fmnist_root, teacher_ckpt, out), *slow],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "run.json").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        # (The first's temporary files come and go as it writes: only finished files are compared.)
        before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not p.name.endswith(".tmp"))
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "fadrm",
                *rded_distill_argv(fmnist_root, teacher_ckpt, out, "--ipc", "1", "--overwrite"),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert first.poll() is None, "the first run ended before the second started: nothing was tested"
        assert second.returncode == 2
        assert second.stderr == (
            f"fadrm: error: {out} is in use by another fadrm process (pid {first.pid}); wait for it to finish, "
            "or choose another --out\n"
        )
        # The second removed and wrote nothing: the first's run is still the folder's.
        assert json.loads((out / "run.json").read_text())["config"]["ipc"] == 2
        assert not set(before) - {p.relative_to(out).as_posix() for p in out.rglob("*")}
    finally:
        first.kill()
    first.wait(timeout=120)
    # Killed, it leaves its lock file behind; the kernel released the lock, so the next writer takes it.
    assert (out / LOCK_NAME).read_text().strip() == str(first.pid)
    with exclusive_folder(out, "--out"):
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())


def test_files_several_runs_may_write_have_one_writer(distilled, fmnist_root, teacher_ckpt, tmp_path):
    """A teacher being trained, a teacher's statistics being computed, a label store being filled: a second
    run that would write the same file is refused, naming the first's pid, and leaves it as it was."""
    from fadrm.config import TeacherConfig
    from fadrm.locks import exclusive_file
    from fadrm.synthesis.statistics import statistics_file
    from fadrm.teachers import load_teacher, train_teacher

    teacher = tmp_path / "teacher.pt"
    config = TeacherConfig(dataset="fashion-mnist", model="convnet-small", out=str(teacher), **QUICK)
    config = TeacherConfig(**{**config.to_dict(), "data_root": str(fmnist_root)})
    busy = rf"is being written by another fadrm process \(pid {os.getpid()}\)"
    with exclusive_file(teacher, "--out"), pytest.raises(FadrmError, match=busy):
        train_teacher(config, log=lambda line: None)
    assert not teacher.exists()

    stats = statistics_file(load_teacher(teacher_ckpt), tmp_path / "stats")
    with exclusive_file(stats, "--stats-dir"), pytest.raises(FadrmError, match=busy):
        fadrm.compute_statistics(
            "fashion-mnist", teacher_ckpt, stats_dir=str(tmp_path / "stats"), data_root=str(fmnist_root), log=print
        )
    assert not stats.exists()

    labels = tmp_path / "shared-labels"
    options = dict(data_root=str(fmnist_root), labels="stored", labels_dir=str(labels), log=lambda line: None)
    with exclusive_file(labels, "--labels-dir"), pytest.raises(FadrmError, match=busy):
        fadrm.evaluate(distilled, out=str(tmp_path / "e"), **options, **QUICK)


def test_teacher_overwrite_replaces_only_a_teacher(fmnist_root, tmp_path):
    from fadrm.config import TeacherConfig
    from fadrm.teachers import train_teacher

    mine = tmp_path / "mine.pt"
    mine.write_text("my notes")
    config = TeacherConfig(
        dataset="fashion-mnist",
        model="convnet-small",
        out=str(mine),
        data_root=str(fmnist_root),
        overwrite=True,
        **QUICK,
    )
    with pytest.raises(FadrmError, match="is not a fadrm teacher checkpoint"):
        train_teacher(config, log=lambda line: None)
    assert mine.read_text() == "my notes"
