"""Concurrent students (``--jobs``): the same results files as one job at the same threads per process, a
killed or interrupted worker stops the command in one line, and the same command continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fadrm
from fadrm.errors import FadrmError
from fadrm.evaluation.jobs import core_shares, job_count

# Two repeats of a set and a random real subset (soft and hard labels): six students.
OPTIONS = dict(
    epochs=3, batch_size=8, device="cpu", amp="off", workers=0, repeats=2, baselines=["random-real"], labels="stored"
)


def results_files(out: Path) -> dict[str, object]:
    """Every finished run's record (the timings aside) and the report's runs, by file."""
    files: dict[str, object] = {}
    for path in sorted((out / "runs").glob("*.json")):
        record = json.loads(path.read_text())
        record["result"].pop("seconds", None)
        files[path.name] = record
    files["results.json"] = [
        {k: v for k, v in run.items() if k != "seconds"}
        for run in json.loads((out / "results.json").read_text())["runs"]
    ]
    return files


@pytest.fixture(scope="module")
def one_job(distilled, fmnist_root, tmp_path_factory) -> Path:
    """The six students trained one after another in this process, on one thread (as each worker trains)."""
    out = tmp_path_factory.mktemp("jobs") / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fadrm.evaluate(distilled, out=str(out), data_root=str(fmnist_root), log=lambda s: None, **OPTIONS)
    finally:
        torch.set_num_threads(threads)
    return out


def test_two_jobs_write_the_results_files_of_one(one_job, distilled, fmnist_root, tmp_path):
    lines: list[str] = []
    out = tmp_path / "two"
    fadrm.evaluate(distilled, out=str(out), data_root=str(fmnist_root), jobs="2", log=lines.append, **OPTIONS)
    assert "training 6 students in 2 processes" in lines
    assert sum("at the last epoch" in line for line in lines) == 6  # each worker's lines reach the caller's log
    assert results_files(out) == results_files(one_job)
    # A second evaluation with jobs finds every run finished and starts no process.
    lines.clear()
    fadrm.evaluate(distilled, out=str(out), data_root=str(fmnist_root), jobs="2", log=lines.append, **OPTIONS)
    assert sum("reusing finished run" in line for line in lines) == 6 and not any("processes" in line for line in lines)


def command(distilled: Path, fmnist_root: Path, out: Path, epochs: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fadrm",
        "evaluate",
        str(distilled),
        "--data-root",
        str(fmnist_root),
        "--epochs",
        str(epochs),
        "--batch-size",
        "8",
        "--eval-every",
        "10",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--baseline",
        "random-real",
        "--jobs",
        "2",
        "--out",
        str(out),
    ]


def student_processes(pid: int) -> list[int]:
    """The worker processes ``pid`` started (Linux /proc), not multiprocessing's resource tracker."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                spawned = b"spawn_main" in (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == pid and spawned:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["kill -9 a worker", "Ctrl-C", "kill -9 the evaluation"])
def test_a_stopped_worker_stops_the_command_in_one_line_and_the_rerun_continues(stop, distilled, fmnist_root, tmp_path):
    """Once a student has saved a checkpoint, a worker is killed (kill -9), or the terminal's Ctrl-C reaches
    the whole group (one line, the signal's status, no traceback), or the evaluating process itself is killed:
    no process is left, and the same command then finishes every run, with the results of a command never
    stopped."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "stopped"
    process = subprocess.Popen(
        command(distilled, fmnist_root, out, 40),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not list((out / "runs").glob("*.partial.pt")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list((out / "runs").glob("*.partial.pt")), process.communicate()
    workers = student_processes(process.pid)
    assert len(workers) == 2
    if stop == "Ctrl-C":
        os.killpg(process.pid, signal.SIGINT)
    elif stop == "kill -9 a worker":
        os.kill(workers[0], signal.SIGKILL)
    else:  # the workers end with it (the kernel sends them SIGTERM), so none writes beside the rerun
        os.kill(process.pid, signal.SIGKILL)
    _, err = process.communicate(timeout=120)
    lines = err.strip().splitlines()
    if stop == "kill -9 the evaluation":
        assert process.returncode == -signal.SIGKILL and not lines, err
    else:
        expected = 130 if stop == "Ctrl-C" else 128 + signal.SIGKILL
        # 130, or an end by SIGINT itself (an interrupt met inside library code), which a shell reports as 130.
        status = 130 if process.returncode == -signal.SIGINT else process.returncode
        assert status == expected and len(lines) == 1, (process.returncode, err)
        assert "run the same command again to resume" in lines[0]
    if stop == "kill -9 a worker":
        assert "was killed by SIGKILL" in lines[0]
    time.sleep(2)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    subprocess.run(command(distilled, fmnist_root, out, 40), check=True, capture_output=True, env=env)
    straight = tmp_path / "straight"
    subprocess.run(command(distilled, fmnist_root, straight, 40), check=True, capture_output=True, env=env)
    assert results_files(out) == results_files(straight)


def test_job_counts_and_core_shares():
    cpu = torch.device("cpu")
    assert job_count("3", cpu) == 3 and job_count("auto", cpu) == len(os.sched_getaffinity(0))
    assert job_count("1", cpu, world=2) == 1
    with pytest.raises(FadrmError, match="--jobs 2 with torchrun"):
        job_count("2", cpu, world=2)
    assert core_shares(2, [0, 1, 2, 3]) == [[0, 1], [2, 3]]
    assert core_shares(2, [5, 1, 3]) == [[1], [3]]
    assert core_shares(3, [0, 1]) == [[0], [1], [0]]


def test_a_bad_job_count_is_one_line(distilled, capsys):
    from conftest import run_cli

    status, _, err = run_cli(["evaluate", str(distilled), "--jobs", "0"], capsys)
    assert status == 2 and len(err) == 1 and "--jobs" in err[0] and "must be auto or a number >= 1" in err[0], err
