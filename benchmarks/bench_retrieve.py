"""Retrieval (DFND scoring) throughput vs raw teacher forward, and peak memory as the pool grows 10x.

Run (from the repo root)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_retrieve.py [--teacher T.safetensors] [--n 10000]

* throughput: images scored per second by :func:`dfkd_common.retrieval.score_pool` (HDF5 pool read, channel /
  size conversion, teacher forward, score file writes) vs the teacher's forward alone on the very same batches
  already in memory as float tensors. Goal: ratio >= 0.8 (the pipeline around the model costs < 20 %).
* memory: peak RSS of a fresh process that runs the whole ``retrieve`` (score, select, write the bank) on a pool
  of N and of 10 N images, minus that process's RSS after imports and model load. Goal: flat (the pool is
  streamed; only the O(N) score file lives on disk).

Without ``--teacher`` a randomly initialised LeNet-5 (1x32x32, 10 classes) is used: throughput does not
depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import teacher_or_untrained

from dfkd_common.augment_ops import to_float
from dfkd_common.bank import BankWriter
from dfkd_common.checkpoint import load_model
from dfkd_common.data.wild import WildPool
from dfkd_common.engine import Engine
from dfkd_common.geometry import shape_str
from dfkd_common.retrieval import RetrieveConfig, retrieve, score_pool, scores_path


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_pool(path: Path, n: int, c: int, hw: tuple[int, int]) -> None:
    info = {"name": "bench", "channels": c, "image_size": list(hw), "num_classes": 0, "class_names": [],
            "mean": [0.5] * c, "std": [0.25] * c}
    rng = np.random.default_rng(0)
    w = BankWriter(path, channels=c, image_size=hw, kind="merged", method="bench", dataset=info)
    for i in range(0, n, 8192):
        w.append(rng.integers(0, 256, (min(8192, n - i), c, *hw), dtype=np.uint8), -1, 0)
    w.close()


def child(teacher: Path, pool: Path, out: Path, batch: int) -> None:
    """Run in a fresh process: full retrieve, print JSON with peak RSS above the post-load baseline."""
    engine = Engine.create("cpu", amp=False)
    model, meta = load_model(teacher)
    p = WildPool.open([f"bank:{pool}"], meta.dataset.channels, meta.dataset.image_size)
    base = _current_rss()
    cfg = RetrieveConfig(num_select=1000, balance=True, batch_size=batch)
    r = retrieve(model, meta, teacher, p, out, engine, cfg)
    print(json.dumps({"n": len(p), "peak_rss_mib": rss_mib(), "baseline_rss_mib": base,
                      "images_per_s": r["images_per_s"]}))


def _current_rss() -> float:
    with open(f"/proc/{os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", type=Path)
    ap.add_argument("--n", type=int, default=10000, help="small pool size (the large one is 10x)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_retrieve_"))
    teacher = args.teacher or teacher_or_untrained(None, tmp)  # an explicit --teacher must exist
    if args.child:
        child(teacher, args.child[0], args.child[1], args.batch_size)
        return
    model, meta = load_model(teacher)
    c, s = meta.dataset.channels, meta.dataset.image_size
    engine = Engine.create("cpu", amp=False)
    model = engine.model(model)
    print(f"threads {torch.get_num_threads()}, teacher {meta.arch} {shape_str(c, s)}, batch {args.batch_size}")

    small = tmp / "pool_small.h5"
    make_pool(small, args.n, c, s)
    pool = WildPool.open([f"bank:{small}"], c, s)
    # raw: the same batches, read once into memory as float tensors, teacher forward only
    batches = [engine.images(to_float(b["images"])) for b in pool.loader(range(len(pool)), args.batch_size)]
    with torch.no_grad():
        model(batches[0])
        t0 = time.perf_counter()
        for x in batches:
            model(x)
        raw = len(pool) / (time.perf_counter() - t0)
    del batches
    cfg = RetrieveConfig(num_select=1000, batch_size=args.batch_size, flush_every=20)
    work = scores_path(tmp / "o.h5")
    scored = score_pool(model, pool, engine, cfg, work, "bench")["images_per_s"]
    work.unlink()
    print(f"raw teacher forward   {raw:10.0f} img/s")
    print(f"retrieval scoring     {scored:10.0f} img/s   ratio {scored / raw:.2f} (goal >= 0.8)")

    big = tmp / "pool_big.h5"
    make_pool(big, 10 * args.n, c, s)
    for pool_path in (small, big):
        cmd = [sys.executable, __file__, "--teacher", str(teacher), "--batch-size", str(args.batch_size),
               "--child", str(pool_path), str(tmp / f"ret_{pool_path.stem}.h5")]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                        env={**os.environ, "DFKD_NO_PROGRESS": "1"}).stdout.strip().splitlines()[-1])
        print(f"pool {res['n']:>8d} images: peak RSS {res['peak_rss_mib']:7.1f} MiB "
              f"(+{res['peak_rss_mib'] - res['baseline_rss_mib']:.1f} over post-load baseline), "
              f"{res['images_per_s']:.0f} img/s end to end")
    print(f"command: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} {sys.executable} {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
