"""Datasets: the offline sets are real, split as documented, and shaped for their models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dfkd_common.data import get_dataset, load_split
from dfkd_common.errors import DfkdError


def test_mnist5k_split_is_first_400_and_last_100_per_class(mnist_train, mnist_test) -> None:
    assert mnist_train.images.shape == (4000, 1, 32, 32) and mnist_train.images.dtype == torch.uint8
    assert mnist_test.images.shape == (1000, 1, 32, 32)
    assert torch.bincount(mnist_train.labels).tolist() == [400] * 10
    assert torch.bincount(mnist_test.labels).tolist() == [100] * 10
    # real digits: dark background, bright strokes
    assert mnist_test.images.float().mean() < 60 and mnist_test.images.max() == 255
    assert not torch.equal(mnist_train.images[:100].float().mean(0), mnist_test.images[:100].float().mean(0))


def test_digits_resized_with_mnist_framing() -> None:
    tr, te = load_split("digits", "train"), load_split("digits", "test")
    assert tr.images.shape[1:] == (1, 28, 28)
    assert len(tr) + len(te) == 1797
    assert tr.images[:, :, :4].max() == 0  # 4-pixel empty frame like MNIST
    assert abs(len(te) / (len(tr) + len(te)) - 0.2) < 0.01


def test_info_knows_shape_classes_and_normalisation() -> None:
    info = get_dataset("cifar10").info
    assert (info.channels, info.image_size, info.num_classes) == (3, (32, 32), 10)
    assert info.shape == (3, 32, 32) and info.task == "classification"
    assert len(info.mean) == 3 and info.class_names[0] == "airplane"


def test_imagefolder(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for k, cls in enumerate(("cat", "dog")):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((40, 50, 3), 40 * k + i, np.uint8)).save(d / f"{i}.png")
    spec = get_dataset("imagefolder", root=tmp_path, image_size=16)
    split = spec.load("train")
    assert split.images.shape == (6, 3, 16, 16)
    assert split.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert spec.info.class_names == ("cat", "dog")


def test_imagefolder_without_train_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DfkdError, match="not a directory"):
        get_dataset("imagefolder", root=tmp_path)


def test_torchvision_datasets_on_disk_load_offline_and_a_missing_one_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CIFAR in torchvision's own layout is read by torchvision's loader without the network; offline, a missing
    dataset names the folder to put it in."""
    import torchvision.datasets
    import torchvision.datasets.cifar as tv_cifar
    from cifar_layout import write_cifar10

    write_cifar10(tmp_path / "data", per_class=3, test_per_class=2)
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)  # the fixture is not the real data
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)

    def offline(self: object) -> None:
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    test = get_dataset("cifar10").load("test", tmp_path / "data")
    assert test.images.shape == (20, 3, 32, 32) and torch.bincount(test.labels).tolist() == [2] * 10
    with pytest.raises(DfkdError, match=rf"CIFAR100 is not in {tmp_path / 'empty'}/cifar-100-python and could not be "
                                        r"downloaded \(<urlopen error .*\): put torchvision's CIFAR100 files there"):
        get_dataset("cifar100").load("test", tmp_path / "empty")
