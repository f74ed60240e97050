"""``dfkd augment``'s library: k diffusion variations of every bank image, kept if the teacher still sees the source.

DDA (ACM MM 2024) enlarges a synthetic bank with Stable Diffusion image variations and removes those with
"excessive deviation in the embedding space". The released code has none of this step, so the choices are ours
and are params: a variation is kept when the cosine similarity of the teacher's penultimate embedding of the
variation and of its source is >= ``omega`` (and, with ``same_label``, only if the teacher's label is unchanged);
it carries its source's label, its source's round, ``parent_index`` (the source's row) and ``score`` (the
similarity). The bank holds the kept variations only: train on ``--bank PARENT --bank AUGMENTED``.

The image path: bank uint8 -> the model's channels and size (grayscale repeated to RGB, RGB to luminance; resized
with antialiasing) -> ``vary`` -> back to the bank's channels and size -> quantised to uint8 *before* scoring,
so a variation's score is the score of the image stored.

One resumable job (:mod:`dfkd_common.jobs`): the state after each ``flush_every`` batches of sources holds the
cursor and the per-class counters; a kill -9 anywhere loses at most the batches since, which a rerun makes again,
identically (each variation's noise comes from its own generator seeded by (seed, source row, variation number)),
so no variation is made twice and none is lost. Published atomically; NaN from the model stops the run with one
line and leaves the job resumable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dfkd_common.augment_ops import to_float
from dfkd_common.bank import Bank, BankHeader, to_uint8
from dfkd_common.checkpoint import ModelMeta, file_checksum
from dfkd_common.dist import current, gather_objects, rank_path, rank_share
from dfkd_common.engine import Engine
from dfkd_common.errors import DfkdError
from dfkd_common.geometry import Size, as_hw
from dfkd_common.jobs import Job
from dfkd_common.loops.runner import LAYOUT, JobStore, Loop, Runner
from dfkd_common.models.hooks import Penultimate
from dfkd_common.variation.models import VariationModel

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")


@dataclass(frozen=True)
class BankAugmentation:
    """What ``dfkd augment`` does; every field is recorded in the bank's params (``variation``: the model's)."""

    k: int = 4  # variations per source image (DDA's demo: 4)
    omega: float = 0.9  # keep if cos(teacher embedding, its source's) >= omega, in [-1, 1] (README: how chosen)
    same_label: bool = False  # also require the teacher's label of the variation to be its source's
    sources: int = 0  # 0: every image of the bank; N: a seeded random N of them
    batch_size: int = 64  # source images per batch (the variation model may split its own batches further)
    flush_every: int = 4  # batches between resumable checkpoints
    seed: int = 0
    variation: dict[str, Any] = field(default_factory=dict)  # the variation model's own params

    def __post_init__(self) -> None:
        if self.k < 1:
            raise DfkdError(f"augment: k must be >= 1 (variations per image), got {self.k}")
        if not -1.0 <= self.omega <= 1.0:
            raise DfkdError(f"augment: omega is a cosine similarity and must be in [-1, 1], got {self.omega}")
        if self.sources < 0:
            raise DfkdError(f"augment: sources must be >= 0 (0: all), got {self.sources}")
        if self.batch_size < 1 or self.flush_every < 1:
            raise DfkdError("augment: batch_size and flush_every must be >= 1")


@dataclass(frozen=True)
class AugmentRun(BankAugmentation):
    """The ``augment`` section: what the augmentation does and the variation model that makes the variations."""

    model: str | None = None  # NAME, NAME:PATH_OR_HUB_ID or a diffusers pipeline directory (see `dfkd methods`)


def convert(images: torch.Tensor, channels: int, size: Size) -> torch.Tensor:
    """Float images in [0, 1] to ``channels`` (1 <-> 3) and ``size`` (H, W; antialiased when shrinking)."""
    c = images.shape[1]
    if c != channels:
        if c == 1 and channels == 3:
            images = images.expand(-1, 3, -1, -1)
        elif c == 3 and channels == 1:
            w = torch.tensor(LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
            images = (images * w).sum(1, keepdim=True)
        else:
            raise DfkdError(f"augment: cannot convert {c}-channel images to {channels} channels")
    hw = as_hw(size)
    if tuple(images.shape[-2:]) != hw:
        images = F.interpolate(images, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return images.clamp(0, 1)


@torch.no_grad()
def embed(teacher: torch.nn.Module, images: torch.Tensor, engine: Engine) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's penultimate embedding (flattened, fp32) and logits of uint8 images, on the CPU."""
    teacher.eval()
    with Penultimate(teacher) as hook:
        logits = teacher(engine.images(to_float(images.to(engine.device)))).float()
        return hook.value.flatten(1).float().cpu(), logits.cpu()


