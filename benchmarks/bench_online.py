"""Online synthesis overhead: one synthesis step of DFAD / Fast / NAYER / CPNet vs the raw generator+teacher step.

For each method this builds the feed exactly as ``dfkd distill --online M`` does (params.yaml's
``distill.<M>.online`` section, the default pipeline's teacher, a fresh LeNet-5-half student) and times:

* **dfkd**: optimised images per second of the method's own generator step against the student
  (DFAD: :meth:`DFADFeed.generator_step`; the others: a whole :meth:`Synthesizer.synthesize` round after the
  warm-up, i.e. with the adversarial term, ``batch_size x g_steps`` optimised images);
* **raw**: the same generator and batch, ``G(input) -> teacher -> cross-entropy -> backward -> Adam step`` and
  nothing else, in the same engine and precision.

* **floor**: the raw step plus the work the method's definition cannot skip: the student's forward (and the
  backward through it) for the adversarial term, and for CPNet the extra no-grad clean teacher forward L_xn's
  targets come from. Nothing else (no hooks, augmentation, alignment, bookkeeping).

``overhead = dfkd time / raw time`` (issue 3's goal: <= 1.2 for DFAD and CPNet); ``floor`` is the floor step's
time over raw, i.e. the best ratio any implementation of the method could reach with this generator,
teacher and student, and ``vs floor`` is what this implementation adds on top of it. Times are medians of
the three contenders called in turn (:func:`interleaved`), so the VM's drifting speed cancels out.

    python benchmarks/bench_online.py [--methods dfad cpnet] [--steps 48]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from _common import ROOT, teacher_or_untrained

from dfkd_common.checkpoint import load_model
from dfkd_common.data import DatasetInfo
from dfkd_common.engine import Engine, fused_adam
from dfkd_common.models import build_model
from dfkd_common.online import RecordedFeed, build_online_feed, recording
from dfkd_common.online.base import frozen
from dfkd_common.online.dfad import DFADFeed
from dfkd_common.params import merge


def online_params(method: str) -> tuple[dict, int]:
    """The method's ``online:`` params and the student batch size, as the default pipeline sets them."""
    distill = yaml.safe_load((ROOT / "params.yaml").read_text())["distill"]
    cfg = merge(distill.get("common", {}), distill.get(method, {}))
    return dict(cfg.get("online", {})), int(cfg["batch_size"])


def interleaved(steps: dict[str, tuple[Callable[[], object], int]], reps: int) -> dict[str, float]:
    """Median seconds per generator step of each ``(callable, steps per call)``, timed in turn each repetition.

    This VM's speed drifts by tens of percent within seconds. Timed one after another in blocks, the same code's
    DFAD overhead read anywhere from 1.22 to 1.44; alternating the contenders call by call and taking medians
    compares them under the same conditions.
    """
    for fn, _ in steps.values():  # warm-up
        fn()
        fn()
    samples: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for name, (fn, per_call) in steps.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) / per_call)
    return {k: statistics.median(v) for k, v in samples.items()}


def repeat(step: Callable[[], object], times: int) -> None:
    for _ in range(times):
        step()


def generator_step(generator: torch.nn.Module, make_input: Callable[[], torch.Tensor], teacher: torch.nn.Module,
                   engine: Engine, n: int, k: int, student: torch.nn.Module | None = None,
                   clean_forward: bool = False) -> Callable[[], None]:
    """``G(input) -> teacher -> CE -> backward -> step``: the raw step every generator method pays.

    With ``student`` it is the *floor*: the student's adversarial KL joins the loss (its forward and the backward
    through it), and ``clean_forward`` adds CPNet's extra no-grad teacher forward for L_xn's targets.
    """
    opt = fused_adam(generator.parameters(), lr=1e-4)
    y = torch.randint(0, k, (n,), device=engine.device)
    for p in [*teacher.parameters(), *(student.parameters() if student is not None else [])]:
        p.requires_grad_(False)

    def step() -> None:
        with engine.autocast():
            x = engine.images(generator(make_input()).float())
            if clean_forward:
                with torch.no_grad():
                    teacher(x)
            t = teacher(x).float()
            loss = F.cross_entropy(t, y)
            if student is not None:
                s = student(x).float()
                loss = loss - F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True,
                                       reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench(method: str, teacher_path: Path, tmp: Path, steps: int) -> None:
    cfg, batch = online_params(method)
    engine = Engine.create("cpu", amp=cfg.pop("amp", "auto"), channels_last=bool(cfg.pop("channels_last", True)))
    teacher, meta = load_model(teacher_path)
    info = meta.dataset
    with recording(tmp / f"{method}.h5", teacher, info, engine, method, batch_size=batch, epochs=20) as ctx:
        feed = build_online_feed(method, ctx, cfg)
        bench_feed(method, feed, teacher_path, engine, info, batch, steps)


def bench_feed(method: str, feed: RecordedFeed, teacher_path: Path, engine: Engine, info: DatasetInfo,
               batch: int, steps: int) -> None:
    student = engine.model(build_model("lenet5_half", info.num_classes, info.channels, info.mean, info.std))
    t_teacher = engine.model(load_model(teacher_path)[0]).eval()
    if isinstance(feed, DFADFeed):
        feed.before_epoch(0, student)
        n, per_call = batch, 1
        method_step: Callable[[], object] = lambda: feed.generator_step(n)  # noqa: E731
        gen = feed.generator
        make_input: Callable[[], torch.Tensor] = lambda: feed.noise(n)  # noqa: E731
    else:
        synth = feed.synth  # type: ignore[attr-defined]
        n, per_call = synth.cfg.batch_size, synth.cfg.g_steps
        rounds = iter(range(10**6))

        def one_round() -> None:
            with frozen(student):
                synth.synthesize(next(rounds), student)

        method_step = one_round
        gen = synth.generator
        y = synth.labels(n, 0) if hasattr(synth, "labels") else None
        if y is not None:  # label-conditioned generators (NAYER, CPNet): the same input path
            make_input = lambda: y  # noqa: E731
        else:
            nz = synth.cfg.nz
            make_input = lambda: synth.noise(n, nz)  # noqa: E731
    raw = generator_step(gen, make_input, t_teacher, engine, n, info.num_classes)
    floor = generator_step(gen, make_input, t_teacher, engine, n, info.num_classes, student=student,
                           clean_forward=method.startswith("cpnet"))
    times = interleaved({"dfkd": (method_step, per_call), "raw": (lambda: repeat(raw, per_call), per_call),
                         "floor": (lambda: repeat(floor, per_call), per_call)}, max(3, steps // per_call))
    sec, raw_sec, floor_sec = times["dfkd"], times["raw"], times["floor"]
    print(f"{method:7s} batch {n:4d} x {per_call:3d} steps | dfkd {n / sec:8.1f} optimised img/s | "
          f"raw G+T fwd/bwd {n / raw_sec:8.1f} img/s | overhead {sec / raw_sec:5.2f} | "
          f"floor {floor_sec / raw_sec:5.2f} | vs floor {sec / floor_sec:5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["dfad", "fast", "nayer", "cpnet"])
    ap.add_argument("--steps", type=int, default=48, help="timed generator steps per method and contender")
    ap.add_argument("--teacher", type=Path, default=ROOT / "artifacts/teachers/lenet5.safetensors")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu count {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        teacher_path = teacher_or_untrained(args.teacher, tmp)
        for method in args.methods:
            bench(method, teacher_path, tmp, args.steps)


if __name__ == "__main__":
    main()
