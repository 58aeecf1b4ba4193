"""Relabelling and evaluation: soft labels, live vs stored, accuracy, baselines, resume, bad input.

Views and mixing are tested in test_augment.py, the student loop in test_students.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import fadrm
from fadrm.data import get_dataset_spec, normalize
from fadrm.evaluation.store import LabelStore, stored_label_bytes
from fadrm.augment import ViewSampler, render
from fadrm.config import EvalConfig
from fadrm.errors import FadrmError
from fadrm.labels import TeacherLabeller, label_epoch, soft_targets
from fadrm.registry import Registry
from fadrm.runtime import make_runtime
from fadrm.training import evaluate_accuracy

CPU = make_runtime("cpu", "off")
SPEC = get_dataset_spec("fashion-mnist")
QUICK = dict(epochs=2, batch_size=8, device="cpu", amp="off", workers=0)


def test_soft_labels_equal_teacher_output_on_identical_views(teacher_ckpt, second_teacher_ckpt):
    a, b = fadrm.load_teacher(teacher_ckpt).model, fadrm.load_teacher(second_teacher_ckpt).model
    x = torch.randn(6, 1, 28, 28)
    assert torch.allclose(TeacherLabeller([a])(x, CPU), a(x))
    assert torch.allclose(TeacherLabeller([a, b])(x, CPU), (a(x) + b(x)) / 2, atol=1e-6)
    assert torch.allclose(TeacherLabeller([a, b], weights=[3, 1])(x, CPU), 0.75 * a(x) + 0.25 * b(x), atol=1e-6)


def test_bssl_uses_batch_statistics_and_leaves_teacher_untouched(teacher_ckpt):
    model = fadrm.load_teacher(teacher_ckpt).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 1, 28, 28)
    out = TeacherLabeller([model], bssl=True)(x, CPU)
    model.train()
    with torch.no_grad():
        expected = torch.cat([model(x[:4]), model(x[4:])])
    model.load_state_dict(before)
    model.eval()
    assert torch.allclose(out, expected, atol=1e-5)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_live_and_stored_give_the_same_batches_and_labels(teacher_ckpt, tmp_path):
    model = fadrm.load_teacher(teacher_ckpt).model
    labeller = TeacherLabeller([model])
    images = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    sampler = ViewSampler(seed=2, size=28)
    store = LabelStore(tmp_path / "labels", {"images": 10}, 10, None, 20.0)
    store.open()
    store.write(0, label_epoch(images, sampler, 0, 4, labeller, SPEC.mean, SPEC.std, CPU))
    stored = store.read(0)
    offset = 0
    for b, idx in enumerate(sampler.batches(0, 10, 4)):
        view = sampler.view(0, b, idx, 28, 28)
        live = labeller(normalize(render(images, view, 28), SPEC.mean, SPEC.std), CPU)
        expected = soft_targets(live.half(), 20.0)  # stored logits are fp16
        assert torch.allclose(stored[offset : offset + len(idx)], expected, atol=1e-6)
        offset += len(idx)
    assert store.bytes_on_disk() < 10 * 10 * 2 + 1024  # fp16 logits + a small header
    assert stored_label_bytes(100, None) == 200 and stored_label_bytes(100, 10) == 40


def test_accuracy_on_a_known_answer():
    class Fixed(nn.Module):
        def forward(self, x):  # predicts class = first pixel value, second guess = class + 1
            cls = x[:, 0, 0, 0].long()
            out = torch.zeros(len(x), 10)
            out[torch.arange(len(x)), cls] = 2.0
            out[torch.arange(len(x)), (cls + 1) % 10] = 1.0
            return out

    x = torch.zeros(8, 1, 2, 2)
    x[:, 0, 0, 0] = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7.0])
    y = torch.tensor([0, 1, 2, 3, 5, 6, 0, 0])  # 4 exact, 2 second-guess, 2 wrong
    loader = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=3)
    metrics = evaluate_accuracy(Fixed(), loader, CPU, (0.0,), (1.0,))
    assert metrics["top1"] == pytest.approx(50.0) and metrics["top5"] == pytest.approx(100.0 * 6 / 8)


def test_evaluate_with_baseline_and_stored_labels(distilled, fmnist_root, tmp_path):
    results = fadrm.evaluate(
        distilled,
        out=str(tmp_path / "e"),
        data_root=str(fmnist_root),
        baselines=["random-real"],
        labels="stored",
        log=lambda s: None,
        **QUICK,
    )
    kinds = [(r["train_set"], r["labels"]) for r in results["runs"]]
    assert kinds == [("distilled", "soft"), ("random-real", "soft"), ("random-real", "hard")]
    assert all(0 <= r["top1"] <= 100 and r["images"] == 20 for r in results["runs"])
    assert results["stored_labels"]["bytes_per_image_per_epoch"] == 20
    on_disk = json.loads((tmp_path / "e" / "results.json").read_text())
    assert on_disk["runs"][0]["history"][-1]["epoch"] == 2
    table = (tmp_path / "e" / "results.md").read_text()
    assert "| convnet-small | distilled | soft |" in table and "Best top-1: the best of the validations" in table
    # The last epoch is always validated, so the best of the validations is at least the final figure.
    assert all(r["best_top1"] >= r["top1"] and r["evaluated_epochs"][-1] == 2 for r in results["runs"])
    assert results["runs"][0]["recipe"]["source"].startswith("default")
    assert (tmp_path / "e" / "curves.png").exists()
    # Same command again: every run is reused.
    lines: list[str] = []
    again = fadrm.evaluate(
        distilled,
        out=str(tmp_path / "e"),
        data_root=str(fmnist_root),
        baselines=["random-real"],
        labels="stored",
        log=lines.append,
        **QUICK,
    )
    assert sum("reusing" in line for line in lines) == 3 and again["runs"] == results["runs"]


def test_robustness_trains_every_arm_scores_them_and_reuses_them(distilled, fmnist_root, tmp_path):
    common = dict(
        out=str(tmp_path / "e"),
        data_root=str(fmnist_root),
        robustness=True,
        full_data_dir=str(tmp_path / "cache"),
        **QUICK,
    )
    results = fadrm.evaluate(distilled, log=lambda s: None, **common)
    arms = [(r["train_set"], r["labels"], r["augment"]) for r in results["runs"]]
    assert arms == [
        ("full-data", "hard", True),
        ("distilled", "soft", True),
        ("random-real", "soft", True),
        ("random-real", "hard", True),
        ("distilled", "hard", True),
        ("distilled", "soft", False),
        ("random-real", "soft", False),
    ]
    acc = {arm: run["top1"] / 100 for arm, run in zip(arms, results["runs"])}
    (row,) = results["robustness"]
    assert row["hlr"] == pytest.approx(acc["full-data", "hard", True] - acc["distilled", "hard", True])
    assert row["ior"] == pytest.approx(acc["distilled", "soft", True] - acc["random-real", "soft", True])
    assert 0 <= row["lrs"] <= 1 and 0 <= row["ars"] <= 1
    # The full-data student is the teacher recipe's model, cached outside the evaluation and reused.
    (cached,) = (tmp_path / "cache").glob("fashion-mnist-convnet-small-*.pt")
    assert results["runs"][0]["checkpoint"] == str(cached) and results["runs"][0]["epochs"] == 7
    assert "## Robustness scores" in (tmp_path / "e" / "results.md").read_text()
    assert "validations after epochs 1, 2, as" in (tmp_path / "e" / "results.md").read_text()  # students' only
    assert "| distilled | soft, no augmentation |" in (tmp_path / "e" / "results.md").read_text()
    lines: list[str] = []
    again = fadrm.evaluate(distilled, log=lines.append, **common)
    assert sum("reusing finished run" in line for line in lines) == 6 and any(
        "already trained" in line for line in lines
    )
    assert again["robustness"] == results["robustness"]


def test_views_without_augmentation_are_the_images_themselves():
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    sampler = ViewSampler(seed=0, size=28, augment=False)
    (indices,) = sampler.batches(0, 5, 8)
    assert torch.equal(render(images, sampler.view(0, 0, indices, 28, 28), 28), images[indices].float() / 255)


def test_live_and_stored_students_match(distilled, fmnist_root, tmp_path):
    common = dict(data_root=str(fmnist_root), log=lambda s: None, **QUICK)
    live = fadrm.evaluate(distilled, out=str(tmp_path / "live"), labels="live", **common)
    stored = fadrm.evaluate(distilled, out=str(tmp_path / "stored"), labels="stored", **common)
    # fp16 storage of the logits is the only difference: the same batches, nearly the same labels.
    assert abs(live["runs"][0]["history"][0]["train_loss"] - stored["runs"][0]["history"][0]["train_loss"]) < 1e-3


def test_repeats_add_seeds_report_mean_and_std_and_keep_finished_runs(distilled, fmnist_root, tmp_path, monkeypatch):
    import statistics

    import fadrm.evaluation.run as evaluate_module

    common = dict(
        out=str(tmp_path / "e"), data_root=str(fmnist_root), baselines=["random-real"], labels="stored", **QUICK
    )
    single = fadrm.evaluate(distilled, log=lambda s: None, **common)
    subset_seeds: list[int] = []
    real_subset = evaluate_module.REAL_SUBSETS.get("random-real")
    recording = Registry("real subset")
    recording.add("random-real", lambda *args: subset_seeds.append(args[-1]) or real_subset(*args))
    monkeypatch.setattr(evaluate_module, "REAL_SUBSETS", recording)
    lines: list[str] = []
    results = fadrm.evaluate(distilled, repeats=2, log=lines.append, **common)
    # Repeat 0 is the single comparison, reused (its real subset is not even drawn); repeat 1 has its own seed,
    # views, labels and real subset.
    assert sum("reusing" in line for line in lines) == 3 and results["runs"][:3] == single["runs"]
    assert [r["seed"] for r in results["runs"]] == [0, 0, 0, 1, 1, 1] and subset_seeds == [1]
    first, second = (tmp_path / "e" / name / "epoch00000.safetensors" for name in ("labels", "labels-repeat1"))
    assert first.read_bytes() != second.read_bytes()
    assert results["runs"][0]["history"][0]["train_loss"] != results["runs"][3]["history"][0]["train_loss"]
    assert [(r["train_set"], r["labels"], r["repeats"]) for r in results["summary"]] == [
        ("distilled", "soft", 2),
        ("random-real", "soft", 2),
        ("random-real", "hard", 2),
    ]
    for row in results["summary"]:
        top1 = [
            r["top1"] for r in results["runs"] if (r["train_set"], r["labels"]) == (row["train_set"], row["labels"])
        ]
        assert row["top1"] == pytest.approx(statistics.fmean(top1))
        assert row["top1_std"] == pytest.approx(statistics.stdev(top1))
    table = (tmp_path / "e" / "results.md").read_text()
    assert f"| convnet-small | distilled | soft | 2 | {results['summary'][0]['top1']:.2f} ± " in table
    assert results["stored_labels"]["dirs"] == [str(first.parent), str(second.parent)]


# ---------------------------------------------------------------- bad input
def test_not_a_distilled_set(tmp_path):
    with pytest.raises(FadrmError, match="not a distilled set"):
        fadrm.evaluate(tmp_path, **QUICK)


def test_newer_manifest(distilled, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(distilled, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FadrmError, match="newer fadrm"):
        fadrm.evaluate(copy, **QUICK)


def test_teacher_from_another_dataset(distilled, fmnist_root, tmp_path):
    from conftest import make_teacher_checkpoint

    other = make_teacher_checkpoint(tmp_path / "o.pt", dataset="imagefolder", width=4)
    with pytest.raises(FadrmError, match="trained on imagefolder"):
        fadrm.evaluate(distilled, teachers=[str(other)], data_root=str(fmnist_root), **QUICK)


def test_repeats_below_one(distilled, fmnist_root):
    with pytest.raises(FadrmError, match="--repeats must be at least 1"):
        fadrm.evaluate(distilled, data_root=str(fmnist_root), **{**QUICK, "repeats": 0})


def test_unknown_student(distilled, fmnist_root):
    with pytest.raises(FadrmError, match="--student must be a registered model"):
        fadrm.evaluate(distilled, students=["resnet9000"], data_root=str(fmnist_root), **QUICK)


def test_stored_labels_for_another_ipc(distilled, fmnist_root, tmp_path):
    fadrm.evaluate(
        distilled, out=str(tmp_path / "e"), labels="stored", data_root=str(fmnist_root), log=lambda s: None, **QUICK
    )
    manifest = json.loads((distilled / "manifest.json").read_text())
    smaller = tmp_path / "ipc1"
    shutil.copytree(distilled, smaller)
    manifest["ipc"], manifest["images"] = 1, [r for r in manifest["images"] if r["ipc_index"] == 0]
    manifest["config"]["ipc"] = 1  # a whole IPC-1 set (an edited ipc alone is refused as it is)
    (smaller / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        FadrmError,
        match=r"label store in .* settings \(distilled_set, images, ipc\); use another --labels-dir",
    ):
        fadrm.evaluate(
            smaller, labels="stored", labels_dir=str(tmp_path / "e" / "labels"), data_root=str(fmnist_root), **QUICK
        )


def test_run_resumes_without_redoing_finished_stages(fmnist_root, tmp_path, monkeypatch):
    import fadrm.workflow as workflow

    options = dict(
        data_root=str(fmnist_root),
        device="cpu",
        amp="off",
        distill_options={"budgets": [1, 1, 1, 1], "mipc": 16, "num_crop": 2},
        eval_options={"epochs": 2, "batch_size": 8, "eval_at": [], "workers": 0},
    )
    real_evaluate = workflow.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fadrm.run("fashion-mnist", 1, tmp_path / "run", log=lambda s: None, **options)
    teacher_stamp = (tmp_path / "run" / "teacher.pt").stat().st_mtime_ns
    assert (tmp_path / "run" / "fadrm-ipc1" / "manifest.json").exists()
    monkeypatch.setattr(workflow, "evaluate", real_evaluate)
    lines: list[str] = []
    summary = fadrm.run("fashion-mnist", 1, tmp_path / "run", log=lines.append, **options)
    text = "\n".join(lines)
    assert "already trained" in text and "resuming" in text and "0 groups" not in text
    assert (tmp_path / "run" / "teacher.pt").stat().st_mtime_ns == teacher_stamp
    assert [r["train_set"] for r in summary["runs"]] == ["distilled", "random-real", "random-real"]
    assert "== fadrm run summary ==" in text and "wall time: teacher" in text
    assert "last-epoch top-1" in text and "best top-1 over the validations" in text
    # The robustness arms: the full-data student is the run's own teacher (the same recipe), not trained again.
    lines.clear()
    summary = fadrm.run(
        "fashion-mnist",
        1,
        tmp_path / "run",
        log=lines.append,
        robustness=True,
        **{**options, "eval_options": {**options["eval_options"], "full_data_dir": str(tmp_path / "cache")}},
    )
    text = "\n".join(lines)
    assert "the teacher " + str(tmp_path / "run" / "teacher.pt") + " was trained with these settings" in text
    assert not (tmp_path / "cache").exists() and summary["robustness"][0]["repeats"] == 1
    assert "robustness scores (accuracies as fractions, one seed): HLR " in text and "ARS" in text


def test_new_images_retrain_the_students_of_the_set_and_keep_its_baselines(distilled, fmnist_root, tmp_path):
    """Only what depends on a change is redone: distilling the set again (other per-image records, so
    another set id) retrains the students of its images; the random real subset's, which never saw
    them, are reused with the same accuracy."""
    copy = tmp_path / "copy"
    shutil.copytree(distilled, copy)
    options = dict(data_root=str(fmnist_root), baselines=["random-real", "hard-labels"], **QUICK)
    before = fadrm.evaluate(copy, log=lambda s: None, **options)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["images"][0]["ce"] += 1.0  # as after re-distilling into the same folder
    (copy / "manifest.json").write_text(json.dumps(manifest))
    lines: list[str] = []
    after = fadrm.evaluate(copy, log=lines.append, **options)
    reused = sorted(line.split(":")[0] for line in lines if "reusing finished run" in line)
    assert reused == ["random-real-convnet-small-hard", "random-real-convnet-small-soft"]
    trained = sorted(line.split(":")[0] for line in lines if "at the last epoch" in line)
    assert trained == ["distilled-convnet-small-hard", "distilled-convnet-small-soft"]
    top1 = [
        {r["labels"]: r["top1"] for r in results["runs"] if r["train_set"] == "random-real"}
        for results in (before, after)
    ]
    assert top1[0] == top1[1] and len(top1[0]) == 2


def test_finished_runs_survive_other_execution_flags(distilled, fmnist_root, tmp_path):
    # Resuming a set with another device/batching (or a manifest from a version without a newer
    # execution flag) describes the same images, so finished evaluations are kept.
    copy = tmp_path / "copy"
    shutil.copytree(distilled, copy)
    fadrm.evaluate(copy, data_root=str(fmnist_root), log=lambda s: None, **QUICK)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"].update(groups_per_batch=7, device="cuda")
    del manifest["config"]["compile"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    lines: list[str] = []
    fadrm.evaluate(copy, data_root=str(fmnist_root), log=lines.append, **QUICK)
    assert any("reusing" in line for line in lines)


# ------------------------------------------------------ published protocol
def test_bssl_halves_and_deterministic_teachers():
    from fadrm.labels import halves

    assert [len(h) for h in halves(torch.zeros(16, 1))] == [8, 8]
    assert [len(h) for h in halves(torch.zeros(5, 1))] == [2, 3]  # the extra image in the second half
    assert [len(h) for h in halves(torch.zeros(1, 1))] == [1]
    # Only BatchNorm uses batch statistics: a teacher's dropout stays off, so labels are repeatable.
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3)).eval()
    x = torch.randn(8, 1, 4, 4)
    labeller = TeacherLabeller([teacher], bssl=True)
    assert torch.equal(labeller(x, CPU), labeller(x, CPU))
    assert not teacher.training and not any(m.training for m in teacher.modules())


def test_a_finished_run_serves_the_validations_it_covers(distilled, fmnist_root, tmp_path):
    common = dict(out=str(tmp_path / "e"), data_root=str(fmnist_root), **{**QUICK, "epochs": 3})
    first = fadrm.evaluate(distilled, eval_every=1, log=lambda s: None, **common)["runs"][0]
    assert first["evaluated_epochs"] == [1, 2, 3]
    lines: list[str] = []
    sparser = fadrm.evaluate(distilled, eval_every=0, log=lines.append, **common)["runs"][0]
    # Reused, with the best taken over the asked validations only (here the last epoch's).
    assert any("reusing" in line for line in lines) and sparser["history"] == first["history"]
    assert sparser["evaluated_epochs"] == [3] and sparser["best_top1"] == sparser["top1"] == first["top1"]
    lines.clear()
    fadrm.evaluate(distilled, eval_every=0, eval_at=[2], log=lines.append, **common)
    assert any("reusing" in line for line in lines)
    # A validation the finished run never made needs the student again.
    fadrm.evaluate(
        distilled,
        out=str(tmp_path / "f"),
        data_root=str(fmnist_root),
        eval_every=0,
        log=lambda s: None,
        **{**QUICK, "epochs": 3},
    )
    lines.clear()
    fadrm.evaluate(
        distilled,
        out=str(tmp_path / "f"),
        data_root=str(fmnist_root),
        eval_every=1,
        log=lines.append,
        **{**QUICK, "epochs": 3},
    )
    assert not any("reusing" in line for line in lines)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": float("nan")}, "--temperature must be a finite number, got nan"),
        ({"lr": float("inf")}, "--student-lr must be a finite number, got inf"),
        ({"eta": 0.0}, "--eta must be a positive number, got 0.0"),
        ({"weight_decay": -1.0}, "--weight-decay must be a non-negative number, got -1.0"),
        ({"weight_decay": float("nan")}, "--weight-decay must be a finite number, got nan"),
        ({"mix_alpha": 0.0}, "--mix-alpha must be a positive number, got 0.0"),
        (
            {"accumulation": 3},
            "--accumulation 3 must divide --batch-size 8 (each loader batch is split into equal micro-batches)",
        ),
        ({"eval_every": -1}, "--eval-every must be at least 0, got -1"),
        ({"eval_at": [5]}, "--eval-at 5 is outside the 2 training epochs"),
        (
            {"topk": 10, "labels": "stored"},
            "--topk 10 keeps every one of the 10 classes; give fewer, or leave it out to store full logits",
        ),
        ({"optimizer": "adam"}, "--optimizer must be one of adamw, sgd, got 'adam'"),
        ({"schedule": "cosine"}, "--schedule must be one of multistep, ssrs, stretched-cosine, got 'cosine'"),
        ({"loss": "ce"}, "--loss must be one of kl, mse-ce, got 'ce'"),
        ({"mix": "cutout"}, "--mix must be one of cutmix, mixup, none, got 'cutout'"),
        (
            {"loss": "mse-ce", "topk": 3, "labels": "stored"},
            "--loss mse-ce needs the teachers' logits; --topk 3 stores probabilities only: leave --topk out",
        ),
        ({"teacher_priors": [60.0, 50.0]}, "2 teacher priors for 1 teachers: give one --teacher-prior per teacher"),
        (
            {"teacher_priors": [60.0], "teacher_weights": [1.0]},
            "give --teacher-weight or --teacher-prior, not both (priors make the weights)",
        ),
        (
            {"baselines": ["herding"]},
            "--baseline must be one of full-data, hard-labels, no-augmentation, random-real, got ['herding']",
        ),
    ],
)
def test_bad_protocol_values_are_one_clear_line(distilled, fmnist_root, tmp_path, options, message):
    with pytest.raises(FadrmError) as error:
        fadrm.evaluate(distilled, out=str(tmp_path / "e"), data_root=str(fmnist_root), **{**QUICK, **options})
    assert str(error.value) == message
    assert not (tmp_path / "e").exists()  # refused before anything is written


def test_new_options_at_their_defaults_keep_the_identity_of_older_runs():
    # Finished runs written before --schedule and --loss existed have neither in their identity.
    default = EvalConfig(distilled="x").identity()
    assert "schedule" not in default and "loss" not in default
    changed = EvalConfig(distilled="x", schedule="other", loss="other").identity()
    assert changed == {**default, "schedule": "other", "loss": "other"}


# ------------------------------------------------------- resumable students
def _student_weights(out) -> dict[str, torch.Tensor]:
    return fadrm.load_teacher(out / "runs" / "distilled-convnet-small-soft.pt").model.state_dict()


# With an EMA of the weights (EDC's protocol) the validations read the averages: resuming them
# from the live weights instead of the checkpoint would change the history of epochs 2 and 3.
@pytest.mark.parametrize("ema_decay", [0.0, 0.5])
def test_an_interrupted_student_resumes_to_the_same_weights_and_history(distilled, fmnist_root, tmp_path, ema_decay):
    common = dict(data_root=str(fmnist_root), eval_every=1, ema_decay=ema_decay, **{**QUICK, "epochs": 3})
    straight = fadrm.evaluate(distilled, out=str(tmp_path / "straight"), log=lambda s: None, **common)["runs"][0]

    def stop_at_epoch_2(line: str) -> None:
        if "epoch 2:" in line:  # logged after epoch 2's validation, before its checkpoint
            raise KeyboardInterrupt

    out = tmp_path / "e"
    partial = out / "runs" / "distilled-convnet-small-soft.partial.pt"
    with pytest.raises(KeyboardInterrupt):
        fadrm.evaluate(distilled, out=str(out), log=stop_at_epoch_2, **common)
    saved = torch.load(partial, weights_only=True)
    assert saved["epoch"] == 1 and len(saved["history"]) == 1 and saved["identity"]["epochs"] == 3
    assert {"model", "optimizer", "scheduler", "random"} <= set(saved) and "scaler" not in saved  # no scaler on the CPU
    assert ("ema" in saved) == (ema_decay > 0)
    lines: list[str] = []
    resumed = fadrm.evaluate(distilled, out=str(out), log=lines.append, **common)["runs"][0]
    assert "distilled-convnet-small-soft: resuming after epoch 1" in lines
    assert resumed["history"] == straight["history"] and resumed["evaluated_epochs"] == [1, 2, 3]
    assert not partial.exists()  # ours, removed once the finished run is written
    a, b = _student_weights(tmp_path / "straight"), _student_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(out / "runs" / "distilled-convnet-small-soft.pt", weights_only=True)
    assert ckpt["val_top1"] == straight["top1"] and ckpt["train_config"]["epochs"] == 3


def test_a_checkpoint_of_other_settings_is_replaced_naming_them(distilled, fmnist_root, tmp_path):
    common = dict(out=str(tmp_path / "e"), data_root=str(fmnist_root), eval_every=1, **{**QUICK, "epochs": 3})

    def stop_at_epoch_2(line: str) -> None:
        if "epoch 2:" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fadrm.evaluate(distilled, log=stop_at_epoch_2, **common)
    lines: list[str] = []
    fadrm.evaluate(distilled, temperature=4.0, log=lines.append, **common)
    assert any(line.endswith("holds a student of other settings (temperature); starting it again") for line in lines)
    assert not any("resuming" in line for line in lines)


def test_checkpoint_every_saves_every_nth_epoch(distilled, fmnist_root, tmp_path):
    def stop_at_epoch_3(line: str) -> None:
        if "epoch 3:" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fadrm.evaluate(
            distilled,
            out=str(tmp_path / "e"),
            data_root=str(fmnist_root),
            eval_every=1,
            checkpoint_every=2,
            log=stop_at_epoch_3,
            **{**QUICK, "epochs": 4},
        )
    partial = tmp_path / "e" / "runs" / "distilled-convnet-small-soft.partial.pt"
    assert torch.load(partial, weights_only=True)["epoch"] == 2


@pytest.mark.slow
def test_evaluate_killed_with_sigkill_resumes_to_the_same_student(distilled, fmnist_root, tmp_path):
    """kill -9 between epochs (a real process): the rerun continues from the last finished epoch and
    ends with the weights and history of an uninterrupted run, bit for bit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(out: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "fadrm",
            "evaluate",
            str(distilled),
            "--data-root",
            str(fmnist_root),
            "--epochs",
            "60",
            "--batch-size",
            "8",
            "--eval-every",
            "20",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--out",
            str(out),
        ]

    subprocess.run(command(tmp_path / "straight"), check=True, capture_output=True, env=env)
    killed = tmp_path / "killed"
    partial = killed / "runs" / "distilled-convnet-small-soft.partial.pt"
    proc = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.kill()  # SIGKILL: no handler runs
    finally:
        proc.wait()
    assert partial.exists(), "the run finished before it could be killed"
    epochs_done = torch.load(partial, weights_only=True)["epoch"]
    rerun = subprocess.run(command(killed), check=True, capture_output=True, text=True, env=env)
    assert f"resuming after epoch {epochs_done}" in rerun.stdout and 0 < epochs_done < 60
    a, b = _student_weights(tmp_path / "straight"), _student_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = [
        json.loads((out / "runs" / "distilled-convnet-small-soft.json").read_text())["result"]["history"]
        for out in (tmp_path / "straight", killed)
    ]
    assert history[0] == history[1] and not partial.exists()


