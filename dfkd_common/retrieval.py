"""DFND retrieval: score a wild pool with the teacher and keep the images it is most sure about, as a bank.

("Learning Student Networks in the Wild", Chen et al., CVPR 2021.) Each pool image gets the score
``s = CE(T(x), argmax T(x)) = -log p_max``; low means the teacher is confident the image shows one of its
classes. The ``num_select`` lowest become a ``retrieved`` bank, labelled with the teacher's argmax and carrying
the score, the source it came from and the teacher's logits.

Three phases, each bounded in memory whatever the pool size:

1. **Score** (:func:`score_pool`): stream the pool in batches (DataLoader, optional reader workers) and write
   score / predicted class / readable flag per row to a work file beside the output
   (``.<bank>.scores.h5``). The file records how many rows are done and a key (pool fingerprint, teacher
   checksum, input format); a rerun with the same key resumes after the last flushed batch, so a crash on a
   pool of millions loses minutes, not hours. Images are never kept.
2. **Select** (:func:`select_rows`): read the scores back in chunks and keep a running top-k: O(num_select)
   memory. ``balance`` takes the top-k *per predicted class* with equal quotas (water-filled: a class with
   too few candidates gives its unused quota to the others, so counts are within one of each other whenever
   the pool allows). Why: on wild data the teacher's confidence is very uneven across classes (natural
   images look far more like some classes than others, e.g. "1" or "8" for a digit teacher), so a global
   top-k can fill most of the bank with a few classes and starve the rest; the student then never sees those
   classes' decision boundaries. ``selection="random"`` is the paper's "random unlabeled" baseline: the same
   number of readable rows, uniformly at random (seeded), labelled by the teacher in the same way.
3. **Gather** (:func:`write_bank`): read only the selected rows again, recompute the teacher logits and write
   the bank atomically (:class:`BankWriter`), in pool order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from dfkd_common.augment_ops import to_float
from dfkd_common.bank import BankWriter
from dfkd_common.checkpoint import ModelMeta, file_checksum
from dfkd_common.data.wild import BankSource, WildPool
from dfkd_common.engine import Engine, progress
from dfkd_common.errors import DfkdError
from dfkd_common.models import Classifier

SELECTIONS = ("confidence", "random")
CHUNK = 1 << 20  # rows of scores read at once by the selection pass


@dataclass
class RetrieveConfig:
    num_select: int = 5000
    balance: bool = False
    selection: str = "confidence"
    batch_size: int = 512
    workers: int = 0  # reader processes; 0 reads in the main process (best for small images on few cores)
    amp: bool = False  # bf16 teacher forward; off by default so scores are exact fp32
    flush_every: int = 20  # batches between resumable checkpoints of the score file
    seed: int = 0

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise DfkdError(f"retrieve: selection must be one of {SELECTIONS}, not {self.selection!r}")
        if self.num_select < 1:
            raise DfkdError(f"retrieve: num_select must be positive, not {self.num_select}")
        if self.batch_size < 1:
            raise DfkdError("retrieve: batch_size must be positive")


def scores_path(out: Path) -> Path:
    return out.parent / f".{out.name}.scores.h5"


@torch.no_grad()
def teacher_scores(teacher: Classifier, images: torch.Tensor, engine: Engine, amp: bool) -> torch.Tensor:
    """Logits (float32) of uint8 images."""
    x = engine.images(to_float(images.to(engine.device)))
    with engine.autocast(amp):
        return teacher(x).float()


def neg_log_pmax(logits: torch.Tensor) -> torch.Tensor:
    """-log p_max = CE(logits, argmax logits) = logsumexp(z) - max(z)."""
    return torch.logsumexp(logits, 1) - logits.max(1).values


def score_pool(
    teacher: Classifier, pool: WildPool, engine: Engine, cfg: RetrieveConfig, work: Path, key: str,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Score every row into the work file ``work`` (resumable); returns counts and timing."""
    n = len(pool)
    h5 = _open_scores(work, key, n)
    try:
        start = int(h5.attrs["done"])
        t0 = time.perf_counter()
        teacher.eval()
        with progress() as bar:
            task = bar.add_task("score pool", total=n, completed=start, info=f"resumed at {start}" if start else "")
            for k, batch in enumerate(pool.loader(range(start, n), cfg.batch_size, cfg.workers)):
                logits = teacher_scores(teacher, batch["images"], engine, cfg.amp)
                lo, hi = int(batch["index"][0]), int(batch["index"][-1]) + 1
                ok = batch["ok"].numpy()
                h5["score"][lo:hi] = np.where(ok, neg_log_pmax(logits).cpu().numpy(), np.inf).astype(np.float32)
                h5["pred"][lo:hi] = logits.argmax(1).cpu().numpy().astype(np.int32)
                h5["valid"][lo:hi] = ok
                if (k + 1) % cfg.flush_every == 0 or hi == n:
                    h5.attrs["done"] = hi
                    h5.flush()
                bar.update(task, completed=hi, info=f"{int((~ok).sum())} unreadable" if not ok.all() else "")
                if on_batch:
                    on_batch(hi)
        seconds = time.perf_counter() - t0
        h5.attrs["done"] = n
        unreadable = int(n - _count_valid(h5, n))
    finally:
        h5.close()
    return {"scored": n - start, "resumed_at": start, "seconds": seconds,
            "images_per_s": (n - start) / max(seconds, 1e-9), "unreadable": unreadable}


