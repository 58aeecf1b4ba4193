"""Relabelling and student training: views, soft labels, live vs stored, CutMix, accuracy, resume, bad input."""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil

import pytest
import torch
from torch import nn

import fadrm
from fadrm.data import get_dataset_spec, normalize
from fadrm.errors import FadrmError
from fadrm.labels import LabelStore, TeacherLabeller, ViewSampler, label_epoch, render, soft_targets, stored_label_bytes
from fadrm.runtime import make_runtime
from fadrm.training import evaluate_accuracy

CPU = make_runtime("cpu", "off")
EV = importlib.import_module("fadrm.evaluate")  # the module; fadrm.evaluate is the API function
SPEC = get_dataset_spec("fashion-mnist")
QUICK = dict(epochs=2, batch_size=8, device="cpu", amp="off", workers=0)


@pytest.fixture(scope="module")
def distilled(fmnist_root, teacher_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("set") / "rded"
    fadrm.distill("fashion-mnist", [teacher_ckpt], out, method="rded", ipc=2, data_root=str(fmnist_root),
                  mipc=16, num_crop=2, device="cpu", log=lambda s: None)  # fmt: skip
    return out


def test_views_are_a_function_of_seed_epoch_batch():
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    sampler = ViewSampler(seed=1, size=28)
    a = [sampler.view(3, b, idx, 28, 28) for b, idx in enumerate(sampler.batches(3, 6, 4))]
    b = [sampler.view(3, b, idx, 28, 28) for b, idx in enumerate(sampler.batches(3, 6, 4))]
    assert all(torch.equal(render(images, x, 28), render(images, y, 28)) for x, y in zip(a, b))
    other = sampler.view(4, 0, sampler.batches(4, 6, 4)[0], 28, 28)
    assert not torch.equal(render(images, a[0], 28), render(images, other, 28)[: len(a[0].indices)])


def test_cutmix_box_and_weight_are_shared_by_images_and_labels():
    images = torch.zeros(4, 1, 20, 20, dtype=torch.uint8)
    images[1] = 255  # one white image among black ones
    sampler = ViewSampler(seed=0, size=20, scale=(1.0, 1.0), mix="cutmix")
    for batch in range(20):
        view = sampler.view(0, batch, torch.arange(4), 20, 20)
        mixed = render(images, view, 20)
        top, left, h, w = view.cut_box
        # The pasted rectangle is exactly the partner's pixels, the rest the image's own.
        for i in range(4):
            own = float(i == 1)
            partner = float(view.partner[i] == 1)
            assert torch.all(mixed[i, :, top : top + h, left : left + w] == partner)
            outside = mixed[i].clone()
            outside[:, top : top + h, left : left + w] = own
            assert torch.all(outside == own)
        assert view.lam == pytest.approx(1 - h * w / 400)


def test_mixup_labels_the_mixed_image():
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    sampler = ViewSampler(seed=0, size=28, mix="mixup")
    view = sampler.view(0, 0, torch.arange(4), 28, 28)
    pixels = normalize(render(images, view, 28), SPEC.mean, SPEC.std)
    labels = TeacherLabeller([teacher])(pixels, CPU)
    assert torch.allclose(labels, teacher(pixels))  # the view the student sees, mixed, not the clean images
    assert 0 < view.lam < 1


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


def test_topk_store_keeps_mass(tmp_path):
    store = LabelStore(tmp_path, {}, 10, 3, 1.0)
    store.open()
    logits = torch.randn(5, 10)
    store.write(0, logits)
    probs = store.read(0)
    assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-3)
    top = soft_targets(logits, 1.0).topk(3, dim=1)
    assert torch.allclose(probs.gather(1, top.indices), top.values, atol=1e-3)


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
    results = fadrm.evaluate(distilled, out=str(tmp_path / "e"), data_root=str(fmnist_root), baselines=["random-real"],
                             labels="stored", log=lambda s: None, **QUICK)  # fmt: skip
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
    again = fadrm.evaluate(distilled, out=str(tmp_path / "e"), data_root=str(fmnist_root), baselines=["random-real"],
                           labels="stored", log=lines.append, **QUICK)  # fmt: skip
    assert sum("reusing" in line for line in lines) == 3 and again["runs"] == results["runs"]


def test_live_and_stored_students_match(distilled, fmnist_root, tmp_path):
    common = dict(data_root=str(fmnist_root), log=lambda s: None, **QUICK)
    live = fadrm.evaluate(distilled, out=str(tmp_path / "live"), labels="live", **common)
    stored = fadrm.evaluate(distilled, out=str(tmp_path / "stored"), labels="stored", **common)
    # fp16 storage of the logits is the only difference: the same batches, nearly the same labels.
    assert abs(live["runs"][0]["history"][0]["train_loss"] - stored["runs"][0]["history"][0]["train_loss"]) < 1e-3


