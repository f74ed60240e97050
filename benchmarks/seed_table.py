"""Seed spreads of the default pipeline's students from DVC experiments: mean +- sd of each final accuracy.

The seed study itself is DVC's (README "Seed studies"):

    dvc exp run --queue -S method_seed=1   # ... 2, 3; the workspace's own run is method_seed 0
    dvc queue start -j 1 && dvc queue status
    dvc exp show --csv > /tmp/exps.csv
    python benchmarks/seed_table.py /tmp/exps.csv

This script only folds `dvc exp show --csv` (one row per experiment, a column per metric) into one line per
student: which seeds ran, each final test accuracy, mean +- sd, and x teacher. Rows whose method_seed repeats
(the workspace and a committed baseline) count once. An experiment that re-ran only some stages
(`dvc exp run ... distill_online@dfad_priors`) carries the baseline's metrics for every other student; a
student's figure counts for a seed only where its `seconds` differ from the baseline's (a re-run never takes the
same seconds to the last digit), so such carried-over rows do not pose as seeds.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path


def ran(row: dict[str, str], base: dict[str, str], col: str, seed_col: str) -> bool:
    """Whether ``row``'s experiment produced its own figure in ``col``: the workspace's seed always did; another
    seed did only if the student's seconds differ from the workspace's (else they are the workspace's, carried)."""
    if row.get(col) in ("", "-", None):
        return False
    secs = col.replace(":test_acc", ":seconds")
    return row.get(seed_col) == base.get(seed_col) or row.get(secs) != base.get(secs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", type=Path, help="output of `dvc exp show --csv`")
    args = ap.parse_args()
    rows = list(csv.DictReader(args.csv.open()))
    if not rows:
        sys.exit("no experiments in the CSV")
    seed_col = next((c for c in rows[0] if c == "method_seed" or c.endswith(":method_seed")), None)
    if seed_col is None:
        sys.exit("no method_seed column: run `dvc exp show --csv` in the repository root")
    teacher_col = next((c for c in rows[0] if "teachers/" in c and c.endswith("test_acc")), None)
    students = sorted({c for c in rows[0] if "students/" in c and c.endswith(":test_acc")})
    by_seed: dict[str, dict[str, str]] = {}
    for r in rows:
        seed = r.get(seed_col, "")
        if seed not in ("", "-") and seed not in by_seed and any(r.get(c) not in ("", "-", None) for c in students):
            by_seed[seed] = r
    seeds = sorted(by_seed, key=int)
    base = rows[0]  # the workspace (dvc exp show lists it first)
    teacher = float(by_seed[seeds[0]][teacher_col]) if teacher_col and seeds else None
    print(f"seeds {', '.join(seeds)}" + (f"; teacher {100 * teacher:.2f} %" if teacher else ""))
    print("| student | final test accuracy per seed (%) | mean +- sd (%) | x teacher |")
    print("| --- | --- | ---: | ---: |")
    for col in students:
        name = col.split("students/")[1].split(".metrics.json")[0]
        ran_seeds = [s for s in seeds if ran(by_seed[s], base, col, seed_col)]
        vals = [100 * float(by_seed[s][col]) for s in ran_seeds]
        if not vals:
            continue
        mean = statistics.fmean(vals)
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        ratio = f"{mean / (100 * teacher):.3f}" if teacher else ""
        runs = " / ".join(f"{v:.1f}" for v in vals)
        which = ("seeds " if len(ran_seeds) > 1 else "seed ") + ", ".join(ran_seeds)
        print(f"| {name} | {runs} ({which}) | {mean:.2f} +- {sd:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
