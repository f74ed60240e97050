"""``dfkd retrieve``: DFND: score a wild pool with the teacher and keep the images it is most sure about."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import typer

from dfkd_common.checkpoint import load_model
from dfkd_common.config import resolve
from dfkd_common.data.wild import WildPool
from dfkd_common.engine import (
    Engine,
    ensure_writable,
    resolve_amp,
    resolve_device,
    seed_everything,
    write_metrics,
)
from dfkd_common.errors import DfkdError
from dfkd_common.geometry import shape_str
from dfkd_common.retrieval import RetrieveConfig, RetrieveRun, retrieve
from stages.common import DeviceOpt, ParamsOpt, SetOpt, TrustOpt, allow_code, console, errors


@errors
def main(
    teacher: Path = typer.Option(..., "--teacher", help="teacher checkpoint (.safetensors)"),
    wild: list[str] | None = typer.Option(
        None, "--wild", help="wild source: a folder, a bank .h5 or a dataset name (prefix folder:/bank:/dataset:"
        "NAME[:SPLIT] to be explicit); repeat for several sources"),
    out: Path = typer.Option(..., "--out", help="retrieved bank to write (.h5)"),
    metrics: Path | None = typer.Option(None, "--metrics", help="retrieval metrics JSON"),
    name: str | None = typer.Option(None, "--name", help="params profile under retrieve: (e.g. dfnd, random)"),
    num_select: int | None = typer.Option(None, "--num-select", "-n", help="images to keep (with --select auto: "
                                          "at most, and the size --top-up fills to)"),
    select: str | None = typer.Option(None, "--select", help="fixed: the num-select most confident images (the "
                                      "paper); auto: as many as the relevance estimate finds relevant"),
    top_up: str | None = typer.Option(None, "--top-up", help="synthesis method that fills the bank up to "
                                      "num-select with the classes it lacks (deepinversion; dafl for a teacher "
                                      "without BN)"),
    balance: bool | None = typer.Option(None, "--balance/--no-balance", help="top-k per predicted class"),
    random: bool = typer.Option(False, "--random", help="random selection baseline (same size, same pool)"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    workers: int | None = typer.Option(None, "--workers", help="reader processes (0: read in this process)"),
    seed: int | None = typer.Option(None, help="seed of this run (default: the params section's, else the file's "
                                    "top-level one)"),
    params_file: Path = ParamsOpt,
    sets: list[str] | None = SetOpt,
    device: str = DeviceOpt,
    trust_code: list[str] | None = TrustOpt,
) -> None:
    """Score every image of the wild pool by -log p_max and write the NUM_SELECT most confident as a bank.

    Every run estimates how many pool images are relevant (the teacher's BN statistics); --select auto keeps
    those, and --top-up METHOD fills the bank up to NUM_SELECT with synthesized images of the classes that lack
    them. Rerunning an interrupted command resumes where it stopped.
    """
    run = resolve(RetrieveRun, params_file, "retrieve", name, sets, seed_from="method_seed",
                  wild=list(wild) if wild else None, num_select=num_select, select=select, top_up=top_up,
                  balance=balance, batch_size=batch_size,
                  workers=workers, seed=seed, selection="random" if random else None)
    allow_code(trust_code, params_file)
    ensure_writable(out, metrics)
    specs = [run.wild] if isinstance(run.wild, str) else list(run.wild)
    if not specs:
        raise DfkdError("no wild pool: give --wild SOURCE (repeatable) or retrieve.wild in the params file")
    # the retrieval's own params, the precision resolved (a bank records what scored it)
    own = {f.name: getattr(run, f.name) for f in fields(RetrieveConfig)}
    cfg = RetrieveConfig(**own | {"amp": resolve_amp(run.amp, resolve_device(device))})
    seed_everything(cfg.seed)
    engine = Engine.create(device, amp=cfg.amp)
    console.print(f"retrieve: {engine.describe()}")
    model, meta = load_model(teacher, engine.device)
    info = meta.dataset
    pool = WildPool.open([str(s) for s in specs], info.channels, info.image_size, run.data_root)
    console.print(f"retrieve from {len(pool)} wild images ({', '.join(s.spec for s in pool.sources)}) "
                  f"-> {shape_str(info.channels, info.image_size)}")
    result = retrieve(model, meta, teacher, pool, out, engine, cfg)
    if metrics:
        write_metrics(metrics, result, seconds=result.get("total_seconds"), images=result["selected"],
                      images_per_s=result.get("images_per_s"))
    if result["unreadable"]:
        console.print(f"[yellow]skipped {result['unreadable']} unreadable image file(s)[/]")
    est = result["relevance"]
    console.print(f"relevant ({est['score']} score): about {est['count']} of {len(pool)} images "
                  f"({100 * est['share']:.1f} %): {est['reason']}")
    if result.get("top_up_missing"):
        console.print(f"[yellow]{cfg.top_up} left {result['top_up_missing']} images of the classes that lack them "
                      "unmade (the teacher labelled its images otherwise)[/]")
    elif result["selected"] < cfg.num_select and cfg.select == "auto" and not cfg.top_up:
        console.print(f"[yellow]kept the {result['selected']} relevant images (num_select {cfg.num_select}); "
                      "--top-up METHOD fills the rest with synthesized ones[/]")
    elif result["selected"] < cfg.num_select:
        console.print(f"[yellow]only {result['selected']} readable images (asked for {cfg.num_select})[/]")
    picked = ", ".join(f"{k} {v}" for k, v in result["per_source"].items())
    console.print(f"{cfg.selection}{' balanced' if cfg.balance else ''}: kept {result['selected']} of {len(pool)} "
                  f"({picked}); scored {result['images_per_s']:.0f} img/s -> {out}")


if __name__ == "__main__":
    typer.run(main)
