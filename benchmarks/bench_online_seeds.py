"""An online method's final student accuracy over several seeds (one seed says little for adversarial methods).

Runs ``dfkd distill --name M --online O --seed S`` (O defaults to M; ``--method dfad_ie --online dfad`` runs
the params.yaml section ``dfad_ie`` with the DFAD feed) with the default pipeline's params.yaml and teacher for
each seed, plus any ``--set key=value`` overrides (relative to the method's ``distill`` section, as on the
command line), and prints each seed's final test accuracy and the mean / sd.

``--jobs 2`` runs two seeds at a time with one thread each (DFAD: two runs in 310 s, against 2 x 231 s one after
the other with two threads on this machine). CPU runs repeat exactly at the same thread count only, so a seed
run with ``--jobs 2`` need not reproduce the 2-thread pipeline figure for that seed digit for digit; the script
prints the thread count.

    python benchmarks/bench_online_seeds.py --method dfad [--online dfad] [--seeds 0 1 2] [--jobs 2]
        [--set online.lr_g=0.003]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import DFKD, ROOT, spread


def run_seed(method: str, online: str, seed: int, teacher: Path, work: Path, sets: list[str],
             threads: int | None) -> float:
    out = work / f"{method}.{seed}"
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    cmd = [*DFKD, "distill", "--name", method, "--online", online, "--teacher", str(teacher),
           "--out", f"{out}.safetensors", "--bank-out", f"{out}.h5", "--metrics", f"{out}.json",
           "--plots", f"{out}.plots.json", "--seed", str(seed), *[a for kv in sets for a in ("--set", kv)]]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=env)
    return 100 * float(json.loads(Path(f"{out}.json").read_text())["test_acc"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="dfad")
    ap.add_argument("--online", default=None, help="online method (default: --method)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1, help="seeds run at once (threads split between them)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="distill param override, key=value")
    ap.add_argument("--teacher", type=Path, default=ROOT / "artifacts/teachers/lenet5.safetensors")
    ap.add_argument("--work", type=Path, default=None, help="keep students, banks and metrics here")
    args = ap.parse_args()
    if not args.teacher.exists():
        sys.exit(f"teacher {args.teacher} not found: run `dvc repro teacher` first")
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    print(f"{args.method}, seeds {args.seeds}, {args.jobs} at a time, threads per run: {threads or 'default'}"
          + (f", overrides {args.sets}" if args.sets else ""), flush=True)
    with tempfile.TemporaryDirectory() as tmp_dir:
        work = args.work or Path(tmp_dir)
        work.mkdir(parents=True, exist_ok=True)
        online = args.online or args.method
        with ThreadPoolExecutor(args.jobs) as pool:
            accs = list(pool.map(lambda s: run_seed(args.method, online, s, args.teacher, work, args.sets, threads),
                                 args.seeds))
    teacher_acc = 100 * float(json.loads(args.teacher.with_suffix(".metrics.json").read_text())["test_acc"]) \
        if args.teacher.with_suffix(".metrics.json").exists() else None
    for seed, acc in zip(args.seeds, accs, strict=True):
        print(f"seed {seed}: {acc:.1f} %")
    ratio = f" ({statistics.mean(accs) / teacher_acc:.3f} x teacher)" if teacher_acc else ""
    print(f"{args.method} {spread(accs)}{ratio}, min {min(accs):.1f}")


if __name__ == "__main__":
    main()
