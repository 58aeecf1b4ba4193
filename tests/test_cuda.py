"""The CUDA paths: the statistics kernels, mixed precision, every method's distill and evaluate end
to end, batched view rendering, and a student's resume with its gradient scaler and weight average.

Skipped without a CUDA device (CI has none); run them wherever one is lent.
"""

from __future__ import annotations

import pytest
import torch
from conftest import statistics_targets
from torch import nn

import fadrm
from fadrm.augment import MIXES, ViewSampler, render
from fadrm.runtime import make_runtime
from fadrm.seeding import make_generator
from fadrm.synthesis.bn_stats import group_stat_distance
from fadrm.synthesis.matching import BNStatMatcher, FusedBatchNormMatcher, FusedStatMatcher, StatMatcher
from fadrm.synthesis.targets import patch_moments
from fadrm.synthesis.recover import data_densification
from fadrm.config import SynthesisConfig
from fadrm.synthesis.recover import recover

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BOUNDS = (torch.full((1, 1, 1, 1), -2.0), torch.full((1, 1, 1, 1), 2.0))


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    with torch.no_grad():
        model.train()(torch.randn(64, 1, 12, 12) * 1.5 + 0.3)
    return model.eval().requires_grad_(False)


def test_group_statistics_and_their_gradient_match_the_cpu():
    # CUDA uses batch_norm_stats, the CPU the batch-norm kernel (chunked when large): same maths.
    torch.manual_seed(0)
    x = torch.randn(3 * 5, 6, 7, 7) * 2 + 0.5
    running_mean, running_var = torch.randn(6), torch.rand(6) + 0.5
    results = []
    for device in ("cpu", "cuda"):
        leaf = x.clone().to(device).requires_grad_(True)  # a fresh leaf on each device
        distance = group_stat_distance(leaf, running_mean.to(device), running_var.to(device), num_groups=3)
        distance.sum().backward()
        results.append((distance.detach().cpu(), leaf.grad.cpu()))
    (cpu_distance, cpu_grad), (cuda_distance, cuda_grad) = results
    assert torch.allclose(cpu_distance, cuda_distance, rtol=1e-4, atol=1e-5)
    assert torch.allclose(cpu_grad, cuda_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_fused_statistics_match_the_per_layer_path_on_cuda(groups, amp):
    # The fused path replaces the BatchNorm layers (their forward, their backward and the
    # statistics') on CUDA's kernels, channels-last, under autocast: the same loss and gradient.
    runtime = make_runtime("cuda", amp)
    teacher = runtime.place(_teacher())
    torch.manual_seed(1)
    images = runtime.batch(torch.randn(4 * groups, 1, 12, 12) * 1.5)
    results = []
    for kind in (BNStatMatcher, FusedBatchNormMatcher):
        x = images.clone().requires_grad_(True)
        with kind([teacher], groups, 10.0) as statistics:
            with runtime.autocast():
                logits = teacher(x)
                loss = statistics.pop(teacher)
            (loss.sum() + logits.float().square().mean()).backward()
        results.append((loss.detach().float().cpu(), x.grad.float().cpu()))
    (per_layer, per_layer_grad), (fused, fused_grad) = results
    tolerance = 1e-4 if amp == "off" else 2e-2  # bf16 gradients round at about 4e-3
    assert torch.allclose(fused, per_layer, rtol=tolerance, atol=1e-5)
    assert (fused_grad - per_layer_grad).norm() <= tolerance * per_layer_grad.norm()


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("class_share", [0.0, 0.5])  # G-VBSM's terms, EDC's
def test_fused_convolution_statistics_match_the_per_layer_path_on_cuda(groups, class_share):
    runtime = make_runtime("cuda", "off")
    teacher = runtime.place(_teacher())
    targets = [statistics_targets(teacher.cpu(), 12, 5, classes=3)]  # 12 px: resized up to 15 for the cells
    teacher = runtime.place(teacher)
    torch.manual_seed(1)
    images = runtime.batch(torch.randn(4 * groups, 1, 12, 12) * 1.5)
    labels = (torch.arange(4 * groups) % 3).cuda()
    results = []
    for kind in (StatMatcher, FusedStatMatcher):
        x = images.clone().requires_grad_(True)
        generators = [make_generator(0, "cuda", g) for g in range(groups)]
        with kind(
            [teacher],
            groups,
            10.0,
            targets=targets,
            ema=0.8,
            conv_drop=0.3,
            generators=generators,
            labels=labels,
            class_share=class_share,
        ) as statistics:
            for _ in range(3):
                logits = teacher(x)
                loss = statistics.pop(teacher)
            (loss.sum() + logits.square().mean()).backward()
        results.append((loss.detach().cpu(), x.grad.cpu()))
    (per_layer, per_layer_grad), (fused, fused_grad) = results
    assert torch.allclose(fused, per_layer, rtol=1e-4, atol=1e-4)
    assert (fused_grad - per_layer_grad).norm() <= 1e-4 * per_layer_grad.norm()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_recover_under_each_precision(amp, fused):
    runtime = make_runtime("cuda", amp, fused_statistics=fused)
    teacher = runtime.place(_teacher())
    settings = SynthesisConfig(sizes=[10, 12], budgets=[20, 20], lr=0.2, jitter=1)
    generators = [make_generator(0, "cuda", g) for g in range(2)]
    init = torch.rand(6, 1, 12, 12)
    result = recover(init, torch.tensor([0, 1, 2] * 2), [teacher], generators, settings, runtime, BOUNDS)
    assert result.images.shape == init.shape and torch.isfinite(result.images).all()
    assert result.images.min() >= -2 and result.images.max() <= 2
    assert result.history[-1] < result.history[0]


def test_distill_and_evaluate_on_cuda(fmnist_root, teacher_ckpt, tmp_path):
    out = tmp_path / "set"
    manifest = fadrm.distill(
        "fashion-mnist",
        [teacher_ckpt],
        out,
        method="fadrm",
        ipc=2,
        data_root=str(fmnist_root),
        sizes=[24, 28],
        budgets=[3, 3],
        mipc=16,
        num_crop=2,
        classes_per_group=5,
        device="cuda",
        amp="auto",
        log=lambda s: None,
    )
    assert "cuda" in manifest["device"] and manifest["complete"] and len(manifest["images"]) == 20
    assert manifest["peak_memory_bytes"] > 0
    results = fadrm.evaluate(
        out,
        data_root=str(fmnist_root),
        epochs=2,
        batch_size=8,
        device="cuda",
        workers=0,
        labels="stored",
        log=lambda s: None,
    )
    assert 0 <= results["runs"][0]["top1"] <= 100


@pytest.mark.parametrize("mix", MIXES.names())
def test_views_rendered_on_the_gpu_are_the_cpu_pixels(mix):
    # The demo's, CIFAR's and ImageNet's sizes (ImageNet's sums in the other order when torch
    # uses several threads), and a set of images larger than the output, whose shrinking crops
    # are still resized on the CPU.
    for size, channels, side in ((28, 1, 28), (32, 3, 32), (224, 3, 224), (32, 3, 48)):
        generator = torch.Generator().manual_seed(side)
        images = torch.randint(0, 256, (20, channels, side, side), dtype=torch.uint8, generator=generator)
        sampler = ViewSampler(seed=size, size=size, mix=mix)
        for b, indices in enumerate(sampler.batches(0, len(images), 8)):
            view = sampler.view(0, b, indices, side, side)
            on_gpu = render(images, view, size, "cuda")
            assert on_gpu.device.type == "cuda"
            assert torch.equal(on_gpu.cpu(), render(images, view, size))


@pytest.mark.parametrize("views,prefetch", [("host", "on"), ("host", "off"), ("device", "on")])
@pytest.mark.parametrize("fused", ["off", "on"])
def test_each_way_of_rendering_views_and_stepping_trains_a_student_alike_on_cuda(views, prefetch, fused):
    """--views host (rendered on the CPU, copied over), --prefetch-views (a background thread) and
    --fused-optimizer on CUDA: the epoch's views are the same pixels, so the student ends where the default
    path (device views, no prefetch, torch's multi-tensor AdamW) ends, within cuDNN's and the fused step's
    float rounding."""
    from fadrm.config import EvalConfig
    from fadrm.data import get_dataset_spec
    from fadrm.data.datasets import TrainingSet
    from fadrm.labels import TeacherLabeller
    from fadrm.models import build_model
    from fadrm.runtime import make_runtime
    from fadrm.students import train_student

    spec = get_dataset_spec("fashion-mnist")
    images = torch.randint(0, 256, (48, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    training = TrainingSet("distilled", images, torch.arange(48) % 10)
    config = EvalConfig(distilled="x", epochs=2, batch_size=16, lr=1e-3, eta=2.0, eval_every=0)
    validation = [(torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))]
    weights = []
    for options in ({}, {"views": views, "prefetch_views": prefetch, "fused_optimizer": fused}):
        runtime = make_runtime("cuda", "off", stage="evaluate", **options)
        torch.manual_seed(0)
        model = build_model("convnet-small", 10, 1, 28)
        teacher = runtime.place(build_model("convnet-small", 10, 1, 28).eval())
        train_student(
            model, training, config, spec, runtime, validation, TeacherLabeller([teacher]), log=lambda s: None
        )
        weights.append([p.detach().cpu() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(*weights))


def test_patch_statistics_and_densification_match_the_cpu():
    # G-VBSM's and EDC's terms: per-group patch moments of conv inputs, and the eigenvalue spectrum.
    torch.manual_seed(0)
    x = torch.randn(4 * 3, 5, 14, 14) * 1.5 + 0.2
    cpu_mean, cpu_var = patch_moments(x, 7, num_groups=4)
    cuda_mean, cuda_var = (t.cpu() for t in patch_moments(x.cuda(), 7, num_groups=4))
    assert torch.allclose(cpu_mean, cuda_mean, rtol=1e-4, atol=1e-5)
    assert torch.allclose(cpu_var, cuda_var, rtol=1e-4, atol=1e-5)
    views = torch.randn(2 * 5 * 2, 1, 8, 8)  # 2 groups of 5 classes x 2 slots
    cpu = data_densification(views, slots=2, num_groups=2)
    assert torch.allclose(cpu, data_densification(views.cuda(), slots=2, num_groups=2).cpu(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "method,options",
    [
        ("g-vbsm", {"group_images": 10}),
        ("edc", {}),
        ("cv-dd", {"priors": [60.0, 65.0]}),
    ],
)
def test_each_new_method_distills_and_evaluates_on_cuda(
    method, options, fmnist_root, teacher_ckpt, second_teacher_ckpt, tmp_path
):
    # The statistics pass (G-VBSM, EDC) runs on the GPU too, computed because the file is missing.
    out = tmp_path / method
    manifest = fadrm.distill(
        "fashion-mnist",
        [teacher_ckpt, second_teacher_ckpt],
        out,
        method=method,
        ipc=2,
        data_root=str(fmnist_root),
        sizes=[28],
        budgets=[3],
        mipc=16,
        num_crop=2,
        stats_dir=str(tmp_path / "stats"),
        device="cuda",
        amp="auto",
        log=lambda s: None,
        **options,
    )
    assert "cuda" in manifest["device"] and manifest["complete"] and len(manifest["images"]) == 20
    results = fadrm.evaluate(
        out, data_root=str(fmnist_root), epochs=2, batch_size=8, device="cuda", workers=0, log=lambda s: None
    )
    assert results["protocol"] == "own" and 0 <= results["runs"][0]["top1"] <= 100


def test_a_student_resumes_on_cuda_with_its_scaler_and_weight_average(fmnist_root, teacher_ckpt, tmp_path):
    out = tmp_path / "set"
    fadrm.distill(
        "fashion-mnist",
        [teacher_ckpt],
        out,
        method="rded",
        ipc=2,
        data_root=str(fmnist_root),
        mipc=16,
        num_crop=2,
        device="cuda",
        log=lambda s: None,
    )
    common = dict(
        data_root=str(fmnist_root),
        epochs=3,
        eval_every=1,
        batch_size=8,
        device="cuda",
        amp="fp16",
        ema_decay=0.5,
        workers=0,
    )
    straight = fadrm.evaluate(out, out=str(tmp_path / "straight"), log=lambda s: None, **common)["runs"][0]

    def stop_at_epoch_2(line: str) -> None:
        if "epoch 2:" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fadrm.evaluate(out, out=str(tmp_path / "e"), log=stop_at_epoch_2, **common)
    saved = torch.load(tmp_path / "e" / "runs" / "distilled-convnet-small-soft.partial.pt", weights_only=True)
    assert {"scaler", "ema", "random"} <= set(saved)
    lines: list[str] = []
    resumed = fadrm.evaluate(out, out=str(tmp_path / "e"), log=lines.append, **common)["runs"][0]
    assert "distilled-convnet-small-soft: resuming after epoch 1" in lines
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    # The RNG streams and the scaler are restored; cuDNN may still pick other kernels, so weights
    # agree within float noise rather than bit for bit.
    a, b = (
        torch.load(tmp_path / d / "runs" / "distilled-convnet-small-soft.pt", weights_only=True)["state_dict"]
        for d in ("straight", "e")
    )
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3, rtol=1e-3) for k in a)
    assert resumed["history"][0] == straight["history"][0]
