"""``dfkd evaluate``: a checkpoint's metrics (its task's: classification's accuracy) on a real test split."""

from __future__ import annotations

from pathlib import Path

import typer

from dfkd_common.checkpoint import load_model
from dfkd_common.data import get_dataset
from dfkd_common.engine import Engine, ensure_writable, write_metrics
from dfkd_common.errors import DfkdError
from dfkd_common.evaluation import breakdown, evaluate
from dfkd_common.quantize import is_quantized, load_quantized
from stages.common import DeviceOpt, TrustOpt, allow_code, console, errors


@errors
def main(
    checkpoint: Path = typer.Argument(..., help="model checkpoint (.safetensors) or quantized model (.onnx)"),
    dataset: str | None = typer.Option(None, help="dataset (default: the checkpoint's)"),
    split: str = typer.Option("test"),
    data_root: Path | None = typer.Option(None, help="where the dataset's files are (default: ~/.cache/dfkd/data)"),
    metrics: Path | None = typer.Option(None, "--metrics"),
    device: str = DeviceOpt,
    trust_code: list[str] | None = TrustOpt,
) -> None:
    """Print (and optionally write) the checkpoint's metrics on SPLIT of its dataset (or --dataset)."""
    allow_code(trust_code)
    ensure_writable(metrics)
    engine = Engine.create(device, amp=False)
    model, meta = load_quantized(checkpoint) if is_quantized(checkpoint) else load_model(checkpoint, engine.device)
    data = get_dataset(dataset or meta.dataset.name).load(split, data_root, meta.dataset.image_size)
    task = meta.task
    if data.info.task != task.name:
        raise DfkdError(f"{checkpoint} is a {task.name} model; dataset {data.info.name} holds {data.info.task} "
                        "targets")
    scores = evaluate(engine.model(model), data, engine)
    if metrics:
        write_metrics(metrics, {"task": task.name, **scores, "dataset": data.info.name, "split": split,
                                **breakdown(engine.model(model), data, engine)}, task=task.name, **scores)
    console.print(f"{checkpoint}: {scores[task.headline]:.4f} on {data.info.name}/{split} ({len(data)} images)")


if __name__ == "__main__":
    typer.run(main)