def test_repeats_add_seeds_report_mean_and_std_and_keep_finished_runs(distilled, fmnist_root, tmp_path, monkeypatch):
    import importlib
    import statistics

    # fadrm.evaluate, the attribute, is the API function; the module is reached by name.
    evaluate_module = importlib.import_module("fadrm.evaluate")

    common = dict(out=str(tmp_path / "e"), data_root=str(fmnist_root), baselines=["random-real"], labels="stored",
                  **QUICK)  # fmt: skip
    single = fadrm.evaluate(distilled, log=lambda s: None, **common)
    subset_seeds: list[int] = []
    real_subset = evaluate_module.random_real_subset
    monkeypatch.setattr(evaluate_module, "random_real_subset",
                        lambda *args: subset_seeds.append(args[-1]) or real_subset(*args))  # fmt: skip
    lines: list[str] = []
    results = fadrm.evaluate(distilled, repeats=2, log=lines.append, **common)
    # Repeat 0 is the single comparison, reused; repeat 1 has its own seed, views, labels and real subset.
    assert sum("reusing" in line for line in lines) == 3 and results["runs"][:3] == single["runs"]
    assert [r["seed"] for r in results["runs"]] == [0, 0, 0, 1, 1, 1] and subset_seeds == [0, 1]
    first, second = (tmp_path / "e" / name / "epoch00000.safetensors" for name in ("labels", "labels-repeat1"))
    assert first.read_bytes() != second.read_bytes()
    assert results["runs"][0]["history"][0]["train_loss"] != results["runs"][3]["history"][0]["train_loss"]
    assert [(r["train_set"], r["labels"], r["repeats"]) for r in results["summary"]] == [
        ("distilled", "soft", 2), ("random-real", "soft", 2), ("random-real", "hard", 2)]  # fmt: skip
    for row in results["summary"]:
        top1 = [r["top1"] for r in results["runs"] if (r["train_set"], r["labels"]) == (row["train_set"], row["labels"])]
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
    with pytest.raises(FadrmError, match="unknown model 'resnet9000'"):
        fadrm.evaluate(distilled, students=["resnet9000"], data_root=str(fmnist_root), **QUICK)


def test_stored_labels_for_another_ipc(distilled, fmnist_root, tmp_path):
    fadrm.evaluate(distilled, out=str(tmp_path / "e"), labels="stored", data_root=str(fmnist_root),
                   log=lambda s: None, **QUICK)  # fmt: skip
    manifest = json.loads((distilled / "manifest.json").read_text())
    smaller = tmp_path / "ipc1"
    shutil.copytree(distilled, smaller)
    manifest["ipc"], manifest["images"] = 1, [r for r in manifest["images"] if r["ipc_index"] == 0]
    (smaller / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FadrmError, match="made for another setup .*images, ipc"):
        fadrm.evaluate(smaller, labels="stored", labels_dir=str(tmp_path / "e" / "labels"),
                       data_root=str(fmnist_root), **QUICK)  # fmt: skip


def test_run_resumes_without_redoing_finished_stages(fmnist_root, tmp_path, monkeypatch):
    import fadrm.api as api

    options = dict(data_root=str(fmnist_root), device="cpu", amp="off",
                   distill_options={"budgets": [1, 1, 1, 1], "mipc": 16, "num_crop": 2},
                   eval_options={"epochs": 2, "batch_size": 8, "eval_at": [], "workers": 0})  # fmt: skip
    real_evaluate = api.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fadrm.run("fashion-mnist", 1, tmp_path / "run", log=lambda s: None, **options)
    teacher_stamp = (tmp_path / "run" / "teacher.pt").stat().st_mtime_ns
    assert (tmp_path / "run" / "fadrm-ipc1" / "manifest.json").exists()
    monkeypatch.setattr(api, "evaluate", real_evaluate)
    lines: list[str] = []
    summary = fadrm.run("fashion-mnist", 1, tmp_path / "run", log=lines.append, **options)
    text = "\n".join(lines)
    assert "already trained" in text and "resuming" in text and "0 groups" not in text
    assert (tmp_path / "run" / "teacher.pt").stat().st_mtime_ns == teacher_stamp
    assert [r["train_set"] for r in summary["runs"]] == ["distilled", "random-real", "random-real"]
    assert "== fadrm run summary ==" in text and "wall time: teacher" in text
    assert "last-epoch top-1" in text and "best top-1 over the validations" in text


