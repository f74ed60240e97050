"""One process against two under torchrun (gloo, CPU), side by side on one machine: wall time and accuracy.

    python benchmarks/bench_ddp.py [--threads 1]

Runs the default pipeline's `distill@deepinversion` (its bank and params: 30 epochs, batch 64 per rank) and a
short `synthesize --method dafl` once with one process and once with `torchrun --nproc_per_node 2`, each process
at ``--threads`` threads (so two ranks use twice the cores of one). On a 2-core machine this says what the
distributed path costs, not how it scales: a step of two ranks averages two batches, so each rank takes half the
steps, and the same epochs make the same number of images seen. Needs `dvc repro synthesize@deepinversion`
first (artifacts/teachers, artifacts/banks).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DFKD, ROOT, machine

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "stages.cli"]


def run(cmd: list[str], threads: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True,
                   env={**os.environ, "DFKD_NO_PROGRESS": "1", "OMP_NUM_THREADS": str(threads)})
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    teacher = ROOT / "artifacts/teachers/lenet5.safetensors"
    bank = ROOT / "artifacts/banks/deepinversion.h5"
    print(machine(), f"; {args.threads} thread(s) per process")
    print("| run | processes | wall (s) | final test acc (%) |")
    print("| --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for launcher, n in ((DFKD, 1), (TORCHRUN, 2)):
            out = Path(tmp) / f"s{n}.safetensors"
            wall = run([*launcher, "distill", "--name", "deepinversion", "--teacher", str(teacher), "--bank", str(bank),
                        "--out", str(out), "--metrics", str(out.with_suffix(".json")), "--device", "cpu"],
                       args.threads)
            acc = json.loads(out.with_suffix(".json").read_text())["test_acc"]
            print(f"| distill deepinversion (30 epochs) | {n} | {wall:.1f} | {100 * acc:.2f} |", flush=True)
        for launcher, n in ((DFKD, 1), (TORCHRUN, 2)):
            out = Path(tmp) / f"dafl{n}.h5"
            wall = run([*launcher, "synthesize", "--method", "dafl", "--teacher", str(teacher), "--out", str(out),
                        "--rounds", "8", "--device", "cpu"], args.threads)
            print(f"| synthesize dafl (8 rounds of 128) | {n} | {wall:.1f} | |", flush=True)


if __name__ == "__main__":
    main()
