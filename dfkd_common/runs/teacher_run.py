"""Teacher runs: train one on a registered dataset, or import one trained elsewhere (``dfkd teacher train|import``).

Both write the same artifact (a checkpoint whose metadata rebuilds the model) from the same config, the
``teacher`` section of a params file; its ``source: train | import`` lets a study's ``dvc.yaml`` run either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dfkd_common import __version__
from dfkd_common.checkpoint import ModelMeta, file_checksum, now, save_model
from dfkd_common.config import REPLACES, values
from dfkd_common.data import DatasetInfo, get_dataset
from dfkd_common.dist import barrier, current, main_first, rank_path
from dfkd_common.engine import Engine, seed_everything, write_metrics
from dfkd_common.errors import DfkdError
from dfkd_common.evaluation import breakdown, evaluate
from dfkd_common.geometry import shape_str
from dfkd_common.imports import KEYMAPS, KeyMap, load_weights, read_weights
from dfkd_common.jobs import OutputLock
from dfkd_common.loops.runner import StateFile
from dfkd_common.loops.teacher_training import TeacherTraining, train_teacher
from dfkd_common.models import build_fitting, describe_network, user_code
from dfkd_common.tasks import get_task


@dataclass(frozen=True)
class TeacherRun(TeacherTraining):
    """The ``teacher`` section: the training loop's params (:class:`TeacherTraining`) and the run's."""

    dataset: str = "mnist5k"
    dataset_kwargs: dict[str, Any] = field(default_factory=dict, metadata=REPLACES)  # e.g. imagefolder's root
    arch: str = "lenet5"
    arch_kwargs: dict[str, Any] = field(default_factory=dict, metadata=REPLACES)
    # the input size the network takes (None: the dataset's stored size, else its source size, the first it takes)
    image_size: int | None = None
    # feature sites named by module path where discovery guesses wrong: {penultimate: PATH, stages: [PATH, ...]}
    features: dict[str, Any] = field(default_factory=dict, metadata=REPLACES)
    data_root: str | None = None
    amp: Literal["auto", True, False] = False
    # import (dfkd teacher import): train or import, the weights file, the key map of its authors' code
    source: Literal["train", "import"] = "train"
    weights: str | None = None
    keys: str | None = None


def train(cfg: TeacherRun, out: Path, metrics: Path | None = None, device: str = "auto",
          say: Callable[[str], None] = print) -> dict[str, float]:
    """Train a teacher, resumably, and evaluate it on the real test split; writes the checkpoint (+ metrics)."""
    world = current()
    seed_everything(cfg.seed)
    spec = get_dataset(cfg.dataset, **cfg.dataset_kwargs)
    model, info = build_fitting(cfg.arch, spec.info, [cfg.image_size] if cfg.image_size else spec.sizes,
                                cfg.arch_kwargs, cfg.features)
    say(describe_network(model, cfg.arch, info))
    with main_first():  # one download, not one per rank
        train_split = spec.load("train", cfg.data_root, info.image_size)
        test_split = spec.load("test", cfg.data_root, info.image_size)
    engine = Engine.create(device, amp=cfg.amp)
    say(f"teacher {cfg.arch} on {info.name}: {len(train_split)} train / {len(test_split)} test; "
        f"{engine.describe()}" + (f"; {world.size} processes (DDP)" if world.distributed else ""))
    params = values(cfg)
    store = StateFile.for_output(rank_path(out, world),
                                 {**params, "world_size": world.size} if world.distributed else params)
    # a second run on the same output refuses while this one lives (rank 0 holds the lock: the rank that writes)
    with OutputLock(out) if world.main else contextlib.nullcontext():
        scores, history = train_teacher(model, train_split, test_split, cfg, engine, store)
        if world.main:
            save_model(out, model, ModelMeta(cfg.arch, cfg.arch_kwargs, info, scores, params, now(), __version__,
                                             "teacher"))
            if metrics:
                write_metrics(metrics, {"task": info.task, **scores, "arch": cfg.arch, "dataset": info.name,
                                        "precision": engine.precision, "epochs": len(history), "history": history,
                                        "world_size": world.size, **breakdown(model, test_split, engine)},
                              task=info.task, **scores)
        barrier()  # every rank's state stays until the artifact is written
        store.clear()
    task = get_task(info.task)
    say(f"teacher {task.headline_label} {scores[task.headline]:.4f} -> {out}")
    return scores


@dataclass(frozen=True)
class InputDescription:
    """An imported teacher's input where no registered dataset describes it (or to override the dataset's)."""

    image_size: int | None = None
    channels: int | None = None
    classes: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: Path | None = None

    @property
    def given(self) -> bool:
        """Whether the input is described here (then a dataset only named in the params file is not used)."""
        return any(v is not None for v in (self.image_size, self.channels, self.classes))


def import_teacher(cfg: TeacherRun, out: Path, described: InputDescription, use_dataset: bool,
                   metrics: Path | None = None, device: str = "auto",
                   say: Callable[[str], None] = print) -> dict[str, float]:
    """Import a teacher trained elsewhere: its weights into a zoo (or torchvision) architecture, checked key by
    key, with the accuracy on the dataset's test split where one can be loaded (else recorded as unmeasured).
    ``use_dataset``: whether ``cfg.dataset`` describes the input (named on the command line, or in the params
    file when the input is not described)."""
    program = user_code.program_path(cfg.arch)
    if not cfg.weights and program is None:
        raise DfkdError("missing parameter(s): weights (give them in params.yaml or on the CLI)")
    keymap = KEYMAPS.get(cfg.keys) if cfg.keys else None
    spec = get_dataset(cfg.dataset, **cfg.dataset_kwargs) if use_dataset else None
    info = imported_info(spec.info if spec else None, cfg.arch, keymap, described)
    kwargs = {**(keymap.arch_kwargs.get(cfg.arch, {}) if keymap else {}), **cfg.arch_kwargs}
    size = described.image_size or cfg.image_size
    sizes = [size] if size else spec.sizes if spec is not None else [info.image_size]
    model, info = build_fitting(cfg.arch, info, sizes, kwargs, cfg.features)
    say(describe_network(model, cfg.arch, info))
    if cfg.weights:  # a TorchScript program without --weights keeps its own
        state = read_weights(cfg.weights)
        if keymap is not None:
            state = keymap.convert(cfg.arch, state)
        load_weights(model.net, state, cfg.weights)
    engine = Engine.create(device, amp=False)
    scores: dict[str, float] = {}
    why = "no registered dataset with a test split"
    if spec is not None:
        why = ""
        try:
            scores = evaluate(engine.model(model), spec.load("test", cfg.data_root, info.image_size), engine)
        except (DfkdError, OSError, RuntimeError) as exc:  # e.g. a dataset that must be downloaded, offline
            why = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    source = cfg.weights or str(program)
    record = {"imported_from": source, "keys": cfg.keys, "weights_sha256": file_checksum(source),
              "arch_kwargs": kwargs}
    meta = ModelMeta(cfg.arch, kwargs, info, scores, record, now(), __version__, "teacher")
    task = meta.task
    with OutputLock(out):
        save_model(out, model.cpu(), meta)
        if metrics:
            unmeasured = dict.fromkeys(task.metric_names) if not scores else {}
            write_metrics(metrics, {"task": info.task, **unmeasured, **scores, "arch": cfg.arch,
                                    "dataset": info.name, **record, **({"unmeasured_because": why} if why else {})},
                          task=info.task, **scores)
    shown = (f"{task.headline_label} {scores[task.headline]:.4f}" if scores
             else f"{task.headline_label} unmeasured ({why})")
    say(f"imported {cfg.arch} teacher for {info.name} ({info.num_classes} classes, "
        f"{shape_str(info.channels, info.image_size)}): {shown} -> {out}")
    return scores


def imported_info(registered: DatasetInfo | None, arch: str, keymap: KeyMap | None,
                  described: InputDescription) -> DatasetInfo:
    """The imported teacher's input description: the registered dataset's, overridden by the options and, for
    the normalisation, by the key map's (what the authors trained with); torchvision models default to
    ImageNet's."""
    d = described
    if registered is None and None in (d.image_size, d.channels, d.classes) and not arch.startswith("torchvision:"):
        raise DfkdError("without a registered --dataset, give --image-size, --channels and --classes")
    base = registered
    c = d.channels or (base.channels if base else 3)
    names: tuple[str, ...] | None = None
    if d.class_names is not None:
        if not d.class_names.is_file():
            raise DfkdError(f"class names file not found: {d.class_names}")
        names = tuple(n.strip() for n in d.class_names.read_text().splitlines() if n.strip())
    k = d.classes or (len(names) if names else (base.num_classes if base else 1000))
    if names is not None and len(names) != k:
        raise DfkdError(f"{d.class_names} names {len(names)} classes, the teacher has {k}")
    norm = keymap.normalisation.get(base.name) if (keymap is not None and base is not None) else None
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    default_mean, default_std = norm or ((base.mean, base.std) if base else imagenet)
    mean = d.mean or default_mean
    std = d.std or default_std
    if len(mean) != c or len(std) != c:
        raise DfkdError(f"--mean/--std need {c} values (one per channel), got {len(mean)} and {len(std)}")
    return DatasetInfo(
        name=base.name if base else "custom", channels=c,
        image_size=d.image_size or (base.image_size if base else 224), num_classes=k,
        class_names=names or (base.class_names if base and base.num_classes == k else
                              tuple(f"class_{i}" for i in range(k))),
        mean=tuple(mean), std=tuple(std))