def variation_seed(seed: int, row: int, j: int) -> int:
    """The seed of variation ``j`` of source ``row``: independent of batching, so a resume repeats it exactly."""
    return int(np.random.SeedSequence([seed, row, j]).generate_state(1, np.uint64)[0]) & ((1 << 63) - 1)


@dataclass
class Scored:
    """One batch's variations as stored (uint8, the bank's shape, source-major) and what the filter sees."""

    images: torch.Tensor
    score: torch.Tensor  # cos(teacher embedding of the variation, of its source)
    same: torch.Tensor  # the teacher's label is unchanged
    logits: torch.Tensor  # the teacher's logits of the variation
    src_logits: torch.Tensor  # the teacher's logits of each source (one row per source)


def vary_and_score(teacher: torch.nn.Module, model: VariationModel, src: torch.Tensor, rows: np.ndarray, k: int,
                   seed: int, engine: Engine) -> Scored:
    """k variations of the uint8 ``src`` images (bank rows ``rows``), brought back to the bank's shape, quantised
    and scored by the teacher: the one path of ``dfkd augment`` and its benchmark. NaN or inf from the model is an
    error (one line)."""
    c, size = int(src.shape[1]), (int(src.shape[-2]), int(src.shape[-1]))
    src_emb, src_logits = embed(teacher, src, engine)
    gens = [torch.Generator().manual_seed(variation_seed(seed, int(i), j)) for i in rows for j in range(k)]
    var = model.vary(convert(to_float(src), model.channels, model.size), k, gens)
    if not torch.isfinite(var).all():
        raise DfkdError(f"augment: the variation model {model.name} produced NaN or inf for source rows "
                        f"{int(rows[0])}-{int(rows[-1])}; nothing was written for them (rerun resumes before them)")
    var8 = torch.from_numpy(to_uint8(convert(var.float().cpu(), c, size)))
    var_emb, var_logits = embed(teacher, var8, engine)
    score = F.cosine_similarity(var_emb, src_emb.repeat_interleave(k, 0), dim=1)
    same = var_logits.argmax(1) == src_logits.argmax(1).repeat_interleave(k, 0)
    return Scored(var8, score, same, var_logits, src_logits)


def pick_sources(n: int, cfg: BankAugmentation) -> np.ndarray:
    """Rows of the bank to vary, sorted: all, or a seeded random ``cfg.sources`` of them."""
    if cfg.sources == 0 or cfg.sources >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(cfg.seed).choice(n, size=cfg.sources, replace=False))


class AugmentLoop(Loop):
    """One batch of sources: k variations each, scored, filtered, the kept ones written to the job's ``bank``
    table (a unit of the runner); the counters per class resume with the job."""

    def __init__(self, teacher: torch.nn.Module, model: VariationModel, bank: Bank, rows: np.ndarray,
                 header: BankHeader, job: Job, engine: Engine, cfg: BankAugmentation, num_classes: int) -> None:
        self.teacher, self.model, self.bank, self.rows, self.header = teacher, model, bank, rows, header
        self.job, self.engine, self.cfg, self.num_classes = job, engine, cfg, num_classes
        self.made, self.kept = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64)
        self.agree = 0
        self.origin: tuple[int, float] | None = None  # (source, time) where this process started: the rate's

    def run(self, index: int) -> dict[str, Any]:
        cfg, bank = self.cfg, self.bank
        lo = index * cfg.batch_size
        if self.origin is None:
            self.origin = (lo, time.perf_counter())
        idx = self.rows[lo : lo + cfg.batch_size]
        at = torch.from_numpy(idx)
        v = vary_and_score(self.teacher, self.model, bank.images[at], idx, cfg.k, cfg.seed, self.engine)
        keep = v.score >= cfg.omega
        if cfg.same_label:
            keep &= v.same
        labels = bank.labels[at]
        cls = torch.where(labels >= 0, labels, v.src_logits.argmax(1)).repeat_interleave(cfg.k, 0)
        self.made += np.bincount(cls.numpy(), minlength=self.num_classes)[: self.num_classes]
        self.kept += np.bincount(cls[keep].numpy(), minlength=self.num_classes)[: self.num_classes]
        self.agree += int(v.same.sum())
        if keep.any():
            per_var = {"labels": labels, "rounds": bank.rounds[at], "parents": at}
            per_var = {name: t.repeat_interleave(cfg.k, 0)[keep] for name, t in per_var.items()}
            self.job.write("bank", **self.header.columns(
                v.images[keep], per_var["labels"], per_var["rounds"], teacher_logits=v.logits[keep].half(),
                parent_index=per_var["parents"], score=v.score[keep]))
        return {"cursor": lo + len(idx)}

    def describe(self, logs: dict[str, Any] | None) -> str:
        lo, t0 = self.origin or (0, time.perf_counter())
        rate = ((logs or {}).get("cursor", lo) - lo) * self.cfg.k / max(time.perf_counter() - t0, 1e-9)
        return f"{rate:.1f} variations/s, kept {int(self.kept.sum())}/{int(self.made.sum())}"

    def state_dict(self) -> dict[str, Any]:
        return {"bank_rows": self.job.rows("bank"), "agree": self.agree, "made": self.made, "kept": self.kept}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.job.truncate("bank", int(state["bank_rows"]))
        self.made, self.kept = np.asarray(state["made"]).copy(), np.asarray(state["kept"]).copy()
        self.agree = int(state["agree"])