def test_finished_runs_are_not_reused_for_other_images(distilled, fmnist_root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(distilled, copy)
    fadrm.evaluate(copy, data_root=str(fmnist_root), log=lambda s: None, **QUICK)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["images"][0]["ce"] += 1.0  # as after re-distilling into the same folder
    (copy / "manifest.json").write_text(json.dumps(manifest))
    lines: list[str] = []
    fadrm.evaluate(copy, data_root=str(fmnist_root), log=lines.append, **QUICK)
    assert not any("reusing" in line for line in lines)


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
def _tiny_training_set(n: int) -> "TrainingSet":
    from fadrm.evaluate import TrainingSet

    gen = torch.Generator().manual_seed(0)
    return TrainingSet("distilled", torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8),
                       torch.arange(n) % 10)  # fmt: skip


def _train_recorded(monkeypatch, config, n_images, model=None, labeller=None):
    """Train a tiny student; record each forward's batch size, each step's gradient and inputs."""
    small = dataclasses.replace(SPEC, image_size=8)
    model = model or nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    steps: list[dict] = []
    real_optimizer = EV._optimizer

    def recording_optimizer(cfg, mdl, lr):
        optimizer = real_optimizer(cfg, mdl, lr)

        def before_step(opt, *args):
            steps.append({"inputs": list(seen), "grads": [p.grad.clone() for p in mdl.parameters()]})
            seen.clear()

        optimizer.register_step_pre_hook(before_step)
        return optimizer

    monkeypatch.setattr(EV, "_optimizer", recording_optimizer)
    monkeypatch.setattr(EV, "evaluate_accuracy", lambda *a, **k: {"top1": 0.0, "top5": 0.0, "loss": 0.0})
    EV.train_student(model, _tiny_training_set(n_images), config, small, CPU, None, labeller, log=lambda s: None)
    return steps


def test_accumulation_splits_each_loader_batch_and_steps_once_per_batch(monkeypatch):
    from fadrm.evaluate import EvalConfig, micro_batches

    config = EvalConfig(distilled="x", epochs=2, batch_size=16, accumulation=2, lr=0.1, eta=1.0, weight_decay=0.0,
                        mix="none", eval_every=0, optimizer="sgd")  # fmt: skip
    steps = _train_recorded(monkeypatch, config, 20, labeller=None)
    # 20 images in loader batches of 16 and 4: two optimiser steps per epoch; the student (and so
    # its BatchNorm) sees micro-batches of 8, 8, then the short batch's 4 in one.
    assert len(steps) == 4
    assert [[len(x) for x in step["inputs"]] for step in steps] == [[8, 8], [4], [8, 8], [4]]
    assert micro_batches(16, 2, 16) == [slice(0, 8), slice(8, 16)] and micro_batches(10, 2, 3) == [slice(0, 5)]


def test_accumulated_gradient_is_the_loader_batch_mean_and_a_short_batch_is_halved(monkeypatch):
    # Hard labels, no mixing: each micro-batch's mean loss divided by 2. Two equal halves sum to the
    # mean over the loader batch; the short last batch (one micro-batch) gets half its mean gradient,
    # as the reference's loss / gradient_accumulation_steps does.
    from fadrm.evaluate import EvalConfig

    config = EvalConfig(distilled="x", epochs=1, batch_size=16, accumulation=2, lr=0.1, eta=1.0, weight_decay=0.0,
                        mix="none", eval_every=0, optimizer="sgd")  # fmt: skip
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    reference = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    reference.load_state_dict(model.state_dict())
    labels_by_image = _tiny_training_set(20).labels
    order = ViewSampler(0, 8).batches(0, 20, 16)
    steps = _train_recorded(monkeypatch, config, 20, model=model)
    for step, indices, share in zip(steps, order, (1.0, 0.5)):
        inputs = torch.cat(step["inputs"])
        reference.zero_grad()
        F_loss = nn.functional.cross_entropy(reference(inputs), labels_by_image[indices])
        (F_loss * share).backward()
        for got, expected in zip(step["grads"], [p.grad for p in reference.parameters()]):
            assert torch.allclose(got, expected, atol=1e-6)
        with torch.no_grad():  # follow the student's SGD step (momentum buffer = first gradient)
            for p in reference.parameters():
                p -= 0.1 * p.grad
    assert EV.STUDENT_PROTOCOL == 2


