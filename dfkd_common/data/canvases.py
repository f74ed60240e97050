"""``mnist5k-seg``: an offline semantic segmentation dataset from real images, the segmentation task's default data.

Each 64x64 canvas is a crop of one of the photos installed with scikit-image and scikit-learn (grey), with one to
four real MNIST digits of mnist5k composited onto it: each digit scaled to a side of 20-36 pixels, placed at
random (digits may overlap and leave the canvas in part; a later one covers an earlier one), inked dark on a
light background and light on a dark one (by the mean of the photo under it), so that neither intensity nor
position tells a digit from the background; only its shape does. The mask labels every pixel of a digit's stroke,
dilated by one pixel, with the digit's class + 1 (``"0"`` is class 1, ...), the rest ``background`` (class 0):
11 classes. Training canvases use only the training digits, test canvases only the test digits, so no test
digit is ever seen in training. Both splits are made the same way on every load (seeds 0 and 1): 4,000 and
1,000 canvases, as many as mnist5k's digits.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dfkd_common.data.datasets import DATASETS, DIGIT_NAMES, DatasetInfo, DatasetSpec, get_dataset

SIZE = 64
CLASSES = ("background", *DIGIT_NAMES)
#: the canvases' pixel statistics (both splits, as made here), for the models' input normalisation
MEAN, STD = (0.4483,), (0.2470,)


def composite(photos: torch.Tensor, digits: torch.Tensor, labels: torch.Tensor, n: int, seed: int,
              size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` canvases (uint8 (n, 1, size, size)) and masks (uint8 (n, size, size)) from background crops
    ``photos`` (uint8 (m, 1, size, size)) and ``digits`` (uint8 (k, 1, 28, 28)) with their ``labels``."""
    rng = np.random.default_rng(seed)
    canvases = photos[torch.from_numpy(rng.integers(len(photos), size=n))].float().div(255)
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    for i in range(n):
        for _ in range(int(rng.integers(1, 5))):
            j = int(rng.integers(len(digits)))
            side = int(rng.integers(20, 37))
            alpha = F.interpolate(digits[j : j + 1].float().div(255), size=(side, side), mode="bilinear",
                                  align_corners=False, antialias=True)[0, 0]
            y, x = (int(v) for v in rng.integers(-side // 4, size - 3 * side // 4, size=2))
            ys, xs = slice(max(0, y), min(size, y + side)), slice(max(0, x), min(size, x + side))
            a = alpha[ys.start - y : ys.stop - y, xs.start - x : xs.stop - x]
            region = canvases[i, 0, ys, xs]
            ink = 0.0 if float(region.mean()) > 0.5 else 1.0
            canvases[i, 0, ys, xs] = region * (1 - a) + ink * a
            stroke = F.max_pool2d((a > 0.25).float()[None, None], 3, 1, 1)[0, 0] > 0  # dilated by a pixel
            masks[i, ys, xs][stroke] = int(labels[j]) + 1
    return canvases.mul(255).round().to(torch.uint8), masks


@DATASETS.register("mnist5k-seg")
def mnist5k_seg() -> DatasetSpec:
    info = DatasetInfo("mnist5k-seg", 1, SIZE, len(CLASSES), CLASSES, MEAN, STD, task="segmentation")

    def load(split: str, root: object) -> tuple[torch.Tensor, torch.Tensor]:
        from dfkd_common.data.offline_pool import installed_photos, random_crops

        digits = get_dataset("mnist5k").native
        assert digits is not None
        images, labels = digits(split, root)  # type: ignore[arg-type]
        seed = 0 if split == "train" else 1
        rng = np.random.default_rng(seed + 100)
        photos = [p for group in installed_photos().values() for p in group]
        backgrounds = random_crops(photos, 512, SIZE, 1, 24, rng)
        return composite(backgrounds, images, labels, len(labels), seed)

    return DatasetSpec(info, load)
