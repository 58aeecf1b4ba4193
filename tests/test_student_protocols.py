"""The students and relabelling of G-VBSM, EDC and CV-DD: teacher balancing, committee weights,
EMA of the student's weights, RandAugment views, and each method's published protocol."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import shutil

import pytest
import torch
import yaml
from torch import nn

import fadrm
from fadrm import cli

from fadrm.evaluation.store import LabelStore
from fadrm.augment import ViewSampler, render
from fadrm.rand_augment import AUGMENT_OPS
from fadrm.config import EvalConfig, preset_names, resolve
from fadrm.data import get_dataset_spec, normalize
from fadrm.errors import FadrmError
from fadrm.labels import TeacherLabeller, balanced_norms, label_epoch, prior_weights, soft_targets
from fadrm.teachers import load_teacher
from fadrm.runtime import make_runtime
from fadrm.students import EmaWeights
from fadrm.synthesis.methods import METHODS

from conftest import tiny_training_set

CPU = make_runtime("cpu", "off")
ST = importlib.import_module("fadrm.students")
SMALL = dataclasses.replace(get_dataset_spec("fashion-mnist"), image_size=8)


class Constant(nn.Module):
    """A 'teacher' whose logits are fixed rows, whatever the input."""

    def __init__(self, rows: list[list[float]]) -> None:
        super().__init__()
        self.rows = torch.tensor(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows[: len(x)]


# ---------------------------------------------------------------- relabelling
def test_frobenius_balancing_rescales_each_teacher_to_the_mean_norm():
    # ||A||_F = sqrt(9 + 16) = 5, ||B||_F = sqrt(100 + 0 + 0 + 0) = 10: mean 7.5; A x 1.5, B x 0.75.
    a, b = torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.tensor([[0.0, 10.0], [0.0, 0.0]])
    balanced = balanced_norms([a, b])
    assert torch.allclose(balanced[0], torch.tensor([[4.5, 0.0], [0.0, 6.0]]))
    assert torch.allclose(balanced[1], torch.tensor([[0.0, 7.5], [0.0, 0.0]]))
    labeller = TeacherLabeller([Constant(a.tolist()), Constant(b.tolist())], balance=True)
    # The mean of the balanced logits: [[2.25, 3.75], [0, 3]]; unbalanced it would be [[1.5, 5], [0, 2]].
    assert torch.allclose(labeller(torch.zeros(2, 1), CPU), torch.tensor([[2.25, 3.75], [0.0, 3.0]]))
    assert torch.allclose(
        TeacherLabeller([Constant(a.tolist()), Constant(b.tolist())])(torch.zeros(2, 1), CPU),
        torch.tensor([[1.5, 5.0], [0.0, 2.0]]),
    )


def test_committee_weights_are_the_softmax_of_prior_over_ten():
    # CV-DD's CIFAR-100 priors; by hand: exp(p / 10) normalised (math.exp, plain floats).
    priors = [64.0, 60.6, 51.6, 59.4, 56.4]
    exps = [math.exp(p / 10) for p in priors]
    expected = [e / sum(exps) for e in exps]  # 0.3226, 0.2296, 0.0933, 0.2036, 0.1509
    weights = prior_weights(priors, 10.0, 5)
    assert weights == pytest.approx(expected, rel=1e-12)
    assert weights[0] == pytest.approx(0.32257, abs=1e-5) and sum(weights) == pytest.approx(1.0)
    # The labeller then sums the weighted logits (the weights already sum to one).
    teachers = [Constant([[float(k), 1.0]]) for k in range(5)]
    labels = TeacherLabeller(teachers, weights)(torch.zeros(1, 1), CPU)
    assert labels[0, 0] == pytest.approx(sum(k * w for k, w in enumerate(expected)), rel=1e-6)
    assert labels[0, 1] == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(FadrmError, match="^2 teacher priors for 5 teachers"):
        prior_weights(priors[:2], 10.0, 5)


# ------------------------------------------------------------- weight EMA
def _model_with_batchnorm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))


def test_ema_averages_parameters_and_lends_them_without_the_buffers():
    model = _model_with_batchnorm()
    ema = EmaWeights(model, 0.9)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.tensor([[1.0, 2.0], [3.0, 5.0]]))  # moves the running statistics
    ema.update(model)
    # 0.9 * start + 0.1 * (start + 1) = start + 0.1, exactly what the average holds.
    assert all(torch.allclose(a, s + 0.1) for a, s in zip(ema.averages, start))
    live = [p.detach().clone() for p in model.parameters()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with ema.swapped_in(model) as swapped:
        assert swapped is model
        assert all(torch.equal(p, a) for p, a in zip(model.parameters(), ema.averages))
        # BatchNorm's running statistics are the live model's (EDC swaps parameters only).
        assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), live))
    with pytest.raises(RuntimeError), ema.swapped_in(model):
        raise RuntimeError("validation failed")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), live))  # restored after an error too


def test_ema_state_resumes_to_identical_averages():
    model = _model_with_batchnorm()
    whole, first = EmaWeights(model, 0.99), EmaWeights(model, 0.99)
    steps = [torch.randn(2, 2, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    for k, step in enumerate(steps):
        with torch.no_grad():
            model[0].weight.add_(step)
        whole.update(model)
        if k < 2:
            first.update(model)
        if k == 1:
            resumed = EmaWeights(_model_with_batchnorm(), 0.5)
            resumed.load_state_dict(first.state_dict())
        elif k > 1:
            resumed.update(model)
    assert resumed.decay == 0.99
    assert all(torch.equal(a, b) for a, b in zip(whole.averages, resumed.averages))


def test_train_student_validates_the_ema_weights(monkeypatch):
    seen = []

    def recording(model, *args, **kwargs):
        seen.append([p.detach().clone() for p in model.parameters()])
        return {"top1": 0.0, "top5": 0.0, "loss": 0.0}

    monkeypatch.setattr(ST, "evaluate_accuracy", recording)
    averaged: list[EmaWeights] = []
    real = ST.EmaWeights

    def keeping(model, decay):
        averaged.append(real(model, decay))
        return averaged[-1]

    monkeypatch.setattr(ST, "EmaWeights", keeping)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    config = EvalConfig(distilled="x", epochs=2, batch_size=4, accumulation=1, lr=0.1, eta=1.0, ema_decay=0.5)
    ST.train_student(model, tiny_training_set(8), config, SMALL, CPU, None, None, log=lambda s: None)
    # Validated after epochs 1 and 2 with the averages, never the live weights, which stay in the model.
    assert len(seen) == 2 and all(torch.equal(p, a) for p, a in zip(seen[-1], averaged[0].averages))
    assert not all(torch.equal(p, a) for p, a in zip(model.parameters(), averaged[0].averages))


def test_the_new_options_at_their_defaults_keep_the_identity_of_older_runs():
    default = EvalConfig(distilled="x").identity()
    new = (
        "momentum",
        "ce_weight",
        "ema_decay",
        "teacher_priors",
        "prior_temperature",
        "balance_teachers",
        "rand_augment",
        "protocol",
    )
    assert not set(new) & set(default)
    # Each enters only where it changes the training: momentum with SGD, the CE weight with mse-ce.
    assert "momentum" not in EvalConfig(distilled="x", momentum=0.5).identity()
    assert EvalConfig(distilled="x", optimizer="sgd", momentum=0.875).identity()["momentum"] == 0.875
    assert "ce_weight" not in EvalConfig(distilled="x", ce_weight=0.5).identity()
    assert EvalConfig(distilled="x", loss="mse-ce", ce_weight=0.025).identity()["ce_weight"] == 0.025
    assert EvalConfig(distilled="x", ema_decay=0.99).identity()["ema_decay"] == 0.99
    assert "prior_temperature" not in EvalConfig(distilled="x", prior_temperature=5.0).identity()


# ------------------------------------------------------------- RandAugment
def test_rand_augment_views_are_a_pure_function_of_seed_epoch_and_batch():
    images = torch.randint(0, 256, (6, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    sampler = ViewSampler(3, 16, rand_augment=True)
    indices = sampler.batches(2, 6, 6)[0]
    first = sampler.view(2, 0, indices, 16, 16)
    torch.manual_seed(123)  # torch's global RNG must play no part
    again = sampler.view(2, 0, indices, 16, 16)
    assert first.augment_ops == again.augment_ops and len(first.augment_ops) == 6
    assert all(len(ops) == 2 and all(name in AUGMENT_OPS for name, _ in ops) for ops in first.augment_ops)
    assert torch.equal(render(images, first, 16), render(images, again, 16))
    # Another batch or epoch draws other operations; crops, flips and mixing are those of a view without it.
    assert sampler.view(2, 1, indices, 16, 16).augment_ops != first.augment_ops
    plain = ViewSampler(3, 16).view(2, 0, indices, 16, 16)
    assert (plain.boxes, plain.flips, plain.lam, plain.cut_box) == (first.boxes, first.flips, first.lam, first.cut_box)
    assert not torch.equal(render(images, plain, 16), render(images, first, 16))


def test_rand_augment_magnitudes_are_torchvisions_bin_9():
    # torchvision's bins at 9 of 31: shear 0.09, translate 150/331 * 0.3 * side, rotate 9 degrees, enhance 0.27,
    # posterize 7 bits, solarize at 178.5.
    expected = {
        "shear-x": 0.09,
        "translate-x": 150 / 331 * 0.3 * 32,
        "rotate": 9.0,
        "brightness": 0.27,
        "posterize": 7,
        "solarize": 178.5,
        "equalize": 0.0,
    }
    for name, magnitude in expected.items():
        assert AUGMENT_OPS.get(name).magnitude(32) == pytest.approx(magnitude, abs=1e-9)


def test_stored_labels_equal_live_ones_with_rand_augment(teacher_ckpt, tmp_path):
    teacher = load_teacher(teacher_ckpt)
    labeller = TeacherLabeller([teacher.model])
    spec = get_dataset_spec("fashion-mnist")
    images = torch.randint(0, 256, (8, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    sampler = ViewSampler(0, 28, rand_augment=True)
    store = LabelStore(tmp_path / "labels", {"test": 1}, 10, None, 20.0)
    store.open()
    store.write(0, label_epoch(images, sampler, 0, 4, labeller, spec.mean, spec.std, CPU))
    probabilities, logits = store.read_with_logits(0)
    for b, indices in enumerate(sampler.batches(0, 8, 4)):
        view = sampler.view(0, b, indices, 28, 28)
        live = labeller(normalize(render(images, view, 28), spec.mean, spec.std), CPU)
        assert torch.equal(logits[4 * b : 4 * b + 4], live.half().float())  # stored logits are fp16
        assert torch.equal(probabilities[4 * b : 4 * b + 4], soft_targets(live.half(), 20.0))


# ------------------------------------------------------------- protocols
OLD_METHODS = ("fadrm", "fadrm+", "sre2l", "sre2l++", "rded")
# What each existing method resolved to before --protocol, as settings away from the package defaults.
BEFORE = {
    "cifar100": {"epochs": 1000},
    "fashion-mnist": {"bssl": False, "eval_every": 100},
    "imagenette": {"batch_size": 10},
    "imagewoof": {"batch_size": 10},
}


def _resolved(dataset: str, method: str | None, ipc: int, **given) -> EvalConfig:
    return resolve(EvalConfig, {"distilled": "x", **given}, dataset=dataset, method=method, ipc=ipc)


@pytest.mark.parametrize("dataset", preset_names())
def test_existing_methods_resolve_as_before_and_common_is_fadrms_for_every_method(dataset):
    package = EvalConfig(distilled="x").to_dict()
    for ipc in (1, 10, 50):
        fadrm = _resolved(dataset, "fadrm", ipc).to_dict()
        for method in METHODS.names():
            own = _resolved(dataset, method, ipc).to_dict()
            if method in OLD_METHODS:
                changed = {k: v for k, v in own.items() if package[k] != v}
                before = {
                    **BEFORE.get(dataset, {}),
                    **({"bssl": False} if (dataset, method, ipc) == ("tiny-imagenet", "fadrm", 50) else {}),
                }
                assert changed == before, (dataset, method, ipc)
            common = _resolved(dataset, method, ipc, protocol="common").to_dict()
            assert {**common, "protocol": "own"} == fadrm, (dataset, method, ipc)


@pytest.mark.parametrize(
    ("dataset", "method", "ipc", "published"),
    [
        (
            "cifar10",
            "g-vbsm",
            10,
            {
                "loss": "mse-ce",
                "ce_weight": 0.15,
                "optimizer": "adamw",
                "lr": 1e-3,
                "weight_decay": 0.0,
                "batch_size": 100,
                "epochs": 1000,
                "eta": 1.0,
                "bssl": False,
                "labels": "stored",
                "accumulation": 1,
            },
        ),
        (
            "cifar100",
            "g-vbsm",
            10,
            {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64, "ce_weight": 0.15},
        ),
        ("tiny-imagenet", "g-vbsm", 50, {"epochs": 100, "batch_size": 100, "accumulation": 2, "ce_weight": 0.1}),
        ("imagenet-1k", "g-vbsm", 10, {"batch_size": 1024, "weight_decay": 0.01, "balance_teachers": True}),
        (
            "cifar10",
            "edc",
            1,
            {
                "batch_size": 10,
                "schedule": "multistep",
                "crop_scale": [0.08, 1.0],
                "rand_augment": True,
                "ema_decay": 0.99,
                "ce_weight": 0.025,
                "labels": "live",
            },
        ),
        (
            "cifar100",
            "edc",
            10,
            {
                "optimizer": "sgd",
                "lr": 0.1,
                "momentum": 0.875,
                "weight_decay": 5e-4,
                "batch_size": 50,
                "schedule": "ssrs",
                "eta": 2.0,
                "crop_scale": [0.5, 1.0],
                "rand_augment": True,
                "epochs": 1000,
            },
        ),
        (
            "tiny-imagenet",
            "edc",
            10,
            {
                "optimizer": "sgd",
                "momentum": 0.875,
                "batch_size": 100,
                "epochs": 300,
                "schedule": "stretched-cosine",
                "rand_augment": True,
            },
        ),
        (
            "imagenet-1k",
            "edc",
            10,
            {
                "labels": "stored",
                "rand_augment": False,
                "batch_size": 100,
                "teachers": [
                    "resnet18:IMAGENET1K_V1",
                    "mobilenet_v2:IMAGENET1K_V1",
                    "shufflenet_v2_x0_5:IMAGENET1K_V1",
                    "alexnet:IMAGENET1K_V1",
                ],
            },
        ),
        # The relabelling priors are the set's own (read at evaluation), not preset data.
        (
            "cifar100",
            "cv-dd",
            10,
            {
                "teacher_priors": None,
                "prior_temperature": 10.0,
                "epochs": 300,
                "eta": 2,
                "lr": 1e-3,
                "loss": "kl",
                "bssl": True,
            },
        ),
        ("cifar100", "cv-dd", 50, {"eta": 1}),
        ("tiny-imagenet", "cv-dd", 10, {"eta": 1}),
        ("imagenet-1k", "cv-dd", 50, {"eta": 1}),
    ],
)
def test_print_config_shows_each_methods_published_protocol(dataset, method, ipc, published, monkeypatch, capsys):
    # `fadrm run --print-config` resolves the evaluation as `fadrm evaluate` does for the set it will write.
    assert (
        cli.main(["run", "--dataset", dataset, "--method", method, "--ipc", str(ipc), "--out", "o", "--print-config"])
        == 0
    )
    evaluation = yaml.safe_load(capsys.readouterr().out)["evaluate"]
    assert evaluation["protocol"] == "own"
    assert {k: evaluation[k] for k in published} == published
    assert (
        cli.main(
            [
                "run",
                "--dataset",
                dataset,
                "--method",
                method,
                "--ipc",
                str(ipc),
                "--out",
                "o",
                "--protocol",
                "common",
                "--print-config",
            ]
        )
        == 0
    )
    common = yaml.safe_load(capsys.readouterr().out)["evaluate"]
    assert common["loss"] == "kl" and common["ema_decay"] == 0.0 and not common["teacher_priors"]


def _as_method(distilled, tmp_path, method: str, priors: list[float] | None = None):
    """The fixture's images as if ``method`` had made them (its manifest says so, with the committee
    ``priors`` it was distilled with), so its protocol applies."""
    folder = tmp_path / method
    shutil.copytree(distilled, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["config"]["synthesis"]["priors"] = priors
    (folder / "manifest.json").write_text(json.dumps({**manifest, "method": method}))
    return folder


def test_a_committee_set_is_relabelled_with_the_priors_it_was_made_with(distilled, fmnist_root, tmp_path):
    folder = _as_method(distilled, tmp_path, "cv-dd", priors=[70.0])
    results = fadrm.evaluate(
        folder,
        data_root=str(fmnist_root),
        epochs=1,
        batch_size=8,
        device="cpu",
        amp="off",
        workers=0,
        eval_every=0,
        log=lambda s: None,
    )
    assert results["config"]["teacher_priors"] == [70.0]
    # Given weights, other teachers or the common protocol: the set's priors do not apply.
    common = fadrm.evaluate(
        folder,
        out=str(tmp_path / "common"),
        data_root=str(fmnist_root),
        epochs=1,
        batch_size=8,
        device="cpu",
        amp="off",
        workers=0,
        eval_every=0,
        protocol="common",
        log=lambda s: None,
    )
    assert common["config"]["teacher_priors"] is None


QUICK_FLAGS = ["--epochs", "2", "--batch-size", "8", "--device", "cpu", "--amp", "off", "--workers", "0"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "extra", "expected"),
    [
        ("g-vbsm", [], {"loss": "mse-ce", "labels": "stored", "ce_weight": 0.15, "weight_decay": 0.0}),
        ("edc", [], {"loss": "mse-ce", "ema_decay": 0.99, "rand_augment": True, "schedule": "multistep"}),
        ("cv-dd", ["--teacher-prior", "60", "--teacher-prior", "50"], {"teacher_priors": [60.0, 50.0], "loss": "kl"}),
        ("edc", ["--protocol", "common"], {"loss": "kl", "ema_decay": 0.0, "rand_augment": False}),
    ],
)
def test_evaluate_trains_each_methods_protocol_end_to_end(
    distilled, fmnist_root, teacher_ckpt, second_teacher_ckpt, tmp_path, method, extra, expected
):
    folder = _as_method(distilled, tmp_path, method)
    teachers = ["--teacher", str(teacher_ckpt)] + (["--teacher", str(second_teacher_ckpt)] if method == "cv-dd" else [])
    assert cli.main(["evaluate", str(folder), "--data-root", str(fmnist_root), *teachers, *QUICK_FLAGS, *extra]) == 0
    results = json.loads((folder / "eval" / "results.json").read_text())
    protocol = "common" if "common" in extra else "own"
    assert results["protocol"] == protocol and {k: results["config"][k] for k in expected} == expected
    run = results["runs"][0]
    assert 0 <= run["top1"] <= 100 and math.isfinite(run["history"][-1]["train_loss"])
    assert (
        f"# {method} on fashion-mnist, IPC 2, {protocol} student protocol"
        in (folder / "eval" / "results.md").read_text()
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--loss", "mse-ce", "--labels", "stored", "--topk", "3"],
            "--loss mse-ce needs the teachers' logits; --topk 3 stores probabilities only: leave --topk out",
        ),
        (
            ["--teacher-prior", "60", "--teacher-prior", "50"],
            "2 teacher priors for 1 teachers: give one --teacher-prior per teacher",
        ),
        (
            ["--teacher-prior", "60", "--teacher-weight", "1"],
            "give --teacher-weight or --teacher-prior, not both (priors make the weights)",
        ),
        (["--protocol", "theirs"], None),
    ],
)
def test_bad_relabel_and_loss_input_is_one_line_exit_2(distilled, fmnist_root, tmp_path, capsys, flags, message):
    status = None
    try:
        status = cli.main(
            [
                "evaluate",
                str(distilled),
                "--out",
                str(tmp_path / "e"),
                "--data-root",
                str(fmnist_root),
                *QUICK_FLAGS,
                *flags,
            ]
        )
    except SystemExit as exit_:  # argparse refuses an unknown choice itself
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert (message or "--protocol") in err
    assert not (tmp_path / "e").exists()
