"""A quantization run, from its config to a quantized model: what ``dfkd quantize`` does, as a library call.

:func:`run` loads the fp32 model and the calibration images (:func:`dfkd_common.quantize.calibration`), measures
the fp32 model on the real test split, fine-tunes a fake-quantized copy where asked (:func:`finetune`: the student
loop, KD from the fp32 model, resumable per epoch), quantizes it with ONNX Runtime, measures the quantized model
on the same split and writes it (metadata inside) and the metrics, each atomically.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dfkd_common.checkpoint import ModelMeta, file_checksum, load_model
from dfkd_common.config import resolve, values
from dfkd_common.engine import Engine, atomic_path, seed_everything, write_metrics
from dfkd_common.evaluation import evaluate, evaluation_split
from dfkd_common.jobs import OutputLock
from dfkd_common.loops.distillation import BankFeed, distill
from dfkd_common.loops.runner import StateFile
from dfkd_common.models import Classifier
from dfkd_common.quantize import (
    Calibration,
    OnnxModel,
    Quantize,
    calibration,
    check,
    fake_quantized,
    fit,
    machine_class,
    net_shape,
    quantize_onnx,
    quantized_meta,
    write_meta,
)
from dfkd_common.student import StudentSide, TermSetup


def resolve_config(path: Path, name: str | None, sets: list[str] | None = None, **cli: Any) -> Quantize:
    """The run's config: defaults, ``quantize.common`` + ``quantize.<name>``, then the CLI (``seed``: the
    top-level ``method_seed`` unless the section gives one)."""
    return resolve(Quantize, path, "quantize", name, sets, where="quantize", seed_from="method_seed", **cli)


@dataclass
class QuantizePaths:
    """What a quantization run reads and writes."""

    model: Path
    out: Path
    banks: list[Path] = field(default_factory=list)
    metrics: Path | None = None


def finetune(model: Classifier, meta: ModelMeta, calib: Calibration, cfg: Quantize, store: StateFile, test: Any,
             engine: Engine, say: Callable[[str], None]) -> tuple[Classifier, list[dict[str, Any]]]:
    """A copy of ``model``, fake-quantized to ``cfg.weight_bits`` and distilled (KD) from ``model`` on the
    calibration source's rows; returns it with the fake quantization removed, and the per-epoch history."""
    student = copy.deepcopy(model)  # the fp32 model stays the teacher; the copy gets its BatchNorms folded
    info = meta.dataset
    with fake_quantized(student, cfg.weight_bits, calib.images.to(engine.device)) as fq:
        side = StudentSide(fq, {"kd": 1.0}, {}, TermSetup(model, fq, info.channels, info.image_size,
                                                           meta.metrics.get("test_acc"), info.task))
        feed = BankFeed(calib.train, calib.labels, engine.device)
        say(f"fine-tuning W{cfg.weight_bits} fake-quantized weights by KD from the fp32 model on {len(feed)} images, "
            f"{cfg.finetune.epochs} epochs")
        _, history = distill(model, side, feed, test, replace(cfg.finetune, seed=cfg.seed), engine, store)
    return student, history


def run(cfg: Quantize, paths: QuantizePaths, kind: str, test: str | None = None, data_root: str | None = None,
        device: str = "auto", say: Callable[[str], None] = print) -> dict[str, Any]:
    """Quantize ``paths.model`` as ``cfg`` says, calibrated on ``kind`` (bank | real | noise)."""
    check(paths.out, cfg)
    seed_everything(cfg.seed)
    engine = Engine.create(device, amp=False)
    model, meta = load_model(paths.model, engine.device)
    info = meta.dataset
    calib = calibration(kind, paths.banks, info, cfg.calibration_images, cfg.seed, data_root)
    shape = net_shape(meta)
    chosen = evaluation_split(info, test, None, data_root, 0.0, cfg.seed, None, model, engine, online=True)
    fp32 = evaluate(model, chosen.split, engine)
    headline = meta.task.headline
    say(f"{paths.model} ({meta.kind}, fp32): {fp32[headline]:.4f} on {chosen.described}; calibration: "
        f"{kind}, {len(calib.images)} images")
    t0 = time.perf_counter()
    history: list[dict[str, Any]] = []
    store = StateFile.for_output(paths.out, {"quantize": values(cfg), "model": str(paths.model),
                                             "model_sha256": file_checksum(paths.model),
                                             "calibration": calib.described})
    with OutputLock(paths.out):
        if cfg.finetune.epochs:
            model, history = finetune(model, meta, calib, cfg, store, chosen.split, engine, say)
        with atomic_path(paths.out, suffix=".onnx") as tmp:
            quantize_onnx(model.cpu().eval(), shape, fit(calib.images, shape), cfg, tmp)
            scores = evaluate(OnnxModel(tmp, shape), chosen.split, Engine.create("cpu", amp=False))
            q_meta = quantized_meta(meta, paths.model, cfg, calib, kind, scores, fp32, machine_class())
            write_meta(tmp, q_meta)
            size = tmp.stat().st_size
        store.clear()
    seconds = time.perf_counter() - t0
    x = scores[headline] / fp32[headline] if fp32[headline] else None
    summary = {"model": str(paths.model), "out": str(paths.out), "task": meta.task.name, **scores,
               f"fp32_{headline}": fp32[headline],
               "x_fp32": x, "weight_bits": cfg.weight_bits, "act_bits": cfg.act_bits, "calibration": kind,
               "calibration_sources": calib.described, "finetune_epochs": cfg.finetune.epochs,
               "bytes": size, "fp32_bytes": sum(p.numel() * 4 for p in model.state_dict().values()),
               "evaluated_on": chosen.described, "machine": machine_class(), "seconds": seconds,
               "finetune_history": history}
    if paths.metrics:
        write_metrics(paths.metrics, summary, task=meta.task.name, **scores, x_teacher=x, seconds=seconds,
                      images=len(calib.images))
    ratio = f", {x:.4f}x" if x is not None else ""
    say(f"W{cfg.weight_bits}A{cfg.act_bits}: {scores[headline]:.4f} (fp32 {fp32[headline]:.4f}{ratio}) -> "
        f"{paths.out} ({size / 1024:.0f} KiB)")
    return summary
