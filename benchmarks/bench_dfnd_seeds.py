"""DFND vs its random-selection baseline over several seeds (issue 4's "beaten", measured beyond one seed).

For each seed: retrieve ``num_select`` images from the pipeline's offline pool by teacher confidence (DFND) and
uniformly at random (the paper's "random unlabeled" row), distill a student from each with the same DFND loss
and seed, and print both final test accuracies. Uses the default pipeline's params.yaml sections (``pool``,
``retrieve``, ``distill``) and its teacher; ``--set`` style overrides go to the pool builder only
(``--pool-set noise=0``), so different pool mixes can be compared.

    python benchmarks/bench_dfnd_seeds.py [--seeds 0 1 2] [--pool-set noise=5000 ...] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import DFKD, ROOT, spread


def run(*args: str | Path) -> None:
    subprocess.run([*DFKD, *map(str, args)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--teacher", type=Path, default=ROOT / "artifacts/teachers/lenet5.safetensors")
    ap.add_argument("--pool-set", nargs="*", default=[], help="pool params to override, key=value")
    ap.add_argument("--work", type=Path, default=None, help="keep pool, banks and students here")
    args = ap.parse_args()
    if not args.teacher.exists():
        sys.exit(f"teacher {args.teacher} not found: run `dvc repro teacher` first")
    with tempfile.TemporaryDirectory() as tmp_dir:
        work = args.work or Path(tmp_dir)
        work.mkdir(parents=True, exist_ok=True)
        pool = work / "pool.h5"
        sets = [a for kv in args.pool_set for a in ("--set", kv)]
        run("pool", "build", "--out", pool, *sets)
        acc: dict[str, list[float]] = {"dfnd": [], "dfnd_random": []}
        for seed in args.seeds:
            for name in acc:
                bank, student, metrics = (work / f"{name}.{seed}.{ext}" for ext in ("h5", "safetensors", "json"))
                run("retrieve", "--name", name, "--teacher", args.teacher, "--wild", pool, "--out", bank,
                    "--seed", seed)
                run("distill", "--name", name, "--teacher", args.teacher, "--bank", bank, "--out", student,
                    "--metrics", metrics, "--seed", seed)
                acc[name].append(100 * float(json.loads(metrics.read_text())["test_acc"]))
            print(f"seed {seed}: DFND {acc['dfnd'][-1]:.1f} %  random {acc['dfnd_random'][-1]:.1f} %", flush=True)
        for name, vals in acc.items():
            each = ", ".join(f"{v:.1f}" for v in vals)
            print(f"{name:12s} {spread(vals)}  ({each})")
        wins = sum(a > b for a, b in zip(acc["dfnd"], acc["dfnd_random"], strict=True))
        print(f"DFND beats random in {wins} of {len(args.seeds)} seeds")


if __name__ == "__main__":
    main()
