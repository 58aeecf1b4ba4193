"""Augmentation: student views and mixing as a function of (seed, epoch, batch), the mix registry,
and the teacher-training transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fadrm.augment import MIXES, ViewSampler, fused_multiply_add, render, train_transform, upsampled_crops
from fadrm.data import get_dataset_spec, normalize
from fadrm.errors import FadrmError
from fadrm.labels import TeacherLabeller
from fadrm.runtime import make_runtime
from fadrm.seeding import derive_seed

CPU = make_runtime("cpu", "off")
SPEC = get_dataset_spec("fashion-mnist")


def test_views_are_a_function_of_seed_epoch_batch():
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    sampler = ViewSampler(seed=1, size=28)
    a = [sampler.view(3, b, idx, 28, 28) for b, idx in enumerate(sampler.batches(3, 6, 4))]
    b = [sampler.view(3, b, idx, 28, 28) for b, idx in enumerate(sampler.batches(3, 6, 4))]
    assert all(torch.equal(render(images, x, 28), render(images, y, 28)) for x, y in zip(a, b))
    other = sampler.view(4, 0, sampler.batches(4, 6, 4)[0], 28, 28)
    assert not torch.equal(render(images, a[0], 28), render(images, other, 28)[: len(a[0].indices)])


def _crops_one_by_one(images: torch.Tensor, boxes: list, flips: list, size: int) -> torch.Tensor:
    """The reference: each [0, 1] crop resized alone by PyTorch's bilinear upsample, then flipped."""
    crops = []
    for image, (top, left, h, w), flip in zip(images, boxes, flips):
        crop = image[None, :, top : top + h, left : left + w].float().div(255)
        if (h, w) != (size, size):
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
        crops.append(crop.flip(-1) if flip else crop)
    return torch.cat(crops)


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="reproduces PyTorch's x86 kernels, which fuse multiply-adds",
)
@pytest.mark.parametrize(
    ("size", "channels", "threads"),
    [(28, 1, 2), (32, 3, 2), (64, 3, 2), (64, 1, 1), (96, 3, 1), (96, 3, 2), (96, 1, 2)],
)
def test_batched_crops_are_bitwise_the_per_image_resize(size, channels, threads):
    # Up to 64 px (and 3 channels on one thread) PyTorch sums the four corners at once, otherwise
    # along rows first: both orders, every crop size of the random-resized-crop draws, flips.
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(size)
        images = torch.randint(0, 256, (24, channels, size, size), dtype=torch.uint8, generator=generator)
        sampler = ViewSampler(seed=size + channels, size=size)
        for epoch in range(3):
            for b, indices in enumerate(sampler.batches(epoch, len(images), 16)):
                view = sampler.view(epoch, b, indices, size, size)
                expected = _crops_one_by_one(images[indices], view.boxes, view.flips, size)
                assert torch.equal(upsampled_crops(images[indices], view.boxes, view.flips, size), expected)
    finally:
        torch.set_num_threads(saved)


def test_batched_crops_cover_every_crop_size_and_uint8_level():
    size = 28
    boxes = [(28 - h, 0, h, w) for h in range(1, size + 1) for w in range(1, size + 1)]
    images = torch.arange(len(boxes) * size * size).remainder(256).to(torch.uint8).view(len(boxes), 1, size, size)
    flips = [i % 3 == 0 for i in range(len(boxes))]
    assert torch.equal(upsampled_crops(images, boxes, flips, size), _crops_one_by_one(images, boxes, flips, size))


def test_fused_multiply_add_rounds_once():
    def fma(a: float, b: float, c: float) -> float:
        return fused_multiply_add(*(torch.tensor([x], dtype=torch.float64) for x in (a, b, c))).item()

    # Exact sums just below and just above a float32 halfway point, which float64 rounds onto it
    # (and a second rounding, ties to even, then to the wrong side).
    a, b, c = 1 + 2**-23, 2**-24 * (1 - 2**-23), 1 + 2**-23  # 1 + 3 * 2**-24 - 2**-70
    assert float(torch.tensor(a * b + c).float()) == 1 + 2**-22
    assert fma(a, b, c) == 1 + 2**-23
    a, b, c = 1 + 2**-12, 1 + 2**-12, 2**-60  # 1 + 2**-11 + 2**-24 + 2**-60
    assert float(torch.tensor(a * b + c).float()) == 1 + 2**-11
    assert fma(a, b, c) == 1 + 2**-11 + 2**-23
    assert fma(0.5, 0.75, 0.125) == 0.5  # exact: unchanged


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


def test_cutmix_golden_box_and_weight():
    # Pinned draws: ViewSampler(seed=0, size=28), epoch 0, batch 0 of 16 images. The batch's numpy
    # generator is default_rng(derive_seed(0, "mix", 0, 0)); computed once with fadrm 0.2's code
    # (before the mix registry), its draws are lam ~ Beta(1, 1) = 0.23443720737152207, then the
    # centre cy = 22, cx = 15. By hand: side int(28 * sqrt(1 - lam)) = int(24.5) = 24, rows
    # clip(22 - 12, 22 + 12) = [10, 28) -> h 18, columns clip(15 - 12, 15 + 12) = [3, 27) -> w 24,
    # so the box is (top 10, left 3, h 18, w 24) and lam = 1 - 18 * 24 / 28**2 = 352 / 784 = 22 / 49.
    view = ViewSampler(seed=0, size=28).view(0, 0, torch.arange(16), 28, 28)
    assert view.cut_box == (10, 3, 18, 24)
    assert view.lam == 1 - 18 * 24 / 28**2 == pytest.approx(22 / 49, abs=1e-15)
    top, left, h, w = view.cut_box
    assert view.lam == 1 - h * w / 28**2
    # The registry entry on the same generator gives the same (lam, box).
    rng = np.random.default_rng(derive_seed(0, "mix", 0, 0))
    assert MIXES.get("cutmix")(rng, 28, 1.0) == (view.lam, view.cut_box)


