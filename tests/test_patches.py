"""Patch scoring: RDED's zero-padded canvas versus upsampling, with hand-computed answers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from fadrm.config import PatchConfig
from fadrm.data import TensorImageDataset
from fadrm.errors import FadrmError
from fadrm.runtime import make_runtime
from fadrm.synthesis.patches import SCORING_INPUTS, band_start, pad_to_canvas, select_class_patches, stitch

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
SIZE = 8  # teacher input; factor 2 gives 4 x 4 crops centred at rows/cols 2..5


def grey_dataset(levels: list[int], size: int = 16) -> TensorImageDataset:
    """Class 0 only: image i is a constant grey ``levels[i]``, so every crop of it is that grey too."""
    images = torch.stack([torch.full((3, size, size), level, dtype=torch.uint8) for level in levels])
    return TensorImageDataset(images, [0] * len(levels), ["grey", "other"])


def normalised(level: int) -> float:
    return (level / 255 - MEAN[0]) / STD[0]


class MaskTeacher(nn.Module):
    """Two classes; the true-class logit is ``scale * sum(input * mask) / C``, the other logit 0.

    The mask is +1 on the centre 4 x 4 (16 pixels) and -1 on the 48 border pixels.
    A grey crop of normalised value v therefore gets logit 16 * scale * v when padded
    (the border is 0) and (16 - 48) * scale * v = -32 * scale * v when upsampled:
    the two scorings rank crops in opposite orders.
    """

    def __init__(self, scale: float = 0.05) -> None:
        super().__init__()
        mask = -torch.ones(SIZE, SIZE)
        mask[2:6, 2:6] = 1
        self.register_buffer("mask", mask)
        self.scale = scale
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        true = self.scale * (x * self.mask).sum(dim=(1, 2, 3)) / x.shape[1]
        return torch.stack([true, torch.zeros_like(true)], dim=1)


def select(dataset, teacher, scoring: str, factor: int, ipc: int = 1, size: int = SIZE, seed: int = 0):
    settings = PatchConfig(mipc=len(dataset), num_crop=2, factor=factor, scoring=scoring)
    return select_class_patches(
        dataset,
        0,
        ipc,
        teacher,
        MEAN,
        STD,
        size,
        settings,
        torch.Generator().manual_seed(seed),
        make_runtime("cpu", "off", channels_last=False),
    )


LEVELS = [0, 32, 64, 96, 128, 160, 192, 224]  # image i has grey LEVELS[i]


@pytest.mark.parametrize(
    "scoring, logit_per_v, expected",
    [("pad", 16 * 0.05, [7, 6, 5, 4]), ("resize", -32 * 0.05, [0, 1, 2, 3])],
)
def test_pad_and_resize_pick_the_hand_computed_crops(scoring, logit_per_v, expected):
    images, record = select(grey_dataset(LEVELS), MaskTeacher(), scoring, factor=2)
    # Loss on the true class with logits [z, 0] is log(1 + exp(-z)), smallest first ("easy").
    assert record["source_indices"] == expected
    want = [math.log1p(math.exp(-logit_per_v * normalised(LEVELS[i]))) for i in expected]
    assert record["scores"] == pytest.approx(want, abs=1e-5)
    # The stitched image holds the chosen greys, patch k of the band in quadrant k (row-major).
    quadrants = [images[0, :, r : r + 4, c : c + 4] for r in (0, 4) for c in (0, 4)]
    for quadrant, i in zip(quadrants, expected):
        assert torch.allclose(quadrant, torch.full_like(quadrant, LEVELS[i] / 255), atol=1e-6)


def test_padded_scoring_input_is_the_patch_centred_on_a_mean_canvas():
    teacher = MaskTeacher()
    select(grey_dataset([200] * 4), teacher, "pad", factor=2)
    scored = torch.cat(teacher.inputs)
    canvas = torch.zeros(len(scored), 3, SIZE, SIZE)  # zero after normalising = the dataset mean colour
    canvas[:, :, 2:6, 2:6] = normalised(200)
    assert torch.allclose(scored, canvas, atol=1e-6)


def test_pad_places_the_patch_like_rded_with_odd_remainder_bottom_right():
    patch = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4) + 1
    canvas = torch.zeros(1, 2, 9, 9)
    canvas[:, :, 2:6, 2:6] = patch  # (9 - 4) // 2 = 2 above/left, 3 below/right
    assert torch.equal(pad_to_canvas(patch, 9), canvas)
    assert torch.equal(SCORING_INPUTS.get("pad")(patch, 4), patch)


def test_odd_image_size_scores_the_padded_canvas_end_to_end():
    teacher = MaskTeacher()
    teacher.mask = torch.ones(9, 9)
    select(grey_dataset([40] * 4), teacher, "pad", factor=2, size=9)
    scored = torch.cat(teacher.inputs)
    canvas = torch.zeros(len(scored), 3, 9, 9)
    canvas[:, :, 2:6, 2:6] = normalised(40)
    assert torch.allclose(scored, canvas, atol=1e-6)


def test_factor_one_gives_identical_selections_under_both_scorings():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8)
    dataset = TensorImageDataset(images, [0] * 6, ["noise", "other"])
    runs = {}
    for scoring in SCORING_INPUTS.names():
        teacher = MaskTeacher()
        chosen, record = select(dataset, teacher, scoring, factor=1, ipc=2)
        runs[scoring] = (chosen, record, torch.cat(teacher.inputs))
    (pad_images, pad_record, pad_inputs), (rs_images, rs_record, rs_inputs) = runs["pad"], runs["resize"]
    assert pad_record == rs_record
    assert torch.equal(pad_images, rs_images)
    assert torch.equal(pad_inputs, rs_inputs)


def test_unknown_scoring_is_a_one_line_error_listing_the_choices():
    with pytest.raises(FadrmError) as caught:
        SCORING_INPUTS.get("stretch")
    message = str(caught.value)
    assert "\n" not in message and "pad" in message and "resize" in message and "stretch" in message


def test_band_start_golden():
    # 10 scored crops, 4 needed: 6 to spare. easy keeps the lowest losses, hard the highest,
    # medium the centre; a quantile q starts at round(q * spare) (Python's round: 1.5 -> 2).
    starts = [band_start(10, 4, d) for d in ("easy", "medium", "hard", "0.5", "0.25", "1", "0")]
    assert starts == [0, 3, 6, 3, 2, 6, 0]
    with pytest.raises(FadrmError, match=r"--difficulty must be easy, medium, hard or a number in \[0, 1\], got 'x'"):
        band_start(10, 4, "x")


def test_stitch_golden():
    # 8 patches of constant value k, factor 2: image i holds patches i, n+i, 2n+i, 3n+i (n = 2)
    # in its top-left, top-right, bottom-left and bottom-right quadrants.
    patches = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 2, 2)
    images = stitch(patches, 2)
    assert images.shape == (2, 1, 4, 4)
    quadrants = [[images[i, 0, r, c].item() for r, c in ((0, 0), (0, 2), (2, 0), (2, 2))] for i in range(2)]
    assert quadrants == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert torch.equal(stitch(patches, 1), patches)


def test_loader_workers_crop_the_same_selection_as_loading_one_by_one(tiny_imagenet_root):
    # JPEG files (a FileImageDataset): decoding, cropping and resizing in loader processes must not
    # change what is chosen.
    from dataclasses import replace

    from fadrm.data import get_dataset_spec, load_split
    from fadrm.models import build_model
    from fadrm.seeding import make_generator
    from fadrm.synthesis.patches import (
        cropped_in_order,
        decode_workers,
        draw_crop_boxes,
        image_sizes,
        patch_candidates,
        select_from_crops,
    )

    spec = replace(get_dataset_spec("tiny-imagenet"), num_classes=3)
    train = load_split(spec, "train", tiny_imagenet_root)
    assert train.decodes_files and decode_workers(train, 3) == 3 and decode_workers(train, 0) == 0
    assert image_sizes(train, [0, 4], 2) == [(64, 64), (64, 64)] == [train.size_of(0), tuple(train.load(4).shape[1:])]
    torch.manual_seed(0)
    teacher = build_model("convnet-small", 3, 3, 64, width=4).eval()
    settings = PatchConfig(mipc=3, num_crop=2, factor=1)
    runtime = make_runtime("cpu", "off")
    args = (teacher, spec.mean, spec.std, 64, settings)
    one_by_one = [
        select_class_patches(train, label, 1, *args, make_generator(0, "p", label), runtime) for label in range(3)
    ]
    for workers in (0, 2):
        generators = [make_generator(0, "p", label) for label in range(3)]
        candidates = [
            patch_candidates(train.indices_of_class(label), label, train.classes[label], 1, settings, generators[label])
            for label in range(3)
        ]
        order = [i for c in candidates for i in c]
        sizes = iter(image_sizes(train, order, workers))
        boxes = [
            draw_crop_boxes(next(sizes), settings, generators[label]) for label in range(3) for _ in candidates[label]
        ]
        crops = cropped_in_order(train, order, boxes, 64, workers)
        for label in range(3):
            images, record = select_from_crops(
                candidates[label], itertools.islice(crops, len(candidates[label])), label, 1, *args, runtime
            )
            assert torch.equal(images, one_by_one[label][0]) and record == one_by_one[label][1], (workers, label)


def test_distill_workers_option_is_checked(fmnist_root, teacher_ckpt, tmp_path):
    import fadrm

    with pytest.raises(FadrmError, match="workers"):
        fadrm.distill(
            "fashion-mnist",
            [teacher_ckpt],
            tmp_path / "x",
            method="rded",
            ipc=1,
            workers=-1,
            data_root=str(fmnist_root),
            log=lambda line: None,
        )


@pytest.mark.parametrize("cores, files, expected", [(16, True, 16), (2, True, 0), (16, False, 0)])
def test_default_decoding_processes(monkeypatch, cores, files, expected):
    import fadrm.synthesis.patches as patches

    monkeypatch.setattr(patches, "available_cores", lambda: cores)
    dataset = grey_dataset([10, 20])
    monkeypatch.setattr(dataset, "decodes_files", files)
    assert patches.decode_workers(dataset, None) == expected
