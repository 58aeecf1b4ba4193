"""The command line: help on every subcommand, user errors as one line with exit status 2."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from fadrm.cli import main
from fadrm.config import STAGES, choices_of, flag_of, option_fields, option_type
from fadrm.data import get_dataset_spec, load_split
from fadrm.errors import FadrmError

from conftest import class_images, run_cli, write_idx


@pytest.mark.parametrize(
    "command", ["train-teacher", "distill", "evaluate", "run", "stats", "priors", "download", "list"]
)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "usage: fadrm" in capsys.readouterr().out


def _fails_with_one_line(args: list[str], expected: str) -> None:
    result = subprocess.run([sys.executable, "-m", "fadrm", *args], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fadrm: error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_user_errors_are_one_line(tmp_path, teacher_ckpt, fmnist_root):
    _fails_with_one_line(
        ["train-teacher", "--dataset", "mnist", "--model", "convnet", "--out", str(tmp_path / "t.pt")],
        "--dataset must be one of",
    )
    _fails_with_one_line(
        [
            "train-teacher",
            "--dataset",
            "cifar10",
            "--model",
            "convnet",
            "--out",
            str(tmp_path / "t.pt"),
            "--data-root",
            str(tmp_path / "missing"),
        ],
        "--data-root must be an existing folder",
    )
    _fails_with_one_line(
        [
            "train-teacher",
            "--dataset",
            "fashion-mnist",
            "--model",
            "convnet9",
            "--out",
            str(tmp_path / "t.pt"),
            "--data-root",
            str(fmnist_root),
        ],
        "--model must be a registered model",
    )
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    _fails_with_one_line(
        [
            "distill",
            "--dataset",
            "fashion-mnist",
            "--data-root",
            str(fmnist_root),
            "--teacher",
            str(bad),
            "--ipc",
            "1",
            "--out",
            str(tmp_path / "o"),
        ],
        "checkpoint",
    )
    _fails_with_one_line(
        [
            "distill",
            "--dataset",
            "fashion-mnist",
            "--data-root",
            str(fmnist_root),
            "--teacher",
            str(teacher_ckpt),
            "--ipc",
            "1",
            "--alpha",
            "2",
            "--out",
            str(tmp_path / "o"),
        ],
        "--alpha",
    )
    _fails_with_one_line(["evaluate", str(tmp_path)], "not a distilled set")
    # A bad evaluation option stops `fadrm run` before it spends minutes on the teacher.
    _fails_with_one_line(
        [
            "run",
            "--dataset",
            "fashion-mnist",
            "--ipc",
            "1",
            "--out",
            str(tmp_path / "r"),
            "--data-root",
            str(fmnist_root),
            "--repeats",
            "0",
        ],
        "--repeats must be at least 1",
    )
    assert not (tmp_path / "r").exists()
    _fails_with_one_line(["download", "imagenet-1k", "--data-root", str(tmp_path)], "cannot be downloaded")


def test_download_uses_torchvision_and_loads(tmp_path, monkeypatch):
    import torchvision

    class FakeFashionMNIST:
        def __init__(self, root, train, download):
            raw = tmp_path / "data" / "FashionMNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            prefix = "train" if train else "t10k"
            images, labels = class_images(10, 2, 1, 28)
            write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images[..., 0])
            write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    assert main(["download", "fashion-mnist", "--data-root", str(tmp_path / "data")]) == 0
    assert len(load_split(get_dataset_spec("fashion-mnist"), "train", tmp_path / "data")) == 20

    class Offline:
        def __init__(self, *args, **kwargs):
            raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    from fadrm.data.specs import download_dataset

    with pytest.raises(FadrmError, match="downloading cifar10 failed .* by hand"):
        download_dataset("cifar10", tmp_path / "c")


# ------------------------------------------------------------ bad input, every option


def _values(cls, path, f) -> list[list[str]]:
    """Command-line values invalid for an option: for its type, its choices and its declared rules."""
    hint = option_type(cls, path)
    item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
    if hint is bool:
        return []
    if typing.get_origin(hint) is dict:
        return [["novalue"], ["=1"]]
    by_type = {int: ["abc", "1.5", ""], float: ["abc", "", "nan", "inf"], str: [""]}.get(item, [""])
    values = [[v] * (f.metadata["nargs"] or 1) for v in by_type]
    if choices_of(f):
        values.append(["nonsense"])
    for rule in f.metadata["check"]:
        for example in getattr(rule, "invalid", ()):
            values.append([str(v) for v in example] if isinstance(example, list) else [str(example)])
    return values


def _cases() -> list[tuple[str, str, list[str]]]:
    cases = []
    for stage, cls in STAGES.items():
        for path, f in option_fields(cls):
            if f.metadata["positional"]:
                cases.append((stage, f.name, ["missing-folder"]))
                continue
            for value in _values(cls, path, f):
                cases.append((stage, flag_of(f), value))
    return cases


@pytest.fixture(scope="module")
def a_distilled_set(fmnist_root, teacher_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-set") / "set"
    main(
        [
            "distill",
            "--dataset",
            "fashion-mnist",
            "--teacher",
            str(teacher_ckpt),
            "--out",
            str(out),
            "--ipc",
            "1",
            "--method",
            "rded",
            "--mipc",
            "16",
            "--num-crop",
            "2",
            "--data-root",
            str(fmnist_root),
        ]
    )
    return out


@pytest.mark.parametrize(("stage", "flag", "value"), _cases(), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_every_option_refuses_invalid_values_with_one_line(
    stage, flag, value, tmp_path, fmnist_root, teacher_ckpt, a_distilled_set, capsys
):
    """Generated from the option declarations: each invalid value is exit 2 and one line naming the
    option, before anything is read or written (--print-config: nothing would run even if accepted)."""
    out = tmp_path / "out"
    required = {
        "train-teacher": ["--dataset", "fashion-mnist", "--out", str(out), "--data-root", str(fmnist_root)],
        "distill": [
            "--dataset",
            "fashion-mnist",
            "--teacher",
            str(teacher_ckpt),
            "--out",
            str(out),
            "--data-root",
            str(fmnist_root),
        ],
        "evaluate": [str(a_distilled_set), "--out", str(out), "--data-root", str(fmnist_root)],
        "run": ["--dataset", "fashion-mnist", "--out", str(out), "--data-root", str(fmnist_root)],
        "stats": [
            "--dataset",
            "fashion-mnist",
            "--teacher",
            str(teacher_ckpt),
            "--data-root",
            str(fmnist_root),
            "--stats-dir",
            str(out),
        ],
        "priors": [
            "--dataset",
            "fashion-mnist",
            "--teacher",
            str(teacher_ckpt),
            "--out",
            str(out),
            "--data-root",
            str(fmnist_root),
        ],
    }[stage]
    if flag.startswith("--"):
        if flag in required:  # the invalid value replaces the valid one
            at = required.index(flag)
            required = required[:at] + required[at + 2 :]
        argv = [stage, *required, flag, *value, "--print-config"]
    else:
        argv = [stage, *value, *required[1:], "--print-config"]
    code, _, lines = run_cli(argv, capsys)
    assert code == 2, (argv, lines)
    assert len(lines) == 1 and lines[0].startswith("fadrm: error: "), lines
    assert (flag if flag.startswith("--") else value[0]) in lines[0], lines
    assert not out.exists()


def test_the_reported_inputs_are_one_line_before_any_work(tmp_path, fmnist_root, teacher_ckpt, a_distilled_set, capsys):
    notes = tmp_path / "notes.pt"
    notes.write_text("my notes\n")
    out = tmp_path / "out"
    distill = [
        "distill",
        "--dataset",
        "fashion-mnist",
        "--teacher",
        str(teacher_ckpt),
        "--out",
        str(out),
        "--data-root",
        str(fmnist_root),
    ]
    evaluate = ["evaluate", str(a_distilled_set), "--out", str(out), "--data-root", str(fmnist_root)]
    cases = [
        ([*distill, "--lr", "nan"], "--lr must be a finite number, got nan"),
        ([*distill, "--num-crop", "0"], "--num-crop must be at least 1, got 0"),
        ([*distill, "--mipc", "0"], "--mipc must be at least 1, got 0"),
        ([*distill[:4], str(notes), *distill[5:]], f"{notes}: it is not a PyTorch checkpoint"),
        ([*distill[:4], str(tmp_path / "none.pt"), *distill[5:]], "not found"),
        ([*evaluate, "--labels", "stored", "--topk", "1000"], "--topk 1000 keeps every one of the 10 classes"),
        ([*evaluate, "--labels", "stored", "--topk", "0"], "--topk must be at least 1, got 0"),
        ([*evaluate, "--student-lr", "-1"], "--student-lr must be a positive number, got -1.0"),
        ([*evaluate, "--student-lr", "0"], "--student-lr must be a positive number, got 0.0"),
        ([*evaluate, "--epochs", "1", "--eval-at", "500"], "--eval-at 500 is outside the 1 training epochs"),
        (
            ["train-teacher", "--dataset", "fashion-mnist", "--out", str(out / "t.pt"), "--epochs", "0"],
            "--epochs must be at least 1, got 0",
        ),
    ]
    for argv, message in cases:
        code, _, lines = run_cli(argv, capsys)
        assert code == 2 and len(lines) == 1 and message in lines[0], (argv, lines)
        assert not out.exists()


@pytest.mark.parametrize("kind", ["text", "truncated", "zip", "pickled code"])
def test_a_file_that_is_not_a_checkpoint_is_one_line_as_a_teacher(kind, tmp_path, teacher_ckpt, capsys):
    import os
    import pickle
    import zipfile

    path = tmp_path / "teacher.pt"
    if kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "truncated":
        path.write_bytes(teacher_ckpt.read_bytes()[:2000])
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("readme.txt", "hello")
    else:

        class Payload:
            def __reduce__(self):
                return (os.system, ("echo owned > " + str(tmp_path / "owned"),))

        path.write_bytes(pickle.dumps(Payload()))
    code, _, lines = run_cli(
        ["distill", "--dataset", "fashion-mnist", "--teacher", str(path), "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and len(lines) == 1 and str(path) in lines[0], lines
    expected = "it holds pickled code or objects" if kind == "pickled code" else "PyTorch checkpoint"
    assert expected in lines[0] and not (tmp_path / "owned").exists() and not (tmp_path / "o").exists()


def test_an_unexpected_error_is_one_line_saying_it_is_a_bug(monkeypatch, capsys):
    import fadrm.api as api

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(api, "plan_run", broken)
    code, _, lines = run_cli(["run", "--dataset", "fashion-mnist", "--out", "x"], capsys)
    assert code == 1 and len(lines) == 1
    assert "a bug in fadrm" in lines[0] and "ZeroDivisionError: division by zero" in lines[0] and "--debug" in lines[0]
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "run", "--dataset", "fashion-mnist", "--out", "x"])
    monkeypatch.setenv("FADRM_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["run", "--dataset", "fashion-mnist", "--out", "x"])


def test_a_closed_output_pipe_ends_quietly_not_as_a_bug():
    """`fadrm list models | head -1`: the reader went away; like any pipeline producer, no error."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fadrm", "list", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # before the interpreter has even started: every write meets a closed pipe
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == b""
