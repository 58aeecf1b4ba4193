"""Concurrent students (``--jobs K``): worker processes that take an evaluation's student runs, one at a time.

A student trained by the published protocol (micro-batches of 8 to 128 images) keeps neither a GPU nor
several cores busy, and an evaluation is many independent students. Each worker builds the evaluation's
shared inputs again (:class:`~fadrm.evaluation.run.StudentBench`, through the ``factory`` it is given),
checks that it plans the same identities, and trains the runs it takes exactly as the evaluating process
would: every run draws from its own seeds and writes its own files, so results equal those of a
sequential evaluation at the same thread count per process, and a run resumes after any stop.

On the CPU the cores are split between the workers (each pinned to its share, one torch thread per core
of it); on CUDA the workers share the visible GPUs, in turn. The evaluating process waits, forwards the
workers' lines, and on Ctrl-C, a refusal or a fault stops them all; a worker killed outright (the
out-of-memory killer, ``kill -9``) stops the command with one line, and the same command continues.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, NoReturn, Sequence

import torch

from ..errors import FadrmError, GroupRefusal, Stopped, system_fault
from ..training import available_cores, set_progress_bars

# --jobs auto on CUDA: workers per visible GPU (a published-protocol student leaves most of a GPU idle),
# at most one per core.
JOBS_PER_GPU = 8

# Trains the run of one name, logging to the function given; returns its run record.
Trainer = Callable[[str, Callable[[str], None]], dict]
Factory = Callable[[Any, torch.device], Trainer]


def job_count(value: str, device: torch.device, world: int = 1) -> int:
    """The number of worker processes ``--jobs`` asks for: a count, or ``auto`` (one per core on the CPU;
    on CUDA :data:`JOBS_PER_GPU` per visible GPU, at most one per core). Under torchrun one process per
    rank trains every student together, so the jobs are 1 there.

    Raises:
        GroupRefusal: more than one job under torchrun (every rank meets it; rank 0 says it).
    """
    if value == "auto":
        cores = available_cores()
        jobs = cores if device.type != "cuda" else min(cores, JOBS_PER_GPU * max(1, torch.cuda.device_count()))
    else:
        jobs = int(value)
    if world > 1 and jobs > 1:
        raise GroupRefusal(f"--jobs {value} with torchrun: the ranks already train each student together; leave it out")
    return 1 if world > 1 else max(1, jobs)


def core_shares(workers: int, cores: Sequence[int]) -> list[list[int]]:
    """The cores each worker is pinned to: equal contiguous shares, or one core each, in turn, when there
    are more workers than cores."""
    cores = sorted(cores)
    share = len(cores) // workers
    if share == 0:
        return [[cores[i % len(cores)]] for i in range(workers)]
    return [cores[i * share : (i + 1) * share] for i in range(workers)]


def worker_device(device: torch.device, index: int) -> torch.device:
    """Worker ``index``'s device: the CPU, the GPU named, or the visible GPUs in turn."""
    if device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", index % max(1, torch.cuda.device_count()))


