"""``dfkd synthesize --method M``: invert a teacher into an image bank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from dfkd_common.checkpoint import load_model
from dfkd_common.config import given
from dfkd_common.engine import Engine, ensure_writable, seed_everything, write_metrics
from dfkd_common.loops.synthesis_rounds import SynthesisRun, run_synthesis, split_params
from dfkd_common.synthesis import SYNTHESIZERS
from dfkd_common.synthesis.base import SynthesisConfig
from stages.common import DeviceOpt, ParamsOpt, SetOpt, TrustOpt, allow_code, console, errors, join_world


def resolve_params(params_file: Path, method: str, sets: list[str] | None = None,
                   **cli: Any) -> tuple[SynthesisRun, SynthesisConfig]:
    """The run's config and the method's: ``synthesize.common`` + ``synthesize.<method>`` of the file (``seed``:
    the top-level ``method_seed`` unless the section gives one; a method without a section of its own keeps its
    defaults), then the CLI; checked (one error line)."""
    SYNTHESIZERS.get(method)  # unknown names fail before any work
    return split_params(given(params_file, "synthesize", method, sets, seed_from="method_seed",
                              profile_required=False, **cli), method)


@errors
def main(
    method: str = typer.Option(..., "--method", "-m", help="synthesis method (see `dfkd methods`)"),
    teacher: Path = typer.Option(..., "--teacher", help="teacher checkpoint (.safetensors)"),
    out: Path = typer.Option(..., "--out", help="bank to write (.h5)"),
    metrics: Path | None = typer.Option(None, "--metrics", help="synthesis metrics JSON"),
    rounds: int | None = typer.Option(None, help="synthesis rounds (each adds batch_size images)"),
    seed: int | None = typer.Option(None, help="seed of this run (default: the params section's, else the file's "
                                    "top-level one)"),
    params_file: Path = ParamsOpt,
    sets: list[str] | None = SetOpt,
    device: str = DeviceOpt,
    trust_code: list[str] | None = TrustOpt,
) -> None:
    """Synthesize a bank with METHOD; rerunning an interrupted command resumes it."""
    run, method_cfg = resolve_params(params_file, method, sets, rounds=rounds, seed=seed)
    allow_code(trust_code, params_file)
    ensure_writable(out, metrics)
    world = join_world()  # under torchrun: rounds split across ranks, merged by rank 0
    seed_everything(run.seed)
    engine = Engine.create(device, amp=run.amp, channels_last=run.channels_last)
    console.print(f"synthesize {method}: {engine.describe()}"
                  + (f"; {world.size} processes, each its own rounds" if world.distributed else ""))
    model, meta = load_model(teacher, engine.device)
    result = run_synthesis(method, model, meta, teacher, out, run, method_cfg, engine)
    if metrics and world.main:
        write_metrics(metrics, result, seconds=result["seconds"], images=result["images"],
                      images_per_s=result["images_per_s"])
    console.print(f"{method}: {result['images']} images in {result['seconds']:.1f}s "
                  f"({result['images_per_s']:.1f} img/s) -> {out}")


if __name__ == "__main__":
    typer.run(main)