def test_cutmix_and_bssl_halves_are_drawn_per_loader_batch(monkeypatch):
    # The labeller sees the whole loader batch (so BSSL halves are 8 + 8 of the 16), once per step.
    from fadrm.evaluate import EvalConfig

    calls: list[int] = []

    def labeller(pixels, runtime):
        calls.append(len(pixels))
        return torch.zeros(len(pixels), 10)

    views: list[int] = []
    real_view = ViewSampler.view
    monkeypatch.setattr(ViewSampler, "view", lambda self, *a: views.append(len(a[2])) or real_view(self, *a))
    config = EvalConfig(distilled="x", epochs=1, batch_size=16, accumulation=2, lr=0.1, eta=1.0, eval_every=0)
    steps = _train_recorded(monkeypatch, config, 32, labeller=labeller)
    # One view draw (crops, flips, one CutMix box) and one labelling per loader batch of 16,
    # shared by its two micro-batches.
    assert calls == [16, 16] and views == [16, 16] and len(steps) == 2
    assert [[len(x) for x in step["inputs"]] for step in steps] == [[8, 8], [8, 8]]


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


def test_weight_decay_only_on_multi_dimensional_weights():
    from fadrm.evaluate import EvalConfig, _optimizer, weight_decay_groups

    model = fadrm.models.build_model("cifar_resnet18", 10, 3, 32)
    decay, no_decay = weight_decay_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim > 1 for p in decay["params"]) and decay["weight_decay"] == 0.01
    assert no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.ndim == 1}
    assert "bn1.weight" in {names[id(p)] for p in no_decay["params"]} and "fc.bias" in {names[id(p)] for p in no_decay["params"]}
    # A multi-dimensional parameter that is not a weight (Swin's position bias table) gets none either.
    swin = fadrm.models.build_model("swin_t", 10, 3, 32)
    swin_decay, swin_no_decay = weight_decay_groups(swin, 0.01)
    table = swin.features[1][0].attn.relative_position_bias_table
    assert table.ndim == 2 and any(p is table for p in swin_no_decay["params"])
    assert not any(p is table for p in swin_decay["params"])
    for optimizer in ("adamw", "sgd"):
        opt = _optimizer(EvalConfig(distilled="x", optimizer=optimizer, weight_decay=0.05), model, 1e-3)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_best_and_final_accuracy_are_both_reported(monkeypatch):
    from fadrm.evaluate import EvalConfig

    assert EvalConfig(distilled="x", epochs=300).evaluation_epochs() == [*range(1, 300, 10), 300]  # 1, 11, ..., 291, 300
    assert EvalConfig(distilled="x", epochs=5, eval_every=0, eval_at=[2]).evaluation_epochs() == [2, 5]
    accuracies = iter([50.0, 70.0, 60.0])
    monkeypatch.setattr(EV, "evaluate_accuracy", lambda *a, **k: {"top1": next(accuracies), "top5": 90.0, "loss": 1.0})
    config = EvalConfig(distilled="x", epochs=5, batch_size=4, lr=0.1, eta=1.0, eval_every=2, mix="none")
    result = EV.train_student(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), _tiny_training_set(8), config,
                              dataclasses.replace(SPEC, image_size=8), CPU, None, None, log=lambda s: None)  # fmt: skip
    assert result["evaluated_epochs"] == [1, 3, 5]
    assert (result["top1"], result["best_top1"], result["best_epoch"]) == (60.0, 70.0, 3)
    summary = EV.summarise_runs([{**result, "student": "s", "train_set": "d", "labels": "soft"}] * 2)
    assert summary[0]["best_top1"] == 70.0 and summary[0]["top1"] == 60.0


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
    fadrm.evaluate(distilled, out=str(tmp_path / "f"), data_root=str(fmnist_root), eval_every=0,
                   log=lambda s: None, **{**QUICK, "epochs": 3})  # fmt: skip
    lines.clear()
    fadrm.evaluate(distilled, out=str(tmp_path / "f"), data_root=str(fmnist_root), eval_every=1,
                   log=lines.append, **{**QUICK, "epochs": 3})  # fmt: skip
    assert not any("reusing" in line for line in lines)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": float("nan")}, "--temperature, --eta and --student-lr"),
        ({"lr": float("inf")}, "--temperature, --eta and --student-lr"),
        ({"eta": 0.0}, "--temperature, --eta and --student-lr"),
        ({"weight_decay": -1.0}, "--weight-decay"),
        ({"weight_decay": float("nan")}, "--weight-decay"),
        ({"mix_alpha": 0.0}, "--mix-alpha"),
        ({"accumulation": 3}, "must divide --batch-size"),
        ({"eval_every": -1}, "--eval-every"),
        ({"eval_at": [5]}, "--eval-at 5 is outside"),
    ],
)
def test_bad_protocol_values_are_one_clear_line(distilled, fmnist_root, options, message):
    with pytest.raises(FadrmError, match=message):
        fadrm.evaluate(distilled, data_root=str(fmnist_root), **{**QUICK, **options})
