"""``dfkd pool build``: the offline demo wild pool (installed digits, photo crops, noise) as a bank."""

from __future__ import annotations

from pathlib import Path

import typer

from dfkd_common.config import resolve
from dfkd_common.data.offline_pool import OfflinePool, build_offline_pool
from dfkd_common.engine import ensure_writable, write_metrics
from stages.common import ParamsOpt, SetOpt, console, errors, stage_app

app = stage_app("pool")


@app.command("build")
@errors
def build(
    out: Path = typer.Option(..., "--out", help="pool bank to write (.h5, kind merged)"),
    metrics: Path | None = typer.Option(None, "--metrics", help="per-source counts JSON"),
    seed: int | None = typer.Option(None, help="seed of this run (default: the params section's, else the file's "
                                    "top-level one)"),
    params_file: Path = ParamsOpt,
    sets: list[str] | None = SetOpt,
) -> None:
    """Mix scikit-learn digits, crops of the installed scikit-image/scikit-learn photos and noise into a pool."""
    cfg = resolve(OfflinePool, params_file, "pool", sets=sets, seed_from="seed", seed=seed)
    ensure_writable(out, metrics)
    result = build_offline_pool(out, cfg)
    if metrics:
        write_metrics(metrics, result, images=result["images"])
    counts = ", ".join(f"{k} {v}" for k, v in result["per_source"].items())
    console.print(f"offline pool: {result['images']} images ({counts}) -> {out}")


if __name__ == "__main__":
    app()
