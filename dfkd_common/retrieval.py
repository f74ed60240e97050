"""DFND retrieval: score a wild pool with the teacher and keep the images it is most sure about, as a bank.

("Learning Student Networks in the Wild", Chen et al., CVPR 2021.) Each pool image gets the score
``s = CE(T(x), argmax T(x)) = -log p_max``; low means the teacher is confident the image shows one of its
classes. The ``num_select`` lowest become a ``retrieved`` bank, labelled with the teacher's argmax and carrying
the score, the source it came from and the teacher's logits.

Three phases of one resumable job (:mod:`dfkd_common.jobs`), each bounded in memory whatever the pool size:

1. **Score** (:func:`score_pool`): stream the pool in batches (DataLoader, optional reader workers) and write
   score / predicted class / readable flag per row as the job's ``scores`` table, one shard and checkpoint
   every ``flush_every`` batches; a rerun with the same params, pool and teacher resumes after the last
   checkpoint, so a crash on a pool of millions loses minutes, not hours. Images are never kept.
2. **Select** (:func:`select_rows`): read the scores back shard by shard and keep a running top-k:
   O(num_select) memory. ``balance`` takes the top-k *per predicted class* with equal quotas (water-filled: a class with
   too few candidates gives its unused quota to the others, so counts are within one of each other whenever
   the pool allows). Why: on wild data the teacher's confidence is very uneven across classes (natural
   images look far more like some classes than others, e.g. "1" or "8" for a digit teacher), so a global
   top-k can fill most of the bank with a few classes and starve the rest; the student then never sees those
   classes' decision boundaries. ``selection="random"`` is the paper's "random unlabeled" baseline: the same
   number of readable rows, uniformly at random (seeded), labelled by the teacher in the same way.
3. **Gather** (:class:`GatherLoop`): read only the selected rows again, recompute the teacher logits and write
   them, in pool order, as the job's ``bank`` table (resumable too), which the job publishes atomically.

Scoring also records each row's relevance (:mod:`dfkd_common.relevance`: the teacher's BN statistics per image)
and estimates how many rows are relevant; ``select: auto`` keeps only those (at most ``num_select``), ``fixed``
keeps ``num_select`` as the paper does. 4. **Top-up** (``top_up: METHOD``, :func:`top_up`): a synthesis
method's images of the classes the bank lacks fill it up to ``num_select``, round by round (resumable), each row
naming the method in the ``source`` column: a hybrid bank for pools with too few relevant images.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch

from dfkd_common.augment_ops import to_float
from dfkd_common.bank import BankHeader, to_uint8
from dfkd_common.checkpoint import ModelMeta, file_checksum
from dfkd_common.config import REPLACES
from dfkd_common.data.wild import BankSource, WildPool
from dfkd_common.engine import Engine, seed_everything
from dfkd_common.errors import DfkdError
from dfkd_common.jobs import Job
from dfkd_common.loops.runner import LAYOUT, JobStore, Loop, Runner
from dfkd_common.models import Classifier
from dfkd_common.relevance import BINS, Relevance, RelevanceEstimate, bin_of, estimate, histogram
from dfkd_common.tasks import get_task

CHUNK = 1 << 20  # rows of scores read at once by the selection pass


@dataclass(frozen=True)
class RetrieveConfig:
    """What ``dfkd retrieve`` does; every field is recorded in the bank's params."""

    num_select: int = 5000
    # fixed: the num_select most confident rows (the paper); auto: the rows the relevance estimate calls relevant
    # (dfkd_common/relevance.py), at most num_select
    select: Literal["fixed", "auto"] = "fixed"
    relevance: Literal["auto", "bn", "confidence"] = "auto"  # the estimate's score (auto: bn where the teacher has BN)
    top_up: str | None = None  # a synthesis method filling the bank up to num_select with the classes it lacks
    top_up_params: dict[str, Any] = field(default_factory=dict)  # that method's params (dfkd synthesize's)
    top_up_seed: int = 0  # added to seed for the top-up's synthesis
    balance: bool = False  # top-k per predicted class
    selection: Literal["confidence", "random"] = "confidence"  # random: the paper's "random unlabeled" baseline
    batch_size: int = 512
    workers: int = 0  # reader processes; 0 reads in the main process (best for small images on few cores)
    amp: Literal["auto", True, False] = False  # bf16 teacher forward; off by default so scores are exact fp32
    flush_every: int = 20  # batches between resumable checkpoints of the score file
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_select < 1:
            raise DfkdError(f"retrieve: num_select must be positive, not {self.num_select}")
        if self.batch_size < 1:
            raise DfkdError("retrieve: batch_size must be positive")
        if self.top_up is not None:
            from dfkd_common.synthesis import SYNTHESIZERS
            if self.top_up not in SYNTHESIZERS.names():
                raise DfkdError(f"retrieve: top_up {self.top_up!r} is not a synthesis method (one of "
                                f"{', '.join(SYNTHESIZERS.names())})")


