"""``dfkd distill``: train a student from a bank (or, with ``--online M``, from a bank grown during training)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import typer

from dfkd_common import __version__
from dfkd_common.bank import Bank, BankHeader, concat_banks, load_bank
from dfkd_common.checkpoint import ModelMeta, file_checksum, load_model, now, save_model
from dfkd_common.config import parse, values
from dfkd_common.dist import barrier, main_first, rank_path
from dfkd_common.engine import AMP_VALUES, Engine, ensure_writable, seed_everything, write_json, write_metrics
from dfkd_common.errors import DfkdError
from dfkd_common.evaluation import evaluation_split
from dfkd_common.jobs import Job
from dfkd_common.loops.distillation import BankFeed, Distillation, distill
from dfkd_common.loops.runner import JobStore, StateFile, Store
from dfkd_common.models import build_for
from dfkd_common.online import FeedContext, RecordedFeed, build_online_feed
from dfkd_common.student import StudentSide, TermSetup, check_objective
from dfkd_common.synthesis import SYNTHESIZERS
from stages.common import (
    DeviceOpt,
    ParamsOpt,
    SetOpt,
    apply_overrides,
    console,
    errors,
    join_world,
    load_params,
    primary_lock,
)

DEFAULTS: dict[str, Any] = {
    "student": "lenet5_half",
    "student_kwargs": {},
    # the student's objective: a weighted sum of registered terms (`dfkd methods`), with their options
    "weights": {"kd": 1.0},  # e.g. {kd: 1, na: 1} (DFND), {kd: 0, l1: 1} (DFAD)
    "terms": {},  # options per term, e.g. {kd: {tau: 20}}; checked against each term's own
    "test_dataset": None,  # default: the teacher's dataset
    "test": None,  # a labelled test set: a folder of class folders, or a bank (.h5) with labels
    "holdout": 0.1,  # without any test set: the fraction of the bank held out to measure teacher agreement
    "data_root": None,
    # online synthesis (`--online M`): feed params (g_loops, warmup, warmup_loops; DFAD: iterations, ...),
    # `amp` for the synthesis passes, `method` (the CLI's --online wins), and the method's own params
    "online": {},
    "amp": False,  # bf16 autocast for student/teacher passes (fp32 default: small students suffer); "auto" ok
    **values(Distillation()),  # epochs, batch_size, kd_steps, lr, optimizer, weight_decay, augment, seed, ...
}
# params whose default is None, and closed choices
TYPES: dict[str, Any] = {"kd_steps": int, "test_dataset": str, "data_root": str, "amp": AMP_VALUES, "test": str,
                         "student_warmup": ("train", "skip"), "optimizer": ("sgd", "adam")}


def resolve_params(params_file: Path, name: str | None, sets: list[str] | None = None, online: str | None = None,
                   **cli: Any) -> dict[str, Any]:
    """The run's params: defaults, ``distill.common`` + ``distill.<name>`` of the file, then the CLI (checked).

    An online method may publish its own student objective (RGAL: KD at tau 20 + striplet + cd): it replaces
    dfkd's defaults, so ``dfkd distill --online rgal`` alone runs the published recipe, and a params section or
    ``--set`` that gives ``weights`` or ``terms`` replaces it in turn.
    """
    file_params = load_params(params_file, "distill", name)
    method = online or (file_params.get("online") or {}).get("method")
    cls = SYNTHESIZERS.get(method) if method in SYNTHESIZERS else None
    defaults = {**DEFAULTS, **(getattr(cls, "student_defaults", None) or {})}
    return apply_overrides(file_params, sets, defaults=defaults, where="distill", types=TYPES, **cli)


@errors
def main(
    teacher: Path = typer.Option(..., "--teacher", help="teacher checkpoint"),
    banks: list[Path] | None = typer.Option(None, "--bank", help="image bank (.h5) to distill from (--online: "
                                            "optional initial bank); repeat to train on several at once"),
    online: str | None = typer.Option(None, "--online", help="keep synthesising with METHOD against the student"),
    bank_out: Path | None = typer.Option(None, "--bank-out", help="with --online: the grown bank to write "
                                         "(default: <out>.bank.h5 beside the student)"),
    out: Path = typer.Option(..., "--out", help="student checkpoint to write"),
    metrics: Path | None = typer.Option(None, "--metrics", help="final metrics JSON"),
    plots: Path | None = typer.Option(None, "--plots", help="per-epoch metrics JSON (dvc plots)"),
    name: str | None = typer.Option(None, "--name", help="params profile under distill: (e.g. the method)"),
    student: str | None = typer.Option(None, "--student", help="student architecture"),
    epochs: int | None = typer.Option(None),
    seed: int | None = typer.Option(None),
    test: Path | None = typer.Option(None, "--test", help="labelled test set: a folder of class folders, or a bank "
                                     "(.h5) with labels (default: the teacher dataset's test split)"),
    params_file: Path = ParamsOpt,
    sets: list[str] | None = SetOpt,
    device: str = DeviceOpt,
) -> None:
    """Distill a student from a bank and evaluate it on real test data (the teacher dataset's test split, or
    ``--test``; for a teacher imported for data not here, its agreement with the teacher on held-out bank images).

    With ``--online M`` the student trains on images that method M keeps making against it (rounds appended to
    the bank between epochs, or fresh generator batches for DFAD); the grown bank is written to ``--bank-out``.
    Rerunning an interrupted command resumes it (student, optimiser, synthesizer and bank).
    """
    params = resolve_params(params_file, name, sets, online=online, student=student, epochs=epochs, seed=seed,
                            test=str(test) if test else None)
    check_objective(params["weights"], params["terms"])  # term names and options: before any work
    ensure_writable(out, metrics, plots, bank_out)
    online_cfg = dict(params.get("online") or {})
    method = online or online_cfg.pop("method", None)
    online_cfg.pop("method", None)
    bank: Path | None = banks[0] if banks else None
    bank_desc = (str(bank) if len(banks or []) == 1 else [str(b) for b in banks]) if banks else str(None)
    if bank is None and method is None:
        raise DfkdError("--bank is required (or --online METHOD to synthesise during training)")
    world = join_world()
    seed_everything(int(params["seed"]))
    engine = Engine.create(device, amp=params["amp"])
    t_model, t_meta = load_model(teacher, engine.device)
    info = t_meta.dataset
    data = None
    if banks:
        parts = [load_bank(b) for b in banks]
        for part in parts:
            part.check_compatible(info)
        data = concat_banks(parts)
        if len(data) == 0 and method is None:
            raise DfkdError(f"bank {bank_desc} is empty")
    with main_first():  # a test split to download: once
        chosen = evaluation_split(info, params["test"], params["test_dataset"], params["data_root"],
                                  params["holdout"], params["seed"], data, t_model, engine, method is not None)
    test, evaluated_on, data = chosen.split, chosen.described, chosen.train
    console.print(f"evaluated on {evaluated_on}")
    s_model = build_for(params["student"], info, params["student_kwargs"])
    # the teacher checkpoint's measured accuracy, for terms that need it (na: the Q diagonal)
    side = StudentSide(s_model, params["weights"], params["terms"],
                       TermSetup(t_model, s_model, info.channels, info.image_size, t_meta.metrics.get("test_acc"),
                                 info.task))
    task = t_meta.task
    headline = task.headline
    loop_keys = values(Distillation())
    cfg = parse(Distillation, {k: v for k, v in params.items() if k in loop_keys}, "distill")
    if method is not None:
        bank_out = bank_out or out.with_name(f"{out.stem}.bank.h5")
    key = {**params, "bank": bank_desc, "teacher": str(teacher), "online": method, "online_cfg": online_cfg,
           "bank_out": str(bank_out), **({"world_size": world.size} if world.distributed else {})}
    names = " + ".join(b.name for b in banks or [])
    with contextlib.ExitStack() as stack:
        stack.enter_context(primary_lock(out, world))  # a second run on the same student refuses meanwhile
        job: Job | None = None
        if method is not None:
            assert bank_out is not None
            # every rank records the whole grown bank in a job of its own (its resume state); rank 0 publishes
            job = stack.enter_context(Job(rank_path(bank_out, world), key))
            feed: BankFeed = online_feed(method, online_cfg, t_model, teacher, info, data, job, params, engine,
                                         seed_offset=world.rank)
            store: Store = JobStore(job)
            source = f"online {method}" + (f" + {names} ({len(data)} images)" if bank and data else "")
        else:
            assert data is not None and bank is not None
            feed = BankFeed(data.images, data.labels, engine.device)
            store = StateFile.for_output(rank_path(out, world), key)  # every rank resumes its own state
            source = f"{names} ({len(data)} images)"
        console.print(f"distill {params['student']} from {source}, teacher {task.headline_label} {t_meta.headline}")
        console.print(f"student: {side.describe()}; {engine.describe()}"
                      + (f"; {world.size} processes (DDP), {cfg.batch_size} images per rank and step"
                         if world.distributed else ""))
        if isinstance(feed, RecordedFeed):
            console.print(f"{method} synthesis: {feed.ctx.engine.describe()}")
        t0 = time.perf_counter()
        scores, history = distill(t_model, side, feed, test, cfg, engine, store)
        acc = scores[headline]
        seconds = time.perf_counter() - t0
        if not world.main:  # rank 0 writes the artifacts; the others keep their state until it has
            barrier()
            store.clear()
            if job is not None:
                job.done = True  # rank 0 published the bank: this rank's copy of the work goes
            return
        meta = ModelMeta(params["student"], params["student_kwargs"], info, scores,
                         {**params, "bank": bank_desc}, now(), __version__, "student")
        save_model(out, s_model, meta)
        t_acc = t_meta.headline
        summary = {"name": name or params["student"], "task": task.name, **scores,
                   f"teacher_{headline.removeprefix('test_')}": t_acc,
                   "ratio_to_teacher": (acc / t_acc) if t_acc else None, "bank": bank_desc,
                   "bank_size": len(data) if data is not None else 0, "epochs": cfg.epochs, "seconds": seconds,
                   "precision": engine.precision, "evaluated_on": evaluated_on, "world_size": world.size,
                   f"best_epoch_{headline} (selected on test, for reference only)":
                       max((h[headline] for h in history), default=acc)}
        if isinstance(feed, RecordedFeed) and job is not None:
            stats = feed.stats()
            job.publish_bank(feed.ctx.header, stats)
            summary.update({"online": method, "bank_out": str(bank_out), "bank_size": stats["bank_rows"],
                            **{f"online_{k}": v for k, v in stats.items()}})
        if metrics:
            write_metrics(metrics, summary, task=task.name, **scores, x_teacher=summary["ratio_to_teacher"],
                          seconds=seconds, images=summary["bank_size"],
                          images_per_s=summary.get("online_images_per_s"))
        if plots:
            write_json(plots, history)
        barrier()
        store.clear()
    console.print(f"student {acc:.4f} on {evaluated_on} (teacher {t_acc}) -> {out}")


def online_feed(
    method: str, cfg: dict[str, Any], t_model: Any, teacher: Path, info: Any, data: Bank | None, job: Job,
    params: dict[str, Any], engine: Engine, seed_offset: int = 0,
) -> RecordedFeed:
    """The online feed recording into ``job`` (its synthesis engine picks its own precision: ``online.amp``);
    its synthesizer is seeded ``seed + seed_offset`` (a rank's own rounds under torchrun)."""
    syn_engine = engine.sibling(cfg.pop("amp", "auto"), where="distill: param online.amp")
    header = BankHeader(
        channels=info.channels, image_size=info.image_size, kind="synthetic", method=method,
        dataset=info.to_dict(), params={"online": cfg, "distill": params}, seed=int(params["seed"]),
        teacher_checksum=file_checksum(teacher),
        parent_checksum=file_checksum(data.path) if data is not None else "",
        optional=("teacher_logits",),
    )
    ctx = FeedContext(t_model, info, syn_engine, job, header, data, int(params["seed"]) + seed_offset,
                      int(params["batch_size"]), int(params["epochs"]))
    return build_online_feed(method, ctx, cfg)


if __name__ == "__main__":
    typer.run(main)
