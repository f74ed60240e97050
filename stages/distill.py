"""``dfkd distill``: train a student from a bank (or, with ``--online M``, from a bank grown during training)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from dfkd_common import __version__
from dfkd_common.augment_ops import augment_config
from dfkd_common.bank import load_bank
from dfkd_common.checkpoint import ModelMeta, load_model, now, save_model
from dfkd_common.data import get_dataset
from dfkd_common.distill import STUDENT_LOSSES, BankFeed, DistillConfig, distill
from dfkd_common.engine import Engine, seed_everything, write_json
from dfkd_common.errors import DfkdError
from dfkd_common.models import build_model
from dfkd_common.training import Resume
from stages.common import DeviceOpt, ParamsOpt, SetOpt, apply_overrides, console, errors, load_params

DEFAULTS: dict[str, Any] = {
    "student": "lenet5_half",
    "student_kwargs": {},
    "loss": "kd",
    "loss_cfg": {},
    "epochs": 20,
    "batch_size": 256,
    "kd_steps": None,
    "lr": 0.05,
    "optimizer": "sgd",
    "weight_decay": 5e-4,
    "augment": {"crop_pad": 2, "flip": False},
    "amp": False,
    "seed": 0,
    "test_dataset": None,  # default: the teacher's dataset
    "data_root": None,
}


@errors
def main(
    teacher: Path = typer.Option(..., "--teacher", help="teacher checkpoint"),
    bank: Path | None = typer.Option(None, "--bank", help="image bank (.h5) to distill from"),
    out: Path = typer.Option(..., "--out", help="student checkpoint to write"),
    metrics: Path | None = typer.Option(None, "--metrics", help="final metrics JSON"),
    plots: Path | None = typer.Option(None, "--plots", help="per-epoch metrics JSON (dvc plots)"),
    name: str | None = typer.Option(None, "--name", help="params profile under distill: (e.g. the method)"),
    student: str | None = typer.Option(None, "--student", help="student architecture"),
    loss: str | None = typer.Option(None, "--loss", help="student loss (kd, ...)"),
    epochs: int | None = typer.Option(None),
    seed: int | None = typer.Option(None),
    params_file: Path = ParamsOpt,
    sets: list[str] | None = SetOpt,
    device: str = DeviceOpt,
) -> None:
    """Distill a student from a bank and evaluate it on the teacher's real test split."""
    params = apply_overrides(
        {**DEFAULTS, **load_params(params_file, "distill", name)}, sets,
        student=student, loss=loss, epochs=epochs, seed=seed,
    )
    loss_cls = STUDENT_LOSSES.get(params["loss"])
    if bank is None:
        raise DfkdError("--bank is required")
    seed_everything(int(params["seed"]))
    engine = Engine.create(device, amp=bool(params["amp"]))
    t_model, t_meta = load_model(teacher, engine.device)
    info = t_meta.dataset
    data = load_bank(bank)
    data.check_compatible(info.channels, info.image_size, info.num_classes)
    if len(data) == 0:
        raise DfkdError(f"bank {bank} is empty")
    test = get_dataset(params["test_dataset"] or info.name).load("test", params["data_root"])
    s_model = build_model(params["student"], info.num_classes, info.channels, info.mean, info.std,
                          **params["student_kwargs"])
    loss_fn = loss_cls(params["loss_cfg"], t_model, s_model)
    cfg = DistillConfig(
        epochs=int(params["epochs"]), batch_size=int(params["batch_size"]),
        kd_steps=params["kd_steps"], lr=float(params["lr"]), optimizer=params["optimizer"],
        weight_decay=float(params["weight_decay"]), augment=augment_config(params["augment"]),
        amp=bool(params["amp"]), seed=int(params["seed"]),
    )
    feed = BankFeed(data.images, data.labels, engine.device)
    console.print(f"distill {params['student']} from {bank.name} ({len(data)} images), "
                  f"teacher acc {t_meta.accuracy}")
    resume = Resume.for_output(out, {**params, "bank": str(bank), "teacher": str(teacher)})
    t0 = time.perf_counter()
    acc, history = distill(t_model, s_model, feed, test, loss_fn, cfg, engine, resume)
    seconds = time.perf_counter() - t0
    meta = ModelMeta(params["student"], params["student_kwargs"], info, acc,
                     {**params, "bank": str(bank)}, now(), __version__, "student")
    save_model(out, s_model, meta)
    t_acc = t_meta.accuracy
    summary = {"name": name or params["student"], "test_acc": acc, "teacher_acc": t_acc,
               "ratio_to_teacher": (acc / t_acc) if t_acc else None, "bank": str(bank),
               "bank_size": len(data), "epochs": cfg.epochs, "seconds": seconds,
               "best_epoch_test_acc (selected on test, for reference only)":
                   max((h["test_acc"] for h in history), default=acc)}
    if metrics:
        write_json(metrics, summary)
    if plots:
        write_json(plots, history)
    resume.clear()
    console.print(f"student test accuracy {acc:.4f} (teacher {t_acc}) -> {out}")


if __name__ == "__main__":
    typer.run(main)
