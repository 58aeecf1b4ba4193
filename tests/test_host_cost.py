"""Synthesis keeps the host out of the loop: no scalar read per iteration, a fused statistics loss
equal to the per-layer one, counted exactly with a dispatch mode."""

from __future__ import annotations

import contextlib
import shutil
import json

import pytest
import torch
from conftest import statistics_targets

import fadrm
from fadrm.config import SynthesisConfig
from fadrm.errors import FadrmError
from fadrm.hostcost import CountHostCost
from fadrm.models import build_model
from fadrm.runtime import make_runtime
from fadrm.seeding import make_generator
from fadrm.synthesis.matching import BNStatMatcher, FusedBatchNormMatcher, FusedStatMatcher, StatMatcher
from fadrm.synthesis.recover import recover


def _teacher(seed: int = 0, width: int = 8) -> torch.nn.Module:
    """A ConvNet whose BN running statistics are not the defaults, frozen."""
    torch.manual_seed(seed)
    model = build_model("convnet-small", 10, 1, 16, width=width).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 1, 16, 16) * 2 - 0.5)
    return model.eval().requires_grad_(False)


def _cost_of_recover(budget: int, fused: bool, groups: int = 2):
    teacher = _teacher()
    settings = SynthesisConfig(sizes=[12, 16], budgets=[budget, budget], jitter=2)
    generators = [make_generator(0, "test", g) for g in range(groups)]
    bounds = (torch.full((1, 1, 1, 1), -3.0), torch.full((1, 1, 1, 1), 3.0))
    with CountHostCost() as counted:
        recover(
            torch.rand(5 * groups, 1, 16, 16),
            torch.arange(5 * groups) % 10,
            [teacher],
            generators,
            settings,
            make_runtime("cpu", "off", fused_statistics=fused),
            bounds,
        )
    return counted.cost


@pytest.mark.parametrize("fused", [False, True])
def test_no_scalar_is_read_inside_a_stage(fused):
    # Twice the iterations, the same reads: every read is per stage (the loss history), none per iteration.
    short, long = _cost_of_recover(2, fused), _cost_of_recover(4, fused)
    assert long.scalar_reads == short.scalar_reads
    assert long.total > short.total  # the counter does see the extra iterations


def test_the_counter_sees_a_read_and_the_backward_pass():
    x = torch.rand(3, requires_grad=True)
    with CountHostCost() as counted:
        (x * 2).sum().backward()
        float(x.detach().sum())
    assert counted.cost.scalar_reads == 1
    assert counted.cost.ops["aten.mul.Tensor"] >= 2  # forward and backward


def test_the_fused_path_dispatches_far_fewer_operators():
    default = _cost_of_recover(4, False) - _cost_of_recover(2, False)
    fused = _cost_of_recover(4, True) - _cost_of_recover(2, True)
    assert fused.total < 0.7 * default.total


