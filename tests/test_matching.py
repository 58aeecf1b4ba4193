"""The mechanisms of G-VBSM, EDC and CV-DD on known inputs: convolution-input and patch statistics,
the EMA surrogate, class targets, dropped terms, data densification, class-major units, committees,
real-image initialisation; grouped synthesis still equals separate runs."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fadrm.config import DistillConfig, SynthesisConfig
from fadrm.runtime import make_runtime
from fadrm.seeding import make_generator
from fadrm.synthesis.matching import MATCHERS, EmaSurrogate, StatMatcher
from fadrm.synthesis.targets import (
    LayerTargets,
    TeacherTargets,
    cell_size,
    image_moments,
    image_patch_moments,
    patch_moments,
)
from fadrm.synthesis.methods import TEACHER_POLICIES, TeacherPlan, committee_weights, committees
from fadrm.synthesis.recover import data_densification, recover
from fadrm.synthesis.units import UNIT_PLANS, Unit

CPU = make_runtime("cpu", "off")
BOUNDS = (torch.full((1, 1, 1, 1), -2.0), torch.full((1, 1, 1, 1), 2.0))

# Two 2 x 4 one-channel images holding 0..15; with 2 x 2 cells, cell 0 is columns 0-1, cell 1 columns 2-3.
X = torch.arange(16.0).view(2, 1, 2, 4)
CELL0 = [0, 1, 4, 5, 8, 9, 12, 13]
CELL1 = [2, 3, 6, 7, 10, 11, 14, 15]


def test_channel_and_patch_statistics_by_hand():
    mean, var = patch_moments(X, 2, num_groups=1)
    assert mean.tolist() == [[statistics.fmean(CELL0), statistics.fmean(CELL1)]]
    assert var[0].tolist() == pytest.approx([statistics.pvariance(CELL0), statistics.pvariance(CELL1)])
    # Per image: image 0's cell 0 is {0, 1, 4, 5}; its channel is 0..7.
    image_mean, image_var = image_patch_moments(X, 2)
    assert image_mean[0].tolist() == [2.5, 4.5] and image_var[0].tolist() == pytest.approx([4.25, 4.25])
    channel_mean, channel_var = image_moments(X)
    assert channel_mean[:, 0].tolist() == [3.5, 11.5] and channel_var[:, 0].tolist() == pytest.approx([5.25, 5.25])
    # Two groups of one image each: each group's cells are its own image's.
    group_mean, _ = patch_moments(X, 2, num_groups=2)
    assert torch.equal(group_mean, image_mean)


def test_patch_statistics_resize_up_to_the_next_multiple_of_the_cell():
    x = torch.randn(3, 2, 6, 6)
    mean, var = patch_moments(x, 4, num_groups=1)
    up = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    cell = up[:, :, 4:8, 0:4]  # second row of cells, first column: cell 2
    assert mean.shape == (1, 4) and mean[0, 2].item() == pytest.approx(cell.mean().item(), abs=1e-6)
    assert var[0, 2].item() == pytest.approx(cell.var(correction=0).item(), rel=1e-5)
    assert [cell_size(s) for s in (28, 32, 64, 224)] == [4, 4, 4, 16]


def _conv_bn() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.BatchNorm2d(1)).eval()
    model[0].weight.data.fill_(1.0)
    model[1].running_mean.fill_(0.0)
    model[1].running_var.fill_(1.0)
    return model.requires_grad_(False)


def _targets(channel=(1.0, 2.0), patch=((6.0, 8.0), (5.0, 4.0))) -> TeacherTargets:
    conv = LayerTargets(
        channel=(torch.tensor([channel[0]]), torch.tensor([channel[1]])),
        patch=(torch.tensor(patch[0]), torch.tensor(patch[1])),
    )
    return TeacherTargets(cell=2, layers={"0": conv, "1": LayerTargets()})


def test_convolution_input_and_batchnorm_terms_golden_value():
    model = _conv_bn()
    values = list(range(16))
    mean, var = statistics.fmean(values), statistics.pvariance(values)  # 7.5, 21.25
    conv = (
        abs(mean - 1)
        + abs(var - 2)
        + math.dist([statistics.fmean(CELL0), statistics.fmean(CELL1)], [6, 8])
        + math.dist([statistics.pvariance(CELL0), statistics.pvariance(CELL1)], [5, 4])
    )
    bn = abs(mean - 0) + abs(var - 1)  # the BatchNorm layer's input is the conv's output: the same values
    with StatMatcher([model], num_groups=1, targets=[_targets()]) as matcher:
        model(X)
        # The first hooked module in named_modules order (the convolution) is weighted 10.
        assert matcher.pop(model).item() == pytest.approx(10 * conv + bn, rel=1e-6)
    assert not model[0]._forward_hooks and not model[1]._forward_hooks


def test_a_teacher_without_batchnorm_matches_its_convolutions_only():
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False)).eval().requires_grad_(False)
    model[0].weight.data.fill_(1.0)
    targets = TeacherTargets(2, {"0": _targets().layers["0"]})
    with StatMatcher([model], 1, targets=[targets]) as matcher:
        model(X)
        assert matcher.pop(model).item() > 0
    with StatMatcher([model], 1) as matcher:  # BatchNorm only: nothing to match, a zero term
        model(X)
        assert torch.equal(matcher.pop(model), torch.zeros(1))


def test_ema_surrogate_value_and_gradient():
    ema = EmaSurrogate(0.8)
    first = ema("k", torch.tensor([[1.0, 2.0]]))
    assert first[0].tolist() == pytest.approx([0.2, 0.4])  # the state starts at 0, as published
    current = torch.tensor([[3.0, 5.0]], requires_grad=True)
    value = ema("k", current)
    assert value[0].tolist() == pytest.approx([0.8 * 0.2 + 0.2 * 3, 0.8 * 0.4 + 0.2 * 5])
    weights = torch.tensor([[2.0, -3.0]])
    (grad,) = torch.autograd.grad((value * weights).sum(), current)
    assert torch.equal(grad, weights)  # the gradient goes to the current statistic, unscaled
    # A group whose term is left out keeps its state.
    kept = ema("k", torch.tensor([[10.0, 10.0], [10.0, 10.0]])[:1], keep=torch.tensor([False]))
    assert torch.allclose(kept, value)


def test_ema_distance_in_the_matcher():
    bn = nn.BatchNorm2d(1).eval().requires_grad_(False)
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(2.0)
    x1, x2 = torch.tensor([0.0, 2.0, 4.0, 6.0]).view(2, 1, 1, 2), torch.tensor([1.0, 1.0, 3.0, 3.0]).view(2, 1, 1, 2)
    with StatMatcher([bn], 1, ema=0.5) as matcher:
        bn(x1)
        # Mean 3, var 5; the state starts at 0. The only layer is the first: weighted 10.
        assert matcher.pop(bn).item() == pytest.approx(10 * (abs(0.5 * 3 - 1) + abs(0.5 * 5 - 2)), rel=1e-6)
        bn(x2)  # mean 2, var 1: the EMA is 0.5 * (1.5, 2.5) + 0.5 * (2, 1)
        assert matcher.pop(bn).item() == pytest.approx(10 * (abs(1.75 - 1) + abs(1.75 - 2)), rel=1e-6)


def test_class_targets_are_averaged_over_each_groups_images():
    bn = nn.BatchNorm2d(1).eval().requires_grad_(False)
    class_targets = (torch.tensor([[0.0], [10.0], [4.0]]), torch.tensor([[1.0], [1.0], [3.0]]))
    targets = TeacherTargets(2, {"": LayerTargets(class_channel=class_targets)})
    x = torch.tensor([0.0, 2.0, 4.0, 6.0]).view(2, 1, 1, 2)  # one group of two images: mean 3, var 5
    labels = torch.tensor([0, 1])  # one group of classes 0 and 1: class target mean 5, var 1
    with StatMatcher([bn], 1, targets=[targets], labels=labels, class_share=0.5) as matcher:
        bn(x)
        glob = abs(3 - 0) + abs(5 - 1)  # running buffers at their defaults (0, 1)
        cls = abs(3 - 5) + abs(5 - 1)
        assert matcher.pop(bn).item() == pytest.approx(10 * (0.5 * glob + 0.5 * cls), rel=1e-6)


def test_dropped_convolution_terms_come_from_each_groups_stream():
    model = _conv_bn()
    gens = [make_generator(0, "g", g) for g in range(2)]
    x = torch.randn(4, 1, 2, 4)
    with StatMatcher([model], 2, targets=[_targets()], conv_drop=1.0, generators=gens) as matcher:
        model(x)
        dropped = matcher.pop(model)
    with StatMatcher([model], 2) as matcher:  # what is left: the BatchNorm term (first here: weighted 10)
        model(x)
        assert torch.allclose(10 * dropped, matcher.pop(model))
    # One draw per group and convolution per forward; without dropping, none.
    assert not torch.equal(gens[0].get_state(), make_generator(0, "g", 0).get_state())
    untouched = [make_generator(0, "g", g) for g in range(2)]
    with StatMatcher([model], 2, targets=[_targets()], conv_drop=0.0, generators=untouched) as matcher:
        model(x)
        matcher.pop(model)
    assert all(torch.equal(g.get_state(), make_generator(0, "g", i).get_state()) for i, g in enumerate(untouched))


def _reference_dd(views: np.ndarray, slots: int) -> np.ndarray:
    """Independent L_DD per class: numpy's general eigenvalues, softmaxes and KL by the formula."""
    out = []
    for block in views.reshape(-1, slots, views.shape[1] * views.shape[2] * views.shape[3]).astype(np.float64):
        lam = np.linalg.eigvals(block @ block.T).real
        p = np.exp(lam / 4 - (lam / 4).max())
        p /= p.sum()
        log_q = lam - lam.max() - np.log(np.exp(lam - lam.max()).sum())
        out.append(float(np.sum(p * (np.log(p) - log_q))))
    return np.array(out)


