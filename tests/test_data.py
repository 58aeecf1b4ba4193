"""Each dataset format loads through the registry, from fixtures in its real on-disk layout."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fadrm.augment import train_transform
from fadrm.data import DATASETS, eval_transform, get_dataset_spec, load_split
from fadrm.data.specs import IMAGENETTE_CLASSES, IMAGEWOOF_CLASSES
from fadrm.errors import FadrmError

from conftest import write_image_folder


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(FadrmError, match="choose one of: .*fashion-mnist"):
        get_dataset_spec("mnist-fashion")


def test_fashion_mnist_idx(fmnist_root):
    spec = get_dataset_spec("fashion-mnist")
    train = load_split(spec, "train", fmnist_root)
    val = load_split(spec, "val", fmnist_root)
    assert len(train) == 160 and len(val) == 40
    assert train.classes[0] == "T-shirt/top" and train.targets[:17] == [0] * 16 + [1]
    image, label = train[20]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == 1
    assert train.indices_of_class(3) == list(range(48, 64))


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(), reason="Debian dataset not installed")
def test_fashion_mnist_debian_package():
    spec = get_dataset_spec("fashion-mnist")
    train, val = load_split(spec, "train"), load_split(spec, "val")
    assert (len(train), len(val)) == (60000, 10000)
    assert sorted(set(val.targets)) == list(range(10))


@pytest.mark.parametrize("name,count,prefix", [("cifar10", 50, "c10_"), ("cifar100", 100, "c100_")])
def test_cifar_pickles(cifar_root, name, count, prefix):
    spec = get_dataset_spec(name)
    train = load_split(spec, "train", cifar_root)
    assert len(train) == count and train.classes[1] == f"{prefix}1"
    assert train.load(0).shape == (3, 32, 32)
    # Pointing at the batch folder itself works too.
    folder = cifar_root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    assert len(load_split(spec, "val", folder)) > 0


class _RunsCode:
    """What a hostile pickle holds: unpickling it calls ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_cifar_pickle_that_would_run_code_is_refused_unrun(cifar_root, tmp_path):
    import pickle
    import shutil

    import numpy as np

    root = tmp_path / "cifar"
    shutil.copytree(cifar_root / "cifar-10-batches-py", root / "cifar-10-batches-py")
    marker = tmp_path / "ran"
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({"data": _RunsCode(marker), "labels": [0]}))
    with pytest.raises(FadrmError, match=r"data_batch_3 \(it refers to posix\.system, which a CIFAR batch never holds"):
        load_split(get_dataset_spec("cifar10"), "train", root)
    assert not marker.exists()
    # The shapes a CIFAR batch is written in load: Python 2's numpy.core names, protocols 2 to 5, bytes.
    for protocol in (2, 4, 5):
        data = np.arange(3 * 32 * 32, dtype=np.uint8).reshape(1, -1)
        raw = pickle.dumps({"data": data, "labels": [4], "batch_label": b"x"}, protocol=protocol)
        if protocol == 2:  # unframed: the module's name can be spelt as Python 2 and numpy 1 wrote it
            raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        batch.write_bytes(raw)
        train = load_split(get_dataset_spec("cifar10"), "train", root)
        # data_batch_1 and 2 hold ten images each: this batch's one is the 21st.
        assert torch.equal(train.load(20).flatten(), torch.from_numpy(data[0])) and train.targets[20] == 4
    batch.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(FadrmError, match="data_batch_3 holds a list, not a batch"):
        load_split(get_dataset_spec("cifar10"), "train", root)


@pytest.mark.parametrize(
    "images_shape,labels,message",
    [
        (
            (10, 32, 32),
            list(range(10)),
            r"the train images are 1 x 32 x 32 \(channels x height x width\); fashion-mnist's are 1 x 28 x 28",
        ),
        ((10, 28, 28), [0] * 9 + [200], "the train labels run from 0 to 200, but fashion-mnist has 10 classes"),
        ((0, 28, 28), [], "holds no train images of fashion-mnist"),
    ],
)
def test_idx_files_that_are_not_the_datasets_are_refused(tmp_path, images_shape, labels, message):
    """IDX headers that disagree with the dataset (another size, labels past its classes) used to
    distil and evaluate garbage with exit 0."""
    import numpy as np

    from conftest import write_idx

    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros(images_shape, dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array(labels, dtype=np.uint8))
    with pytest.raises(FadrmError, match=message):
        load_split(get_dataset_spec("fashion-mnist"), "train", tmp_path)