def _mixed_ranks_teacher() -> torch.nn.Module:
    """BatchNorm layers on 4-d and on 2-d inputs in one model, running statistics not the defaults."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 6),
        torch.nn.BatchNorm1d(6),
        torch.nn.Linear(6, 10),
    ).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 1, 16, 16) * 2 - 0.5)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("ema", [0.0, 0.8])
@pytest.mark.parametrize("make_teacher", [_teacher, _mixed_ranks_teacher])
def test_fused_statistics_loss_equals_the_per_layer_loss(groups, ema, make_teacher):
    teacher = make_teacher()
    x = (torch.rand(4 * groups, 1, 16, 16) * 3 - 1).requires_grad_(True)
    results = []
    for kind in (BNStatMatcher, FusedBatchNormMatcher):
        x.grad = None
        with kind([teacher], groups, 10.0, ema) as statistics:
            for _ in range(3):  # the EMA state carries across forwards
                logits = teacher(x)
                loss = statistics.pop(teacher)
        # The statistics' gradient joins the classifier's through the replaced layers.
        ((loss * torch.arange(1.0, groups + 1)).sum() + logits.square().mean()).backward()
        results.append((loss.detach(), logits.detach(), x.grad.clone()))
    (per_layer, per_layer_logits, per_layer_grad), (fused, fused_logits, fused_grad) = results
    assert fused.shape == (groups,)
    torch.testing.assert_close(fused_logits, per_layer_logits, rtol=0, atol=0)  # the layers' own outputs
    torch.testing.assert_close(fused, per_layer, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_grad, per_layer_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize(("ema", "conv_drop", "class_share"), [(0.0, 0.0, 0.0), (0.8, 0.4, 0.0), (0.8, 0.4, 0.5)])
@pytest.mark.parametrize("cell", [4, 3])  # 3: the 16 px input is resized up to 18 for its cells
def test_fused_convolution_statistics_equal_the_per_layer_loss(groups, ema, conv_drop, class_share, cell):
    # G-VBSM's terms (EMA, convolutions dropped per group) and EDC's (class targets), over several
    # forwards: the EMA state and the random drops carry across them.
    teacher = _teacher()
    targets = [statistics_targets(teacher, 16, cell)]
    images = torch.rand(4 * groups, 1, 16, 16) * 3 - 1
    labels = torch.arange(4 * groups) % 10
    results = []
    for kind in (StatMatcher, FusedStatMatcher):
        x = images.clone().requires_grad_(True)
        generators = [make_generator(0, "test", g) for g in range(groups)]
        with kind(
            [teacher],
            groups,
            10.0,
            targets=targets,
            ema=ema,
            conv_drop=conv_drop,
            generators=generators,
            labels=labels,
            class_share=class_share,
        ) as statistics:
            for _ in range(3):
                logits = teacher(x)
                loss = statistics.pop(teacher)
        ((loss * torch.arange(1.0, groups + 1)).sum() + logits.square().mean()).backward()
        results.append((loss.detach(), x.grad.clone()))
    (per_layer, per_layer_grad), (fused, fused_grad) = results
    torch.testing.assert_close(fused, per_layer, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fused_grad, per_layer_grad, rtol=1e-4, atol=1e-6)


def test_fused_matcher_puts_every_layer_back_and_handles_a_model_without_batchnorm():
    teacher, plain = _teacher(), torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10))
    layers = dict(teacher.named_modules())
    with pytest.raises(RuntimeError, match="not every matched layer ran"):
        with FusedBatchNormMatcher([teacher, plain], 1) as statistics:
            assert not any(
                isinstance(m, torch.nn.BatchNorm2d)
                for name, m in teacher.named_modules()
                if not name.endswith(".layer")
            )
            plain(torch.rand(2, 1, 16, 16))
            assert torch.equal(statistics.pop(plain), torch.zeros(1))
            statistics.pop(teacher)
    assert dict(teacher.named_modules()) == layers  # the very same modules, where they were


def test_fused_matcher_refuses_a_layer_run_twice_a_training_layer_and_a_compiled_teacher():
    teacher = _teacher()
    block = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    twice = torch.nn.Sequential(torch.nn.Conv2d(1, block.num_features, 1), block, block)
    with FusedBatchNormMatcher([twice], 1):
        with pytest.raises(RuntimeError, match="ran twice in one forward pass"):
            twice(torch.rand(2, 1, 4, 4))
    shared_block = torch.nn.Sequential(torch.nn.Conv2d(block.num_features, block.num_features, 1), block)
    blocks = torch.nn.Sequential(torch.nn.Conv2d(1, block.num_features, 1), shared_block, shared_block)
    with FusedBatchNormMatcher([blocks], 1):
        with pytest.raises(RuntimeError, match="ran twice in one forward pass"):
            blocks(torch.rand(2, 1, 4, 4))
    assert blocks[1][1] is block and twice[1] is block and twice[2] is block
    with pytest.raises(ValueError, match="eval mode with running statistics"):
        with FusedBatchNormMatcher([_teacher().train()], 1):
            pass
    with pytest.raises(ValueError, match="compiled teacher"):
        with FusedBatchNormMatcher([torch.compile(_teacher())], 1):
            pass


def test_non_finite_loss_is_found_at_the_end_of_its_stage_and_named():
    teacher = _teacher()
    [linear for linear in teacher.modules() if isinstance(linear, torch.nn.Linear)][-1].bias.fill_(float("nan"))
    settings = SynthesisConfig(sizes=[12, 16], budgets=[3, 3])
    bounds = (torch.full((1, 1, 1, 1), -3.0), torch.full((1, 1, 1, 1), 3.0))
    with pytest.raises(
        FadrmError,
        match=r"^non-finite loss \(nan\) during synthesis \(stage 1 of 2, size 12\), "
        r"step 1; lower the learning rate",
    ):
        recover(
            torch.rand(3, 1, 16, 16),
            torch.tensor([0, 1, 2]),
            [teacher],
            [make_generator(0, "t", 0)],
            settings,
            make_runtime("cpu", "off"),
            bounds,
        )


def test_distill_with_fused_statistics(fmnist_root, teacher_ckpt, tmp_path):
    common = dict(
        ipc=1, data_root=str(fmnist_root), sizes=[24, 28], budgets=[3, 3], mipc=16, num_crop=2, log=lambda line: None
    )
    fadrm.distill("fashion-mnist", [teacher_ckpt], tmp_path / "default", method="fadrm", **common)
    manifest = fadrm.distill(
        "fashion-mnist", [teacher_ckpt], tmp_path / "fused", method="fadrm", fused_statistics=True, **common
    )
    assert manifest["device"].endswith("fused statistics") and manifest["config"]["fused_statistics"] is True
    default = json.loads((tmp_path / "default" / "manifest.json").read_text())
    for a, b in zip(default["images"], manifest["images"]):
        assert a["ce"] == pytest.approx(b["ce"], abs=1e-3)  # the same loss, other rounding


@pytest.mark.parametrize("method", ["g-vbsm", "edc"])
def test_distill_with_fused_convolution_statistics(method, fmnist_root, teacher_ckpt, tmp_path):
    common = dict(ipc=2, data_root=str(fmnist_root), sizes=[28], budgets=[3], log=lambda line: None)
    fadrm.distill("fashion-mnist", [teacher_ckpt], tmp_path / "default", method=method, **common)
    manifest = fadrm.distill(
        "fashion-mnist", [teacher_ckpt], tmp_path / "fused", method=method, fused_statistics=True, **common
    )
    assert manifest["device"].endswith("fused statistics")
    default = json.loads((tmp_path / "default" / "manifest.json").read_text())
    for a, b in zip(default["images"], manifest["images"]):
        assert a["ce"] == pytest.approx(b["ce"], abs=1e-3)  # the same loss, other rounding


def test_frozen_weights_held_in_the_autocast_dtype_change_no_bit():
    # Autocast would copy each frozen convolution and linear weight to bf16 at every forward.
    runtime = make_runtime("cpu", "bf16")
    teacher = build_model("resnet18", 10, 3, 32).eval().requires_grad_(False)
    trainable = torch.nn.Linear(3, 3)  # a weight that trains is left alone
    x = torch.randn(2, 3, 32, 32, requires_grad=True)

    def forward_backward():
        x.grad = None
        with CountHostCost() as counted:
            with runtime.autocast():
                logits = teacher(x)
            logits.float().square().sum().backward()
        return logits.detach(), x.grad.clone(), counted.cost.ops["aten._to_copy.default"]

    logits, grad, copies = forward_backward()
    with runtime.frozen_in_autocast([teacher, trainable]):
        assert teacher.fc.weight.dtype == torch.bfloat16 and trainable.weight.dtype == torch.float32
        held_logits, held_grad, held_copies = forward_backward()
    assert torch.equal(held_logits, logits) and torch.equal(held_grad, grad)
    assert held_copies <= copies - 21  # ResNet-18: 20 convolutions and the classifier
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    with pytest.raises(RuntimeError, match="boom"), runtime.frozen_in_autocast([teacher]):
        raise RuntimeError("boom")
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    with make_runtime("cpu", "off").frozen_in_autocast([teacher]):
        assert teacher.fc.weight.dtype == torch.float32


def test_recover_under_autocast_gives_the_images_it_gave_with_per_forward_casts(monkeypatch):
    teacher = _teacher()
    settings = SynthesisConfig(sizes=[12, 16], budgets=[3, 3], jitter=2)
    bounds = (torch.full((1, 1, 1, 1), -3.0), torch.full((1, 1, 1, 1), 3.0))
    runtime = make_runtime("cpu", "bf16")

    def images():
        generators = [make_generator(0, "test", g) for g in range(2)]
        return recover(
            torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(0)),
            torch.arange(10) % 10,
            [teacher],
            generators,
            settings,
            runtime,
            bounds,
        ).images

    held = images()
    monkeypatch.setattr(type(runtime), "frozen_in_autocast", lambda self, models: contextlib.nullcontext())
    assert torch.equal(images(), held)


class _Compiled(torch.nn.Module):
    """What torch.compile returns, as far as the pipeline sees it: a wrapper with ``_orig_mod``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self._orig_mod = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._orig_mod(x)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="--compile needs a C++ compiler")