def test_data_densification_against_numpy_eigenvalues():
    torch.manual_seed(0)
    views = torch.randn(12, 1, 6, 6) * 0.3  # 2 groups x 2 classes x 3 slots, kept at 6 px
    got = data_densification(views, slots=3, num_groups=2)
    per_class = _reference_dd(views.numpy(), 3)
    assert got.tolist() == pytest.approx(per_class.reshape(2, 2).sum(1).tolist(), rel=1e-4)
    # 64 px views are average-pooled to 32 x 32 (2 x 2 means) first.
    big = torch.randn(4, 1, 64, 64) * 0.3
    pooled = big.numpy().reshape(4, 1, 32, 2, 32, 2).mean(axis=(3, 5))
    assert data_densification(big, 2, 1).item() == pytest.approx(_reference_dd(pooled, 2).sum(), rel=1e-4)
    # One image per class: a single eigenvalue, nothing to spread.
    assert torch.equal(data_densification(views, 1, 2), torch.zeros(2))
    views.requires_grad_(True)
    data_densification(views, 3, 2).sum().backward()
    assert torch.isfinite(views.grad).all() and views.grad.abs().sum() > 0


def test_class_major_units():
    plan = UNIT_PLANS.get("class-major")
    units = plan.plan(10, 4, SynthesisConfig(group_images=8))  # 2 classes x 4 slots per group
    assert [u.classes for u in units] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert units[1].images == [(2, 0), (2, 1), (2, 2), (2, 3), (3, 0), (3, 1), (3, 2), (3, 3)]
    assert units[0].key == "ipc0000-0003-group0000" and units[0].size == 8
    chunked = plan.plan(10, 4, SynthesisConfig(group_images=8, group_slots=2))  # 4 classes x 2 slots
    assert [(u.ipc_index, u.classes) for u in chunked] == [
        (0, (0, 1, 2, 3)),
        (0, (4, 5, 6, 7)),
        (0, (8, 9)),
        (2, (0, 1, 2, 3)),
        (2, (4, 5, 6, 7)),
        (2, (8, 9)),
    ]
    # Every image of the run exactly once.
    assert sorted(i for u in chunked for i in u.images) == sorted(itertools.product(range(10), range(4)))
    # At IPC 1 a class-major unit is an IPC-major one: same key, same stream.
    one = plan.plan(10, 1, SynthesisConfig(group_images=5))[1]
    assert one == Unit(0, 1, (5, 6, 7, 8, 9)) and one.key == "ipc0000-group0001"
    assert plan.problem(3, SynthesisConfig(group_images=100)) == (
        "--ipc 3 does not divide the group of --group-images 100 (each group holds whole classes with 3 images each)"
    )
    assert "--group-slots 3 must divide --ipc 4" in plan.problem(4, SynthesisConfig(group_images=12, group_slots=3))
    assert plan.problem(50, SynthesisConfig(group_images=100)) is None


