"""The command line: help on every subcommand, user errors as one line with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fadrm.cli import main
from fadrm.data import get_dataset_spec, load_split
from fadrm.errors import FadrmError

from conftest import class_images, write_idx


@pytest.mark.parametrize("command", ["train-teacher", "distill", "evaluate", "run", "download", "list"])
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
    _fails_with_one_line(["train-teacher", "--dataset", "mnist", "--model", "convnet", "--out", str(tmp_path / "t.pt")],
                         "unknown dataset 'mnist'")  # fmt: skip
    _fails_with_one_line(["train-teacher", "--dataset", "cifar10", "--model", "convnet", "--out", str(tmp_path / "t.pt"),
                          "--data-root", str(tmp_path / "missing")], "does not exist")  # fmt: skip
    _fails_with_one_line(["train-teacher", "--dataset", "fashion-mnist", "--model", "convnet9", "--out",
                          str(tmp_path / "t.pt"), "--data-root", str(fmnist_root)], "unknown model 'convnet9'")  # fmt: skip
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    _fails_with_one_line(["distill", "--dataset", "fashion-mnist", "--data-root", str(fmnist_root), "--teacher", str(bad),
                          "--ipc", "1", "--out", str(tmp_path / "o")], "checkpoint")  # fmt: skip
    _fails_with_one_line(["distill", "--dataset", "fashion-mnist", "--data-root", str(fmnist_root), "--teacher",
                          str(teacher_ckpt), "--ipc", "1", "--alpha", "2", "--out", str(tmp_path / "o")], "--alpha")  # fmt: skip
    _fails_with_one_line(["evaluate", str(tmp_path)], "not a distilled set")
    # A bad evaluation option stops `fadrm run` before it spends minutes on the teacher.
    _fails_with_one_line(["run", "--dataset", "fashion-mnist", "--ipc", "1", "--out", str(tmp_path / "r"),
                          "--data-root", str(fmnist_root), "--repeats", "0"], "--repeats must be at least 1")  # fmt: skip
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
