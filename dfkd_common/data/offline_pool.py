"""The offline demo wild pool: unlabeled images built only from data installed with the dependencies.

DFND needs a large unlabeled pool that contains *some* images relevant to the teacher's task among many
irrelevant ones. Without internet we mix, in one shuffled bank:

* ``digits``: scikit-learn's 1,797 8x8 handwritten digits (labels dropped), upscaled to MNIST's framing; the
  "same task, other domain" images that USPS plays for MNIST in the paper. ``digits_variants`` adds randomly
  jittered copies (small rotation, scale, shift, stroke width), the kind of variety a real crawl has and an 8x8
  scan lacks; 0 keeps only the originals.
* ``skimage`` / ``sklearn``: random square crops (random position and side) of the photos shipped by
  scikit-image (``skimage.data``: astronaut, camera, coffee, text, page, ...) and scikit-learn
  (``load_sample_images``: china, flower): irrelevant natural images, the bulk of any crawl.
* ``noise``: uniform pixel noise and smooth (low-frequency) noise: images no task should claim.

The pool is written as an ordinary bank of kind ``merged`` (method ``offline-pool``), labels -1, with the
``source`` column and ``source_names`` so ``dfkd bank info`` shows the mix and, after retrieval, what DFND
picked from each source. Its ``dataset`` attribute describes the image format only (``num_classes`` 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from dfkd_common.bank import BankHeader
from dfkd_common.config import values
from dfkd_common.data.datasets import DatasetInfo, resize_uint8
from dfkd_common.data.wild import convert_channels
from dfkd_common.errors import DfkdError
from dfkd_common.extras import need
from dfkd_common.geometry import Size, as_hw
from dfkd_common.jobs import Job

SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
                  "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina", "rocket",
                  "text")
SOURCE_NAMES = ["digits", "skimage", "sklearn", "noise"]
@dataclass(frozen=True)
class OfflinePool:
    """What the demo pool holds (``dfkd pool build``; recorded in the bank's params)."""

    image_size: int = 32
    channels: Literal[1, 3] = 1
    digits_variants: int = 3  # jittered copies per sklearn digit, besides the original
    photo_crops: int = 40000  # split between the skimage and sklearn photos in proportion to their counts
    noise: int = 1000
    elastic: float = 1.5  # elastic distortion of the digit copies, in pixels (0: affine only)
    min_crop: int = 12  # smallest crop side in pixels; the largest is the photo's short side
    seed: int = 0


def _to_chw(arr: np.ndarray) -> torch.Tensor:
    a = np.asarray(arr)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = (255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-9)).astype(np.uint8)
    t = torch.from_numpy(np.array(a, copy=True))
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def installed_photos() -> dict[str, list[torch.Tensor]]:
    """The photos that ship inside scikit-image and scikit-learn (no download), as uint8 (C, H, W)."""
    skdata = need("skimage.data", "the offline wild pool")
    load_sample_images = need("sklearn.datasets", "the offline wild pool").load_sample_images

    sk: list[torch.Tensor] = []
    for name in SKIMAGE_PHOTOS:
        try:
            sk.append(_to_chw(getattr(skdata, name)()))
        except Exception:  # a photo that needs a download (newer skimage) is simply left out
            continue
    sl = [_to_chw(im) for im in load_sample_images().images]
    if not sk and not sl:
        raise DfkdError("no installed photos found (scikit-image and scikit-learn sample data)")
    return {"skimage": sk, "sklearn": sl}


def random_crops(photos: list[torch.Tensor], n: int, size: int, channels: int, min_crop: int,
                 rng: np.random.Generator) -> torch.Tensor:
    """``n`` random square crops (side log-uniform in [min_crop, short side]) resized to ``size``."""
    out = torch.empty(n, channels, size, size, dtype=torch.uint8)
    for i in range(n):
        p = photos[int(rng.integers(len(photos)))]
        h, w = p.shape[1:]
        short = min(h, w)
        side = round(math.exp(rng.uniform(math.log(min(min_crop, short)), math.log(short))))
        y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = p[None, :, y : y + side, x : x + side]
        out[i] = resize_uint8(convert_channels(crop, channels), size)[0]
    return out


def render_digits(size: int, variants: int, rng: np.random.Generator, elastic: float = 1.5) -> torch.Tensor:
    """scikit-learn's 8x8 digits drawn straight at ``size`` (grey, uint8): the originals plus jittered copies.

    Each 8x8 scan (16 grey levels) is upscaled once, bicubically, into a box ~0.66 x ``size`` centred in a black
    frame (MNIST's framing: a 20x20 digit in 28x28) and its strokes are sharpened by a sigmoid contrast curve.
    One resize matters: the registered ``digits`` dataset (28x28, then resized again to 32) is blurry enough
    that a LeNet-5 MNIST teacher labels only ~70 % of it right; this rendering gets ~92 %, which is what makes
    it the "same task, other domain" part of the pool. Copies vary box size (0.56-0.72 x size), rotation
    (+-12 deg), shift (+-2 px), contrast, stroke width (thinner / as is / thicker) and a smooth elastic
    distortion of about ``elastic`` pixels (the variability of handwriting that an 8x8 scan has lost).
    """
    load_digits = need("sklearn.datasets", "the offline wild pool").load_digits
    raw = torch.from_numpy(np.asarray(load_digits().images, dtype=np.float32))[:, None] / 16.0
    out = [_draw_digits(raw, np.full(len(raw), 0.66), np.zeros(len(raw)), np.zeros((len(raw), 2)),
                        np.full(len(raw), 8.0), np.ones(len(raw), dtype=np.int64), size)]
    for _ in range(max(0, variants)):
        n = len(raw)
        out.append(_draw_digits(raw, rng.uniform(0.56, 0.72, n), rng.uniform(-12, 12, n), rng.uniform(-2, 2, (n, 2)),
                                rng.choice([0.0, 8.0, 12.0], n), rng.integers(0, 3, n), size, elastic, rng))
    return torch.cat(out)