def _open_scores(work: Path, key: str, n: int) -> h5py.File:
    if work.exists():
        try:
            h5 = h5py.File(work, "a")
            if h5.attrs.get("key") == key and h5["score"].shape[0] == n:
                return h5
            h5.close()
        except (OSError, KeyError):
            pass
        work.unlink()
    work.parent.mkdir(parents=True, exist_ok=True)
    h5 = h5py.File(work, "w")
    chunk = (min(max(n, 1), 1 << 16),)
    h5.create_dataset("score", (n,), np.float32, chunks=chunk, fillvalue=np.inf)
    h5.create_dataset("pred", (n,), np.int32, chunks=chunk, fillvalue=-1)
    h5.create_dataset("valid", (n,), bool, chunks=chunk, fillvalue=False)
    h5.attrs["key"] = key
    h5.attrs["done"] = 0
    return h5


def _count_valid(h5: h5py.File, n: int) -> int:
    return sum(int(h5["valid"][i : i + CHUNK].sum()) for i in range(0, n, CHUNK))


def _chunks(work: Path) -> Any:
    with h5py.File(work, "r") as h5:
        n = h5["score"].shape[0]
        for i in range(0, n, CHUNK):
            yield i, h5["score"][i : i + CHUNK], h5["pred"][i : i + CHUNK].astype(np.int64), h5["valid"][i : i + CHUNK]


