"""Run a synthesizer for a number of rounds into a bank: resumable, atomic, with teacher logits stored.

Protocol per round: synthesize -> append to the bank's work file -> commit -> save the synthesizer state
(which records how many bank rows it has accounted for). A resume truncates the work file to that row count,
so a crash anywhere in a round redoes exactly that round and never duplicates one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from dfkd_common.bank import BankWriter, to_uint8
from dfkd_common.checkpoint import ModelMeta, file_checksum
from dfkd_common.engine import Engine, progress
from dfkd_common.models import Classifier
from dfkd_common.synthesis import build_synthesizer
from dfkd_common.training import Resume


@torch.no_grad()
def append_scored(
    writer: BankWriter, teacher: Classifier, engine: Engine, images: torch.Tensor, labels: Any, rounds: Any
) -> torch.Tensor:
    """Quantise ``images``, append them with the teacher's logits on exactly those stored pixels, commit.

    Shared by offline synthesis and online feeds, so ``teacher_logits`` (what ``dfkd bank info`` reports as
    agreement and confidence) always describes the bank's uint8 images. Returns the uint8 batch.
    """
    u8 = torch.from_numpy(to_uint8(images))
    x = engine.images(u8.to(engine.device).float().div_(255.0))
    t_logits = teacher(x).float().cpu()
    writer.append(u8, labels, rounds, teacher_logits=t_logits.half())
    writer.commit()
    return u8


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
    seed = int(params.get("seed", 0))
    rounds = int(params.get("rounds", 10))
    cfg = {k: v for k, v in params.items() if k not in ("rounds", "seed")}
    synth = build_synthesizer(method, teacher, info, cfg, engine, seed)
    resume = Resume.for_output(out, {"method": method, **params, "teacher": file_checksum(teacher_path)})
    writer = BankWriter(
        out, channels=info.channels, image_size=info.image_size, kind="synthetic", method=method,
        dataset=info.to_dict(), params=synth.cfg | {"rounds": rounds}, seed=seed,
        teacher_checksum=file_checksum(teacher_path), optional=("teacher_logits",), resume=True,
    )
    state = resume.load()
    start, elapsed = 0, 0.0
    if state is not None:
        synth.load_state_dict(state["synth"])
        resume.restore_rng(state)
        writer.truncate(int(state["rows"]))
        start, elapsed = int(state["round"]), float(state["elapsed"])
    else:
        writer.truncate(0)
    logs: dict[str, float] = {}
    try:
        with progress() as bar:
            task = bar.add_task(f"synthesize {method}", total=rounds, completed=start, info="")
            for r in range(start, rounds):
                t0 = time.perf_counter()
                synth.begin_epoch(r)  # offline there are no student epochs: a round stands for one
                result = synth.synthesize(r)
                elapsed += time.perf_counter() - t0
                append_scored(writer, teacher, engine, result.images, result.labels, r)
                resume.save({"synth": synth.state_dict(), "rows": len(writer), "round": r + 1, "elapsed": elapsed})
                logs = result.logs
                bar.update(task, advance=1, info=f"loss {logs.get('loss', float('nan')):.3f} n {len(writer)}")
        n = len(writer)
        writer.set_attr("synthesis_seconds", elapsed)
        writer.set_attr("precision", engine.precision)
        writer.close()
    except BaseException:
        writer.abort(keep_work=True)
        raise
    resume.clear()
    return {"method": method, "images": n, "rounds": rounds, "seconds": elapsed, "precision": engine.precision,
            "images_per_s": n / max(elapsed, 1e-9), "final_losses": logs}
