"""``dfkd teacher train|import``: train a teacher on a registered dataset, or import one trained elsewhere.

Both write the same artifact (a checkpoint whose metadata rebuilds the model) and read the same ``teacher``
section of the params file; ``source: train | import`` in it lets a study's ``dvc.yaml`` run either
(``dfkd teacher ${teacher.source} ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from dfkd_common import __version__
from dfkd_common.checkpoint import ModelMeta, file_checksum, now, save_model
from dfkd_common.config import parse
from dfkd_common.data import DatasetInfo, get_dataset
from dfkd_common.dist import barrier, main_first, rank_path
from dfkd_common.engine import AMP_VALUES, Engine, ensure_writable, seed_everything, write_metrics
from dfkd_common.errors import DfkdError
from dfkd_common.evaluation import evaluate
from dfkd_common.geometry import shape_str
from dfkd_common.imports import KEYMAPS, load_weights, read_weights
from dfkd_common.jobs import OutputLock
from dfkd_common.loops.runner import StateFile
from dfkd_common.loops.teacher_training import TeacherTraining, train_teacher
from dfkd_common.models import build_for
from dfkd_common.tasks import get_task
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
    require,
    stage_app,
)

app = stage_app("teacher")

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
    # import (dfkd teacher import): the weights file, the key map of its authors' code, train or import
    "source": "train",
    "weights": None,
    "keys": None,
}
# params whose default is None, and closed choices
TYPES: dict[str, Any] = {"data_root": str, "amp": AMP_VALUES, "weights": str, "keys": str,
                         "source": ("train", "import")}


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
    world = join_world()
    seed_everything(int(params["seed"]))
    spec = get_dataset(params["dataset"], **params["dataset_kwargs"])
    info = spec.info
    model = build_for(params["arch"], info, params["arch_kwargs"])
    with main_first():  # one download, not one per rank
        train_split = spec.load("train", params["data_root"])
        test_split = spec.load("test", params["data_root"])
    engine = Engine.create(device, amp=params["amp"])
    console.print(f"teacher {params['arch']} on {info.name}: {len(train_split)} train / {len(test_split)} test; "
                  f"{engine.describe()}" + (f"; {world.size} processes (DDP)" if world.distributed else ""))
    store = StateFile.for_output(rank_path(out, world),
                                 {**params, "world_size": world.size} if world.distributed else params)
    loop = parse(TeacherTraining, {k: params[k] for k in ("epochs", "batch_size", "lr", "optimizer", "weight_decay",
                                                           "augment", "seed")}, "teacher")
    with primary_lock(out, world):  # a second run on the same output refuses while this one lives
        scores, history = train_teacher(model, train_split, test_split, loop, engine, store)
        if world.main:
            meta = ModelMeta(params["arch"], params["arch_kwargs"], info, scores, params, now(), __version__,
                             "teacher")
            save_model(out, model, meta)
            if metrics:
                write_metrics(metrics, {"task": info.task, **scores, "arch": params["arch"], "dataset": info.name,
                                        "precision": engine.precision, "epochs": len(history), "history": history,
                                        "world_size": world.size}, task=info.task, **scores)
        barrier()  # every rank's state stays until the artifact is written
        store.clear()
    task = get_task(info.task)
    console.print(f"teacher {task.headline_label} {scores[task.headline]:.4f} -> {out}")


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise DfkdError(f"--{what} takes comma-separated numbers, got {text!r}") from None


@app.command("import")
@errors
def import_(
    out: Path = typer.Option(..., "--out", help="checkpoint to write (.safetensors)"),
    arch: str | None = typer.Option(None, "--arch", help="zoo architecture, or torchvision:NAME"),
    weights: Path | None = typer.Option(None, "--weights", help=".safetensors, or .pth/.pt state dict (read "
                                        "with torch.load(weights_only=True))"),
    dataset: str | None = typer.Option(None, "--dataset", help="registered dataset the teacher classifies"),
    keys: str | None = typer.Option(None, "--keys", help="key map of the authors' code (cmi, dfad; see `dfkd "
                                    "methods`)"),
    arch_kwargs: list[str] | None = typer.Option(None, "--arch-kwargs", help="architecture option K=V (repeatable)"),
    image_size: int | None = typer.Option(None, "--image-size", help="input size, without a registered dataset"),
    channels: int | None = typer.Option(None, "--channels", help="input channels, without a registered dataset"),
    mean: str | None = typer.Option(None, "--mean", help="input normalisation mean, comma-separated"),
    std: str | None = typer.Option(None, "--std", help="input normalisation std, comma-separated"),
    classes: int | None = typer.Option(None, "--classes", help="number of classes, without a registered dataset"),
    class_names: Path | None = typer.Option(None, "--class-names", help="file with one class name per line"),
    metrics: Path | None = typer.Option(None, "--metrics", help="metrics JSON to write"),
    params_file: Path = ParamsOpt,
    sets: list[str] | None = SetOpt,
    device: str = DeviceOpt,
) -> None:
    """Import a teacher trained elsewhere: its weights into a zoo (or torchvision) architecture, checked key by
    key, with the accuracy on the dataset's test split where one can be loaded (else recorded as unmeasured)."""
    extra = [f"arch_kwargs.{kv}" for kv in (arch_kwargs or [])]
    section = load_params(params_file, "teacher")
    params = apply_overrides(
        section, [*extra, *(sets or [])], defaults=DEFAULTS, where="teacher",
        types=TYPES, dataset=dataset, arch=arch, weights=str(weights) if weights else None, keys=keys,
    )
    require(params, "arch", "weights")
    ensure_writable(out, metrics)
    keymap = KEYMAPS.get(params["keys"]) if params["keys"] else None
    spec = None  # a registered dataset: named here, or in the params file when no input is described instead
    described = any(v is not None for v in (image_size, channels, classes))
    if dataset or ("dataset" in section and not described):
        spec = get_dataset(params["dataset"], **params["dataset_kwargs"])
    info = imported_info(spec.info if spec else None, params["arch"], keymap, image_size, channels, classes,
                         _floats(mean, "mean"), _floats(std, "std"), class_names)
    kwargs = {**(keymap.arch_kwargs.get(params["arch"], {}) if keymap else {}), **params["arch_kwargs"]}
    model = build_for(params["arch"], info, kwargs)
    state = read_weights(params["weights"])
    if keymap is not None:
        state = keymap.convert(params["arch"], state)
    load_weights(model.net, state, str(params["weights"]))
    engine = Engine.create(device, amp=False)
    scores: dict[str, float] = {}
    why = ""
    if spec is not None:
        try:
            test = spec.load("test", params["data_root"])
            scores = evaluate(engine.model(model), test, engine)
        except (DfkdError, OSError, RuntimeError) as exc:  # e.g. a dataset that must be downloaded, offline
            why = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    else:
        why = "no registered dataset with a test split"
    record = {"imported_from": str(params["weights"]), "keys": params["keys"],
              "weights_sha256": file_checksum(params["weights"]), "arch_kwargs": kwargs}
    meta = ModelMeta(params["arch"], kwargs, info, scores, record, now(), __version__, "teacher")
    task = meta.task
    with OutputLock(out):
        save_model(out, model.cpu(), meta)
        if metrics:
            unmeasured = dict.fromkeys(task.metric_names) if not scores else {}
            write_metrics(metrics, {"task": info.task, **unmeasured, **scores, "arch": params["arch"],
                                    "dataset": info.name, **record, **({"unmeasured_because": why} if why else {})},
                          task=info.task, **scores)
    shown = (f"{task.headline_label} {scores[task.headline]:.4f}" if scores
             else f"{task.headline_label} unmeasured ({why})")
    console.print(f"imported {params['arch']} teacher for {info.name} ({info.num_classes} classes, "
                  f"{shape_str(info.channels, info.image_size)}): {shown} -> {out}")


