"""Teacher checkpoints: safe loading from every source, mismatches, training with resume."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fadrm.artifacts import partial_path
from fadrm.config import TeacherConfig
from fadrm.data import get_dataset_spec
from fadrm.data.specs import FASHION_MNIST_CLASSES, IMAGENETTE_CLASSES
from fadrm.errors import FadrmError
from fadrm.models import build_model
from fadrm.teachers import fit_teacher_to_dataset, load_teacher, train_teacher

from conftest import make_teacher_checkpoint, quick_teacher_config

FMNIST = get_dataset_spec("fashion-mnist")


def test_our_checkpoint_carries_its_metadata(teacher_ckpt):
    teacher = load_teacher(teacher_ckpt)
    assert teacher.arch == "convnet-small" and teacher.arch_args == {"width": 8}
    assert teacher.dataset == "fashion-mnist" and teacher.num_classes == 10 and teacher.in_channels == 1
    assert len(teacher.sha256) == 64 and teacher.has_batchnorm()
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())


def test_plain_state_dict_and_safetensors(tmp_path):
    model = build_model("convnet-small", 10, 1, 28)
    pt, st = tmp_path / "plain.pth", tmp_path / "plain.safetensors"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, pt)
    save_file(model.state_dict(), str(st))
    for path in (pt, st):
        teacher = load_teacher(path, FMNIST, "convnet-small")
        x = torch.randn(2, 1, 28, 28)
        assert torch.allclose(teacher.model(x), model.eval()(x))
    with pytest.raises(FadrmError, match="--teacher-arch"):
        load_teacher(pt)
    with pytest.raises(FadrmError, match="does not fit architecture"):
        load_teacher(pt, FMNIST, "convnet")


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": Evil()}, fh)
    with pytest.raises(FadrmError, match="refusing to load"):
        load_teacher(path)


def test_unreadable_and_missing_checkpoints(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(FadrmError, match="cannot read checkpoint|refusing"):
        load_teacher(bad)
    with pytest.raises(FadrmError, match="not found"):
        load_teacher(tmp_path / "none.pt")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"12345678")
    with pytest.raises(FadrmError, match="cannot read safetensors"):
        load_teacher(broken)


def test_class_and_channel_mismatches(tmp_path, teacher_ckpt):
    teacher = load_teacher(teacher_ckpt)
    cifar = get_dataset_spec("cifar10")
    with pytest.raises(FadrmError, match="1-channel images, cifar10 has 3"):
        fit_teacher_to_dataset(teacher, cifar, [str(i) for i in range(10)])
    with pytest.raises(FadrmError, match="predicts 10 classes, fashion-mnist has 5"):
        fit_teacher_to_dataset(teacher, FMNIST, list(FASHION_MNIST_CLASSES[:5]))
    other = make_teacher_checkpoint(tmp_path / "c.pt", dataset="imagefolder", channels=1, width=4)
    with pytest.raises(FadrmError, match="trained on imagefolder, not fashion-mnist"):
        fit_teacher_to_dataset(load_teacher(other), FMNIST, list(FASHION_MNIST_CLASSES))


def test_imagenet_teacher_restricted_to_imagenette(tmp_path):
    path = make_teacher_checkpoint(
        tmp_path / "in1k.pt",
        arch="convnet-small",
        dataset="imagenet-1k",
        num_classes=1000,
        channels=3,
        size=32,
        class_names=[f"in{i}" for i in range(1000)],
        width=4,
    )
    teacher = fit_teacher_to_dataset(
        load_teacher(path), get_dataset_spec("imagenette"), [c[0] for c in IMAGENETTE_CLASSES]
    )
    x = torch.randn(2, 3, 32, 32)
    full = teacher.model.model(x)
    assert torch.equal(teacher.model(x), full[:, [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]])
    assert teacher.class_names[1] == "in217" and teacher.dataset == "imagenette"


def test_torchvision_weights_offline_message(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FadrmError, match=r"not in the local torch cache.*copy it to .*resnet18-"):
        load_teacher("resnet18:IMAGENET1K_V1")
    with pytest.raises(FadrmError, match="no weights"):
        load_teacher("resnet18:NOPE")


def test_train_teacher_resumes_after_interruption(fmnist_root, tmp_path):
    def config(out: Path, **kw) -> TeacherConfig:
        return quick_teacher_config(fmnist_root, out, **kw)

    straight = train_teacher(config(tmp_path / "a.pt"), log=lambda s: None)

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/2"):
            raise KeyboardInterrupt

    out = tmp_path / "b.pt"
    with pytest.raises(KeyboardInterrupt):
        train_teacher(config(out), log=stop_after_first_epoch)
    assert partial_path(out).exists() and not out.exists()
    lines: list[str] = []
    resumed = train_teacher(config(out), log=lines.append)
    assert any("resuming" in line for line in lines)
    assert not partial_path(out).exists()
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["dataset"] == "fashion-mnist" and ckpt["in_channels"] == 1 and "fadrm_version" in ckpt
    assert len(ckpt["history"]) == 2 and all(epoch["seconds"] > 0 for epoch in ckpt["history"])
    # Same command again: reused, not retrained; other settings: refused.
    assert "already trained" in " ".join(_capture(lambda log: train_teacher(config(out), log=log)))
    with pytest.raises(FadrmError, match="--overwrite"):
        train_teacher(config(out, lr=0.5), log=lambda s: None)


def _capture(run) -> list[str]:
    lines: list[str] = []
    run(lines.append)
    return lines


def signalled_twice_between_epochs(fmnist_root: Path, out: Path, number: int) -> tuple[list[str], dict, int, str]:
    """A real ``train-teacher`` process sent signal ``number`` twice, 10 ms apart, once its first epoch is
    saved: its command, environment, exit status and standard error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "fadrm", "train-teacher", "--dataset", "fashion-mnist", "--model"]
    command += ["convnet-small", "--model-arg", "width=4", "--epochs", "200", "--data-root", str(fmnist_root)]
    command += ["--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not partial_path(out).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(2):
        proc.send_signal(number)
        time.sleep(0.01)
    err = proc.stderr.read()
    return command, env, proc.wait(timeout=120), err


def test_ctrl_c_twice_is_one_line_and_the_teacher_resumes(fmnist_root, tmp_path):
    """Ctrl-C pressed twice 10 ms apart, between epochs of a real process: one line saying how to resume,
    exit 130, never a traceback from the interpreter's exit handlers; the rerun resumes."""
    import signal

    out = tmp_path / "t.pt"
    command, env, status, err = signalled_twice_between_epochs(fmnist_root, out, signal.SIGINT)
    assert status == 130, err
    assert err == "fadrm: interrupted; run the same command again to resume\n"
    assert partial_path(out).exists() and not out.exists()
    rerun = subprocess.run([*command[:-6], "--epochs", "2", *command[-4:]], capture_output=True, text=True, env=env)
    assert rerun.returncode == 2 and "different settings (epochs)" in rerun.stderr  # the run is still there
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and f"resuming {out} after epoch" in proc.stdout


def test_sigterm_twice_is_one_line_exit_143_and_the_teacher_resumes(fmnist_root, tmp_path):
    """SIGTERM (kill, a scheduler's time limit) twice 10 ms apart, between epochs of a real process: one line
    saying how to resume, the process ends by the signal (143 in a shell), the rerun resumes."""
    import signal

    out = tmp_path / "t.pt"
    command, env, status, err = signalled_twice_between_epochs(fmnist_root, out, signal.SIGTERM)
    assert status == -signal.SIGTERM, err
    assert err == "fadrm: terminated (SIGTERM); run the same command again to resume\n"
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and f"resuming {out} after epoch" in proc.stdout


def test_train_teacher_killed_with_sigkill_resumes_to_the_same_weights(fmnist_root, tmp_path):
    """kill -9 between epochs (a real process, the default options but a small model): the rerun
    continues from the last finished epoch and ends with the weights of an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(out: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "fadrm",
            "train-teacher",
            "--dataset",
            "fashion-mnist",
            "--model",
            "convnet-small",
            "--model-arg",
            "width=4",
            "--epochs",
            "40",
            "--data-root",
            str(fmnist_root),
            "--out",
            str(out),
        ]

    straight = tmp_path / "straight.pt"
    subprocess.run(command(straight), check=True, capture_output=True, env=env)
    killed = tmp_path / "killed.pt"
    proc = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while not partial_path(killed).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no handler runs
    finally:
        proc.wait()
    assert partial_path(killed).exists() and not killed.exists(), "the run finished before it could be killed"
    epochs_done = torch.load(partial_path(killed), weights_only=True)["epoch"]
    rerun = subprocess.run(command(killed), check=True, capture_output=True, text=True, env=env)
    assert f"resuming {killed} after epoch" in rerun.stdout and 0 < epochs_done < 40
    a, b = load_teacher(straight).model.state_dict(), load_teacher(killed).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "field, value",
    [("arch", 3), ("class_names", "abc"), ("in_channels", "1"), ("mean", ["a"]), ("state_dict", []), ("arch", None)],
)
def test_teacher_metadata_of_the_wrong_type_is_one_line(field, value, teacher_ckpt, tmp_path):
    checkpoint = torch.load(teacher_ckpt, weights_only=True)
    checkpoint[field] = value
    torch.save(checkpoint, tmp_path / "t.pt")
    with pytest.raises(FadrmError, match=r"t.pt is not a fadrm teacher checkpoint as fadrm writes it \(its "):
        load_teacher(tmp_path / "t.pt")


def test_a_teacher_with_non_finite_weights_is_refused_when_loaded(teacher_ckpt, tmp_path):
    checkpoint = torch.load(teacher_ckpt, weights_only=True)
    name = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    checkpoint["state_dict"][name].view(-1)[0] = float("nan")
    torch.save(checkpoint, tmp_path / "t.pt")
    with pytest.raises(FadrmError, match="holds non-finite weights"):
        load_teacher(tmp_path / "t.pt")