def train_concurrently(
    factory: Factory,
    inputs: Any,
    pending: Sequence[str],
    jobs: int,
    device: torch.device,
    log: Callable[[str], None],
) -> dict[str, dict]:
    """Train the runs ``pending`` names in ``jobs`` worker processes; their run records by name.

    Args:
        factory: a module-level function (it is sent to the workers by name) that builds, in a worker, the
            function training one run by name, given ``inputs`` and the worker's device.
        inputs: what the factory needs (picklable).
        pending: the runs to train, in the order they are handed out.
        jobs: worker processes (at most one per run).
        device: the evaluation's device.
        log: where the workers' lines go.

    Raises:
        FadrmError, OSError: a worker's refusal or the operating system's, as the worker met it.
        Stopped: a worker was killed by a signal; finished runs are kept.
    """
    context = multiprocessing.get_context("spawn")
    todo = list(pending)
    count = min(jobs, len(todo))
    shares = core_shares(count, os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(1))
    workers: dict[Connection, multiprocessing.process.BaseProcess] = {}
    done: dict[str, dict] = {}
    training: dict[Connection, str | None] = {}
    try:
        # Ctrl-C reaches every process of the terminal's group: the workers ignore it and the evaluating
        # process stops them. SIGINT stays blocked while they start, so none is interrupted before it ignores it.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for index in range(count):
                ours, theirs = context.Pipe()
                args = (factory, inputs, worker_device(device, index), shares[index], os.getpid(), theirs)
                process = context.Process(target=_worker, args=args, name=f"fadrm-student-{index}")
                process.start()
                theirs.close()
                workers[ours] = process
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        while workers:
            for link in wait(list(workers)):
                try:
                    kind, *payload = link.recv()
                except EOFError:  # the worker is gone without a word
                    _stopped(workers.pop(link), training.get(link))
                if kind == "log":
                    log(payload[0])
                    continue
                if kind == "done":
                    done[payload[0]] = payload[1]
                elif kind != "ready":
                    raise _reraised(kind, payload)
                training[link] = todo.pop(0) if todo else None
                try:
                    link.send(training[link])
                except OSError:  # it died since its last word
                    _stopped(workers.pop(link), training[link])
                if training[link] is None:
                    workers.pop(link).join()
    finally:
        for process in workers.values():
            if process.is_alive():
                process.terminate()
        for process in workers.values():
            process.join()
    return done


def _stopped(process: multiprocessing.process.BaseProcess, name: str | None) -> NoReturn:
    """Raise for a worker that ended without saying so (killed by a signal, or a crash of the interpreter)."""
    process.join()
    what = f" while training {name}" if name is not None else ""
    if process.exitcode is not None and process.exitcode < 0:
        number = -process.exitcode
        known = number in {s.value for s in signal.Signals}
        hint = " (the system may have run out of memory)" if number == signal.SIGKILL else ""
        raise Stopped(
            f"a student process (pid {process.pid}) was killed by "
            f"{signal.Signals(number).name if known else f'signal {number}'}{what}{hint}; its finished runs are kept",
            128 + number,
        )
    raise RuntimeError(f"a student process (pid {process.pid}) ended with status {process.exitcode}{what}")


def _reraised(kind: str, payload: list) -> BaseException:
    """The exception a worker reported, raised again in the evaluating process."""
    if kind == "refused":
        return FadrmError(payload[0])
    if kind == "system":
        number, strerror, filename, filename2 = payload
        return OSError(number, strerror, filename, None, filename2)
    return RuntimeError(f"a student process failed: {payload[0]}")


def _worker(
    factory: Factory,
    inputs: Any,
    device: torch.device,
    cores: list[int],
    parent: int,
    link: Connection,
) -> None:
    """A worker's life: ignore Ctrl-C (the evaluating process stops it), end with the evaluating process,
    take its share of the cores, build the trainer, then train the runs it is sent until it is sent None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _end_with_parent(parent)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    set_progress_bars(False)  # several bars on one terminal would garble it; the lines say what finished

    def log(line: str) -> None:
        link.send(("log", line))

    try:
        train = factory(inputs, device)
        link.send(("ready",))
        while (name := link.recv()) is not None:
            link.send(("done", name, train(name, log)))
    except FadrmError as exc:
        link.send(("refused", str(exc)))
    except Exception as exc:  # reported to the evaluating process, which raises it again
        if system_fault(exc) is not None:
            link.send(("system", exc.errno, exc.strerror, exc.filename, exc.filename2))
        else:
            link.send(("bug", traceback.format_exc()))


def _end_with_parent(parent: int) -> None:
    """Have the kernel stop this worker when the evaluating process dies (Linux), so that a killed
    evaluation leaves no worker behind to write beside its rerun; elsewhere, or if it is already gone, end."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)