def test_committee_weights_and_the_published_committees():
    w = committee_weights([63.0, 65.3])
    expected = math.exp(63 / 5) / (math.exp(63 / 5) + math.exp(65.3 / 5))
    assert w[0] == pytest.approx(expected) and sum(w) == pytest.approx(1.0)
    pairs = committees(5, 10, SynthesisConfig(committee_size=2), seed=0)
    assert pairs == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]  # CV-DD IPC 10
    # IPC 1: the two best priors (CV-DD's pairs on Tiny-ImageNet and ImageNet-1k), unless fixed.
    tiny = SynthesisConfig(committee_size=2, priors=[46.5, 28.3, 43.6, 44.8, 41.5])
    imagenet = SynthesisConfig(committee_size=2, priors=[56.4, 42.3, 52.5, 44.2, 40.6])
    assert committees(5, 1, tiny, 0) == [(0, 3)] and committees(5, 1, imagenet, 0) == [(0, 2)]
    assert committees(5, 1, SynthesisConfig(committee_size=2, fixed_committee=[4, 3]), 0) == [(3, 4)]


def test_the_committees_beyond_the_combinations_are_seeded_per_ipc_index():
    settings = SynthesisConfig(committee_size=2)
    fifty = committees(5, 50, settings, seed=0)
    assert fifty == committees(5, 50, settings, seed=0) and fifty != committees(5, 50, settings, seed=1)
    assert committees(5, 60, settings, seed=0)[:50] == fifty  # index i's committee depends on (seed, i) only
    assert all(len(set(c)) == 2 and list(c) == sorted(c) and max(c) < 5 for c in fifty)
    assert len(set(fifty)) > 1


