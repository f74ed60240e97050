"""``dfkd teacher train|import``: train a teacher on a registered dataset, or import one trained elsewhere.

Both write the same artifact (a checkpoint whose metadata rebuilds the model) and read the same ``teacher``
section of the params file; ``source: train | import`` in it lets a study's ``dvc.yaml`` run either
(``dfkd teacher ${teacher.source} ...``).
"""

from __future__ import annotations

from pathlib import Path

import typer

from dfkd_common.config import resolve
from dfkd_common.engine import ensure_writable
from dfkd_common.errors import DfkdError
from dfkd_common.params import read_section
from dfkd_common.runs.teacher_run import InputDescription, TeacherRun, import_teacher
from dfkd_common.runs.teacher_run import train as train_teacher
from stages.common import DeviceOpt, ParamsOpt, SetOpt, TrustOpt, allow_code, console, errors, join_world, stage_app

app = stage_app("teacher")


@app.command("train")
@errors
def train(
    out: Path = typer.Option(..., "--out", help="checkpoint to write (.safetensors)"),
    metrics: Path | None = typer.Option(None, "--metrics", help="metrics JSON to write"),
    dataset: str | None = typer.Option(None, help="registered dataset name"),
    arch: str | None = typer.Option(None, help="architecture: a zoo name, torchvision:NAME, timm:NAME, or your "
                                    "own package.module:Class or path/to/file.py:Class"),
    arch_kwargs: list[str] | None = typer.Option(None, "--arch-kwargs", help="architecture option K=V (repeatable)"),
    epochs: int | None = typer.Option(None, help="epochs (default: the params section's)"),
    seed: int | None = typer.Option(None, help="seed of this run (default: the params section's, else the file's "
                                    "top-level one)"),
    params_file: Path = ParamsOpt,
    sets: list[str] | None = SetOpt,
    device: str = DeviceOpt,
    trust_code: list[str] | None = TrustOpt,
) -> None:
    """Train a teacher, evaluate it on the real test split, write checkpoint (+ metrics)."""
    cfg = resolve(TeacherRun, params_file, "teacher", sets=[f"arch_kwargs.{kv}" for kv in arch_kwargs or []]
                  + list(sets or []), seed_from="seed", dataset=dataset, arch=arch, epochs=epochs, seed=seed)
    allow_code(trust_code, params_file, cfg.arch)  # the architecture named for this run is the user's to run
    ensure_writable(out, metrics)
    join_world()
    train_teacher(cfg, out, metrics, device, say=console.print)


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
    arch: str | None = typer.Option(None, "--arch", help="architecture: a zoo name, torchvision:NAME, timm:NAME, or "
                                    "your own package.module:Class or path/to/file.py:Class"),
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
    trust_code: list[str] | None = TrustOpt,
) -> None:
    """Import a teacher trained elsewhere: its weights into a zoo (or torchvision) architecture, checked key by
    key, with the accuracy on the dataset's test split where one can be loaded (else recorded as unmeasured)."""
    cfg = resolve(TeacherRun, params_file, "teacher", sets=[f"arch_kwargs.{kv}" for kv in arch_kwargs or []]
                  + list(sets or []), seed_from="seed", dataset=dataset, arch=arch,
                  weights=str(weights) if weights else None, keys=keys)
    if arch is None and "arch" not in read_section(params_file, "teacher"):
        raise DfkdError("teacher import: give --arch (a zoo name, torchvision:NAME, timm:NAME, or your own "
                        "package.module:Class or path/to/file.py:Class): the weights alone do not say which network")
    allow_code(trust_code, params_file, cfg.arch)  # the architecture named for this run is the user's to run
    ensure_writable(out, metrics)
    described = InputDescription(image_size, channels, classes, _floats(mean, "mean"), _floats(std, "std"),
                                 class_names)
    # a registered dataset describes the input: named here, or in the params file when the input is not described
    use_dataset = bool(dataset) or ("dataset" in read_section(params_file, "teacher") and not described.given)
    import_teacher(cfg, out, described, use_dataset, metrics, device, say=console.print)


if __name__ == "__main__":
    app()
