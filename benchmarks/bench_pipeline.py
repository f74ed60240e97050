"""Time the whole default pipeline and print the README results table from its artifacts.

    python benchmarks/bench_pipeline.py            # dvc repro --force, then the table
    python benchmarks/bench_pipeline.py --no-run   # only the table from existing artifacts/

Accuracies are the *final* students' on the real mnist5k test split (1,000 held-out digits), never a
best epoch chosen on the test set. Times come from each stage's metrics JSON (seconds of synthesis,
retrieval or distillation, excluding process start-up); the total is the wall time of `dvc repro`. The first line
names the machine class (CPU model, whether it has native bf16) and each row the precision its stage chose: float
results and times differ between CPU models, so figures are comparable only within one such run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, machine

from dfkd_common.engine import details_path

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
    print(machine())
    teacher = load(ART / "teachers" / "lenet5.metrics.json")
    print(f"teacher lenet5 on mnist5k: final test accuracy {100 * teacher.get('test_acc', float('nan')):.2f} %")
    print()
    print("| student (lenet5_half) | images | bank time (s) | distill time (s) | precision (synthesis) | "
          "final test acc (%) | x teacher |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for m in sorted((ART / "students").glob("*.metrics.json")):
        name = m.name.removesuffix(".metrics.json")
        s, detail = load(m), load(details_path(m))
        banks = detail.get("bank")
        banks = [] if banks in (None, "None") else banks if isinstance(banks, list) else [banks]
        made = [load(Path(b).with_name(Path(b).name.removesuffix(".h5") + ".metrics.json")) for b in banks]
        bank_s = sum(float(b.get("seconds") or 0) for b in made) if made else None
        precision = (detail.get("online_precision")
                     or load(details_path(ART / "banks" / f"{Path(banks[0]).stem}.metrics.json")).get("precision")
                     if banks else detail.get("online_precision")) or ""
        print(f"| {name} | {s.get('images', '')} | {'' if bank_s is None else f'{bank_s:.0f}'} | "
              f"{s.get('seconds', 0):.0f} | {precision} | {100 * s['test_acc']:.2f} | "
              f"{'' if s.get('x_teacher') is None else format(s['x_teacher'], '.3f')} |")
    pool = load(ART / "pools" / "offline.metrics.json")
    retrieve = {n: load(details_path(ART / "banks" / f"{n}.metrics.json")).get("total_seconds")
                for n in ("dfnd", "dfnd_random", "dfnd_auto", "dfnd_hybrid")}
    print(f"\nother stages: pool {pool.get('images', '?')} images; retrieval "
          + ", ".join(f"{k} {v:.0f} s" for k, v in retrieve.items() if v is not None))
    if wall is not None:
        print(f"\nwhole `dvc repro --force`: {wall / 60:.1f} min wall on {os.cpu_count()} CPU cores")


if __name__ == "__main__":
    main()
