"""Sets made by other tools: plain ImageFolders evaluated with --dataset and --teacher, their class
folders matched to the dataset's classes, and every bad input refused in one line."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fadrm
from fadrm.distilled import DistilledSet, open_evaluated_set
from fadrm.data.foreign import ImageFolderSet, class_of_folders
from fadrm.data import get_dataset_spec, load_split
from fadrm.data.specs import FASHION_MNIST_CLASSES, IMAGENETTE_CLASSES
from fadrm.errors import FadrmError

from conftest import run_cli

SPEC = get_dataset_spec("fashion-mnist")
QUICK = dict(epochs=2, batch_size=8, device="cpu", amp="off", workers=0)
# Folder names as other tools write them: loose forms of the class names, in an order unlike the labels'.
FOLDER_NAMES = [
    "t-shirt top",
    "TROUSER",
    "Pullover",
    "dress",
    "Coat",
    "Sandal",
    "Shirt",
    "sneaker",
    "Bag",
    "Ankle_boot",
]


def write_fmnist_folder(root: Path, fmnist_root: Path, per_class: int = 2) -> Path:
    """An ImageFolder of real Fashion-MNIST fixture images, class folders named as in FOLDER_NAMES."""
    train = load_split(SPEC, "train", fmnist_root)
    for label, name in enumerate(FOLDER_NAMES):
        (root / name).mkdir(parents=True)
        for k, index in enumerate(train.indices_of_class(label)[:per_class]):
            Image.fromarray(train.load(index)[0].numpy()).save(root / name / f"img{k}.png")
    return root


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width`` x ``height`` grey pixels but holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture
def no_curves(monkeypatch):
    """Skip drawing curves.png (seconds of matplotlib per evaluation; not what these tests check)."""
    monkeypatch.setattr("fadrm.report.plot_curves", lambda path, runs: False)


# ------------------------------------------------------------------ matching
def test_class_folders_match_by_name_loosely_by_wnid_and_as_fadrm_writes_them():
    assert class_of_folders(FOLDER_NAMES, FASHION_MNIST_CLASSES) == {name: i for i, name in enumerate(FOLDER_NAMES)}
    # fadrm's own layout (index and name must agree), and names that are no class.
    assert class_of_folders(["003_Dress", "004_Dress", "boots"], FASHION_MNIST_CLASSES) == {
        "003_Dress": 3,
        "004_Dress": None,
        "boots": None,
    }
    wnids, display = [c[0] for c in IMAGENETTE_CLASSES], [c[1] for c in IMAGENETTE_CLASSES]
    assert class_of_folders(["n03888605", "tench", "english_springer"], wnids, display) == {
        "n03888605": 9,
        "tench": 0,
        "english_springer": 1,
    }
    # Loosely only where no two classes share the loose form; exactly always.
    assert class_of_folders(["CAT", "cat", "Dog"], ["Cat", "cat", "dog"]) == {"CAT": None, "cat": 1, "Dog": 2}


def test_numbered_class_folders_are_class_indices_only_when_unambiguous():
    # RDED's 00000 and SRe2L's / the FADRM reference's new000: the index in the dataset's label order.
    assert class_of_folders(["00007", "00000"], FASHION_MNIST_CLASSES) == {"00007": 7, "00000": 0}
    assert class_of_folders(["new001", "new010"], FASHION_MNIST_CLASSES) == {"new001": 1, "new010": None}
    # A folder named by class name means names: the numbers are then no class.
    assert class_of_folders(["Bag", "00001"], FASHION_MNIST_CLASSES) == {"Bag": 8, "00001": None}
    assert class_of_folders(["0", "1"], ["0", "1"]) == {"0": 0, "1": 1}  # the names themselves
    with pytest.raises(FadrmError, match="ambiguous where class names are numbers too"):
        class_of_folders(["00000", "00001"], ["0", "1"])


def test_a_foreign_set_reads_folders_as_the_dataset_classes(fmnist_root, tmp_path):
    root = write_fmnist_folder(tmp_path / "set", fmnist_root)
    (root / ".DS_Store").write_bytes(b"\0\1")  # hidden files and files beside the classes are ignored
    (root / "Bag" / ".DS_Store").write_bytes(b"\0\1")
    (root / "README.txt").write_text("made by another tool\n")
    os.remove(root / "Coat" / "img1.png")  # classes may hold different numbers of images
    (root / "Bag" / "img2.png").symlink_to(root / "Bag" / "img0.png")  # a link within the set is followed
    foreign = open_evaluated_set(root, "fashion-mnist", str(fmnist_root), ["t.pt"])
    assert isinstance(foreign, ImageFolderSet) and foreign.class_names == list(FASHION_MNIST_CLASSES)
    assert (foreign.method, foreign.holdout, foreign.teachers) == ("imagefolder", 0, [])
    assert foreign.images_per_class == (1, 3) and foreign.ipc == 2  # 20 images in 10 classes
    assert "20 images, 1 to 3 per class, IPC 2 on average" in foreign.describe()
    images, labels = foreign.images()
    assert images.shape == (20, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 5, 6, 6, 7, 7, 8, 8, 8, 9, 9]
    train = load_split(SPEC, "train", fmnist_root)
    assert torch.equal(images[8], train.load(train.indices_of_class(4)[0]))  # exactly the stored pixels
    # The id follows the content: the same bytes give the same id, one changed pixel another.
    first = foreign.set_id()
    assert open_evaluated_set(root, "fashion-mnist", str(fmnist_root), ["t.pt"]).set_id() == first
    (root / "dress" / "img0.png").rename(root / "dress" / "a.png")  # same place in the order
    assert open_evaluated_set(root, "fashion-mnist", str(fmnist_root), ["t.pt"]).set_id() == first
    pixels = np.asarray(Image.open(root / "Pullover" / "img0.png")).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(root / "Pullover" / "img0.png")
    assert open_evaluated_set(root, "fashion-mnist", str(fmnist_root), ["t.pt"]).set_id() != first


def test_channels_grey_rgb_with_equal_channels_and_grey_in_an_rgb_dataset(imagenette_root, tmp_path):
    root = tmp_path / "nette"
    rng = np.random.default_rng(0)
    for label, (wnid, name, _) in enumerate(IMAGENETTE_CLASSES):
        folder = root / (name if label < 2 else wnid)  # display names and WordNet ids alike
        folder.mkdir(parents=True)
        pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        Image.fromarray(pixels[..., 0] if label == 5 else pixels).save(folder / "x.png")
    foreign = open_evaluated_set(root, "imagenette", str(imagenette_root), ["resnet18:IMAGENET1K_V1"])
    images, labels = foreign.images()
    assert images.shape == (10, 3, 224, 224) and labels.tolist() == list(range(10))
    assert torch.equal(images[5][0], images[5][1]) and torch.equal(images[5][1], images[5][2])  # grey copied
    grey = tmp_path / "grey.png"  # RGB with three equal channels reads as grey, exactly
    value = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(np.repeat(value[..., None], 3, axis=2)).save(grey)
    from fadrm.data.foreign import read_set_image

    assert torch.equal(read_set_image(grey, SPEC), torch.from_numpy(value)[None])


# -------------------------------------------------------------- evaluation
def _export(distilled: Path, root: Path) -> Path:
    """Our set's images as another tool would publish them: class folders by name, no manifest."""
    manifest_set = DistilledSet.open(distilled)
    for record in manifest_set.manifest["images"]:
        target = root / FOLDER_NAMES[record["class"]] / Path(record["file"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(distilled / record["file"], target)
    return root


def test_our_set_as_an_image_folder_trains_the_same_students(distilled, fmnist_root, teacher_ckpt, tmp_path, no_curves):
    exported = _export(distilled, tmp_path / "exported")
    ours, foreign = DistilledSet.open(distilled), open_evaluated_set(exported, "fashion-mnist", str(fmnist_root), ["t"])
    assert all(torch.equal(a, b) for a, b in zip(ours.images(), foreign.images()))
    common = dict(data_root=str(fmnist_root), log=lambda s: None, **QUICK)
    through_manifest = fadrm.evaluate(distilled, out=str(tmp_path / "a"), **common)
    as_folder = fadrm.evaluate(
        exported, out=str(tmp_path / "b"), dataset="fashion-mnist", teachers=[str(teacher_ckpt)], **common
    )
    (a,), (b,) = through_manifest["runs"], as_folder["runs"]
    assert a["history"] == b["history"] and (a["top1"], a["top5"]) == (b["top1"], b["top5"])
    assert as_folder["method"] == "imagefolder" and as_folder["ipc"] == 2 and as_folder["images_per_class"] == [2, 2]


@pytest.mark.slow
def test_a_foreign_set_gets_baselines_stored_labels_and_resumes_by_content(
    fmnist_root, teacher_ckpt, tmp_path, no_curves
):
    root = write_fmnist_folder(tmp_path / "set", fmnist_root)
    # Results in the set's own eval/ (the default), which is no class when the set is read again.
    options = dict(
        dataset="fashion-mnist",
        teachers=[str(teacher_ckpt)],
        data_root=str(fmnist_root),
        labels="stored",
        **{**QUICK, "epochs": 1},
    )
    results = fadrm.evaluate(root, baselines=["random-real"], log=lambda s: None, **options)
    kinds = [(r["train_set"], r["labels"], r["images"]) for r in results["runs"]]
    assert kinds == [("distilled", "soft", 20), ("random-real", "soft", 20), ("random-real", "hard", 20)]
    assert results["stored_labels"]["bytes_per_image_per_epoch"] == 20 and results["images_per_class"] == [2, 2]
    assert "# imagefolder on fashion-mnist, IPC 2" in (root / "eval" / "results.md").read_text()
    lines: list[str] = []
    fadrm.evaluate(root, baselines=["random-real"], log=lines.append, **options)
    assert sum("reusing" in line for line in lines) == 3
    # Another image under the same file name: neither the stored labels nor the finished run fit.
    shutil.copyfile(root / "Bag" / "img1.png", root / "Bag" / "img0.png")
    # The evaluation's own store is made again (the stale one kept aside); a store given by --labels-dir is
    # the user's: refused.
    with pytest.raises(FadrmError, match=r"label store .* different settings \(distilled_set\)"):
        fadrm.evaluate(root, labels_dir=str(root / "eval" / "labels"), log=lambda s: None, **options)
    lines.clear()
    fadrm.evaluate(root, log=lines.append, **options)
    assert not any("reusing" in line for line in lines)
    assert any("made for other inputs (distilled_set)" in line for line in lines)
    assert (root / "eval" / "labels.stale").is_dir()


# -------------------------------------------------------- bad input, one line


def _break(case: str, root: Path, tmp_path: Path) -> str:
    """Spoil a valid set in one way; returns what the one line must say."""
    image = root / "Bag" / "img0.png"
    if case == "missing class":
        shutil.rmtree(root / "Bag")
        return "has no folder for 1 of the 10 fashion-mnist classes: 'Bag'"
    if case == "extra folder":
        shutil.copytree(root / "Bag", root / "bags")
        return "holds folders that are no fashion-mnist class: 'bags'"
    if case == "two folders, one class":
        shutil.copytree(root / "Bag", root / "bag")
        return "folders 'Bag', 'bag' hold the same fashion-mnist class 'Bag'"
    if case == "empty class folder":
        for path in (root / "Coat").iterdir():
            path.unlink()
        (root / "Coat" / ".DS_Store").write_bytes(b"\0")
        return "class folders of"
    if case == "wrong size":
        Image.new("L", (32, 30)).save(image)
        return f"{image} is 32 x 30 px; fashion-mnist images are 28 x 28 and nothing is resized"
    if case == "huge header, not decoded":  # below PIL's own limit: our size check, before decoding
        png_header(image, 9000, 9000)
        return f"{image} is 9000 x 9000 px"
    if case == "decompression bomb":  # beyond twice PIL's limit: PIL's error, as our line
        png_header(image, 20000, 20000)
        return f"{image} is too large to decode safely"
    if case == "not an image":
        (root / "Bag" / "notes.txt").write_text("not an image\n")
        return f"cannot read {root / 'Bag' / 'notes.txt'} as an image"
    if case == "truncated image":
        image.write_bytes(image.read_bytes()[:60])
        return f"cannot read {image} as an image"
    if case == "link outside the set":
        outside = tmp_path / "elsewhere.png"
        shutil.move(image, outside)
        image.symlink_to(outside)
        return f"{image} is a symbolic link to {outside}, outside {root}; links out of the set are not followed"
    if case == "folder in a class folder":
        (root / "Bag" / "more").mkdir()
        return f"{root / 'Bag' / 'more'} is a folder inside a class folder"
    if case == "colour in a grey dataset":
        pixels = np.zeros((28, 28, 3), dtype=np.uint8)
        pixels[..., 0] = 200
        Image.fromarray(pixels).save(image)
        return f"{image} is a colour image; fashion-mnist is greyscale"
    if case == "transparent pixels":
        Image.new("LA", (28, 28), (100, 0)).save(image)
        return f"{image} has transparent pixels"
    if case == "16-bit":
        Image.new("I;16", (28, 28), 1000).save(image)
        return f"{image} has image mode I;16; give 8-bit grey or RGB images"
    raise AssertionError(case)


BAD_SETS = [
    "missing class",
    "extra folder",
    "two folders, one class",
    "empty class folder",
    "wrong size",
    "huge header, not decoded",
    "decompression bomb",
    "not an image",
    "truncated image",
    "link outside the set",
    "folder in a class folder",
    "colour in a grey dataset",
    "transparent pixels",
    "16-bit",
]


@pytest.mark.filterwarnings("error")  # a warning would be a second line in a real process
@pytest.mark.parametrize("case", BAD_SETS)
def test_a_bad_set_is_one_line_before_any_work(case, fmnist_root, teacher_ckpt, tmp_path, capsys):
    root = write_fmnist_folder(tmp_path / "set", fmnist_root, per_class=1)
    expected = _break(case, root, tmp_path)
    out = tmp_path / "eval"
    code, _, lines = run_cli(
        [
            "evaluate",
            str(root),
            "--dataset",
            "fashion-mnist",
            "--teacher",
            str(teacher_ckpt),
            "--data-root",
            str(fmnist_root),
            "--epochs",
            "1",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fadrm: error: "), lines
    assert expected in lines[0], lines
    assert not out.exists()


def test_options_a_foreign_set_needs_are_one_line(distilled, fmnist_root, teacher_ckpt, tmp_path, capsys):
    root = write_fmnist_folder(tmp_path / "set", fmnist_root, per_class=1)
    evaluate = ["evaluate", str(root), "--data-root", str(fmnist_root), "--print-config"]
    cases = [
        (
            evaluate,
            f"{root} is not a distilled set (no manifest.json); make one with fadrm distill, or evaluate an "
            "ImageFolder made by another tool with --dataset and --teacher",
        ),
        ([*evaluate, "--dataset", "fashion-mnist"], "so no teachers of its own to label its images: give --teacher"),
        ([*evaluate, "--dataset", "mnist", "--teacher", str(teacher_ckpt)], "--dataset must be one of"),
        (
            ["evaluate", str(distilled), "--dataset", "cifar10", "--print-config"],
            f"--dataset cifar10 disagrees with {distilled}, a set of fashion-mnist",
        ),
    ]
    for argv, message in cases:
        code, _, lines = run_cli(argv, capsys)
        assert code == 2 and len(lines) == 1 and message in lines[0], (argv, lines)
    # With a manifest, --dataset may name the set's own dataset; without --print-config nothing differs.
    code, _, _ = run_cli(["evaluate", str(distilled), "--dataset", "fashion-mnist", "--print-config"], capsys)
    assert code == 0
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "run.json").write_text("{}")
    code, _, lines = run_cli([*evaluate[:1], str(tmp_path / "unfinished"), "--dataset", "fashion-mnist"], capsys)
    assert code == 2 and "an unfinished fadrm distill run" in lines[0]


@pytest.mark.slow
def test_a_decompression_bomb_warning_is_one_line_in_a_real_process(fmnist_root, teacher_ckpt, tmp_path):
    root = write_fmnist_folder(tmp_path / "set", fmnist_root, per_class=1)
    image = png_header(root / "Coat" / "img0.png", 10000, 10000)  # over PIL's limit, under twice it: a warning
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(fadrm.__file__).parents[1]), *sys.path])}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fadrm",
            "evaluate",
            str(root),
            "--dataset",
            "fashion-mnist",
            "--teacher",
            str(teacher_ckpt),
            "--data-root",
            str(fmnist_root),
            "--out",
            str(tmp_path / "eval"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"fadrm: error: {image} is too large to decode safely (Image size (100000000 pixels) exceeds limit of "
        "89478485 pixels, could be decompression bomb DOS attack.); fashion-mnist images are 28 x 28 px"
    ]
    assert not (tmp_path / "eval").exists()
