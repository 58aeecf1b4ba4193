"""Student training: micro-batches, accumulated gradients, one view draw per loader batch, weight-decay
groups, best and final accuracy, and the optimiser, schedule and loss registries."""

from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch
from torch import nn

import fadrm
from fadrm.evaluation import STUDENT_PROTOCOL, summarise_runs
from fadrm.augment import ViewSampler
from fadrm.data import get_dataset_spec
from fadrm.distributed import Ranks
from fadrm.errors import FadrmError
from fadrm.config import EvalConfig
from fadrm.registry import Registry
from fadrm.runtime import make_runtime
from fadrm.students import (
    OPTIMIZERS,
    SCHEDULES,
    STUDENT_LOSSES,
    SoftLabels,
    micro_batches,
    mixed_cross_entropy,
    smallest_micro_batch,
    stretched_cosine,
    train_student,
    weight_decay_groups,
)
from fadrm.data.datasets import TrainingSet
from fadrm.labels import TeacherLabeller

from conftest import tiny_training_set

CPU = make_runtime("cpu", "off")
ST = importlib.import_module("fadrm.students")
SPEC = get_dataset_spec("fashion-mnist")


def _train_recorded(monkeypatch, config, n_images, model=None, labeller=None):
    """Train a tiny student; record each forward's batch size, each step's gradient and inputs."""
    small = dataclasses.replace(SPEC, image_size=8)
    model = model or nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    steps: list[dict] = []
    real_factory = OPTIMIZERS.get(config.optimizer)

    def recording_factory(groups, lr, momentum, fused=False):
        optimizer = real_factory(groups, lr, momentum, fused)

        def before_step(opt, *args):
            steps.append({"inputs": list(seen), "grads": [p.grad.clone() for p in model.parameters()]})
            seen.clear()

        optimizer.register_step_pre_hook(before_step)
        return optimizer

    recording = Registry("optimizer")
    recording.add(config.optimizer, recording_factory)
    monkeypatch.setattr(ST, "OPTIMIZERS", recording)
    monkeypatch.setattr(ST, "evaluate_accuracy", lambda *a, **k: {"top1": 0.0, "top5": 0.0, "loss": 0.0})
    ST.train_student(model, tiny_training_set(n_images), config, small, CPU, None, labeller, log=lambda s: None)
    return steps


