"""``dfkd teacher train``: train a teacher on a registered dataset and write its checkpoint + metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from dfkd_common import __version__
from dfkd_common.augment_ops import augment_config
from dfkd_common.checkpoint import ModelMeta, now, save_model
from dfkd_common.data import get_dataset
from dfkd_common.engine import AMP_VALUES, Engine, ensure_writable, seed_everything, write_json
from dfkd_common.jobs import OutputLock
from dfkd_common.models import build_model
from dfkd_common.training import Resume, train_supervised
from stages.common import DeviceOpt, ParamsOpt, SetOpt, apply_overrides, console, errors, load_params, require

app = typer.Typer(help="Teacher models.", no_args_is_help=True)

DEFAULTS: dict[str, Any] = {
    "dataset": "mnist5k",
    "dataset_kwargs": {},  # options of the dataset's factory, e.g. imagefolder's root, image_size, channels
    "arch": "lenet5",
    "arch_kwargs": {},
    "epochs": 20,
    "batch_size": 128,
    "lr": 0.05,
    "optimizer": "sgd",
    "weight_decay": 5e-4,
    "augment": {"crop_pad": 2, "flip": False},
    "data_root": None,
    "seed": 0,
    "amp": False,
}
TYPES: dict[str, Any] = {"data_root": str, "amp": AMP_VALUES}  # params whose default is None, closed choices


@app.command("train")
@errors
def train(
    out: Path = typer.Option(..., "--out", help="checkpoint to write (.safetensors)"),
    metrics: Path | None = typer.Option(None, "--metrics", help="metrics JSON to write"),
    dataset: str | None = typer.Option(None, help="registered dataset name"),
    arch: str | None = typer.Option(None, help="registered model name"),
    epochs: int | None = typer.Option(None),
    seed: int | None = typer.Option(None),
    params_file: Path = ParamsOpt,
    sets: list[str] | None = SetOpt,
    device: str = DeviceOpt,
) -> None:
    """Train a teacher, evaluate it on the real test split, write checkpoint (+ metrics)."""
    params = apply_overrides(
        load_params(params_file, "teacher"), sets, defaults=DEFAULTS, where="teacher", types=TYPES,
        dataset=dataset, arch=arch, epochs=epochs, seed=seed,
    )
    require(params, "dataset", "arch")
    ensure_writable(out, metrics)
    seed_everything(int(params["seed"]))
    spec = get_dataset(params["dataset"], **params["dataset_kwargs"])
    info = spec.info
    model = build_model(params["arch"], info.num_classes, info.channels, info.mean, info.std,
                        image_size=info.image_size, **params["arch_kwargs"])
    train_split = spec.load("train", params["data_root"])
    test_split = spec.load("test", params["data_root"])
    engine = Engine.create(device, amp=params["amp"])
    console.print(f"teacher {params['arch']} on {info.name}: {len(train_split)} train / {len(test_split)} test; "
                  f"{engine.describe()}")
    resume = Resume.for_output(out, params)
    with OutputLock(out):  # a second run on the same output refuses while this one lives
        acc, history = train_supervised(
            model, train_split, test_split,
            epochs=int(params["epochs"]), batch_size=int(params["batch_size"]), lr=float(params["lr"]),
            optimizer=params["optimizer"], weight_decay=float(params["weight_decay"]),
            augment=augment_config(params["augment"]), engine=engine, seed=int(params["seed"]), resume=resume,
        )
        meta = ModelMeta(params["arch"], params["arch_kwargs"], info, acc, params, now(), __version__, "teacher")
        save_model(out, model, meta)
        if metrics:
            write_json(metrics, {"test_acc": acc, "arch": params["arch"], "dataset": info.name,
                                 "precision": engine.precision, "epochs": len(history), "history": history})
        resume.clear()
    console.print(f"teacher test accuracy {acc:.4f} -> {out}")


if __name__ == "__main__":
    app()
