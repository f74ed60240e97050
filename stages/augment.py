"""``dfkd augment``: diffusion variations of any bank, filtered by the teacher (DDA's augmentation step)."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import typer

from dfkd_common.bank import load_bank
from dfkd_common.checkpoint import load_model
from dfkd_common.config import resolve
from dfkd_common.dist import main_first
from dfkd_common.engine import Engine, ensure_writable, seed_everything, write_metrics
from dfkd_common.errors import DfkdError
from dfkd_common.variation.augment import AugmentRun, BankAugmentation, augment_bank
from dfkd_common.variation.models import open_variation_model
from stages.common import DeviceOpt, ParamsOpt, SetOpt, TrustOpt, allow_code, console, errors, join_world


@errors
def main(
    bank: Path = typer.Option(..., "--bank", help="bank (.h5) to augment: synthetic, retrieved or merged"),
    out: Path = typer.Option(..., "--out", help="augmented bank to write (.h5): the kept variations only"),
    teacher: Path = typer.Option(..., "--teacher", help="teacher checkpoint: scores and filters the variations"),
    model: str | None = typer.Option(
        None, "--model", help="variation model: a diffusers pipeline directory, sdedit-prior:DIR, "
        "sd-image-variations[:DIR_OR_HUB_ID]"),
    metrics: Path | None = typer.Option(None, "--metrics", help="augmentation metrics JSON"),
    name: str | None = typer.Option(None, "--name", help="params profile under augment:"),
    k: int | None = typer.Option(None, "-k", "--k", help="variations per source image"),
    omega: float | None = typer.Option(None, "--omega", help="keep if cos(teacher embeddings) >= omega"),
    same_label: bool | None = typer.Option(None, "--same-label/--any-label",
                                           help="also require the teacher's label to be unchanged"),
    sources: int | None = typer.Option(None, "--sources", help="vary a seeded random N of the bank (0: all)"),
    seed: int | None = typer.Option(None, help="seed of this run (default: the params section's, else the file's "
                                    "top-level one)"),
    params_file: Path = ParamsOpt,
    sets: list[str] | None = SetOpt,
    device: str = DeviceOpt,
    trust_code: list[str] | None = TrustOpt,
) -> None:
    """Make K variations of every image of BANK with MODEL, keep those whose teacher embedding stays within
    OMEGA of their source's, and write them as an augmented bank (labels, round and parent_index from the
    source, score = the similarity). Rerunning an interrupted command resumes it."""
    run = resolve(AugmentRun, params_file, "augment", name, sets, seed_from="method_seed", model=model, k=k,
                  omega=omega, same_label=same_label, sources=sources, seed=seed)
    if not run.model:
        raise DfkdError("no variation model: give --model (a directory, sdedit-prior:DIR, sd-image-variations) or "
                        "augment.model in the params file")
    cfg = BankAugmentation(**{f.name: getattr(run, f.name) for f in fields(BankAugmentation)})
    allow_code(trust_code, params_file)
    ensure_writable(out, metrics)
    world = join_world()  # under torchrun: source batches split across ranks, merged by rank 0
    seed_everything(cfg.seed)
    engine = Engine.create(device, amp=False, channels_last=False)
    t_model, t_meta = load_model(teacher, engine.device)
    data = load_bank(bank)
    info = t_meta.dataset
    data.check_compatible(info)
    with main_first():  # weights fetched into the Hugging Face cache once, not once per rank
        vm = open_variation_model(run.model, engine.device, cfg.variation)
    cfg = replace(cfg, variation=vm.params)  # as the model completed them: the bank records every one
    console.print(f"augment {bank} ({len(data)} images) with {vm.name} ({vm.source}, {vm.channels}x{vm.size}px, "
                  f"{vm.precision()}) on {engine.device}: k {cfg.k}, omega {cfg.omega}"
                  f"{', same label' if cfg.same_label else ''}")
    result = augment_bank(t_model, t_meta, teacher, data, vm, out, engine, cfg)
    if metrics and world.main:
        write_metrics(metrics, result, seconds=result["seconds"], images=result["images"],
                      images_per_s=result["images_per_s"])
    console.print(f"augment: kept {result['kept']} of {result['made']} variations of {result['sources']} images "
                  f"({100 * result['keep_rate']:.1f} %; teacher label unchanged for "
                  f"{100 * result['label_agreement']:.1f} %), {result['images_per_s']:.1f} variations/s -> {out}")


if __name__ == "__main__":
    typer.run(main)
