"""Run a synthesizer for a number of rounds into a bank through the job driver (:mod:`dfkd_common.jobs`).

Per round: synthesize -> score the quantised images with the teacher -> write them as a shard -> checkpoint the
synthesizer state. A crash anywhere in a round redoes exactly that round on the rerun (its shard was not
committed), so no round is lost or duplicated and the bank equals an uninterrupted run's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfkd_common.bank import BankHeader, to_uint8
from dfkd_common.checkpoint import ModelMeta, file_checksum
from dfkd_common.dist import current, gather_objects, rank_path, rank_share
from dfkd_common.engine import Engine, progress
from dfkd_common.jobs import Job
from dfkd_common.models import Classifier
from dfkd_common.synthesis import build_synthesizer

#: params of ``dfkd synthesize`` that are the run's, not the synthesizer's, with their defaults
RUN_DEFAULTS: dict[str, Any] = {"rounds": 10, "seed": 0, "amp": "auto", "channels_last": True}


@torch.no_grad()
def scored_rows(header: BankHeader, teacher: Classifier, engine: Engine, images: torch.Tensor, labels: Any,
                rounds: Any) -> dict[str, np.ndarray]:
    """Quantise ``images`` and return bank columns with the teacher's logits on exactly those stored pixels.

    Shared by offline synthesis and online feeds, so ``teacher_logits`` (what ``dfkd bank info`` reports as
    agreement and confidence) always describes the bank's uint8 images.
    """
    u8 = torch.from_numpy(to_uint8(images))
    x = engine.images(u8.to(engine.device).float().div_(255.0))
    t_logits = teacher(x).float().cpu()
    return header.columns(u8, labels, rounds, teacher_logits=t_logits.half())


def split_synthesis_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``dfkd synthesize`` params -> (the run's: rounds, seed, amp, channels_last; the synthesizer's)."""
    run = {k: params.get(k, v) for k, v in RUN_DEFAULTS.items()}
    return run, {k: v for k, v in params.items() if k not in RUN_DEFAULTS}


def run_synthesis(
    method: str,
    teacher: Classifier,
    meta: ModelMeta,
    teacher_path: Path,
    out: Path,
    params: dict[str, Any],
    engine: Engine,
) -> dict[str, Any]:
    info = meta.dataset
    run, cfg = split_synthesis_params(params)
    seed, rounds = int(run["seed"]), int(run["rounds"])
    world = current()
    # several ranks: rank r makes rounds r, r + N, ... with its own seed (seed + r); rank 0 merges them by round
    synth = build_synthesizer(method, teacher, info, cfg, engine, seed + world.rank)
    mine = list(rank_share(range(rounds), world))
    teacher_sum = file_checksum(teacher_path)
    header = BankHeader(channels=info.channels, image_size=info.image_size, kind="synthetic", method=method,
                        dataset=info.to_dict(), params=synth.cfg | {"rounds": rounds}, seed=seed,
                        teacher_checksum=teacher_sum, optional=("teacher_logits",))
    key = {"method": method, **params, "teacher": teacher_sum, **({"world": world.size} if world.distributed else {})}
    logs: dict[str, float] = {}
    with Job(rank_path(out, world), key) as job:
        start, elapsed = 0, 0.0
        if job.state is not None:
            synth.load_state_dict(job.state["synth"])
            job.restore_rng()
            start, elapsed = int(job.state["round"]), float(job.state["elapsed"])
        with progress() as bar:
            task = bar.add_task(f"synthesize {method}", total=len(mine), completed=start, info="")
            for i in range(start, len(mine)):
                r = mine[i]
                t0 = time.perf_counter()
                synth.begin_epoch(r)  # offline there are no student epochs: a round stands for one
                result = synth.synthesize(r)
                elapsed += time.perf_counter() - t0
                job.write("bank", **scored_rows(header, teacher, engine, result.images, result.labels, r))
                # rounds of this rank's share done (one process: the next round, as before torchrun)
                job.checkpoint({"synth": synth.state_dict(), "round": i + 1, "elapsed": elapsed})
                logs = result.logs
                bar.update(task, advance=1, info=f"loss {logs.get('loss', float('nan')):.3f} "
                           f"n {job.rows('bank')}")
        if world.distributed:
            elapsed = max(gather_objects(elapsed))  # the run's wall time: its slowest rank
        n = job.publish_ranks(header, {"synthesis_seconds": elapsed, "precision": engine.precision},
                              order=lambda cols: cols["round"], out=out)
    return {"method": method, "images": n, "rounds": rounds, "seconds": elapsed, "precision": engine.precision,
            "images_per_s": n / max(elapsed, 1e-9), "final_losses": logs, "world_size": world.size}