@pytest.mark.parametrize("name", MIXES.names())
def test_every_mix_gives_a_weight_in_0_1_and_a_box_inside_the_image(name):
    for seed in range(20):
        lam, box = MIXES.get(name)(np.random.default_rng(seed), 28, 1.0)
        assert 0.0 <= lam <= 1.0
        if box is not None:
            top, left, h, w = box
            assert 0 <= top and 0 <= left and top + h <= 28 and left + w <= 28
            assert lam == 1 - h * w / 28**2


def test_no_mix_and_a_batch_of_one_draw_nothing():
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    assert MIXES.get("none")(rng, 28, 1.0) == (1.0, None)
    assert rng.bit_generator.state == before
    for mix in MIXES.names():
        view = ViewSampler(seed=0, size=28, mix=mix).view(0, 0, torch.arange(1), 28, 28)
        assert (view.lam, view.cut_box) == (1.0, None)


def test_unknown_mix_lists_the_choices():
    with pytest.raises(FadrmError, match="^unknown mix 'cutout'; choose one of: cutmix, mixup, none$"):
        MIXES.get("cutout")
    with pytest.raises(FadrmError, match="unknown mix 'cutout'"):
        ViewSampler(seed=0, size=28, mix="cutout").view(0, 0, torch.arange(4), 28, 28)


def test_pad_crop_flip_batch_matches_shapes_and_range():
    spec = get_dataset_spec("cifar10")
    transform = train_transform(spec)
    batch = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    out = transform.batch(batch)
    assert out.shape == (5, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    # With zero padding a crop is the image or its mirror.
    transform.padding = 0
    out = transform.batch(batch)
    for image, aug in zip(batch.float() / 255, out):
        assert torch.equal(aug, image) or torch.equal(aug, image.flip(-1))


def test_a_view_sampler_from_an_evaluation_config_takes_its_view_settings():
    from fadrm.config import EvalConfig

    config = EvalConfig(distilled="d", seed=4, crop_scale=[0.5, 1.0], mix="mixup", mix_alpha=0.8, rand_augment=True)
    assert ViewSampler.from_config(config, 32) == ViewSampler(4, 32, (0.5, 1.0), "mixup", 0.8, True, True)


def test_a_batchs_views_are_drawn_in_a_fixed_number_of_operations_from_the_per_image_rule():
    """VIEWS_VERSION 2: a batch's crop boxes and flips come from one block of draws, so drawing the views of 128
    images dispatches as many operators as drawing those of 16; every box lies in the image, and the boxes follow
    the per-image rule's distribution (its mean area and the share of whole-width crops, over 20,000 draws);
    where no attempt fits, the largest central crop of the per-image rule."""
    from fadrm.augment import ViewSampler, random_resized_crop_box, random_resized_crop_boxes
    from fadrm.hostcost import CountHostCost

    sampler = ViewSampler(seed=3, size=28)
    counts = []
    for batch in (16, 128):
        with CountHostCost() as counted:
            view = sampler.view(0, 0, torch.arange(batch), 28, 28)
        counts.append(counted.cost.total)
        assert len(view.boxes) == len(view.flips) == batch
    assert counts[0] == counts[1] < 60
    again = sampler.view(0, 0, torch.arange(16), 28, 28)
    assert (
        again.boxes
        == sampler.view(0, 0, torch.arange(16), 28, 28).boxes
        != sampler.view(0, 1, torch.arange(16), 28, 28).boxes
    )

    together = random_resized_crop_boxes(torch.Generator().manual_seed(0), 20000, 28, 32)
    one_by_one = [random_resized_crop_box(torch.Generator().manual_seed(i), 28, 32) for i in range(20000)]
    assert all(0 <= t and t + h <= 28 and 0 <= left and left + w <= 32 for t, left, h, w in together)
    for boxes in (together,):
        mean_area = sum(h * w for _, _, h, w in boxes) / len(boxes) / (28 * 32)
        reference = sum(h * w for _, _, h, w in one_by_one) / len(one_by_one) / (28 * 32)
        assert abs(mean_area - reference) < 0.01
        whole = sum(w == 32 for *_, w in boxes) / len(boxes)
        assert abs(whole - sum(w == 32 for *_, w in one_by_one) / len(one_by_one)) < 0.01
    # A 4 x 200 image at 90-100% of its area fits no aspect in [3/4, 4/3]: the central crop, as one by one.
    assert (
        random_resized_crop_boxes(torch.Generator(), 3, 4, 200, (0.9, 1.0))
        == [random_resized_crop_box(torch.Generator(), 4, 200, (0.9, 1.0))] * 3
    )
