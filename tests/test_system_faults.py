"""The operating system's refusals (disk full, read-only, link loops, long names) are the user's to fix:
one line naming the path and what to do, exit 3, never "internal error", and the folder resumable."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import rded_distill_argv, run_cli


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every PNG under ``folder``, by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.png")}


def test_every_system_fault_has_its_remedy_and_other_errors_none():
    from fadrm.errors import SYSTEM_FAULTS, system_fault

    for code, remedy in SYSTEM_FAULTS.items():
        line = system_fault(OSError(code, os.strerror(code), "/data/out"))
        assert line == f"/data/out: {os.strerror(code)}; {remedy}"
    assert system_fault(OSError(errno.ENOENT, "No such file or directory", "x")) is None
    assert system_fault(ValueError("no")) is None


@pytest.mark.parametrize(
    "code,words",
    [(errno.EROFS, "the file system is read-only"), (errno.ENOSPC, "free some space"), (errno.EACCES, "permissions")],
)
def test_a_refused_write_is_one_line_exit_3_and_the_run_resumes(
    code, words, fmnist_root, teacher_ckpt, tmp_path, monkeypatch, capsys
):
    import fadrm.io

    real_replace = os.replace
    calls = {"n": 0}

    def refuse_the_fifth(source, target):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(code, os.strerror(code), str(target))
        return real_replace(source, target)

    out = tmp_path / "set"
    monkeypatch.setattr(fadrm.io.os, "replace", refuse_the_fifth)
    status, _, err = run_cli(rded_distill_argv(fmnist_root, teacher_ckpt, out), capsys)
    assert status == 3 and len(err) == 1 and err[0].startswith(f"fadrm: error: {out}/") and words in err[0]
    assert not list(out.rglob("*.tmp"))  # nothing half-written is left under any name
    monkeypatch.setattr(fadrm.io.os, "replace", real_replace)
    status, _, _ = run_cli(rded_distill_argv(fmnist_root, teacher_ckpt, out), capsys)
    straight = tmp_path / "straight"
    assert status == 0 and run_cli(rded_distill_argv(fmnist_root, teacher_ckpt, straight), capsys)[0] == 0
    assert folder_hashes(out) == folder_hashes(straight) and len(folder_hashes(out)) == 40


def test_a_failed_torch_save_is_the_disk_fault_it_is(tmp_path, monkeypatch):
    import fadrm.io

    def failing_save(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 128 vs 0")

    monkeypatch.setattr(fadrm.io.torch, "save", failing_save)
    monkeypatch.setattr(fadrm.io, "LOW_DISK_BYTES", 1 << 62)  # "no room left"
    with pytest.raises(OSError) as error:
        fadrm.io.save_torch(tmp_path / "a.pt", {"x": torch.zeros(1)})
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(tmp_path / "a.pt")
    monkeypatch.setattr(fadrm.io, "LOW_DISK_BYTES", 0)
    with pytest.raises(OSError) as error:
        fadrm.io.save_torch(tmp_path / "a.pt", {"x": torch.zeros(1)})
    assert error.value.errno == errno.EIO and not list(tmp_path.iterdir())
    monkeypatch.setattr(fadrm.io.torch, "save", lambda obj, path: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="other"):  # not a write failure: left as it is
        fadrm.io.save_torch(tmp_path / "a.pt", {})


@pytest.mark.parametrize("kind", ["link loop", "long name"])
def test_a_path_the_system_refuses_is_one_line(kind, fmnist_root, teacher_ckpt, tmp_path, capsys):
    if kind == "link loop":
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        out, words = tmp_path / "loop" / "set", "a loop of symbolic links"
    else:
        out, words = tmp_path / ("x" * 300) / "set", "too long: choose a shorter one"
    status, _, err = run_cli(rded_distill_argv(fmnist_root, teacher_ckpt, out), capsys)
    assert status == 3 and len(err) == 1 and words in err[0] and "internal error" not in err[0]


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_run_resumes_when_there_is_room(fmnist_root, teacher_ckpt, tmp_path):
    """A real full disk: a 2 MB tmpfs (where this machine lets root mount one), filled, then freed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        filler = disk / "filler"
        with open(filler, "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
            except OSError:
                pass
        command = [sys.executable, "-m", "fadrm", *rded_distill_argv(fmnist_root, teacher_ckpt, disk / "set")]
        full = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert full.returncode == 3, full.stderr
        assert full.stderr.count("\n") == 1 and "No space left on device; free some space" in full.stderr
        filler.unlink()
        assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0
        straight = tmp_path / "straight"
        straight_command = [sys.executable, "-m", "fadrm", *rded_distill_argv(fmnist_root, teacher_ckpt, straight)]
        assert subprocess.run(straight_command, capture_output=True, timeout=300).returncode == 0
        assert folder_hashes(disk / "set") == folder_hashes(straight)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_ctrl_c_while_the_command_starts_is_one_line():
    """Loading PyTorch takes the command's first seconds: a Ctrl-C then (or just after) ends it with one line
    and exit 130, never a traceback from inside an import."""
    statuses = []
    for delay in (0.3, 0.8, 1.5):
        process = subprocess.Popen(
            [sys.executable, "-m", "fadrm", "list", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        # 130, or an end by SIGINT itself, which a shell reports as 130 too.
        status = 130 if process.returncode == -signal.SIGINT else process.returncode
        statuses.append(status)
        if status == 130:
            assert len(err.splitlines()) == 1 and err.startswith("fadrm: interrupted"), err
        else:
            assert status == 0, err  # it had finished
    assert 130 in statuses


@pytest.mark.parametrize("kind", ["a file", "read-only"])
def test_a_cache_fadrm_cannot_use_is_one_line(kind, distilled, fmnist_root, tmp_path, monkeypatch, capsys):
    """``FADRM_CACHE`` (where full-data students are shared) a file, or a folder fadrm may not write."""
    cache = tmp_path / "cache"
    if kind == "a file":
        cache.write_text("x")
    else:
        cache.mkdir()
        cache.chmod(0o500)
    monkeypatch.setenv("FADRM_CACHE", str(cache))
    argv = ["evaluate", str(distilled), "--baseline", "full-data", "--epochs", "1", "--device", "cpu"]
    status, _, err = run_cli([*argv, "--data-root", str(fmnist_root), "--out", str(tmp_path / "e")], capsys)
    if cache.is_dir():
        cache.chmod(0o700)
    if kind == "read-only" and os.geteuid() == 0:
        assert status == 0, err  # root writes anyway: nothing to refuse
        return
    assert status == 3 and len(err) == 1 and str(cache) in err[0] and "internal error" not in err[0], err