# ----------------------------------------------------------------- the plan
def test_the_plan_names_every_job_its_identity_and_files_and_the_run_keeps_to_it(distilled, fmnist_root, tmp_path):
    """plan_evaluation decides what an evaluation trains without training anything; the run then
    trains exactly those jobs and records each under the identity the plan gave it."""
    from fadrm import api
    from fadrm.distilled import DistilledSet
    from fadrm.evaluation import STUDENT_PROTOCOL, plan_evaluation

    options = dict(data_root=str(fmnist_root), baselines=["random-real"], labels="stored", repeats=2, **QUICK)
    config = api.eval_config(distilled=str(distilled), out=str(tmp_path / "e"), **options)
    from fadrm.data.digest import data_digest
    from fadrm.io import default_cache

    distilled_set = DistilledSet.open(distilled)
    data = data_digest(fmnist_root, default_cache(), print)
    plan = plan_evaluation(config, distilled_set, "convnet-small", data_sha256=data)
    assert all(job.identity["data_sha256"] == data for repeat in plan.repeats for job in repeat.jobs)
    # The set settles what the config leaves to it, in a new config: the caller's is not changed.
    assert config.holdout is None and plan.config.holdout == distilled_set.holdout
    assert plan.out == tmp_path / "e" and plan.students == ("convnet-small",) and plan.full_data == ()
    assert plan.subsets == ("random-real",)
    keys = [[job.key for job in repeat.jobs] for repeat in plan.repeats]
    assert keys == [
        ["distilled-convnet-small-soft", "random-real-convnet-small-soft", "random-real-convnet-small-hard"],
        [
            "distilled-convnet-small-soft-repeat1",
            "random-real-convnet-small-soft-repeat1",
            "random-real-convnet-small-hard-repeat1",
        ],
    ]
    assert [repeat.config.seed for repeat in plan.repeats] == [0, 1]
    assert [repeat.store_folder for repeat in plan.repeats] == [
        tmp_path / "e" / "labels",
        tmp_path / "e" / "labels-repeat1",
    ]
    assert [repeat.store_identity["seed"] for repeat in plan.repeats] == [0, 1]
    # Only the set's soft-label student trains on the views the label store holds.
    assert [[job.uses_store for job in repeat.jobs] for repeat in plan.repeats] == [[True, False, False]] * 2
    job = plan.repeats[1].jobs[0]
    assert job.run_file == tmp_path / "e" / "runs" / "distilled-convnet-small-soft-repeat1.json"
    assert job.weights_file.name == "distilled-convnet-small-soft-repeat1.pt"
    assert job.identity["seed"] == 1 and job.identity["protocol"] == STUDENT_PROTOCOL
    assert job.identity["distilled_set"] == distilled_set.set_id()
    assert job.recipe["lr"] == job.config.lr and job.recipe["source"].startswith("default")

    results = fadrm.evaluate(distilled, out=str(tmp_path / "e"), log=lambda s: None, **options)
    assert [r["seed"] for r in results["runs"]] == [0, 0, 0, 1, 1, 1]
    for repeat in plan.repeats:
        for job in repeat.jobs:
            assert json.loads(job.run_file.read_text())["identity"] == json.loads(json.dumps(job.identity))
            assert job.weights_file.exists() and not job.checkpoint_file.exists()
    store = json.loads((tmp_path / "e" / "labels-repeat1" / "labels.json").read_text())
    assert {k: v for k, v in store.items() if k not in ("format_version", "topk")} == plan.repeats[1].store_identity


def test_the_plan_settles_a_committees_priors_under_its_own_protocol_only(distilled, fmnist_root):
    from dataclasses import replace

    from fadrm.distilled import DistilledSet
    from fadrm.evaluation import settle

    committee = DistilledSet.open(distilled)
    manifest = {**committee.manifest, "config": {**committee.manifest["config"], "synthesis": {"priors": [1.0, 2.0]}}}
    committee = replace(committee, manifest=manifest)
    config = EvalConfig(distilled=str(distilled), data_root=str(fmnist_root))
    assert settle(config, committee).teacher_priors == [1.0, 2.0]
    assert settle(replace(config, protocol="common"), committee).teacher_priors is None
    assert settle(replace(config, teacher_weights=[1.0, 1.0]), committee).teacher_priors is None
    assert config.teacher_priors is None  # a new config each time; the given one is frozen