# -------------------------------------------------------------------- loop
def test_accumulation_splits_each_loader_batch_and_steps_once_per_batch(monkeypatch):
    config = EvalConfig(
        distilled="x",
        epochs=2,
        batch_size=16,
        accumulation=2,
        lr=0.1,
        eta=1.0,
        weight_decay=0.0,
        mix="none",
        eval_every=0,
        optimizer="sgd",
    )
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
    config = EvalConfig(
        distilled="x",
        epochs=1,
        batch_size=16,
        accumulation=2,
        lr=0.1,
        eta=1.0,
        weight_decay=0.0,
        mix="none",
        eval_every=0,
        optimizer="sgd",
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    reference = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    reference.load_state_dict(model.state_dict())
    labels_by_image = tiny_training_set(20).labels
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
    assert STUDENT_PROTOCOL >= 2  # accumulation as protocol 2 introduced it


def test_cutmix_and_bssl_halves_are_drawn_per_loader_batch(monkeypatch):
    # The labeller sees the whole loader batch (so BSSL halves are 8 + 8 of the 16), once per step.
    calls: list[int] = []

    def labeller(pixels, runtime, ranks):
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


def test_weight_decay_only_on_multi_dimensional_weights():
    model = fadrm.models.build_model("cifar_resnet18", 10, 3, 32)
    decay, no_decay = weight_decay_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim > 1 for p in decay["params"]) and decay["weight_decay"] == 0.01
    assert no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.ndim == 1}
    assert "bn1.weight" in {names[id(p)] for p in no_decay["params"]} and "fc.bias" in {
        names[id(p)] for p in no_decay["params"]
    }
    # A multi-dimensional parameter that is not a weight (Swin's position bias table) gets none either.
    swin = fadrm.models.build_model("swin_t", 10, 3, 32)
    swin_decay, swin_no_decay = weight_decay_groups(swin, 0.01)
    table = swin.features[1][0].attn.relative_position_bias_table
    assert table.ndim == 2 and any(p is table for p in swin_no_decay["params"])
    assert not any(p is table for p in swin_decay["params"])
    for optimizer in ("adamw", "sgd"):
        opt = OPTIMIZERS.get(optimizer)(weight_decay_groups(model, 0.05), 1e-3, 0.9)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_best_and_final_accuracy_are_both_reported(monkeypatch):
    assert EvalConfig(distilled="x", epochs=300).evaluation_epochs() == [
        *range(1, 300, 10),
        300,
    ]  # 1, 11, ..., 291, 300
    assert EvalConfig(distilled="x", epochs=5, eval_every=0, eval_at=[2]).evaluation_epochs() == [2, 5]
    accuracies = iter([50.0, 70.0, 60.0])
    monkeypatch.setattr(ST, "evaluate_accuracy", lambda *a, **k: {"top1": next(accuracies), "top5": 90.0, "loss": 1.0})
    config = EvalConfig(distilled="x", epochs=5, batch_size=4, lr=0.1, eta=1.0, eval_every=2, mix="none")
    result = ST.train_student(
        nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
        tiny_training_set(8),
        config,
        dataclasses.replace(SPEC, image_size=8),
        CPU,
        None,
        None,
        log=lambda s: None,
    )
    assert result["evaluated_epochs"] == [1, 3, 5]
    assert (result["top1"], result["best_top1"], result["best_epoch"]) == (60.0, 70.0, 3)
    summary = summarise_runs([{**result, "student": "s", "train_set": "d", "labels": "soft"}] * 2)
    assert summary[0]["best_top1"] == 70.0 and summary[0]["top1"] == 60.0


# ------------------------------------------------------------ golden values
def test_kl_loss_equals_a_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]])
    targets = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    # Computed once in plain Python floats (math.exp, math.log), not torch: with T = 2,
    # q = softmax(logits / 2) = [0.18632372, 0.30719589, 0.50648039] and [0.34595419, 0.20983183, 0.44421398];
    # sum over both rows of sum(p * (log p - log q)), divided by the batch of 2, is 0.0695599146574475.
    # No T**2 factor: the published loss is KL at temperature T, batch-mean.
    labels = SoftLabels(targets, None, torch.tensor([2, 0]))
    loss = STUDENT_LOSSES.get("kl")(logits, labels, EvalConfig(distilled="x", temperature=2.0))
    assert float(loss) == pytest.approx(0.0695599146574475, rel=1e-6)


def test_mse_ce_loss_equals_a_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]])
    teacher = torch.tensor([[0.5, 2.0, 4.0], [1.0, -1.0, 0.0]])
    # MSE over all six entries: (0.25 + 0 + 1 + 1 + 0 + 0.25) / 6 = 0.4166666666666667.
    # CE with own classes [2, 0], by hand (math.log, math.exp): row 1: log(e + e^2 + e^3) - 3 = 0.40760596444438013;
    # row 2: log(1 + e^-1 + e^0.5) - 0 = 1.1041306053367284; mean 0.7558682848905542.
    # No temperature: T = 20 below must not matter. w = 0.025: 0.4166666666666667 + 0.025 * 0.7558682848905542.
    labels = SoftLabels(torch.softmax(teacher, 1), teacher, torch.tensor([2, 0]))
    config = EvalConfig(distilled="x", loss="mse-ce", ce_weight=0.025, temperature=20.0)
    loss = STUDENT_LOSSES.get("mse-ce")(logits, labels, config)
    assert float(loss) == pytest.approx(0.4166666666666667 + 0.025 * 0.7558682848905542, rel=1e-6)
    # The CutMix partner's class is not part of it: only the logits and own classes count.
    assert float(
        STUDENT_LOSSES.get("mse-ce")(logits, labels, dataclasses.replace(config, ce_weight=0.0))
    ) == pytest.approx(0.4166666666666667, rel=1e-6)


