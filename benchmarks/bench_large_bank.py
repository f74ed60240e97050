"""A bank larger than a few GB, written, distilled from (streamed) and inspected, with each phase's peak memory.

Phases, each a fresh process (the memory figures are per phase):

* **write**: 40,000 images of 224x224x3 (6.0 GB) written the way every bank-writing stage writes (a
  :class:`~dfkd_common.jobs.Job`: a shard per round of 250 images, a checkpoint every 8 rounds, then
  ``publish_bank``). The pixels are stored noise (one 250-image block, varied per round): synthesis speed is
  not the point, the bank's size is.
* **distill**: ``dfkd distill`` of a tiny student from a tiny teacher (``benchmarks/tinynet.py``, random
  weights, 224 px) for one full epoch over the bank, which streams (``stream.mode: auto``, the bank above
  ``stream.above_mib``), evaluated on a 1,000-image labelled bank (``--test``).
* **info**, **grid** and **verify**: ``dfkd bank info``, ``dfkd bank grid`` (10 images a class) and ``dfkd bank
  verify`` on the bank.

Peak memory is the whole process tree's (DataLoader workers included): the largest sum of the tree's resident
set sizes, sampled every 50 ms (shared pages of forked workers count in each: an upper bound). The last line
is one JSON object: ``{"bank_bytes": ..., "peak_rss_bytes": {"write": ..., "distill": ..., "info": ...,
"grid": ..., "verify": ...}, "peak_pss_bytes": {...}, "seconds": {...}}`` (PSS: the tree's proportional set
sizes, shared pages split between the processes that share them).

    python benchmarks/bench_large_bank.py [--dir /tmp/dfkd-large-bank] [--images 40000] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DFKD = [sys.executable, "-m", "stages.cli"]
NET = str(ROOT / "benchmarks" / "tinynet.py") + ":TinyNet"
SIZE, CLASSES, ROUND = 224, 10, 250


def tree_peak(cmd: list[str]) -> tuple[int, int, float]:
    """Run ``cmd``; its process tree's peak memory (bytes) as the sum of resident set sizes (RSS: shared pages
    of forked workers counted in each, an upper bound) and as the sum of proportional set sizes (PSS: shared
    pages split between their sharers, what the tree takes), and its wall time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "DFKD_NO_PROGRESS": "1"})
    root = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss = pss = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    full = p.memory_full_info()
                    rss, pss = rss + full.rss, pss + getattr(full, "pss", full.rss)
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.05)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:4])} failed ({proc.returncode}): {err.strip()[-2000:]}")
    return peak_rss, peak_pss, time.perf_counter() - t0


def header(kind: str = "synthetic"):  # a BankHeader (imported late: the phases are subprocesses)
    from dfkd_common.bank import BankHeader

    dataset = {"name": "noise224", "task": "classification", "num_classes": CLASSES, "channels": 3,
               "image_size": [SIZE, SIZE], "class_names": [str(c) for c in range(CLASSES)],
               "mean": [0.5] * 3, "std": [0.25] * 3}
    return BankHeader(channels=3, image_size=SIZE, kind=kind, method="stored-noise", dataset=dataset)


