"""The statistics pass (``fadrm stats``) against an independent computation, its resume and
checks, and G-VBSM, EDC and CV-DD through the command line: their bad inputs, their records,
real-image initialisation from the training set or from another set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import fadrm
from fadrm.synthesis import statistics
from fadrm.config import StatsConfig, resolve
from fadrm.data import get_dataset_spec, load_split
from fadrm.errors import FadrmError
from fadrm.runtime import make_runtime
from fadrm.seeding import make_generator
from fadrm.teachers import load_teacher

from conftest import run_cli

SPEC = get_dataset_spec("fashion-mnist")
CPU = make_runtime("cpu", "off")
QUIET = {"log": lambda s: None, "device": "cpu"}
TINY = ["--sizes", "28", "--budgets", "2", "--mipc", "16", "--num-crop", "2", "--device", "cpu"]


def _batch_moments(x: np.ndarray, cell: int) -> list[np.ndarray]:
    """Channel mean and variance over (B, H, W), then per cell over (B, C, cell, cell), by numpy."""
    n, c, h, w = x.shape
    cells = x.reshape(n, c, h // cell, cell, w // cell, cell)
    return [
        x.mean(axis=(0, 2, 3)),
        x.var(axis=(0, 2, 3)),
        cells.mean(axis=(0, 1, 3, 5)).ravel(),
        cells.var(axis=(0, 1, 3, 5)).ravel(),
    ]


def test_statistics_against_an_independent_computation(fmnist_root, teacher_ckpt, tmp_path):
    (description,) = fadrm.compute_statistics(
        "fashion-mnist", teacher_ckpt, data_root=str(fmnist_root), batch_size=48, stats_dir=str(tmp_path), **QUIET
    )
    teacher = load_teacher(teacher_ckpt)
    path = statistics.statistics_file(teacher, tmp_path)
    assert path.name == f"teacher.pt.stats-{teacher.sha256[:12]}.safetensors"
    assert description == json.loads(statistics.statistics_description(path).read_text())
    assert (description["images"], description["cell"], description["batch_size"], description["holdout"]) == (
        160,
        4,
        48,
        0,
    )
    assert description["layers"] == [f"features.{i}" for i in (0, 1, 4, 5, 8, 9)]
    tensors = load_file(str(path))
    # The first convolution's input is the normalised augmented image: recompute its targets
    # with numpy from the same views, in the same seeded order and batches (48, 48, 48, 16).
    dataset = load_split(SPEC, "train", fmnist_root)
    views = statistics._SeededViews(dataset, SPEC, seed=0)
    order = torch.randperm(160, generator=make_generator(0, "stats-order")).tolist()
    x = np.stack([(views[i][0].numpy().astype(np.float64) - SPEC.mean[0]) / SPEC.std[0] for i in order])
    labels = np.array([dataset.targets[i] for i in order])
    batches = [x[k : k + 48] for k in range(0, 160, 48)]
    expected = [
        sum(m * len(b) for m, b in zip(moments, batches)) / 160
        for moments in zip(*(_batch_moments(b, 4) for b in batches))
    ]
    for key, value in zip(("channel_mean", "channel_var", "patch_mean", "patch_var"), expected):
        assert np.allclose(tensors[f"features.0:{key}"].numpy(), value, rtol=1e-5, atol=1e-6), key
    # Per class: each image's own mean and within-image variance, and its cells' over (C, 4, 4), averaged.
    cells = x.reshape(160, 1, 7, 4, 7, 4)
    per_image = {
        "class_channel_mean": x.mean(axis=(2, 3)),
        "class_channel_var": x.var(axis=(2, 3)),
        "class_patch_mean": cells.mean(axis=(1, 3, 5)).reshape(160, -1),
        "class_patch_var": cells.var(axis=(1, 3, 5)).reshape(160, -1),
    }
    for key, values in per_image.items():
        means = np.stack([values[labels == c].mean(axis=0) for c in range(10)])
        assert np.allclose(tensors[f"features.0:{key}"].numpy(), means, rtol=1e-5, atol=1e-6), key
    # A BatchNorm layer has per-class channel targets only (its global ones are its running buffers).
    assert tensors["features.1:class_channel_mean"].shape == (10, 8) and "features.1:channel_mean" not in tensors
    assert "features.1:class_patch_mean" not in tensors


def test_an_interrupted_pass_resumes_to_the_same_file(fmnist_root, teacher_ckpt, tmp_path, monkeypatch):
    options = {"data_root": str(fmnist_root), "batch_size": 40, **QUIET}
    fadrm.compute_statistics("fashion-mnist", teacher_ckpt, stats_dir=str(tmp_path / "straight"), **options)
    monkeypatch.setattr(statistics, "SAVE_EVERY_SECONDS", 0.0)  # save after every batch
    real_normalize, calls = statistics.normalize, {"n": 0}

    def dies_in_the_third_batch(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_normalize(*args)

    monkeypatch.setattr(statistics, "normalize", dies_in_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        fadrm.compute_statistics("fashion-mnist", teacher_ckpt, stats_dir=str(tmp_path / "resumed"), **options)
    assert [p.name.split(".")[-1] for p in (tmp_path / "resumed").iterdir()] == ["partial"]
    monkeypatch.setattr(statistics, "normalize", real_normalize)
    lines: list[str] = []
    fadrm.compute_statistics(
        "fashion-mnist", teacher_ckpt, stats_dir=str(tmp_path / "resumed"), **{**options, "log": lines.append}
    )
    assert any("after 2 batches" in line for line in lines)
    name = statistics.statistics_file(load_teacher(teacher_ckpt)).name
    assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
    assert not list((tmp_path / "resumed").glob("*.partial"))


def test_stats_command_then_distill_uses_the_file(fmnist_root, teacher_ckpt, tmp_path, capsys):
    stats = [
        "--dataset",
        "fashion-mnist",
        "--data-root",
        str(fmnist_root),
        "--teacher",
        str(teacher_ckpt),
        "--stats-dir",
        str(tmp_path / "s"),
        "--device",
        "cpu",
    ]
    assert run_cli(["stats", *stats], capsys)[0] == 0
    code, out, _ = run_cli(["stats", *stats], capsys)
    assert code == 0 and any("already in" in line for line in out)
    code, _, err = run_cli(["stats", *stats, "--batch-size", "8"], capsys)  # the file was made with 64
    assert code == 2 and len(err) == 1 and "different settings (batch_size)" in err[0] and "--overwrite" in err[0]
    out_dir = tmp_path / "gvbsm"
    code, out, _ = run_cli(
        ["distill", *stats, "--method", "g-vbsm", "--ipc", "2", "--out", str(out_dir), *TINY], capsys
    )
    assert code == 0 and not any("computing the statistics" in line for line in out)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    (used,) = manifest["statistics"]
    path = statistics.statistics_file(load_teacher(teacher_ckpt), tmp_path / "s")
    assert used["sha256"] == json.loads(statistics.statistics_description(path).read_text())["sha256"]
    assert json.loads((out_dir / "run.json").read_text())["statistics_sha256"] == [used["sha256"]]
    # Class-major units: one group of the ten classes with both IPC slots each.
    assert [u["unit"] for u in manifest["units"]] == ["ipc0000-0001-group0000"]
    assert manifest["config"]["synthesis"]["stat_ema"] == 0.8 and manifest["config"]["synthesis"]["dd_weight"] == 1.0


def test_statistics_of_another_teacher_or_holdout_are_refused(
    fmnist_root, teacher_ckpt, second_teacher_ckpt, tmp_path, capsys
):
    stats_dir = tmp_path / "s"
    fadrm.compute_statistics(
        "fashion-mnist", teacher_ckpt, data_root=str(fmnist_root), stats_dir=str(stats_dir), **QUIET
    )
    mine = statistics.statistics_file(load_teacher(teacher_ckpt), stats_dir)
    other = statistics.statistics_file(load_teacher(second_teacher_ckpt), stats_dir)
    for source, target in (
        (mine, other),
        (statistics.statistics_description(mine), statistics.statistics_description(other)),
    ):
        shutil.copy(source, target)  # the first teacher's numbers under the second one's name
    argv = [
        "distill",
        "--dataset",
        "fashion-mnist",
        "--data-root",
        str(fmnist_root),
        "--teacher",
        str(second_teacher_ckpt),
        "--method",
        "edc",
        "--ipc",
        "1",
        "--stats-dir",
        str(stats_dir),
        "--out",
        str(tmp_path / "o"),
        *TINY,
    ]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and len(err) == 1 and "different settings (teacher_sha256)" in err[0], err
    assert not (tmp_path / "o").exists()
    config = resolve(
        StatsConfig,
        {
            "dataset": "fashion-mnist",
            "teachers": [str(teacher_ckpt)],
            "holdout": 2,
            "stats_dir": str(stats_dir),
            "data_root": str(fmnist_root),
        },
    )
    dataset = load_split(SPEC, "train", fmnist_root, holdout=2)
    with pytest.raises(FadrmError, match=r"different settings \(holdout\); give --stats-dir another folder"):
        statistics.teacher_statistics(config, [load_teacher(teacher_ckpt)], dataset, CPU)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "g-vbsm", "--ipc", "3"], "g-vbsm: --ipc 3 does not divide the group of --group-images 100"),
        (["--method", "edc", "--ipc", "4", "--group-slots", "3"], "--group-slots 3 must divide --ipc 4"),
        (["--method", "cv-dd", "--committee-size", "3"], "a committee of --committee-size 3 needs at least 3 teachers"),
        (["--method", "cv-dd", "--prior", "60"], "got 1 --prior values for 2 teacher(s)"),
        (["--method", "cv-dd", "--fixed-committee", "0", "2"], "--fixed-committee 0 2 must name 2 different"),
    ],
)
def test_bad_method_settings_are_one_line_before_any_work(
    args, message, fmnist_root, teacher_ckpt, second_teacher_ckpt, tmp_path, capsys
):
    argv = [
        "distill",
        "--dataset",
        "fashion-mnist",
        "--data-root",
        str(fmnist_root),
        "--teacher",
        str(teacher_ckpt),
        "--teacher",
        str(second_teacher_ckpt),
        "--out",
        str(tmp_path / "o"),
        *args,
    ]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_cv_dd_records_each_units_committee(fmnist_root, teacher_ckpt, second_teacher_ckpt, tmp_path):
    manifest = fadrm.distill(
        "fashion-mnist",
        [teacher_ckpt, second_teacher_ckpt],
        tmp_path / "o",
        method="cv-dd",
        ipc=2,
        data_root=str(fmnist_root),
        sizes=[28],
        budgets=[2],
        mipc=16,
        num_crop=2,
        priors=[60.0, 65.0],
        **QUIET,
    )
    weights = [float(w) for w in torch.softmax(torch.tensor([60.0, 65.0], dtype=torch.float64) / 5, 0)]
    for unit in manifest["units"]:  # two teachers: the one pair, at both IPC indices
        assert unit["committee"] == [0, 1] and unit["committee_weights"] == pytest.approx(weights, abs=1e-6)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_edc_starts_from_real_images_of_each_class(fmnist_root, teacher_ckpt, tmp_path):
    common = {"data_root": str(fmnist_root), "sizes": [28], "budgets": [0], "mipc": 16, "num_crop": 2, **QUIET}
    fadrm.distill("fashion-mnist", teacher_ckpt, tmp_path / "edc", method="edc", ipc=2, seed=4, **common)
    dataset = load_split(SPEC, "train", fmnist_root)
    for label in (0, 7):
        real = [dataset.load(i)[0].numpy() for i in dataset.indices_of_class(label)]
        for file in sorted((tmp_path / "edc" / "images").glob(f"00{label}_*/*.png")):
            start = _pixels(file)
            assert any(np.array_equal(start, r) or np.array_equal(start, r[:, ::-1]) for r in real), file
    # From a finished RDED set instead (--init-from): each image starts from that set's image of its class.
    fadrm.distill("fashion-mnist", teacher_ckpt, tmp_path / "rded", method="rded", ipc=1, **common)
    fadrm.distill(
        "fashion-mnist",
        teacher_ckpt,
        tmp_path / "from-rded",
        method="edc",
        ipc=1,
        init_from=str(tmp_path / "rded"),
        **common,
    )
    for file in sorted((tmp_path / "from-rded" / "images").rglob("*.png")):
        source = _pixels(tmp_path / "rded" / file.relative_to(tmp_path / "from-rded"))
        assert np.array_equal(_pixels(file), source) or np.array_equal(_pixels(file), source[:, ::-1])
    # The run is identified by the starting set's content, not its place: moved, the run is the same one;
    # another set's content at the same place is another run.
    shutil.copytree(tmp_path / "rded", tmp_path / "moved")
    lines: list[str] = []
    again = {**common, "log": lines.append}
    fadrm.distill(
        "fashion-mnist",
        teacher_ckpt,
        tmp_path / "from-rded",
        method="edc",
        ipc=1,
        init_from=str(tmp_path / "moved"),
        **again,
    )
    assert f"resuming in {tmp_path / 'from-rded'}" in lines
    fadrm.distill(
        "fashion-mnist", teacher_ckpt, tmp_path / "moved", method="rded", ipc=1, seed=9, overwrite=True, **common
    )
    with pytest.raises(FadrmError, match=r"different settings \(init_from\)"):
        fadrm.distill(
            "fashion-mnist",
            teacher_ckpt,
            tmp_path / "from-rded",
            method="edc",
            ipc=1,
            init_from=str(tmp_path / "moved"),
            **common,
        )
    with pytest.raises(FadrmError, match="holds a fashion-mnist set at IPC 1; it must be fashion-mnist at IPC 2"):
        fadrm.distill(
            "fashion-mnist",
            teacher_ckpt,
            tmp_path / "bad",
            method="edc",
            ipc=2,
            init_from=str(tmp_path / "rded"),
            **common,
        )


def test_run_plans_the_published_settings_of_each_new_method(tmp_path, capsys):
    def plan(dataset, method, ipc):
        code, out, err = run_cli(
            [
                "run",
                "--dataset",
                dataset,
                "--method",
                method,
                "--ipc",
                str(ipc),
                "--out",
                str(tmp_path / "r"),
                "--print-config",
            ],
            capsys,
        )
        assert code == 0, err
        return yaml.safe_load("\n".join(out))

    cv_dd = plan("cifar100", "cv-dd", 1)
    assert [t["model"] for t in cv_dd["teachers"]] == [
        "cifar_resnet18",
        "cifar_resnet50",
        "cifar_shufflenet_v2_x0_5",
        "cifar_mobilenet_v2",
        "cifar_densenet121",
    ]
    synthesis = cv_dd["distill"]["synthesis"]
    assert synthesis["priors"] == [64.0, 60.6, 51.6, 59.4, 56.4] and synthesis["fixed_committee"] == [2, 3]
    assert (synthesis["budgets"], synthesis["lr"], synthesis["committee_size"]) == ([4000], 0.25, 2)
    g_vbsm = plan("imagenet-1k", "g-vbsm", 10)["distill"]
    assert len(g_vbsm["teachers"]) == 4 and g_vbsm["amp"] == "off"
    assert {
        k: g_vbsm["synthesis"][k]
        for k in ("budgets", "lr", "stat_ema", "conv_drop", "dd_weight", "group_images", "jitter")
    } == {
        "budgets": [4000],
        "lr": 0.1,
        "stat_ema": 0.4,
        "conv_drop": 0.0,
        "dd_weight": 1.0,
        "group_images": 80,
        "jitter": 32,
    }
    edc = plan("tiny-imagenet", "edc", 50)["distill"]["synthesis"]
    assert (edc["budgets"], edc["crop_scale"], edc["jitter"], edc["stat_ema"], edc["conv_drop"]) == (
        [2000],
        [0.5, 1.0],
        0,
        0.8,
        0.0,
    )
    assert plan("tiny-imagenet", "g-vbsm", 50)["distill"]["synthesis"]["group_slots"] == 5


def test_statistics_of_other_data_are_refused(fmnist_root, teacher_ckpt, tmp_path):
    """A statistics file is keyed by the dataset's content: one training image changed, the file is refused
    (as for another teacher) rather than matched as if it were this data's."""
    import gzip

    data = tmp_path / "data"
    shutil.copytree(fmnist_root, data)
    options = {"data_root": str(data), "stats_dir": str(tmp_path / "s"), **QUIET}
    fadrm.compute_statistics("fashion-mnist", teacher_ckpt, **options)
    path = data / "train-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[16 + 400] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(FadrmError, match=r"different settings \(data_sha256\); pass --overwrite"):
        fadrm.compute_statistics("fashion-mnist", teacher_ckpt, **options)