def test_mixed_cross_entropy_weights_the_two_classes():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    own, partner = torch.tensor([0, 2]), torch.tensor([1, 0])
    ce = nn.functional.cross_entropy
    assert torch.equal(mixed_cross_entropy(logits, own, partner, 1.0), ce(logits, own))
    assert float(mixed_cross_entropy(logits, own, partner, 0.25)) == pytest.approx(
        0.25 * float(ce(logits, own)) + 0.75 * float(ce(logits, partner))
    )


@pytest.mark.parametrize(
    ("epoch", "epochs", "eta", "factor"),
    [
        # 0.5 * (1 + cos(pi * e / (eta * E))) by hand: cos 0 = 1, cos(pi / 2) = 0, cos(pi / 4) = sqrt(2) / 2,
        # cos pi = -1.
        (0, 300, 2.0, 1.0),
        (150, 300, 1.0, 0.5),
        (300, 300, 2.0, 0.5),
        (75, 300, 1.0, 0.5 + math.sqrt(2) / 4),  # 0.8535533905932737
        (150, 300, 2.0, 0.5 + math.sqrt(2) / 4),
        (300, 300, 1.0, 0.0),
    ],
)
def test_stretched_cosine_golden_values(epoch, epochs, eta, factor):
    assert SCHEDULES.get("stretched-cosine") is stretched_cosine
    assert stretched_cosine(epoch, epochs, eta) == pytest.approx(factor, abs=1e-12)


@pytest.mark.parametrize(
    ("epoch", "epochs", "eta", "factor"),
    [
        # Up to 5E/6 the stretched cosine: at e = 500 of 600 with eta 2,
        # 0.5 * (1 + cos(5 pi / 12)) = 0.6294095225512604.
        (0, 600, 2.0, 1.0),
        (300, 600, 2.0, 0.5 + math.sqrt(2) / 4),
        (500, 600, 2.0, 0.6294095225512604),
        # After 5E/6 that value times (1 - e / E): a sixth of it at 501 is 0.6294095225512604 * 99 / 600.
        (501, 600, 2.0, 0.6294095225512604 * 99 / 600),
        (540, 600, 2.0, 0.06294095225512604),
        (600, 600, 2.0, 0.0),
        # eta 1: 0.5 * (1 + cos(5 pi / 6)) = 0.06698729810778065 before the line.
        (11, 12, 1.0, 0.06698729810778065 / 12),
    ],
)
def test_ssrs_golden_values(epoch, epochs, eta, factor):
    assert SCHEDULES.get("ssrs")(epoch, epochs, eta) == pytest.approx(factor, abs=1e-12)