def test_tiny_imagenet_layout(tiny_imagenet_root):
    spec = replace(get_dataset_spec("tiny-imagenet"), num_classes=3)
    train = load_split(spec, "train", tiny_imagenet_root)
    val = load_split(spec, "val", tiny_imagenet_root)
    assert train.classes == sorted(train.classes)  # label = position in sorted wnids
    assert len(train) == 9 and len(val) == 3
    assert val.targets == [0, 1, 2]
    assert train[0][0].shape == (3, 64, 64)


def test_imagenette_order_and_imagenet_mapping(imagenette_root):
    spec = get_dataset_spec("imagenette")
    train = load_split(spec, "train", imagenette_root)
    assert train.classes == sorted(c[0] for c in IMAGENETTE_CLASSES)
    assert spec.imagenet_indices == (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)
    assert spec.display_names[0] == "tench" and spec.display_names[-1] == "parachute"
    woof = get_dataset_spec("imagewoof")
    assert woof.imagenet_indices == tuple(c[2] for c in IMAGEWOOF_CLASSES)
    assert [c[0] for c in IMAGEWOOF_CLASSES] == sorted(c[0] for c in IMAGEWOOF_CLASSES)
    image, _ = train[0]
    assert image.shape == (3, 40, 40)
    train.transform = train_transform(spec)
    assert train[0][0].shape == (3, 224, 224)
    train.transform = eval_transform(spec)
    assert train[0][0].shape == (3, 224, 224)


def test_imagenette_wrong_folders_is_a_clear_error(tmp_path):
    write_image_folder(tmp_path, [f"class{i}" for i in range(10)], 1)
    with pytest.raises(FadrmError, match="class folders .* do not match"):
        load_split(get_dataset_spec("imagenette"), "train", tmp_path)


def test_generic_imagefolder(tmp_path):
    write_image_folder(tmp_path, ["zebra", "apple", "mango"], 2)
    train = load_split(get_dataset_spec("imagefolder"), "train", tmp_path)
    assert train.classes == ["apple", "mango", "zebra"] and len(train) == 6


def test_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(FadrmError, match="does not exist"):
        load_split(get_dataset_spec("cifar10"), "train", tmp_path / "nowhere")
    with pytest.raises(FadrmError, match="needs --data-root"):
        load_split(get_dataset_spec("cifar100"), "train")
    with pytest.raises(FadrmError, match="not found"):
        load_split(get_dataset_spec("fashion-mnist"), "train", tmp_path)


def test_corrupt_image_names_the_file(tmp_path):
    write_image_folder(tmp_path, ["a", "b"], 1)
    bad = tmp_path / "train" / "a" / "img_0.png"
    bad.write_bytes(b"not a png")
    train = load_split(get_dataset_spec("imagefolder"), "train", tmp_path)
    with pytest.raises(FadrmError, match="cannot read image .*img_0.png"):
        train[0]


def test_every_spec_has_a_preset():
    from fadrm.config import preset_names

    assert set(DATASETS.names()) <= set(preset_names())


def test_holdout_split_never_touches_the_test_set(fmnist_root):
    spec = get_dataset_spec("fashion-mnist")
    train = load_split(spec, "train", fmnist_root, holdout=3)
    val = load_split(spec, "val", fmnist_root, holdout=3)
    full = load_split(spec, "train", fmnist_root)
    assert len(train) == 130 and len(val) == 30 and val.targets.count(4) == 3
    # val is the last three training images of each class; train is the rest, disjoint.
    assert torch.equal(val.load(0), full.load(13)) and torch.equal(train.load(13), full.load(16))
    with pytest.raises(FadrmError, match="without training images"):
        load_split(spec, "train", fmnist_root, holdout=16)


def test_a_datasets_digest_reads_only_new_or_changed_files(tmp_path, monkeypatch):
    """data_digest covers every file's bytes; its cache (by size and time) spares reading an unchanged file
    again, and a changed one is read and changes the digest."""
    import os

    import fadrm.data.digest as digest_module

    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.bin", "b.bin"):
        (data / name).write_bytes(name.encode() * 100)
    read: list[str] = []
    real = digest_module.sha256_file
    monkeypatch.setattr(digest_module, "sha256_file", lambda path: read.append(path.name) or real(path))
    first = digest_module.data_digest(data, tmp_path / "cache", print)
    assert sorted(read) == ["a.bin", "b.bin"]
    read.clear()
    assert digest_module.data_digest(data, tmp_path / "cache", print) == first and read == []
    (data / "b.bin").write_bytes(b"other bytes")
    os.utime(data / "b.bin", ns=(1, 1))
    assert digest_module.data_digest(data, tmp_path / "cache", print) != first and read == ["b.bin"]