def write_phase(out: Path, images: int) -> None:
    """The bank, written as the stages write theirs (a job's shards, then the publish)."""
    from dfkd_common.jobs import Job

    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (ROUND, 3, SIZE, SIZE), dtype=np.uint8)
    head = header()
    with Job(out, {"bench": "large-bank", "images": images}) as job:
        done = int((job.state or {}).get("rounds", 0))
        job.restore_rng()
        rounds = -(-images // ROUND)
        for r in range(done, rounds):
            n = min(ROUND, images - r * ROUND)
            pixels = np.bitwise_xor(block[:n], np.uint8(r % 256))  # a different image per round, no new memory
            job.write("bank", **head.columns(pixels, (np.arange(n) + r) % CLASSES, r))
            if (r + 1) % 8 == 0 or r + 1 == rounds:
                job.checkpoint({"rounds": r + 1})
        job.publish_bank(head)


def test_bank(out: Path, n: int = 1000) -> None:
    from dfkd_common.bank import BankWriter

    rng = np.random.default_rng(1)
    h = header()
    with BankWriter(out, channels=3, image_size=SIZE, kind="synthetic", method="stored-noise",
                    dataset=h.dataset) as w:
        for _ in range(0, n, 250):
            w.append(rng.integers(0, 256, (250, 3, SIZE, SIZE), dtype=np.uint8), np.arange(250) % CLASSES, 0)


def teacher(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tinynet import TinyNet

    torch.manual_seed(0)
    weights = out.with_suffix(".weights.safetensors")
    save_file({k: v.contiguous() for k, v in TinyNet(CLASSES).state_dict().items()}, str(weights))
    subprocess.run([*DFKD, "teacher", "import", "--arch", NET, "--weights", str(weights), "--image-size", str(SIZE),
                    "--channels", "3", "--classes", str(CLASSES), "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dfkd-large-bank"))
    ap.add_argument("--images", type=int, default=40_000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--above-mib", type=float, help="stream.above_mib (default: dfkd's); a smoke run streams a "
                    "small bank with 0")
    ap.add_argument("--keep", action="store_true", help="keep the bank and the work folder afterwards")
    ap.add_argument("--phase", choices=["write"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    bank = args.dir / "large.h5"
    if args.phase == "write":
        write_phase(bank, args.images)
        return
    from _common import machine

    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    teacher(args.dir / "teacher.safetensors")
    test_bank(args.dir / "test.h5")
    (args.dir / "none.yaml").write_text("{}\n")  # dfkd's defaults, not the default pipeline's params
    stream = ["--set", f"stream.above_mib={args.above_mib}"] if args.above_mib is not None else []
    peaks: dict[str, int] = {}
    pss: dict[str, int] = {}
    seconds: dict[str, float] = {}

    def peak(phase: str) -> str:
        return f"peak {peaks[phase] / 1e9:.2f} GB (RSS sum; PSS {pss[phase] / 1e9:.2f} GB)"

    print(f"machine: {machine()}", flush=True)
    peaks["write"], pss["write"], seconds["write"] = tree_peak(
        [sys.executable, __file__, "--phase", "write", "--dir", str(args.dir), "--images", str(args.images)])
    size = bank.stat().st_size
    print(f"write: {size / 1e9:.2f} GB bank in {seconds['write']:.0f} s, {peak('write')}", flush=True)
    peaks["distill"], pss["distill"], seconds["distill"] = tree_peak(
        [*DFKD, "distill", "--teacher", str(args.dir / "teacher.safetensors"), "--student", NET, "--bank", str(bank),
         "--test", str(args.dir / "test.h5"), "--out", str(args.dir / "student.safetensors"),
         "--metrics", str(args.dir / "metrics.json"), "--params", str(args.dir / "none.yaml"),
         "--set", "epochs=1", "--set", f"batch_size={args.batch_size}", "--set", "augment.crop_pad=8", *stream])
    steps = json.loads((args.dir / "metrics.json").read_text())
    print(f"distill: one streamed epoch ({args.images // args.batch_size} steps of {args.batch_size}) in "
          f"{seconds['distill']:.0f} s, {peak('distill')}; {steps.get('images')} images",
          flush=True)
    for phase in ("info", "grid", "verify"):
        extra = ["--out", str(args.dir / "grid.png")] if phase == "grid" else []
        peaks[phase], pss[phase], seconds[phase] = tree_peak([*DFKD, "bank", phase, str(bank), *extra])
        print(f"{phase}: {seconds[phase]:.0f} s, {peak(phase)}", flush=True)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(json.dumps({"bank_bytes": size, "peak_rss_bytes": peaks, "peak_pss_bytes": pss,
                      "seconds": {k: round(v, 1) for k, v in seconds.items()}}))


if __name__ == "__main__":
    main()