def imported_info(registered: DatasetInfo | None, arch: str, keymap: Any, image_size: int | None,
                  channels: int | None, classes: int | None, mean: tuple[float, ...] | None,
                  std: tuple[float, ...] | None, class_names: Path | None) -> DatasetInfo:
    """The imported teacher's input description: the registered dataset's, overridden by the options and, for
    the normalisation, by the key map's (what the authors trained with); torchvision models default to
    ImageNet's."""
    if registered is None and None in (image_size, channels, classes) and not arch.startswith("torchvision:"):
        raise DfkdError("without a registered --dataset, give --image-size, --channels and --classes")
    base = registered
    c = channels or (base.channels if base else 3)
    names: tuple[str, ...] | None = None
    if class_names is not None:
        if not class_names.is_file():
            raise DfkdError(f"class names file not found: {class_names}")
        names = tuple(n.strip() for n in class_names.read_text().splitlines() if n.strip())
    k = classes or (len(names) if names else (base.num_classes if base else 1000))
    if names is not None and len(names) != k:
        raise DfkdError(f"{class_names} names {len(names)} classes, the teacher has {k}")
    norm = keymap.normalisation.get(base.name) if (keymap is not None and base is not None) else None
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    default_mean, default_std = norm or ((base.mean, base.std) if base else imagenet)
    mean = mean or default_mean
    std = std or default_std
    if len(mean) != c or len(std) != c:
        raise DfkdError(f"--mean/--std need {c} values (one per channel), got {len(mean)} and {len(std)}")
    return DatasetInfo(
        name=base.name if base else "custom", channels=c, image_size=image_size or (base.image_size if base else 224),
        num_classes=k, class_names=names or (base.class_names if base and base.num_classes == k else
                                             tuple(f"class_{i}" for i in range(k))),
        mean=tuple(mean), std=tuple(std))


if __name__ == "__main__":
    app()