def augment_bank(
    teacher: torch.nn.Module, meta: ModelMeta, teacher_path: Path, bank: Bank, model: VariationModel, out: Path,
    engine: Engine, cfg: BankAugmentation, on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Make, score, filter and publish the augmented bank (see the module docstring); returns its metrics.

    ``on_batch(sources done)`` runs after every batch and its checkpoint (tests interrupt a run with it).
    """
    info = meta.dataset
    bank.check_compatible(info)
    if len(bank) == 0:
        raise DfkdError(f"bank {bank.path} is empty: nothing to augment")
    num_classes = info.num_classes
    identity = model.identity()
    parent_sum, teacher_sum = file_checksum(bank.path), file_checksum(teacher_path)
    key = {"parent": parent_sum, "teacher": teacher_sum, "model": identity, "runner_layout": LAYOUT,
           **{k: v for k, v in asdict(cfg).items() if k not in ("batch_size", "flush_every")}}
    header = BankHeader(channels=info.channels, image_size=info.image_size, kind="augmented", method=model.name,
                        dataset=info.to_dict(), params={**asdict(cfg), "model": identity}, seed=cfg.seed,
                        teacher_checksum=teacher_sum, parent_checksum=parent_sum,
                        optional=("teacher_logits", "parent_index", "score"), num_classes=num_classes)
    rows = pick_sources(len(bank), cfg)
    world = current()
    all_rows = rows
    if world.distributed:  # rank r varies source batches r, r + N, ...; rank 0 merges in source order
        batches = [rows[lo : lo + cfg.batch_size] for lo in range(0, len(rows), cfg.batch_size)]
        rows = np.concatenate(list(rank_share(batches, world)) or [rows[:0]])
        key = {**key, "world": world.size, "rank": world.rank}
    with Job(rank_path(out, world), key) as job:
        loop = AugmentLoop(teacher, model, bank, rows, header, job, engine, cfg, num_classes)
        runner = Runner(JobStore(job), every=cfg.flush_every, keep=False,
                        after_unit=(lambda done, logs: on_batch((logs or {})["cursor"])) if on_batch else None)
        seconds = runner.run(loop, -(-len(rows) // cfg.batch_size), f"augment ({model.name}, k {cfg.k})",
                             "batch").seconds
        made, kept, agree = loop.made, loop.kept, loop.agree
        if world.distributed:  # the run's figures: every rank's counts, the slowest rank's time
            shares = gather_objects((made, kept, agree, seconds))
            made, kept = sum(sh[0] for sh in shares), sum(sh[1] for sh in shares)
            agree, seconds = sum(sh[2] for sh in shares), max(sh[3] for sh in shares)
        names = list(info.class_names)
        per_class = [{"class": c, "name": names[c] if c < len(names) else str(c), "made": int(made[c]),
                      "kept": int(kept[c]), "keep_rate": float(kept[c] / made[c]) if made[c] else None}
                     for c in range(num_classes)]
        total_made, total_kept = int(made.sum()), int(kept.sum())
        stats = {"sources": len(all_rows), "made": total_made, "kept": total_kept,
                 "keep_rate": total_kept / max(total_made, 1), "label_agreement": agree / max(total_made, 1),
                 "per_class": per_class, "parent_path": str(bank.path), "parent_rows": len(bank),
                 "seconds": seconds, "variations_per_s": total_made / max(seconds, 1e-9)}
        position = np.empty(len(bank), np.int64)  # merged in source order
        position[all_rows] = np.arange(len(all_rows))
        job.publish_ranks(header, {"augment": {**stats, "world_size": world.size} if world.distributed else stats},
                          order=lambda cols: position[cols["parent_index"]], out=out)
    return {**stats, "model": identity, "omega": cfg.omega, "k": cfg.k, "same_label": cfg.same_label,
            "images": total_kept, "images_per_s": total_made / max(seconds, 1e-9),
            "precision": model.precision()}
