"""The side-by-side benchmark's arithmetic: what it counts as a step, a round and an epoch (no timing here).

Both sides of ``benchmarks/bench_vs_reference.py`` are measured by the same recorder and extrapolated by the same
formula; a wrong attribution (the student's optimiser taken for the generator's) or a wrong epoch (the authors'
two loops per call counted once) would skew every ratio it prints.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> Iterator[tuple[Any, Any]]:
    sys.path.insert(0, str(BENCH))
    try:
        import bench_vs_reference
        from peers import timing

        yield bench_vs_reference, timing
    finally:
        sys.path.remove(str(BENCH))


def _recorder(timing: Any, gen_gap: float, stu_gap: float, head_gap: float) -> Any:
    """Two rounds: 3 generator steps (Adam, id 1) then 3 student steps (SGD, id 2, the largest) with a small SGD
    head (id 3) stepping after each student step. The first round's student steps take half as long (dfkd's first
    epoch draws its batches from a bank of one round, smaller than the student's batch)."""
    rec = timing.Recorder()
    t = 0.0
    for r in range(2):
        rec.phases.append(timing.Phase("synth", t))
        for _ in range(3):
            t += gen_gap
            rec.steps.append(timing.Step(t, 1, "Adam", 1000, "synth"))
        rec.phases[-1].end = t + 0.5  # the round's writes
        t += 0.5
        rec.phases.append(timing.Phase("student", t))
        for _ in range(3):
            t += stu_gap * (0.5 if r == 0 else 1.0)
            rec.steps.append(timing.Step(t, 2, "SGD", 5000, "student"))
            rec.steps.append(timing.Step(t + head_gap, 3, "SGD", 10, "student"))
        rec.phases[-1].end = t + head_gap
        t += head_gap
    return rec


def test_recorder_attributes_steps_to_generator_and_student(bench: tuple[Any, Any]) -> None:
    _, timing = bench
    s = _recorder(timing, gen_gap=2.0, stu_gap=1.0, head_gap=0.1).summary()
    assert s["generator_step_s"] == pytest.approx(2.0)
    # the head's SGD is not the student's optimiser, and the first round's steps are left out
    assert s["student_step_s"] == pytest.approx(1.0)
    assert s["round_s"] == pytest.approx(3 * 2.0 + 0.5)  # the second round (the first is dropped)
    assert s["steps_per_round"] == 3


def test_epoch_counts_the_authors_loops_per_call_as_our_rounds(bench: tuple[Any, Any]) -> None:
    """NAYER's one synthesize() runs 2 loops of g_steps; dfkd runs 2 rounds of one loop: at equal step times and no
    overheads the two epochs are equal, and both are 2 x 30 generator steps + 400 student steps."""
    b, _ = bench
    a = argparse.Namespace(method="nayer", g_steps=3, kd_steps=3)
    pub = {"synthesis_batch": 400, "g_steps": 30, "g_steps_per_round": 60, "kd_steps": 400, "rounds_per_epoch": 1}
    gen, stu = 2.0, 1.0
    peer = {"generator_step_s": gen, "student_step_s": stu, "round_s": 2 * 3 * gen, "train_call_s": 3 * stu}
    ours = {"generator_step_s": gen, "student_step_s": stu, "round_s": 3 * gen, "train_call_s": 3 * stu}
    p, o = b.extrapolate(peer, pub, a, "peer"), b.extrapolate(ours, pub, a, "ours")
    assert p["epoch_s"] == pytest.approx(60 * gen + 400 * stu)
    assert o["epoch_s"] == pytest.approx(p["epoch_s"])
    assert o["per_1000_images_s"] == pytest.approx(p["per_1000_images_s"])  # 30 steps per 400 images both


def test_epoch_of_several_rounds_with_a_training_call_each(bench: tuple[Any, Any]) -> None:
    """Fast-Datafree's DAFL: 80 rounds an epoch, each one generator step and 5 student steps."""
    b, _ = bench
    a = argparse.Namespace(method="dafl", g_steps=3, kd_steps=3)
    pub = {"synthesis_batch": 256, "g_steps": 1, "kd_steps": 5, "rounds_per_epoch": 80}
    s = {"generator_step_s": 2.0, "student_step_s": 1.0, "round_s": 3 * 2.0 + 0.25, "train_call_s": 3 * 1.0 + 0.1}
    peer = b.extrapolate(s, pub, a, "peer")
    assert peer["round_s"] == pytest.approx(2.0 + 0.25)
    assert peer["epoch_s"] == pytest.approx(80 * (2.25 + 0.1 + 5 * 1.0))
    ours = b.extrapolate(s, pub, a, "ours")  # one training call an epoch: its overhead once
    assert ours["epoch_s"] == pytest.approx(80 * 2.25 + 0.1 + 400 * 1.0)