@pytest.mark.parametrize(
    ("epoch", "factor"),
    [(0, 1.0), (799, 1.0), (800, 0.5), (899, 0.5), (900, 0.25), (949, 0.25), (950, 0.125), (999, 0.125)],
)
def test_multistep_halves_at_80_90_and_95_percent(epoch, factor):
    # EDC's CIFAR-10 MultiStepLR([800, 900, 950], 0.5) over 1000 epochs; eta has no effect.
    assert SCHEDULES.get("multistep")(epoch, 1000, 2.0) == factor
    assert SCHEDULES.get("multistep")(epoch // 10, 100, 1.0) == factor  # the same steps at 80, 90, 95 of 100


def test_sgd_momentum_reaches_the_optimiser():
    model = nn.Linear(3, 2)
    assert OPTIMIZERS.get("sgd")(weight_decay_groups(model, 0.0), 0.1, 0.875).defaults["momentum"] == 0.875
    assert EvalConfig(distilled="x").momentum == 0.9  # the former fixed value


# --------------------------------------------------------------- registries
@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_steps_a_tiny_model(name):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = OPTIMIZERS.get(name)(weight_decay_groups(model, 0.01), 0.1, 0.9)
    model(torch.randn(4, 3)).square().mean().backward()
    optimizer.step()
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_every_schedule_starts_at_the_full_rate(name):
    schedule = SCHEDULES.get(name)
    assert schedule(0, 10, 2.0) == 1.0
    assert all(0.0 <= schedule(e, 10, 2.0) <= 1.0 for e in range(11))


@pytest.mark.parametrize("name", STUDENT_LOSSES.names())
def test_every_loss_is_finite_and_has_a_gradient(name):
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    teacher = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    labels = SoftLabels(torch.softmax(teacher / 4.0, dim=1), teacher, torch.tensor([0, 1, 2, 3]))
    loss = STUDENT_LOSSES.get(name)(logits, labels, EvalConfig(distilled="x", temperature=4.0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("registry", "message"),
    [
        (OPTIMIZERS, "^unknown optimizer 'nope'; choose one of: adamw, sgd$"),
        (SCHEDULES, "^unknown schedule 'nope'; choose one of: multistep, ssrs, stretched-cosine$"),
        (STUDENT_LOSSES, "^unknown loss 'nope'; choose one of: kl, mse-ce$"),
    ],
)
def test_unknown_names_list_the_choices(registry, message):
    with pytest.raises(FadrmError, match=message):
        registry.get("nope")


@pytest.mark.parametrize(
    ("field", "registry"), [("optimizer", "optimizer"), ("schedule", "schedule"), ("loss", "loss")]
)
def test_train_student_looks_its_parts_up_by_name(field, registry):
    config = EvalConfig(distilled="x", epochs=1, batch_size=4, lr=0.1, eta=1.0, **{field: "nope"})
    with pytest.raises(FadrmError, match=f"unknown {registry} 'nope'"):
        ST.train_student(
            nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
            tiny_training_set(4),
            config,
            dataclasses.replace(SPEC, image_size=8),
            CPU,
            None,
            None,
            log=lambda s: None,
        )


# ------------------------------------------------------------ several processes
def test_each_rank_takes_a_contiguous_near_equal_share_and_weights_its_loss():
    # 5 images of a micro-batch at positions 8..12 over 3 ranks: 2, 2, 1, in rank order.
    shares = [Ranks(rank, 3).share(range(8, 13)) for rank in range(3)]
    assert shares == [slice(8, 10), slice(10, 12), slice(12, 13)]
    assert Ranks().share(range(0, 16)) == slice(0, 16)
    loss = torch.tensor(2.0)
    # Averaged over the 3 ranks, 3 * n_r / n of each share's mean loss is the micro-batch's mean loss.
    weights = [float(Ranks(rank, 3).weighted(loss, 2 if rank < 2 else 1, 5)) for rank in range(3)]
    assert weights == pytest.approx([2.0 * 3 * 2 / 5, 2.0 * 3 * 2 / 5, 2.0 * 3 / 5])
    assert Ranks().weighted(loss, 5, 5) is loss


def test_too_many_processes_for_a_micro_batch_are_refused():
    # 20 images in loader batches of 8 (8, 8, 4), two micro-batches each: the last batch's holds 4 images.
    assert smallest_micro_batch(20, 8, 2) == 4 and smallest_micro_batch(16, 16, 2) == 8
    assert smallest_micro_batch(5, 16, 2) == 5 and smallest_micro_batch(17, 16, 2) == 1
    config = EvalConfig(distilled="x", epochs=1, batch_size=8, accumulation=2, lr=0.1, eta=1.0)
    with pytest.raises(
        FadrmError,
        match=r"^5 processes need at least 5 images in every micro-batch, and student has "
        r"one of 4 \(--batch-size 8 in --accumulation 2, 20 images\); use fewer",
    ):
        ST.train_student(
            nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
            tiny_training_set(20),
            config,
            dataclasses.replace(SPEC, image_size=8),
            CPU,
            None,
            None,
            log=lambda s: None,
            ranks=Ranks(0, 5),
        )


def test_a_non_finite_loss_stops_the_student_before_its_checkpoint(tmp_path):
    from fadrm.artifacts import StudentCheckpoint

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    checkpoint = StudentCheckpoint(tmp_path / "s.partial.pt", {"seed": 0})
    config = EvalConfig(distilled="x", epochs=2, batch_size=4, lr=0.1, eta=1.0, mix="none")
    with pytest.raises(FadrmError, match=r"^non-finite loss \(nan\) during training student; lower the learning rate"):
        ST.train_student(
            model,
            tiny_training_set(8),
            config,
            dataclasses.replace(SPEC, image_size=8),
            CPU,
            None,
            None,
            log=lambda s: None,
            checkpoint=checkpoint,
        )
    assert not checkpoint.path.exists()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_fused_optimizer_steps_as_the_loop_does_in_one_operator_without_scalar_reads(optimizer):
    """--fused-optimizer (auto: on for the CPU): torch's fused step moves the weights as its per-parameter
    loop does (to float rounding, over ten steps) in a handful of operators and no scalar read, where the
    loop dispatches about ten per parameter and reads each parameter's step count."""
    from fadrm.hostcost import CountHostCost
    from fadrm.runtime import make_runtime

    assert (
        make_runtime("cpu", "off").fused_optimizer
        and not make_runtime("cpu", "off", fused_optimizer="off").fused_optimizer
    )
    weights, costs = [], []
    for fused in (False, True):
        torch.manual_seed(0)
        model = fadrm.models.build_model("convnet-small", 10, 1, 28)
        opt = OPTIMIZERS.get(optimizer)(weight_decay_groups(model, 0.01), 1e-3, 0.9, fused)
        for step in range(10):
            torch.manual_seed(step)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            with CountHostCost() as counted:
                opt.step()
        weights.append([p.detach().clone() for p in model.parameters()])
        costs.append(counted.cost)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*weights))
    assert costs[1].total <= 8 and costs[1].scalar_reads == 0 and costs[0].total > 5 * costs[1].total


