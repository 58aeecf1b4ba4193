"""The on-disk formats: the one identity check, the label store, and folders written by fadrm 0.2
(flat configs) that must still resume and keep their finished students."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import fadrm
from fadrm.artifacts import changed_settings, require_same_settings
from fadrm.distilled import DistilledSet
from fadrm.config import DistillConfig, key_of
from fadrm.errors import FadrmError
from fadrm.evaluation.store import LabelStore
from fadrm.labels import soft_targets


def test_changed_settings_names_every_difference_one_level_down():
    found = {"config": {"ipc": 1, "alpha": 0.5}, "teachers_sha256": ["a"], "gone": 1}
    expected = {"config": {"ipc": 2, "alpha": 0.5, "new": 3}, "teachers_sha256": ["a"]}
    assert changed_settings(found, expected) == ["gone", "ipc", "new"]
    assert changed_settings(expected, expected) == []


def test_require_same_settings_is_one_line_with_the_fix_and_hints():
    with pytest.raises(FadrmError) as error:
        require_same_settings(
            {"patch_scoring": "resize"},
            {"patch_scoring": "pad"},
            "the set in o",
            "pass --overwrite",
            {"patch_scoring": "0.1 used resize"},
        )
    assert (
        str(error.value) == "the set in o was made with different settings (patch_scoring); 0.1 used resize; "
        "pass --overwrite"
    )
    require_same_settings({"a": 1}, {"a": 1}, "x", "y")  # the same: no error


def test_topk_store_keeps_mass(tmp_path):
    store = LabelStore(tmp_path, {}, 10, 3, 1.0)
    store.open()
    logits = torch.randn(5, 10)
    store.write(0, logits)
    probs = store.read(0)
    assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-3)
    top = soft_targets(logits, 1.0).topk(3, dim=1)
    assert torch.allclose(probs.gather(1, top.indices), top.values, atol=1e-3)


def test_a_label_store_for_another_plan_is_refused(tmp_path):
    LabelStore(tmp_path, {"seed": 0}, 10, None, 1.0).open()
    with pytest.raises(FadrmError, match=r"made with different settings \(seed\); use another --labels-dir"):
        LabelStore(tmp_path, {"seed": 1}, 10, None, 1.0).open()


def _as_written_by_0_2(folder):
    """Rewrite a set's manifest and config.yaml in fadrm 0.2's flat form (run.json is unchanged)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    config = fadrm.resolve(DistillConfig, {}, folder / "config.yaml")
    flat = {key_of(f): value for _, f, value in config.leaves()}
    manifest["config"] = flat
    manifest["recover_settings"] = manifest.pop("stage_plan")
    manifest["format_version"] = 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "config.yaml").write_text(yaml.safe_dump(flat, sort_keys=False))


def test_a_0_2_folder_resumes_and_keeps_its_finished_students(fmnist_root, teacher_ckpt, tmp_path):
    options = dict(method="rded", ipc=1, data_root=str(fmnist_root), mipc=16, num_crop=2, device="cpu")
    fadrm.distill("fashion-mnist", [teacher_ckpt], tmp_path / "set", log=lambda s: None, **options)
    quick = dict(epochs=1, batch_size=8, device="cpu", workers=0, data_root=str(fmnist_root))
    first = fadrm.evaluate(tmp_path / "set", log=lambda s: None, **quick)
    _as_written_by_0_2(tmp_path / "set")
    lines: list[str] = []
    fadrm.distill("fashion-mnist", [teacher_ckpt], tmp_path / "set", log=lines.append, **options)
    assert any("resuming" in line for line in lines) and not any("synthesise" in line for line in lines)
    lines.clear()
    again = fadrm.evaluate(tmp_path / "set", log=lines.append, **quick)
    assert any("reusing finished run" in line for line in lines)
    assert again["runs"][0]["history"] == first["runs"][0]["history"]
    images, labels = DistilledSet.open(tmp_path / "set").images()
    assert images.shape == (10, 1, 28, 28) and labels.tolist() == list(range(10))


def _edited(manifest: dict, edit) -> dict:
    """A deep copy of ``manifest`` changed by ``edit``."""
    copy = json.loads(json.dumps(manifest))
    edit(copy)
    return copy


def _swap_classes(m: dict) -> None:
    first, last = m["images"][0], m["images"][-1]
    first["class"], last["class"] = last["class"], first["class"]
    first["class_name"], last["class_name"] = last["class_name"], first["class_name"]


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.update(ipc=3), r"its ipc 3 is not the 2 its config was run with"),
        (lambda m: m["images"].__delitem__(slice(0, 2)), r"class 0 \(T-shirt/top\) has 0 images, the set's IPC is 2"),
        (
            lambda m: m["images"][0].update(class_name="Bag"),
            r"image record 0 says class 0 is 'Bag', the dataset's is 'T-shirt/top'",
        ),
        (_swap_classes, r"image record 0 \(images/000_T-shirt_top/000.png\) is of class 9, its folder of class 000"),
        (
            lambda m: m["images"][1].update(ipc_index=0),
            r"image record 1 has IPC index 0: not one of 0-1, or given twice",
        ),
        (lambda m: m["images"][0].update({"class": 10}), r"image record 0 has no class of the set's 10"),
    ],
)
def test_a_manifest_that_disagrees_with_itself_is_refused(distilled, tmp_path, edit, message):
    """An edited manifest used to change a baseline's size, or lose or swap classes, silently."""
    import shutil

    folder = tmp_path / "set"
    shutil.copytree(distilled, folder, ignore=shutil.ignore_patterns("eval*"))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert DistilledSet.open(folder).ipc == 2
    (folder / "manifest.json").write_text(json.dumps(_edited(manifest, edit)))
    with pytest.raises(FadrmError, match=rf"manifest.json does not describe a whole set \({message}"):
        DistilledSet.open(folder)


def test_a_damaged_manifest_is_one_line_with_its_remedy(distilled, tmp_path):
    import shutil

    folder = tmp_path / "set"
    shutil.copytree(distilled, folder, ignore=shutil.ignore_patterns("eval*"))
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(FadrmError, match=r"manifest.json is damaged \(.*\); a manifest cannot be remade"):
        DistilledSet.open(folder)