@dataclass(frozen=True)
class RetrieveRun(RetrieveConfig):
    """The ``retrieve`` section: the retrieval's params and where the wild pool comes from."""

    # source specs: folder:PATH | bank:PATH | dataset:NAME[:SPLIT] (or a bare path / name); one or a list
    wild: list[str] | str = field(default_factory=list, metadata=REPLACES)
    data_root: str | None = None


@torch.no_grad()
def teacher_scores(teacher: Classifier, images: torch.Tensor, engine: Engine) -> torch.Tensor:
    """Logits (float32) of uint8 images, at the engine's precision (fp32 unless ``amp``)."""
    x = engine.images(to_float(images.to(engine.device)))
    with engine.autocast():
        return teacher(x).float()


def neg_log_pmax(logits: torch.Tensor) -> torch.Tensor:
    """-log p_max = CE(logits, argmax logits) = logsumexp(z) - max(z)."""
    return torch.logsumexp(logits, 1) - logits.max(1).values


class ScoreLoop(Loop):
    """One batch of the pool scored (a unit of the runner): score, relevance, predicted class and readable flag
    per row, buffered and written to the job's ``scores`` table as one shard per checkpoint. Images are never
    kept."""

    def __init__(self, teacher: Classifier, pool: WildPool, engine: Engine, cfg: RetrieveConfig, job: Job,
                 relevance: Relevance) -> None:
        self.teacher, self.pool, self.engine, self.cfg, self.job = teacher.eval(), pool, engine, cfg, job
        self.relevance = relevance
        self.buf: list[dict[str, np.ndarray]] = []
        self.batches: Iterator[dict[str, torch.Tensor]] | None = None
        self.start = 0

    def run(self, index: int) -> dict[str, Any]:
        if self.batches is None:  # this process's first batch: after the rows the last checkpoint committed
            self.start = min(index * self.cfg.batch_size, len(self.pool))
            self.job.truncate("scores", self.start)
            self.batches = iter(self.pool.loader(range(self.start, len(self.pool)), self.cfg.batch_size,
                                                 self.cfg.workers))
        batch = next(self.batches)
        logits = teacher_scores(self.teacher, batch["images"], self.engine)
        ok = batch["ok"].numpy()
        relevance = self.relevance.of(logits).float().cpu().numpy()
        self.buf.append({"score": np.where(ok, neg_log_pmax(logits).cpu().numpy(), np.inf).astype(np.float32),
                         "relevance": np.where(ok, relevance, np.inf).astype(np.float32),
                         "pred": logits.argmax(1).cpu().numpy().astype(np.int32), "valid": ok})
        return {"scored": int(batch["index"][-1]) + 1, "unreadable": int((~ok).sum())}

    def flush(self) -> None:
        if self.buf:
            self.job.write("scores", **{k: np.concatenate([b[k] for b in self.buf]) for k in self.buf[0]})
            self.buf.clear()

    def describe(self, logs: dict[str, Any] | None) -> str:
        return f"{logs['unreadable']} unreadable" if logs and logs["unreadable"] else ""