def _draw_digits(raw: torch.Tensor, box: np.ndarray, angle: np.ndarray, shift: np.ndarray, contrast: np.ndarray,
                 stroke: np.ndarray, size: int, elastic: float = 0.0,
                 rng: np.random.Generator | None = None) -> torch.Tensor:
    big = F.interpolate(raw, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    n = raw.shape[0]
    # inverse affine for grid_sample: output pixel -> input; scale 1/box shrinks the full-frame digit into the box
    ang = torch.from_numpy(angle).float() * math.pi / 180
    inv = 1.0 / torch.from_numpy(box).float()
    cos, sin = torch.cos(ang) * inv, torch.sin(ang) * inv
    t = torch.from_numpy(shift).float() * (-2.0 / size) * inv[:, None]
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    if elastic > 0 and rng is not None:  # smooth random displacement (Simard et al.'s elastic distortion)
        low = torch.from_numpy(rng.standard_normal((n, 2, 4, 4))).float()
        field = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
        grid = grid + field.permute(0, 2, 3, 1) * (elastic * 2.0 / size)
    x = F.grid_sample(big, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    k = torch.from_numpy(contrast).float().view(-1, 1, 1, 1)
    sharp = torch.where(k > 0, torch.sigmoid((x - 0.5) * k), x) * (x > 0.05)
    st = torch.from_numpy(stroke).view(-1, 1, 1, 1)
    thick = 0.5 * (sharp + F.max_pool2d(sharp, 3, 1, 1))
    thin = 0.5 * (sharp - F.max_pool2d(-sharp, 3, 1, 1))
    x = torch.where(st == 2, thick, torch.where(st == 0, thin, sharp))
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def noise_images(n: int, size: Size, channels: int, rng: np.random.Generator) -> torch.Tensor:
    """Half uniform pixel noise, half smooth noise (random low-resolution noise upsampled). Also the images
    ``dfkd retrieve`` makes itself as certainly irrelevant (:mod:`dfkd_common.relevance`)."""
    half = n // 2
    h, w = as_hw(size)
    white = torch.from_numpy(rng.integers(0, 256, (half, channels, h, w), dtype=np.uint8))
    smooth = []
    for _ in range(n - half):
        k = int(rng.integers(2, 9))
        low = torch.from_numpy(rng.integers(0, 256, (1, channels, k, k), dtype=np.uint8))
        smooth.append(F.interpolate(low.float(), size=(h, w), mode="bicubic", align_corners=False))
    smooth_t = torch.cat(smooth).round().clamp(0, 255).to(torch.uint8) if smooth else white[:0]
    return torch.cat([white, smooth_t])


def build_offline_pool(out: Path, cfg: OfflinePool) -> dict[str, Any]:
    """Write the demo pool bank to ``out`` (through the job driver: locked, atomic); returns counts per source."""
    size, channels = cfg.image_size, cfg.channels
    # a pool describes its image format only: no classes (its rows carry no labels)
    info = DatasetInfo("wild:offline", channels, size, 0, (), (0.5,) * channels, (0.25,) * channels).to_dict()
    header = BankHeader(channels=channels, image_size=size, kind="merged", method="offline-pool", dataset=info,
                        params=values(cfg), seed=cfg.seed, optional=("source",), source_names=SOURCE_NAMES)
    with Job(out, {"pool": values(cfg)}) as job:
        if job.state is None:  # a resume after the rows were written only has to publish them
            job.checkpoint(_write_pool_rows(job, header, cfg))
        state = job.state
        assert state is not None
        job.publish_bank(header)
    return dict(state)


def _write_pool_rows(job: Job, header: BankHeader, cfg: OfflinePool) -> dict[str, Any]:
    size, channels = cfg.image_size, cfg.channels
    rng = np.random.default_rng(cfg.seed)
    digits = convert_channels(render_digits(size, cfg.digits_variants, rng, cfg.elastic), channels)
    photos = installed_photos()
    n_crops = cfg.photo_crops
    total = sum(len(v) for v in photos.values())
    n_sk = round(n_crops * len(photos["skimage"]) / total)
    parts = [
        (0, digits),
        (1, random_crops(photos["skimage"], n_sk, size, channels, cfg.min_crop, rng)),
        (2, random_crops(photos["sklearn"], n_crops - n_sk, size, channels, cfg.min_crop, rng)),
        (3, noise_images(cfg.noise, size, channels, rng)),
    ]
    images = torch.cat([p for _, p in parts])
    source = torch.cat([torch.full((len(p),), k, dtype=torch.int16) for k, p in parts])
    perm = torch.from_numpy(rng.permutation(len(images)))
    images, source = images[perm], source[perm]
    step = 4096
    for i in range(0, len(images), step):
        job.write("bank", **header.columns(images[i : i + step], -1, 0, source=source[i : i + step]))
    return {"images": len(images), "per_source": {SOURCE_NAMES[k]: len(p) for k, p in parts},
            "photos": {k: len(v) for k, v in photos.items()}}
