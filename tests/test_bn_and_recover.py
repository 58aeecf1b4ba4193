"""The maths of the recover loop: BN-statistics loss, per-group statistics, ARC, stages, budgets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fadrm.augment import resize
from fadrm.runtime import make_runtime
from fadrm.seeding import make_generator
from fadrm.synthesis.bn_stats import group_stat_distance
from fadrm.synthesis.matching import BNStatMatcher
from fadrm.config import SynthesisConfig
from fadrm.synthesis.recover import arc_merge, cosine_lr, recover

CPU = make_runtime("cpu", "off")
BOUNDS = (torch.full((1, 1, 1, 1), -2.0), torch.full((1, 1, 1, 1), 2.0))


def test_bn_loss_golden_value():
    bn = nn.BatchNorm2d(2).eval()
    bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
    bn.running_var.copy_(torch.tensor([2.0, 0.5]))
    # Channel 0 values {0, 2, 4, 6}: mean 3, biased var 5. Channel 1 values {1, 1, 3, 3}: mean 2, var 1.
    x = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]], [[[4.0, 6.0]], [[3.0, 3.0]]]])
    expected = math.hypot(3 - 1, 2 + 1) + math.hypot(5 - 2, 1 - 0.5)
    got = group_stat_distance(x, bn.running_mean, bn.running_var, num_groups=1)
    assert got.shape == (1,) and got.item() == pytest.approx(expected, rel=1e-6)
    with BNStatMatcher([bn], num_groups=1, first_bn_multiplier=10.0) as matcher:
        bn(x)
        assert matcher.pop(bn).item() == pytest.approx(10 * expected, rel=1e-6)
    assert not bn._forward_hooks  # hooks removed on exit


def _teacher(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 1, 12, 12) * 1.5 + 0.3)
    return model.eval().requires_grad_(False)


def _bn_free_teacher(seed: int = 2, num_classes: int = 3) -> nn.Module:
    """A teacher without BatchNorm (as AlexNet among the ImageNet-1k FADRM+ teachers)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes)
    )
    return model.eval().requires_grad_(False)


def test_matcher_term_of_a_teacher_without_batchnorm_is_zero():
    bn_free, teacher = _bn_free_teacher(), _teacher()
    x = torch.randn(6, 1, 12, 12)
    with BNStatMatcher([bn_free, teacher], num_groups=3) as matcher:
        bn_free(x)
        zero = matcher.pop(bn_free)
        teacher(x)
        positive = matcher.pop(teacher)
        with pytest.raises(RuntimeError, match="no matched layer ran"):
            matcher.pop(teacher)  # a teacher with BN layers that did not run is a bug, not a zero
    assert torch.equal(zero, torch.zeros(3)) and (positive > 0).all()


def test_grouped_statistics_equal_separate_groups():
    teacher = _teacher()
    x = torch.randn(3 * 4, 1, 12, 12)
    with BNStatMatcher([teacher], num_groups=3) as matcher:
        teacher(x)
        grouped = matcher.pop(teacher)
    with BNStatMatcher([teacher], num_groups=1) as matcher:
        separate = []
        for chunk in x.chunk(3):
            teacher(chunk)
            separate.append(matcher.pop(teacher))
    assert torch.allclose(grouped, torch.cat(separate), rtol=1e-5, atol=1e-6)


def test_hooks_removed_even_on_error():
    teacher = _teacher()
    with pytest.raises(RuntimeError):
        with BNStatMatcher([teacher], num_groups=2):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in teacher.modules())


def _run(init, labels, groups, settings, teachers=None):
    gens = [make_generator(7, "g", g) for g in groups]
    return recover(init, labels, teachers or [_teacher()], gens, settings, CPU, BOUNDS)


def test_grouped_recover_equals_separate_runs():
    settings = SynthesisConfig(sizes=[10, 12], budgets=[3, 3], lr=0.1, jitter=2)
    init = torch.rand(6, 1, 12, 12)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    together = _run(init, labels, [0, 1], settings)
    first = _run(init[:3], labels[:3], [0], settings)
    second = _run(init[3:], labels[3:], [1], settings)
    assert torch.allclose(together.images, torch.cat([first.images, second.images]), atol=1e-5)
    assert torch.allclose(together.bn, torch.cat([first.bn, second.bn]), atol=1e-5)


