"""DFND fixed, auto and hybrid against random selection, on wild pools of several mixes, over seeds.

    python benchmarks/dfnd_pools.py --out /tmp/pools.json                      # every pool, seeds 0 1 2
    python benchmarks/dfnd_pools.py --pools photos --out docs/data/dfnd_pools_photos.json   # as docs/RESULTS.md
    python benchmarks/dfnd_pools.py --pools photos --seeds 0 --out /tmp/x.json  # one pool, one seed
    python benchmarks/dfnd_pools.py --table docs/data/dfnd_pools*.json         # the table again

Runs are one thread each (``OMP_NUM_THREADS=1``: bit-reproducible on this machine class, docs/RESULTS.md), so two
instances with different ``--pools`` use two cores without slowing each other down.

Each pool is built by ``dfkd pool build`` from the default pipeline's ``pool`` params with a few overridden
(``POOLS``); each run is the pipeline's own commands with its params profiles (``retrieve.dfnd``, ``dfnd_auto``,
``dfnd_hybrid``, ``dfnd_random`` and the same-named ``distill`` profiles), at ``--seed`` = the seed, against the
pipeline's teacher (``dvc repro teacher`` first). The final student's accuracy on mnist5k's test split is
reported, as mean +- sd over the seeds and as x teacher; the relevance estimate against each pool's true digit
count. Runs already in ``--work`` are reused (delete the folder to redo them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

POOLS: dict[str, list[str]] = {
    "default": [],  # 7,188 digit-like images of 48,188 (14.9 %)
    "noisy": ["noise=20000"],  # the default pool with 20x its noise: 7,188 of 67,188 (10.7 %)
    "photos": ["digits_variants=0", "photo_crops=26000", "noise=500"],  # 1,797 of 28,297 (6.4 %)
}
VARIANTS = ["dfnd", "dfnd_auto", "dfnd_hybrid", "dfnd_random"]
TEACHER = "artifacts/teachers/lenet5.safetensors"


def digit_rows(pool: Path) -> int:
    """How many of the pool's rows came from its ``digits`` source (the relevant ones, by construction)."""
    import h5py
    import numpy as np

    with h5py.File(pool, "r") as h5:
        names = json.loads(h5.attrs["source_names"])
        return int(np.count_nonzero(h5["source"][:] == names.index("digits")))


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})


def one(work: Path, pool: str, seed: int, variant: str) -> dict[str, Any]:
    d = work / pool / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    bank, ret, student = d / f"{variant}.h5", d / f"{variant}.retrieve.json", d / f"{variant}.metrics.json"
    if not student.exists():
        run(["dfkd", "retrieve", "--name", variant, "--teacher", TEACHER, "--wild", str(work / pool / "pool.h5"),
             "--out", str(bank), "--metrics", str(ret), "--seed", str(seed)])
        run(["dfkd", "distill", "--name", variant, "--teacher", TEACHER, "--bank", str(bank),
             "--out", str(d / f"{variant}.safetensors"), "--metrics", str(student), "--seed", str(seed)])
    r = json.loads(ret.with_name(f"{variant}.retrieve.details.json").read_text())
    s = json.loads(student.read_text())
    return {"pool": pool, "seed": seed, "variant": variant, "test_acc": s["test_acc"], "x_teacher": s["x_teacher"],
            "selected": r["selected"], "per_source": r["per_source"], "relevance": r["relevance"],
            "retrieve_seconds": r["total_seconds"], "distill_seconds": s["seconds"]}


def table(rows: list[dict[str, Any]]) -> str:
    pools = list(dict.fromkeys(r["pool"] for r in rows))
    out = ["| pool | relevant: true / estimated | " + " | ".join(VARIANTS) + " |",
           "| --- | ---: | " + " | ".join("---:" for _ in VARIANTS) + " |"]
    for pool in pools:
        mine = [r for r in rows if r["pool"] == pool]
        est = mine[0]["relevance"]["count"]
        true = mine[0]["pool_digits"]
        cells = []
        for v in VARIANTS:
            acc = [100 * r["test_acc"] for r in mine if r["variant"] == v]
            xt = [r["x_teacher"] for r in mine if r["variant"] == v]
            if not acc:
                cells.append("-")
                continue
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            cells.append(f"{statistics.mean(acc):.2f} +- {sd:.2f} ({statistics.mean(xt):.3f}x, n={len(acc)})")
        out.append(f"| {pool} | {true:,} / {est:,} | " + " | ".join(cells) + " |")
    out += ["", "Paired differences against fixed top-k (`dfnd`), same seed, points, mean +- sd:", "",
            "| pool | auto - fixed | hybrid - fixed | fixed - random |", "| --- | ---: | ---: | ---: |"]
    for pool in pools:
        acc = {(r["variant"], r["seed"]): 100 * r["test_acc"] for r in rows if r["pool"] == pool}

        def diff(a: str, b: str, acc: dict[tuple[str, int], float] = acc) -> str:
            d = [acc[a, s] - acc[b, s] for v, s in acc if v == a and (b, s) in acc]
            if not d:
                return "-"
            return f"{statistics.mean(d):+.2f} +- {statistics.stdev(d) if len(d) > 1 else 0.0:.2f} (n={len(d)})"

        out.append(f"| {pool} | {diff('dfnd_auto', 'dfnd')} | {diff('dfnd_hybrid', 'dfnd')} | "
                   f"{diff('dfnd', 'dfnd_random')} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pools", nargs="+", default=list(POOLS), choices=list(POOLS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dfnd_pools"))
    ap.add_argument("--out", type=Path, help="JSON of every run")
    ap.add_argument("--table", type=Path, nargs="+", help="print the table of JSONs written before, and stop")
    args = ap.parse_args()
    if args.table:
        print(table([r for path in args.table for r in json.loads(path.read_text())["runs"]]))
        return
    rows = []
    for pool in args.pools:
        path = args.work / pool / "pool.h5"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            run(["dfkd", "pool", "build", "--out", str(path), "--metrics", str(path.with_suffix(".json")),
                 *[a for kv in POOLS[pool] for a in ("--set", kv)]])
        digits = digit_rows(path)
        for seed in args.seeds:
            for variant in args.variants:
                rows.append(one(args.work, pool, seed, variant) | {"pool_digits": digits})
                if args.out:
                    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "runs": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