def test_prefetched_items_are_the_items_and_errors_and_early_exits_reach_the_consumer():
    import threading

    from fadrm.runtime import prefetched

    assert list(prefetched(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad batch")

    got = []
    with pytest.raises(ValueError, match="bad batch"):
        for item in prefetched(failing()):
            got.append(item)
    assert got == [1]
    before = threading.active_count()
    for item in prefetched(iter(range(1000))):
        if item == 3:
            break
    assert threading.active_count() == before  # the producer stopped with the consumer


def test_views_prefetched_in_a_thread_train_the_same_student(tmp_path):
    """--prefetch-views on (here on the CPU): the next batch's views are made in a background thread, and the
    student's weights and history are those of drawing them in turn."""
    from fadrm.runtime import make_runtime

    results = []
    for prefetch in ("off", "on"):
        runtime = make_runtime("cpu", "off", stage="evaluate", prefetch_views=prefetch)
        assert runtime.prefetch_views == (prefetch == "on")
        torch.manual_seed(0)
        model = fadrm.models.build_model("convnet-small", 10, 1, 28)
        teacher = fadrm.models.build_model("convnet-small", 10, 1, 28).eval()
        images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
        training = TrainingSet("distilled", images, torch.arange(40) % 10)
        config = EvalConfig(distilled="x", epochs=2, batch_size=8, lr=1e-3, eta=2.0, eval_every=0)
        validation = [(torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))]
        run = train_student(
            model, training, config, SPEC, runtime, validation, TeacherLabeller([teacher]), log=lambda s: None
        )
        results.append((run["history"], [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