def score_pool(
    teacher: Classifier, pool: WildPool, engine: Engine, cfg: RetrieveConfig, job: Job, relevance: Relevance,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Score every row into the job's ``scores`` table, resuming after its last checkpoint."""
    n = len(pool)
    loop = ScoreLoop(teacher, pool, engine, cfg, job, relevance)
    runner = Runner(JobStore(job, "score"), every=cfg.flush_every, keep=False,
                    after_unit=(lambda done, logs: on_batch((logs or {})["scored"])) if on_batch else None)
    result = runner.run(loop, -(-n // cfg.batch_size), "score pool", "batch")
    start = min(result.resumed_at * cfg.batch_size, n)
    unreadable = n - sum(int(s["valid"].sum()) for s in job.shards("scores"))
    return {"scored": n - start, "resumed_at": start, "seconds": result.seconds,
            "images_per_s": n / max(result.seconds, 1e-9), "unreadable": unreadable}


def score_and_estimate(teacher: Classifier, info: Any, pool: WildPool, engine: Engine, cfg: RetrieveConfig,
                       job: Job, on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Score the pool (resumably) and estimate its relevant count; the hooks come off the teacher after."""
    relevance = Relevance(teacher, cfg.relevance)
    try:
        scoring = score_pool(teacher, pool, engine, cfg, job, relevance, on_batch)
        reference = relevance.reference(teacher, info.channels, info.image_size, engine, cfg.seed)
    finally:
        relevance.remove()
    est = relevance_estimate(job, reference, relevance.kind)
    return scoring | {"relevance": est.to_dict()}


def _chunks(job: Job, cut_bin: int | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(first row, score, pred, valid) per shard of the ``scores`` table; with ``cut_bin`` only the rows the
    relevance estimate calls relevant are valid."""
    i = 0
    for shard in job.shards("scores"):
        valid = shard["valid"].astype(bool)
        if cut_bin is not None:
            valid &= bin_of(shard["relevance"]) < cut_bin
        yield i, shard["score"], shard["pred"].astype(np.int64), valid
        i += len(shard["score"])


def relevance_estimate(job: Job, reference: np.ndarray, kind: str) -> RelevanceEstimate:
    """The relevant count of the scored pool (its histogram read shard by shard) against the reference noise."""
    h = np.zeros(BINS, dtype=np.int64)
    for shard in job.shards("scores"):
        h += histogram(shard["relevance"])
    return estimate(h, reference, kind)


def fill_to(kept: np.ndarray, total: int) -> np.ndarray:
    """Per class, how many images to add so the bank holds ``total``: the classes with fewest first (water-filling
    up to a common level; the remainder one each to the lowest-index classes at that level)."""
    need = int(total) - int(kept.sum())
    if need <= 0:
        return np.zeros_like(kept)
    lo, hi = int(kept.min()), int(kept.max()) + need
    while lo < hi:  # largest level L with sum(max(0, L - kept)) <= need
        mid = (lo + hi + 1) // 2
        if np.maximum(mid - kept, 0).sum() <= need:
            lo = mid
        else:
            hi = mid - 1
    add = np.maximum(lo - kept, 0)
    for c in np.flatnonzero(kept + add == lo)[: need - int(add.sum())]:
        add[c] += 1
    return add


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


def select_rows(job: Job, num_classes: int, cfg: RetrieveConfig, est: RelevanceEstimate | None = None) -> np.ndarray:
    """Sorted pool rows to keep (see the module docstring); reads the scores shard by shard. With ``select:
    auto`` only the rows ``est`` calls relevant are candidates (random selection: as many rows, from all)."""
    auto = est if cfg.select == "auto" else None
    keep = min(cfg.num_select, auto.count) if auto is not None else cfg.num_select
    if cfg.selection == "random":
        valid = np.concatenate([v for _, _, _, v in _chunks(job)])  # 1 byte per row
        rows = np.flatnonzero(valid)
        rng = np.random.default_rng(cfg.seed)
        return np.sort(rng.choice(rows, size=min(keep, len(rows)), replace=False))
    cut = auto.cut_bin if auto is not None else None
    if cfg.balance:
        available = np.zeros(num_classes, dtype=np.int64)
        for _, _, pred, valid in _chunks(job, cut):
            available += np.bincount(pred[valid], minlength=num_classes)[:num_classes]
        quota = balanced_quotas(available, keep)
        best = [(np.zeros(0, np.float32), np.zeros(0, np.int64)) for _ in range(num_classes)]
        for i, score, pred, valid in _chunks(job, cut):
            for c in np.flatnonzero(quota):
                m = valid & (pred == c)
                s, r = best[c]
                best[c] = _keep_lowest(np.concatenate([s, score[m]]), np.concatenate([r, i + np.flatnonzero(m)]),
                                       int(quota[c]))
        return np.sort(np.concatenate([r for _, r in best]))
    s, r = np.zeros(0, np.float32), np.zeros(0, np.int64)
    for i, score, _, valid in _chunks(job, cut):
        s, r = _keep_lowest(np.concatenate([s, score[valid]]), np.concatenate([r, i + np.flatnonzero(valid)]),
                            keep)
    return np.sort(r)


class GatherLoop(Loop):
    """One batch of the selected rows read again, labelled by the teacher and written to the job's ``bank`` table
    (a unit of the runner); ``rows`` and the scoring figures travel with its state."""

    def __init__(self, teacher: Classifier, header: BankHeader, pool: WildPool, job: Job, engine: Engine,
                 cfg: RetrieveConfig, state: dict[str, Any]) -> None:
        self.teacher, self.header, self.pool, self.job, self.engine, self.cfg = teacher, header, pool, job, engine, cfg
        self.load_state_dict(state)
        self.batches: Iterator[dict[str, torch.Tensor]] | None = None

    def run(self, index: int) -> None:
        if self.batches is None:  # this process's first batch: after the rows the last checkpoint committed
            self.batches = iter(self.pool.loader(self.rows[index * self.cfg.batch_size:], self.cfg.batch_size,
                                                 self.cfg.workers))
        batch = next(self.batches)
        ok = batch["ok"]
        self.skipped += int((~ok).sum())
        if ok.any():
            logits = teacher_scores(self.teacher, batch["images"][ok], self.engine).cpu()
            self.job.write("bank", **self.header.columns(batch["images"][ok], self.header.task.predict(logits), 0,
                                                         teacher_logits=logits.half(), score=neg_log_pmax(logits),
                                                         source=batch["source"][ok]))

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "scoring": self.scoring, "skipped": self.skipped,
                "bank_rows": self.job.rows("bank")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows, self.scoring, self.skipped = np.asarray(state["rows"]), state["scoring"], int(state["skipped"])
        self.job.truncate("bank", int(state["bank_rows"]))


class TopUpLoop(Loop):
    """One synthesis round of the top-up (a unit of the runner): the method makes a batch aimed at the classes
    the bank lacks (:attr:`Synthesizer.classes`); rows whose teacher label still lacks images are written to the
    job's ``bank`` table with the method as their ``source``, labelled by the teacher as retrieved rows are."""

    def __init__(self, synth: Any, header: BankHeader, teacher: Classifier, engine: Engine, job: Job, source: int,
                 state: dict[str, Any]) -> None:
        self.synth, self.header, self.teacher, self.engine, self.job, self.source = (
            synth, header, teacher, engine, job, source)
        self.load_state_dict(state)

    def run(self, index: int) -> dict[str, Any]:
        if not self.deficit.any():
            return {"missing": 0}
        self.synth.classes = torch.from_numpy(np.repeat(np.arange(len(self.deficit)), self.deficit))
        self.synth.begin_epoch(index)
        images = to_uint8(self.synth.synthesize(index).images)
        logits = teacher_scores(self.teacher, torch.from_numpy(images), self.engine).cpu()
        pred = self.header.task.predict(logits).numpy()
        keep = np.zeros(len(pred), dtype=bool)
        for i, c in enumerate(pred):  # first come, first kept, while the class still lacks images
            if self.deficit[c] > 0:
                keep[i], self.deficit[c] = True, self.deficit[c] - 1
        if keep.any():
            self.job.write("bank", **self.header.columns(images[keep], pred[keep], index + 1,
                                                         teacher_logits=logits[keep].half(),
                                                         score=neg_log_pmax(logits[keep]),
                                                         source=np.full(int(keep.sum()), self.source)))
        return {"missing": int(self.deficit.sum())}

    def describe(self, logs: dict[str, Any] | None) -> str:
        return f"{(logs or {}).get('missing', 0)} still missing"

    def state_dict(self) -> dict[str, Any]:
        return {"synth": self.synth.state_dict(), "deficit": self.deficit.copy(), "bank_rows": self.job.rows("bank"),
                "scoring": self.scoring, "skipped": self.skipped, "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("synth") is not None:
            self.synth.load_state_dict(state["synth"])
        self.deficit = np.asarray(state["deficit"], dtype=np.int64).copy()
        self.scoring, self.skipped, self.rounds = state["scoring"], int(state["skipped"]), int(state["rounds"])
        self.job.truncate("bank", int(state["bank_rows"]))


def top_up(teacher: Classifier, info: Any, header: BankHeader, job: Job, engine: Engine, cfg: RetrieveConfig,
           source: int, scoring: dict[str, Any] | None, skipped: int) -> dict[str, Any]:
    """Fill the bank's ``bank`` table up to ``num_select`` rows with ``cfg.top_up``'s images of the classes that
    lack them (resumable: one checkpoint per round). At most 3x the rounds the deficit needs, plus one. The
    gather's ``scoring`` and ``skipped`` travel in its state (a resumed top-up has no gather to ask)."""
    from dfkd_common.loops.synthesis_rounds import split_params
    from dfkd_common.synthesis import build_synthesizer

    assert cfg.top_up is not None
    run, method_cfg = split_params(cfg.top_up_params, cfg.top_up)
    synth_engine = Engine.create(engine.device, amp=run.amp, channels_last=run.channels_last, where="top_up amp")
    synth = build_synthesizer(cfg.top_up, teacher, info, method_cfg, synth_engine, cfg.seed + cfg.top_up_seed)
    store = JobStore(job, "top_up")
    if store.load() is None:
        target = get_task(info.task).target
        kept = np.zeros(info.num_classes, dtype=np.int64)
        for shard in job.shards("bank"):
            kept += np.bincount(shard[target].astype(np.int64), minlength=info.num_classes)[: info.num_classes]
        deficit = fill_to(kept, cfg.num_select)
        seed_everything(cfg.seed + cfg.top_up_seed)  # the method's augmentations draw from the global generators
        wanted = int(deficit.sum())
        store.save({"loop": {"synth": None, "deficit": deficit, "bank_rows": job.rows("bank"), "scoring": scoring,
                             "skipped": skipped, "rounds": 3 * -(-wanted // synth.cfg.batch_size) + 1 if wanted else 0},
                    "history": [], "done": 0, "seconds": 0.0})
    state = store.load()
    assert state is not None
    loop = TopUpLoop(synth, header, teacher, engine, job, source, state["loop"])
    result = Runner(store, keep=False).run(loop, loop.rounds, f"top up with {cfg.top_up}", "round")
    return {"scoring": loop.scoring, "skipped": loop.skipped, "top_up_method": cfg.top_up,
            "top_up_rounds": loop.rounds, "top_up_seconds": result.seconds,
            "top_up_missing": int(loop.deficit.sum()), "top_up_params": dict(cfg.top_up_params),
            "top_up_precision": synth_engine.precision}


def bank_summary(job: Job, info: Any, names: list[str]) -> dict[str, Any]:
    """Per-class / per-source counts and score figures of the gathered rows (shard by shard)."""
    k = info.num_classes
    per_class = np.zeros(k, dtype=np.int64)
    per_source = np.zeros(len(names), dtype=np.int64)
    scores: list[np.ndarray] = []
    target = get_task(info.task).target
    for shard in job.shards("bank"):
        per_class += np.bincount(shard[target], minlength=k)[:k]
        per_source += np.bincount(shard["source"].astype(np.int64), minlength=len(names))[: len(names)]
        scores.append(shard["score"])
    all_scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    return {
        "selected": int(per_class.sum()),
        "per_class": {info.class_names[c] if c < len(info.class_names) else str(c): int(per_class[c])
                      for c in range(k)},
        "per_source": {names[i]: int(per_source[i]) for i in range(len(names))},
        "score_mean": float(all_scores.mean()) if len(all_scores) else None,
        "score_max": float(all_scores.max()) if len(all_scores) else None,
        "mean_confidence": float(np.exp(-all_scores).mean()) if len(all_scores) else None,
    }


def retrieve(
    teacher: Classifier, meta: ModelMeta, teacher_path: Path, pool: WildPool, out: Path, engine: Engine,
    cfg: RetrieveConfig, on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Score (resumably), select and write the bank; returns the metrics the stage writes to JSON.

    ``on_batch(rows scored so far)`` is called after every scoring batch (tests interrupt a run with it).
    """
    info = meta.dataset
    teacher_sum = file_checksum(teacher_path)
    key = {"pool": pool.fingerprint(), "teacher": teacher_sum, "runner_layout": LAYOUT,
           **{k: v for k, v in asdict(cfg).items() if k != "workers"}}
    t0 = time.perf_counter()
    bank_sources = [s for s in pool.sources if s.spec.startswith("bank:")]
    parent = file_checksum(bank_sources[0].spec[5:]) if len(pool.sources) == 1 and bank_sources else ""
    method = "dfnd" if cfg.selection == "confidence" else "dfnd-random"
    names = pool.names + ([cfg.top_up] if cfg.top_up else [])
    header = BankHeader(channels=info.channels, image_size=info.image_size, kind="retrieved", method=method,
                        dataset=info.to_dict(), params=asdict(cfg), seed=cfg.seed, teacher_checksum=teacher_sum,
                        parent_checksum=parent, optional=("teacher_logits", "score", "source"),
                        source_names=names)
    with Job(out, key) as job:
        scoring, skipped = (gather_phase(teacher, info, header, pool, job, engine, cfg, on_batch)
                            if JobStore(job, "top_up").load() is None else (None, 0))
        topped = (top_up(teacher, info, header, job, engine, cfg, len(pool.names), scoring, skipped)
                  if cfg.top_up else {})
        scoring, skipped = topped.pop("scoring", scoring), topped.pop("skipped", skipped)
        written = bank_summary(job, info, names)
        job.publish_bank(header, {"wild_sources": [{"spec": s.spec, "rows": len(s)} for s in pool.sources],
                                  "pool_size": len(pool), "unreadable": scoring["unreadable"]})
    return {"method": "dfnd", "selection": cfg.selection, "balance": cfg.balance, "num_select": cfg.num_select,
            "pool_size": len(pool), "pool_per_source": _pool_source_counts(pool), **scoring, **written,
            "skipped_unreadable": skipped, **topped, "total_seconds": time.perf_counter() - t0,
            "precision": engine.precision if cfg.amp else "fp32"}


def gather_phase(teacher: Classifier, info: Any, header: BankHeader, pool: WildPool, job: Job, engine: Engine,
                 cfg: RetrieveConfig, on_batch: Callable[[int], None] | None) -> tuple[dict[str, Any], int]:
    """Score and select (unless a gather was under way), then write the selected rows to the ``bank`` table;
    returns the scoring figures and the rows skipped as unreadable."""
    gather = JobStore(job, "gather")
    if gather.load() is None:  # scoring (fresh, or resumed), then the selection, committed as the gather's start
        scoring = score_and_estimate(teacher, info, pool, engine, cfg, job, on_batch)
        rows = select_rows(job, info.num_classes, cfg, RelevanceEstimate(**scoring["relevance"]))
        if len(rows) == 0 and not cfg.top_up:
            raise DfkdError(f"no readable images in the wild pool ({len(pool)} rows, all unreadable)"
                            if scoring["unreadable"] == len(pool) else
                            "no relevant images in the wild pool (select: auto; "
                            f"{scoring['relevance']['reason']}): give --top-up METHOD or --num-select N")
        gather.save({"loop": {"rows": rows, "scoring": scoring, "skipped": 0, "bank_rows": 0}, "history": [],
                     "done": 0, "seconds": 0.0})
    state = gather.load()
    assert state is not None
    loop = GatherLoop(teacher, header, pool, job, engine, cfg, state["loop"])
    Runner(gather, every=cfg.flush_every, keep=False).run(loop, -(-len(loop.rows) // cfg.batch_size),
                                                          "write bank", "batch")
    return loop.scoring, loop.skipped


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