def test_stage_sizes_and_teacher_round_robin():
    seen: list[tuple[str, int]] = []

    class Recorder(nn.Module):
        def __init__(self, name, inner):
            super().__init__()
            self.name, self.inner = name, inner

        def forward(self, x):
            seen.append((self.name, x.shape[-1]))
            return self.inner(x)

    teachers = [Recorder("a", _teacher(0)), Recorder("b", _teacher(1))]
    settings = SynthesisConfig(sizes=[8, 12, 10], budgets=[2, 3, 1], lr=0.1, jitter=1)
    result = _run(torch.rand(3, 1, 12, 12), torch.tensor([0, 1, 2]), [0], settings, teachers)
    assert [s for _, s in seen] == [8, 8, 12, 12, 12, 10]
    assert [n for n, _ in seen] == ["a", "b", "a", "b", "a", "b"]
    assert result.images.shape == (3, 1, 12, 12) and result.iterations == 6


def test_teacher_without_batchnorm_uses_cross_entropy_only():
    teachers = [_bn_free_teacher(), _teacher()]  # iteration 0: no BN layers; iteration 1: BN
    init = torch.rand(6, 1, 12, 12)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    first = _run(init, labels, [0, 1], SynthesisConfig(sizes=[12], budgets=[1], lr=0.1), teachers)
    assert torch.equal(first.bn, torch.zeros(2))
    assert torch.equal(first.loss, first.ce.view(2, -1).mean(1))
    assert not torch.allclose(first.images, init)  # the cross-entropy gradient alone moved the pixels
    second = _run(init, labels, [0, 1], SynthesisConfig(sizes=[12], budgets=[2], lr=0.1), teachers)
    assert (second.bn > 0).all()
    assert torch.allclose(second.loss, second.ce.view(2, -1).mean(1) + 0.01 * second.bn)


def _load_teachers(monkeypatch, tmp_path, sources):
    """The pipeline's teachers, where the source "bn-free" loads a BatchNorm-free teacher."""
    from fadrm.config import DistillConfig
    from fadrm.data import get_dataset_spec
    from fadrm.data.specs import FASHION_MNIST_CLASSES
    from fadrm import teachers as teachers_module
    from fadrm.synthesis import pipeline
    from fadrm.teachers import Teacher

    spec = get_dataset_spec("fashion-mnist")
    real_load = teachers_module.load_teacher

    def load(source, dataset_spec=None, arch=None):
        if source != "bn-free":
            return real_load(source, dataset_spec, arch)
        return Teacher(  # a plain state dict's teacher: it takes the dataset's class names
            model=_bn_free_teacher(num_classes=10),
            arch="bn-free",
            dataset=spec.name,
            class_names=[str(i) for i in range(10)],
            in_channels=1,
            image_size=28,
            mean=spec.mean,
            std=spec.std,
            source=source,
            kind="state_dict",
        )

    monkeypatch.setattr(teachers_module, "load_teacher", load)
    config = DistillConfig(dataset=spec.name, teachers=sources, out=str(tmp_path / "out"))
    return pipeline.synthesis_teachers(config, spec, list(FASHION_MNIST_CLASSES), CPU)


def test_load_teachers_accepts_a_teacher_without_batchnorm_next_to_one_with_it(monkeypatch, tmp_path, teacher_ckpt):
    from fadrm.errors import FadrmError

    teachers = _load_teachers(monkeypatch, tmp_path, ["bn-free", str(teacher_ckpt)])
    assert [t.has_batchnorm() for t in teachers] == [False, True]
    with pytest.raises(FadrmError, match="none of the teachers .* has BatchNorm layers") as error:
        _load_teachers(monkeypatch, tmp_path, ["bn-free", "bn-free"])
    assert "\n" not in str(error.value)


def test_arc_formula():
    x, p0 = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 12, 12)
    merged = arc_merge(x, p0, 10, 0.3)
    assert torch.allclose(merged, 0.3 * resize(x, 10) + 0.7 * resize(p0, 10))
    assert torch.equal(arc_merge(x, p0, 8, 1.0), x)  # alpha 1: no residual at all
    assert torch.allclose(arc_merge(x, p0, 12, 0.0), p0)


