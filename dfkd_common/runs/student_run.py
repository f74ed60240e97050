"""A student run, from its config to a saved student: what ``dfkd distill`` does, as a library call.

:func:`run` loads the banks, chooses the split the student is measured on (:mod:`dfkd_common.evaluation`), builds
the student side and the feed (a bank in memory, or an online method recording into a job), runs the
distillation loop (:mod:`dfkd_common.loops.distillation`) and writes the checkpoint, the grown bank, the metrics
and the per-epoch plots. Under torchrun every rank runs it; rank 0 writes the artifacts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from dfkd_common import __version__
from dfkd_common.bank import Bank, BankHeader, concat_banks, load_bank, logit_columns
from dfkd_common.bank_stream import StreamConfig, StreamedBank
from dfkd_common.checkpoint import ModelMeta, file_checksum, load_model, now, save_model
from dfkd_common.config import REPLACES, resolve, values
from dfkd_common.dist import World, barrier, current, main_first, rank_path
from dfkd_common.engine import Engine, seed_everything, write_json, write_metrics
from dfkd_common.errors import DfkdError
from dfkd_common.evaluation import breakdown, evaluate, evaluation_split
from dfkd_common.jobs import Job, OutputLock
from dfkd_common.loops.distillation import BankFeed, Distillation, distill
from dfkd_common.loops.runner import JobStore, StateFile, Store
from dfkd_common.models import Classifier, build_for
from dfkd_common.online import FeedContext, RecordedFeed, build_online_feed
from dfkd_common.params import read_section
from dfkd_common.student import StudentSide, TermSetup, check_objective
from dfkd_common.synthesis import SYNTHESIZERS


@dataclass(frozen=True)
class StudentRun(Distillation):
    """``dfkd distill``'s params: the loop's (:class:`Distillation`) and the run's.

    ``weights``/``terms`` are the student's objective, a weighted sum of registered terms (``dfkd methods``)
    with their options; a params section (or ``--set weights=...``) that gives them states the whole objective.
    ``online`` configures ``--online M``: the feed's params (``g_loops``, ``warmup``, ...; DFAD: ``iterations``,
    ...), ``amp`` of the synthesis passes, ``method`` (the CLI's ``--online`` wins) and the method's own params.
    """

    student: str = "lenet5_half"
    student_kwargs: dict[str, Any] = field(default_factory=dict, metadata=REPLACES)
    # the student's feature sites named by module path: {penultimate: PATH, stages: [PATH, ...]}
    student_features: dict[str, Any] = field(default_factory=dict, metadata=REPLACES)
    # the student's own input size (None: the teacher's); the teacher's images are resized to it inside the student
    student_image_size: int | None = None
    weights: dict[str, float] = field(default_factory=lambda: {"kd": 1.0}, metadata=REPLACES)
    terms: dict[str, dict[str, Any]] = field(default_factory=dict, metadata=REPLACES)
    test_dataset: str | None = None  # default: the teacher's dataset
    test: str | None = None  # a labelled test set: a folder of class folders, or a bank (.h5) with labels
    holdout: float = 0.1  # without any test set: the fraction of the bank held out to measure teacher agreement
    data_root: str | None = None
    online: dict[str, Any] = field(default_factory=dict, metadata=REPLACES)
    # banks larger than memory: when and how they are streamed from disk (dfkd_common.bank_stream)
    stream: StreamConfig = field(default_factory=StreamConfig)
    # bf16 autocast for the student/teacher passes (fp32 default: small students suffer); "auto" allowed
    amp: Literal["auto", True, False] = False


def resolve_run(path: Path, name: str | None, sets: list[str] | None = None, online: str | None = None,
                **cli: Any) -> StudentRun:
    """The run's config: defaults, ``distill.common`` + ``distill.<name>`` of the params file (``seed``: the
    top-level ``method_seed`` unless the section gives one), then the CLI; checked, with the objective's terms.

    An online method may publish its own student objective (RGAL: KD at tau 20 + striplet + cd): it replaces
    dfkd's default, so ``dfkd distill --online rgal`` alone runs the published recipe, and a params section or
    ``--set`` that gives ``weights`` or ``terms`` replaces it in turn.
    """
    method = online or (read_section(path, "distill", name).get("online") or {}).get("method")
    objective = SYNTHESIZERS.get(method).student_objective if method in SYNTHESIZERS else None
    base = StudentRun(weights=objective.weights, terms=objective.terms) if objective else StudentRun()
    cfg = resolve(StudentRun, path, "distill", name, sets, where="distill", seed_from="method_seed", base=base, **cli)
    check_objective(cfg.weights, cfg.terms)  # term names and options: before any work
    return cfg


@dataclass
class Paths:
    """What a student run reads and writes (``bank_out``: the grown bank of an online run)."""

    teacher: Path
    out: Path
    banks: list[Path] = field(default_factory=list)
    bank_out: Path | None = None
    metrics: Path | None = None
    plots: Path | None = None

    def bank_described(self) -> str | list[str]:
        if not self.banks:
            return str(None)
        return str(self.banks[0]) if len(self.banks) == 1 else [str(b) for b in self.banks]


def load_banks(banks: list[Path], info: Any, online: bool,
               stream: StreamConfig) -> tuple[Bank | None, list[StreamedBank]]:
    """The banks given, checked against the teacher's input: those ``stream`` keeps on disk, and the others read
    whole and concatenated (None: none in memory)."""
    if not banks:
        return None, []
    # a file no larger than the limit holds no more image bytes than that: read whole without a look inside
    looked = [StreamedBank.open(b) if b.is_file() and stream.streams(b.stat().st_size) else None for b in banks]
    streamed = [s for s in looked if s is not None and stream.streams(s.image_bytes)]
    whole = [load_bank(b) for b, s in zip(banks, looked, strict=True) if s is None or s not in streamed]
    for part in [*streamed, *whole]:
        part.check_compatible(info)
    data = concat_banks(whole) if whole else None
    if not online and (len(data) if data is not None else 0) + sum(len(b) for b in streamed) == 0:
        raise DfkdError(f"bank {' + '.join(str(b) for b in banks)} is empty")
    return data, streamed


def online_feed(method: str, cfg: dict[str, Any], t_model: Classifier, teacher: Path, info: Any, data: Bank | None,
                job: Job, run_cfg: StudentRun, engine: Engine, seed_offset: int = 0,
                parent: Path | None = None) -> RecordedFeed:
    """The online feed recording into ``job`` (its synthesis engine picks its own precision: ``online.amp``);
    its synthesizer is seeded ``seed + seed_offset`` (a rank's own rounds under torchrun); ``parent``: the first
    bank given (its checksum is the grown bank's ``parent_checksum``; default: ``data``'s)."""
    cfg = dict(cfg)
    syn_engine = engine.sibling(cfg.pop("amp", "auto"), where="distill: param online.amp")
    record_logits = cfg.pop("teacher_logits", None)  # the recorded rows' logits (None: the task's default)
    if record_logits not in (None, True, False):
        raise DfkdError(f"distill: param online.teacher_logits must be true, false or null, not {record_logits!r}")
    header = BankHeader(
        channels=info.channels, image_size=info.image_size, kind="synthetic", method=method,
        dataset=info.to_dict(), params={"online": cfg, "distill": values(run_cfg)}, seed=run_cfg.seed,
        teacher_checksum=file_checksum(teacher),
        parent_checksum=file_checksum(parent or data.path) if parent or data is not None else "",
        optional=logit_columns(info.task, record_logits),
    )
    ctx = FeedContext(t_model, info, syn_engine, job, header, data, run_cfg.seed + seed_offset, run_cfg.batch_size,
                      run_cfg.epochs)
    return build_online_feed(method, ctx, cfg)


def run(cfg: StudentRun, paths: Paths, online: str | None = None, name: str | None = None, device: str = "auto",
        say: Callable[[str], None] = print) -> dict[str, Any]:
    """Distill a student as ``cfg`` says, resumably; returns the run's summary (what its metrics file holds)."""
    online_cfg = dict(cfg.online)
    method = online or online_cfg.pop("method", None)
    online_cfg.pop("method", None)
    if not paths.banks and method is None:
        raise DfkdError("--bank is required (or --online METHOD to synthesise during training)")
    if method is not None:
        paths = replace(paths, bank_out=paths.bank_out or paths.out.with_name(f"{paths.out.stem}.bank.h5"))
    world = current()
    seed_everything(cfg.seed)
    engine = Engine.create(device, amp=cfg.amp)
    t_model, t_meta = load_model(paths.teacher, engine.device)
    info = t_meta.dataset
    data, streamed = load_banks(paths.banks, info, method is not None, cfg.stream)
    with main_first():  # a test split to download: once
        chosen = evaluation_split(info, cfg.test, cfg.test_dataset, cfg.data_root, cfg.holdout, cfg.seed, data,
                                  t_model, engine, method is not None)
    test, data = chosen.split, chosen.train
    # the teacher measured on the same split as the student: x_teacher compares like with like (a --test folder
    # is not the teacher's own test split; on held-out bank images the teacher agrees with itself)
    t_scores = evaluate(t_model, test, engine)
    say(f"evaluated on {chosen.described}; teacher {t_meta.task.headline_label} there "
        f"{t_scores[t_meta.task.headline]:.4f}")
    s_model = build_for(cfg.student, info, cfg.student_kwargs, cfg.student_features, cfg.student_image_size)
    # the teacher checkpoint's measured accuracy, for terms that need it (na: the Q diagonal)
    side = StudentSide(s_model, cfg.weights, cfg.terms,
                       TermSetup(t_model, s_model, info.channels, info.image_size, t_meta.metrics.get("test_acc"),
                                 info.task))
    # the key: what changes the run's result (stream settings only where a bank streams; workers/prefetch never)
    run_values = {k: v for k, v in values(cfg).items() if k != "stream"}
    if streamed:
        run_values["stream"] = {k: v for k, v in values(cfg.stream).items() if k not in ("workers", "prefetch")}
    key = {**run_values, "bank": paths.bank_described(), "teacher": str(paths.teacher), "online": method,
           "online_cfg": online_cfg, "bank_out": str(paths.bank_out),
           **({"world_size": world.size} if world.distributed else {})}
    names = " + ".join(b.name for b in paths.banks)
    rows = (len(data) if data is not None else 0) + sum(len(b) for b in streamed)
    with contextlib.ExitStack() as stack:
        if world.main:  # a second run on the same student refuses meanwhile
            stack.enter_context(OutputLock(paths.out))
        job: Job | None = None
        if method is not None:
            assert paths.bank_out is not None
            # every rank records the whole grown bank in a job of its own (its resume state); rank 0 publishes
            job = stack.enter_context(Job(rank_path(paths.bank_out, world), key))
            feed: BankFeed = online_feed(method, online_cfg, t_model, paths.teacher, info, data, job, cfg, engine,
                                         seed_offset=world.rank, parent=paths.banks[0] if paths.banks else None)
            store: Store = JobStore(job)
            source = f"online {method}" + (f" + {names} ({rows} images)" if rows else "")
        else:
            feed = (BankFeed(data.images, data.labels, engine.device) if data is not None
                    else BankFeed(torch.zeros(0, *info.shape, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64),
                                  engine.device))
            store = StateFile.for_output(rank_path(paths.out, world), key)  # every rank resumes its own state
            source = f"{names} ({rows} images)"
        feed.add_streams(streamed, cfg.stream)
        if streamed:
            source += f"; streamed from disk: {', '.join(b.path.name for b in streamed)}"
        say(f"distill {cfg.student} from {source}")
        say(f"student: {side.describe()}; {engine.describe()}"
            + (f"; {world.size} processes (DDP), {cfg.batch_size} images per rank and step" if world.distributed
               else ""))
        if isinstance(feed, RecordedFeed):
            say(f"{method} synthesis: {feed.ctx.engine.describe()}")
        t0 = time.perf_counter()
        scores, history = distill(t_model, side, feed, test, cfg, engine, store)  # the loop reads its own fields
        seconds = time.perf_counter() - t0
        summary = {}
        if world.main:  # rank 0 writes the artifacts; the others keep their state until it has
            meta = ModelMeta(cfg.student, cfg.student_kwargs, info, scores,
                             {**values(cfg), "bank": paths.bank_described()}, now(), __version__, "student")
            save_model(paths.out, s_model, meta)
            summary = summarise(cfg, paths, name, t_meta, scores, t_scores, history, seconds, chosen.described,
                                rows, engine, world)
            summary.update(breakdown(s_model, test, engine))
            if isinstance(feed, RecordedFeed) and job is not None:
                stats = feed.stats()
                job.publish_bank(feed.ctx.header, stats)
                summary.update({"online": method, "bank_out": str(paths.bank_out), "bank_size": stats["bank_rows"],
                                **{f"online_{k}": v for k, v in stats.items()}})
            write_outputs(paths, summary, scores, history, seconds, t_meta.task.name)
        barrier()
        store.clear()
        if job is not None and not world.main:
            job.done = True  # rank 0 published the bank: this rank's copy of the work goes
    if world.main:
        headline = t_meta.task.headline
        say(f"student {scores[headline]:.4f} on {chosen.described} (teacher {t_scores[headline]:.4f}) -> {paths.out}")
    return summary


def summarise(cfg: StudentRun, paths: Paths, name: str | None, t_meta: ModelMeta, scores: dict[str, float],
              t_scores: dict[str, float], history: list[dict[str, Any]], seconds: float, evaluated_on: str,
              rows: int, engine: Engine, world: World) -> dict[str, Any]:
    """The run's summary: the final student's scores on real held-out data beside the teacher's on the same data
    (``t_scores``), and the best epoch's labelled as chosen on test (for reference only)."""
    task = t_meta.task
    headline = task.headline
    acc, t_acc = scores[headline], t_scores[headline]
    return {"name": name or cfg.student, "task": task.name, **scores,
            f"teacher_{headline.removeprefix('test_')}": t_acc,
            "ratio_to_teacher": (acc / t_acc) if t_acc else None, "bank": paths.bank_described(),
            "bank_size": rows, "epochs": cfg.epochs, "seconds": seconds,
            "precision": engine.precision, "evaluated_on": evaluated_on, "world_size": world.size,
            f"best_epoch_{headline} (selected on test, for reference only)":
                max((h[headline] for h in history), default=acc)}


def write_outputs(paths: Paths, summary: dict[str, Any], scores: dict[str, float], history: list[dict[str, Any]],
                  seconds: float, task: str) -> None:
    """The metrics file (the summary) and the per-epoch plots file, where asked for."""
    if paths.metrics:
        write_metrics(paths.metrics, summary, task=task, **scores, x_teacher=summary["ratio_to_teacher"],
                      seconds=seconds, images=summary["bank_size"], images_per_s=summary.get("online_images_per_s"))
    if paths.plots:
        write_json(paths.plots, history)