def test_committee_plans_and_their_problems():
    policy = TEACHER_POLICIES.get("committee")
    config = DistillConfig(
        dataset="fashion-mnist",
        teachers=["a", "b", "c"],
        out="o",
        ipc=2,
        synthesis=SynthesisConfig(committee_size=2, priors=[50.0, 60.0, 70.0]),
    )
    plans = policy.plans(config, 3)
    first, second = plans(Unit(0, 0, (0,))), plans(Unit(1, 3, (0,)))
    assert first.teachers == (0, 1) and second.teachers == (0, 2)
    assert first.weights == pytest.approx(committee_weights([50.0, 60.0]))
    assert first.members(7) == list(zip((0, 1), first.weights))  # every member at every iteration
    assert policy.problem(2, SynthesisConfig(committee_size=3)).startswith(
        "a committee of --committee-size 3 needs at least 3 teachers, got 2"
    )
    assert "one per --teacher" in policy.problem(2, SynthesisConfig(committee_size=2, priors=[1.0]))
    assert "--fixed-committee 0 5" in policy.problem(3, SynthesisConfig(committee_size=2, fixed_committee=[0, 5]))


def _teacher(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 4),
    )
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 1, 8, 8))
    return model.eval().requires_grad_(False)


def _random_targets(model: nn.Module, seed: int) -> TeacherTargets:
    """Targets of the right shapes for every hooked layer (8 px inputs, 4 px cells: 4 cells)."""
    gen = torch.Generator().manual_seed(seed)

    def pair(*shape):
        return torch.randn(*shape, generator=gen), torch.rand(*shape, generator=gen) + 0.5

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            layers[name] = LayerTargets(pair(module.in_channels), pair(4), pair(4, module.in_channels), pair(4, 4))
        elif isinstance(module, nn.BatchNorm2d):
            layers[name] = LayerTargets(class_channel=pair(4, module.num_features))
    return TeacherTargets(4, layers)


@pytest.mark.parametrize("matcher", ["batchnorm+conv", "category-aware"])
def test_grouped_statistics_synthesis_equals_separate_runs(matcher):
    teachers = [_teacher(0), _teacher(1)]
    targets = [_random_targets(t, i) for i, t in enumerate(teachers)]
    settings = SynthesisConfig(sizes=[8], budgets=[4], lr=0.1, jitter=2, stat_ema=0.8, conv_drop=0.5, dd_weight=1.0)
    init = torch.rand(8, 1, 8, 8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # two groups of 2 classes x 2 slots

    def run(images, group_labels, groups):
        gens = [make_generator(3, "u", g) for g in groups]
        return recover(
            images,
            group_labels,
            teachers,
            gens,
            settings,
            CPU,
            BOUNDS,
            matcher=MATCHERS.get(matcher).build,
            targets=targets,
            slots=2,
        )

    together = run(init, labels, [0, 1])
    first, second = run(init[:4], labels[:4], [0]), run(init[4:], labels[4:], [1])
    assert torch.allclose(together.images, torch.cat([first.images, second.images]), atol=1e-5)
    assert torch.allclose(together.loss, torch.cat([first.loss, second.loss]), atol=1e-5)
    assert (together.bn > 0).all()


def test_a_committee_sums_its_weighted_members():
    teachers = [_teacher(0), _teacher(1)]
    settings = SynthesisConfig(sizes=[8], budgets=[1], lr=0.1, jitter=0, crop_scale=[1.0, 1.0])
    init, labels = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])

    def one(plan):
        return recover(init, labels, teachers, [make_generator(0, "c")], settings, CPU, BOUNDS, plan=plan)

    alone = [one(TeacherPlan((k,))) for k in (0, 1)]
    both = one(TeacherPlan((0, 1), (0.25, 0.75)))
    assert both.loss.item() == pytest.approx(0.25 * alone[0].loss.item() + 0.75 * alone[1].loss.item(), rel=1e-6)
    assert both.bn.item() == pytest.approx(0.25 * alone[0].bn.item() + 0.75 * alone[1].bn.item(), rel=1e-6)