def test_alpha_one_is_a_plain_continuation_and_alpha_zero_resets():
    init = torch.rand(3, 1, 12, 12)
    labels = torch.tensor([0, 1, 2])
    one_stage = _run(init, labels, [0], SynthesisConfig(sizes=[12], budgets=[4], lr=0.1))
    # Same total budget split in two stages at the same size, ARC with alpha 1 in between;
    # only the fresh Adam state differs, so compare the residual-free property directly:
    reset = _run(init, labels, [0], SynthesisConfig(sizes=[12, 12], budgets=[4, 0], lr=0.1, alpha=0.0))
    assert torch.allclose(reset.images, init)  # alpha 0: the optimised pixels are discarded
    keep = _run(init, labels, [0], SynthesisConfig(sizes=[12, 12], budgets=[4, 0], lr=0.1, alpha=1.0))
    assert torch.allclose(keep.images, one_stage.images)  # alpha 1: nothing of P0 is mixed back


def test_zero_budget_returns_initial_images():
    init = torch.rand(3, 1, 12, 12)
    result = _run(init, torch.tensor([0, 1, 2]), [0], SynthesisConfig(sizes=[12], budgets=[0]))
    assert torch.equal(result.images, init)


def test_pixels_stay_in_range_and_loss_decreases():
    settings = SynthesisConfig(sizes=[12], budgets=[40], lr=0.2, jitter=0, crop_scale=[1.0, 1.0])
    result = _run(torch.rand(3, 1, 12, 12), torch.tensor([0, 1, 2]), [0], settings)
    assert result.images.min() >= -2 and result.images.max() <= 2
    assert result.history[-1] < result.history[0]


def test_cosine_schedule():
    assert cosine_lr(0.2, 0, 100) == pytest.approx(0.2)
    assert cosine_lr(0.2, 50, 100) == pytest.approx(0.1)
    assert cosine_lr(0.2, 100, 100) == pytest.approx(0.0)


def test_non_finite_loss_stops_with_clear_error():
    from fadrm.errors import FadrmError

    teacher = _teacher()
    teacher[-1].bias.fill_(float("nan"))
    with pytest.raises(FadrmError, match="non-finite loss"):
        _run(
            torch.rand(3, 1, 12, 12), torch.tensor([0, 1, 2]), [0], SynthesisConfig(sizes=[12], budgets=[2]), [teacher]
        )


def test_group_moments_match_var_mean_and_gradcheck():
    from fadrm.synthesis.bn_stats import GroupMoments

    x = torch.randn(6, 3, 5, 4, dtype=torch.double) * 2 + 0.7
    mean, var = GroupMoments.apply(x, 2)
    ref_var, ref_mean = torch.var_mean(x.unflatten(0, (2, 3)), dim=(1, 3, 4), correction=0)
    assert torch.allclose(mean, ref_mean.float(), atol=1e-5) and torch.allclose(var, ref_var.float(), rtol=1e-5)
    channels_last = x.float().contiguous(memory_format=torch.channels_last)
    assert torch.allclose(GroupMoments.apply(channels_last, 2)[1], ref_var.float(), rtol=1e-5)

    def moments(t):  # gradcheck in double through the same backward formula
        return GroupMoments.apply(t, 2)

    x.requires_grad_(True)
    weights = (torch.randn(2, 3, dtype=torch.double), torch.randn(2, 3, dtype=torch.double))

    def reference(t):
        v, m = torch.var_mean(t.unflatten(0, (2, 3)), dim=(1, 3, 4), correction=0)
        return (m * weights[0]).sum() + (v * weights[1]).sum()

    (expected,) = torch.autograd.grad(reference(x), x)
    mean, var = moments(x)
    (got,) = torch.autograd.grad((mean * weights[0]).sum() + (var * weights[1]).sum(), x)
    assert torch.allclose(got, expected, atol=1e-5)


def test_chunked_moments_combine_exactly():
    from fadrm.synthesis.bn_stats import _chunked_moments

    x = (torch.randn(7, 5, 6, 6) * 3 + 1).contiguous(memory_format=torch.channels_last)
    mean, var = _chunked_moments(x)  # chunks of 2, 2, 2, 1 images
    ref_var, ref_mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    assert torch.allclose(mean, ref_mean, atol=1e-5) and torch.allclose(var, ref_var, rtol=1e-5)
