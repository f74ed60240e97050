"""Time the whole default pipeline and print the README results table from its artifacts.

    python benchmarks/bench_pipeline.py            # dvc repro --force, then the table
    python benchmarks/bench_pipeline.py --no-run   # only the table from existing artifacts/

Accuracies are the *final* students' on the real mnist5k test split (1,000 held-out digits), never a
best epoch chosen on the test set. Times come from each stage's metrics JSON (seconds of synthesis,
retrieval or distillation, excluding process start-up); the total is the wall time of `dvc repro`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT

ART = ROOT / "artifacts"


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-run", action="store_true")
    args = ap.parse_args()
    wall = None
    if not args.no_run:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        t0 = time.perf_counter()
        subprocess.run(["dvc", "repro", "--force"], cwd=ROOT, env=env, check=True)
        wall = time.perf_counter() - t0
    teacher = load(ART / "teachers" / "lenet5.metrics.json")
    print(f"teacher lenet5 on mnist5k: final test accuracy {100 * teacher.get('test_acc', float('nan')):.2f} %")
    print()
    print("| student (lenet5_half) | bank | bank time (s) | distill time (s) | final test acc (%) | x teacher |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for m in sorted((ART / "students").glob("*.metrics.json")):
        name = m.name.removesuffix(".metrics.json")
        s = load(m)
        bank = load(ART / "banks" / f"{name}.metrics.json")
        bank_s = bank.get("seconds")
        ratio = s.get("ratio_to_teacher")
        print(f"| {name} | {s.get('bank_size', '')} | {'' if bank_s is None else f'{bank_s:.0f}'} | "
              f"{s.get('seconds', 0):.0f} | {100 * s['test_acc']:.2f} | {'' if ratio is None else f'{ratio:.3f}'} |")
    if wall is not None:
        print(f"\nwhole `dvc repro --force`: {wall / 60:.1f} min wall on {os.cpu_count()} CPU cores")


if __name__ == "__main__":
    main()
