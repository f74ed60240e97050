"""Offline synthesis: a synthesizer's rounds into a bank, one round a unit of the runner, through a job.

Per round: synthesize -> score the quantised images with the teacher -> write them as a shard -> checkpoint the
synthesizer state (the job's checkpoint commits the shard). A crash anywhere in a round redoes exactly that round
on the rerun, so no round is lost or duplicated and the bank equals an uninterrupted run's. Under torchrun rank r
makes rounds r, r + N, ... with its own seed (seed + r) and rank 0 merges them in round order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dfkd_common.bank import BankHeader, logit_columns, to_uint8
from dfkd_common.checkpoint import ModelMeta, file_checksum
from dfkd_common.config import parse, values
from dfkd_common.dist import current, gather_objects, rank_path, rank_share
from dfkd_common.engine import Engine
from dfkd_common.jobs import Job
from dfkd_common.loops.runner import LAYOUT, JobStore, Loop, Runner
from dfkd_common.models import Classifier
from dfkd_common.synthesis import SYNTHESIZERS, Synthesizer, build_synthesizer
from dfkd_common.synthesis.base import SynthesisConfig


@dataclass(frozen=True)
class SynthesisRun:
    """``dfkd synthesize``'s own params (the rest of its section configures the method)."""

    rounds: int = 10
    seed: int = 0
    amp: Literal["auto", True, False] = "auto"  # the engine's: bf16 where the device has it natively
    channels_last: bool = True  # the engine's memory format (1-channel pixel optimisation: off is faster)
    teacher_logits: bool | None = None  # store the teacher's logits per row (None: the task's default, bank.py)


def split_params(params: Mapping[str, Any], method: str) -> tuple[SynthesisRun, SynthesisConfig]:
    """A ``synthesize`` section's params -> the run's config and the method's, each checked (one error line)."""
    run_keys = values(SynthesisRun())
    run = parse(SynthesisRun, {k: v for k, v in params.items() if k in run_keys}, method)
    return run, SYNTHESIZERS.get(method).config({k: v for k, v in params.items() if k not in run_keys})


@torch.no_grad()
def scored_rows(header: BankHeader, teacher: Classifier, engine: Engine, images: torch.Tensor, labels: Any,
                rounds: Any) -> dict[str, np.ndarray]:
    """Quantise ``images`` and return bank columns with the teacher's logits on exactly those stored pixels.

    Shared by offline synthesis and online feeds, so ``teacher_logits`` (what ``dfkd bank info`` reports as
    agreement and confidence) always describes the bank's uint8 images.
    """
    u8 = torch.from_numpy(to_uint8(images))
    if "teacher_logits" not in header.optional:  # not asked for (a segmentation bank's default): no teacher pass
        return header.columns(u8, labels, rounds)
    x = engine.images(u8.to(engine.device).float().div_(255.0))
    t_logits = teacher(x).float().cpu()
    return header.columns(u8, labels, rounds, teacher_logits=t_logits.half())


class SynthesisLoop(Loop):
    """One synthesis round into the job's ``bank`` table (the runner's :class:`~dfkd_common.loops.runner.Loop`)."""

    def __init__(self, synth: Synthesizer, rounds: list[int], header: BankHeader, teacher: Classifier,
                 engine: Engine, job: Job) -> None:
        self.synth, self.rounds, self.header, self.teacher, self.engine, self.job = (
            synth, rounds, header, teacher, engine, job)

    def run(self, index: int) -> dict[str, Any]:
        r = self.rounds[index]
        self.synth.begin_epoch(r)  # offline there are no student epochs: a round stands for one
        result = self.synth.synthesize(r)
        self.job.write("bank", **scored_rows(self.header, self.teacher, self.engine, result.images, result.labels, r))
        return result.logs

    def describe(self, logs: dict[str, Any] | None) -> str:
        return f"loss {(logs or {}).get('loss', float('nan')):.3f} n {self.job.rows('bank')}"

    def state_dict(self) -> dict[str, Any]:
        return {"synth": self.synth.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.synth.load_state_dict(state["synth"])


def run_synthesis(method: str, teacher: Classifier, meta: ModelMeta, teacher_path: Path, out: Path,
                  run: SynthesisRun, method_cfg: SynthesisConfig | Mapping[str, Any], engine: Engine) -> dict[str, Any]:
    """Synthesize ``run.rounds`` rounds of ``method`` into the bank ``out`` (resumable); returns its metrics."""
    info = meta.dataset
    world = current()
    # several ranks: rank r makes rounds r, r + N, ... with its own seed (seed + r); rank 0 merges them by round
    synth = build_synthesizer(method, teacher, info, method_cfg, engine, run.seed + world.rank)
    mine = list(rank_share(range(run.rounds), world))
    teacher_sum = file_checksum(teacher_path)
    header = BankHeader(channels=info.channels, image_size=info.image_size, kind="synthetic", method=method,
                        dataset=info.to_dict(), params=synth.provenance() | {"rounds": run.rounds}, seed=run.seed,
                        teacher_checksum=teacher_sum, optional=logit_columns(info.task, run.teacher_logits))
    key = {"method": method, **values(run), **values(synth.cfg), "teacher": teacher_sum, "runner_layout": LAYOUT,
           **({"world": world.size} if world.distributed else {})}
    with Job(rank_path(out, world), key) as job:
        loop = SynthesisLoop(synth, mine, header, teacher, engine, job)
        result = Runner(JobStore(job), keep=False).run(loop, len(mine), f"synthesize {method}", "round")
        seconds = max(gather_objects(result.seconds)) if world.distributed else result.seconds  # the slowest rank
        n = job.publish_ranks(header, {"synthesis_seconds": seconds, "precision": engine.precision},
                              order=lambda cols: cols["round"], out=out)
    logs = result.history[-1] if result.history else {}
    return {"method": method, "images": n, "rounds": run.rounds, "seconds": seconds, "precision": engine.precision,
            "images_per_s": n / max(seconds, 1e-9), "final_losses": logs, "world_size": world.size}
