"""``distill`` end to end on a tiny Fashion-MNIST-format fixture: methods, output, resume, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import fadrm
import fadrm.synthesis.pipeline as distill_module
from fadrm.data import get_dataset_spec
from fadrm.data.transforms import denormalize
from fadrm.errors import FadrmError
from fadrm.models.registry import register_model
from fadrm.seeding import make_generator
from fadrm.synthesis.methods import METHODS

from conftest import make_teacher_checkpoint

TINY = dict(sizes=[24, 28], budgets=[2, 2], mipc=16, num_crop=2, classes_per_group=5, device="cpu", amp="off")


def run(fmnist_root, teacher, out, method="fadrm", ipc=2, log=lambda s: None, **kw):
    teachers = teacher if isinstance(teacher, list) else [teacher]
    options = {**TINY, **kw}
    return fadrm.distill(
        "fashion-mnist", teachers, out, method=method, ipc=ipc, data_root=str(fmnist_root), log=log, **options
    )


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


# The stage plan each method runs for TINY's configured stages (sizes 24, 28; budgets 2, 2).
PLANNED_BUDGETS = {
    "fadrm": [2, 2],
    "fadrm+": [2, 2],
    "sre2l": [4],
    "sre2l++": [4],
    "rded": [0],
    "g-vbsm": [4],
    "edc": [4],
    "cv-dd": [4],
}


@pytest.mark.parametrize("method", METHODS.names())
def test_each_method_end_to_end(fmnist_root, teacher_ckpt, second_teacher_ckpt, tmp_path, method):
    # A method that takes several teachers gets two (of different architectures).
    several = METHODS.get(method).max_teachers is None
    manifest = run(
        fmnist_root, [teacher_ckpt, second_teacher_ckpt] if several else teacher_ckpt, tmp_path / "out", method=method
    )
    assert len(manifest["teachers"]) == (2 if several else 1)
    images = pngs(tmp_path / "out" / "images")
    assert len(images) == 20 and len(manifest["images"]) == 20
    assert sorted({name.split("/")[0] for name in images})[0] == "000_T-shirt_top"
    assert "001.png" in {name.split("/")[1] for name in images}
    with Image.open(tmp_path / "out" / "images" / "003_Dress" / "001.png") as img:
        assert img.size == (28, 28) and img.mode == "L"
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["method"] == method and on_disk["complete"] and on_disk["format_version"] == 2
    assert on_disk["teachers"][0]["sha256"] == fadrm.load_teacher(teacher_ckpt).sha256
    assert on_disk["config"]["synthesis"]["sizes"] == [24, 28] and "torch_version" in on_disk
    assert on_disk["stage_plan"]["budgets"] == PLANNED_BUDGETS[method]
    assert (tmp_path / "out" / "config.yaml").exists()
    record = on_disk["images"][7]
    assert set(record) >= {"class", "class_name", "ipc_index", "file", "ce"}
    assert on_disk["units"][0]["seconds_per_image"] > 0 and on_disk["peak_memory_bytes"] > 0
    # The result is an ImageFolder.
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(tmp_path / "out" / "images"))
    assert folder.classes[9] == "009_Ankle_boot" and len(folder) == 20


def test_rded_output_is_the_selected_patches(fmnist_root, teacher_ckpt, tmp_path):
    run(fmnist_root, teacher_ckpt, tmp_path / "out", method="rded")
    assert pngs(tmp_path / "out" / "images") == pngs(tmp_path / "out" / "init")


def test_only_a_method_that_does_not_optimise_copies_its_patches(fmnist_root, teacher_ckpt, tmp_path):
    # FADRM with no iterations still resizes between its stages and merges by ARC: its images are
    # computed, not the patch files.
    run(fmnist_root, teacher_ckpt, tmp_path / "out", method="fadrm", budgets=[0, 0])
    assert pngs(tmp_path / "out" / "images") != pngs(tmp_path / "out" / "init")


def test_patches_are_real_crops_of_the_right_class(fmnist_root, teacher_ckpt, tmp_path):
    run(fmnist_root, teacher_ckpt, tmp_path / "out", method="rded", ipc=3)
    record = json.loads((tmp_path / "out" / "state" / "init" / "class00004.json").read_text())
    dataset = fadrm.load_split(get_dataset_spec("fashion-mnist"), "train", fmnist_root)
    assert all(dataset.targets[i] == 4 for i in record["source_indices"])
    assert record["scores"] == sorted(record["scores"])  # "easy" band: lowest loss first


def test_sre2l_starts_from_noise(fmnist_root, teacher_ckpt, tmp_path):
    run(fmnist_root, teacher_ckpt, tmp_path / "out", method="sre2l", ipc=1, budgets=[0, 0], seed=3)
    assert not (tmp_path / "out" / "init").exists()
    spec = get_dataset_spec("fashion-mnist")
    noise = torch.randn((5, 1, 28, 28), generator=make_generator(3, "synth", 0, 0))
    expected = denormalize(noise, spec.mean, spec.std).clamp(0, 1).mul(255).round().to(torch.uint8)
    with Image.open(tmp_path / "out" / "images" / "002_Pullover" / "000.png") as img:
        assert np.array_equal(np.asarray(img), expected[2, 0].numpy())


def test_same_seed_gives_identical_bytes(fmnist_root, teacher_ckpt, tmp_path):
    run(fmnist_root, teacher_ckpt, tmp_path / "a", seed=5)
    run(fmnist_root, teacher_ckpt, tmp_path / "b", seed=5, groups_per_batch=1)
    run(fmnist_root, teacher_ckpt, tmp_path / "c", seed=6)
    assert pngs(tmp_path / "a") == pngs(tmp_path / "b")
    assert pngs(tmp_path / "a") != pngs(tmp_path / "c")


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="torch.compile needs a C++ compiler")
def test_compiled_teachers_give_the_same_images(fmnist_root, teacher_ckpt, tmp_path, monkeypatch):
    # --compile is an execution choice: it may change float rounding, never the result.
    run(fmnist_root, teacher_ckpt, tmp_path / "eager", ipc=1, classes_per_group=10)
    compiled_models = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compiled_models.append(model) or real_compile(model))
    manifest = run(fmnist_root, teacher_ckpt, tmp_path / "compiled", ipc=1, classes_per_group=10, compile=True)
    assert manifest["config"]["compile"] is True and len(compiled_models) == 1
    eager, compiled = pngs(tmp_path / "eager" / "images"), pngs(tmp_path / "compiled" / "images")
    assert eager.keys() == compiled.keys()
    for name in eager:
        a = np.asarray(Image.open(tmp_path / "eager" / "images" / name), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "compiled" / "images" / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, name


def test_resume_after_interruption_redoes_nothing_finished(fmnist_root, teacher_ckpt, tmp_path, monkeypatch):
    run(fmnist_root, teacher_ckpt, tmp_path / "straight", groups_per_batch=1)
    real_recover = distill_module.recover
    calls = {"n": 0}

    def dies_on_third_unit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if killed mid-unit
        return real_recover(*args, **kwargs)

    monkeypatch.setattr(distill_module, "recover", dies_on_third_unit)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(fmnist_root, teacher_ckpt, out, groups_per_batch=1)
    done = sorted((out / "state" / "units").glob("*.json"))
    assert len(done) == 2 and not (out / "manifest.json").exists()
    assert not list(out.rglob(".*.tmp"))  # nothing half-written is left under a final name
    stamps = {p.name: p.stat().st_mtime_ns for p in done}
    monkeypatch.setattr(distill_module, "recover", real_recover)
    lines: list[str] = []
    run(fmnist_root, teacher_ckpt, out, groups_per_batch=1, log=lines.append)
    assert any("resuming" in line for line in lines) and any("2 groups to synthesise" in line for line in lines)
    assert {p.name: p.stat().st_mtime_ns for p in done} == stamps
    assert pngs(out / "images") == pngs(tmp_path / "straight" / "images")
    for path in (out / "images").rglob("*.png"):
        with Image.open(path) as img:
            img.load()


def test_kill_9_then_rerun_completes(fmnist_root, teacher_ckpt, tmp_path):
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "fadrm",
        "distill",
        "--dataset",
        "fashion-mnist",
        "--data-root",
        str(fmnist_root),
        "--teacher",
        str(teacher_ckpt),
        "--ipc",
        "4",
        "--out",
        str(out),
        "--sizes",
        "28",
        "--budgets",
        "60",
        "--mipc",
        "16",
        "--num-crop",
        "2",
        "--classes-per-group",
        "5",
        "--groups-per-batch",
        "1",
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        units = out / "state" / "units"
        for _ in range(600):
            if units.exists() and any(units.glob("*.json")):
                break
            if proc.poll() is not None:
                break
            import time

            time.sleep(0.1)
        proc.kill()
    finally:
        proc.wait()
    assert subprocess.run(args, capture_output=True).returncode == 0
    assert json.loads((out / "manifest.json").read_text())["complete"]
    assert len(pngs(out / "images")) == 40


# ---------------------------------------------------------------- bad input
def test_ipc_larger_than_class(fmnist_root, teacher_ckpt, tmp_path):
    with pytest.raises(FadrmError, match="has 16 training images; IPC 17"):
        run(fmnist_root, teacher_ckpt, tmp_path / "o", ipc=17, mipc=300)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"sizes": [24, 28], "budgets": [1]}, "one value per stage"),
        ({"alpha": 1.5}, r"--alpha must be in \[0, 1\]"),
        ({"sizes": [28, 24], "budgets": [1, 1]}, "last stage must be at full resolution"),
        ({"ipc": 0}, "at least 1"),
    ],
)
def test_bad_settings(fmnist_root, teacher_ckpt, tmp_path, options, message):
    with pytest.raises(FadrmError, match=message):
        run(fmnist_root, teacher_ckpt, tmp_path / "o", **options)


@register_model("test-no-bn")
def _no_bn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))


def test_teacher_without_batchnorm(fmnist_root, tmp_path):
    ckpt = make_teacher_checkpoint(tmp_path / "nobn.pt", arch="test-no-bn")
    with pytest.raises(FadrmError, match="none of the teachers"):
        run(fmnist_root, ckpt, tmp_path / "o")


def test_teacher_for_other_classes_or_channels(fmnist_root, tmp_path):
    ckpt = make_teacher_checkpoint(tmp_path / "c3.pt", channels=3, width=4)
    with pytest.raises(FadrmError, match="3-channel"):
        run(fmnist_root, ckpt, tmp_path / "o")
    ckpt = make_teacher_checkpoint(tmp_path / "k7.pt", num_classes=7, class_names=[str(i) for i in range(7)], width=4)
    with pytest.raises(FadrmError, match="predicts 7 classes"):
        run(fmnist_root, ckpt, tmp_path / "o")


def test_teachers_that_disagree_on_classes(fmnist_root, teacher_ckpt, tmp_path):
    shuffled = make_teacher_checkpoint(tmp_path / "s.pt", class_names=[f"x{i}" for i in range(10)], width=4)
    with pytest.raises(FadrmError, match="other classes"):
        run(fmnist_root, [teacher_ckpt, shuffled], tmp_path / "o", method="fadrm+")


def test_several_teachers_need_fadrm_plus(fmnist_root, teacher_ckpt, second_teacher_ckpt, tmp_path):
    with pytest.raises(FadrmError, match="use fadrm\\+"):
        run(fmnist_root, [teacher_ckpt, second_teacher_ckpt], tmp_path / "o", method="fadrm")


def test_output_that_is_a_file(fmnist_root, teacher_ckpt, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FadrmError, match="--out must be a folder, not a file"):
        run(fmnist_root, teacher_ckpt, tmp_path / "file")


def test_different_config_refused_unless_overwrite(fmnist_root, teacher_ckpt, tmp_path):
    run(fmnist_root, teacher_ckpt, tmp_path / "o", method="rded")
    (tmp_path / "o" / "notes.txt").write_text("mine")
    with pytest.raises(FadrmError, match=r"different settings \(ipc\)"):
        run(fmnist_root, teacher_ckpt, tmp_path / "o", method="rded", ipc=3)
    run(fmnist_root, teacher_ckpt, tmp_path / "o", method="rded", ipc=3, overwrite=True)
    assert len(pngs(tmp_path / "o" / "images")) == 30
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine"  # only our own outputs are replaced


def test_overwrite_redoes_only_what_depends_on_the_change(fmnist_root, teacher_ckpt, tmp_path):
    """--overwrite with other synthesis settings keeps the patch selection, which does not depend on them, and
    gives the images a fresh run gives; another seed, which the selection depends on, selects again."""
    out, lines = tmp_path / "o", []
    run(fmnist_root, teacher_ckpt, out)
    selected = {p: p.stat().st_mtime_ns for p in sorted((out / "init").rglob("*.png"))}
    run(fmnist_root, teacher_ckpt, out, budgets=[3, 1], overwrite=True, log=lines.append)
    assert not any("selecting realistic patches" in line for line in lines), lines
    assert {p: p.stat().st_mtime_ns for p in sorted((out / "init").rglob("*.png"))} == selected
    run(fmnist_root, teacher_ckpt, tmp_path / "fresh", budgets=[3, 1])
    assert pngs(out) == pngs(tmp_path / "fresh")

    lines.clear()
    run(fmnist_root, teacher_ckpt, out, seed=1, overwrite=True, log=lines.append)
    assert "patches selected with other seed are selected again" in lines
    assert "selecting realistic patches for 10 classes" in lines
    run(fmnist_root, teacher_ckpt, tmp_path / "fresh-seed", seed=1)
    assert pngs(out) == pngs(tmp_path / "fresh-seed")


def test_a_refused_run_writes_nothing_and_a_run_that_finished_no_work_does_not_block_another(
    fmnist_root, teacher_ckpt, tmp_path
):
    """The fixture has 16 training images a class: IPC 20 is refused before the folder is made. A run
    stopped before it finished anything (its run.json and config.yaml only) is taken over by a command of
    other settings; once a run has finished work, other settings are refused."""
    out = tmp_path / "o"
    with pytest.raises(FadrmError, match="has 16 training images; IPC 20 with factor 1 needs 20; lower --ipc"):
        run(fmnist_root, teacher_ckpt, out, method="rded", ipc=20)
    assert not out.exists()
    run(fmnist_root, teacher_ckpt, tmp_path / "first", method="rded", ipc=3, log=lambda line: None)
    out.mkdir()
    for name in ("run.json", "config.yaml"):
        shutil.copy(tmp_path / "first" / name, out / name)
    lines: list[str] = []
    run(fmnist_root, teacher_ckpt, out, method="rded", ipc=2, log=lines.append)
    assert f"{out} holds a run that finished no work; starting this one in its place" in lines
    assert len(pngs(out / "images")) == 20
    with pytest.raises(FadrmError, match=r"different settings \(ipc\)"):
        run(fmnist_root, teacher_ckpt, out, method="rded", ipc=3)


def test_a_set_made_with_an_old_default_names_the_flag_that_resumes_it(fmnist_root, teacher_ckpt, tmp_path):
    # A factor-2 set whose patches were scored the fadrm 0.1 way: the refusal says how to resume it.
    run(fmnist_root, teacher_ckpt, tmp_path / "o", method="rded", factor=2, ipc=1, patch_scoring="resize")
    with pytest.raises(FadrmError, match=r"different settings \(patch_scoring\); .*--patch-scoring resize"):
        run(fmnist_root, teacher_ckpt, tmp_path / "o", method="rded", factor=2, ipc=1)
    # With patches that fill the image the scoring has no effect and is not part of the identity.
    run(fmnist_root, teacher_ckpt, tmp_path / "p", method="rded", patch_scoring="resize")
    run(fmnist_root, teacher_ckpt, tmp_path / "p", method="rded")


def test_unknown_method(fmnist_root, teacher_ckpt, tmp_path):
    with pytest.raises(FadrmError, match="--method must be one of cv-dd, edc, fadrm, .*, got 'fadrm2'"):
        run(fmnist_root, teacher_ckpt, tmp_path / "o", method="fadrm2")


def test_holdout_teacher_must_match(fmnist_root, teacher_ckpt, tmp_path):
    with pytest.raises(FadrmError, match="trained with --holdout 0, this run holds out 2"):
        run(fmnist_root, teacher_ckpt, tmp_path / "o", holdout=2)