def test_fused_statistics_with_compile_take_the_per_layer_path_and_say_so(
    fmnist_root, teacher_ckpt, tmp_path, monkeypatch
):
    monkeypatch.setattr(torch, "compile", _Compiled)  # the decision, without minutes of compiling
    lines = []
    manifest = fadrm.distill(
        "fashion-mnist",
        [teacher_ckpt],
        tmp_path / "set",
        method="fadrm",
        ipc=1,
        data_root=str(fmnist_root),
        sizes=[28],
        budgets=[2],
        mipc=8,
        num_crop=2,
        fused_statistics=True,
        compile=True,
        log=lines.append,
    )
    assert any("a compiled teacher cannot take; using the per-layer one" in line for line in lines)
    assert "fused" not in manifest["device"] and manifest["config"]["fused_statistics"] is True


def test_a_student_step_reads_no_scalar_and_its_views_cost_the_same_at_any_batch_size():
    """The default student step on the CPU path (live BSSL labels, two micro-batches, KL loss, fused AdamW):
    no value is read back from the device between the epoch's start and its end, and a batch of 128 costs the
    operators a batch of 16 does, but for its crops, resized one by one on the CPU (counted exactly, per loader
    batch: an epoch of four batches less an epoch of two)."""
    from fadrm.config import EvalConfig
    from fadrm.data import get_dataset_spec
    from fadrm.data.datasets import TrainingSet
    from fadrm.labels import TeacherLabeller
    from fadrm.students import train_student

    spec = get_dataset_spec("fashion-mnist")
    runtime = make_runtime("cpu", "off", stage="evaluate")
    teacher = build_model("convnet-small", 10, 1, 28).eval().requires_grad_(False)
    validation = [(torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))]
    per_batch = {}
    for batch in (16, 128):
        config = EvalConfig(distilled="x", epochs=1, batch_size=batch, lr=1e-3, eta=2.0, eval_every=0)
        costs = []
        for batches in (2, 4):
            images = torch.randint(0, 256, (batches * batch, 1, 28, 28), dtype=torch.uint8)
            training = TrainingSet("distilled", images, torch.arange(len(images)) % 10)
            model = build_model("convnet-small", 10, 1, 28)
            with CountHostCost() as counted:
                train_student(
                    model, training, config, spec, runtime, validation, TeacherLabeller([teacher]), log=lambda s: None
                )
            costs.append(counted.cost)
        per_batch[batch] = (costs[1] - costs[0]).scaled(1 / 2)
        assert per_batch[batch].scalar_reads == 0
    crops = {op for op in per_batch[128].ops if per_batch[128].ops[op] != per_batch[16].ops[op]}
    assert crops <= {
        "aten.slice.Tensor",
        "aten.div.Tensor",
        "aten.upsample_bilinear2d.default",
        "aten._to_copy.default",
        "aten.flip.default",
        "aten.cat.default",
        "aten.view.default",
        "aten.unsqueeze.default",
        "aten.lift_fresh.default",
        "aten.detach.default",
        "aten.alias.default",
    }, crops
