"""``dfkd prior train``: train the offline diffusion prior that ``dfkd augment`` uses without Stable Diffusion.

Run once (minutes on a GPU, hours on a 2-core CPU) and commit the small result: the default pipeline's stage
that would retrain it is frozen in ``dvc.yaml``, because a DVC-cached output would be missing from every
fresh clone (there is no DVC remote). See ``dfkd_common/variation/prior.py`` for why and how.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from dfkd_common.bank import load_bank
from dfkd_common.checkpoint import file_checksum
from dfkd_common.config import resolve
from dfkd_common.engine import ensure_writable, resolve_device
from dfkd_common.variation.prior import PriorConfig, train_prior
from stages.common import DeviceOpt, ParamsOpt, SetOpt, console, errors, stage_app

app = stage_app("prior")


@app.command("train")
@errors
def train(
    pool: Path = typer.Option(..., "--pool", help="unlabeled image bank to learn from (e.g. the wild pool)"),
    out: Path = typer.Option(..., "--out", help="directory to write (diffusers DDPMPipeline layout)"),
    device: str = DeviceOpt,
    params_file: Path = ParamsOpt,
    sets: list[str] | None = SetOpt,
) -> None:
    """Train a small DDPM on the pool's images at the noise levels SDEdit uses; the pool's labels are unused."""
    cfg = resolve(PriorConfig, params_file, "prior", sets=sets, seed_from="seed")
    ensure_writable(out)
    bank = load_bank(pool)
    dev = resolve_device(device)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    source = {"path": str(pool), "sha256": file_checksum(pool), "images": len(bank),
              "kind": bank.attrs.get("kind"), "dataset": bank.dataset.get("name")}
    console.print(f"prior: {len(bank)} images {bank.image_shape} from {pool} on {dev}")
    record = train_prior(bank.images, tmp, cfg, dev, source, log=console.print)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    console.print(f"prior: {record['steps']} steps, {record['images_seen']} images in {record['seconds']} s "
                  f"({record['device']}, {record['precision']}), final loss {record['final_loss']:.4f} -> {out}")


if __name__ == "__main__":
    app()