def _keep_lowest(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` lowest (score, row) pairs, ties broken by row so results never depend on chunking."""
    if len(scores) <= k:
        return scores, rows
    order = np.lexsort((rows, scores))[:k]
    return scores[order], rows[order]


def balanced_quotas(available: np.ndarray, total: int) -> np.ndarray:
    """Equal per-class quotas summing to ``min(total, available.sum())``, capped by what each class has.

    Water-filling: the largest level L with sum(min(avail, L)) <= total, then the leftover rows go one each to
    the lowest-index classes that still have candidates, so quotas differ by at most one where classes allow.
    """
    total = min(int(total), int(available.sum()))
    lo, hi = 0, int(available.max(initial=0))
    while lo < hi:  # largest L with sum(min(avail, L)) <= total
        mid = (lo + hi + 1) // 2
        if np.minimum(available, mid).sum() <= total:
            lo = mid
        else:
            hi = mid - 1
    quota = np.minimum(available, lo)
    left = total - int(quota.sum())
    for c in np.flatnonzero(available > lo)[:left]:
        quota[c] += 1
    return quota


def select_rows(work: Path, num_classes: int, cfg: RetrieveConfig) -> np.ndarray:
    """Sorted pool rows to keep (see the module docstring); reads the score file in chunks."""
    if cfg.selection == "random":
        valid = np.concatenate([v for _, _, _, v in _chunks(work)])  # 1 byte per row
        rows = np.flatnonzero(valid)
        rng = np.random.default_rng(cfg.seed)
        return np.sort(rng.choice(rows, size=min(cfg.num_select, len(rows)), replace=False))
    if cfg.balance:
        available = np.zeros(num_classes, dtype=np.int64)
        for _, _, pred, valid in _chunks(work):
            available += np.bincount(pred[valid], minlength=num_classes)[:num_classes]
        quota = balanced_quotas(available, cfg.num_select)
        best = [(np.zeros(0, np.float32), np.zeros(0, np.int64)) for _ in range(num_classes)]
        for i, score, pred, valid in _chunks(work):
            for c in np.flatnonzero(quota):
                m = valid & (pred == c)
                s, r = best[c]
                best[c] = _keep_lowest(np.concatenate([s, score[m]]), np.concatenate([r, i + np.flatnonzero(m)]),
                                       int(quota[c]))
        return np.sort(np.concatenate([r for _, r in best]))
    s, r = np.zeros(0, np.float32), np.zeros(0, np.int64)
    for i, score, _, valid in _chunks(work):
        s, r = _keep_lowest(np.concatenate([s, score[valid]]), np.concatenate([r, i + np.flatnonzero(valid)]),
                            cfg.num_select)
    return np.sort(r)


def write_bank(
    teacher: Classifier, meta: ModelMeta, pool: WildPool, rows: np.ndarray, out: Path, engine: Engine,
    cfg: RetrieveConfig, attrs: dict[str, Any],
) -> dict[str, Any]:
    """Gather the selected rows, label them with the teacher and write the ``retrieved`` bank atomically."""
    info = meta.dataset
    k = info.num_classes
    method = "dfnd" if cfg.selection == "confidence" else "dfnd-random"
    writer = BankWriter(out, channels=info.channels, image_size=info.image_size, kind="retrieved", method=method,
                        dataset=info.to_dict(), params=attrs.pop("params"), seed=cfg.seed,
                        teacher_checksum=attrs.pop("teacher_checksum"), parent_checksum=attrs.pop("parent_checksum"),
                        optional=("teacher_logits", "score", "source"), source_names=pool.names)
    per_class = np.zeros(k, dtype=np.int64)
    per_source = np.zeros(len(pool.names), dtype=np.int64)
    scores: list[np.ndarray] = []
    skipped = 0
    try:
        with progress() as bar:
            task = bar.add_task("write bank", total=len(rows), info="")
            for batch in pool.loader(rows, cfg.batch_size, cfg.workers):
                ok = batch["ok"]
                skipped += int((~ok).sum())
                if ok.any():
                    logits = teacher_scores(teacher, batch["images"][ok], engine, cfg.amp).cpu()
                    labels = logits.argmax(1)
                    score = neg_log_pmax(logits)
                    src = batch["source"][ok]
                    writer.append(batch["images"][ok], labels, 0, teacher_logits=logits.half(), score=score,
                                  source=src)
                    per_class += np.bincount(labels.numpy(), minlength=k)
                    per_source += np.bincount(src.numpy(), minlength=len(pool.names))
                    scores.append(score.numpy())
                bar.update(task, advance=len(ok))
        for name, value in attrs.items():
            writer.set_attr(name, value)
        writer.close()
    except BaseException:
        writer.abort(keep_work=False)
        raise
    all_scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    return {
        "selected": int(per_class.sum()),
        "skipped_unreadable": skipped,
        "per_class": {info.class_names[c] if c < len(info.class_names) else str(c): int(per_class[c])
                      for c in range(k)},
        "per_source": {pool.names[i]: int(per_source[i]) for i in range(len(pool.names))},
        "score_mean": float(all_scores.mean()) if len(all_scores) else None,
        "score_max": float(all_scores.max()) if len(all_scores) else None,
        "mean_confidence": float(np.exp(-all_scores).mean()) if len(all_scores) else None,
    }


def retrieve(
    teacher: Classifier, meta: ModelMeta, teacher_path: Path, pool: WildPool, out: Path, engine: Engine,
    cfg: RetrieveConfig,
) -> dict[str, Any]:
    """Score (resumably), select and write the bank; returns the metrics the stage writes to JSON."""
    info = meta.dataset
    teacher_sum = file_checksum(teacher_path)
    key = json.dumps({"pool": pool.fingerprint(), "teacher": teacher_sum, "amp": cfg.amp}, sort_keys=True)
    work = scores_path(out)
    t0 = time.perf_counter()
    scoring = score_pool(teacher, pool, engine, cfg, work, key)
    rows = select_rows(work, info.num_classes, cfg)
    if len(rows) == 0:
        raise DfkdError(f"no readable images in the wild pool ({len(pool)} rows, all unreadable)")
    bank_sources = [s for s in pool.sources if s.spec.startswith("bank:")]
    parent = file_checksum(bank_sources[0].spec[5:]) if len(pool.sources) == 1 and bank_sources else ""
    attrs = {"params": asdict(cfg), "teacher_checksum": teacher_sum, "parent_checksum": parent,
             "wild_sources": [{"spec": s.spec, "rows": len(s)} for s in pool.sources],
             "pool_size": len(pool), "unreadable": scoring["unreadable"]}
    written = write_bank(teacher, meta, pool, rows, out, engine, cfg, attrs)
    work.unlink(missing_ok=True)
    pool_sources = _pool_source_counts(pool)
    return {"method": "dfnd", "selection": cfg.selection, "balance": cfg.balance, "num_select": cfg.num_select,
            "pool_size": len(pool), "pool_per_source": pool_sources, **scoring, **written,
            "total_seconds": time.perf_counter() - t0}


def _pool_source_counts(pool: WildPool) -> dict[str, int] | None:
    """Per-source pool sizes where cheap to know (single-name sources, or a bank's source column)."""
    counts = np.zeros(len(pool.names), dtype=np.int64)
    for s, m in zip(pool.sources, pool.maps, strict=True):
        if len(m) == 1:
            counts[m[0]] += len(s)
            continue
        if not isinstance(s, BankSource):  # pragma: no cover - only banks have several names
            continue
        with h5py.File(s.path, "r") as h5:  # a bank with a source column
            for i in range(0, len(s), CHUNK):
                src = h5["source"][i : i + CHUNK].astype(np.int64)
                counts += np.bincount(m[np.clip(src, 0, len(m) - 1)], minlength=len(counts))
    return {pool.names[i]: int(counts[i]) for i in range(len(counts))}
